//! Parity of the T5 encoder (src/t5.rs) with transformers 5.24's `T5EncoderModel`
//! (tests/python/t5_oracle.py): tiny random gated-gelu and relu encoders saved with
//! save_pretrained, their last hidden state with and without an attention mask, the relative
//! position buckets at Flux's 512 tokens, and google/t5-v1_1-xxl's name → shape table.
//!
//! Tolerance: 1e-5 absolute on outputs of magnitude O(1) (the RMS norm at the end rescales to
//! unit size; max |x| is printed). Both sides run the same libtorch kernels in fp32, in a
//! different op sequence only where we fuse (gelu's tanh form is one kernel here, five ops in
//! transformers' NewGELUActivation: a few ulp per element) or reshape differently, so results
//! differ by re-association and per-element rounding. The longest dot product is over d_ff = 64
//! (wo) here: √64 · ε ≈ 8 · 6e-8 ≈ 5e-7 relative per layer (random-sign rounding, ε = 2⁻²⁴),
//! and the norms reset the scale per block, so 2-3 blocks × 2 sub-layers add up to ≈ 3e-6 <
//! 1e-5. The relative buckets are integers computed by the same fp32 torch ops, compared
//! exactly. Measured on this machine: gated 7.2e-7 (max |x| ≈ 3.6; the gelu kernel vs
//! transformers' five-op formula), relu exactly 0; transformers' own eager path is 2.3e-6 from
//! its sdpa path.

mod common;

use common::{max_diff, PyOracle as Oracle};
use likeness_diffusion_torch::load;
use likeness_diffusion_torch::store::{Mode, Store};
use likeness_diffusion_torch::t5::{T5Config, T5EncoderModel};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

/// One oracle run per test binary (≈ 10 s: transformers' import).
fn oracle(test: &str) -> Option<&'static Oracle> {
    static O: OnceLock<Option<Oracle>> = OnceLock::new();
    O.get_or_init(|| Oracle::run("t5_oracle.py", test)).as_ref()
}

fn ids(o: &Oracle) -> Tensor {
    o.tensor("ids").to_kind(Kind::Int64)
}

fn run(model: &T5EncoderModel, ids: &Tensor, mask: Option<&Tensor>) -> Tensor {
    tch::no_grad(|| model.forward(ids, mask).unwrap()).to_kind(Kind::Float)
}

#[test]
fn t5_encoder_matches_transformers() {
    let Some(o) = oracle("t5_encoder_matches_transformers") else { return };
    let (ids, mask) = (ids(o), o.tensor("mask").to_kind(Kind::Int64));
    for name in ["gated", "relu"] {
        assert_eq!(o.json[format!("{name}_attn")], "sdpa", "the oracle ran transformers' default attention");
        let (_, model) = load::t5_encoder_from_diffusers(&o.path(name), Kind::Float, Device::Cpu).unwrap();
        assert_eq!(model.config.gated, name == "gated");
        let out = run(&model, &ids, None);
        assert!(max_diff(&out, &o.tensor(&format!("{name}_out")), &format!("{name}, no mask")) <= TOL);
        let masked = run(&model, &ids, Some(&mask));
        assert!(max_diff(&masked, &o.tensor(&format!("{name}_masked")), &format!("{name}, masked")) <= TOL);
        // transformers' eager path agrees (the comparison is about T5, not one attention kernel).
        assert!(max_diff(&masked, &o.tensor(&format!("{name}_eager")), &format!("{name}, masked vs eager")) <= TOL);
        // The mask matters for the padded prompt only (else the masked comparison proves nothing).
        assert!(max_diff(&masked.get(0), &out.get(0), "unpadded prompt, mask vs none") <= TOL);
        assert!(max_diff(&masked.get(1), &out.get(1), "padded prompt, mask vs none") > 100.0 * TOL);
        // A bool mask is the same mask.
        assert!(run(&model, &ids, Some(&mask.ne(0))).equal(&masked));
    }
}

#[test]
fn relative_position_buckets_match_transformers_at_512_tokens() {
    // Flux's max_sequence_length with t5-v1_1's 32 buckets / 128 distance: every relative
    // position in -511..=511, the log branch and the clamp past 128 included. Exact: they are
    // integers.
    let Some(o) = oracle("relative_position_buckets_match_transformers_at_512_tokens") else { return };
    let store = Store::new(Mode::Plan, Kind::Float, Device::Cpu);
    let model = T5EncoderModel::new(&store, &T5Config::t5_v1_1_xxl());
    let ours = model.relative_position_bucket(512, 512);
    let want = o.tensor("buckets_512").to_kind(Kind::Int64);
    let wrong = ours.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(wrong, 0, "{wrong} of 512² buckets differ from transformers'");
}

