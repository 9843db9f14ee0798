//! What a likeness plugin author links.
//!
//! Write a type, implement one of [`ModelPlugin`], [`MetricPlugin`] or [`LossPlugin`] for it,
//! and call the matching export macro ([`export_model_plugin!`] …). The macro generates the
//! abi_stable root module and the plain-C header symbol; every generated entry point runs your
//! method inside [`guard::guarded`], so a panic becomes a [`PluginError`] instead of ending the
//! host process.
//!
//! libtorch plugins also link `likeness-sdk-torch` (tch adapters, AdamW).
//!
//! A plugin crate depends on this crate only (not on abi_stable, not on `likeness-abi`
//! directly: both are re-exported).
//!
//! ```text
//! struct Charbonnier;
//! impl likeness_sdk::LossPlugin for Charbonnier { /* … */ }
//! likeness_sdk::export_loss_plugin!(Charbonnier);
//! ```

pub use abi_stable;
pub use likeness_abi as abi;
pub use likeness_abi::{
    DataType, Device, DeviceType, ErrorCode, ForwardMode, GroupHyper, InputKind, LossTerm, MetricInterface,
    ModelInterface, OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, PluginKind, SampleRequest, ScaledView,
    StepContext, StepReport, TensorView,
};
/// Model ids (`org/name`) resolved offline from the local Hugging Face cache, as the host
/// resolves `model.config.pretrained`: for a plugin that takes more model ids of its own.
pub use likeness_hf_cache as hf_cache;
pub use serde_json;

pub mod descriptor;
pub mod fuzz;
pub mod guard;
pub mod image;
pub mod inputs;
pub mod interface;
pub mod plugin;
pub mod st;
pub mod testing;
pub mod torch_pickle;
pub mod venv;

pub use descriptor::DescriptorBuilder;
pub use inputs::{Inputs, Texts};
pub use interface::ModelSpec;
pub use likeness_abi::cpu;
pub use likeness_abi::CpuTensor;
pub use plugin::{LossOutput, LossPlugin, MetricOutput, MetricPlugin, ModelOutput, ModelPlugin};

/// Result type of every plugin method.
pub type Result<T, E = PluginError> = std::result::Result<T, E>;

/// Short constructors for the common error codes.
pub mod err {
    use super::{ErrorCode, PluginError};
    pub fn config(msg: impl Into<String>) -> PluginError {
        PluginError::new(ErrorCode::InvalidConfig, msg)
    }
    pub fn input(msg: impl Into<String>) -> PluginError {
        PluginError::new(ErrorCode::InvalidInput, msg)
    }
    pub fn unsupported(msg: impl Into<String>) -> PluginError {
        PluginError::new(ErrorCode::Unsupported, msg)
    }
    pub fn io(msg: impl Into<String>) -> PluginError {
        PluginError::new(ErrorCode::Io, msg)
    }
    pub fn internal(msg: impl Into<String>) -> PluginError {
        PluginError::new(ErrorCode::Internal, msg)
    }
}

/// Parses a plugin's config JSON into `T`, rejecting unknown keys with a message that names
/// the plugin, the key and the valid keys (use `#[serde(deny_unknown_fields)]` on `T`).
pub fn parse_config<T: serde::de::DeserializeOwned>(plugin_id: &str, json: &str) -> Result<T> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    serde_json::from_str(json).map_err(|e| err::config(format!("config of plugin `{plugin_id}`: {e}")))
}

#[doc(hidden)]
pub mod __private {
    /// abi_stable's root-module loader symbol (`abi_stable::library::ROOT_MODULE_LOADER_NAME`),
    /// spelled out because `#[export_name]` needs a literal; a test keeps the two equal.
    pub const ROOT_MODULE_LOADER_NAME: &str = "_1as_0lib_1header_0root_bmodule_bloader";
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_module_loader_name_matches_abi_stable() {
        assert_eq!(super::__private::ROOT_MODULE_LOADER_NAME, abi_stable::library::ROOT_MODULE_LOADER_NAME);
    }
}
