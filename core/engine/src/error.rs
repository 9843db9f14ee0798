//! The engine's one error type. Messages name the file, the field and the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("dataset {root}: {message}")]
    Dataset { root: PathBuf, message: String },
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{0}")]
    Load(#[from] crate::plugins::LoadError),
    /// The host found a plugin's answer unusable (a missing output, a wrong shape …).
    #[error("plugin `{plugin}`: {message}")]
    Plugin { plugin: String, message: String },
    /// A plugin call returned an error; `code` is the plugin's own [`ErrorCode`].
    #[error("plugin `{plugin}`: {message} [{code:?}]")]
    PluginCall { plugin: String, code: likeness_abi::ErrorCode, message: String },
    /// The plugin lacks a method (built for an older ABI) or a capability this run needs.
    #[error("{message}")]
    Unsupported { plugin: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        EngineError::Io { path: path.into(), message: e.to_string() }
    }
}

impl EngineError {
    /// The plugin's error code, when a plugin call failed.
    pub fn plugin_code(&self) -> Option<likeness_abi::ErrorCode> {
        match self {
            EngineError::PluginCall { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
