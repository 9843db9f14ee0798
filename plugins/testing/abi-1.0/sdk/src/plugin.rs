//! The Rust-side traits plugin authors implement, and the `extern "C"` shims that adapt them
//! to the ABI's root modules. Each shim runs inside the panic guard.

use std::ffi::c_void;
use std::path::Path;

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use likeness_abi as abi;
use likeness_abi::{
    Device, ForwardMode, InstanceHandle, LossPluginMod, LossPluginModRef, ManagedTensor, MetricPluginMod,
    MetricPluginModRef, ModelPluginMod, ModelPluginModRef, NamedTensor, NamedView, OptimizerStep, ParameterInfo,
    PluginDescriptor, PluginResult, StepReport, TensorView,
};

use crate::guard::{guarded, guarded_void};
use crate::{err, Inputs, Result};

/// What [`ModelPlugin::forward`] returns.
pub struct ModelOutput {
    /// At least `"pixels"`: f32 NCHW RGB in [0, 1].
    pub outputs: Vec<(String, ManagedTensor)>,
    /// The model's own loss (diffusion / flow matching), if it has one.
    pub internal_loss: Option<f64>,
}

/// A model: owns trainable parameters and their optimizer.
pub trait ModelPlugin: Send + Sized + 'static {
    fn descriptor() -> PluginDescriptor;
    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self>;
    fn parameters(&self) -> Result<ParameterInfo>;
    /// Inputs are borrowed for this call only: copy what backward needs.
    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> Result<ModelOutput>;
    /// VJP of the last `forward(Train)`; accumulates parameter gradients.
    fn backward(&mut self, grads: Inputs<'_>, internal_loss_weight: f64) -> Result<()>;
    fn optimizer_step(&mut self, step: OptimizerStep) -> Result<StepReport>;
    fn zero_grad(&mut self) -> Result<()>;
    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()>;
    fn load_state(&mut self, dir: &Path) -> Result<()>;
}

/// What [`MetricPlugin::embed`] returns.
pub struct MetricOutput {
    /// `[B, D]` f32, L2-normalised.
    pub embeddings: ManagedTensor,
    /// `[B]` u8, 1 where a face was found.
    pub valid: ManagedTensor,
}

/// An identity metric.
pub trait MetricPlugin: Send + Sized + 'static {
    fn descriptor() -> PluginDescriptor;
    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self>;
    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> Result<MetricOutput>;
    /// VJP of the last `embed(Train)`. Plugins that are not differentiable keep the default.
    fn backward(&mut self, _d_embeddings: &TensorView) -> Result<ManagedTensor> {
        Err(err::unsupported("this metric is not differentiable"))
    }
}

/// What [`LossPlugin::value_and_grad`] returns.
pub struct LossOutput {
    pub value: f64,
    pub terms: Vec<(String, f64)>,
    pub grads: Vec<(String, ManagedTensor)>,
}

/// A loss.
pub trait LossPlugin: Send + Sized + 'static {
    fn descriptor() -> PluginDescriptor;
    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self>;
    fn input_names(&self) -> Vec<String>;
    fn value_and_grad(&mut self, inputs: Inputs<'_>, want_grad: bool) -> Result<LossOutput>;
}

// ---------------------------------------------------------------------------------------------
// Instances

struct Instance<T> {
    id: String,
    inner: T,
}

fn new_instance<T>(id: String, inner: T) -> InstanceHandle {
    InstanceHandle(Box::into_raw(Box::new(Instance { id, inner })) as *mut c_void)
}

/// # Safety
/// `h` must come from `new_instance::<T>` and not be destroyed; the host never calls two
/// methods of one instance at once.
unsafe fn instance<'a, T>(h: InstanceHandle) -> &'a mut Instance<T> {
    &mut *(h.0 as *mut Instance<T>)
}

fn destroy_instance<T>(h: InstanceHandle) {
    if h.0.is_null() {
        return;
    }
    // SAFETY: as for `instance`; `destroy` is called once.
    let id = unsafe { instance::<T>(h).id.clone() };
    guarded_void(&id, "destroy", || drop(unsafe { Box::from_raw(h.0 as *mut Instance<T>) }));
}

fn descriptor_guarded(f: fn() -> PluginDescriptor) -> PluginDescriptor {
    match std::panic::catch_unwind(f) {
        Ok(d) => d,
        Err(_) => {
            // A descriptor that cannot be built is reported through a descriptor the host
            // will refuse (kind/abi checks still pass; the id says what happened).
            let mut d = crate::DescriptorBuilder::new("<descriptor panicked>", abi::PluginKind::Loss, "0.0.0").build();
            d.summary = "the plugin's descriptor() panicked".into();
            d
        }
    }
}

