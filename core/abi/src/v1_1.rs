//! Types appended in ABI 1.1: texts, the step context, declared interfaces, scaled
//! gradients, parameter groups and sampling requests.
//!
//! They are reached only through root-module fields appended in 1.1, so a 1.0 plugin never
//! sees them and its layout check is unaffected.

use abi_stable::{
    std_types::{RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::{NamedView, TensorView};

/// A batch of UTF-8 strings under a name (`caption`, `prompt` …), one per sample. Borrowed
/// for the call, like a [`TensorView`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct NamedTexts<'a> {
    pub name: RStr<'a>,
    pub texts: RSlice<'a, RStr<'a>>,
}

/// Where a call sits in the run. Everything random a plugin draws in a training step (noise,
/// timesteps, dropout) must derive from these numbers, so that a resumed run is
/// bit-identical to an uninterrupted one.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// The optimizer step this call contributes to (1-based); 0 outside training.
    pub optimizer_step: u64,
    /// Index of the micro-batch within the optimizer step (gradient accumulation).
    pub micro_batch: u64,
    /// The epoch the micro-batch belongs to (0-based).
    pub epoch: u64,
    /// One seed per sample of the batch, derived from `run.seed`, the optimizer step, the
    /// micro-batch and the sample's position.
    pub sample_seeds: RSlice<'a, u64>,
}

impl StepContext<'_> {
    /// The context of a call outside training (validation, a preview): step 0, no seeds.
    pub const NONE: StepContext<'static> =
        StepContext { optimizer_step: 0, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&[]) };
}

/// One declared input or output.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct IoDecl {
    /// `reference`, `target`, `control`, `caption`, `pixels`, `timesteps` …
    pub name: RString,
    /// An input the model cannot run without (outputs: always produced).
    pub required: bool,
    /// One line for `host plugins inspect` and error messages.
    pub doc: RString,
}

/// Whether an encoding is computed from an image or a text input.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Image,
    Text,
}

/// A cacheable encoding (VAE latents, text-encoder outputs): the host computes it once per
/// distinct source with `encode`, stores it on disk and passes it in place of the source.
///
/// **Several sources.** `source` may name several inputs joined by `+` (`caption+control_*`:
/// Qwen2.5-VL reads a caption with its control images), each an image role, an image role
/// pattern or a text; its kind is the kind the model declares it with (`source_kind` is the
/// first's). One entry per sample covers every source the sample has; `encode` gets them all
/// (a pattern as each of its roles). Encodings may share a source (the VL encoding and the
/// control images' VAE latents both read `control_*`); while encodings are cached, no source
/// of one is passed raw.
///
/// **Variable length.** An output `x` that comes with an output `x_mask` (`[n, L]`, 1 = real,
/// 0 = padding, real positions first) is variable-length along dimension 1: the host stores
/// each sample's real positions only, and passes a batch zero-padded at the end of dimension 1
/// to its longest entry, with `x_mask` (f32) beside it. A model reads a missing `x_mask` as
/// all real.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct EncodingDecl {
    /// The encoding's name, passed to `encode` (`latents`, `text_embeddings` …).
    pub name: RString,
    /// The input(s) it replaces (`target`, `caption`, `caption+control_*` …).
    pub source: RString,
    pub source_kind: InputKind,
    /// Keys of the model config whose values change the encoding (`pretrained`, `vae_dtype`
    /// …): part of the cache key.
    pub config_keys: RVec<RString>,
}

/// What a model reads and produces, declared for a config before the model is created.
///
/// **Role patterns.** An image input whose name ends in `_*` (`control_*`) is a pattern: it
/// takes the dataset role equal to its stem (`control`, musubi-tuner's `control_0`) and every
/// `<stem>_<n>`, `n` a positive decimal integer without leading zeros (`control_1`,
/// `control_2`, …), each passed under its own role name, in that order. A required pattern
/// needs at least one matching role in every batch; the others are passed when the batch has
/// them. It is a naming rule of [`IoDecl::name`], not a new field: a host that predates it
/// sees an input no dataset provides. An encoding's source may be a pattern (see [`EncodingDecl`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ModelInterface {
    /// Named image inputs of `forward_batch` (f32 NCHW RGB in [0, 1]); a name may be a role
    /// pattern (see above).
    pub images: RVec<IoDecl>,
    /// Named text inputs of `forward_batch`.
    pub texts: RVec<IoDecl>,
    /// Named outputs of `forward_batch` (`pixels`: f32 NCHW RGB in [0, 1]; `timesteps`: `[B]`
    /// f32 noise level t in [0, 1], 0 = clean).
    pub outputs: RVec<IoDecl>,
    /// Whether `forward_batch(Train)` returns an internal loss (a diffusion loss).
    pub internal_loss: bool,
    pub encodings: RVec<EncodingDecl>,
    /// Names of the optimizer parameter groups (`unet`, `text_encoder` …); empty = one group.
    pub param_groups: RVec<RString>,
    /// Formats `export_adapter` writes (`kohya`, `diffusers`, `peft`, `comfyui` …).
    pub adapter_formats: RVec<RString>,
    /// Whether `sample` is implemented.
    pub can_sample: bool,
}

/// A gradient with the factor it is to be multiplied by.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct ScaledView<'a> {
    pub name: RStr<'a>,
    pub view: TensorView,
    pub scale: f64,
}

/// Learning rate and weight decay of one parameter group.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct GroupHyper<'a> {
    pub name: RStr<'a>,
    pub lr: f64,
    pub weight_decay: f64,
}

/// What `model.sample` is asked to generate.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct SampleRequest<'a> {
    /// One prompt per image to generate.
    pub prompts: RSlice<'a, RStr<'a>>,
    /// Empty, or one negative prompt per prompt.
    pub negative_prompts: RSlice<'a, RStr<'a>>,
    /// Optional control / reference images (`control`, `reference` …), batch = prompts.
    pub images: RSlice<'a, NamedView<'a>>,
    pub width: u32,
    pub height: u32,
    /// Denoising steps (0 = the model's default).
    pub steps: u32,
    /// Classifier-free guidance scale (≤ 0 = the model's default).
    pub guidance: f64,
    /// Seed of image i is `seed + i`.
    pub seed: u64,
    /// Multiplier of the trained adapter (1 = as trained, 0 = the base model).
    pub adapter_scale: f64,
}

/// What an identity metric measures and how its scores read.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct MetricInterface {
    /// Cosine similarity at or above which two embeddings are taken to be the same person;
    /// < -1 when the metric declares none.
    pub same_person_threshold: f64,
    /// Whether `embed_texts` is implemented (CLIP).
    pub embeds_texts: bool,
    /// What one embedding stands for (`face`, `person`, `image`).
    pub subject: RString,
}

/// SplitMix64's output function: a bijective 64-bit mixer.
pub const fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of sample `index` of micro-batch `micro_batch` of optimizer step `step` in a run
/// seeded with `run_seed` — what [`StepContext::sample_seeds`] holds. Part of the ABI contract
/// so that plugins and tools can recompute it.
pub const fn sample_seed(run_seed: u64, step: u64, micro_batch: u64, index: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(splitmix64(run_seed) ^ step) ^ micro_batch) ^ index)
}
