//! Issue 16, part 2: DTBack's identity injection (likeness_diffusion_torch::identity) on the
//! tiny random Flux.1-dev: gradients against central finite differences in f64, checkpointing
//! giving the same gradients, an untrained injection leaving the base model's output unchanged,
//! and the injection weights exported and read back.
//!
//! Finite differences: central at h = 1e-4 and 2h, combined by Richardson extrapolation, in
//! f64: the truncation error is O(h⁴) ≈ 1e-16, the rounding error ≈ κ·ε_f64·|L|/h (κ ≤ 64 for
//! the sums and the depth); the bound is 1e-6 relative plus that rounding term (a wrong
//! gradient path is off by O(1) relative).

mod common;

use common::{tiny, MAX_SEQ};
use likeness_diffusion_torch::Backbone;
use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::abi::NamedView;
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, OptimizerStep, StepContext, Texts};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// A small injection for the tiny transformer (width 16·…): 3 face + 2 body tokens.
fn identity() -> Value {
    json!({"num_face_latents": 3, "num_body_latents": 2, "face_dim": 8, "body_dim": 6, "width": 8,
           "depth": 2, "heads": 2, "context_tokens": 2, "ca_heads": 2, "ca_head_dim": 4,
           "double_interval": 1, "single_interval": 1})
}

