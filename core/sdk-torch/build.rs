// Records the libtorch version torch-sys linked (for descriptors' build stamps).
// torch-sys has `links = "tch"`, so its DEP_TCH_LIBTORCH_LIB reaches direct dependents only.
// The rpath is for this crate's own test binary (its unit tests call libtorch); link arguments
// of a library's build script reach only the package's linked targets, never its dependents.
include!("build_support/rpath.rs");

fn main() {
    link_libtorch_with_rpath();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let version = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .and_then(|lib| libtorch_version(std::path::Path::new(&lib)))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LIKENESS_LIBTORCH_VERSION={version}");
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
