//! The Rust-side traits plugin authors implement, and the `extern "C"` shims that adapt them
//! to the ABI's root modules. Each shim runs inside the panic guard.

use std::ffi::c_void;
use std::path::Path;

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use likeness_abi as abi;
use likeness_abi::{
    Device, ForwardMode, GroupHyper, InstanceHandle, LossPluginMod, LossPluginModRef, ManagedTensor, MetricInterface,
    MetricPluginMod, MetricPluginModRef, ModelInterface, ModelPluginMod, ModelPluginModRef, NamedTensor, NamedTexts,
    NamedView, OptimizerStep, ParameterInfo, PluginDescriptor, PluginResult, SampleRequest, ScaledView, StepContext,
    StepReport, TensorView,
};

use crate::guard::{guarded, guarded_void};
use crate::interface::ModelSpec;
use crate::{err, Inputs, Result, Texts};

/// What [`ModelPlugin::forward`] returns.
pub struct ModelOutput {
    /// At least `"pixels"`: f32 NCHW RGB in [0, 1].
    pub outputs: Vec<(String, ManagedTensor)>,
    /// The model's own loss (diffusion / flow matching), if it has one.
    pub internal_loss: Option<f64>,
}

/// A model: owns trainable parameters and their optimizer.
///
/// Required: `descriptor`, `create`, `parameters`, one of `forward` / `forward_batch`,
/// `backward`, `optimizer_step`, `zero_grad`, `save_state`, `load_state`. Everything else has a
/// default: the 1.0 behaviour, or an `Unsupported` error that names the method.
pub trait ModelPlugin: Send + Sized + 'static {
    fn descriptor() -> PluginDescriptor;
    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self>;
    fn parameters(&self) -> Result<ParameterInfo>;
    /// The ABI 1.0 forward: images only. Inputs are borrowed for this call only: copy what
    /// backward needs. Implement this or [`ModelPlugin::forward_batch`].
    fn forward(&mut self, _inputs: Inputs<'_>, _mode: ForwardMode) -> Result<ModelOutput> {
        Err(err::unsupported("this model implements neither forward nor forward_batch"))
    }
    /// VJP of the last `forward(Train)`; accumulates parameter gradients.
    fn backward(&mut self, grads: Inputs<'_>, internal_loss_weight: f64) -> Result<()>;
    fn optimizer_step(&mut self, step: OptimizerStep) -> Result<StepReport>;
    fn zero_grad(&mut self) -> Result<()>;
    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()>;
    fn load_state(&mut self, dir: &Path) -> Result<()>;

    // ---- ABI 1.1 ------------------------------------------------------------------------

    /// What the model reads and produces with this config (called before `create`). The
    /// default is the 1.0 contract: images `reference` (required) and `target`, output
    /// `pixels`.
    fn interface(_config_json: &str) -> Result<ModelInterface> {
        Ok(ModelSpec::legacy().build())
    }
    /// Forward with named texts and the step context. Everything random must derive from
    /// `ctx` (`ctx.sample_seeds`, see [`likeness_abi::sample_seed`]). The default calls [`ModelPlugin::forward`].
    fn forward_batch(
        &mut self,
        images: Inputs<'_>,
        _texts: Texts<'_>,
        _ctx: &StepContext<'_>,
        mode: ForwardMode,
    ) -> Result<ModelOutput> {
        self.forward(images, mode)
    }
    /// `backward` with a scale per gradient. The default sums the scaled gradients on the CPU
    /// and calls [`ModelPlugin::backward`]; a plugin whose tensors live on a GPU overrides it
    /// to scale there.
    fn backward_scaled(&mut self, grads: &[ScaledView<'_>], internal_loss_weight: f64) -> Result<()> {
        let summed = likeness_abi::cpu::sum_scaled(grads)?;
        let views: Vec<NamedView<'_>> =
            summed.iter().map(|(n, t)| NamedView { name: RStr::from_str(n), view: t.view() }).collect();
        self.backward(Inputs::new(RSlice::from_slice(&views)), internal_loss_weight)
    }
    /// An optimizer step with per-group hyper-parameters. The default accepts no groups.
    fn optimizer_step_groups(&mut self, step: OptimizerStep, groups: &[GroupHyper<'_>]) -> Result<StepReport> {
        if groups.is_empty() {
            return self.optimizer_step(step);
        }
        Err(err::unsupported("this model has one parameter group; remove the train.param_groups entries"))
    }
    /// Generates images (f32 NCHW RGB in [0, 1]).
    fn sample(&mut self, _request: &SampleRequest<'_>) -> Result<ManagedTensor> {
        Err(err::unsupported("this model does not implement `sample`"))
    }
    /// Writes the adapter into `dir` in `format`; returns the files written.
    fn export_adapter(
        &mut self,
        _dir: &Path,
        format: &str,
        _metadata: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<std::path::PathBuf>> {
        Err(err::unsupported(format!("this model does not export adapters (asked for format `{format}`)")))
    }
    /// Computes the declared encoding `name` of a batch of its source inputs (no graph).
    fn encode(&mut self, name: &str, _images: Inputs<'_>, _texts: Texts<'_>) -> Result<Vec<(String, ManagedTensor)>> {
        Err(err::unsupported(format!("this model declares no encoding `{name}`")))
    }
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

    // ---- ABI 1.1 ------------------------------------------------------------------------

    /// How the metric's scores read. The default declares no same-person threshold.
    fn interface(_config_json: &str) -> Result<MetricInterface> {
        Ok(MetricInterface { same_person_threshold: -2.0, embeds_texts: false, subject: "face".into() })
    }
    /// Text embeddings in the image embedding space (CLIP's text tower).
    fn embed_texts(&mut self, _texts: &[&str]) -> Result<ManagedTensor> {
        Err(err::unsupported("this metric does not embed texts"))
    }
    /// `backward(scale · d_embeddings)`; the default scales the result on the CPU.
    fn backward_scaled(&mut self, d_embeddings: &TensorView, scale: f64) -> Result<ManagedTensor> {
        let d = self.backward(d_embeddings)?;
        likeness_abi::cpu::scale_managed(d, scale, "d_pixels")
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

    /// `value_and_grad` with the gradients multiplied by `grad_scale`; the default scales them
    /// on the CPU.
    fn value_and_scaled_grad(&mut self, inputs: Inputs<'_>, want_grad: bool, grad_scale: f64) -> Result<LossOutput> {
        let mut out = self.value_and_grad(inputs, want_grad)?;
        out.grads = out
            .grads
            .into_iter()
            .map(|(n, g)| likeness_abi::cpu::scale_managed(g, grad_scale, &n).map(|g| (n, g)))
            .collect::<Result<_>>()?;
        Ok(out)
    }
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

fn model_output(out: ModelOutput) -> abi::ModelOutput {
    abi::ModelOutput {
        outputs: named_tensors(out.outputs),
        internal_loss: out.internal_loss.map(ROption::RSome).unwrap_or(ROption::RNone),
    }
}

fn loss_output(out: LossOutput) -> abi::LossOutput {
    abi::LossOutput {
        value: out.value,
        terms: out.terms.into_iter().map(|(n, v)| abi::LossTerm { name: n.into(), value: v }).collect(),
        grads: named_tensors(out.grads),
    }
}

fn path<'a>(s: &'a RStr<'_>) -> &'a Path {
    Path::new(s.as_str())
}

// ---------------------------------------------------------------------------------------------
// Model shims

extern "C" fn model_descriptor<T: ModelPlugin>() -> PluginDescriptor {
    descriptor_guarded(T::descriptor)
}

extern "C" fn model_create<T: ModelPlugin>(
    config: RStr<'_>,
    device: Device,
    seed: u64,
) -> PluginResult<InstanceHandle> {
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
        Ok(model_output(out))
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

extern "C" fn model_save_state<T: ModelPlugin>(
    h: InstanceHandle,
    dir: RStr<'_>,
    with_optimizer: bool,
) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "save_state", || i.inner.save_state(path(&dir), with_optimizer))
}

extern "C" fn model_load_state<T: ModelPlugin>(h: InstanceHandle, dir: RStr<'_>) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "load_state", || i.inner.load_state(path(&dir)))
}

extern "C" fn model_interface<T: ModelPlugin>(config: RStr<'_>) -> PluginResult<ModelInterface> {
    let id = model_descriptor::<T>().id.into_string();
    guarded(&id, "interface", || T::interface(config.as_str()))
}

extern "C" fn model_forward_batch<T: ModelPlugin>(
    h: InstanceHandle,
    images: RSlice<'_, NamedView<'_>>,
    texts: RSlice<'_, NamedTexts<'_>>,
    ctx: StepContext<'_>,
    mode: ForwardMode,
) -> PluginResult<abi::ModelOutput> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "forward_batch", || {
        let out = i.inner.forward_batch(Inputs::new(images), Texts::new(texts), &ctx, mode)?;
        Ok(model_output(out))
    })
}

extern "C" fn model_backward_scaled<T: ModelPlugin>(
    h: InstanceHandle,
    grads: RSlice<'_, ScaledView<'_>>,
    weight: f64,
) -> PluginResult<()> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "backward_scaled", || i.inner.backward_scaled(grads.as_slice(), weight))
}

