//! Qwen2.5-VL (Qwen-Image-Edit-2509's text encoder) against transformers 5.24 and diffusers
//! 0.42.1 (tests/python/qwen_vl_oracle.py: the tiny config of notes §5.2, every parameter
//! perturbed; an offline byte-level tokenizer with merges; QwenImageEditPlusPipeline built from
//! the tiny parts).
//!
//! Tolerance (f32): both sides run libtorch's f32 kernels in the same op order (the patch
//! embedding as the same Conv3d, the vision attention per segment, the same RoPE tables from the
//! same f32 ops), so the measured differences are 0, except one padded row against its unpadded
//! single (masked vs `is_causal` SDPA: 3e-8). What is allowed for is a reduction order that
//! libtorch picks by thread count or CPU: f32's 2⁻²⁴ per step over accumulations of tens to
//! hundreds of terms, a few layers deep, on O(1) outputs (after an RMSNorm or the merger):
//! ≲ 1e-5 absolute = ~3e-6 relative to the outputs' max |x| ≈ 3. The preprocessing is the same
//! kernels on the same bytes: compared exactly.

mod common;

use common::{max_diff, PyOracle};
use likeness_diffusion_torch::qwen_vl::{
    arange_positions, condition_size, mrope_positions, qwen_vl_from_path, vae_size, Grid, ImageProcessor,
    QwenTokenizer, QwenVlConfig, QwenVlEncoder, QwenVlModel,
};
use likeness_diffusion_torch::{Mode, Store};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn oracle(test: &str) -> Option<&'static PyOracle> {
    static O: OnceLock<Option<PyOracle>> = OnceLock::new();
    O.get_or_init(|| PyOracle::run("qwen_vl_oracle.py", test)).as_ref()
}

