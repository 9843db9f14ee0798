//! Shared helpers of the oracle tests: the venv python, the data dir, running the oracle.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use likeness_plugin_arcface::iresnet::{onnx_to_tensor, OnnxNet};
use likeness_plugin_arcface::onnx_proto::{self, Attribute, OnnxTensor, TensorData};
use likeness_sdk::testing;
use tch::{Device, Kind, Tensor};

/// What the oracle tests need from the set-up: the venv python (insightface==0.7.3, opencv,
/// torch, onnx, onnxruntime) and the data root with the photos.
pub struct Env {
    pub python: PathBuf,
    pub data: PathBuf,
}

/// `LIKENESS_PYTHON` and `LIKENESS_DATA` (with `photos/insightface/t1.jpg`), or `None` after
/// printing `skipped: <test> needs …` (a panic when `CI` is set): see `likeness_sdk::testing`.
pub fn env_or_skip(test: &str) -> Option<Env> {
    let python = testing::python_or_skip(test)?;
    let data = testing::data_or_skip(test)?;
    testing::path_or_skip(test, &data.join("photos/insightface/t1.jpg"), "the photos of scripts/setup.sh")?;
    Some(Env { python, data })
}

pub fn oracle_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/arcface_oracle.py")
}

/// Runs `arcface_oracle.py <args> --data $LIKENESS_DATA --out <out>`.
pub fn run_oracle(env: &Env, args: &[&str], out: &Path) {
    let o = Command::new(&env.python)
        .arg(oracle_script())
        .args(args)
        .arg("--data")
        .arg(&env.data)
        .arg("--out")
        .arg(out)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(
        o.status.success(),
        "arcface_oracle.py {args:?} failed (needs insightface==0.7.3 and opencv from scripts/requirements.txt):\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

pub fn read_f32(p: &Path) -> Vec<f32> {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// An RGB8 PNG/JPEG: (pixels, width, height).
pub fn read_rgb(p: &Path) -> (Vec<u8>, usize, usize) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w as usize, h as usize)
}

pub fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Kink-aware f32-vs-f64 gradient comparison (see iresnet_parity.rs, input_gradient_matches_finite_differences)

/// A constant of `model` (an initializer or a `Constant` node's value) as an f32 tensor.
pub fn constant(model: &onnx_proto::Model, name: &str) -> Tensor {
    if let Some(t) = model.graph.initializers.iter().find(|t| t.name == name) {
        return onnx_to_tensor(t, Device::Cpu).to_kind(Kind::Float);
    }
    for n in &model.graph.nodes {
        if n.op_type == "Constant" && n.outputs.first().map(String::as_str) == Some(name) {
            if let Some(Attribute::Tensor(t)) = n.attributes.get("value") {
                return onnx_to_tensor(t, Device::Cpu).to_kind(Kind::Float);
            }
        }
    }
    panic!("`{name}` is not a constant of the graph")
}

/// One `PRelu` node of the graph and its input (the pre-activation) at `x`, computed in f32
/// (what the plugin runs) and in f64.
pub struct PreActivation {
    pub node: usize,
    pub z32: Tensor,
    pub z64: Tensor,
}

/// The pre-activations of every `PRelu` node (the graph cut at the node's input), in f32 at
/// `x32` and in f64 at `x64` (the same input, or its f64 twin).
pub fn pre_activations(model: &onnx_proto::Model, x32: &Tensor, x64: &Tensor) -> Vec<PreActivation> {
    let cut = |name: &str| {
        let mut m = model.clone();
        m.graph.outputs[0].name = name.to_string();
        m
    };
    let mut out = Vec::new();
    for (i, n) in model.graph.nodes.iter().enumerate().filter(|(_, n)| n.op_type == "PRelu") {
        let m = cut(&n.inputs[0]);
        let net32 = OnnxNet::from_model(&m, "cut", Device::Cpu).unwrap();
        let net64 = OnnxNet::from_model(&m, "cut", Device::Cpu).unwrap().with_kind(Kind::Double);
        let z32 = tch::no_grad(|| net32.forward(x32)).unwrap();
        let z64 = tch::no_grad(|| net64.forward(x64)).unwrap();
        out.push(PreActivation { node: i, z32, z64 });
    }
    out
}

/// `model` with every `PRelu(z, slope)` replaced by `Mul(z, D)`, where `D` is the derivative of
/// that PRelu at the f32 pre-activation (1 where z32 > 0, the slope where z32 < 0, 1 + slope at
/// an exact 0, as autograd differentiates the interpreter's `clamp_min(z, 0) + slope·clamp_max(z, 0)`).
/// It computes the same function as `model` wherever f64 and f32 agree on the sign of z, and its
/// gradient is the one the f32 net's activation pattern selects: a linear map.
pub fn with_activation_pattern(model: &onnx_proto::Model, pre: &[PreActivation]) -> onnx_proto::Model {
    let mut m = model.clone();
    for p in pre {
        let n = &model.graph.nodes[p.node];
        let mut slope = constant(model, &n.inputs[1]);
        let z = &p.z32;
        // The interpreter's broadcast rule for a flat per-channel slope on NCHW.
        if z.dim() == 4 && slope.dim() == 1 && slope.size()[0] == z.size()[1] && slope.size()[0] != z.size()[3] {
            slope = slope.reshape([-1, 1, 1]);
        }
        let d = z.ge(0.0).to_kind(Kind::Float) + slope * z.le(0.0).to_kind(Kind::Float);
        let name = format!("{}/f32-activation-pattern", n.inputs[0]);
        m.graph.initializers.push(OnnxTensor {
            name: name.clone(),
            dims: d.size(),
            data_type: 1,
            data: TensorData::F32(Vec::<f32>::try_from(d.flatten(0, -1)).unwrap()),
        });
        m.graph.nodes[p.node].op_type = "Mul".into();
        m.graph.nodes[p.node].inputs[1] = name;
    }
    m
}

/// Checks every f32 pre-activation against f64 and returns how many lie on the other side of
/// their kink (each such flip is then within rounding of the kink: |z64| ≤ |z32 − z64|).
/// For IResNet[1,1,1,1] (the `small` export and `r-tiny`).
pub fn check_pre_activations(what: &str, pre: &[PreActivation]) -> i64 {
    let mut flips = 0i64;
    for p in pre {
        let zmax = p.z64.abs().max().double_value(&[]);
        let dz = (p.z32.to_kind(Kind::Double) - &p.z64).abs().max().double_value(&[]);
        let flipped = p.z32.gt(0.0).ne_tensor(&p.z64.gt(0.0)).sum(Kind::Int64).int64_value(&[]);
        flips += flipped;
        eprintln!(
            "[{what} f32 pre-activation {}] {:?}: max |z32 − z64| / max|z64| = {:.2e}; {flipped} of {} activations on the other side of the kink",
            p.node,
            p.z64.size(),
            dz / zmax,
            p.z64.numel()
        );
        // A pre-activation is ≤ 12 accumulations deep (conv1 → 4 blocks of 2 convs, with the
        // BatchNorm affines and residual adds between): each sums K ≤ 9·512 = 4608 products,
        // whose f32 rounding error is ≲ √K·u ≈ 68 · 6e-8 = 4e-6 relative to the terms'
        // root-sum-square whatever the summation order (blocked or pairwise orders only shrink
        // the constant). 12 · 4e-6 ≈ 5e-5 ≤ 1e-4.
        assert!(dz <= 1e-4 * zmax, "PRelu input of node {}: f32 differs from f64 by {dz:e} (max |z| {zmax:e})", p.node);
    }
    flips
}
