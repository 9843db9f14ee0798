//! Issue 16: PairEdit's objective (seed 003) on the tiny random Flux.1-dev, against PairEdit's
//! own code path (tests/python/pairedit_oracle.py: its `add_noise_scale`, its two LoRA networks
//! on the same Linears built as its `utils/lora.py` builds them, loss1 then loss2 with the content
//! weights frozen, two backward passes), from the same weights, latents, noise and t index.
//!
//! Tolerances. The transformer is bitwise diffusers' given equal inputs (tests/flux.rs) and the
//! LoRA path is the same ops in the same order (x·downᵀ·upᵀ·scale added to the base output), so
//! what differs is the empty prompt's encodings (T5/CLIP f32 re-association, ≈ 1e-6 absolute on
//! O(1) values; tests/pipeline.rs) and σ (f64 here, f32 in diffusers: ≤ 6e-8). Both enter the
//! prediction linearly through O(1)-Lipschitz layers of a 2-block model, so the predictions agree
//! to ≈ 1e-5 relative, the losses (means of squares) to ≈ 2e-5 relative and the gradients (one
//! backward through the same layers) to ≈ 1e-5 of each network's largest gradient entry (measured:
//! ≤ 3e-6): the bounds below. A wrong target set, a swapped pair of files or a content LoRA that
//! leaks into loss2 moves them by O(1) relative (pairedit_oracle.py's own mutation checks).

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::{python, read_f32, tiny, MAX_SEQ};
use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::abi::{NamedView, SampleRequest};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, OptimizerStep, StepContext, Texts};
use serde_json::{json, Value};
use tch::Tensor;

struct Setup {
    model: &'static Path,
    out: tempfile::TempDir,
    json: Value,
}

fn setup(test: &str) -> Option<&'static Setup> {
    static S: OnceLock<Setup> = OnceLock::new();
    let (model, py) = tiny(test)?;
    Some(S.get_or_init(|| {
        let out = tempfile::tempdir().unwrap();
        let args = ["--model".as_ref(), model.as_os_str(), "--out".as_ref(), out.path().as_os_str()];
        python(&py, "pairedit_oracle.py", &args);
        let json = serde_json::from_str(&std::fs::read_to_string(out.path().join("oracle.json")).unwrap()).unwrap();
        Setup { model, out, json }
    }))
}

fn create(model: &Path, extra: Value) -> FluxLora {
    let mut c = json!({"pretrained": model, "max_sequence_length": MAX_SEQ, "decode_pixels": false});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    FluxLora::create(&c.to_string(), Device::CPU, 7).unwrap_or_else(|e| panic!("create: {e}"))
}

impl Setup {
    fn f64(&self, k: &str) -> f64 {
        self.json[k].as_f64().unwrap_or_else(|| panic!("oracle.json has no number `{k}`"))
    }

    /// (PairEdit's module name, diffusers path) of every LoRA module.
    fn modules(&self) -> Vec<(String, String)> {
        serde_json::from_str(&std::fs::read_to_string(self.out.path().join("modules.json")).unwrap()).unwrap()
    }

    fn latents(&self, name: &str) -> Tensor {
        read_f32(self.out.path(), name, &[1, 16, 8, 6])
    }

    /// The model with the oracle's two networks loaded from the files it wrote.
    fn model(&self) -> FluxLora {
        create(
            self.model,
            json!({
                "lora": self.out.path().join("semantic.safetensors"),
                "lora_content": self.out.path().join("content.safetensors"),
                "pairedit": {
                    "cfg_eta": self.f64("cfg_eta"), "noise_scale": self.f64("noise_scale"),
                    "num_inference_steps": self.json["num_inference_steps"], "guidance_scale": self.f64("guidance"),
                },
            }),
        )
    }
}

