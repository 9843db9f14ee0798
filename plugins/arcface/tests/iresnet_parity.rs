//! The differentiable recognizer path (`onnx_proto` → `iresnet` interpreter in tch →
//! `diff_align`) against `tests/python/iresnet_oracle.py`: ONNX files written by the `onnx`
//! package (reader), and arcface_torch-layout IResNets with random weights exported by
//! PyTorch 2.13 (`dynamo=False`, opset 17) and run by onnxruntime-python (parity).
//!
//! Tolerances:
//! * tch vs onnxruntime-python on the same file: cosine ≥ 0.999 per row (the bar; both
//!   run f32 on the CPU, measured ≈ 1 − 1e-7), plus a max-abs bound relative to the output scale;
//! * gradients: the net is run in f64 (`OnnxNet::with_kind(Kind::Double)`) so that central
//!   finite differences (step 1e-3 in 0..255 input units) are accurate:
//!   |autograd − FD| ≤ 1e-5 · max|grad| at every probed pixel (measured ≤ 5e-9; see `fd_check`);
//!   the f32 pre-activations agree with f64 to ≤ 1e-4 of their max, and the f32 autograd
//!   gradient agrees to ≤ 1e-4 · max|g| with the f64 gradient *of the same PRelu activation
//!   pattern* (a pre-activation within f32 rounding of a kink may take the other slope, which
//!   is a jump in the gradient, not a rounding error: see `input_gradient_matches_finite_differences`);
//! * grid_sample crops vs `align::warp_affine_chw_f32`: ≤ 1e-4 on 0..1 images (the unit test in
//!   `diff_align.rs`), ≤ 1e-4 · 255 on 0..255 images here.

mod common;
use common::{check_pre_activations, pre_activations, with_activation_pattern};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use likeness_plugin_arcface::align::{self, ARCFACE_DST};
use likeness_plugin_arcface::diff_align;
use likeness_plugin_arcface::iresnet::{cosine_rows, l2_normalize, OnnxNet};
use likeness_plugin_arcface::onnx_proto::{self, Dim};
use tch::{Device, Kind, Tensor};

/// The venv python (torch, onnx, onnxruntime), or `None` after `skipped: <test> needs
/// LIKENESS_PYTHON …` (a panic when `CI` is set).
fn python_or_skip(test: &str) -> Option<PathBuf> {
    likeness_sdk::testing::python_or_skip(test)
}

