//! The stable ABI between the `host` and its plugins.
//!
//! Everything that crosses a plugin boundary is declared here and nowhere else: `#[repr(C)]`
//! `StableAbi` structs, abi_stable's `RString`/`RVec`/`RResult`, DLPack-shaped tensor views and
//! three prefix-type root modules (one per plugin kind). No `tch::Tensor`, no Rust trait object
//! and no panic ever crosses it.
//!
//! # Ownership rules (the short version)
//! * A [`TensorView`] is **borrowed**: the caller owns the memory and keeps it alive and
//!   unchanged for the duration of the call only. A plugin that needs the data later (a saved
//!   autograd graph, say) copies it before returning.
//! * A [`ManagedTensor`] is **owned** by whoever holds it; dropping it calls the producer's
//!   deleter, which lives in the producer's library. Libraries are never unloaded, so deleters
//!   stay valid for the life of the process.
//! * Instances ([`InstanceHandle`]) are created by a module's `create` and freed by exactly one
//!   call to the same module's `destroy`.
//!
//! # Versioning
//! [`ABI_MAJOR`] must be equal between host and plugin; a plugin's [`ABI_MINOR`] must be ≤ the
//! host's. Before abi_stable's own layout check, the host reads the plain C symbol
//! [`PLUGIN_HEADER_SYMBOL`] so that a plugin from another ABI generation gets a readable message
//! rather than a layout dump.

use std::ffi::c_void;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

pub mod cpu;
mod tensor;
pub mod v1_0;
mod v1_1;
pub use cpu::CpuTensor;
pub use tensor::*;
pub use v1_1::*;

/// Incremented when a change breaks existing plugins.
pub const ABI_MAJOR: u32 = 1;
/// Incremented when fields are appended to a root module (old plugins keep working).
pub const ABI_MINOR: u32 = 1;

/// Name of the `extern "C" fn() -> PluginHeader` every plugin exports next to abi_stable's
/// root module. Read with a plain `dlsym` before anything else, so that it works across ABI
/// generations whose layouts differ, and so that a manifest that lies about the kind is
/// caught with a readable message.
pub const PLUGIN_HEADER_SYMBOL: &str = "likeness_plugin_header";

/// Signature of [`PLUGIN_HEADER_SYMBOL`]. Its layout is frozen forever: two `u32`s and a `u8`.
pub type PluginHeaderFn = extern "C" fn() -> PluginHeader;

/// The first thing the host reads from a library.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginHeader {
    pub abi: AbiVersion,
    pub kind: PluginKind,
}

/// ABI generation a library was built for.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbiVersion {
    pub major: u32,
    pub minor: u32,
}

impl AbiVersion {
    pub const CURRENT: AbiVersion = AbiVersion { major: ABI_MAJOR, minor: ABI_MINOR };
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The three kinds of plugin.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Generates pixels and owns trainable parameters (+ their optimizer).
    Model,
    /// Turns pixels into identity embeddings (ArcFace, re-ID, CLIP …).
    Metric,
    /// Turns named tensors into a scalar and its gradients.
    Loss,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Model => "model",
            PluginKind::Metric => "metric",
            PluginKind::Loss => "loss",
        }
    }
}

/// Why a plugin call failed.
#[repr(u32)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The config JSON was rejected (unknown key, wrong type, bad value).
    InvalidConfig = 1,
    /// A tensor had the wrong name, shape, dtype or device.
    InvalidInput = 2,
    /// The call is not supported by this plugin (e.g. backward on a non-differentiable one).
    Unsupported = 3,
    /// Reading or writing a file failed.
    Io = 4,
    /// A method panicked; the SDK's guard caught it.
    Panic = 5,
    /// Anything else inside the plugin (a backend error, say).
    Internal = 6,
    /// `backward` was called without a matching `forward` (or twice).
    NoPendingForward = 7,
}

