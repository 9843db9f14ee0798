//! The `arcface` metric's differentiable path (`differentiable_backend = "tch"`): `embed(Train)`
//! (SCRFD landmarks without gradient → `grid_sample` crops of the float pixels → the IResNet
//! rebuilt in libtorch from the same ONNX file) against `embed(Eval)` (the ONNX Runtime
//! pipeline), and `backward` against central finite differences, directly and through the
//! exported ABI module. Models: scripts/make_face_models.py (random weights); images: a real
//! photo from $LIKENESS_DATA cropped around the detected face and resized to 160×160, plus an
//! all-black image (no face).
//!
//! Tolerances:
//! * Train vs Eval: cosine ≥ 0.999 per valid row (the bar). The two differ only by the
//!   `u8` rounding of the ORT crop (OpenCV's warp rounds to grey levels; `grid_sample` does not)
//!   and f32 summation order.
//! * Gradients (f64 net, `differentiable_precision = "f64"`): central differences with step
//!   1e-5 (0.00255 grey levels, far below the 0.5/255 that could change the `u8` image the
//!   detector sees, so the landmarks stay fixed — checked); |FD − autograd| ≤ 1e-4 · max|grad|.
//! * Through the ABI (f32 net, the default): d_pixels equals the f64 autograd gradient to ≤ 1e-2
//!   relative in max-norm (f32 through 24+ layers), and a central difference on the f32
//!   embeddings the ABI returns, along a random ±1 direction over every pixel (step 0.05/255, so
//!   the `u8` image and the landmarks do not move), agrees with ⟨d_pixels, direction⟩ to ≤ 1e-2
//!   relative (measured 2e-3; at step 0.4/255 the whole-image move is 0.43 in L2 and the curvature
//!   gives 2.6 %). Single-pixel differences through the f32 ABI (step 0.4/255) are printed, not
//!   asserted: L moves by ~1e-5 there while the f32 net's rounding noise in L is ~1e-6 (measured
//!   up to 50 % error on the smallest probe gradient, ~5 % relative to the largest).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use likeness_plugin_arcface::align::{invert_affine, Affine};
use likeness_plugin_arcface::plugin::ArcFaceMetric;
use likeness_plugin_arcface::recognizer::cosine;
use likeness_sdk::abi::MetricPluginModRef;
use likeness_sdk::abi_stable::std_types::RStr;
use likeness_sdk::{CpuTensor, Device, ErrorCode, ForwardMode, MetricPlugin};
use tch::{Kind, Tensor};

const SIDE: usize = 160;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `<tmp>/buffalo_l/` generated once per depth per test binary.
fn models(depth: &'static str) -> PathBuf {
    static TINY: OnceLock<tempfile::TempDir> = OnceLock::new();
    static R50: OnceLock<tempfile::TempDir> = OnceLock::new();
    let cell = if depth == "r50" { &R50 } else { &TINY };
    cell.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let o = Command::new(python())
            .arg(repo().join("scripts/make_face_models.py"))
            .args(["--out", tmp.path().to_str().unwrap(), "--depth", depth])
            .output()
            .expect("cannot start LIKENESS_PYTHON");
        assert!(o.status.success(), "make_face_models.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
        tmp
    })
    .path()
    .to_path_buf()
}

fn config(root: &Path, extra: serde_json::Value) -> String {
    let mut c = serde_json::json!({"model_root": root, "det_size": 160});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

/// A real photo, cropped to a square around the face the (generated) detector finds and resized
/// to 160×160, as `[3, 160, 160]` planes in [0, 1] (exact multiples of 1/255).
fn face_planes(root: &Path) -> Vec<f32> {
    let path = data_dir().join("photos/face_recognition/obama.jpg");
    let (rgb, w, h) = read_rgb(&path);
    let mut m = ArcFaceMetric::create(&config(root, serde_json::json!({"det_size": 640})), Device::CPU, 0).unwrap();
    let faces = m.pipeline.analyze(&rgb, w, h, 1, 0).unwrap();
    let b = faces.first().expect("the generated detector finds a face in obama.jpg").det.bbox;
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    let side = ((b[2] - b[0]).max(b[3] - b[1]) * 2.0).min(w.min(h) as f32);
    let x0 = (cx - side / 2.0).clamp(0.0, w as f32 - side) as u32;
    let y0 = (cy - side / 2.0).clamp(0.0, h as f32 - side) as u32;
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb).unwrap();
    let crop = image::imageops::crop_imm(&img, x0, y0, side as u32, side as u32).to_image();
    let small = image::imageops::resize(&crop, SIDE as u32, SIDE as u32, image::imageops::FilterType::Triangle);
    let raw = small.into_raw();
    let plane = SIDE * SIDE;
    let mut planes = vec![0f32; 3 * plane];
    for p in 0..plane {
        for c in 0..3 {
            planes[c * plane + p] = raw[p * 3 + c] as f32 / 255.0;
        }
    }
    planes
}

