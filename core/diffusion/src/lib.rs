//! The pure-Rust half of the diffusion toolkit (issue 8 part 1): DDPM/DDIM/Euler/flow-matching
//! schedules as diffusers 0.42.1 computes them, musubi-tuner/sd-scripts timestep sampling and
//! loss weightings. No libtorch: the host links this crate.
//!
//! LoRA files: [`lora_keys`] reads/writes kohya, diffusers, PEFT and ComfyUI layouts through one
//! canonical form; [`lora_meta`] writes the `ss_*` / `modelspec.*` metadata.

pub mod lora_keys;
pub mod lora_meta;
pub mod schedules;
pub mod timesteps;
pub mod weighting;

/// Every failure of this crate: the message names the parameter and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("invalid `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    /// A LoRA file or folder as a whole is wrong (format, layout, config field).
    #[error("{}: {why}", file.display())]
    LoraFile { file: std::path::PathBuf, why: String },
    /// One tensor key of a LoRA file cannot be mapped or is inconsistent.
    #[error("{}: key `{key}`: {why}", file.display())]
    LoraKey { file: std::path::PathBuf, key: String, why: String },
    /// A LoRA for a base model whose key map is not written yet.
    #[error("{}: {arch} LoRA files are not supported yet (not implemented: only SD1.5 and Flux key maps exist); {what}", file.display())]
    ArchNotImplemented { file: std::path::PathBuf, arch: lora_keys::BaseArch, what: String },
}

pub type Result<T> = std::result::Result<T, DiffusionError>;

pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> DiffusionError {
    DiffusionError::Invalid { field, why: why.into() }
}
