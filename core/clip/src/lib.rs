//! CLIP for likeness (issue 7 part 3): everything the `clip` metric plugin (plugins/clip) needs,
//! in libtorch via tch.
//!
//! - [`ClipTokenizer`]: CLIP's BPE, bit-exact with `open_clip.tokenize` (open_clip_torch 3.3.0;
//!   the deterministic parts of `ftfy.fix_text` that change ordinary text: [`fix_text`]) and with
//!   transformers 5's CLIPTokenizer from a folder (EOT padding, [`Padding::Eot`]). The merge loop
//!   is Hugging Face's `tokenizers` crate (its `BPE` model, fancy-regex backend, no C builds);
//!   cleaning, the split and the specials stay ours (src/tokenizer.rs says why: its added-token
//!   pipeline differs from open_clip on 27 of the 1,934 oracle strings). Its cost: ~40 more crates
//!   and +2.6 CPU-minutes on a cold build (measured on this machine: a scratch crate with this
//!   crate's other dependencies 56 s user+sys, with `tokenizers` added 3 min 35 s; in the
//!   workspace `cargo build --release -p likeness-clip` after adding it: 2 min 57 s user+sys,
//!   which includes one rebuild of tch from feature unification). Encoding the 1,934 strings:
//!   0.15 s against 0.53 s for the hand-written merge loop it replaced (its cache).
//! - [`config`]: transformers `config.json`, open_clip model configs, presets `ViT-B-32`,
//!   `ViT-L-14` (+ `-quickgelu`); any size.
//! - [`weights`]: both checkpoint layouts (transformers CLIPModel, OpenAI/open_clip) mapped to one
//!   table; unknown, missing and mis-shaped tensors are named.
//! - [`text::TextTower`], [`vision::VisionTower`], [`ClipModel`]: the towers in the dtype the
//!   weights were read in (f32 for the metric, f64 for checks); weights frozen, the image tower
//!   differentiable in its input pixels. The text tower is core/diffusion-torch's `ClipTextModel`
//!   with its projection (one CLIP text transformer for the metric, SD1.5 and Flux). Scores:
//!   [`cosine`] (image–text, image–image),
//!   [`logits_per_image`].
//! - [`preprocess`]: resize of the short side (bicubic, antialiased), centre crop, CLIP mean/std —
//!   `pil_exact` (Pillow's integer resampling on u8, for evaluation) and `resize_crop_normalize`
//!   (libtorch's `_upsample_bicubic2d_aa`, torchvision v2 `resize(antialias=True)` parity,
//!   differentiable; what the plugin uses). Measured on the set-up's photos: `pil_exact` is
//!   bit-identical to Pillow 13.0.0 in the pass order Pillow takes, but Pillow 13 picks that order
//!   by a rule we do not reproduce ([`preprocess::PassOrder::pillow`] is Pillow 9–12's): on
//!   biden.jpg (970×2204) Pillow runs the vertical pass first and our automatic choice then
//!   differs on 18,958 of 150,528 u8 values (max 0.030 in normalised units, ≈ 2/255). The tensor
//!   path differs from Pillow by up to 0.14 (mean 0.004) in normalised units (no u8 rounding
//!   between passes, no clamping of the bicubic overshoot).
//!
//! Not implemented: `.bin` / `.pt` checkpoints (safetensors only), timm or HF-text towers,
//! attentional pooling, positional-embedding interpolation (the image tower takes exactly the
//! configured `image_size`).

pub mod config;
mod ftfy;
pub mod model;
pub mod preprocess;
pub mod text;
mod tokenizer;
pub mod vision;
pub mod weights;

pub use config::{ClipConfig, TextConfig, VisionConfig};
pub use ftfy::fix_text;
pub use model::{cosine, l2_normalize, logits_per_image, ClipModel};
pub use tokenizer::{ClipTokenizer, Encoded, Padding, Preprocess, EOT_ID, SOT_ID};

use std::path::PathBuf;

/// Every error of this crate names the file, the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("cannot read {path}: {source}. Fix: pass open_clip's bpe_simple_vocab_16e6.txt.gz or a transformers tokenizer folder (tokenizer.json or vocab.json + merges.txt)")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}. Fix: use an unmodified CLIP vocab (open_clip's bpe_simple_vocab_16e6.txt.gz or the model's tokenizer/ folder)")]
    BadVocab { path: PathBuf, what: String },
    #[error("{path}: {what}. Fix: pass a transformers CLIPModel model.safetensors or an OpenAI/open_clip state dict in safetensors, with `layers` matching the checkpoint")]
    BadWeights { path: PathBuf, what: String },
    #[error("context_length {0} is too small: it must hold at least <start_of_text> and <end_of_text> (>= 2)")]
    BadContextLength(usize),
    #[error("{path}: field `{field}` {what}. Fix: pass a transformers CLIPModel config.json or an open_clip model config (model_configs/*.json), or name a preset ({presets})", presets = crate::config::PRESETS.join(", "))]
    BadConfig { path: PathBuf, field: String, what: String },
    #[error("unknown CLIP preset {0:?}. Fix: use one of {presets}, or pass a config file", presets = crate::config::PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("likeness-clip: {0}")]
    Input(String),
    #[error("likeness-clip: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, ClipError>;