#[test]
fn t5_v1_1_xxl_layout_matches_transformers() {
    // Flux's text_encoder_2, planned (no weights): every name and shape transformers builds,
    // less the tied `encoder.embed_tokens.weight` (= `shared.weight`), and 4,762,310,656
    // parameters; its config.json (as transformers writes it) parses to the same config.
    let Some(o) = oracle("t5_v1_1_xxl_layout_matches_transformers") else { return };
    let cfg = T5Config::from_file(&o.path("xxl/config.json")).unwrap();
    assert_eq!(cfg, T5Config::t5_v1_1_xxl());
    let store = Store::new(Mode::Plan, Kind::BFloat16, Device::Cpu);
    T5EncoderModel::new(&store, &cfg);
    let mut want: Vec<(String, Vec<i64>)> = o.json["xxl_shapes"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(n, _)| *n != "encoder.embed_tokens.weight")
        .map(|(n, s)| (n.clone(), s.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
        .collect();
    let mut ours = store.shapes();
    want.sort();
    ours.sort();
    assert_eq!(ours, want);
    assert_eq!(store.parameter_count(), 4_762_310_656);
}

/// The gated model's tensors, written back under other layouts: sharded with an index, the
/// embedding under its tied name, one single file.
#[test]
fn t5_sharded_tied_and_single_file_layouts_load_the_same() {
    let Some(o) = oracle("t5_sharded_tied_and_single_file_layouts_load_the_same") else { return };
    let src = o.path("gated");
    let (_, base) = load::t5_encoder_from_diffusers(&src, Kind::Float, Device::Cpu).unwrap();
    let want = run(&base, &ids(o), None);

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let all = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let all: Vec<(String, Tensor)> = all
        .into_iter()
        .map(|(n, t)| (if n == "shared.weight" { "encoder.embed_tokens.weight".into() } else { n }, t))
        .collect();
    let (a, b): (Vec<_>, Vec<_>) =
        all.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).partition(|(n, _)| n.contains("block.0."));
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", &a), ("model-00002-of-00002.safetensors", &b)] {
        Tensor::write_safetensors(part, dir.path().join(file)).unwrap();
        for (n, _) in part.iter() {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (_, sharded) = load::t5_encoder_from_diffusers(dir.path(), Kind::Float, Device::Cpu).unwrap();
    assert!(run(&sharded, &ids(o), None).equal(&want), "sharded + tied name");

    let cfg = T5Config::from_file(&src.join("config.json")).unwrap();
    let (_, single) =
        load::t5_encoder_from_single_file(&src.join("model.safetensors"), &cfg, Kind::Float, Device::Cpu).unwrap();
    assert!(run(&single, &ids(o), None).equal(&want), "single file");

    // A missing tensor is named.
    let file = dir.path().join("broken.safetensors");
    let kept: Vec<_> = all.iter().filter(|(n, _)| !n.ends_with("relative_attention_bias.weight")).collect();
    Tensor::write_safetensors(&kept.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), &file).unwrap();
    let e = load::t5_encoder_from_single_file(&file, &cfg, Kind::Float, Device::Cpu).err().expect("loaded").to_string();
    assert!(e.contains("missing: encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"), "{e}");
}

#[test]
fn t5_in_bf16_tracks_fp32() {
    // bf16 weights and activations (the RMS norm's variance still in fp32): bf16 keeps 8
    // significant bits (2⁻⁸ ≈ 3.9e-3 relative per rounding); weights and each activation are
    // rounded, the norms reset the scale per block, so ≈ 6 sub-layers · 3.9e-3 ≈ 0.025
    // relative; bounded at 0.1 · max|x| — this checks that a bf16 store runs and casts (a wrong
    // cast gives O(max|x|) garbage), not bf16 accuracy.
    let Some(o) = oracle("t5_in_bf16_tracks_fp32") else { return };
    let (store, model) = load::t5_encoder_from_diffusers(&o.path("gated"), Kind::BFloat16, Device::Cpu).unwrap();
    assert!(store.named_parameters().iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    let mask = o.tensor("mask").to_kind(Kind::Int64);
    let y = tch::no_grad(|| model.forward(&ids(o), Some(&mask)).unwrap());
    assert_eq!(y.kind(), Kind::BFloat16);
    let want = o.tensor("gated_masked");
    let m = want.abs().max().double_value(&[]);
    assert!(max_diff(&y.to_kind(Kind::Float), &want, "bf16 vs fp32 transformers") <= 0.1 * m);
}
