//! CLIP for likeness.
//!
//! Implemented: the CLIP BPE tokenizer ([`ClipTokenizer`]): from open_clip's vocab, bit-exact
//! with `open_clip.tokenize` (open_clip_torch 3.3.0), including the deterministic parts of
//! `ftfy.fix_text` that change ordinary text ([`fix_text`]); and from a transformers tokenizer
//! folder, bit-exact with transformers 5's CLIPTokenizer (EOT padding via [`Padding::Eot`]).
//!
//! Also implemented: the text tower ([`text::TextTower`], f64, quick_gelu or gelu) from both
//! checkpoint layouts (transformers CLIPModel and OpenAI/open_clip safetensors), with
//! last_hidden_state, the penultimate hidden state and the projected EOT-pooled embedding.
//!
//! Not implemented yet (Issue 7 part 3 remainder): the image tower, image preprocessing,
//! config.json / arch presets (the caller passes [`text::TextConfig`]), .bin/.pt input, and the
//! `clip` metric plugin. The tokenizer is hand-written (regex + BPE, ~300 lines) rather than Hugging Face's
//! `tokenizers` crate: same ids on every oracle case, far fewer dependencies to compile.

mod ftfy;
pub mod text;
mod tokenizer;

pub use ftfy::fix_text;
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
    #[error("likeness-clip: {0} is not implemented yet (Issue 7 part 3)")]
    NotImplemented(&'static str),
}

pub type Result<T> = std::result::Result<T, ClipError>;
