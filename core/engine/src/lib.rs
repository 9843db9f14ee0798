//! Host-side library of likeness. Never links libtorch, ONNX Runtime or CUDA (those live in
//! plugins): everything here runs on a machine that has none of them.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset;
pub mod error;
pub mod eval_faces;
pub mod generate;
pub mod metrics_log;
pub mod musubi_prompts;
pub mod pairedit;
pub mod plots;
pub mod plugins;
pub mod seed000;
pub mod similarity;
pub mod train;
pub mod visual;

pub use abi_stable;
pub use error::{EngineError, Result};
pub use likeness_abi as abi;

/// Writes `bytes` to `path` through a temporary sibling, fsync and rename, so a reader (or a
/// run killed mid-write) never sees half a file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = visual::temp_sibling(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EngineError::io(path, e)
    })
}