fn named_tensors(v: Vec<(String, ManagedTensor)>) -> RVec<NamedTensor> {
    v.into_iter().map(|(name, tensor)| NamedTensor { name: RString::from(name), tensor }).collect()
}

fn path<'a>(s: &'a RStr<'_>) -> &'a Path {
    Path::new(s.as_str())
}

// ---------------------------------------------------------------------------------------------
// Model shims

extern "C" fn model_descriptor<T: ModelPlugin>() -> PluginDescriptor {
    descriptor_guarded(T::descriptor)
}

extern "C" fn model_create<T: ModelPlugin>(config: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle> {
    let id = model_descriptor::<T>().id.into_string();
    guarded(&id.clone(), "create", || Ok(new_instance(id, T::create(config.as_str(), device, seed)?)))
}

extern "C" fn model_destroy<T: ModelPlugin>(h: InstanceHandle) {
    destroy_instance::<T>(h)
}

extern "C" fn model_parameters<T: ModelPlugin>(h: InstanceHandle) -> PluginResult<ParameterInfo> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "parameters", || i.inner.parameters())
}

extern "C" fn model_forward<T: ModelPlugin>(
    h: InstanceHandle,
    inputs: RSlice<'_, NamedView<'_>>,
    mode: ForwardMode,
) -> PluginResult<abi::ModelOutput> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "forward", || {
        let out = i.inner.forward(Inputs::new(inputs), mode)?;
        Ok(abi::ModelOutput {
            outputs: named_tensors(out.outputs),
            internal_loss: out.internal_loss.map(ROption::RSome).unwrap_or(ROption::RNone),
        })
    })
}

extern "C" fn model_backward<T: ModelPlugin>(
    h: InstanceHandle,
    grads: RSlice<'_, NamedView<'_>>,
    weight: f64,
) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "backward", || i.inner.backward(Inputs::new(grads), weight))
}

extern "C" fn model_optimizer_step<T: ModelPlugin>(h: InstanceHandle, step: OptimizerStep) -> PluginResult<StepReport> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "optimizer_step", || i.inner.optimizer_step(step))
}

extern "C" fn model_zero_grad<T: ModelPlugin>(h: InstanceHandle) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "zero_grad", || i.inner.zero_grad())
}

extern "C" fn model_save_state<T: ModelPlugin>(h: InstanceHandle, dir: RStr<'_>, with_optimizer: bool) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "save_state", || i.inner.save_state(path(&dir), with_optimizer))
}

extern "C" fn model_load_state<T: ModelPlugin>(h: InstanceHandle, dir: RStr<'_>) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "load_state", || i.inner.load_state(path(&dir)))
}

/// The root module for a [`ModelPlugin`] (used by [`crate::export_model_plugin!`]).
pub fn model_module<T: ModelPlugin>() -> ModelPluginModRef {
    abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix(ModelPluginMod {
        descriptor: model_descriptor::<T>,
        create: model_create::<T>,
        destroy: model_destroy::<T>,
        parameters: model_parameters::<T>,
        forward: model_forward::<T>,
        backward: model_backward::<T>,
        optimizer_step: model_optimizer_step::<T>,
        zero_grad: model_zero_grad::<T>,
        save_state: model_save_state::<T>,
        load_state: model_load_state::<T>,
    })
}

// ---------------------------------------------------------------------------------------------
// Metric shims

extern "C" fn metric_descriptor<T: MetricPlugin>() -> PluginDescriptor {
    descriptor_guarded(T::descriptor)
}

extern "C" fn metric_create<T: MetricPlugin>(config: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle> {
    let id = metric_descriptor::<T>().id.into_string();
    guarded(&id.clone(), "create", || Ok(new_instance(id, T::create(config.as_str(), device, seed)?)))
}

extern "C" fn metric_destroy<T: MetricPlugin>(h: InstanceHandle) {
    destroy_instance::<T>(h)
}

extern "C" fn metric_embed<T: MetricPlugin>(h: InstanceHandle, pixels: TensorView, mode: ForwardMode) -> PluginResult<abi::Embeddings> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "embed", || {
        let out = i.inner.embed(&pixels, mode)?;
        Ok(abi::Embeddings { embeddings: out.embeddings, valid: out.valid })
    })
}

extern "C" fn metric_backward<T: MetricPlugin>(h: InstanceHandle, d: TensorView) -> PluginResult<ManagedTensor> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "backward", || i.inner.backward(&d))
}