extern "C" fn model_optimizer_step_groups<T: ModelPlugin>(
    h: InstanceHandle,
    step: OptimizerStep,
    groups: RSlice<'_, GroupHyper<'_>>,
) -> PluginResult<StepReport> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "optimizer_step_groups", || i.inner.optimizer_step_groups(step, groups.as_slice()))
}

extern "C" fn model_sample<T: ModelPlugin>(
    h: InstanceHandle,
    request: SampleRequest<'_>,
) -> PluginResult<ManagedTensor> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "sample", || i.inner.sample(&request))
}

extern "C" fn model_export_adapter<T: ModelPlugin>(
    h: InstanceHandle,
    dir: RStr<'_>,
    format: RStr<'_>,
    metadata_json: RStr<'_>,
) -> PluginResult<RVec<RString>> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "export_adapter", || {
        let meta = match metadata_json.as_str().trim() {
            "" => serde_json::Map::new(),
            text => serde_json::from_str(text)
                .map_err(|e| err::input(format!("adapter metadata is not a JSON object: {e}")))?,
        };
        let files = i.inner.export_adapter(path(&dir), format.as_str(), &meta)?;
        Ok(files.into_iter().map(|p| RString::from(p.to_string_lossy().into_owned())).collect())
    })
}

extern "C" fn model_encode<T: ModelPlugin>(
    h: InstanceHandle,
    name: RStr<'_>,
    images: RSlice<'_, NamedView<'_>>,
    texts: RSlice<'_, NamedTexts<'_>>,
) -> PluginResult<RVec<NamedTensor>> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "encode", || {
        Ok(named_tensors(i.inner.encode(name.as_str(), Inputs::new(images), Texts::new(texts))?))
    })
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
        interface: model_interface::<T>,
        forward_batch: model_forward_batch::<T>,
        backward_scaled: model_backward_scaled::<T>,
        optimizer_step_groups: model_optimizer_step_groups::<T>,
        sample: model_sample::<T>,
        export_adapter: model_export_adapter::<T>,
        encode: model_encode::<T>,
    })
}

