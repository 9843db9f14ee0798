//! The ABI 1.0 root modules, frozen: what a 1.0 plugin's layout is checked against.
//!
//! abi_stable refuses a library whose prefix type has *fewer* fields than the loader's
//! (`check_fields`: interface longer than implementation = "too many fields"), so a 1.1
//! host cannot check a 1.0 plugin against the 1.1 modules. It checks it against these
//! copies instead (same type names and package, the 1.0 fields), then reads the module
//! through the current `…ModRef`, whose appended fields read as absent because the
//! library's own prefix metadata marks them inaccessible. Never edit: add a `v1_1` copy
//! when 1.2 appends fields.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RSlice, RStr},
    StableAbi,
};

use crate::{
    Device, Embeddings, ForwardMode, InstanceHandle, LossOutput, ManagedTensor, ModelOutput, NamedView, OptimizerStep,
    ParameterInfo, PluginDescriptor, PluginResult, StepReport, TensorView,
};
use abi_stable::std_types::{RString, RVec};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = ModelPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct ModelPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    pub parameters: extern "C" fn(InstanceHandle) -> PluginResult<ParameterInfo>,
    pub forward: extern "C" fn(
        InstanceHandle,
        inputs: RSlice<'_, NamedView<'_>>,
        mode: ForwardMode,
    ) -> PluginResult<ModelOutput>,
    pub backward:
        extern "C" fn(InstanceHandle, grads: RSlice<'_, NamedView<'_>>, internal_loss_weight: f64) -> PluginResult<()>,
    pub optimizer_step: extern "C" fn(InstanceHandle, step: OptimizerStep) -> PluginResult<StepReport>,
    pub zero_grad: extern "C" fn(InstanceHandle) -> PluginResult<()>,
    pub save_state: extern "C" fn(InstanceHandle, dir: RStr<'_>, with_optimizer: bool) -> PluginResult<()>,
    #[sabi(last_prefix_field)]
    pub load_state: extern "C" fn(InstanceHandle, dir: RStr<'_>) -> PluginResult<()>,
}

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = MetricPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct MetricPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    pub embed: extern "C" fn(InstanceHandle, pixels: TensorView, mode: ForwardMode) -> PluginResult<Embeddings>,
    #[sabi(last_prefix_field)]
    pub backward: extern "C" fn(InstanceHandle, d_embeddings: TensorView) -> PluginResult<ManagedTensor>,
}

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = LossPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct LossPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    pub input_names: extern "C" fn(InstanceHandle) -> RVec<RString>,
    #[sabi(last_prefix_field)]
    pub value_and_grad:
        extern "C" fn(InstanceHandle, inputs: RSlice<'_, NamedView<'_>>, want_grad: bool) -> PluginResult<LossOutput>,
}

macro_rules! root_module {
    ($ref:ident, $name:literal) => {
        impl RootModule for $ref {
            declare_root_module_statics! {$ref}
            const BASE_NAME: &'static str = $name;
            const NAME: &'static str = $name;
            const VERSION_STRINGS: VersionStrings = package_version_strings!();
        }
    };
}
root_module!(ModelPluginModRef, "likeness_model_plugin");
root_module!(MetricPluginModRef, "likeness_metric_plugin");
root_module!(LossPluginModRef, "likeness_loss_plugin");
