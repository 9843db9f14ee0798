//! SCRFD decoding, NMS and face choice vs insightface 0.7.3's own `SCRFD.detect` run on seeded
//! output tensors (tests/python/arcface_oracle.py scrfd), for the 6/9/10/15-output layouts and a
//! batched graph; plus the detector input (letterbox + blob) against the blob SCRFD built.

mod common;
use common::*;
use likeness_plugin_arcface::scrfd::{self, FaceChoice, Layout};

fn check(env: &Env, outputs: usize, batched: bool, input_w: usize, input_h: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (ws, hs, ss) = (input_w.to_string(), input_h.to_string(), seed.to_string());
    let mut args = vec![
        "scrfd",
        "--outputs",
        match outputs {
            6 => "6",
            9 => "9",
            10 => "10",
            _ => "15",
        },
        "--input-w",
        &ws,
        "--input-h",
        &hs,
        "--seed",
        &ss,
    ];
    if batched {
        args.push("--batched");
    }
    run_oracle(env, &args, dir.path());
    let meta = read_json(&dir.path().join("scrfd.json"));
    let layout = Layout::from_output_count(outputs, batched).unwrap();
    let outs: Vec<Vec<f32>> = (0..outputs).map(|i| read_f32(&dir.path().join(format!("out_{i}.f32")))).collect();
    let refs: Vec<&[f32]> = outs.iter().map(|o| o.as_slice()).collect();
    let (img_w, img_h) = (meta["width"].as_u64().unwrap() as usize, meta["height"].as_u64().unwrap() as usize);
    let (_, _, det_scale) = scrfd::letterbox_geometry(img_w, img_h, input_w, input_h);
    assert_eq!(det_scale, f(&meta["det_scale"]), "det_scale");
    let mut worst_box = 0f64;
    let mut worst_kps = 0f64;
    for run in meta["runs"].as_array().unwrap() {
        let max_num = run["max_num"].as_u64().unwrap() as usize;
        let choice = match run["metric"].as_str().unwrap() {
            "max" => FaceChoice::Largest,
            _ => FaceChoice::Default,
        };
        let got = scrfd::detect_from_outputs(
            &layout, &refs, input_w, input_h, det_scale, 0.5, 0.4, img_w, img_h, max_num, choice,
        )
        .unwrap();
        let want = run["det"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{outputs} outputs, max_num {max_num}: number of faces");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            for j in 0..4 {
                worst_box = worst_box.max((g.bbox[j] as f64 - f(&w[j])).abs());
            }
            // serde_json may misround the last f64 digit: compare as the f32 both sides hold.
            assert_eq!(g.score, f(&w[4]) as f32, "face {i}: score (so the same face, in the same order)");
            match (&g.kps, run["kps"].as_array()) {
                (Some(k), Some(wk)) => {
                    for p in 0..5 {
                        for c in 0..2 {
                            worst_kps = worst_kps.max((k[p][c] as f64 - f(&wk[i][p][c])).abs());
                        }
                    }
                }
                (None, None) => {}
                (a, b) => panic!("key points: ours {:?}, reference {:?}", a.is_some(), b.is_some()),
            }
        }
    }
    eprintln!(
        "{outputs} outputs{} {input_w}x{input_h}: {} faces; max |box diff| {worst_box:.2e} px, max |kps diff| {worst_kps:.2e} px",
        if batched { " (batched)" } else { "" },
        meta["runs"][0]["det"].as_array().unwrap().len()
    );
    // The same f32 outputs decoded by element-wise f32 arithmetic on both sides (numpy's
    // ufuncs and our scalar Rust are correctly rounded per operation on every CPU; neither
    // contracts to FMA): the same values, measured ≤ 1.1e-13 px (JSON's f64 printing). 1e-3 px
    // is ~16 ulps of a 640-px coordinate, room for a different association of a few operations.
    assert!(worst_box <= 1e-3 && worst_kps <= 1e-3, "boxes/key points differ by more than 1e-3 px");

    // Pre-processing: letterbox + blob of the same decoded image.
    let (rgb, w, h) = read_rgb(&dir.path().join("t1.png"));
    let (blob, _) = scrfd::preprocess_rgb(&rgb, w, h, input_w, input_h);
    let want = read_f32(&dir.path().join("blob.f32"));
    assert_eq!(blob.len(), want.len());
    let (mut sum, mut max, mut eq) = (0f64, 0f32, 0usize);
    for (a, b) in blob.iter().zip(&want) {
        let d = (a - b).abs() * 128.0;
        sum += d as f64;
        max = max.max(d);
        eq += (d == 0.0) as usize;
    }
    let mean = sum / blob.len() as f64;
    eprintln!(
        "  blob: mean abs diff {mean:.4} grey levels, max {max}, equal {:.2}%",
        eq as f64 * 100.0 / blob.len() as f64
    );
    // Letterbox resize + (x − 127.5)/128: cv2.resize's bilinear is fixed-point integer
    // arithmetic (bit-exact on every CPU, SIMD or not), ours repeats it; the bound (in grey
    // levels) is for an implementation difference, not rounding: measured identical.
    assert!(mean <= 0.5 && max <= 2.0, "detector input differs from SCRFD's blob");
}

#[test]
fn scrfd_9_outputs_kps() {
    let Some(env) = env_or_skip("scrfd_9_outputs_kps") else { return };
    check(&env, 9, false, 640, 640, 0);
}

#[test]
fn scrfd_6_outputs_no_kps() {
    let Some(env) = env_or_skip("scrfd_6_outputs_no_kps") else { return };
    check(&env, 6, false, 640, 640, 1);
}

#[test]
fn scrfd_15_outputs_5_levels_kps() {
    let Some(env) = env_or_skip("scrfd_15_outputs_5_levels_kps") else { return };
    check(&env, 15, false, 640, 640, 2);
}

#[test]
fn scrfd_10_outputs_5_levels_no_kps() {
    let Some(env) = env_or_skip("scrfd_10_outputs_5_levels_no_kps") else { return };
    check(&env, 10, false, 640, 640, 3);
}

#[test]
fn scrfd_9_outputs_batched_non_square() {
    let Some(env) = env_or_skip("scrfd_9_outputs_batched_non_square") else { return };
    check(&env, 9, true, 640, 480, 4);
}
