//! The crate's one error type: every message names the file, the field and the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: field `{field}`: {msg}")]
    Config { path: PathBuf, field: String, msg: String },
    #[error("{path}: cannot read safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error(
        "{source_desc}: the weights do not match the {model} built from its config \
         ({} missing, {} unexpected, {} with a wrong shape); fix the checkpoint or the config.json\n{}",
        missing.len(), unexpected.len(), wrong_shape.len(), mismatch_list(missing, unexpected, wrong_shape)
    )]
    Mismatch {
        source_desc: String,
        model: &'static str,
        missing: Vec<String>,
        unexpected: Vec<String>,
        wrong_shape: Vec<(String, Vec<i64>, Vec<i64>)>,
    },
    #[error("LoRA: {0}")]
    Lora(String),
    #[error("not implemented: {0}")]
    NotImplemented(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn mismatch_list(missing: &[String], unexpected: &[String], wrong: &[(String, Vec<i64>, Vec<i64>)]) -> String {
    let mut s = String::new();
    for m in missing {
        s += &format!("  missing: {m}\n");
    }
    for u in unexpected {
        s += &format!("  unexpected: {u}\n");
    }
    for (n, want, got) in wrong {
        s += &format!("  wrong shape: {n}: model has {want:?}, file has {got:?}\n");
    }
    s
}

pub type Result<T> = std::result::Result<T, Error>;
