//! Plugin manifests, discovery and loading.
//!
//! Discovery reads `plugin.toml` manifests only; a library is opened when a plugin is used
//! (`Registry::open_*`) and never unloaded, so deleters and instances stay valid for the life
//! of the process.

mod discovery;
mod handles;
mod loader;
mod manifest;

pub use discovery::{default_search_path, Discovered, Registry, SearchDir, SearchSource};
pub use handles::{
    legacy_interface, Loss, LossResult, Metric, MetricResult, Model, ModelLibrary, ModelResult, Outputs, TextBatch,
};
pub use loader::{open_library, read_library, regenerate_hint, LibraryInfo, LoadError, LoadedLibrary};
pub use manifest::{render as render_manifest, Manifest, Requires};
