//! Where plugins look for files that PyPI wheels ship (ONNX Runtime's library, dlib's model
//! files): the project venv that scripts/setup.sh creates.

use std::path::{Path, PathBuf};

/// The project venvs, in search order: `$LIKENESS_HOME/venv` (when `LIKENESS_HOME` is set and
/// not empty), then `~/.cache/likeness/venv` (scripts/setup.sh's default).
pub fn venv_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(home) = std::env::var_os("LIKENESS_HOME").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(home).join("venv"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(home).join(".cache/likeness/venv"));
    }
    out
}

/// `<venv>/lib/python3*/site-packages` of one venv, sorted by name (`None` when `<venv>/lib`
/// cannot be read).
pub fn site_packages(venv: &Path) -> Option<Vec<PathBuf>> {
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .collect();
    pythons.sort();
    Some(pythons)
}
