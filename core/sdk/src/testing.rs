//! Helpers for plugin tests: deterministic data without a random-number crate, and the one
//! rule for tests that need the set-up's environment (skip under a plain `cargo test`, fail
//! under CI).
//!
//! ```text
//! #[test]
//! fn matches_the_oracle() {
//!     let Some(python) = likeness_sdk::testing::python_or_skip("matches_the_oracle") else { return };
//!     …
//! }
//! ```
//!
//! `scripts/test.sh` (what CI runs, through `.ci/run`) creates the venv and the data and
//! exports `LIKENESS_PYTHON` and `LIKENESS_DATA`; a developer's plain `cargo test` may lack
//! them. Without `CI` such a test prints `skipped: <test> needs <what> (run scripts/test.sh)`
//! to stderr and returns early; with `CI` set the same sentence is a panic, so a CI machine
//! whose set-up broke cannot pass by skipping.

use std::path::{Path, PathBuf};

/// Deterministic uniform numbers in [0, 1) (SplitMix64), the same for a seed on every machine.
pub fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// [`uniform`] mapped to `[lo, hi)` as f32.
pub fn uniform_f32(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    uniform(seed, n).into_iter().map(|u| lo + (hi - lo) * u as f32).collect()
}

/// Whether missing set-up fails the test instead of skipping it: `CI` is set to anything but
/// the empty string, `0` or `false` (GitHub Actions, GitLab and most CI systems set `CI=true`;
/// `.ci/run` sets it too).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The sentence both outcomes print: `<test> needs <what> (run scripts/test.sh)`.
fn needs(test: &str, what: &str) -> String {
    format!("{test} needs {what} (run scripts/test.sh)")
}

/// Gives up on `test` for lack of `what`: under [`ci`] a panic, otherwise a
/// `skipped: <test> needs <what> (run scripts/test.sh)` line on stderr and `None`, so that the
/// caller can `let Some(x) = … else { return };`. The line is written to the process's stderr
/// directly, not through `eprintln!`, which the test harness captures (and shows only for
/// failing tests): a skip is visible in a plain `cargo test`.
#[track_caller]
pub fn skip<T>(test: &str, what: &str) -> Option<T> {
    use std::io::Write;
    let msg = needs(test, what);
    if ci() {
        panic!("{msg}; CI is set, so missing set-up is a failure, not a skip");
    }
    let _ = writeln!(std::io::stderr().lock(), "skipped: {msg}");
    None
}

/// `$var` when it is set, not empty and names an existing file or directory; otherwise
/// [`skip`] (naming the variable, and its value when that path does not exist).
#[track_caller]
pub fn env_path_or_skip(test: &str, var: &str) -> Option<PathBuf> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        None => skip(test, var),
        Some(v) => {
            let p = PathBuf::from(v);
            if p.exists() {
                Some(p)
            } else {
                skip(test, &format!("{var} (set to {}, which does not exist)", p.display()))
            }
        }
    }
}

/// `path` when it exists, otherwise [`skip`] with `what` (e.g. "the staged plugins in …").
#[track_caller]
pub fn path_or_skip(test: &str, path: &Path, what: &str) -> Option<PathBuf> {
    if path.exists() {
        Some(path.to_path_buf())
    } else {
        skip(test, &format!("{what} ({} is missing)", path.display()))
    }
}

/// The reference Python of the project venv (`LIKENESS_PYTHON`: torch, onnx, onnxruntime,
/// insightface, dlib-bin … from scripts/requirements.txt).
#[track_caller]
pub fn python_or_skip(test: &str) -> Option<PathBuf> {
    env_path_or_skip(test, "LIKENESS_PYTHON")
}

/// The data root prepared by scripts/setup.sh (`LIKENESS_DATA`: demo bundles, photos, faces).
#[track_caller]
pub fn data_or_skip(test: &str) -> Option<PathBuf> {
    env_path_or_skip(test, "LIKENESS_DATA")
}

/// `$LIKENESS_DATA/<rel>` when it exists (a file or folder scripts/setup.sh prepares).
#[track_caller]
pub fn data_path_or_skip(test: &str, rel: &str) -> Option<PathBuf> {
    let root = data_or_skip(test)?;
    path_or_skip(test, &root.join(rel), &format!("$LIKENESS_DATA/{rel}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_splitmix64() {
        // First output of SplitMix64 from state 0 is 0xE220A8397B1DCDAF.
        let u = uniform(0, 2);
        assert_eq!(u[0], (0xE220_A839_7B1D_CDAFu64 >> 11) as f64 / (1u64 << 53) as f64);
        assert!(u.iter().all(|v| (0.0..1.0).contains(v)));
        let f = uniform_f32(3, 100, -1.0, 1.0);
        assert!(f.iter().all(|v| (-1.0..1.0).contains(v)));
    }

    #[test]
    fn missing_paths_skip_or_fail() {
        let missing = Path::new("/nonexistent/likeness-testing");
        if ci() {
            let r = std::panic::catch_unwind(|| path_or_skip("t", missing, "x"));
            let e = r.expect_err("CI: a panic");
            let msg = e.downcast_ref::<String>().unwrap();
            assert!(
                msg.starts_with("t needs x (/nonexistent/likeness-testing is missing) (run scripts/test.sh)"),
                "{msg}"
            );
        } else {
            assert_eq!(path_or_skip("t", missing, "x"), None);
        }
        assert_eq!(path_or_skip("t", Path::new("/"), "x"), Some(PathBuf::from("/")));
    }
}