/// The root module for a [`MetricPlugin`].
pub fn metric_module<T: MetricPlugin>() -> MetricPluginModRef {
    abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix(MetricPluginMod {
        descriptor: metric_descriptor::<T>,
        create: metric_create::<T>,
        destroy: metric_destroy::<T>,
        embed: metric_embed::<T>,
        backward: metric_backward::<T>,
    })
}

// ---------------------------------------------------------------------------------------------
// Loss shims

extern "C" fn loss_descriptor<T: LossPlugin>() -> PluginDescriptor {
    descriptor_guarded(T::descriptor)
}

extern "C" fn loss_create<T: LossPlugin>(config: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle> {
    let id = loss_descriptor::<T>().id.into_string();
    guarded(&id.clone(), "create", || Ok(new_instance(id, T::create(config.as_str(), device, seed)?)))
}

extern "C" fn loss_destroy<T: LossPlugin>(h: InstanceHandle) {
    destroy_instance::<T>(h)
}

extern "C" fn loss_input_names<T: LossPlugin>(h: InstanceHandle) -> RVec<RString> {
    let i = unsafe { instance::<T>(h) };
    match guarded(&i.id, "input_names", || Ok(i.inner.input_names())) {
        RResult::ROk(v) => v.into_iter().map(RString::from).collect(),
        RResult::RErr(e) => {
            eprintln!("{}", e.message);
            RVec::new()
        }
    }
}

extern "C" fn loss_value_and_grad<T: LossPlugin>(
    h: InstanceHandle,
    inputs: RSlice<'_, NamedView<'_>>,
    want_grad: bool,
) -> PluginResult<abi::LossOutput> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "value_and_grad", || {
        let out = i.inner.value_and_grad(Inputs::new(inputs), want_grad)?;
        Ok(abi::LossOutput {
            value: out.value,
            terms: out.terms.into_iter().map(|(n, v)| abi::LossTerm { name: n.into(), value: v }).collect(),
            grads: named_tensors(out.grads),
        })
    })
}

/// The root module for a [`LossPlugin`].
pub fn loss_module<T: LossPlugin>() -> LossPluginModRef {
    abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix(LossPluginMod {
        descriptor: loss_descriptor::<T>,
        create: loss_create::<T>,
        destroy: loss_destroy::<T>,
        input_names: loss_input_names::<T>,
        value_and_grad: loss_value_and_grad::<T>,
    })
}

// ---------------------------------------------------------------------------------------------
// Export macros

/// Exports a [`ModelPlugin`] implementation as this library's plugin.
#[macro_export]
macro_rules! export_model_plugin {
    ($ty:ty) => {
        $crate::__export_root_module!($crate::abi::ModelPluginModRef, $crate::plugin::model_module::<$ty>);
        $crate::__export_header!($crate::abi::PluginKind::Model);
    };
}

/// Exports a [`MetricPlugin`] implementation as this library's plugin.
#[macro_export]
macro_rules! export_metric_plugin {
    ($ty:ty) => {
        $crate::__export_root_module!($crate::abi::MetricPluginModRef, $crate::plugin::metric_module::<$ty>);
        $crate::__export_header!($crate::abi::PluginKind::Metric);
    };
}

/// Exports a [`LossPlugin`] implementation as this library's plugin.
#[macro_export]
macro_rules! export_loss_plugin {
    ($ty:ty) => {
        $crate::__export_root_module!($crate::abi::LossPluginModRef, $crate::plugin::loss_module::<$ty>);
        $crate::__export_header!($crate::abi::PluginKind::Loss);
    };
}

/// abi_stable's root module, exported under the name abi_stable looks for. Equivalent to
/// `#[abi_stable::export_root_module]`, which plugins cannot use without depending on
/// abi_stable themselves.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_root_module {
    ($modref:ty, $ctor:expr) => {
        #[doc(hidden)]
        pub fn __likeness_root_module() -> $modref {
            $ctor()
        }

        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __LIKENESS_LIB_HEADER: $crate::abi_stable::library::LibHeader = {
            extern "C" fn __erased() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__likeness_root_module)
            }
            // SAFETY: `__erased` returns the module `__likeness_root_module` builds, of type `$modref`.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$modref>(
                    __erased,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

/// The plain-C header symbol (`likeness_plugin_header`).
#[doc(hidden)]
#[macro_export]
macro_rules! __export_header {
    ($kind:expr) => {
        #[no_mangle]
        pub extern "C" fn likeness_plugin_header() -> $crate::abi::PluginHeader {
            $crate::abi::PluginHeader { abi: $crate::abi::AbiVersion::CURRENT, kind: $kind }
        }
    };
}
