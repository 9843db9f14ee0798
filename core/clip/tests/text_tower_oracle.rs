//! The text tower against transformers' CLIPModel.text_model on a tiny random CLIPModel saved by
//! transformers (tests/python/clip_oracle.py --text-model). Both sides run in float64 from the
//! same float32 weights, so the only differences are f64 rounding in a different order of
//! operations: ~1e-16 relative per op over ~10^3 ops per value, activations O(1) after LayerNorm
//! -> errors ~1e-13; 1e-9 leaves four orders of headroom on any x86 CPU and still catches any
//! wrong op (those show up at 1e-2 and above).
use likeness_clip::text::{TextConfig, TextTower};
use likeness_sdk::testing;
use std::path::PathBuf;
use std::process::Command;
use tch::{Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn max_diff(got: &Tensor, want: &serde_json::Value) -> f64 {
    let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let got = Vec::<f64>::try_from(got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    assert_eq!(got.len(), want.len(), "element count");
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

#[test]
fn text_tower_matches_transformers() {
    let test = "text_tower_matches_transformers";
    let Some(python) = testing::python_or_skip(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("text.json");
    let model = dir.path().join("model");
    let o = Command::new(python)
        .arg(repo().join("tests/python/clip_oracle.py"))
        .arg("--out")
        .arg(&out)
        .arg("--text-model")
        .arg(&model)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let cfg = TextConfig { layers: 2, heads: 4, eps: 1e-5, quick_gelu: true };
    let rows: Vec<Vec<i64>> = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
        .collect();
    let flat: Vec<i64> = rows.concat();
    let ids = Tensor::from_slice(&flat).view([rows.len() as i64, 77]);
    let eot: Vec<usize> = j["eot"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    for tower in [
        TextTower::from_hf_safetensors(&model.join("model.safetensors"), cfg.clone()).unwrap(),
        TextTower::from_open_clip_safetensors(&model.join("open_clip.safetensors"), cfg).unwrap(),
    ] {
        let out = tower.forward(&ids, &eot);
        for (name, got) in [
            ("last_hidden_state", &out.last_hidden_state),
            ("penultimate", &out.penultimate),
            ("text_embeds", &out.text_embeds),
        ] {
            let d = max_diff(got, &j[name]);
            eprintln!("{name}: max |diff| {d:e}");
            assert!(d <= 1e-9, "{name}: max |diff| {d:e}");
        }
    }
}

#[test]
fn missing_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.safetensors");
    Tensor::write_safetensors(&[("x", Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)))], &p).unwrap();
    let cfg = TextConfig { layers: 1, heads: 1, eps: 1e-5, quick_gelu: true };
    let msg = TextTower::from_hf_safetensors(&p, cfg).err().unwrap().to_string();
    assert!(msg.contains("empty.safetensors") && msg.contains("text_model.encoder.layers.0.mlp.fc1.weight"), "{msg}");
}
