//! Test harness: temporary directories, the real `host` binary, the reference Python venv.
//!
//! Heavy set-up (building plugins, the venv) is done by `scripts/test.sh` before `cargo test`
//! runs; the harness only finds what it built and fails with a message saying which script
//! to run when something is missing.

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

/// The reference Python (venv with torch etc.), from `LIKENESS_PYTHON` (set by scripts/test.sh).
pub fn python() -> Option<PathBuf> {
    std::env::var_os("LIKENESS_PYTHON").map(PathBuf::from).filter(|p| p.exists())
}

/// Python or a panic that says how to get it.
pub fn require_python() -> PathBuf {
    python().expect("LIKENESS_PYTHON is not set: run the tests through scripts/test.sh, which creates the reference venv")
}

/// Demo / test data root prepared by scripts/setup.sh (`LIKENESS_DATA`).
pub fn data_dir() -> PathBuf {
    let p = PathBuf::from(std::env::var("LIKENESS_DATA").expect("LIKENESS_DATA is not set: run the tests through scripts/test.sh"));
    assert!(p.exists(), "{} is missing: run scripts/setup.sh", p.display());
    p
}

/// A temporary directory that is removed on drop (kept when `LIKENESS_KEEP_TMP` is set).
pub struct Dir {
    tmp: Option<tempfile::TempDir>,
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
        Dir { tmp, path }
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

    #[allow(dead_code)]
    fn _keep(&self) -> bool {
        self.tmp.is_none()
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