/// `[face, black]`: `[2, 3, 160, 160]`.
fn batch(root: &Path) -> CpuTensor<f32> {
    let face = face_planes(root);
    let black = vec![0f32; face.len()];
    CpuTensor::new(vec![2, 3, SIDE as i64, SIDE as i64], [face, black].concat())
}

fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Eight probe pixels (flat indices into `[3, H, W]` of image 0) inside the face: crop points
/// around eyes, nose, mouth mapped back through the alignment matrix.
fn probes(m: &Affine) -> Vec<usize> {
    let inv = invert_affine(m);
    let pts = [(56.0, 56.0), (40.0, 52.0), (72.0, 52.0), (56.0, 72.0), (44.0, 90.0), (68.0, 90.0), (30.0, 35.0), (82.0, 80.0)];
    pts.iter()
        .enumerate()
        .map(|(k, &(x, y))| {
            let sx = (inv[0][0] * x + inv[0][1] * y + inv[0][2]).round().clamp(0.0, SIDE as f64 - 1.0) as usize;
            let sy = (inv[1][0] * x + inv[1][1] * y + inv[1][2]).round().clamp(0.0, SIDE as f64 - 1.0) as usize;
            (k % 3) * SIDE * SIDE + sy * SIDE + sx
        })
        .collect()
}

fn train_vs_eval(depth: &'static str) {
    let root = models(depth);
    let x = batch(&root);
    let mut m = ArcFaceMetric::create(&config(&root, serde_json::json!({})), Device::CPU, 0).unwrap();
    assert!(ArcFaceMetric::descriptor().capabilities.differentiable);
    let t0 = std::time::Instant::now();
    let tr = m.embed(&x.view(), ForwardMode::Train).unwrap();
    let t_train = t0.elapsed();
    let t0 = std::time::Instant::now();
    let ev = m.embed(&x.view(), ForwardMode::Eval).unwrap();
    let t_eval = t0.elapsed();
    let (te, tv) = (CpuTensor::<f32>::from_managed(&tr.embeddings, "e").unwrap(), CpuTensor::<u8>::from_managed(&tr.valid, "v").unwrap());
    let (ee, ev) = (CpuTensor::<f32>::from_managed(&ev.embeddings, "e").unwrap(), CpuTensor::<u8>::from_managed(&ev.valid, "v").unwrap());
    assert_eq!(tv.data, vec![1, 0], "a face in the photo, none in black (Train)");
    assert_eq!(ev.data, vec![1, 0], "a face in the photo, none in black (Eval)");
    assert_eq!(te.shape, ee.shape);
    let d = te.shape[1] as usize;
    let c = cosine(&te.data[..d], &ee.data[..d]);
    let n: f64 = te.data[..d].iter().map(|&v| v as f64 * v as f64).sum();
    eprintln!("arcface tch (Train) vs ORT (Eval), {depth}, 160×160: cosine {c:.8}; |emb| {n:.6}; Train {t_train:?}, Eval {t_eval:?}");
    assert!(c >= 0.999, "Train vs Eval cosine {c} < 0.999");
    assert!((n - 1.0).abs() < 1e-5);
    assert!(te.data[d..].iter().all(|&v| v == 0.0) && ee.data[d..].iter().all(|&v| v == 0.0));
}

#[test]
fn train_matches_eval_r_tiny() {
    train_vs_eval("r-tiny");
}

#[test]
fn train_matches_eval_r50() {
    train_vs_eval("r50");
}

