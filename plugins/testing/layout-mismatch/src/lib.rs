//! Test fixture: the header is right (current ABI, kind Loss) but the abi_stable root module
//! is not the host's `likeness_abi::LossPluginMod`.
//!
//! It declares its own prefix struct with the same name, the same `BASE_NAME`
//! ("likeness_loss_plugin") and the same version strings, but `value_and_grad` takes an extra
//! `scale: f32` argument. The header check passes; abi_stable's layout check must then refuse
//! the library with its report, and the host must show it instead of calling anything.
//! None of the functions below is ever meant to run.

use abi_stable::{
    declare_root_module_statics, export_root_module,
    library::RootModule,
    package_version_strings,
    prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings,
    std_types::{RSlice, RStr, RString, RVec},
    StableAbi,
};
use likeness_sdk::abi::{
    AbiVersion, Device, InstanceHandle, LossOutput, NamedView, PluginDescriptor, PluginHeader, PluginKind, PluginResult,
};
use likeness_sdk::{err, DescriptorBuilder};

/// Same name and fields as `likeness_abi::LossPluginMod`, except `value_and_grad`'s signature.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = LossPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct LossPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    pub input_names: extern "C" fn(InstanceHandle) -> RVec<RString>,
    /// The deliberate difference: an extra `scale: f32` parameter.
    #[sabi(last_prefix_field)]
    pub value_and_grad: extern "C" fn(
        InstanceHandle,
        inputs: RSlice<'_, NamedView<'_>>,
        want_grad: bool,
        scale: f32,
    ) -> PluginResult<LossOutput>,
}

impl RootModule for LossPluginModRef {
    declare_root_module_statics! {LossPluginModRef}
    const BASE_NAME: &'static str = "likeness_loss_plugin";
    const NAME: &'static str = "likeness_loss_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn descriptor() -> PluginDescriptor {
    DescriptorBuilder::new("testing-layout-mismatch", PluginKind::Loss, env!("CARGO_PKG_VERSION"))
        .summary("Test fixture: root module layout differs from the host's")
        .build()
}

extern "C" fn create(_config: RStr<'_>, _device: Device, _seed: u64) -> PluginResult<InstanceHandle> {
    PluginResult::RErr(err::unsupported("testing-layout-mismatch: never callable"))
}

extern "C" fn destroy(_h: InstanceHandle) {}

extern "C" fn input_names(_h: InstanceHandle) -> RVec<RString> {
    RVec::new()
}

extern "C" fn value_and_grad(
    _h: InstanceHandle,
    _inputs: RSlice<'_, NamedView<'_>>,
    _want_grad: bool,
    _scale: f32,
) -> PluginResult<LossOutput> {
    PluginResult::RErr(err::unsupported("testing-layout-mismatch: never callable"))
}

#[export_root_module]
pub fn get_library() -> LossPluginModRef {
    LossPluginMod { descriptor, create, destroy, input_names, value_and_grad }.leak_into_prefix()
}

/// A correct header: current ABI, kind Loss — so only the layout check can catch this one.
#[no_mangle]
pub extern "C" fn likeness_plugin_header() -> PluginHeader {
    PluginHeader { abi: AbiVersion::CURRENT, kind: PluginKind::Loss }
}