fn ids_of(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn grids_of(v: &Value) -> Vec<Grid> {
    ids_of(v).into_iter().map(|g| (g[0], g[1], g[2])).collect()
}

fn model(o: &PyOracle, dir: &str) -> QwenVlModel {
    qwen_vl_from_path(&o.path(dir), Kind::Float, Device::Cpu, Mode::Alloc).unwrap().1
}

fn uint8(o: &PyOracle, name: &str) -> Tensor {
    o.tensor(name).to_kind(Kind::Uint8)
}

/// (a) The decoder alone, a padded batch, 1-D positions; the legacy folder (4.x flat config,
/// `model.layers.*` / `visual.*` names, an `lm_head.weight`) builds the same model.
#[test]
fn qwen_vl_text_model_matches_transformers() {
    let Some(o) = oracle("qwen_vl_text_model_matches_transformers") else { return };
    let ids = Tensor::from_slice(&ids_of(&o.json["text_ids"]).concat()).view([2, -1]);
    let mask = o.tensor("text_mask");
    let run = |m: &QwenVlModel| {
        let lm = &m.language_model;
        let x = lm.embed(&ids).unwrap();
        tch::no_grad(|| lm.forward_embeds(&x, Some(&mask), &arange_positions(2, ids.size()[1], Device::Cpu)))
    };
    let ours = run(&model(o, "text_encoder"));
    assert!(max_diff(&ours, &o.tensor("text_hidden"), "text hidden states") <= TOL);
    let legacy = run(&model(o, "legacy"));
    assert_eq!(max_diff(&legacy, &ours, "legacy layout"), 0.0);
}

/// (b) The vision tower on two images of different sizes (A: a 12×16 patch grid, i.e. a 6×8
/// merged grid cut into 4×4 windows, two of them partial; B: 8×4), from the processor's rows.
#[test]
fn qwen_vl_vision_matches_transformers() {
    let Some(o) = oracle("qwen_vl_vision_matches_transformers") else { return };
    let m = model(o, "text_encoder");
    let grids = grids_of(&o.json["grid_thw"]);
    let ours = tch::no_grad(|| m.visual.forward(&o.tensor("pixel_values"), &grids)).unwrap();
    assert!(max_diff(&ours, &o.tensor("vision_out"), "vision features") <= TOL);
}

/// (c) Qwen2VLImageProcessor on the same uint8 images (both resized: 170×230 → 168×224,
/// 100×60 → 112×56): the same pixel rows bit for bit, and the same grids.
#[test]
fn qwen_vl_preprocessing_matches_the_processor() {
    let Some(o) = oracle("qwen_vl_preprocessing_matches_the_processor") else { return };
    let p = ImageProcessor::from_dir(&o.path("processor")).unwrap();
    assert_eq!(p, ImageProcessor::default(), "processor_config.json holds the defaults");
    let (px, grids) = p.preprocess_all(&[uint8(o, "image_a"), uint8(o, "image_b")]).unwrap();
    assert_eq!(grids, grids_of(&o.json["grid_thw"]));
    assert_eq!(max_diff(&px, &o.tensor("pixel_values"), "pixel_values"), 0.0);
}

/// (d) `encode_prompt` of QwenImageEditPlusPipeline: prompt 0 with two condition images, prompt
/// 1 with one (batched, so prompt 1's row is padded and masked), prompt 2 text only; the ids of
/// the batch equal the processor's, and with the M-RoPE flag the hidden states equal
/// transformers' given `mm_token_type_ids`.
#[test]
fn qwen_vl_edit_plus_matches_diffusers() {
    let Some(o) = oracle("qwen_vl_edit_plus_matches_diffusers") else { return };
    let (_s, mut enc) =
        QwenVlEncoder::load(&o.path("text_encoder"), &o.path("processor"), Kind::Float, Device::Cpu).unwrap();
    let prompts: Vec<String> = serde_json::from_value(o.json["prompts"].clone()).unwrap();
    let conds = vec![vec![uint8(o, "cond_0"), uint8(o, "cond_1")], vec![uint8(o, "cond_2")]];
    let (emb, mask) = tch::no_grad(|| enc.encode_edit_plus(&[&prompts[0], &prompts[1]], &conds)).unwrap();
    let lens: Vec<i64> = serde_json::from_value(o.json["edit_lens"].clone()).unwrap();
    assert_eq!(emb.size(), [2, lens[0], 16]);
    assert!(max_diff(&emb, &o.tensor("batch_embeds"), "batched embeds") <= TOL);
    for (b, &n) in lens[..2].iter().enumerate() {
        let row = emb.get(b as i64);
        assert!(max_diff(&row.narrow(0, 0, n), &o.tensor(&format!("edit_{b}")), &format!("prompt {b}")) <= TOL);
        assert_eq!(row.narrow(0, n, lens[0] - n).abs().sum(Kind::Double).double_value(&[]), 0.0, "zero padding");
        let want: Vec<i64> = (0..lens[0]).map(|i| (i < n) as i64).collect();
        assert_eq!(Vec::<i64>::try_from(&mask.get(b as i64)).unwrap(), want, "mask of prompt {b}");
    }
    let (text_only, _) = tch::no_grad(|| enc.encode_edit_plus(&[&prompts[2]], &[vec![]])).unwrap();
    assert!(max_diff(&text_only.get(0), &o.tensor("edit_2"), "text-only prompt") <= TOL);

    // The batch's ids (template, prefixes, image-token expansion, right padding) are the processor's.
    let (px, grids) =
        enc.processor.preprocess_all(&conds.iter().flatten().map(Tensor::shallow_clone).collect::<Vec<_>>()).unwrap();
    assert_eq!(grids, grids_of(&o.json["batch_grid"]));
    let want_ids = ids_of(&o.json["batch_ids"]);
    let bmask = o.tensor("batch_mask");
    for (b, range) in [(0, 0..2), (1, 2..3)] {
        let ours = enc.prompt_ids(&prompts[b], &grids[range]).unwrap();
        let n = bmask.get(b as i64).sum(Kind::Int64).int64_value(&[]) as usize;
        assert_eq!(ours, want_ids[b][..n], "prompt {b}'s ids");
    }
    enc.mrope = true;
    let keep: Vec<Vec<bool>> =
        (0..2).map(|b| Vec::<f32>::try_from(&bmask.get(b)).unwrap().iter().map(|&m| m > 0.0).collect()).collect();
    let pos = mrope_positions(&want_ids, &keep, 151655, &grids, 2).unwrap();
    let ids = Tensor::from_slice(&want_ids.concat()).view([2, -1]);
    let hidden = tch::no_grad(|| enc.model.forward(&ids, &bmask, Some((&px, &grids)), Some(&pos))).unwrap();
    let real = bmask.unsqueeze(-1);
    let want = o.tensor("mrope_hidden");
    assert!(max_diff(&(&hidden * &real), &(&want * &real), "M-RoPE hidden states") <= TOL);
    let (emb_m, _) = tch::no_grad(|| enc.encode_edit_plus(&[&prompts[0], &prompts[1]], &conds)).unwrap();
    assert!(max_diff(&emb_m, &emb, "M-RoPE vs 1-D positions") > 1e-4, "the flag changes the positions");
}

/// (e) Token ids: tokenizer.json through the `tokenizers` crate, and the pipeline built from
/// vocab.json + merges.txt + tokenizer_config.json, both equal the processor's tokenizer (BPE
/// merges, specials, a non-special added token, digits, unicode, CR/LF/tab runs).
#[test]
fn qwen_vl_tokenizer_matches_the_processor() {
    let Some(o) = oracle("qwen_vl_tokenizer_matches_the_processor") else { return };
    let strings: Vec<String> = serde_json::from_value(o.json["token_strings"].clone()).unwrap();
    let want = ids_of(&o.json["token_ids"]);
    let json = QwenTokenizer::from_dir(&o.path("processor")).unwrap();
    let bpe = QwenTokenizer::from_dir(&o.path("tokenizer_bpe")).unwrap();
    for (s, w) in strings.iter().zip(&want) {
        assert_eq!(&json.encode(s).unwrap(), w, "tokenizer.json: {s:?}");
        assert_eq!(&bpe.encode(s).unwrap(), w, "vocab.json + merges.txt: {s:?}");
    }
    assert!(want.iter().flatten().any(|&i| (256..263).contains(&i)), "the strings exercise the merges");
}

/// diffusers' `calculate_dimensions` for the condition (384²) and VAE (1024²) sizes.
#[test]
fn qwen_vl_condition_and_vae_sizes_match_diffusers() {
    let Some(o) = oracle("qwen_vl_condition_and_vae_sizes_match_diffusers") else { return };
    for (key, f) in [("condition_sizes", condition_size as fn(i64, i64) -> (i64, i64)), ("vae_sizes", vae_size)] {
        for r in ids_of(&o.json[key]) {
            assert_eq!(f(r[0], r[1]), (r[2], r[3]), "{key} of {}×{}", r[0], r[1]);
        }
    }
}

/// A weight file that does not match is refused with the file and each name.
#[test]
fn qwen_vl_loader_names_mismatches() {
    let Some(o) = oracle("qwen_vl_loader_names_mismatches") else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(o.path("text_encoder/config.json"), dir.path().join("config.json")).unwrap();
    let stray = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("model.visual.extra.weight", &stray)], dir.path().join("model.safetensors")).unwrap();
    let e = qwen_vl_from_path(dir.path(), Kind::Float, Device::Cpu, Mode::Alloc).err().unwrap().to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
    assert!(e.contains("unexpected: model.visual.extra.weight"), "{e}");
    assert!(e.contains("missing: model.language_model.embed_tokens.weight"), "{e}");
}

