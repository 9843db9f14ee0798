//! The `clip` metric through its `MetricPlugin` calls, against transformers on a tiny random
//! CLIPModel saved by transformers (tests/python/clip_oracle.py): image embeddings of real photos
//! after the same (torchvision tensor-path) preprocessing, text embeddings, the ABI backward
//! against central finite differences in f64, the open_clip layout, and config errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use likeness_plugin_clip::plugin::ClipMetric;
use likeness_sdk::testing;
use likeness_sdk::{CpuTensor, Device, ErrorCode, ForwardMode, MetricPlugin};
use tch::{Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const PHOTOS: [&str; 3] = [
    "photos/face_recognition/obama.jpg",
    "photos/face_recognition/biden.jpg",
    "photos/insightface/Tom_Hanks_54745.png",
];
const DIM: usize = 16;

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    out: PathBuf,
    meta: serde_json::Value,
}

fn fixture(test: &str) -> Option<Fixture> {
    let python = testing::python_or_skip(test)?;
    let mut photos = Vec::new();
    for p in PHOTOS {
        photos.push(testing::data_path_or_skip(test, p)?);
    }
    testing::data_path_or_skip(test, likeness_plugin_clip::plugin::OPEN_CLIP_VOCAB)?;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = dir.path().join("photos");
    std::fs::create_dir_all(&out).unwrap();
    let run = |args: Vec<&std::ffi::OsStr>| {
        let o = Command::new(&python).arg(repo().join("tests/python/clip_oracle.py")).args(args).output().unwrap();
        assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    };
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["--out".as_ref(), out.as_os_str(), "--text-model".as_ref(), model.as_os_str()];
    args.push("--photos".as_ref());
    args.extend(photos.iter().map(|p| p.as_os_str()));
    run(args);
    let meta = serde_json::from_slice(&std::fs::read(out.join("photos.json")).unwrap()).unwrap();
    Some(Fixture { _dir: dir, model, out, meta })
}

