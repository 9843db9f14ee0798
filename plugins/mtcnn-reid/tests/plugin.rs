//! The `mtcnn-reid` metric through its `MetricPlugin` calls: a real photo, a blank image, the
//! backward gradient against finite differences through crop + OSNet (detection box held fixed),
//! and config errors.

use std::path::PathBuf;
use std::process::Command;

use likeness_plugin_mtcnn_reid::plugin::{ReidMetric, DIM};
use likeness_sdk::testing;
use likeness_sdk::{CpuTensor, Device, ErrorCode, ForwardMode, MetricPlugin};
use tch::{Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const RANDOM: &str = r#"{"arch": "osnet_x0_25", "allow_random_weights": true}"#;

/// obama.jpg decoded by PIL, as `[1, 3, H, W]` `[0, 1]` planes; `None` without the set-up.
fn obama(test: &str) -> Option<(CpuTensor<f32>, usize, usize)> {
    let python = testing::python_or_skip(test)?;
    let photo = testing::data_path_or_skip(test, "photos/face_recognition/obama.jpg")?;
    testing::data_path_or_skip(test, "reference/facenet_pytorch-2.6.0")?;
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(python)
        .arg(repo().join("tests/python/osnet_oracle.py"))
        .arg("--out")
        .arg(dir.path())
        .arg("--photo")
        .arg(&photo)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wh: Vec<usize> = String::from_utf8(o.stdout).unwrap().split_whitespace().map(|v| v.parse().unwrap()).collect();
    let (w, h) = (wh[0], wh[1]);
    let rgb = std::fs::read(dir.path().join("photo.rgb")).unwrap();
    let mut planes = vec![0f32; 3 * h * w];
    for (p, px) in rgb.chunks(3).enumerate() {
        for c in 0..3 {
            planes[c * h * w + p] = px[c] as f32 / 255.0;
        }
    }
    Some((CpuTensor::new(vec![1, 3, h as i64, w as i64], planes), h, w))
}

#[test]
fn photo_has_a_face_and_blank_has_none() {
    let Some((px, h, w)) = obama("photo_has_a_face_and_blank_has_none") else { return };
    let mut m = ReidMetric::create(RANDOM, Device::CPU, 3).unwrap();
    // A batch: [obama, a flat grey image].
    let mut data = px.data.clone();
    data.extend(std::iter::repeat_n(0.5f32, 3 * h * w));
    let batch = CpuTensor::new(vec![2, 3, h as i64, w as i64], data);
    let out = m.embed(&batch.view(), ForwardMode::Eval).unwrap();
    let emb = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
    let valid = CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap();
    assert_eq!(valid.data, vec![1, 0], "obama must have a face, the grey image none");
    let n: f64 = emb.data[..DIM].iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    // Unit length up to f32 rounding of 512 squares (≲ 512·2⁻²⁴ relative).
    assert!((n - 1.0).abs() < 1e-4, "norm {n}");
    assert!(emb.data[DIM..].iter().all(|v| *v == 0.0), "no face → zero embedding");
    let boxes = m.crop_boxes(&px.data, 1, h, w).unwrap();
    eprintln!("obama {w}×{h}: crop box {:?}", boxes[0]);
}

/// backward (the ABI path, f32) vs central differences of the f64 crop + OSNet with the plugin's
/// own detected box held fixed.
#[test]
fn backward_matches_finite_differences() {
    let Some((px, h, w)) = obama("backward_matches_finite_differences") else { return };
    let mut m = ReidMetric::create(RANDOM, Device::CPU, 3).unwrap();
    let out = m.embed(&px.view(), ForwardMode::Train).unwrap();
    assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![1]);
    let gw: Vec<f32> = testing::uniform_f32(11, DIM, -1.0, 1.0);
    let g = CpuTensor::new(vec![1, DIM as i64], gw.clone());
    let dx = CpuTensor::<f32>::from_managed(&m.backward(&g.view()).unwrap(), "dx").unwrap();
    assert_eq!(m.backward(&g.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    let bx = m.crop_boxes(&px.data, 1, h, w).unwrap()[0].unwrap();
    let net = m.net.to(tch::Device::Cpu, Kind::Double);
    let r = Tensor::from_slice(&gw).to_kind(Kind::Double).reshape([1, DIM as i64]);
    let x0 = Tensor::from_slice(&px.data).to_kind(Kind::Double).reshape([1, 3, h as i64, w as i64]);
    let f = |x: &Tensor| (ReidMetric::embed_boxes(&net, x, &[bx]) * &r).sum(Kind::Double).double_value(&[]);
    let d = Tensor::from_slice(&dx.data);
    let scale = d.abs().max().double_value(&[]);
    assert!(scale > 0.0, "zero gradient through the crop");
    // Pixels outside the crop box get no gradient.
    let outside = (0.0f64.max(bx[1] - 2.0)) as usize;
    if outside > 0 {
        let row = &dx.data[..outside * w];
        assert!(row.iter().all(|v| *v == 0.0), "gradient above the crop box");
    }
    let mut idx: Vec<i64> = Vec::<i64>::try_from(&d.abs().topk(6, 0, true, true).1).unwrap();
    let (cy, cx) = (((bx[1] + bx[3]) / 2.0) as i64, ((bx[0] + bx[2]) / 2.0) as i64);
    idx.extend([cy * w as i64 + cx, (h * w) as i64 + (cy + 5) * w as i64 + cx - 3]);
    let xs = x0.flatten(0, -1);
    // h = 1e-5 in f64: truncation ≈ h²·f'''/6 and rounding ≈ 2⁻⁵³·|f|/h ≈ 1e-11, negligible.
    // The analytic side is the f32 backward: the VJP of ~40 layers each with relative rounding
    // ≲ √K·2⁻²⁴ (K ≤ 512) — ≲ 40·23·6e-8 ≈ 5.5e-5 of the gradient scale — plus the f32 forward's
    // activations that feed it (same order). 1e-3·max|dx| is ~10× that, far below the
    // gradient's own spread (entries span orders of magnitude), so a wrong VJP still fails.
    let step = 1e-5;
    for &i in &idx {
        let v = xs.double_value(&[i]);
        let p = xs.copy();
        let _ = p.get(i).fill_(v + step);
        let mn = xs.copy();
        let _ = mn.get(i).fill_(v - step);
        let fd = (f(&p.reshape(x0.size())) - f(&mn.reshape(x0.size()))) / (2.0 * step);
        let an = dx.data[i as usize] as f64;
        eprintln!("pixel {i}: backward {an:.6e} fd {fd:.6e}");
        assert!((fd - an).abs() <= 1e-3 * scale, "pixel {i}: backward {an} vs fd {fd} (scale {scale})");
    }
}

#[test]
fn config_errors_name_the_field() {
    let e = ReidMetric::create(r#"{"arch": "osnet_x0_25"}"#, Device::CPU, 0).err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidConfig, "{}", e.message);
    assert!(e.message.contains("`weights`") && e.message.contains("allow_random_weights"), "{}", e.message);
    let e = ReidMetric::create(r#"{"arch": "osnet_x9", "allow_random_weights": true}"#, Device::CPU, 0).err().unwrap();
    assert!(e.message.contains("arch") || e.message.contains("osnet_x9"), "{}", e.message);
    let e = ReidMetric::interface(r#"{"margin": -1, "allow_random_weights": true}"#).err().unwrap();
    assert!(e.message.contains("`margin`"), "{}", e.message);
    let i = ReidMetric::interface(RANDOM).unwrap();
    assert!(i.same_person_threshold < -1.0, "no same-person threshold is declared");
}
