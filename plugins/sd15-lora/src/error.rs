//! The crate's one error type; converted to a `PluginError` (with the right code) at the ABI.

use likeness_sdk::{err, PluginError};

#[derive(Debug, thiserror::Error)]
pub enum Sd15Error {
    /// A bad config value: the key, what is wrong and how to fix it.
    #[error("config of plugin `sd15-lora`: `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// A file of the model (or of an adapter) that cannot be used: the file and why.
    #[error("model `sd15-lora`: {path}: {msg}")]
    File { path: String, msg: String },
    /// Bad input tensors or texts.
    #[error("model `sd15-lora`: {0}")]
    Input(String),
    /// Loading / building the networks (names the file and the tensors).
    #[error("model `sd15-lora`: {0}")]
    Diffusion(#[from] likeness_diffusion_torch::Error),
    #[error("model `sd15-lora`: {0}")]
    Toolkit(#[from] likeness_diffusion::DiffusionError),
    #[error("model `sd15-lora`: tokenizer: {0}")]
    Tokenizer(#[from] likeness_clip::ClipError),
    #[error("model `sd15-lora`: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// What this plugin does not do (yet); never silently skipped.
    #[error("model `sd15-lora`: not implemented: {0}")]
    NotImplemented(String),
}

pub type Result<T> = std::result::Result<T, Sd15Error>;

pub fn config(field: &'static str, msg: impl Into<String>) -> Sd15Error {
    Sd15Error::Config { field, msg: msg.into() }
}

pub fn input(msg: impl Into<String>) -> Sd15Error {
    Sd15Error::Input(msg.into())
}

pub fn file(path: impl std::fmt::Display, msg: impl Into<String>) -> Sd15Error {
    Sd15Error::File { path: path.to_string(), msg: msg.into() }
}

impl From<Sd15Error> for PluginError {
    fn from(e: Sd15Error) -> Self {
        match &e {
            Sd15Error::Config { .. } => err::config(e.to_string()),
            Sd15Error::File { .. } => err::io(e.to_string()),
            Sd15Error::Input(_) => err::input(e.to_string()),
            Sd15Error::Diffusion(likeness_diffusion_torch::Error::Mismatch { .. })
            | Sd15Error::Diffusion(likeness_diffusion_torch::Error::Config { .. })
            | Sd15Error::Diffusion(likeness_diffusion_torch::Error::Lora(_)) => err::input(e.to_string()),
            Sd15Error::Diffusion(likeness_diffusion_torch::Error::Io { .. })
            | Sd15Error::Diffusion(likeness_diffusion_torch::Error::Safetensors { .. }) => err::io(e.to_string()),
            Sd15Error::Toolkit(_) | Sd15Error::Tokenizer(_) => err::config(e.to_string()),
            Sd15Error::NotImplemented(_) => err::unsupported(e.to_string()),
            _ => err::internal(e.to_string()),
        }
    }
}
