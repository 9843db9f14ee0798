//! Issue 18, part 5: NVRTC compiles every kernel source for sm_80 (A100) and sm_90 (H100) with
//! no error and no warning, on a machine without a GPU; every entry point the launch code names
//! is in the PTX; the PTX cache returns what it compiled and keys on the capability.
//!
//! Needs libnvrtc (the torch venv's `nvidia/cu13/lib`, installed by scripts/setup.sh): skipped
//! by a plain `cargo test` without it, a failure under `CI`.

use likeness_kernels::{nvrtc, KernelId, PtxCache, Source};
use likeness_sdk::testing::skip;

/// The capabilities CI compiles for: Ampere (A100) and Hopper (H100, the device machines).
const ARCHS: [u32; 2] = [80, 90];

fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc::ensure_loaded().and_then(|_| nvrtc::include_dir()) {
        Ok(_) => true,
        Err(e) => skip::<()>(test, &e.to_string()).is_some(),
    }
}

#[test]
fn issue18_every_kernel_compiles_for_sm80_and_sm90_without_warnings() {
    if !nvrtc_or_skip("issue18_every_kernel_compiles_for_sm80_and_sm90_without_warnings") {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    assert_eq!(major, 13, "the pinned torch venv ships NVRTC 13, got {major}.{minor}");
    for source in Source::ALL {
        for sm in ARCHS {
            let t = std::time::Instant::now();
            let c = nvrtc::compile(source, sm).unwrap_or_else(|e| panic!("{e}"));
            eprintln!(
                "{} sm_{sm}: {} bytes of PTX in {:.2} s",
                source.file_name(),
                c.ptx.len(),
                t.elapsed().as_secs_f64()
            );
            assert!(c.ptx.contains(&format!(".target sm_{sm}")), "{}: PTX not for sm_{sm}", source.file_name());
            let entries = nvrtc::entries(&c.ptx);
            for k in source.kernels() {
                assert!(entries.contains(&k.entry()), "{}: no entry {} in {entries:?}", source.file_name(), k.entry());
            }
        }
    }
    assert_eq!(Source::ALL.iter().map(|s| s.kernels().len()).sum::<usize>(), KernelId::all().len());
}

/// The check is real: a source with a warning (an unused variable) and one with an error fail.
#[test]
fn issue18_a_warning_fails_the_compile_check() {
    if !nvrtc_or_skip("issue18_a_warning_fails_the_compile_check") {
        return;
    }
    let warn =
        nvrtc::compile_text("warn.cu", "extern \"C\" __global__ void k(float* x) { int unused = 3; x[0] = 1.f; }", 90);
    let e = warn.expect_err("an unused variable must be reported").to_string();
    assert!(e.contains("warn.cu") && e.to_lowercase().contains("warning"), "{e}");
    let bad = nvrtc::compile_text("bad.cu", "extern \"C\" __global__ void k(float* x) { x[0] = y; }", 90);
    let e = bad.expect_err("an undefined name must fail").to_string();
    assert!(e.contains("bad.cu") && e.contains("\"y\""), "{e}");
    assert!(nvrtc::compile_text("ok.cu", "extern \"C\" __global__ void k(float* x) { x[0] = 1.f; }", 90).is_ok());
}

#[test]
fn issue18_ptx_cache_keys_on_the_capability_and_reuses_its_file() {
    if !nvrtc_or_skip("issue18_ptx_cache_keys_on_the_capability_and_reuses_its_file") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("likeness-ptx-{}", std::process::id()));
    let cache = PtxCache::new(&dir);
    let (p80, p90) = (cache.path(Source::Adamw, 80).unwrap(), cache.path(Source::Adamw, 90).unwrap());
    assert_ne!(p80, p90);
    let first = cache.get(Source::Adamw, 90).unwrap();
    assert!(p90.is_file());
    // A file in the cache is what `get` returns (no recompilation): overwrite it and read back.
    std::fs::write(&p90, "// cached\n").unwrap();
    assert_eq!(cache.get(Source::Adamw, 90).unwrap(), "// cached\n");
    assert!(first.contains(".entry"));
    let _ = std::fs::remove_dir_all(&dir);
}
