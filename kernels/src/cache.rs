//! The PTX cache: one file per (source text, options, compute capability, NVRTC version), so a
//! kernel is compiled once per machine and a changed source or toolkit never reuses stale PTX.
//!
//! File name: `<stem>-sm<sm>-<sha256 of text and options>-nvrtc<major>.<minor>.ptx`. Without
//! libnvrtc a cached file of the same source and capability from any NVRTC version is used
//! (PTX is forward-compatible; the driver JIT-compiles it), so a GPU machine without the torch
//! venv runs PTX staged elsewhere (scripts/device_checks.sh).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{nvrtc, Error, Result, Source};

/// PTX files under one folder (default `$LIKENESS_PTX_CACHE`, else `$LIKENESS_HOME/ptx-cache`).
#[derive(Debug, Clone)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// `$LIKENESS_PTX_CACHE`, else `$LIKENESS_HOME/ptx-cache` (scripts/common.sh's LIKENESS_HOME rule).
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("LIKENESS_PTX_CACHE").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(d));
        }
        likeness_sdk::venv::likeness_home().map(|h| h.join("ptx-cache"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<stem>-sm<sm>-<hash>-nvrtc`: every version's file of this source and capability.
    fn prefix(source: Source, sm: u32) -> String {
        let mut h = Sha256::new();
        h.update(source.text().as_bytes());
        // The include folder is not part of the key (it differs between machines with the same
        // toolkit); the NVRTC version is (in the name), and it fixes the headers' version.
        h.update(nvrtc::options(sm, Path::new("")).join(" ").as_bytes());
        let hex: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        let stem = source.file_name().trim_end_matches(".cu");
        format!("{stem}-sm{sm}-{hex}-nvrtc")
    }

    /// The cache file of `source` for `sm` with the loaded NVRTC.
    pub fn path(&self, source: Source, sm: u32) -> Result<PathBuf> {
        let (major, minor) = nvrtc::version()?;
        Ok(self.dir.join(format!("{}{major}.{minor}.ptx", Self::prefix(source, sm))))
    }

    /// A cached file of `source` for `sm` from any NVRTC version (the newest name first).
    fn any_version(&self, source: Source, sm: u32) -> Option<PathBuf> {
        let prefix = Self::prefix(source, sm);
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().ends_with(".ptx"))
            })
            .collect();
        found.sort();
        found.pop()
    }

    /// The PTX of `source` for `sm`: read from the cache, or compiled and written atomically
    /// (temporary file + rename, so a concurrent or killed process never leaves half a file).
    pub fn get(&self, source: Source, sm: u32) -> Result<String> {
        let path = match self.path(source, sm) {
            Ok(p) => p,
            // No NVRTC: staged PTX of the same source still runs; otherwise the NVRTC error.
            Err(e) => return self.any_version(source, sm).and_then(|p| std::fs::read_to_string(p).ok()).ok_or(e),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NVRTC, staged PTX of the same source and capability is found whatever NVRTC
    /// version wrote it; another source's or capability's file is not.
    #[test]
    fn staged_ptx_of_any_nvrtc_version_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path());
        assert_eq!(cache.any_version(Source::Lora, 90), None);
        let name = format!("{}12.9.ptx", PtxCache::prefix(Source::Lora, 90));
        std::fs::write(dir.path().join(&name), "// staged").unwrap();
        std::fs::write(dir.path().join(format!("{}13.0.ptx", PtxCache::prefix(Source::Lora, 80))), "x").unwrap();
        assert_eq!(cache.any_version(Source::Lora, 90), Some(dir.path().join(name)));
        assert_eq!(cache.any_version(Source::Embed, 90), None);
        assert_ne!(PtxCache::prefix(Source::Lora, 90), PtxCache::prefix(Source::Lora, 80));
    }
}
