//! The test binaries' shared harness: run one Python oracle script per binary (it writes
//! `oracle.json` with the shapes and one `<name>.f32` file per tensor into a temp dir) and read
//! its tensors back; skipped without the venv unless CI is set (likeness_sdk::testing).

#![allow(dead_code)] // each test binary uses its own subset

use likeness_diffusion_torch::{lora, Store};
use likeness_sdk::testing;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use tch::Tensor;

pub struct PyOracle {
    pub dir: tempfile::TempDir,
    pub json: Value,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl PyOracle {
    /// Runs `tests/python/<script> --out DIR`; None (a skip) without the project venv.
    pub fn run(script: &str, test: &str) -> Option<PyOracle> {
        let python = testing::python_or_skip(test)?;
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(python)
            .arg(repo().join("tests/python").join(script))
            .arg("--out")
            .arg(dir.path())
            .output()
            .expect("cannot start LIKENESS_PYTHON");
        assert!(o.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let json = serde_json::from_str(&std::fs::read_to_string(dir.path().join("oracle.json")).unwrap()).unwrap();
        Some(PyOracle { dir, json })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `<name>.f32` as values.
    pub fn values(&self, name: &str) -> Vec<f32> {
        let bytes = std::fs::read(self.path(&format!("{name}.f32"))).unwrap();
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// `<name>.f32` with its shape from `oracle.json`.
    pub fn tensor(&self, name: &str) -> Tensor {
        let shape: Vec<i64> = self.json[name].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        Tensor::from_slice(&self.values(name)).view(shape.as_slice())
    }
}

/// max |a − b|, printed with max |b| for scale.
pub fn max_diff(a: &Tensor, b: &Tensor, what: &str) -> f64 {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    let d = (a.to_kind(tch::Kind::Float) - b.to_kind(tch::Kind::Float)).abs().max().double_value(&[]);
    let m = b.abs().max().double_value(&[]);
    eprintln!("{what}: max |ours - reference| = {d:.3e} (max |x| = {m:.3})");
    d
}

// Gradient comparisons of the checkpointing tests: the LoRA parameters' gradients and the
// context's, zeroed between two backward passes.

/// The gradient of every LoRA parameter of `store`, then the context's.
pub fn grads(store: &Store, ctx: &Tensor) -> Vec<Tensor> {
    let mut g: Vec<Tensor> = lora::parameters(store).iter().map(|(_, p)| p.grad().copy()).collect();
    g.push(ctx.grad().copy());
    g
}

pub fn zero(store: &Store, ctx: &Tensor) {
    for (_, p) in lora::parameters(store) {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let mut g = ctx.grad();
    if g.defined() {
        let _ = g.zero_();
    }
}

/// max |a − b| / max |a| over all tensors, and max |a|.
pub fn rel_diff(a: &[Tensor], b: &[Tensor]) -> (f64, f64) {
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert!(x.defined() && y.defined(), "a gradient is missing");
        diff = diff.max((x - y).abs().max().double_value(&[]));
        scale = scale.max(x.abs().max().double_value(&[]));
    }
    (diff / scale, scale)
}

/// The store's names and shapes equal the manifest's (`{"tensors": {name: shape}, "num_params"}`,
/// tests/data/), and so does the parameter count.
pub fn compare_with_manifest(store: &Store, manifest: &std::path::Path) {
    use std::collections::BTreeMap;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let want: BTreeMap<String, Vec<i64>> = v["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
        .collect();
    let ours: BTreeMap<String, Vec<i64>> = store.shapes().into_iter().collect();
    let missing: Vec<_> = want.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want.iter().filter(|(k, s)| ours.get(*k).is_some_and(|o| o != *s)).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "missing {missing:?}\nextra {extra:?}\nwrong {wrong:?}"
    );
    assert_eq!(store.parameter_count(), v["num_params"].as_i64().unwrap(), "the manifest's num_params");
}

/// `tests/data/<name>`.
pub fn data_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}