/// L = Σ w·emb over the valid rows, in f64, at pixels `x` (`[2, 3, H, W]`), with the landmarks
/// (matrices) of the unperturbed image.
fn loss_f64(m: &mut ArcFaceMetric, x: &[f64], faces: &[(usize, Affine)], w: &[f32], d: usize) -> f64 {
    let t = Tensor::from_slice(x).reshape([2, 3, SIDE as i64, SIDE as i64]);
    let e = m.diff_recognizer().unwrap().embed_faces(&t, faces).unwrap();
    let e = Vec::<f64>::try_from(&e.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    faces.iter().enumerate().map(|(k, (i, _))| (0..d).map(|j| e[k * d + j] * w[i * d + j] as f64).sum::<f64>()).sum()
}

/// The analytic gradient of the f64 net (through the plugin's `embed(Train)` + `backward`) and
/// its check by central differences. Returns (d_pixels, probes, w).
fn f64_gradient(root: &Path, x: &CpuTensor<f32>) -> (Vec<f32>, Vec<usize>, Vec<f32>) {
    let mut m = ArcFaceMetric::create(&config(root, serde_json::json!({"differentiable_precision": "f64"})), Device::CPU, 0).unwrap();
    let out = m.embed(&x.view(), ForwardMode::Train).unwrap();
    let emb = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
    let d = emb.shape[1] as usize;
    let w = weights(2 * d, 7);
    let g = CpuTensor::new(vec![2, d as i64], w.clone());
    let dx = m.backward(&g.view()).unwrap();
    let dx = CpuTensor::<f32>::from_managed(&dx, "dx").unwrap();
    assert_eq!(dx.shape, vec![2, 3, SIDE as i64, SIDE as i64]);
    let per = 3 * SIDE * SIDE;
    assert!(dx.data[per..].iter().all(|&v| v == 0.0), "no face in image 1: zero gradient");
    assert!(dx.data[..per].iter().any(|&v| v != 0.0));

    let ms = m.face_matrices(&x.data, 2, SIDE, SIDE).unwrap();
    assert!(ms[1].is_none());
    let faces = vec![(0usize, ms[0].unwrap())];
    let probes = probes(&faces[0].1);
    let x64: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
    let eps = 1e-5;
    let (mut worst, mut gmax) = (0f64, 0f64);
    for &p in &probes {
        let mut xp = x64.clone();
        xp[p] += eps;
        // The perturbation does not move the landmarks (the u8 image is unchanged).
        let xf: Vec<f32> = xp.iter().map(|&v| v as f32).collect();
        assert_eq!(m.face_matrices(&xf, 2, SIDE, SIDE).unwrap()[0], ms[0]);
        let up = loss_f64(&mut m, &xp, &faces, &w, d);
        xp[p] -= 2.0 * eps;
        let down = loss_f64(&mut m, &xp, &faces, &w, d);
        let fd = (up - down) / (2.0 * eps);
        let an = dx.data[p] as f64;
        eprintln!("  f64 probe {p}: autograd {an:+.6e}, FD {fd:+.6e}");
        worst = worst.max((fd - an).abs());
        gmax = gmax.max(an.abs());
    }
    eprintln!("arcface tch backward (f64, r-tiny): max |FD − autograd| {worst:.3e}, max |grad| {gmax:.3e} at 8 face pixels");
    assert!(gmax > 0.0);
    assert!(worst <= 1e-4 * gmax, "FD {worst:e} vs grad {gmax:e}");
    (dx.data, probes, w)
}

#[test]
fn backward_matches_finite_differences_directly_and_through_the_abi() {
    let root = models("r-tiny");
    let x = batch(&root);
    let (g64, probes, w) = f64_gradient(&root, &x);

    // Through the exported module (f32 net, default config).
    let m: MetricPluginModRef = likeness_plugin_arcface::__likeness_root_module();
    assert!(m.descriptor()().capabilities.differentiable);
    let cfg = config(&root, serde_json::json!({}));
    let h = m.create()(RStr::from(cfg.as_str()), Device::CPU, 0).unwrap();
    let d = w.len() / 2;
    let gw = CpuTensor::new(vec![2, d as i64], w.clone());
    assert_eq!(m.backward()(h, gw.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    let mut px = CpuTensor::new(x.shape.clone(), x.data.clone());
    let out = m.embed()(h, px.view(), ForwardMode::Train).unwrap();
    assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![1, 0]);
    // An Eval embed in between leaves the pending Train state alone; the host may reuse its buffer.
    let _ = m.embed()(h, px.view(), ForwardMode::Eval).unwrap();
    px.data.fill(0.5);
    let wrong = CpuTensor::new(vec![2, 5], vec![0.1f32; 10]);
    assert_eq!(m.backward()(h, wrong.view()).unwrap_err().code, ErrorCode::InvalidInput);
    let dx = m.backward()(h, gw.view()).unwrap();
    let dx = CpuTensor::<f32>::from_managed(&dx, "dx").unwrap();
    assert_eq!(dx.shape, x.shape);
    assert_eq!(m.backward()(h, gw.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    let per = 3 * SIDE * SIDE;
    assert!(dx.data[per..].iter().all(|&v| v == 0.0));
    let (mut diff, mut gmax) = (0f64, 0f64);
    for (a, b) in dx.data.iter().zip(&g64) {
        diff = diff.max((*a as f64 - *b as f64).abs());
        gmax = gmax.max((*b as f64).abs());
    }
    eprintln!("arcface ABI backward (f32) vs f64 autograd: max |diff| {diff:.3e} (max |grad| {gmax:.3e}, rel {:.3e})", diff / gmax);
    assert!(diff <= 1e-2 * gmax);

    // FD on the f32 embeddings the ABI returns.
    let loss = |xs: &[f32]| -> f64 {
        let t = CpuTensor::new(x.shape.clone(), xs.to_vec());
        let o = m.embed()(h, t.view(), ForwardMode::Train).unwrap();
        let e = CpuTensor::<f32>::from_managed(&o.embeddings, "e").unwrap();
        e.data.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let step = 0.05f32 / 255.0;
    // Along a random ±1 direction over all pixels.
    let dir: Vec<f32> = weights(x.data.len(), 11).into_iter().map(|v| if v >= 0.0 { 1.0 } else { -1.0 }).collect();
    let plus: Vec<f32> = x.data.iter().zip(&dir).map(|(a, v)| a + step * v).collect();
    let minus: Vec<f32> = x.data.iter().zip(&dir).map(|(a, v)| a - step * v).collect();
    // The actual (f32-rounded) displacement, per pixel: ⟨grad, plus − minus⟩ is the prediction.
    let pred: f64 = dx.data.iter().zip(plus.iter().zip(&minus)).map(|(g, (p, q))| *g as f64 * (*p as f64 - *q as f64)).sum();
    let fd = loss(&plus) - loss(&minus);
    let rel = (fd - pred).abs() / pred.abs();
    eprintln!("arcface ABI (f32) backward vs FD along a ±1 direction (step 0.05/255): ΔL {fd:+.6e}, predicted {pred:+.6e}, rel err {rel:.3e}");
    assert!(rel <= 1e-2, "directional FD {fd:e} vs backward {pred:e}");
    for &p in &probes {
        let mut xp = x.data.clone();
        xp[p] = x.data[p] + 0.4 / 255.0;
        let hi = xp[p] as f64;
        let up = loss(&xp);
        xp[p] = x.data[p] - 0.4 / 255.0;
        let lo = xp[p] as f64;
        let down = loss(&xp);
        eprintln!("  ABI probe {p} (not asserted, f32 noise): backward {:+.6e}, FD {:+.6e}", dx.data[p], (up - down) / (hi - lo));
    }
    m.destroy()(h);
}

#[test]
fn no_face_gives_invalid_zero_embedding_and_zero_gradient() {
    let root = models("r-tiny");
    let mut m = ArcFaceMetric::create(&config(&root, serde_json::json!({})), Device::CPU, 0).unwrap();
    let x = CpuTensor::new(vec![1, 3, 64, 64], vec![0f32; 3 * 64 * 64]);
    let out = m.embed(&x.view(), ForwardMode::Train).unwrap();
    let e = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
    assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![0]);
    assert!(e.shape[1] > 0 && e.data.iter().all(|&v| v == 0.0));
    let g = CpuTensor::new(e.shape.clone(), vec![1.0f32; e.data.len()]);
    let dx = CpuTensor::<f32>::from_managed(&m.backward(&g.view()).unwrap(), "dx").unwrap();
    assert_eq!(dx.shape, vec![1, 3, 64, 64]);
    assert!(dx.data.iter().all(|&v| v == 0.0));
    // `differentiable_backend: "none"`: Train runs ORT, backward is unsupported.
    let mut n = ArcFaceMetric::create(&config(&root, serde_json::json!({"differentiable_backend": "none"})), Device::CPU, 0).unwrap();
    n.embed(&x.view(), ForwardMode::Train).unwrap();
    assert_eq!(n.backward(&g.view()).unwrap_err().code, ErrorCode::Unsupported);
}