fn create(dir: &std::path::Path, extra: Value) -> FluxLora {
    let mut c = json!({"pretrained": dir, "max_sequence_length": MAX_SEQ, "identity": identity()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    FluxLora::create(&c.to_string(), Device::CPU, 3).unwrap_or_else(|e| panic!("create: {e}"))
}

/// Gives the zero-initialised cross-attention outputs small random values, so every injection
/// weight has a gradient.
fn wake(m: &FluxLora) {
    let inj = m.backbone().identity().expect("installed");
    tch::no_grad(|| {
        for (i, (n, mut t)) in inj.parameters().into_iter().enumerate() {
            if n.contains(".attn.to_out.") && (n.starts_with("double") || n.starts_with("single")) {
                t.copy_(&(normals(i as u64, &t.size()) * 0.3));
            }
        }
    });
}

struct Case {
    x: Tensor,
    t: Tensor,
    cond: Vec<Tensor>,
    face: Tensor,
    body: Tensor,
    probe: Tensor,
}

/// N(0, 1) values of `shape` from their own ChaCha stream (libtorch's generator is shared by
/// the tests running in parallel threads).
fn normals(seed: u64, shape: &[i64]) -> Tensor {
    let n = shape.iter().product::<i64>() as usize;
    Tensor::from_slice(&likeness_diffusion_torch::rng::noise(seed, n)).view(shape)
}

fn case(m: &FluxLora) -> Case {
    let cond: Vec<Tensor> = m.backbone().encode_texts(&["a person", "a cat"], false).unwrap();
    Case {
        x: normals(100, &[2, 16, 8, 6]),
        t: Tensor::from_slice(&[700.0f32, 250.0]),
        cond,
        face: normals(101, &[2, 8]),
        body: normals(102, &[2, 6]),
        probe: normals(103, &[2, 16, 8, 6]),
    }
}

/// L = ⟨probe, v(x, t; tokens)⟩ with a graph into the injection (checkpointed or not).
fn loss(m: &FluxLora, c: &Case, checkpointed: bool) -> Tensor {
    let b = m.backbone();
    let tokens = b.identity().unwrap().tokens(&c.face, Some(&c.body)).unwrap();
    let mut cond: Vec<Tensor> = c.cond.iter().map(|t| t.shallow_clone()).collect();
    cond.push(tokens);
    if checkpointed {
        let (out, replay) = b.denoise_checkpointed(&c.x, &c.t, &cond, None).unwrap();
        let l = (&out * &c.probe).sum(Kind::Double);
        l.backward();
        replay(b);
        l.detach()
    } else {
        (b.denoise(&c.x, &c.t, &cond, None).unwrap() * &c.probe).sum(Kind::Double)
    }
}

#[test]
fn identity_injection_gradients_match_finite_differences() {
    let Some((dir, _)) = tiny("identity_injection_gradients_match_finite_differences") else { return };
    let m = create(dir, json!({"precision": "fp64"}));
    wake(&m);
    let c = case(&m);
    let params = m.backbone().identity().unwrap().parameters();
    loss(&m, &c, false).backward();
    let l0 = tch::no_grad(|| loss(&m, &c, false)).double_value(&[]).abs();
    let h = 1e-4;
    // Rounding: each L carries ≈ ε·|L|·κ (κ ≤ 64 for the sums and the network's depth), divided
    // by h in the difference; Richardson's combination of h and 2h leaves an O(h⁴) truncation
    // (≈ 1e-16 here).
    let rounding = 64.0 * f64::EPSILON * l0 / h;
    let mut checked = 0;
    for (name, p) in &params {
        // One entry of every tensor kind: the resamplers' in/latents/attention/MLP/out and the
        // injection points' norm, q, k/v and out.
        if !(name.ends_with("proj_in.weight")
            || name.ends_with("latents")
            || name.ends_with("attn.to_q.weight")
            || name.ends_with("attn.to_k.weight")
            || name.ends_with("ff_in.weight")
            || name.ends_with("norm_out.weight")
            || name.ends_with("to_out.0.weight"))
        {
            continue;
        }
        let g = p.grad().flatten(0, -1).double_value(&[1]);
        let at = |delta: f64| {
            tch::no_grad(|| {
                let flat = p.flatten(0, -1);
                let v = flat.double_value(&[1]);
                let _ = flat.get(1).fill_(v + delta);
                let l = loss(&m, &c, false).double_value(&[]);
                let _ = flat.get(1).fill_(v);
                l
            })
        };
        let d1 = (at(h) - at(-h)) / (2.0 * h);
        let d2 = (at(2.0 * h) - at(-2.0 * h)) / (4.0 * h);
        let fd = (4.0 * d1 - d2) / 3.0;
        assert!(
            (g - fd).abs() <= 1e-6 * fd.abs() + rounding,
            "{name}[1]: autograd {g:e} vs finite differences {fd:e} (|L| = {l0:.3e})"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} tensors checked");
}

#[test]
fn identity_injection_checkpointed_gradients_equal_the_plain_ones() {
    let Some((dir, _)) = tiny("identity_injection_checkpointed_gradients_equal_the_plain_ones") else { return };
    let grads = |checkpointed: bool| {
        let m = create(dir, json!({"precision": "fp64"}));
        wake(&m);
        let c = case(&m);
        let l = loss(&m, &c, checkpointed);
        if !checkpointed {
            l.backward();
        }
        m.backbone()
            .identity()
            .unwrap()
            .parameters()
            .iter()
            .map(|(n, p)| (n.clone(), p.grad().copy()))
            .collect::<Vec<_>>()
    };
    let (a, b) = (grads(false), grads(true));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        // The replay recomputes the same ops in the same order: equal up to f64 re-association
        // in autograd's accumulation (≤ 1e-12 relative).
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d <= 1e-12 * (1.0 + x.abs().max().double_value(&[])), "{n}: checkpointed gradient differs by {d}");
    }
}

#[test]
fn an_untrained_injection_leaves_the_base_model_unchanged() {
    let Some((dir, _)) = tiny("an_untrained_injection_leaves_the_base_model_unchanged") else { return };
    let m = create(dir, json!({"precision": "fp64"}));
    let c = case(&m);
    let with = tch::no_grad(|| loss(&m, &c, false)).double_value(&[]);
    let mut plain = json!({"pretrained": dir, "max_sequence_length": MAX_SEQ, "precision": "fp64"});
    plain["lora_rank"] = json!(1);
    let base = FluxLora::create(&plain.to_string(), Device::CPU, 3).unwrap();
    let v = tch::no_grad(|| base.backbone().denoise(&c.x, &c.t, &c.cond, None).unwrap());
    let without = (v * &c.probe).sum(Kind::Double).double_value(&[]);
    assert_eq!(with, without, "zero-initialised cross-attention outputs add exactly 0");
}

/// Through the ABI: a training step with `face_embedding` / `body_embedding` moves the injection
/// (and only it: no LoRA without train_lora); the `identity` export read back through
/// `identity_weights` restores it.
#[test]
fn identity_trains_through_the_abi_and_round_trips() {
    let Some((dir, _)) = tiny("identity_trains_through_the_abi_and_round_trips") else { return };
    let mut m = create(dir, json!({"decode_pixels": false}));
    assert!(m.lora_parameters().iter().all(|(n, _)| n.starts_with("identity.")), "the injection alone trains");
    let target = CpuTensor::new(vec![1, 3, 16, 12], likeness_sdk::testing::uniform_f32(1, 3 * 16 * 12, 0.0, 1.0));
    let face = CpuTensor::new(vec![1, 8], likeness_sdk::testing::uniform_f32(2, 8, -1.0, 1.0));
    let body = CpuTensor::new(vec![1, 6], likeness_sdk::testing::uniform_f32(3, 6, -1.0, 1.0));
    let views = [
        NamedView { name: RStr::from_str("target"), view: target.view() },
        NamedView { name: RStr::from_str("face_embedding"), view: face.view() },
        NamedView { name: RStr::from_str("body_embedding"), view: body.view() },
    ];
    let caps = [RStr::from_str("a person")];
    let texts = [likeness_sdk::abi::NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&caps) }];
    let seeds = [5u64];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
    let before: Vec<Tensor> = m.lora_parameters().iter().map(|(_, p)| p.detach().copy()).collect();
    m.forward_batch(
        Inputs::new(RSlice::from_slice(&views)),
        Texts::new(RSlice::from_slice(&texts)),
        &ctx,
        ForwardMode::Train,
    )
    .unwrap();
    m.backward_scaled(&[], 1.0).unwrap();
    let s =
        OptimizerStep { step: 1, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 0.0 };
    m.optimizer_step(s).unwrap();
    let after = m.lora_parameters();
    assert!(
        after.iter().zip(&before).any(|((n, p), b)| n.contains(".attn.to_out.") && !p.detach().equal(b)),
        "the cross-attention outputs move at step 1"
    );
    let out = tempfile::tempdir().unwrap();
    let files = m.export_adapter(out.path(), "identity", &serde_json::Map::new()).unwrap();
    let back = create(dir, json!({"decode_pixels": false, "identity_weights": files[0]}));
    for ((n, x), (_, y)) in after.iter().zip(back.lora_parameters().iter()) {
        assert!(x.detach().equal(y), "{n} not restored");
    }
    let e = m.forward_batch(
        Inputs::new(RSlice::from_slice(&views[..1])),
        Texts::new(RSlice::from_slice(&texts)),
        &ctx,
        ForwardMode::Train,
    );
    let e = e.err().expect("refused");
    assert!(e.message.contains("face_embedding"), "{e}");
}

