//! Test harness: temporary directories, the real `host` binary, the reference Python venv.
//!
//! Heavy set-up (building plugins, the venv, the data) is done by `scripts/test.sh` before
//! `cargo test` runs; the harness only finds what it built. A test that needs it starts with
//! the `*_or_skip` functions below, e.g.
//!
//! ```text
//! const T: &str = "issue_2_grad_accumulation_matches_the_full_batch";
//! let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
//! ```
//!
//! Under a plain `cargo test` a missing piece prints
//! `skipped: <test> needs LIKENESS_PYTHON (run scripts/test.sh)` to stderr and the test returns;
//! with `CI` set the same sentence is a panic (`likeness_sdk::testing`, shared with the plugin
//! tests). The accessors without `_or_skip` (`data_dir`, `demo_bundles`, `require_python`,
//! `run_python`, `host_bin`) panic with that advice: call them after the check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The cargo profile directory the test binary was built into (`target/release`).
pub fn profile_dir() -> PathBuf {
    // target/release/deps/e2e-xxxx -> target/release
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The `host` binary built next to this test binary.
pub fn host_bin() -> PathBuf {
    let p = profile_dir().join("host");
    assert!(p.exists(), "{} is missing: run scripts/test.sh (it builds the host and the plugins first)", p.display());
    p
}

/// The staged plugin directory (`scripts/stage-plugins.sh` fills it).
pub fn staged_plugins() -> PathBuf {
    profile_dir().join("plugins")
}

/// The staged test fixtures (`scripts/build.sh` fills `target/release/test-plugins`).
pub fn staged_test_plugins() -> PathBuf {
    profile_dir().join("test-plugins")
}

pub use likeness_sdk::testing::{ci, skip};

/// The reference Python (`LIKENESS_PYTHON`, the venv of scripts/setup.sh), or `None` after
/// `skipped: <test> needs LIKENESS_PYTHON (run scripts/test.sh)` (a panic when `CI` is set).
#[track_caller]
pub fn python_or_skip(test: &str) -> Option<PathBuf> {
    likeness_sdk::testing::python_or_skip(test)
}

/// The data root of scripts/setup.sh (`LIKENESS_DATA`), or `None` after a `skipped:` line (a
/// panic when `CI` is set).
#[track_caller]
pub fn data_or_skip(test: &str) -> Option<PathBuf> {
    likeness_sdk::testing::data_or_skip(test)
}

/// `$LIKENESS_DATA/demo-bundles`, or `None` after a `skipped:` line (a panic when `CI` is set).
#[track_caller]
pub fn demo_bundles_or_skip(test: &str) -> Option<PathBuf> {
    likeness_sdk::testing::data_path_or_skip(test, "demo-bundles")
}

/// What `scripts/build.sh` leaves in `target/release`: the `host` binary, the staged plugins
/// and the staged fixtures; or `None` after a `skipped:` line (a panic when `CI` is set).
#[track_caller]
pub fn built_or_skip(test: &str) -> Option<()> {
    let what = "the host and the plugins staged by scripts/build.sh";
    likeness_sdk::testing::path_or_skip(test, &profile_dir().join("host"), what)?;
    likeness_sdk::testing::path_or_skip(test, &staged_plugins(), what)?;
    likeness_sdk::testing::path_or_skip(test, &staged_test_plugins(), what)?;
    Some(())
}

/// The reference Python (venv with torch etc.), from `LIKENESS_PYTHON` (set by scripts/test.sh).
pub fn python() -> Option<PathBuf> {
    std::env::var_os("LIKENESS_PYTHON").map(PathBuf::from).filter(|p| p.exists())
}

/// Python or a panic that says how to get it (a test checks [`python_or_skip`] first).
pub fn require_python() -> PathBuf {
    python()
        .expect("LIKENESS_PYTHON is not set: run the tests through scripts/test.sh, which creates the reference venv")
}

/// Demo / test data root prepared by scripts/setup.sh (`LIKENESS_DATA`; a test checks
/// [`data_or_skip`] or [`demo_bundles_or_skip`] first).
pub fn data_dir() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("LIKENESS_DATA").expect("LIKENESS_DATA is not set: run the tests through scripts/test.sh"),
    );
    assert!(p.exists(), "{} is missing: run scripts/setup.sh", p.display());
    p
}

