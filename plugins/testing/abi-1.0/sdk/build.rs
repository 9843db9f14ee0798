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
}