fn identity_step(m: &mut FluxLora, step: u64) {
    let target = CpuTensor::new(vec![1, 3, 16, 12], likeness_sdk::testing::uniform_f32(step, 3 * 16 * 12, 0.0, 1.0));
    let face = CpuTensor::new(vec![1, 8], likeness_sdk::testing::uniform_f32(step + 10, 8, -1.0, 1.0));
    let body = CpuTensor::new(vec![1, 6], likeness_sdk::testing::uniform_f32(step + 20, 6, -1.0, 1.0));
    let views = [
        NamedView { name: RStr::from_str("target"), view: target.view() },
        NamedView { name: RStr::from_str("face_embedding"), view: face.view() },
        NamedView { name: RStr::from_str("body_embedding"), view: body.view() },
    ];
    let seeds = [likeness_sdk::abi::sample_seed(4, step, 0, 0)];
    let ctx = StepContext { optimizer_step: step, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
    // No caption: identity.prompt stands in (seed 000's bundles have none).
    m.forward_batch(Inputs::new(RSlice::from_slice(&views)), Texts::none(), &ctx, ForwardMode::Train).unwrap();
    m.backward_scaled(&[], 1.0).unwrap();
    let s =
        OptimizerStep { step, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-5, max_grad_norm: 1.0 };
    m.optimizer_step(s).unwrap();
    m.zero_grad().unwrap();
}

/// A DTBack run saved after step 2 and resumed into a fresh instance takes step 3 bit for bit
/// as the uninterrupted run (the injection's weights and AdamW moments are the saved state).
#[test]
fn identity_resumes_bit_identically() {
    let Some((dir, _)) = tiny("identity_resumes_bit_identically") else { return };
    let cfg = json!({"decode_pixels": false});
    let mut whole = create(dir, cfg.clone());
    for step in 1..=3 {
        identity_step(&mut whole, step);
    }
    let mut first = create(dir, cfg.clone());
    for step in 1..=2 {
        identity_step(&mut first, step);
    }
    let saved = tempfile::tempdir().unwrap();
    first.save_state(saved.path(), true).unwrap();
    drop(first);
    let mut resumed = create(dir, cfg);
    resumed.load_state(saved.path()).unwrap();
    identity_step(&mut resumed, 3);
    for ((n, x), (_, y)) in whole.lora_parameters().iter().zip(resumed.lora_parameters().iter()) {
        assert!(x.equal(y), "{n} differs after the resumed step");
    }
}
