//! The PTX cache: one file per (source text, options, NVRTC version, compute capability), so a
//! kernel is compiled once per machine and a changed source or toolkit never reuses stale PTX.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{nvrtc, Error, Result, Source};

/// PTX files under one folder (default `$LIKENESS_HOME/ptx-cache`).
#[derive(Debug, Clone)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// `$LIKENESS_HOME/ptx-cache` (scripts/common.sh's LIKENESS_HOME rule).
    pub fn default_dir() -> Option<PathBuf> {
        likeness_sdk::venv::likeness_home().map(|h| h.join("ptx-cache"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file of `source` for `sm`: `<stem>-sm<sm>-<sha256 of text, options, version>.ptx`.
    pub fn path(&self, source: Source, sm: u32) -> Result<PathBuf> {
        let (major, minor) = nvrtc::version()?;
        let mut h = Sha256::new();
        h.update(source.text().as_bytes());
        // The include folder is not part of the key (it differs between machines with the same
        // toolkit); the NVRTC version is, and it fixes the headers' version.
        h.update(nvrtc::options(sm, Path::new("")).join(" ").as_bytes());
        h.update(format!("nvrtc {major}.{minor}").as_bytes());
        let hex: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        let stem = source.file_name().trim_end_matches(".cu");
        Ok(self.dir.join(format!("{stem}-sm{sm}-{hex}.ptx")))
    }

    /// The PTX of `source` for `sm`: read from the cache, or compiled and written atomically
    /// (temporary file + rename, so a concurrent or killed process never leaves half a file).
    pub fn get(&self, source: Source, sm: u32) -> Result<String> {
        let path = self.path(source, sm)?;
        if let Ok(ptx) = std::fs::read_to_string(&path) {
            return Ok(ptx);
        }
        let ptx = nvrtc::compile(source, sm)?.ptx;
        let io = |e: std::io::Error| Error::Cache { path: path.clone(), detail: e.to_string() };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = path.with_extension(format!("ptx.tmp{}", std::process::id()));
        std::fs::write(&tmp, &ptx).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(ptx)
    }
}