fn oracle(python: &Path, args: &[&str], out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/iresnet_oracle.py");
    let o = Command::new(python)
        .arg(&script)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(
        o.status.success(),
        "iresnet_oracle.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read_f32(p: &Path) -> Vec<f32> {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// One export per configuration per test binary (the directory is kept until the process ends).
fn export(python: &Path, key: &'static str, args: &'static [&'static str]) -> PathBuf {
    static SMALL: OnceLock<PathBuf> = OnceLock::new();
    static R50: OnceLock<PathBuf> = OnceLock::new();
    let cell = match key {
        "small" => &SMALL,
        "r50" => &R50,
        _ => unreachable!(),
    };
    cell.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix(&format!("iresnet-{key}-")).tempdir().unwrap().keep();
        let mut a = vec!["iresnet"];
        a.extend_from_slice(args);
        oracle(python, &a, &dir);
        dir
    })
    .clone()
}

fn small(python: &Path) -> PathBuf {
    // IResNet [1,1,1,1] with the (x − 127.5)/127.5 Sub/Mul in the graph, batch 2.
    export(python, "small", &["--layers", "1,1,1,1", "--batch", "2", "--seed", "0", "--norm-in-graph"])
}

fn tensor(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).reshape(shape)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// (min cosine over rows, max |a − b|, max |b|).
fn compare(a: &Tensor, b: &Tensor) -> (f64, f64, f64) {
    let cos = to_vec(&cosine_rows(&a.to_kind(Kind::Double), &b.to_kind(Kind::Double)));
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    (cos.iter().cloned().fold(f64::INFINITY, f64::min), d, b.abs().max().double_value(&[]))
}

fn check_parity(dir: &Path, what: &str) {
    let meta = json(&dir.join("meta.json"));
    let shape: Vec<i64> = meta["input_shape"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let x = tensor(&read_f32(&dir.join("input.f32")), &shape);
    let y_ort = tensor(&read_f32(&dir.join("ort.f32")), &[shape[0], -1]);
    let y_torch = tensor(&read_f32(&dir.join("torch.f32")), &[shape[0], -1]);
    let net = OnnxNet::load(&dir.join("model.onnx"), Device::Cpu).unwrap();
    assert_eq!(net.input_chw(), Some([3, 112, 112]));
    let t0 = std::time::Instant::now();
    let y = tch::no_grad(|| net.forward(&x)).unwrap();
    let dt = t0.elapsed();
    assert_eq!(y.size(), y_ort.size());
    let (cos, d, scale) = compare(&y, &y_ort);
    let (cos_t, d_t, _) = compare(&y, &y_torch);
    eprintln!(
        "[{what}] ops {:?}; tch vs ort-python: min cosine {cos:.9} (1−cos = {:.2e}), max |diff| {d:.3e} (max |y| {scale:.3}); \
         tch vs torch eager: min cosine {cos_t:.9}, max |diff| {d_t:.3e}; forward {:?} on CPU (batch {})",
        net.ops(),
        1.0 - cos,
        dt,
        shape[0]
    );
    // Both sides evaluate the same f32 graph with different kernels (oneDNN via libtorch vs
    // MLAS, each with its own, CPU-dependent summation order). The forward pass is continuous
    // (a PRelu kink changes the slope, not the value), so only rounding separates them: ≤ 52
    // accumulations deep (IResNet-50), each of K ≤ 9·512 = 4608 products (the FC layer 25 088)
    // with an f32 error ≲ √K·u ≈ 4e-6 (1e-5) relative to the terms' root-sum-square, in any
    // order: ≲ 52 · 4e-6 ≈ 2.5e-4 of the output scale. Hence max |Δy| ≤ 1e-3 · max(|y|, 1)
    // (4× that worst estimate; measured 1.1e-6 for IResNet-50), and 1 − cos ≈ ½ (|Δy|/|y|)²
    // ≤ 3e-8, so cos ≥ 0.99999 (measured 1 − cos = 4e-13). 0.999 is the bar.
    assert!(cos >= 0.999, "[{what}] cosine {cos} < 0.999");
    assert!(cos >= 0.99999, "[{what}] cosine {cos}: f32 on both sides should agree far better than the 0.999 bar");
    assert!(d <= 1e-3 * scale.max(1.0), "[{what}] max |diff| {d} vs scale {scale}");
}

#[test]
fn reader_matches_onnx_package() {
    let Some(python) = python_or_skip("reader_matches_onnx_package") else { return };
    let dir = tempfile::tempdir().unwrap();
    oracle(&python, &["tiny"], dir.path());
    let meta = json(&dir.path().join("tiny.json"));
    let m = onnx_proto::load(&dir.path().join("tiny.onnx")).unwrap();
    assert_eq!(m.opset(), Some(17));
    let g = &m.graph;
    for (name, want) in meta["initializers"].as_object().unwrap() {
        let t = g.initializers.iter().find(|t| &t.name == name).unwrap_or_else(|| panic!("initializer {name} missing"));
        let dims: Vec<i64> = want["dims"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(t.dims, dims, "{name}");
        if let Some(v) = want.get("values") {
            let v: Vec<f32> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(t.as_f32().unwrap(), v.as_slice(), "{name}");
        } else {
            let v: Vec<i64> = want["int64"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            assert_eq!(t.as_i64().unwrap(), v.as_slice(), "{name}");
        }
    }
    let nodes = meta["nodes"].as_array().unwrap();
    assert_eq!(g.nodes.len(), nodes.len());
    for (n, w) in g.nodes.iter().zip(nodes) {
        assert_eq!(n.name, w["name"].as_str().unwrap());
        assert_eq!(n.op_type, w["op_type"].as_str().unwrap());
        let ins: Vec<&str> = w["inputs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(n.inputs, ins);
    }
    let conv = &g.nodes[0];
    assert_eq!(conv.attr_ints("kernel_shape"), Some(&[1i64, 1][..]));
    assert_eq!(conv.attr_ints("pads"), Some(&[0i64, 0, 0, 0][..]));
    assert_eq!(conv.attr_int("group"), Some(1));
    let gemm = &g.nodes[3];
    assert_eq!(gemm.attr_float("alpha"), Some(1.0));
    assert_eq!(gemm.attr_int("transB"), Some(1));
    assert_eq!(g.nodes[4].attr_float("alpha"), Some(0.125));
    assert_eq!(g.inputs.len(), 1);
    assert_eq!(g.inputs[0].name, "x");
    assert_eq!(
        g.inputs[0].shape.as_deref(),
        Some(&[Dim::Symbolic("N".into()), Dim::Fixed(3), Dim::Fixed(2), Dim::Fixed(2)][..])
    );
    assert_eq!(g.outputs[0].name, "y");

    // External data: a clear error naming the file.
    let ext = dir.path().join("tiny_external.onnx");
    let e = onnx_proto::load(&ext).unwrap_err();
    assert!(e.contains("external data not supported") && e.contains("tiny_external.onnx"), "{e}");
    // Garbage and truncation name the file.
    let bad = dir.path().join("truncated.onnx");
    let bytes = std::fs::read(dir.path().join("tiny.onnx")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let e = onnx_proto::load(&bad).unwrap_err();
    assert!(e.contains("truncated.onnx"), "{e}");
    // The tiny graph uses LeakyRelu etc.; an unknown operator is refused at load with its name.
    let mut m2 = m.clone();
    m2.graph.nodes[1].op_type = "Softmax".into();
    let err = OnnxNet::from_model(&m2, "mem.onnx", Device::Cpu).err().expect("Softmax must be refused");
    assert!(err.contains("mem.onnx") && err.contains("Softmax") && err.contains("mul0"), "{err}");
}

#[test]
fn small_iresnet_matches_onnxruntime() {
    let Some(python) = python_or_skip("small_iresnet_matches_onnxruntime") else { return };
    check_parity(&small(&python), "IResNet[1,1,1,1]");
}

#[test]
fn iresnet50_matches_onnxruntime() {
    let Some(python) = python_or_skip("iresnet50_matches_onnxruntime") else { return };
    let dir = export(&python, "r50", &["--layers", "3,4,14,3", "--batch", "2", "--seed", "5"]);
    check_parity(&dir, "IResNet-50");
}

/// Deterministic pseudo-random values in [0, 1).
fn uniform(n: usize, seed: u64) -> Vec<f64> {
    likeness_sdk::testing::uniform(seed, n)
}

/// Checks `grad` of `f` at the flat indices `probe` against central differences of step `eps`.
fn fd_check(what: &str, x: &Tensor, grad: &Tensor, probe: &[i64], eps: f64, f: &dyn Fn(&Tensor) -> f64) {
    let gmax = grad.abs().max().double_value(&[]);
    let g = to_vec(grad);
    let mut worst = 0f64;
    for &i in probe {
        let bump = |d: f64| {
            let y = x.copy();
            let flat = y.view([-1]);
            let _ = flat.get(i).fill_(x.view([-1]).get(i).double_value(&[]) + d);
            f(&y)
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        let err = (fd - g[i as usize]).abs();
        worst = worst.max(err / gmax);
        // f64 central differences: truncation h²·|f⁽³⁾|/6 and rounding ≈ u64·|f|/h
        // (1e-16 / 1e-3 = 1e-13 absolute against max|grad| ≈ 1e-6..1e-4, i.e. ≤ 1e-7 relative);
        // the curvature comes from the normalisation only (the rest is piecewise linear), so the
        // truncation is far smaller too (measured ≤ 2e-7 relative in all). A PRelu kink within
        // ±h of a probe would make FD straddle two slopes; ±h moves a pre-activation by ~1e-5 of
        // its spread, so that is improbable, and as every number here is f64 (the CPU's summation
        // order moves it by ~1e-16 relative) it happens on every machine or on none.
        assert!(err <= 1e-5 * gmax, "[{what}] pixel {i}: autograd {} vs FD {fd} (max |grad| {gmax})", g[i as usize]);
    }
    eprintln!("[{what}] {} probes: max |autograd − FD| / max|grad| = {worst:.2e} (max |grad| {gmax:.3e})", probe.len());
}

/// Probe indices: the largest-|grad| entries and some spread ones.
fn probes(grad: &Tensor, n_top: i64, n_spread: usize, seed: u64) -> Vec<i64> {
    let flat = grad.abs().view([-1]);
    let (_, top) = flat.topk(n_top, 0, true, true);
    let mut v: Vec<i64> = Vec::try_from(&top).unwrap();
    let n = flat.size()[0] as f64;
    v.extend(uniform(n_spread, seed).into_iter().map(|u| (u * n) as i64));
    v
}

/// `∂/∂x Σ w · normalize(net(x))` by autograd, in the net's kind.
fn input_gradient(net: &OnnxNet, x: &Tensor, w: &Tensor) -> Tensor {
    let k = net.kind();
    let xg = x.to_kind(k).set_requires_grad(true);
    let s = (l2_normalize(&net.forward(&xg).unwrap()) * w.to_kind(k)).sum(k);
    Tensor::run_backward(&[&s], &[&xg], false, false).pop().unwrap()
}

#[test]
fn input_gradient_matches_finite_differences() {
    let Some(python) = python_or_skip("input_gradient_matches_finite_differences") else { return };
    let dir = small(&python);
    let path = dir.join("model.onnx");
    let model = onnx_proto::load(&path).unwrap();
    let net64 = OnnxNet::from_model(&model, "model.onnx", Device::Cpu).unwrap().with_kind(Kind::Double);
    let net32 = OnnxNet::from_model(&model, "model.onnx", Device::Cpu).unwrap();
    let x = tensor(&read_f32(&dir.join("input.f32")), &[2, 3, 112, 112]).get(0).unsqueeze(0).to_kind(Kind::Double);
    let w = Tensor::from_slice(&uniform(512, 9).iter().map(|u| u - 0.5).collect::<Vec<_>>()).reshape([1, 512]);
    // Scalar: Σ w · normalize(emb(x)).
    let f = |x: &Tensor| {
        tch::no_grad(|| (l2_normalize(&net64.forward(x).unwrap()) * &w).sum(Kind::Double).double_value(&[]))
    };
    let g = input_gradient(&net64, &x, &w);
    fd_check("iresnet f64 input grad", &x, &g, &probes(&g, 4, 6, 1), 1e-3, &f);

    // The f32 path (what the plugin runs) against f64.
    //
    // Compared as is, the two gradients differ by several 1e-3 · max|g| at a few dozen pixels
    // (2.64e-3 on an AMD EPYC and on an Intel Xeon, both AVX-512, with the earlier weights w;
    // 8.7e-3 with these), and by < 1e-6 · max|g| everywhere else:
    // the net is piecewise linear, and a pre-activation that lies within f32 rounding of a PRelu
    // kink takes the slope 1 in one precision and the slope a in the other. Where that happens
    // is decided by the kernel's summation order (AVX2 vs AVX-512 blocks, thread splits), and a
    // flipped activation changes one of the ~9·C terms of every input gradient in its receptive
    // field by (1 − a)·|term| — a jump, not a rounding error, so no bound derived from f32
    // precision holds for that comparison on every machine.
    //
    // So the comparison is made well-conditioned: (1) every pre-activation is checked against
    // f64 (a flip can then only happen at |z| ≤ |z32 − z64|, i.e. within rounding of the kink),
    // and (2) the f32 gradient is compared with the f64 gradient of the same activation
    // pattern (the PRelus replaced by the f32 pass's derivative masks), which is a fixed
    // linear map with no kink left for rounding to fall on.
    // (The cut nets run the same nodes with the same kernels as `net32`: the same f32 values.)
    let pre = pre_activations(&model, &x.to_kind(Kind::Float), &x);
    let flips = check_pre_activations("iresnet", &pre);
    let masked = with_activation_pattern(&model, &pre);
    let net64p = OnnxNet::from_model(&masked, "model.onnx (f32 activation pattern)", Device::Cpu)
        .unwrap()
        .with_kind(Kind::Double);
    let g64p = input_gradient(&net64p, &x, &w);
    let g32 = input_gradient(&net32, &x, &w).to_kind(Kind::Double);
    let gmax = g64p.abs().max().double_value(&[]);
    let rel = (&g32 - &g64p).abs().max().double_value(&[]) / gmax;
    let rel_l2 = (&g32 - &g64p).norm().double_value(&[]) / g64p.norm().double_value(&[]);
    let raw = (&g32 - &g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]);
    let kinks = (&g64p - &g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]);
    eprintln!(
        "[iresnet f32 input grad] vs f64 with the same activation pattern: max |g32 − g64| / max|g64| = {rel:.2e} (L2 {rel_l2:.2e}); \
         vs plain f64: {raw:.2e}, of which the {flips} kink flip(s) account for {kinks:.2e}"
    );
    // The gradient is the f32 evaluation of that linear map: the forward pass above (≤ 12
    // accumulations, 5e-5), then the backward through the same layers in reverse plus the
    // fully connected layer (K = 512·7·7 = 25 088: √K·u = 1e-5) and the normalisation,
    // another ≈ 13 accumulations of K ≤ 9·512 terms: ≲ 25 · 4e-6 = 1e-4 relative to the
    // terms' magnitudes. The input gradient sums terms of both signs, so an entry is smaller
    // than the terms it is made of; max|g| is the scale that keeps this ratio O(1). Bound:
    // 1e-4 · max|g|, the estimate itself (measured 7e-7 on an AVX-512 Xeon: the √K estimate
    // is pessimistic, and reordering the sums changes the error by O(1) factors, not 100×).
    assert!(
        rel <= 1e-4,
        "f32 gradient differs from the f64 gradient of the same activation pattern by {rel} (max-norm, relative)"
    );
    // Without kink flips the masked net is the net itself.
    if flips == 0 {
        assert!(kinks <= 1e-12, "no activation changed side, yet the masked net's gradient differs by {kinks:e}");
    }

    // vjp() agrees with the manual backward on the raw embedding.
    let cot = Tensor::from_slice(&uniform(512, 4)).reshape([1, 512]);
    let (_, gv) = net64.vjp(&x, &cot).unwrap();
    let xg = x.copy().set_requires_grad(true);
    let s = (net64.forward(&xg).unwrap() * &cot).sum(Kind::Double);
    let gm = Tensor::run_backward(&[&s], &[&xg], false, false).pop().unwrap();
    // The same f64 graph evaluated twice in the same order: equal up to the libtorch kernel
    // choosing the same reduction (in practice bit-identical); 1e-12 absolute is ~1e7 ulps of
    // max|g| ≈ 5e-5 — any real difference would be many orders larger.
    assert!((gv - gm).abs().max().double_value(&[]) <= 1e-12);
}

/// A smooth image with edges, 0..255, `[1, 3, h, w]` in f64.
fn test_image(h: usize, w: usize) -> (Vec<f32>, Tensor) {
    let v: Vec<f32> = (0..3 * h * w)
        .map(|i| {
            let (k, y, x) = (i / (h * w), (i / w) % h, i % w);
            let s = 0.5 + 0.4 * ((x as f32 * 0.11 + k as f32).sin() * (y as f32 * 0.05 + 0.3 * k as f32).cos());
            255.0 * s * if (x / 13 + y / 17) % 2 == 0 { 1.0 } else { 0.85 }
        })
        .collect();
    let t = Tensor::from_slice(&v).reshape([1, 3, h as i64, w as i64]).to_kind(Kind::Double);
    (v, t)
}

#[test]
fn pixels_to_cosine_chain_matches_finite_differences() {
    let Some(python) = python_or_skip("pixels_to_cosine_chain_matches_finite_differences") else { return };
    let dir = small(&python);
    let net = OnnxNet::load(&dir.join("model.onnx"), Device::Cpu).unwrap().with_kind(Kind::Double);
    let (h, w) = (170usize, 150usize);
    let (src, px) = test_image(h, w);
    // Landmarks found "without gradient": the template, scaled, rotated and moved into the image.
    let (s, r, tx, ty) = (1.05f32, 0.12f32, 20.0f32, 30.0f32);
    let lmk: [[f32; 2]; 5] = std::array::from_fn(|i| {
        let [x, y] = ARCFACE_DST[i];
        [s * (r.cos() * x - r.sin() * y) + tx, s * (r.sin() * x + r.cos() * y) + ty]
    });
    let m = align::estimate_norm(&lmk, 112).unwrap();

    // The differentiable crop equals the reference float warp (0..255 image).
    let crop = diff_align::align_crops(&px.to_kind(Kind::Float), &[m], 112, 112).unwrap();
    let want = align::warp_affine_chw_f32(&src, 3, h, w, &m, 112, 112);
    let got: Vec<f32> = Vec::try_from(crop.flatten(0, -1)).unwrap();
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("[diff_align] grid_sample crop vs warp_affine_chw_f32 on a 0..255 image: max |diff| {d:.2e}");
    // Both bilinear in f32, no reductions: the sampling points differ by a few ulps of source
    // coordinates ≤ 170 px (ulp 1.5e-5 px), times the image's steepest slope (its checker edges,
    // ≈ 35 grey levels/px) ≈ 2e-3, plus value rounding 255·u ≈ 2e-5. Bound 1e-4 · 255 = 2.6e-2
    // (the 0..1 bound of the unit test, scaled; measured 4.6e-4).
    assert!(d <= 1e-4 * 255.0, "crop differs from the float warp by {d}");

    // Loss: cosine between the embedding of the aligned crop and a fixed reference embedding.
    let reference =
        tch::no_grad(|| net.forward(&tensor(&read_f32(&dir.join("input.f32")), &[2, 3, 112, 112]).get(1).unsqueeze(0)))
            .unwrap()
            .to_kind(Kind::Double);
    let f = |p: &Tensor| {
        tch::no_grad(|| {
            let c = diff_align::align_crops(p, &[m], 112, 112).unwrap();
            cosine_rows(&net.forward(&c).unwrap(), &reference).sum(Kind::Double).double_value(&[])
        })
    };
    let pg = px.copy().set_requires_grad(true);
    let c = diff_align::align_crops(&pg, &[m], 112, 112).unwrap();
    let cos = cosine_rows(&net.forward(&c).unwrap(), &reference).sum(Kind::Double);
    let g = Tensor::run_backward(&[&cos], &[&pg], false, false).pop().unwrap();
    // Pixels outside the crop's footprint get exactly zero gradient; inside, FD agrees.
    let nz = g.ne(0.0).sum(Kind::Int64).int64_value(&[]);
    eprintln!("[chain] cosine {:.6}; {nz} of {} pixels have a gradient", cos.double_value(&[]), 3 * h * w);
    assert!(nz > 0 && (nz as usize) < 3 * h * w);
    assert_eq!(
        g.get(0).get(0).get(0).get(0).double_value(&[]),
        0.0,
        "a corner pixel outside the crop has zero gradient"
    );
    fd_check("pixels → diff_align → iresnet → cosine (f64)", &px, &g, &probes(&g, 4, 8, 2), 1e-3, &f);
}

/// The `precision = "bf16"` recognizer (bf16 weights and activations, channels-last, oneDNN's
/// AVX512_BF16 kernels) against onnxruntime-python f32 on the same IResNet-50 file.
///
/// Bound, from bf16's 8-bit significand (unit roundoff u = 2⁻⁸ ≈ 3.9e-3): a bf16 run rounds
/// every node's output and every weight tensor once (R roundings, counted on the graph:
/// [`OnnxNet::rounding_counts`]; oneDNN accumulates each dot product in f32, ~2⁻²⁴, negligible).
/// Each rounding perturbs its tensor by ≤ u relative, with signs independent across elements
/// and roundings, so the relative error of the output adds in quadrature: ‖Δy‖/‖y‖ ≲ √R·u
/// (the forward is continuous, a PRelu kink changes the slope, not the value). Only the part of
/// Δy orthogonal to y moves the cosine: 1 − cos ≤ ½(√R·u)². For IResNet-50 R = 130 nodes +
/// 105 weights = 235 → 1 − cos ≤ 1.8e-3 (a PRelu node rounds once: its clamps are exact and one
/// of its two summands is zero). Measured 1 − cos = 3.1e-5, max |Δy| 9.3e-3 of max |y| 1.34.
#[test]
fn iresnet50_bf16_matches_onnxruntime_f32() {
    if !likeness_plugin_arcface::bf16::cpu_has_bf16() {
        eprintln!(
            "skipped: iresnet50_bf16_matches_onnxruntime_f32 needs a CPU with AVX512_BF16 (this one has none; \
             precision = \"auto\" runs fp32 here)"
        );
        return;
    }
    let Some(python) = python_or_skip("iresnet50_bf16_matches_onnxruntime_f32") else { return };
    let dir = export(&python, "r50", &["--layers", "3,4,14,3", "--batch", "2", "--seed", "5"]);
    let meta = json(&dir.join("meta.json"));
    let shape: Vec<i64> = meta["input_shape"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let x = tensor(&read_f32(&dir.join("input.f32")), &shape);
    let y_ort = tensor(&read_f32(&dir.join("ort.f32")), &[shape[0], -1]);
    let net = OnnxNet::load(&dir.join("model.onnx"), Device::Cpu).unwrap().with_kind(Kind::BFloat16).channels_last();
    assert_eq!(net.kind(), Kind::BFloat16);
    let y = tch::no_grad(|| net.forward(&x)).unwrap();
    assert_eq!(y.kind(), Kind::BFloat16, "the net must compute in bf16");
    let (cos, d, scale) = compare(&y.to_kind(Kind::Float), &y_ort);
    let (nodes, weighted) = net.rounding_counts();
    let r = (nodes + weighted) as f64;
    let u = 2f64.powi(-8);
    let bound = 0.5 * r * u * u;
    eprintln!(
        "[IResNet-50 bf16] min cosine to ORT f32 {cos:.6} (1−cos = {:.2e}; bound ½·R·u² = {bound:.2e}, R = {nodes} nodes + \
         {weighted} weights); max |Δy| {d:.3e} (max |y| {scale:.3})",
        1.0 - cos
    );
    assert!(1.0 - cos <= bound, "bf16 cosine {cos}: 1 − cos exceeds ½·R·u² = {bound:.2e}");
    // The bf16 path really rounds: 8-bit significands leave errors of ~u relative on the
    // outputs, far above the ~1e-6 at which two f32 runs agree (see `check_parity`).
    assert!(d > 1e-4 * scale, "max |Δy| {d} vs max |y| {scale}: indistinguishable from f32 — is bf16 in effect?");
}
