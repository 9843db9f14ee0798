//! Both towers against transformers' CLIPModel on a tiny random CLIPModel saved by transformers
//! (tests/python/clip_oracle.py --text-model), read from its model.safetensors + config.json and
//! from the same weights in open_clip layout + an open_clip model config (the oracle checks that
//! conversion through open_clip's own CLIP class, strict load).
//!
//! Bounds:
//! - f64 (both sides compute in f64 from the same f32 weights): only f64 rounding in a different
//!   order of operations remains, ~1e-16 relative per op over ~10^3 ops per value with O(1)
//!   activations after LayerNorm → ~1e-13; 1e-9 leaves four orders of headroom on any x86 CPU
//!   and still catches any wrong op (those show up at 1e-2 and above). Logits are
//!   exp(logit_scale) = 14.3 times a cosine: bound 14.3 · 1e-9 → 2e-8.
//! - f32 (the metric's precision; transformers runs its SDPA attention, we run matmul/softmax):
//!   each dot product of length K (K ≤ 64 here: widths 32, MLP 64, ≤ 77 positions) carries
//!   O(K·2⁻²⁴) ≈ 4e-6 relative error in the worst case (√K·2⁻²⁴ ≈ 5e-7 typically); ~10 such
//!   stages per tower on O(1) values give ≲ 4e-5 absolute on the embeddings, and the logits
//!   multiply a cosine error of that order by 14.3 only after normalisation (cosine errors are
//!   relative, ≲ 4e-6). The issue's bound 1e-4 holds with margin; a wrong op is ≥ 1e-2.
use likeness_clip::text::TextTower;
use likeness_clip::vision::VisionTower;
use likeness_clip::weights::{Layout, Weights};
use likeness_clip::{logits_per_image, ClipConfig, ClipModel, TextConfig};
use likeness_sdk::testing;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn max_diff(got: &Tensor, want: &serde_json::Value) -> f64 {
    let want = floats(want);
    let got = Vec::<f64>::try_from(got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    assert_eq!(got.len(), want.len(), "element count");
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

fn check(name: &str, got: &Tensor, want: &serde_json::Value, bound: f64) {
    let d = max_diff(got, want);
    eprintln!("{name}: max |diff| {d:e} (bound {bound:e})");
    assert!(d <= bound, "{name}: max |diff| {d:e} > {bound:e}");
}

fn oracle(dir: &Path) -> serde_json::Value {
    let python = testing::python_or_skip("towers").expect("checked by the caller");
    let out = dir.join("towers.json");
    let o = Command::new(python)
        .arg(repo().join("tests/python/clip_oracle.py"))
        .arg("--out")
        .arg(&out)
        .arg("--text-model")
        .arg(dir.join("model"))
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
}

#[test]
fn towers_match_transformers_in_both_layouts() {
    let test = "towers_match_transformers_in_both_layouts";
    if testing::python_or_skip(test).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let j = oracle(dir.path());
    let model = dir.path().join("model");
    let hf_cfg = ClipConfig::from_hf_config_json(&model.join("config.json")).unwrap();
    let oc_cfg = ClipConfig::from_open_clip_json(&model.join("open_clip_config.json")).unwrap();
    // Both config readers describe the same tiny model (the init logit scales differ in the 5th
    // digit, 2.6592 vs ln(1/0.07), and the checkpoint's logit_scale overrides both).
    assert_eq!((&hf_cfg.text, &hf_cfg.vision, hf_cfg.projection_dim), (&oc_cfg.text, &oc_cfg.vision, 16));
    assert_eq!((hf_cfg.vision.heads, hf_cfg.vision.patch_size, hf_cfg.text.mlp), (4, 8, 64));

    let rows: Vec<Vec<i64>> = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
        .collect();
    let ids = Tensor::from_slice(&rows.concat()).view([rows.len() as i64, 77]);
    let eot: Vec<usize> = j["eot"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let px: Vec<f32> = floats(&j["pixels"]).into_iter().map(|v| v as f32).collect();
    let pixels = Tensor::from_slice(&px).view([2, 3, 32, 32]);

    for (file, cfg, layout) in
        [("model.safetensors", &hf_cfg, Layout::Transformers), ("open_clip.safetensors", &oc_cfg, Layout::OpenClip)]
    {
        eprintln!("== {file}");
        let m = ClipModel::load(&model.join(file), cfg, Kind::Double, Device::Cpu).unwrap();
        assert_eq!(m.layout, layout);
        let t = m.text.forward(&ids, &eot).unwrap();
        check("last_hidden_state", &t.last_hidden_state, &j["last_hidden_state"], 1e-9);
        check("penultimate", &t.penultimate, &j["penultimate"], 1e-9);
        check("text_embeds", &t.text_embeds, &j["text_embeds"], 1e-9);
        let v = m.vision.forward(&pixels.to_kind(Kind::Double)).unwrap();
        check("vision last_hidden_state", &v.last_hidden_state, &j["vision_last_hidden_state"], 1e-9);
        check("vision pooler_output", &v.pooler_output, &j["vision_pooler_output"], 1e-9);
        check("image_embeds", &v.image_embeds, &j["image_embeds"], 1e-9);
        let logits = logits_per_image(&v.image_embeds, &t.text_embeds, m.logit_scale);
        check("logits_per_image", &logits, &j["logits_per_image"], 2e-8);

        let m = ClipModel::load(&model.join(file), cfg, Kind::Float, Device::Cpu).unwrap();
        let t = m.text.forward(&ids, &eot).unwrap();
        let v = m.vision.forward(&pixels).unwrap();
        assert_eq!(v.image_embeds.kind(), Kind::Float, "computed in f32");
        check("image_embeds f32", &v.image_embeds, &j["image_embeds_f32"], 1e-4);
        check("text_embeds f32", &t.text_embeds, &j["text_embeds_f32"], 1e-4);
        let logits = logits_per_image(&v.image_embeds, &t.text_embeds, m.logit_scale);
        check("logits_per_image f32", &logits, &j["logits_per_image_f32"], 1e-4);
    }

    // gelu (exact erf) in both towers, transformers layout.
    let g = model.join("gelu");
    let cfg = ClipConfig::from_hf_config_json(&g.join("config.json")).unwrap();
    assert!(!cfg.vision.quick_gelu && !cfg.text.quick_gelu);
    let m = ClipModel::load(&g.join("model.safetensors"), &cfg, Kind::Double, Device::Cpu).unwrap();
    check(
        "gelu image_embeds",
        &m.vision.forward(&pixels.to_kind(Kind::Double)).unwrap().image_embeds,
        &j["gelu_image_embeds"],
        1e-9,
    );
    check("gelu text_embeds", &m.text.forward(&ids, &eot).unwrap().text_embeds, &j["gelu_text_embeds"], 1e-9);

    // A config that disagrees with the checkpoint: the mis-shaped tensors are named.
    let mut wrong = hf_cfg.clone();
    wrong.vision.patch_size = 16;
    let msg =
        ClipModel::load(&model.join("model.safetensors"), &wrong, Kind::Float, Device::Cpu).err().unwrap().to_string();
    assert!(
        msg.contains("vision_model.embeddings.patch_embedding.weight: [32, 3, 8, 8], expected [32, 3, 16, 16]"),
        "{msg}"
    );
    // The image tower refuses pixels of the wrong size instead of mis-reading them.
    let msg = m.vision.forward(&Tensor::zeros([1, 3, 64, 64], (Kind::Double, Device::Cpu))).err().unwrap().to_string();
    assert!(msg.contains("[B, 3, 32, 32]"), "{msg}");
}

/// The presets equal open_clip 3.3.0's own model_configs JSON files.
#[test]
fn presets_match_open_clip_model_configs() {
    let test = "presets_match_open_clip_model_configs";
    let Some(dir) = testing::data_path_or_skip(test, "reference/open_clip-3.3.0/open_clip/model_configs") else {
        return;
    };
    for name in ["ViT-B-32", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu"] {
        let file = ClipConfig::from_open_clip_json(&dir.join(format!("{name}.json"))).unwrap();
        let preset = ClipConfig::preset(name).unwrap();
        assert_eq!(file, preset, "{name}");
    }
    let b32 = ClipConfig::preset("ViT-B-32").unwrap();
    assert_eq!((b32.vision.heads, b32.vision.mlp, b32.text.mlp, b32.vision.quick_gelu), (12, 3072, 2048, false));
    let msg = ClipConfig::preset("ViT-H-99").err().unwrap().to_string();
    assert!(msg.contains("ViT-H-99") && msg.contains("ViT-B-32"), "{msg}");
}

#[test]
fn bad_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, r#"{"text_config": {"hidden_act": "relu"}, "vision_config": {}}"#).unwrap();
    let msg = ClipConfig::from_hf_config_json(&p).err().unwrap().to_string();
    assert!(msg.contains("config.json") && msg.contains("text_config.hidden_act") && msg.contains("relu"), "{msg}");
    std::fs::write(&p, r#"{"text_config": {}, "vision_config": {"patch_size": 0}}"#).unwrap();
    let msg = ClipConfig::from_hf_config_json(&p).err().unwrap().to_string();
    assert!(msg.contains("vision_config.patch_size"), "{msg}");
    std::fs::write(&p, r#"{"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit"}, "text_cfg": {}}"#).unwrap();
    let msg = ClipConfig::from_open_clip_json(&p).err().unwrap().to_string();
    assert!(msg.contains("vision_cfg.timm_model_name"), "{msg}");
}

#[test]
fn missing_and_unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.safetensors");
    let z = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("x", z(&[1]))], &p).unwrap();
    // Not a CLIP file at all: the keys it holds are named.
    let msg = Weights::read(&p, Kind::Float, Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("empty.safetensors") && msg.contains("\"x\""), "{msg}");
    // A transformers file without layer 0 of the text tower: the missing key is named.
    let q = dir.path().join("partial.safetensors");
    Tensor::write_safetensors(
        &[("text_model.final_layer_norm.weight", z(&[8])), ("text_projection.weight", z(&[4, 9]))],
        &q,
    )
    .unwrap();
    let w = Weights::read(&q, Kind::Float, Device::Cpu).unwrap();
    let cfg = TextConfig {
        layers: 1,
        heads: 1,
        width: 8,
        mlp: 16,
        context_length: 77,
        vocab_size: 10,
        eps: 1e-5,
        quick_gelu: true,
    };
    let msg = TextTower::new(&w, &cfg, 4).err().unwrap().to_string();
    assert!(msg.contains("partial.safetensors") && msg.contains("text_model.encoder.layers.0.mlp.fc1.weight"), "{msg}");
    assert!(msg.contains("text_projection.weight: [4, 9], expected [4, 8]"), "{msg}");
    let vcfg = ClipConfig::preset("ViT-B-32").unwrap().vision;
    let msg = VisionTower::new(&w, &vcfg, 512).err().unwrap().to_string();
    assert!(msg.contains("vision_model.embeddings.class_embedding"), "{msg}");
    // An unknown key in an open_clip file is named, not ignored.
    let r = dir.path().join("oc.safetensors");
    Tensor::write_safetensors(&[("visual.conv1.weight", z(&[1])), ("visual.extra_head.weight", z(&[1]))], &r).unwrap();
    let msg = Weights::read(&r, Kind::Float, Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("visual.extra_head.weight"), "{msg}");
}
