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
    #[error("plugin `{plugin}`: {message}")]
    Plugin { plugin: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        EngineError::Io { path: path.into(), message: e.to_string() }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