/// An error returned by a plugin. The message is meant for users: it names what was wrong
/// and, where it can, how to fix it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginError {
    pub code: ErrorCode,
    pub message: RString,
}

impl PluginError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        PluginError { code, message: RString::from(message.into()) }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

pub type PluginResult<T> = RResult<T, PluginError>;

/// What a plugin can do.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Capabilities {
    /// Every differentiable method has a working backward (VJP). A loss or metric without it
    /// can still be used for evaluation, never as a training loss.
    pub differentiable: bool,
    /// Devices the plugin can run on.
    pub devices: RVec<DeviceType>,
    /// Dtypes it accepts for pixel / embedding inputs.
    pub dtypes: RVec<DataType>,
}

/// Versions of the heavy runtimes a plugin was built against (`None` = not used).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct BuildStamps {
    pub rustc: RString,
    pub libtorch: ROption<RString>,
    pub onnxruntime: ROption<RString>,
    pub cuda: ROption<RString>,
}

/// Everything the host needs to know about a plugin before creating an instance.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginDescriptor {
    /// Stable identifier users type (`identity-autoencoder`, `arcface`, `pixel` …).
    pub id: RString,
    pub kind: PluginKind,
    /// The plugin's own semver version.
    pub version: RString,
    /// ABI generation it was built for (the same value as [`PLUGIN_HEADER_SYMBOL`] returns).
    pub abi: AbiVersion,
    /// One line for `host plugins list`.
    pub summary: RString,
    pub capabilities: Capabilities,
    /// JSON Schema (draft 2020-12) of the config object `create` accepts.
    pub config_schema: RString,
    pub build: BuildStamps,
}

/// An opaque instance created by a module's `create`. Freed by the same module's `destroy`.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct InstanceHandle(pub *mut c_void);

// SAFETY: instances are only touched by one host thread at a time (the host wraps them in
// `&mut`), and plugins declare `Send` bounds on what they put behind the pointer.
unsafe impl Send for InstanceHandle {}

/// Whether a forward pass records what backward needs.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Keep the graph for one `backward`.
    Train,
    /// No graph: validation, sampling, evaluation.
    Eval,
}

/// What `model.forward` returns.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct ModelOutput {
    /// Named outputs, at least `"pixels"`: f32 NCHW RGB in [0, 1].
    pub outputs: RVec<NamedTensor>,
    /// The model's own training loss when it has one (a diffusion/flow-matching loss);
    /// `None` for models that only produce pixels.
    pub internal_loss: ROption<f64>,
}

/// Hyper-parameters of one optimizer step. The schedule, accumulation and step counting are
/// the host's; the update itself runs where the parameters live.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct OptimizerStep {
    /// 1-based step number after this update (AdamW bias correction uses it).
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this value first; ≤ 0 disables clipping.
    pub max_grad_norm: f64,
}

/// What an optimizer step reports.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
}

/// What a model plugin's trainable state looks like.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct ParameterInfo {
    pub trainable: u64,
    pub total: u64,
}