#[test]
fn pairedit_losses_and_gradients_match_pairedits_own_code_path() {
    let Some(s) = setup("pairedit_losses_and_gradients_match_pairedits_own_code_path") else { return };
    let m = s.model();
    let idx = s.json["t_index"].as_u64().unwrap() as usize;
    let sigma = m.pairedit_sigma(idx, 8, 6).unwrap();
    assert!((sigma - s.f64("sigma")).abs() <= 1e-7, "σ[{idx}] {sigma} vs the scheduler's {}", s.f64("sigma"));
    let (za, zb, eps) = (s.latents("z_src"), s.latents("z_tgt"), s.latents("eps"));
    let losses = m.pairedit_losses(&za, &zb, &eps, &[idx], None).unwrap();
    for (k, got) in ["loss1", "loss2"].iter().zip(&losses.per_pass) {
        let want = s.f64(k);
        assert!((got - want).abs() <= 2e-5 * want.abs(), "{k}: {got} vs PairEdit's {want}");
    }
    losses.total.backward();
    let names = s.modules();
    assert!(!names.is_empty());
    let params = m.lora_parameters();
    // (ours, PairEdit's) gradient of every weight, then each network's largest entry: the scale
    // the bound is relative to (a context-stream weight with a gradient 40× smaller than the
    // network's largest carries the same absolute ≈ 1e-9 from the encodings, so a per-tensor
    // relative bound would measure the encodings' error, not the objective).
    let mut pairs = Vec::new();
    for (lora_name, path) in &names {
        for (net, prefix) in [("content", "transformer.content."), ("semantic", "transformer.")] {
            for (ours, theirs) in [("lora_A", "lora_down"), ("lora_B", "lora_up")] {
                let key = format!("{prefix}{path}.{ours}.weight");
                let p = &params.iter().find(|(n, _)| *n == key).unwrap_or_else(|| panic!("no parameter {key}")).1;
                let want = read_f32(s.out.path(), &format!("grad_{net}_{lora_name}.{theirs}.weight"), &p.size());
                pairs.push((net, format!("{lora_name}.{theirs}"), p.grad(), want));
            }
        }
    }
    let scale =
        |net: &str| pairs.iter().filter(|p| p.0 == net).map(|p| p.3.abs().max().double_value(&[])).fold(0.0, f64::max);
    let (sc, ss) = (scale("content"), scale("semantic"));
    assert!(sc > 0.0 && ss > 0.0, "both networks have gradients");
    let mut checked = 0;
    for (net, name, got, want) in &pairs {
        let d = (got - want).abs().max().double_value(&[]) / if *net == "content" { sc } else { ss };
        assert!(d <= 1e-5, "{net} {name}: gradient differs by {d:.2e} of the network's largest");
        checked += 1;
    }
    assert_eq!(checked, names.len() * 4);
}

/// The oracle's weights exported as `pairedit` and read back give the same losses (to bf16's
/// rounding of the weights, which PairEdit's `save_weights` applies too: 2⁻⁸ relative per weight,
/// ≲ 1e-2 relative on a loss), and the files hold PairEdit's keys.
#[test]
fn pairedit_export_round_trips_in_pairedits_layout() {
    let Some(s) = setup("pairedit_export_round_trips_in_pairedits_layout") else { return };
    let mut m = s.model();
    let dir = tempfile::tempdir().unwrap();
    let files = m.export_adapter(dir.path(), "pairedit", &serde_json::Map::new()).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let names = s.modules();
    for f in ["semantic.safetensors", "content.safetensors"] {
        let h = likeness_sdk::st::read_header(&dir.path().join(f)).unwrap();
        let mut keys: Vec<String> = h.tensors.iter().map(|t| t.name.clone()).collect();
        keys.sort();
        let mut want: Vec<String> = names
            .iter()
            .flat_map(|(n, _)| ["alpha", "lora_down.weight", "lora_up.weight"].map(|k| format!("{n}.{k}")))
            .collect();
        want.sort();
        assert_eq!(keys, want, "{f}");
    }
    let back = create(
        s.model,
        json!({"lora": dir.path().join("semantic.safetensors"), "lora_content": dir.path().join("content.safetensors"),
               "pairedit": {"cfg_eta": s.f64("cfg_eta"), "noise_scale": s.f64("noise_scale"), "guidance_scale": s.f64("guidance")}}),
    );
    let idx = s.json["t_index"].as_u64().unwrap() as usize;
    let (za, zb, eps) = (s.latents("z_src"), s.latents("z_tgt"), s.latents("eps"));
    let a = m.pairedit_losses(&za, &zb, &eps, &[idx], None).unwrap().per_pass;
    let b = back.pairedit_losses(&za, &zb, &eps, &[idx], None).unwrap().per_pass;
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-2 * x.abs(), "{a:?} vs {b:?}");
    }
}