/// A temporary directory that is removed on drop (kept when `LIKENESS_KEEP_TMP` is set).
pub struct Dir {
    // Held for its Drop (removes the directory); None when kept.
    _tmp: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Dir {
    pub fn new(name: &str) -> Dir {
        let tmp = tempfile::Builder::new().prefix(&format!("likeness-{name}-")).tempdir().unwrap();
        let path = tmp.path().to_path_buf();
        let tmp = if std::env::var_os("LIKENESS_KEEP_TMP").is_some() {
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        };
        Dir { _tmp: tmp, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    pub fn create(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p
    }

    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// A command with its output captured, asserting on success or failure with the full output
/// in the panic message.
pub struct TestCommand {
    cmd: Command,
}

impl TestCommand {
    pub fn new(program: impl AsRef<std::ffi::OsStr>) -> Self {
        TestCommand { cmd: Command::new(program) }
    }

    /// The real `host` binary, with plugin search limited to what the test passes (the user
    /// data dir is pointed at an empty directory so a developer's own plugins do not leak in).
    pub fn host(dir: &Dir) -> Self {
        let mut t = TestCommand::new(host_bin());
        t.cmd.current_dir(dir.path());
        t.cmd.env("LIKENESS_DATA_HOME", dir.join(".likeness-home"));
        t.cmd.env_remove("LIKENESS_PLUGIN_PATH");
        t.cmd.env("NO_COLOR", "1");
        t
    }

    pub fn arg(&mut self, a: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(&mut self, k: impl AsRef<std::ffi::OsStr>, v: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.cmd.env(k, v);
        self
    }

    /// Starts from an empty environment (then `env` adds what the test wants).
    pub fn env_clear(&mut self) -> &mut Self {
        self.cmd.env_clear();
        self
    }

    /// Removes one variable from the environment the command inherits.
    pub fn env_remove(&mut self, k: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.cmd.env_remove(k);
        self
    }

    pub fn current_dir(&mut self, d: impl AsRef<Path>) -> &mut Self {
        self.cmd.current_dir(d);
        self
    }

    pub fn output(&mut self) -> Output {
        self.cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.cmd))
    }

    fn describe(&self, o: &Output) -> String {
        format!(
            "command: {:?}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmd,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Runs, asserts success, returns stdout + stderr.
    pub fn ok(&mut self) -> String {
        let o = self.output();
        assert!(o.status.success(), "expected success\n{}", self.describe(&o));
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    }

    /// Runs, asserts failure, returns stdout + stderr.
    pub fn fails(&mut self) -> String {
        let o = self.output();
        assert!(!o.status.success(), "expected failure\n{}", self.describe(&o));
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    }
}

/// Runs a Python script from `tests/python/` with the reference venv and returns stdout.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let py = require_python();
    let path = repo_root().join("tests/python").join(script);
    let mut t = TestCommand::new(py);
    t.arg(path).args(args);
    t.ok()
}

impl TestCommand {
    /// Starts the command without waiting, stdout and stderr going to `log` (so a test can
    /// kill it mid-way and still show what it printed).
    pub fn spawn_logged(&mut self, log: &Path) -> std::process::Child {
        let f = std::fs::File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let g = f.try_clone().unwrap();
        self.cmd.stdout(f).stderr(g);
        self.cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.cmd))
    }
}

/// The demo dataset prepared by scripts/setup.sh (`$LIKENESS_DATA/demo-bundles`).
pub fn demo_bundles() -> PathBuf {
    let p = data_dir().join("demo-bundles");
    assert!(p.is_dir(), "{} is missing: run scripts/setup.sh", p.display());
    p
}

/// `host train` arguments for a tiny identity-autoencoder run on the demo data (32×32 images,
/// 8 base channels, 16-d latent, batch 4): a step takes milliseconds on a CPU.
pub fn tiny_train_args(output: &Path, steps: u64) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "train".into(),
        "--plugin".into(),
        "identity-autoencoder".into(),
        "--data".into(),
        demo_bundles().to_string_lossy().into_owned(),
        "--output".into(),
        output.to_string_lossy().into_owned(),
        "--steps".into(),
        steps.to_string(),
        "--batch-size".into(),
        "4".into(),
        "--no-progress".into(),
    ];
    for s in [
        "model.config.image_size=32",
        "data.image_size=32",
        "model.config.base_channels=8",
        "model.config.latent_dim=16",
    ] {
        v.push("--set".into());
        v.push(s.into());
    }
    v
}

/// Every JSON record of a run's `metrics.jsonl`.
pub fn read_metrics(run: &Path) -> Vec<serde_json::Value> {
    let p = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad JSON line {l:?}: {e}", p.display())))
        .collect()
}

/// The `type = "train"` records of a run, as (step, record).
pub fn train_records(run: &Path) -> Vec<(u64, serde_json::Value)> {
    read_metrics(run)
        .into_iter()
        .filter(|r| r["type"] == "train")
        .map(|r| (r["step"].as_u64().unwrap_or_else(|| panic!("train record without a step: {r}")), r))
        .collect()
}

/// Size, modification time and contents of a file, to prove it was not rewritten.
#[derive(Debug, Clone, PartialEq)]
pub struct FileStamp {
    pub len: u64,
    pub modified: std::time::SystemTime,
    /// FNV-1a 64 of the whole contents.
    pub hash: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> FileStamp {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bytes = std::fs::read(path).unwrap();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        FileStamp { len: meta.len(), modified: meta.modified().unwrap(), hash: h }
    }
}
