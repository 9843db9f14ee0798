//! The trainer's error type, shared with the backbones; it becomes a `PluginError` (with the
//! right code and the plugin id in front) at the ABI ([`ModelError::plugin`]).

use likeness_sdk::{err, PluginError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A bad config value: the key, what is wrong and how to fix it.
    #[error("`{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// A file of the model (or of an adapter) that cannot be used: the file and why.
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    /// Bad input tensors or texts.
    #[error("{0}")]
    Input(String),
    /// Loading / building the networks (names the file and the tensors).
    #[error("{0}")]
    Diffusion(#[from] crate::Error),
    #[error("{0}")]
    Toolkit(#[from] likeness_diffusion::DiffusionError),
    /// A backbone's tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// What the model does not do (yet); never silently skipped.
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// An error that already is a plugin error (from the SDK's tensor adapters).
    #[error("{}", .0.message)]
    Plugin(PluginError),
}

impl From<PluginError> for ModelError {
    fn from(e: PluginError) -> Self {
        ModelError::Plugin(e)
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub fn config(field: &'static str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field, msg: msg.into() }
}

pub fn input(msg: impl Into<String>) -> ModelError {
    ModelError::Input(msg.into())
}

pub fn file(path: impl std::fmt::Display, msg: impl Into<String>) -> ModelError {
    ModelError::File { path: path.to_string(), msg: msg.into() }
}

impl ModelError {
    /// The ABI error of model `id`: `config of plugin `id`: …` for a config key, `model `id`: …`
    /// otherwise; the code says what kind of problem it is.
    pub fn plugin(self, id: &str) -> PluginError {
        use crate::Error as E;
        let text = match &self {
            ModelError::Plugin(e) => return e.clone(),
            ModelError::Config { .. } => format!("config of plugin `{id}`: {self}"),
            _ => format!("model `{id}`: {self}"),
        };
        match &self {
            ModelError::Config { .. } | ModelError::Toolkit(_) | ModelError::Tokenizer(_) => err::config(text),
            ModelError::File { .. } | ModelError::Diffusion(E::Io { .. } | E::Safetensors { .. }) => err::io(text),
            ModelError::Input(_) | ModelError::Diffusion(E::Mismatch { .. } | E::Config { .. } | E::Lora(_)) => {
                err::input(text)
            }
            ModelError::NotImplemented(_) => err::unsupported(text),
            _ => err::internal(text),
        }
    }
}
