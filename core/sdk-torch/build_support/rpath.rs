// Shared by the build scripts of every libtorch crate in this repository:
//     include!("../../core/sdk-torch/build_support/rpath.rs");   // plugins/<id>/build.rs
//     include!("../sdk-torch/build_support/rpath.rs");           // core/<crate>/build.rs
//     fn main() { link_libtorch_with_rpath() }
// (A third-party plugin copies this file: build scripts cannot inherit link arguments.)
//
// Makes the plugin find libtorch at dlopen time with no environment variables.
//
// torch-sys (`links = "tch"`) exports the libtorch it linked as `DEP_TCH_LIBTORCH_LIB`; only
// direct dependents see it, hence the direct `torch-sys` dependency. We bake that directory
// into the library's rpath and force `libtorch.so` to be a `NEEDED` entry: without
// `--no-as-needed`, the linker drops `libtorch.so` (and with it `libtorch_cuda.so`) because no
// symbol of ours references it directly, and CUDA is then silently unavailable.
// `cargo:rustc-link-arg` applies to every linked target of this package (the cdylib and the
// test binaries alike).
/// Call from a libtorch plugin's `build.rs` (see the module comment above).
pub fn link_libtorch_with_rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    // `build.rs` is relative to the including package, so it is right from any crate. This file
    // needs no line of its own: `include!` makes it an input of the build script's compilation
    // (it is in rustc's dep-info of `build-script-build`), and cargo reruns a build script it
    // recompiled. A path written here would be relative to each including package and so point
    // at the wrong place from a crate at another depth.
    println!("cargo:rerun-if-changed=build.rs");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-L{lib}");
            println!("cargo:rustc-link-arg=-ltorch");
        }
        Err(_) => println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: the plugin will need LD_LIBRARY_PATH to find libtorch"
        ),
    }
}