fn image(seed: u64) -> CpuTensor<f32> {
    CpuTensor::new(vec![1, 3, 16, 12], likeness_sdk::testing::uniform_f32(seed, 3 * 16 * 12, 0.0, 1.0))
}

/// One training step through the ABI: `target` and `control` in, the internal loss out, both
/// networks move (content by loss1, semantic by loss2), and without `control` the error names it.
#[test]
fn pairedit_trains_both_networks_through_the_abi() {
    let Some((dir, _)) = tiny("pairedit_trains_both_networks_through_the_abi") else { return };
    let mut m = create(dir, json!({"lora_rank": 2, "pairedit": {"guidance_scale": 3.5}}));
    let (t, c) = (image(1), image(2));
    let views = [
        NamedView { name: RStr::from_str("target"), view: t.view() },
        NamedView { name: RStr::from_str("control"), view: c.view() },
    ];
    let seeds = [11u64];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
    let before: Vec<Tensor> = m.lora_parameters().iter().map(|(_, p)| p.detach().copy()).collect();
    let out =
        m.forward_batch(Inputs::new(RSlice::from_slice(&views)), Texts::none(), &ctx, ForwardMode::Train).unwrap();
    assert!(out.internal_loss.unwrap().is_finite());
    m.backward_scaled(&[], 1.0).unwrap();
    let step = OptimizerStep {
        step: 1,
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: 0.0,
    };
    m.optimizer_step(step).unwrap();
    let moved: Vec<(String, bool)> =
        m.lora_parameters().iter().zip(&before).map(|((n, p), b)| (n.clone(), !p.detach().equal(b))).collect();
    // Up weights start at zero, so each network's B moves at step 1 (A's gradient is 0 through B = 0).
    for net in ["transformer.content.", "transformer.transformer_blocks"] {
        assert!(
            moved.iter().any(|(n, mv)| n.starts_with(net) && n.ends_with("lora_B.weight") && *mv),
            "{net}: {moved:?}"
        );
    }
    let only = [NamedView { name: RStr::from_str("target"), view: t.view() }];
    let e = m
        .forward_batch(Inputs::new(RSlice::from_slice(&only)), Texts::none(), &ctx, ForwardMode::Train)
        .err()
        .expect("refused");
    assert!(e.message.contains("control"), "{e}");
}

/// `sample_adapter_skip`: the adapter is applied at steps i > k only, so k ≥ the last step gives
/// the base model's image, and k = 0 an image that differs from both.
#[test]
fn sample_adapter_skip_turns_the_adapter_on_after_step_k() {
    let Some(s) = setup("sample_adapter_skip_turns_the_adapter_on_after_step_k") else { return };
    let sample = |skip: Option<usize>, scale: f64| {
        let mut extra = json!({"lora": s.out.path().join("semantic.safetensors"), "resolution": 16});
        if let Some(k) = skip {
            extra["sample_adapter_skip"] = json!(k);
        }
        let mut m = create(s.model, extra);
        let prompts = [RStr::from_str("a person")];
        let r = SampleRequest {
            prompts: RSlice::from_slice(&prompts),
            negative_prompts: RSlice::from_slice(&[]),
            images: RSlice::from_slice(&[]),
            width: 0,
            height: 0,
            steps: 4,
            guidance: 0.0,
            seed: 3,
            adapter_scale: scale,
        };
        let t = m.sample(&r).unwrap();
        CpuTensor::<f32>::from_managed(&t, "sample").unwrap().data
    };
    let base = sample(None, 0.0);
    assert_eq!(sample(Some(3), 1.0), base, "skip 3 of 4 steps: the adapter is never on");
    let late = sample(Some(0), 1.0);
    assert_ne!(late, base);
    assert_ne!(late, sample(None, 1.0), "skip 0 leaves step 0 to the base model");
}