// ---------------------------------------------------------------------------------------------
// Metric shims

extern "C" fn metric_descriptor<T: MetricPlugin>() -> PluginDescriptor {
    descriptor_guarded(T::descriptor)
}

extern "C" fn metric_create<T: MetricPlugin>(
    config: RStr<'_>,
    device: Device,
    seed: u64,
) -> PluginResult<InstanceHandle> {
    let id = metric_descriptor::<T>().id.into_string();
    guarded(&id.clone(), "create", || Ok(new_instance(id, T::create(config.as_str(), device, seed)?)))
}

extern "C" fn metric_destroy<T: MetricPlugin>(h: InstanceHandle) {
    destroy_instance::<T>(h)
}

extern "C" fn metric_embed<T: MetricPlugin>(
    h: InstanceHandle,
    pixels: TensorView,
    mode: ForwardMode,
) -> PluginResult<abi::Embeddings> {
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

extern "C" fn metric_interface<T: MetricPlugin>(config: RStr<'_>) -> PluginResult<MetricInterface> {
    let id = metric_descriptor::<T>().id.into_string();
    guarded(&id, "interface", || T::interface(config.as_str()))
}

extern "C" fn metric_embed_texts<T: MetricPlugin>(
    h: InstanceHandle,
    texts: RSlice<'_, RStr<'_>>,
) -> PluginResult<ManagedTensor> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "embed_texts", || {
        let t: Vec<&str> = texts.as_slice().iter().map(|s| s.as_str()).collect();
        i.inner.embed_texts(&t)
    })
}

extern "C" fn metric_backward_scaled<T: MetricPlugin>(
    h: InstanceHandle,
    d: TensorView,
    scale: f64,
) -> PluginResult<ManagedTensor> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "backward_scaled", || i.inner.backward_scaled(&d, scale))
}

/// The root module for a [`MetricPlugin`].
pub fn metric_module<T: MetricPlugin>() -> MetricPluginModRef {
    abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix(MetricPluginMod {
        descriptor: metric_descriptor::<T>,
        create: metric_create::<T>,
        destroy: metric_destroy::<T>,
        embed: metric_embed::<T>,
        backward: metric_backward::<T>,
        interface: metric_interface::<T>,
        embed_texts: metric_embed_texts::<T>,
        backward_scaled: metric_backward_scaled::<T>,
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
        Ok(loss_output(out))
    })
}

extern "C" fn loss_value_and_scaled_grad<T: LossPlugin>(
    h: InstanceHandle,
    inputs: RSlice<'_, NamedView<'_>>,
    want_grad: bool,
    grad_scale: f64,
) -> PluginResult<abi::LossOutput> {
    let i = unsafe { instance::<T>(h) };
    guarded(&i.id, "value_and_scaled_grad", || {
        let out = i.inner.value_and_scaled_grad(Inputs::new(inputs), want_grad, grad_scale)?;
        Ok(loss_output(out))
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
        value_and_scaled_grad: loss_value_and_scaled_grad::<T>,
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
