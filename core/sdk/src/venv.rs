//! Where plugins and the host look for files the set-up provides: the project home
//! (`LIKENESS_HOME`), its data folder (`LIKENESS_DATA`) and the project venv that
//! scripts/setup.sh creates (ONNX Runtime's library, dlib's model files).
//!
//! The defaults here are exactly scripts/common.sh's, so `host` (and any plugin it loads) finds
//! the set-up's files when it runs outside the scripts' environment:
//! - `LIKENESS_HOME`: the variable, else `$XDG_CACHE_HOME/likeness`, else `~/.cache/likeness`;
//! - `LIKENESS_DATA`: the variable, else `$LIKENESS_HOME/data`.
//!
//! An empty variable counts as unset, as in the shell scripts (`${VAR:-default}`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

fn non_empty(var: &str) -> Option<OsString> {
    std::env::var_os(var).filter(|v| !v.is_empty())
}

/// The project home: `$LIKENESS_HOME`, else `$XDG_CACHE_HOME/likeness`, else
/// `$HOME/.cache/likeness`; `None` when none of the three is set.
pub fn likeness_home() -> Option<PathBuf> {
    home_in(&non_empty)
}

/// The data folder: `$LIKENESS_DATA`, else `<likeness_home>/data`.
pub fn likeness_data() -> Option<PathBuf> {
    data_in(&non_empty)
}

/// [`likeness_home`] over an environment given as a lookup (tests pass their own, so no test
/// changes the process environment other tests read).
fn home_in(env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if let Some(h) = env("LIKENESS_HOME") {
        return Some(PathBuf::from(h));
    }
    if let Some(c) = env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(c).join("likeness"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".cache/likeness"))
}

fn data_in(env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    env("LIKENESS_DATA").map(PathBuf::from).or_else(|| home_in(env).map(|h| h.join("data")))
}

fn venvs_in(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(home) = home_in(env) {
        out.push(home.join("venv"));
    }
    if let Some(home) = env("HOME") {
        let fallback = PathBuf::from(home).join(".cache/likeness/venv");
        if !out.contains(&fallback) {
            out.push(fallback);
        }
    }
    out
}

/// A sentence for error messages: which folder `LIKENESS_DATA` resolved to and why.
pub fn describe_data_dir() -> String {
    match (non_empty("LIKENESS_DATA"), likeness_data()) {
        (Some(_), Some(d)) => format!("$LIKENESS_DATA = {}", d.display()),
        (None, Some(d)) => format!("$LIKENESS_DATA is unset, so its default {} (= $LIKENESS_HOME/data)", d.display()),
        _ => "$LIKENESS_DATA, LIKENESS_HOME, XDG_CACHE_HOME and HOME are all unset".to_string(),
    }
}

/// The project venvs, in search order: `<likeness_home>/venv`, then `~/.cache/likeness/venv`
/// (scripts/setup.sh's default when `XDG_CACHE_HOME` is unset), without duplicates.
pub fn venv_candidates() -> Vec<PathBuf> {
    venvs_in(&non_empty)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Issue 14, part 2: the binary's defaults are scripts/common.sh's.
    #[test]
    fn issue14_defaults_follow_common_sh() {
        let run = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
            let env = move |k: &str| m.get(k).filter(|v| !v.is_empty()).cloned();
            (home_in(&env), data_in(&env), venvs_in(&env))
        };
        assert_eq!(run(&[]), (None, None, vec![]));
        let p = PathBuf::from;
        assert_eq!(
            run(&[("HOME", "/h")]),
            (Some(p("/h/.cache/likeness")), Some(p("/h/.cache/likeness/data")), vec![p("/h/.cache/likeness/venv")])
        );
        let xdg = run(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(xdg.0, Some(p("/x/likeness")));
        assert_eq!(xdg.2, vec![p("/x/likeness/venv"), p("/h/.cache/likeness/venv")]);
        let empty = run(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("LIKENESS_HOME", "")]);
        assert_eq!(empty.0, Some(p("/x/likeness")), "an empty variable counts as unset");
        assert_eq!(run(&[("LIKENESS_HOME", "/l")]).1, Some(p("/l/data")));
        assert_eq!(run(&[("LIKENESS_HOME", "/l"), ("LIKENESS_DATA", "/d")]).1, Some(p("/d")));
    }
}
