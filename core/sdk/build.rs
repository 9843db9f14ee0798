// Records the rustc that builds the plugin (the SDK is compiled by the same rustc as the
// plugin that links it) so descriptors can carry an honest build stamp.
fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LIKENESS_RUSTC_VERSION={version}");
    // torch-sys (links = "tch") exports the libtorch it linked; keep its version for stamps.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let version = libtorch_version(std::path::Path::new(&lib)).unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env=LIKENESS_LIBTORCH_VERSION={version}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}

fn libtorch_version(lib: &std::path::Path) -> Option<String> {
    // PyTorch wheel layout: torch/lib/ next to torch/version.py (`__version__ = '2.13.0+cu130'`).
    // Standalone libtorch: build-version next to lib/.
    let root = lib.parent()?;
    if let Ok(s) = std::fs::read_to_string(root.join("version.py")) {
        for line in s.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                return Some(rest.trim_start_matches([' ', '=']).trim().trim_matches(['\'', '"']).to_string());
            }
        }
    }
    std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string())
}
