//! Set-up shared by this crate's integration tests (each a binary of its own that says
//! `mod common;`): the tiny random Flux.1-dev pipeline that tests/python/make_tiny_flux.py writes
//! with diffusers (16×12 px images → 8×6 latents, packed to 4×3 tokens), Python runs, and f32
//! tensor files.

#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use likeness_diffusion_torch::trainer::TrainConfig;
use likeness_diffusion_torch::Backbone;
use likeness_plugin_flux_lora::config::FluxLoraConfig;
use likeness_plugin_flux_lora::Flux;
use tch::{Device, Tensor};

/// T5 tokens per prompt in the tests (FluxPipeline's `max_sequence_length`).
pub const MAX_SEQ: u32 = 16;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `$LIKENESS_PYTHON tests/python/<script> args…`, panicking with its stderr on failure.
pub fn python(py: &Path, script: &str, args: &[&OsStr]) {
    let o = Command::new(py)
        .arg(repo().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// The tiny pipeline, written once into cargo's per-target temp dir (the script's stamp makes a
/// rerun instant), or `None` after a `skipped:` line without the venv.
pub fn tiny(test: &str) -> Option<(&'static Path, PathBuf)> {
    static T: OnceLock<PathBuf> = OnceLock::new();
    let py = likeness_sdk::testing::python_or_skip(test)?;
    let dir = T.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("flux-lora-tiny");
        python(&py, "make_tiny_flux.py", &["--out".as_ref(), dir.as_os_str()]);
        dir
    });
    Some((dir.as_path(), py))
}

/// The backbone on the tiny model, fp32, with `extra` config keys.
pub fn flux(dir: &Path) -> Flux {
    let cfg: FluxLoraConfig =
        serde_json::from_value(serde_json::json!({"pretrained": dir, "max_sequence_length": MAX_SEQ})).unwrap();
    let train: TrainConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    Flux::load(&cfg, &train, Device::Cpu).unwrap()
}

/// `<dir>/<name>.f32` (little-endian f32) as a tensor of `shape`.
pub fn read_f32(dir: &Path, name: &str, shape: &[i64]) -> Tensor {
    let bytes = std::fs::read(dir.join(format!("{name}.f32"))).unwrap();
    let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Tensor::from_slice(&v).view(shape)
}

/// Writes `t` as `<dir>/<name>.f32`.
pub fn write_f32(dir: &Path, name: &str, t: &Tensor) {
    let t = t.to_kind(tch::Kind::Float).contiguous();
    let v: Vec<f32> = Vec::try_from(t.view([-1])).unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.f32")), bytes).unwrap();
}

pub fn max_diff(a: &Tensor, b: &Tensor, what: &str) -> f64 {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    let d = (a - b).abs().max().double_value(&[]);
    eprintln!("{what}: max |ours - reference| = {d:.3e} (max |x| = {:.3})", b.abs().max().double_value(&[]));
    d
}