/// Root module of a **model** plugin.
///
/// Fields after `load_state` (the 1.0 prefix, whose `last_prefix_field` never moves) were
/// appended in ABI 1.1; on a 1.0 plugin their accessors return `None` and the host falls back
/// to the 1.0 calls or names the missing method.
///
/// The training chain is `forward(Train)` → (host: losses/metrics on the outputs) →
/// `backward(d_outputs, internal_loss_weight)` (accumulates parameter gradients) → … →
/// `optimizer_step` → `zero_grad`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = ModelPluginModRef)))]
#[sabi(missing_field(option))]
pub struct ModelPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    /// `config_json` is a JSON object validated against the descriptor's schema; `device`
    /// says where parameters live; `seed` initialises every random number the plugin draws.
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    pub parameters: extern "C" fn(InstanceHandle) -> PluginResult<ParameterInfo>,
    /// Inputs are borrowed for the call only (see the crate docs).
    pub forward: extern "C" fn(
        InstanceHandle,
        inputs: RSlice<'_, NamedView<'_>>,
        mode: ForwardMode,
    ) -> PluginResult<ModelOutput>,
    /// Vector–Jacobian product of the last `forward(Train)`: `grads` holds dL/d(output) per
    /// named output (missing names count as zero); `internal_loss_weight` multiplies the
    /// model's own loss. Parameter gradients are *accumulated*. Consumes the saved graph.
    pub backward:
        extern "C" fn(InstanceHandle, grads: RSlice<'_, NamedView<'_>>, internal_loss_weight: f64) -> PluginResult<()>,
    pub optimizer_step: extern "C" fn(InstanceHandle, step: OptimizerStep) -> PluginResult<StepReport>,
    pub zero_grad: extern "C" fn(InstanceHandle) -> PluginResult<()>,
    /// Write weights and optimizer state into the existing directory `dir` (the host makes it
    /// a temporary directory and renames it into place, so writes here need not be atomic).
    /// `with_optimizer = false` writes only what inference needs.
    pub save_state: extern "C" fn(InstanceHandle, dir: RStr<'_>, with_optimizer: bool) -> PluginResult<()>,
    /// Restore what `save_state` wrote (optimizer state too, when present).
    #[sabi(last_prefix_field)]
    pub load_state: extern "C" fn(InstanceHandle, dir: RStr<'_>) -> PluginResult<()>,

    // ---- ABI 1.1 (absent on 1.0 plugins: the accessors return `None`) --------------------
    /// What the model reads and produces for this config (called before `create`, so the host
    /// can check the dataset and the losses before any weight is loaded).
    pub interface: extern "C" fn(config_json: RStr<'_>) -> PluginResult<ModelInterface>,
    /// `forward` with named texts and the step context (`forward` is its 1.0 form).
    pub forward_batch: extern "C" fn(
        InstanceHandle,
        images: RSlice<'_, NamedView<'_>>,
        texts: RSlice<'_, NamedTexts<'_>>,
        ctx: StepContext<'_>,
        mode: ForwardMode,
    ) -> PluginResult<ModelOutput>,
    /// `backward` with a scale per gradient, applied where the gradients live (on the device):
    /// the gradient of output `name` is Σ scale·grad over the entries with that name.
    pub backward_scaled:
        extern "C" fn(InstanceHandle, grads: RSlice<'_, ScaledView<'_>>, internal_loss_weight: f64) -> PluginResult<()>,
    /// An optimizer step with per-group learning rate and weight decay (groups named in
    /// [`ModelInterface::param_groups`]; a group not listed uses `step`'s values).
    pub optimizer_step_groups: extern "C" fn(
        InstanceHandle,
        step: OptimizerStep,
        groups: RSlice<'_, GroupHyper<'_>>,
    ) -> PluginResult<StepReport>,
    /// Generates images: validation samples and `host generate`. Returns f32 NCHW RGB in [0, 1].
    pub sample: extern "C" fn(InstanceHandle, request: SampleRequest<'_>) -> PluginResult<ManagedTensor>,
    /// Writes the trained adapter into the existing directory `dir` in `format` (`kohya`,
    /// `diffusers`, `peft`, `comfyui`, or a plugin's own); `metadata_json` is a JSON object of
    /// string values to store (kohya's `ss_*`, `modelspec.*`). Returns the files written.
    pub export_adapter: extern "C" fn(
        InstanceHandle,
        dir: RStr<'_>,
        format: RStr<'_>,
        metadata_json: RStr<'_>,
    ) -> PluginResult<RVec<RString>>,
    /// Computes the cacheable encoding `name` (declared in [`ModelInterface::encodings`]) of a
    /// batch of its source inputs. No graph is kept. The outputs are passed back to
    /// `forward_batch` by name in place of the source.
    pub encode: extern "C" fn(
        InstanceHandle,
        name: RStr<'_>,
        images: RSlice<'_, NamedView<'_>>,
        texts: RSlice<'_, NamedTexts<'_>>,
    ) -> PluginResult<RVec<NamedTensor>>,
}

/// What `metric.embed` returns.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct Embeddings {
    /// `[B, D]` f32, L2-normalised.
    pub embeddings: ManagedTensor,
    /// `[B]` u8: 1 where a face (or person) was found; rows with 0 are zeros and must be
    /// ignored.
    pub valid: ManagedTensor,
}

/// Root module of an **identity metric** plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = MetricPluginModRef)))]
#[sabi(missing_field(option))]
pub struct MetricPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    /// `pixels`: f32 NCHW RGB in [0, 1]. With `ForwardMode::Train` the plugin keeps what its
    /// `backward` needs (copying borrowed inputs).
    pub embed: extern "C" fn(InstanceHandle, pixels: TensorView, mode: ForwardMode) -> PluginResult<Embeddings>,
    /// VJP of the last `embed(Train)`: dL/d(embeddings) `[B, D]` → dL/d(pixels).
    #[sabi(last_prefix_field)]
    pub backward: extern "C" fn(InstanceHandle, d_embeddings: TensorView) -> PluginResult<ManagedTensor>,

    // ---- ABI 1.1 (absent on 1.0 plugins: the accessors return `None`) --------------------
    /// What the metric measures and how to read its scores.
    pub interface: extern "C" fn(config_json: RStr<'_>) -> PluginResult<MetricInterface>,
    /// Embeds a batch of texts into the image embedding space (CLIP's text tower):
    /// `[B, D]` f32, L2-normalised. No graph.
    pub embed_texts: extern "C" fn(InstanceHandle, texts: RSlice<'_, RStr<'_>>) -> PluginResult<ManagedTensor>,
    /// `backward` with `d_embeddings` multiplied by `scale` on the device.
    pub backward_scaled:
        extern "C" fn(InstanceHandle, d_embeddings: TensorView, scale: f64) -> PluginResult<ManagedTensor>,
}

/// What `loss.value_and_grad` returns.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct LossOutput {
    /// The scalar loss (already reduced over the batch).
    pub value: f64,
    /// Named components for logging (`l1`, `ssim` …); may be empty.
    pub terms: RVec<LossTerm>,
    /// dL/d(input) per differentiable input name; empty when `want_grad` was false.
    pub grads: RVec<NamedTensor>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct LossTerm {
    pub name: RString,
    pub value: f64,
}

/// Root module of a **loss** plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = LossPluginModRef)))]
#[sabi(missing_field(option))]
pub struct LossPluginMod {
    pub descriptor: extern "C" fn() -> PluginDescriptor,
    pub create: extern "C" fn(config_json: RStr<'_>, device: Device, seed: u64) -> PluginResult<InstanceHandle>,
    pub destroy: extern "C" fn(InstanceHandle),
    /// Names of the inputs the loss reads, in the order it documents them (e.g.
    /// `["prediction", "target"]`); the first is the one gradients are returned for.
    pub input_names: extern "C" fn(InstanceHandle) -> RVec<RString>,
    #[sabi(last_prefix_field)]
    pub value_and_grad:
        extern "C" fn(InstanceHandle, inputs: RSlice<'_, NamedView<'_>>, want_grad: bool) -> PluginResult<LossOutput>,

    // ---- ABI 1.1 (absent on 1.0 plugins: the accessors return `None`) --------------------
    /// `value_and_grad` with the returned gradients multiplied by `grad_scale` on the device
    /// (the value is not scaled).
    pub value_and_scaled_grad: extern "C" fn(
        InstanceHandle,
        inputs: RSlice<'_, NamedView<'_>>,
        want_grad: bool,
        grad_scale: f64,
    ) -> PluginResult<LossOutput>,
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
