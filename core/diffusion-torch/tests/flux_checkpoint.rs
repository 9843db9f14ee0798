//! Per-block gradient checkpointing of the Flux transformer against libtorch's own autograd, in
//! f64 on a random tiny Flux-dev (guidance embedding) with LoRA on every Linear kind (attention,
//! both streams, MLPs, modulations, the time and guidance embedders, the head) and a text
//! input that requires grad.
//!
//! Tolerance (as tests/checkpoint.rs): both sides compute the same per-segment chain-rule terms
//! in f64 and differ only in summation order (a slot's gradient summed over its readers, the
//! joint stream's split): relative ≲ depth · √K · 2⁻⁵³ ≈ 10 · 16 · 1.1e-16 ≈ 2e-14, bound 1e-11.

mod common;

use common::{grads, rel_diff, zero};
use likeness_diffusion_torch::flux::{self, FluxConfig, FluxInputs, FluxTransformer2DModel};
use likeness_diffusion_torch::{lora, LoraConfig, LoraInit, Mode, Store};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const REL_TOL: f64 = 1e-11;

/// The global generator is seeded by the reseeding forward: one test at a time.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny_flux(dropout: f64) -> (Store, FluxTransformer2DModel) {
    let json = serde_json::json!({
        "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 12, "pooled_projection_dim": 10,
        "guidance_embeds": true, "axes_dims_rope": [2, 2, 4]
    });
    let cfg = FluxConfig::from_value(Path::new("<test>"), json).expect("tiny config");
    let store = Store::new(Mode::Alloc, Kind::Double, Device::Cpu);
    let model = FluxTransformer2DModel::new(&store, &cfg);
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (_, mut p) in store.named_parameters() {
            p.copy_(&(Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.2));
        }
    });
    let targets = ["to_q", "to_k", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj", "ff_context.net.2"]
        .into_iter()
        .chain(["proj_mlp", "proj_out", "norm.linear", "norm1.linear", "timestep_embedder.linear_1"])
        .chain(["guidance_embedder.linear_2", "x_embedder", "context_embedder"]);
    let lcfg = LoraConfig {
        r: 2,
        alpha: 3.0,
        dropout,
        target_modules: targets.map(String::from).collect(),
        init: LoraInit::Gaussian,
        conv: false,
    };
    lora::inject(&store, &lcfg).expect("inject");
    tch::no_grad(|| {
        for (_, mut p) in lora::parameters(&store) {
            p.set_data(&(Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.3));
        }
    });
    lora::set_training(&store, dropout > 0.0);
    (store, model)
}

struct Batch {
    x: Tensor,
    ctx: Tensor,
    pooled: Tensor,
    t: Tensor,
    g: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor,
    weight: Tensor,
}

fn batch() -> Batch {
    tch::manual_seed(5);
    let o = (Kind::Double, Device::Cpu);
    let (h, w) = (6, 4);
    Batch {
        x: flux::pack_latents(&Tensor::randn([2, 4, h, w], o)),
        ctx: Tensor::randn([2, 5, 12], o).set_requires_grad(true),
        pooled: Tensor::randn([2, 10], o),
        t: Tensor::from_slice(&[0.9f64, 0.3]),
        g: Tensor::from_slice(&[3.5f64, 1.0]),
        img_ids: flux::latent_image_ids(h / 2, w / 2, Device::Cpu),
        txt_ids: Tensor::zeros([5, 3], (Kind::Float, Device::Cpu)),
        weight: Tensor::randn([2, (h / 2) * (w / 2), 16], o),
    }
}

fn run(dropout: f64, plain_reseed: Option<i64>, ckpt_reseed: Option<i64>) -> (f64, usize) {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (store, model) = tiny_flux(dropout);
    let b = batch();
    let inputs = FluxInputs {
        hidden_states: &b.x,
        encoder_hidden_states: &b.ctx,
        pooled_projections: &b.pooled,
        timestep: &b.t,
        img_ids: &b.img_ids,
        txt_ids: &b.txt_ids,
        guidance: Some(&b.g),
        id_tokens: None,
    };
    let objective = |y: &Tensor| (y * &b.weight).sum(Kind::Double) + y.square().sum(Kind::Double) * 0.1;
    let out = model.forward_reseeded(&inputs, plain_reseed).unwrap();
    objective(&out).backward();
    let plain = grads(&store, &b.ctx);
    zero(&store, &b.ctx);
    let (leaf, tape) = model.forward_checkpointed(&inputs, ckpt_reseed).unwrap();
    assert!(leaf.requires_grad() && leaf.is_leaf(), "the checkpointed output is a leaf with grad");
    if plain_reseed == ckpt_reseed {
        assert_eq!((&leaf - &out).abs().max().double_value(&[]), 0.0, "checkpointed forward ≠ plain forward");
    }
    objective(&leaf).backward();
    let recomputed = tape.backward(&model);
    let (rel, scale) = rel_diff(&plain, &grads(&store, &b.ctx));
    println!("max |Δg| / max |g| = {rel:.3e} (max |g| {scale:.3e}), {recomputed} segments recomputed");
    (rel, recomputed)
}

#[test]
fn flux_checkpointed_gradients_equal_autograd() {
    let (rel, recomputed) = run(0.0, None, None);
    // conditioning + embed + 2 double + 2 single + head
    assert_eq!(recomputed, 7);
    assert!(rel <= REL_TOL, "checkpointed gradients differ from autograd's by {rel:e} (bound {REL_TOL:e})");
}

#[test]
fn flux_checkpointing_with_dropout_reseeds_the_recomputation() {
    let (rel, _) = run(0.3, Some(99), Some(99));
    assert!(rel <= REL_TOL, "reseeded checkpointing differs by {rel:e} (bound {REL_TOL:e})");
    let (rel, _) = run(0.3, Some(99), None);
    assert!(rel > 1e-3, "without reseeding the masks should differ (got {rel:e})");
}