/// The defaults are Qwen2.5-VL-7B: built planned (no memory), the parameter count without
/// `lm_head` is 7 747 169 280, and with lm_head's 152064 × 3584 it is 8 292 166 656 (the
/// checkpoint's "8.29 B"). From the config: text 544 997 376 (embed) + 28 × 233 057 792 + 3584
/// (norm); vision 1 505 280 (patch) + 32 × 19 702 200 + 44 574 464 (merger).
#[test]
fn qwen_vl_defaults_build_qwen2_5_vl_7b() {
    let cfg = QwenVlConfig::qwen2_5_vl_7b();
    let store = Store::new(Mode::Plan, Kind::BFloat16, Device::Cpu);
    let _m = QwenVlModel::new(&store, &cfg);
    assert_eq!(store.parameter_count(), 7_747_169_280);
    assert_eq!(store.parameter_count() + 152064 * 3584, 8_292_166_656);
    let shapes: std::collections::HashMap<String, Vec<i64>> = store.shapes().into_iter().collect();
    for (n, s) in [
        ("model.language_model.layers.27.self_attn.k_proj.weight", vec![512, 3584]),
        ("model.language_model.layers.0.self_attn.q_proj.bias", vec![3584]),
        ("model.visual.patch_embed.proj.weight", vec![1280, 3, 2, 14, 14]),
        ("model.visual.blocks.31.attn.qkv.weight", vec![3840, 1280]),
        ("model.visual.merger.mlp.0.weight", vec![5120, 5120]),
        ("model.visual.merger.mlp.2.weight", vec![3584, 5120]),
    ] {
        assert_eq!(shapes.get(n), Some(&s), "{n}");
    }
    assert!(!shapes.contains_key("model.language_model.layers.0.self_attn.o_proj.bias"));
    // 12 tensors per decoder layer and per vision block; embed + norm; patch embed + merger (5).
    assert_eq!(shapes.len(), 28 * 12 + 2 + 32 * 12 + 6);
}

/// Both config layouts read alike; what this module does not build is refused by name.
#[test]
fn qwen_vl_config_layouts_and_refusals() {
    let p = Path::new("text_encoder/config.json");
    let nested = json!({"text_config": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}},
        "vision_config": {"out_hidden_size": 16}});
    let flat = json!({"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "vision_config": {"out_hidden_size": 16}});
    let (a, b) = (QwenVlConfig::from_value(p, &nested).unwrap(), QwenVlConfig::from_value(p, &flat).unwrap());
    assert_eq!(a, b);
    assert_eq!((a.text.num_hidden_layers, a.vision.depth, a.vision.hidden_size), (28, 32, 1280));
    for (bad, want) in [
        (
            json!({"rope_scaling": {"rope_type": "yarn"}}),
            "field `rope_parameters.rope_type`: \"yarn\" is not supported",
        ),
        (json!({"use_sliding_window": true}), "field `use_sliding_window`: true is not supported"),
        (json!({"hidden_act": "gelu"}), "field `hidden_act`: \"gelu\" is not supported"),
        (json!({"rope_scaling": {"mrope_section": [16, 24, 16]}}), "must sum to head_dim / 2 = 64"),
        (json!({"vision_config": {"out_hidden_size": 2048}}), "must equal the text hidden_size 3584"),
        (json!({"vision_config": {"rope_parameters": {"rope_type": "default"}}}), "is not \"axial\""),
    ] {
        let e = QwenVlConfig::from_value(p, &bad).unwrap_err().to_string();
        assert!(e.contains("text_encoder/config.json") && e.contains(want), "{e}");
    }
}