/// PairEdit's own `.pt` (torch.save of its bf16 state dict) is read through the SDK's
/// weights-only pickle reader, by `interface` (before any weight loads) and by `create`: the
/// weights are the safetensors file's rounded to bf16, exactly.
#[test]
fn pairedits_pickled_lora_loads_as_the_semantic_lora() {
    let Some(s) = setup("pairedits_pickled_lora_loads_as_the_semantic_lora") else { return };
    let pt = s.out.path().join("semantic.pt");
    let cfg = json!({"pretrained": s.model, "max_sequence_length": MAX_SEQ, "lora": pt});
    FluxLora::interface(&cfg.to_string()).unwrap_or_else(|e| panic!("interface: {e}"));
    let from_pt = create(s.model, json!({"lora": pt}));
    let from_st = create(s.model, json!({"lora": s.out.path().join("semantic.safetensors")}));
    let (a, b) = (from_pt.lora_parameters(), from_st.lora_parameters());
    assert_eq!(a.len(), s.modules().len() * 2);
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let rounded = y.to_kind(tch::Kind::BFloat16).to_kind(tch::Kind::Float);
        assert!(x.equal(&rounded), "{n}: the .pt weight is not the bf16 of the safetensors one");
    }
}

fn pair_views<'a>(t: &'a CpuTensor<f32>, c: &'a CpuTensor<f32>) -> [NamedView<'a>; 2] {
    [
        NamedView { name: RStr::from_str("target"), view: t.view() },
        NamedView { name: RStr::from_str("control"), view: c.view() },
    ]
}

fn train_step(m: &mut FluxLora, step: u64, t: &CpuTensor<f32>, c: &CpuTensor<f32>) {
    let views = pair_views(t, c);
    let seeds = [likeness_sdk::abi::sample_seed(9, step, 0, 0)];
    let ctx = StepContext { optimizer_step: step, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
    m.forward_batch(Inputs::new(RSlice::from_slice(&views)), Texts::none(), &ctx, ForwardMode::Train).unwrap();
    m.backward_scaled(&[], 1.0).unwrap();
    let s =
        OptimizerStep { step, lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: 0.0 };
    m.optimizer_step(s).unwrap();
    m.zero_grad().unwrap();
}

/// A PairEdit run saved after step 2 and resumed into a fresh instance takes step 3 bit for bit
/// as the uninterrupted run: both networks' weights and AdamW moments are in the saved state.
#[test]
fn pairedit_resumes_bit_identically() {
    let Some((dir, _)) = tiny("pairedit_resumes_bit_identically") else { return };
    let cfg = json!({"lora_rank": 2, "pairedit": {"guidance_scale": 3.5, "noise_scale": 2.0}});
    let (t, c) = (image(5), image(6));
    let mut whole = create(dir, cfg.clone());
    for step in 1..=3 {
        train_step(&mut whole, step, &t, &c);
    }
    let mut first = create(dir, cfg.clone());
    for step in 1..=2 {
        train_step(&mut first, step, &t, &c);
    }
    let saved = tempfile::tempdir().unwrap();
    first.save_state(saved.path(), true).unwrap();
    drop(first);
    let mut resumed = create(dir, cfg);
    resumed.load_state(saved.path()).unwrap();
    train_step(&mut resumed, 3, &t, &c);
    let (a, b) = (whole.lora_parameters(), resumed.lora_parameters());
    assert!(a.iter().any(|(n, _)| n.starts_with("transformer.content.")), "the content network is saved");
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} differs after the resumed step");
    }
}