/// Photo k as `[1, 3, H, W]` planes in [0, 1] (PIL's decode, as the host would pass it).
fn photo(f: &Fixture, k: usize) -> CpuTensor<f32> {
    let m = &f.meta["photos"][k];
    let (w, h) = (m["w"].as_u64().unwrap() as usize, m["h"].as_u64().unwrap() as usize);
    let rgb = std::fs::read(f.out.join(format!("{k}.rgb"))).unwrap();
    let mut planes = vec![0f32; 3 * h * w];
    for (p, px) in rgb.chunks(3).enumerate() {
        for c in 0..3 {
            planes[c * h * w + p] = px[c] as f32 / 255.0;
        }
    }
    CpuTensor::new(vec![1, 3, h as i64, w as i64], planes)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn config(model: &Path) -> String {
    serde_json::json!({"weights": model.join("model.safetensors")}).to_string()
}

/// One oracle run (~10 s of Python) serves both checks.
#[test]
fn against_transformers() {
    let Some(f) = fixture("against_transformers") else { return };
    embeddings_match_transformers(&f);
    backward_matches_finite_differences(&f);
}

/// Embeddings are unit vectors of O(1/√16) entries computed in f32 (K ≤ 64 dot products over
/// ~10 stages → ≲ 4e-5 absolute, see core/clip/tests/towers_oracle.rs) after a preprocessing
/// that both sides run through the same libtorch kernel; 1e-4 as the issue asks.
fn embeddings_match_transformers(f: &Fixture) {
    for (name, cfg) in [
        ("transformers layout", config(&f.model)),
        (
            "open_clip layout",
            serde_json::json!({
                "weights": f.model.join("open_clip.safetensors"),
                "config": f.model.join("open_clip_config.json"),
            })
            .to_string(),
        ),
    ] {
        let mut m = ClipMetric::create(&cfg, Device::CPU, 0).unwrap();
        assert_eq!(m.dim(), DIM);
        for k in 0..PHOTOS.len() {
            let out = m.embed(&photo(f, k).view(), ForwardMode::Eval).unwrap();
            let e = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
            assert_eq!(e.shape, vec![1, DIM as i64]);
            assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![1]);
            let want = floats(&f.meta["photos"][k]["image_embeds"]);
            let d = e.data.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            eprintln!("{name}: photo {k}: image embedding max |diff| {d:e}");
            assert!(d <= 1e-4, "{name}: photo {k}: {d:e}");
        }
        let prompts: Vec<String> =
            f.meta["prompts"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let t = CpuTensor::<f32>::from_managed(&m.embed_texts(&texts).unwrap(), "t").unwrap();
        assert_eq!(t.shape, vec![texts.len() as i64, DIM as i64]);
        let want = floats(&f.meta["text_embeds"]);
        let d = t.data.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        eprintln!("{name}: text embeddings max |diff| {d:e}");
        assert!(d <= 1e-4, "{name}: text embeddings {d:e}");
    }
}

/// backward (the ABI path, f32) and the f64 plugin's backward vs central differences of the
/// f64 embedding (resize + crop + normalise + image tower) of a real photo.
fn backward_matches_finite_differences(f: &Fixture) {
    // Tom Hanks, 112×112, downscaled to the tiny tower's 32×32.
    let px = photo(f, 2);
    let (h, w) = (px.shape[2], px.shape[3]);
    let gw: Vec<f32> = testing::uniform_f32(5, DIM, -1.0, 1.0);
    let g = CpuTensor::new(vec![1, DIM as i64], gw.clone());
    let mut m = ClipMetric::create(&config(&f.model), Device::CPU, 0).unwrap();
    m.embed(&px.view(), ForwardMode::Train).unwrap();
    let dx = CpuTensor::<f32>::from_managed(&m.backward(&g.view()).unwrap(), "dx").unwrap();
    assert_eq!(dx.shape, px.shape);
    assert_eq!(m.backward(&g.view()).unwrap_err().code, ErrorCode::NoPendingForward);
    // backward_scaled scales the incoming gradient: 2.5·dx up to f32 rounding of the VJP.
    m.embed(&px.view(), ForwardMode::Train).unwrap();
    let dx2 = CpuTensor::<f32>::from_managed(&m.backward_scaled(&g.view(), 2.5).unwrap(), "dx2").unwrap();
    let scale = dx.data.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
    assert!(scale > 0.0, "zero gradient");
    for (a, b) in dx.data.iter().zip(&dx2.data) {
        assert!((2.5 * *a as f64 - *b as f64).abs() <= 1e-5 * 2.5 * scale, "backward_scaled: {a} vs {b}");
    }
    let mut m64 = ClipMetric::create(
        &serde_json::json!({"weights": f.model.join("model.safetensors"), "precision": "f64"}).to_string(),
        Device::CPU,
        0,
    )
    .unwrap();
    m64.embed(&px.view(), ForwardMode::Train).unwrap();
    let dx64 = CpuTensor::<f32>::from_managed(&m64.backward(&g.view()).unwrap(), "dx64").unwrap();

    let r = Tensor::from_slice(&gw).to_kind(Kind::Double).reshape([1, DIM as i64]);
    let x0 = Tensor::from_slice(&px.data).to_kind(Kind::Double).reshape([1, 3, h, w]);
    let fval = |x: &Tensor| {
        let _g = tch::no_grad_guard();
        (ClipMetric::embed_tensor(&m64.model, x).unwrap() * &r).sum(Kind::Double).double_value(&[])
    };
    let d = Tensor::from_slice(&dx.data);
    let mut idx: Vec<i64> = Vec::<i64>::try_from(&d.abs().topk(6, 0, true, true).1).unwrap();
    idx.extend([(h / 2) * w + w / 2, h * w + 7 * w + 90, 2 * h * w + (h - 1) * w + 3]);
    let xs = x0.flatten(0, -1);
    // Central differences in f64, step 1e-4: truncation h²·f'''/6 with O(1)-scaled derivatives
    // (~1e-9) and rounding 2⁻⁵³·|f|/h (~1e-12), both ≪ the bounds below.
    // f64 backward: the same function differentiated exactly, rounding ~1e-15 → bound 1e-6·scale.
    // f32 backward: a VJP through ~10 stages with K ≤ 64 dot products (≲ 10·64·6e-8 ≈ 4e-5 of
    // the gradient scale, plus the f32 forward activations feeding it, same order) → 1e-3·scale,
    // still far below the spread of the gradient's entries, so a wrong VJP fails.
    let step = 1e-4;
    for &i in &idx {
        let v = xs.double_value(&[i]);
        let p = xs.copy();
        let _ = p.get(i).fill_(v + step);
        let mn = xs.copy();
        let _ = mn.get(i).fill_(v - step);
        let fd = (fval(&p.reshape(x0.size())) - fval(&mn.reshape(x0.size()))) / (2.0 * step);
        let (a32, a64) = (dx.data[i as usize] as f64, dx64.data[i as usize] as f64);
        eprintln!("pixel {i}: fd {fd:.6e} backward f32 {a32:.6e} f64 {a64:.6e}");
        assert!((fd - a64).abs() <= 1e-6 * scale + 1e-7 * fd.abs().max(1e-30), "f64: pixel {i}: {a64} vs {fd}");
        assert!((fd - a32).abs() <= 1e-3 * scale, "f32: pixel {i}: {a32} vs fd {fd} (scale {scale})");
    }
}

#[test]
fn config_errors_and_interface() {
    let e = ClipMetric::create("{}", Device::CPU, 0).err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidConfig, "{}", e.message);
    assert!(e.message.contains("`weights`") && e.message.contains("allow_random_weights"), "{}", e.message);
    let e = ClipMetric::interface(r#"{"allow_random_weights": true, "colour": 1}"#).err().unwrap();
    assert!(e.message.contains("colour"), "{}", e.message);
    let e = ClipMetric::interface(r#"{"allow_random_weights": true, "arch": "ViT-X"}"#).err().unwrap();
    assert!(e.message.contains("`arch`") && e.message.contains("ViT-B-32"), "{}", e.message);
    let e = ClipMetric::interface(r#"{"allow_random_weights": true, "precision": "f16"}"#).err().unwrap();
    assert!(e.message.contains("f16"), "{}", e.message);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/model.safetensors");
    let e =
        ClipMetric::create(&serde_json::json!({"weights": missing, "arch": "ViT-B-32"}).to_string(), Device::CPU, 0)
            .err()
            .unwrap();
    assert!(e.message.contains("model.safetensors"), "{}", e.message);
    let i = ClipMetric::interface(r#"{"allow_random_weights": true, "arch": "ViT-B-32"}"#).unwrap();
    assert!(i.embeds_texts, "CLIP embeds texts");
    assert!(i.same_person_threshold < -1.0, "CLIP is not an identity verifier: no same-person threshold");
}

/// Random towers (no files) with a tiny config: shapes, unit norms, bad input errors.
#[test]
fn random_towers_shapes_and_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("oc.json");
    std::fs::write(
        &cfg,
        r#"{"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}"#,
    )
    .unwrap();
    let Some(vocab) = testing::data_path_or_skip("random_towers", likeness_plugin_clip::plugin::OPEN_CLIP_VOCAB) else {
        return;
    };
    let json = serde_json::json!({"allow_random_weights": true, "config": cfg, "tokenizer": vocab}).to_string();
    let mut m = ClipMetric::create(&json, Device::CPU, 3).unwrap();
    let x = CpuTensor::new(vec![2, 3, 20, 30], testing::uniform_f32(1, 2 * 3 * 20 * 30, 0.0, 1.0));
    let out = m.embed(&x.view(), ForwardMode::Eval).unwrap();
    let e = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
    assert_eq!(e.shape, vec![2, 8]);
    for row in e.data.chunks(8) {
        let n = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        // Unit length up to f32 rounding of 8 squares.
        assert!((n - 1.0).abs() < 1e-6, "norm {n}");
    }
    let t = CpuTensor::<f32>::from_managed(&m.embed_texts(&["a", &"long ".repeat(100)]).unwrap(), "t").unwrap();
    assert_eq!(t.shape, vec![2, 8]);
    let bad = CpuTensor::new(vec![1, 1, 4, 4], vec![0f32; 16]);
    let e = m.embed(&bad.view(), ForwardMode::Eval).err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidInput, "{}", e.message);
    assert!(e.message.contains("[B, 3, H, W]"), "{}", e.message);
    m.embed(&x.view(), ForwardMode::Train).unwrap();
    let wrong = CpuTensor::new(vec![2, 5], vec![0f32; 10]);
    let e = m.backward(&wrong.view()).err().unwrap();
    assert!(e.message.contains("[2, 8]"), "{}", e.message);
}
