//! Set-up shared by this crate's integration tests (`plugin.rs`, `whole_chain_fd.rs`, each a
//! test binary of its own that says `mod common;`): the tiny random SD1.5 pipeline that
//! tests/python/make_tiny_sd15.py writes with diffusers, and the inputs both tests feed it.
//! 32×32 images → 16×16 latents (the tiny VAE has factor 2).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use likeness_sdk::CpuTensor;

/// Image side of every test input: the tiny VAE's `sample_size`.
pub const SIZE: i64 = 32;
/// A batch of two captions.
pub const CAPTIONS: [&str; 2] = ["a photo of a person smiling", "a portrait in the rain"];

/// The tiny pipeline (folder, the same weights as one original single file), written once per
/// machine into cargo's per-target temp dir (the script's stamp makes a rerun instant, so the two
/// test binaries share one copy), or `None` after a `skipped:` line when there is no
/// `LIKENESS_PYTHON`.
pub fn tiny(test: &str) -> Option<&'static (PathBuf, PathBuf)> {
    static T: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let python = likeness_sdk::testing::python_or_skip(test)?;
    Some(T.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sd15-lora-tiny");
        let dir = root.join("tiny");
        let single = root.join("tiny-single.safetensors");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/make_tiny_sd15.py");
        let o = Command::new(python)
            .arg(&script)
            .arg("--out")
            .arg(&dir)
            .arg("--preset")
            .arg("tiny")
            .arg("--single")
            .arg(&single)
            .output()
            .expect("cannot start LIKENESS_PYTHON");
        assert!(o.status.success(), "make_tiny_sd15.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
        (dir, single)
    }))
}

/// `n` images `[n, 3, SIZE, SIZE]` of uniform values in [0, 1) from `seed`.
pub fn images(n: usize, seed: u64) -> CpuTensor<f32> {
    let data = likeness_sdk::testing::uniform_f32(seed, n * 3 * (SIZE * SIZE) as usize, 0.0, 1.0);
    CpuTensor::new(vec![n as i64, 3, SIZE, SIZE], data)
}

/// Adds U(−0.1, 0.1) (seeded by `seed` + the parameter's index) to every LoRA weight, in place:
/// lora_B starts at 0, which would make every lora_A gradient 0.
#[allow(dead_code)] // each test binary uses its own subset of this module
pub fn perturb_lora(m: &likeness_plugin_sd15_lora::Sd15Lora, seed: u64) {
    let _g = tch::no_grad_guard();
    for (i, (_, mut p)) in m.lora_parameters().into_iter().enumerate() {
        let r = tch::Tensor::from_slice(&likeness_sdk::testing::uniform(seed + i as u64, p.numel()))
            .view(p.size().as_slice())
            .to_kind(p.kind());
        let _ = p.g_add_(&((r - 0.5) * 0.2));
    }
}

/// The central difference (f(p + h·e_k) − f(p − h·e_k)) / 2h of `objective` in element `k` of
/// the LoRA weight `p`, which is bumped in place and restored.
#[allow(dead_code)] // each test binary uses its own subset of this module
pub fn central_difference(p: &tch::Tensor, k: i64, h: f64, mut objective: impl FnMut() -> f64) -> f64 {
    let bump = |d: f64| {
        let _g = tch::no_grad_guard();
        let _ = p.view([-1]).get(k).g_add_scalar_(d);
    };
    bump(h);
    let up = objective();
    bump(-2.0 * h);
    let down = objective();
    bump(h);
    (up - down) / (2.0 * h)
}