/// `real` (train_image_real): the content LoRA on `target` alone; and editing
/// (`sample_edit_cfg` = g) takes v_c + g·(v_s − v_c): g = 1 samples as the semantic LoRA alone,
/// g = 0 as the content LoRA alone (to f32 rounding of the combination: ≈ 1e-6 on O(1) latents
/// carried through 4 Euler steps and the decode, bound 1e-4).
#[test]
fn real_image_variant_trains_on_one_image_and_edits_with_both_loras() {
    let Some(s) = setup("real_image_variant_trains_on_one_image_and_edits_with_both_loras") else { return };
    let mut m = create(s.model, json!({"lora_rank": 2, "pairedit": {"variant": "real", "guidance_scale": 3.5}}));
    let t = image(3);
    let views = [NamedView { name: RStr::from_str("target"), view: t.view() }];
    let seeds = [4u64];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
    let out =
        m.forward_batch(Inputs::new(RSlice::from_slice(&views)), Texts::none(), &ctx, ForwardMode::Train).unwrap();
    assert!(out.internal_loss.unwrap().is_finite());
    assert!(m.lora_parameters().iter().all(|(n, _)| n.starts_with("transformer.content.")), "content only");
    let sample = |extra: Value| {
        let mut m = create(s.model, extra);
        let prompts = [RStr::from_str("image of a person")];
        let r = SampleRequest {
            prompts: RSlice::from_slice(&prompts),
            negative_prompts: RSlice::from_slice(&[]),
            images: RSlice::from_slice(&[]),
            width: 16,
            height: 16,
            steps: 4,
            guidance: 0.0,
            seed: 8,
            adapter_scale: 1.0,
        };
        let t = m.sample(&r).unwrap();
        Tensor::from_slice(&CpuTensor::<f32>::from_managed(&t, "sample").unwrap().data)
    };
    let (sem, con) = (s.out.path().join("semantic.safetensors"), s.out.path().join("content.safetensors"));
    let edit = |g: f64| {
        sample(json!({"pairedit": {"variant": "real"}, "lora": sem, "lora_content": con, "sample_edit_cfg": g}))
    };
    let semantic_alone = sample(json!({"lora": sem}));
    let content_alone = sample(json!({"lora": con}));
    let d = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(d(&edit(1.0), &semantic_alone) <= 1e-4, "g = 1");
    assert!(d(&edit(0.0), &content_alone) <= 1e-4, "g = 0");
    assert!(d(&semantic_alone, &content_alone) > 1e-3, "the two LoRAs differ");
}

/// PairEdit under `gradient_checkpointing`: each pass is replayed with the content LoRA frozen
/// as it was in its forward, so the gradients equal the plain run's (the replay recomputes the
/// same ops in the same order: equal to f32 re-association in autograd's accumulation, bound
/// 1e-6 of each network's largest entry).
#[test]
fn pairedit_checkpointed_gradients_equal_the_plain_ones() {
    let Some(s) = setup("pairedit_checkpointed_gradients_equal_the_plain_ones") else { return };
    let grads = |checkpoint: bool| {
        let mut m = create(
            s.model,
            json!({"lora": s.out.path().join("semantic.safetensors"), "lora_content": s.out.path().join("content.safetensors"),
                   "gradient_checkpointing": checkpoint, "pairedit": {"guidance_scale": 3.5, "noise_scale": 1.5}}),
        );
        let (t, c) = (image(7), image(8));
        let views = pair_views(&t, &c);
        let seeds = [21u64];
        let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
        m.forward_batch(Inputs::new(RSlice::from_slice(&views)), Texts::none(), &ctx, ForwardMode::Train).unwrap();
        m.backward_scaled(&[], 1.0).unwrap();
        m.lora_parameters().into_iter().map(|(n, p)| (n, p.grad().copy())).collect::<Vec<_>>()
    };
    let (a, b) = (grads(false), grads(true));
    let scale = a.iter().map(|(_, g)| g.abs().max().double_value(&[])).fold(0.0, f64::max);
    assert!(scale > 0.0);
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d <= 1e-6 * scale, "{n}: checkpointed gradient differs by {d:e} (scale {scale:e})");
    }
}
