//! Parity with dlib-bin (tests/python/dlib_oracle.py) on the real photos of $LIKENESS_DATA/faces:
//! the same decoded pixels and the same detector rectangles go through our shape predictor.

use likeness_plugin_dlib_face::shape_predictor::{Rect, RgbImage, ShapePredictor};
use likeness_sdk::testing;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Oracle {
    dir: tempfile::TempDir,
    json: Value,
}

/// Runs the oracle on the four photos; `None` (after a `skipped: <test> needs …` line, a panic
/// under `CI`) without the venv python (dlib-bin, face-recognition-models) or the photos.
fn oracle(test: &str) -> Option<Oracle> {
    let python = testing::python_or_skip(test)?;
    let faces = testing::data_path_or_skip(test, "faces")?;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/python/dlib_oracle.py")).arg("--out").arg(dir.path()).arg("--images");
    for n in ["obama", "obama2", "obama3", "biden"] {
        cmd.arg(faces.join(format!("{n}.jpg")));
    }
    let o = cmd.output().expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "dlib_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let json: Value = serde_json::from_slice(&o.stdout).expect("oracle JSON");
    Some(Oracle { dir, json })
}

#[test]
fn shape_predictor_matches_dlib() {
    let Some(o) = oracle("shape_predictor_matches_dlib") else { return };
    let sp =
        ShapePredictor::from_file(std::path::Path::new(o.json["models"]["shape_predictor"].as_str().unwrap())).unwrap();
    assert_eq!(sp.num_parts(), 5);
    let mut n = 0;
    let mut worst = 0i64;
    for im in o.json["images"].as_array().unwrap() {
        let name = im["name"].as_str().unwrap();
        let (w, h) = (im["width"].as_u64().unwrap() as usize, im["height"].as_u64().unwrap() as usize);
        let data = std::fs::read(o.dir.path().join(format!("{name}.rgb"))).unwrap();
        assert_eq!(data.len(), w * h * 3);
        let img = RgbImage { width: w, height: h, data: &data };
        let faces = im["faces"].as_array().unwrap();
        assert!(!faces.is_empty(), "dlib found no face in {name}");
        for f in faces {
            let r: Vec<i64> = f["rect"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let rect = Rect { left: r[0], top: r[1], right: r[2], bottom: r[3] };
            let ours = sp.predict(&img, rect);
            let theirs: Vec<[i64; 2]> = f["landmarks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| [p[0].as_i64().unwrap(), p[1].as_i64().unwrap()])
                .collect();
            for (a, b) in ours.iter().zip(&theirs) {
                worst = worst.max((a[0] - b[0]).abs()).max((a[1] - b[1]).abs());
            }
            eprintln!("{name} {rect:?}: ours {ours:?} dlib {theirs:?}");
            n += 1;
        }
    }
    eprintln!("shape predictor: {n} faces, max |ours − dlib| = {worst} px");
    // Exact: dlib rounds its landmarks to whole pixels, and the regression trees compare
    // pixel differences against thresholds in float; our scalar code does the same arithmetic.
    assert_eq!(worst, 0, "landmarks differ from dlib's");
}

/// The network alone: dlib's own 150×150 chip (dlib.get_face_chip, the chip
/// compute_face_descriptor uses) through our tch ResNet vs dlib's descriptor.
#[test]
fn resnet_on_dlib_chips_matches_dlib() {
    use likeness_plugin_dlib_face::resnet::FaceNet;
    let Some(o) = oracle("resnet_on_dlib_chips_matches_dlib") else { return };
    let net = FaceNet::from_file(std::path::Path::new(o.json["models"]["recognizer"].as_str().unwrap())).unwrap();
    let _g = tch::no_grad_guard();
    let mut worst = 0f64;
    let mut descs = Vec::new();
    for im in o.json["images"].as_array().unwrap() {
        let name = im["name"].as_str().unwrap();
        for (i, f) in im["faces"].as_array().unwrap().iter().enumerate() {
            let chip = std::fs::read(o.dir.path().join(format!("{name}_{i}.chip.rgb"))).unwrap();
            let t = tch::Tensor::from_slice(&chip).reshape([1, 150, 150, 3]);
            let d = net.forward(&net.normalize(&t)).to_kind(tch::Kind::Double);
            let ours: Vec<f64> = Vec::<f64>::try_from(d.flatten(0, -1)).unwrap();
            let theirs: Vec<f64> = f["descriptor"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(ours.len(), 128);
            let l2 = ours.iter().zip(&theirs).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
            eprintln!("{name}#{i}: L2(ours, dlib) = {l2:e}");
            worst = worst.max(l2);
            descs.push((name.to_string(), ours));
        }
    }
    eprintln!("resnet on dlib chips: max L2 = {worst:e}");
    for i in 0..descs.len() {
        for j in i + 1..descs.len() {
            let d = descs[i].1.iter().zip(&descs[j].1).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
            let genuine = descs[i].0.starts_with("obama") && descs[j].0.starts_with("obama");
            eprintln!("{} vs {}: {d:.4} ({})", descs[i].0, descs[j].0, if genuine { "genuine" } else { "impostor" });
            // dlib's own decision threshold (0.6), a property of the model, not a rounding bound.
            assert!(if genuine { d < 0.6 } else { d > 0.6 }, "{} vs {}: {d}", descs[i].0, descs[j].0);
        }
    }
    // Our libtorch f32 ResNet vs dlib's own f32 CPU network (different kernels and summation
    // orders on every CPU): 29 layers of K ≤ 9·256 = 2304 products, each ≲ √K·u ≈ 3e-6 relative
    // to the terms' root-sum-square, ≲ 1e-4 of the descriptor's length (≈ 1) in all; measured
    // 1e-6. Bound 1e-3 in L2 (the descriptors are compared by L2 at 0.6).
    assert!(worst <= 1e-3, "max L2 {worst}");
}

fn l2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
}

/// Our alignment (chip.rs) vs dlib.get_face_chip on dlib's own landmarks, then the full
/// path photo → our landmarks (dlib's rects) → our chip → our ResNet vs dlib's descriptor.
#[test]
fn chips_and_full_path_match_dlib() {
    use likeness_plugin_dlib_face::chip::get_face_chip;
    use likeness_plugin_dlib_face::resnet::FaceNet;
    let Some(o) = oracle("chips_and_full_path_match_dlib") else { return };
    let sp =
        ShapePredictor::from_file(std::path::Path::new(o.json["models"]["shape_predictor"].as_str().unwrap())).unwrap();
    let net = FaceNet::from_file(std::path::Path::new(o.json["models"]["recognizer"].as_str().unwrap())).unwrap();
    let _g = tch::no_grad_guard();
    let (mut worst_px, mut sum_px, mut n_px, mut n_off) = (0i32, 0f64, 0usize, 0usize);
    let mut worst_l2 = 0f64;
    let mut descs = Vec::new();
    for im in o.json["images"].as_array().unwrap() {
        let name = im["name"].as_str().unwrap();
        let (w, h) = (im["width"].as_u64().unwrap() as usize, im["height"].as_u64().unwrap() as usize);
        let data = std::fs::read(o.dir.path().join(format!("{name}.rgb"))).unwrap();
        let img = RgbImage { width: w, height: h, data: &data };
        for (i, f) in im["faces"].as_array().unwrap().iter().enumerate() {
            let theirs_lm: Vec<[i64; 2]> = f["landmarks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| [p[0].as_i64().unwrap(), p[1].as_i64().unwrap()])
                .collect();
            let dchip = std::fs::read(o.dir.path().join(format!("{name}_{i}.chip.rgb"))).unwrap();
            let ours = get_face_chip(&img, &theirs_lm, 150, 0.25);
            assert_eq!(ours.data.len(), dchip.len());
            let (mut mx, mut s, mut off) = (0i32, 0f64, 0usize);
            for (a, b) in ours.data.iter().zip(&dchip) {
                let d = (*a as i32 - *b as i32).abs();
                mx = mx.max(d);
                s += d as f64;
                off += (d != 0) as usize;
            }
            eprintln!(
                "{name}#{i} chip: max |ours − dlib| = {mx}, mean = {:.5}, {off}/{} values differ",
                s / dchip.len() as f64,
                dchip.len()
            );
            worst_px = worst_px.max(mx);
            sum_px += s;
            n_px += dchip.len();
            n_off += off;

            // Full path from the detector rectangle.
            let r: Vec<i64> = f["rect"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let lm = sp.predict(&img, Rect { left: r[0], top: r[1], right: r[2], bottom: r[3] });
            let chip = get_face_chip(&img, &lm, 150, 0.25);
            let t = tch::Tensor::from_slice(&chip.data).reshape([1, 150, 150, 3]);
            let d = net.forward(&net.normalize(&t)).to_kind(tch::Kind::Double);
            let ours: Vec<f64> = Vec::<f64>::try_from(d.flatten(0, -1)).unwrap();
            let theirs: Vec<f64> = f["descriptor"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let e = l2(&ours, &theirs);
            eprintln!("{name}#{i} full path: L2(ours, dlib) = {e:e}");
            worst_l2 = worst_l2.max(e);
            descs.push((name.to_string(), ours));
        }
    }
    eprintln!(
        "chips: max |Δ| = {worst_px}, mean |Δ| = {:.6}, {n_off}/{n_px} values differ; full path max L2 = {worst_l2:e}",
        sum_px / n_px as f64
    );
    for i in 0..descs.len() {
        for j in i + 1..descs.len() {
            let d = l2(&descs[i].1, &descs[j].1);
            let genuine = descs[i].0.starts_with("obama") && descs[j].0.starts_with("obama");
            eprintln!(
                "full path {} vs {}: {d:.4} ({})",
                descs[i].0,
                descs[j].0,
                if genuine { "genuine" } else { "impostor" }
            );
            assert!(if genuine { d < 0.6 } else { d > 0.6 }, "{} vs {}: {d}", descs[i].0, descs[j].0);
        }
    }
    // dlib-bin's compiled chip code interpolates bilinearly and rounds to u8; ours repeats its
    // arithmetic (measured identical). 1 grey level admits a value on the other side of a
    // rounding boundary should dlib's build evaluate an expression in another precision (FMA
    // contraction, a SIMD path chosen per CPU).
    assert!(worst_px <= 1, "chip differs from dlib's by {worst_px} grey levels");
    // As for the network alone (the chips being identical): ≲ 1e-4, measured 1e-6.
    assert!(worst_l2 <= 1e-3, "full path max L2 {worst_l2}");
}

/// The exported `dlib` metric through its root module, on each photo cropped around dlib's
/// detector rectangle (the `full-image` strategy: the crop is the face rectangle).
#[test]
fn exported_metric_on_face_crops() {
    use likeness_sdk::abi::MetricPluginModRef;
    use likeness_sdk::abi_stable::std_types::RStr;
    use likeness_sdk::{CpuTensor, Device, ErrorCode, ForwardMode};
    let Some(o) = oracle("exported_metric_on_face_crops") else { return };
    let m: MetricPluginModRef = likeness_plugin_dlib_face::__likeness_root_module();
    let desc = m.descriptor()();
    assert!(desc.capabilities.differentiable);
    let md = std::path::Path::new(o.json["models"]["recognizer"].as_str().unwrap()).parent().unwrap();
    // A missing file names itself, where it looked and the PyPI package.
    let bad = serde_json::json!({"model_dir": "/nonexistent-dlib-models"}).to_string();
    let e = m.create()(RStr::from(bad.as_str()), Device::CPU, 0).unwrap_err();
    assert!(
        e.message.contains("shape_predictor_5_face_landmarks.dat")
            && e.message.contains("/nonexistent-dlib-models")
            && e.message.contains("face-recognition-models"),
        "{}",
        e.message
    );
    // Face-centred crops: the whole crop is the face rectangle (tests/mtcnn_whole_photos.rs
    // covers the default MTCNN detection).
    let cfg = serde_json::json!({"model_dir": md, "detector": "none"}).to_string();
    let h = m.create()(RStr::from(cfg.as_str()), Device::CPU, 0).unwrap();
    // (margin as a fraction of the rect's side, per-photo embeddings and dlib's raw descriptors)
    for margin in [0.0f64, 0.25] {
        let mut embs: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
        for im in o.json["images"].as_array().unwrap() {
            let name = im["name"].as_str().unwrap();
            let (w, hh) = (im["width"].as_i64().unwrap(), im["height"].as_i64().unwrap());
            let data = std::fs::read(o.dir.path().join(format!("{name}.rgb"))).unwrap();
            let f = &im["faces"][0];
            let r: Vec<i64> = f["rect"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let g = ((r[2] - r[0] + 1) as f64 * margin).round() as i64;
            let (l, t) = ((r[0] - g).max(0), (r[1] - g).max(0));
            let (rr, b) = ((r[2] + g).min(w - 1), (r[3] + g).min(hh - 1));
            let (cw, ch) = ((rr - l + 1) as usize, (b - t + 1) as usize);
            let mut planes = vec![0f32; 3 * cw * ch];
            for y in 0..ch {
                for x in 0..cw {
                    for c in 0..3 {
                        let v = data[(((t as usize + y) * w as usize) + l as usize + x) * 3 + c];
                        planes[c * cw * ch + y * cw + x] = v as f32 / 255.0;
                    }
                }
            }
            let px = CpuTensor::new(vec![1, 3, ch as i64, cw as i64], planes);
            let out = m.embed()(h, px.view(), ForwardMode::Eval).unwrap();
            assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![1]);
            let e = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
            assert_eq!(e.shape, vec![1, 128]);
            // Train (tch graph, float chip) vs Eval (dlib's u8 chip).
            let tr = m.embed()(h, px.view(), ForwardMode::Train).unwrap();
            assert_eq!(CpuTensor::<u8>::from_managed(&tr.valid, "v").unwrap().data, vec![1]);
            let te = CpuTensor::<f32>::from_managed(&tr.embeddings, "e").unwrap();
            let cos_te: f64 = te.data.iter().zip(&e.data).map(|(a, b)| *a as f64 * *b as f64).sum();
            eprintln!("margin {margin}: {name} crop {cw}x{ch}: cos(Train, Eval) = {cos_te:.6}");
            // The bar. Train samples a float chip, Eval dlib's u8 chip (±0.5 grey
            // level, the same on every CPU); the f32 network rounding is ~1e-6. Measured
            // 1 − cos ≤ 1e-5.
            assert!(cos_te >= 0.999, "Train vs Eval cosine {cos_te}");
            let e: Vec<f64> = e.data.iter().map(|v| *v as f64).collect();
            let n = e.iter().map(|v| v * v).sum::<f64>().sqrt();
            // A 128-d embedding normalised in f32: ≤ 128·u/2 ≈ 4e-6 even for a sequential sum.
            assert!((n - 1.0).abs() < 1e-5, "norm {n}");
            let raw: Vec<f64> = f["descriptor"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let rn = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
            let cos_dlib: f64 = e.iter().zip(&raw).map(|(a, b)| a * b).sum::<f64>() / rn;
            eprintln!("margin {margin}: {name} crop {cw}x{ch}: cos(ours, dlib's descriptor of the full photo) = {cos_dlib:.5}");
            embs.push((name.to_string(), e, raw));
        }
        let (mut min_gen, mut max_imp) = (f64::MAX, f64::MIN);
        for i in 0..embs.len() {
            for j in i + 1..embs.len() {
                let cos: f64 = embs[i].1.iter().zip(&embs[j].1).map(|(a, b)| a * b).sum();
                let raw = l2(&embs[i].2, &embs[j].2);
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let cos_raw = embs[i].2.iter().zip(&embs[j].2).map(|(a, b)| a * b).sum::<f64>()
                    / (norm(&embs[i].2) * norm(&embs[j].2));
                let genuine = embs[i].0.starts_with("obama") && embs[j].0.starts_with("obama");
                eprintln!(
                    "margin {margin}: {} vs {}: cosine {cos:.4} (dlib on the full photo: cosine {cos_raw:.4}, raw L2 {raw:.4}, {})",
                    embs[i].0,
                    embs[j].0,
                    if genuine { "genuine" } else { "impostor" }
                );
                if genuine {
                    min_gen = min_gen.min(cos);
                } else {
                    max_imp = max_imp.max(cos);
                }
            }
        }
        eprintln!("margin {margin}: min genuine cosine {min_gen:.4} > max impostor cosine {max_imp:.4}");
        // Ranking, not a tolerance: the same person is closer than anyone else.
        assert!(min_gen > max_imp, "margin {margin}: genuine {min_gen} vs impostor {max_imp}");
    }
    // A batch of two images of one size works too (the new Train embed replaces the pending
    // one of the loop); a wrong-shaped `d_embeddings` keeps it pending; backward consumes it.
    let g = CpuTensor::new(vec![2, 128], vec![0.1f32; 256]);
    let px = CpuTensor::new(vec![2, 3, 40, 40], vec![0.5f32; 2 * 3 * 40 * 40]);
    let out = m.embed()(h, px.view(), ForwardMode::Train).unwrap();
    assert_eq!(CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap().shape, vec![2, 128]);
    let wrong = CpuTensor::new(vec![2, 5], vec![0.1f32; 10]);
    assert_eq!(m.backward()(h, wrong.view()).unwrap_err().code, ErrorCode::InvalidInput);
    let dx = m.backward()(h, g.view()).unwrap();
    assert_eq!(CpuTensor::<f32>::from_managed(&dx, "dx").unwrap().shape, vec![2, 3, 40, 40]);
    assert_eq!(m.backward()(h, g.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    m.destroy()(h);
}

/// Deterministic weights in [−1, 1).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    likeness_sdk::testing::uniform_f32(seed, n, -1.0, 1.0)
}

/// `backward` through the exported module vs a central finite difference of
/// L = Σ w·emb (f32 embeddings of `embed(Train)`) along the ±1 direction sign(d_pixels) over
/// every pixel (a random ±1 direction is printed too), on obama's face crop (25 % margin).
/// Step 0.05/255: the pixels are multiples of 1/255, so the `u8` image (and the landmarks) do
/// not move.
#[test]
fn backward_matches_finite_differences_through_the_abi() {
    use likeness_sdk::abi::MetricPluginModRef;
    use likeness_sdk::abi_stable::std_types::RStr;
    use likeness_sdk::{CpuTensor, Device, ErrorCode, ForwardMode};
    let Some(o) = oracle("backward_matches_finite_differences_through_the_abi") else { return };
    let m: MetricPluginModRef = likeness_plugin_dlib_face::__likeness_root_module();
    let md = std::path::Path::new(o.json["models"]["recognizer"].as_str().unwrap()).parent().unwrap();
    // Face-centred crops: the whole crop is the face rectangle (tests/mtcnn_whole_photos.rs
    // covers the default MTCNN detection).
    let cfg = serde_json::json!({"model_dir": md, "detector": "none"}).to_string();
    let h = m.create()(RStr::from(cfg.as_str()), Device::CPU, 0).unwrap();
    let im = &o.json["images"][0];
    let name = im["name"].as_str().unwrap();
    let (w, hh) = (im["width"].as_i64().unwrap(), im["height"].as_i64().unwrap());
    let data = std::fs::read(o.dir.path().join(format!("{name}.rgb"))).unwrap();
    let r: Vec<i64> = im["faces"][0]["rect"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let g = ((r[2] - r[0] + 1) as f64 * 0.25).round() as i64;
    let (l, t) = ((r[0] - g).max(0), (r[1] - g).max(0));
    let (rr, b) = ((r[2] + g).min(w - 1), (r[3] + g).min(hh - 1));
    let (cw, ch) = ((rr - l + 1) as usize, (b - t + 1) as usize);
    let mut planes = vec![0f32; 3 * cw * ch];
    for y in 0..ch {
        for x in 0..cw {
            for c in 0..3 {
                let v = data[(((t as usize + y) * w as usize) + l as usize + x) * 3 + c];
                planes[c * cw * ch + y * cw + x] = v as f32 / 255.0;
            }
        }
    }
    let shape = vec![1, 3, ch as i64, cw as i64];
    let wts = weights(128, 7);
    let gw = CpuTensor::new(vec![1, 128], wts.clone());
    assert_eq!(m.backward()(h, gw.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    let px = CpuTensor::new(shape.clone(), planes.clone());
    let out = m.embed()(h, px.view(), ForwardMode::Train).unwrap();
    assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![1]);
    let dx = CpuTensor::<f32>::from_managed(&m.backward()(h, gw.view()).unwrap(), "dx").unwrap();
    assert_eq!(dx.shape, shape);
    assert!(dx.data.iter().any(|&v| v != 0.0) && dx.data.iter().all(|v| v.is_finite()));
    assert_eq!(m.backward()(h, gw.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    let loss = |xs: &[f32]| -> f64 {
        let t = CpuTensor::new(shape.clone(), xs.to_vec());
        let o = m.embed()(h, t.view(), ForwardMode::Train).unwrap();
        let e = CpuTensor::<f32>::from_managed(&o.embeddings, "e").unwrap();
        e.data.iter().zip(&wts).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let step = 0.01f32 / 255.0;
    // (ΔL, ⟨d_pixels, plus − minus⟩) along the ±1 direction `dir`; the actual f32-rounded
    // displacement of each pixel enters the prediction.
    let secant = |dir: &[f32]| -> (f64, f64) {
        let plus: Vec<f32> = planes.iter().zip(dir).map(|(a, v)| a + step * v).collect();
        let minus: Vec<f32> = planes.iter().zip(dir).map(|(a, v)| a - step * v).collect();
        let pred: f64 =
            dx.data.iter().zip(plus.iter().zip(&minus)).map(|(g, (p, q))| *g as f64 * (*p as f64 - *q as f64)).sum();
        (loss(&plus) - loss(&minus), pred)
    };
    // A random ±1 direction: printed, not asserted. ⟨g, d⟩ is then a sum of terms of random
    // sign, ~‖g‖₂·h, while the f32 embeddings carry rounding noise up to ‖w‖·‖δe‖ ≈ 6.5 · 1e-6
    // in L, uncorrelated between x ± h·d and CPU-dependent: the two are comparable (with one
    // seed ΔL even had the wrong sign), so no bound derived from f32 precision holds.
    let random: Vec<f32> = weights(planes.len(), 11).into_iter().map(|v| if v >= 0.0 { 1.0 } else { -1.0 }).collect();
    let (fd_r, pred_r) = secant(&random);
    // Along the gradient's own sign pattern the terms add up: ΔL ≈ 2h·‖g‖₁, about √N ≈ 700
    // times the random direction's, so the noise above is ≲ 1e-3 of it (Cauchy–Schwarz, any
    // summation order). The curvature of L along this direction is second order in h: 1.3e-2 at
    // step 0.05/255, 7.8e-4 at this 0.01/255 (the same on every CPU up to the noise). A wrong
    // gradient still shows: a wrong scale, sign or pixel mapping changes ⟨g, sign g⟩ at first
    // order. The step keeps every pixel within 0.01 grey levels (the u8 image, hence the
    // landmarks, do not move).
    let along: Vec<f32> = dx.data.iter().map(|&g| if g < 0.0 { -1.0 } else { 1.0 }).collect();
    let (fd, pred) = secant(&along);
    let rel = (fd - pred).abs() / pred.abs();
    eprintln!(
        "dlib ABI (f32) backward vs FD (step 0.01/255, {name} {cw}x{ch}): along sign(d_pixels) ΔL {fd:+.6e}, predicted \
         {pred:+.6e}, rel err {rel:.3e}; along a random ±1 direction (not asserted) ΔL {fd_r:+.6e}, predicted {pred_r:+.6e}"
    );
    // 1e-2: 10× the worst-case noise estimate.
    assert!(rel <= 1e-2, "directional FD {fd:e} vs backward {pred:e}");
    m.destroy()(h);
}
