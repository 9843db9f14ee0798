//! Per-block gradient checkpointing of the Qwen-Image transformer against libtorch's own
//! autograd, in f64 on a random tiny model with LoRA on every Linear kind of a block (both
//! streams' attention, MLPs and modulations) and the top-level projections, edit-plus-shaped
//! inputs (the target's tokens then a control image's of another size) and a padded text mask,
//! the text input requiring grad.
//!
//! Tolerance (as tests/flux_checkpoint.rs): both sides compute the same per-segment chain-rule
//! terms in f64 and differ only in summation order: relative ≲ depth · √K · 2⁻⁵³ ≈ 2e-14,
//! bound 1e-11.

mod common;

use common::{rel_diff, zero};
use likeness_diffusion_torch::flux;
use likeness_diffusion_torch::qwen_image::{QwenImageConfig, QwenImageTransformer2DModel, QwenInputs};
use likeness_diffusion_torch::{lora, LoraConfig, LoraInit, Mode, Store};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const REL_TOL: f64 = 1e-11;

/// Every LoRA gradient (zeros where none reached: the last block's text stream feeds nothing,
/// so its `txt_mlp` / `to_add_out` get none from autograd either) and the text input's.
fn grads(store: &Store, ctx: &Tensor) -> Vec<Tensor> {
    let mut g: Vec<Tensor> = lora::parameters(store)
        .iter()
        .map(|(_, p)| if p.grad().defined() { p.grad().copy() } else { p.zeros_like() })
        .collect();
    g.push(ctx.grad().copy());
    g
}

fn tiny_qwen() -> (Store, QwenImageTransformer2DModel) {
    let json = serde_json::json!({
        "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 12, "axes_dims_rope": [2, 2, 4]
    });
    let cfg = QwenImageConfig::from_value(Path::new("<test>"), json).expect("tiny config");
    let store = Store::new(Mode::Alloc, Kind::Double, Device::Cpu);
    let model = QwenImageTransformer2DModel::new(&store, &cfg);
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (_, mut p) in store.named_parameters() {
            p.copy_(&(Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.2));
        }
    });
    let targets = ["to_q", "to_k", "add_v_proj", "to_out.0", "to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2"]
        .into_iter()
        .chain(["img_mod.1", "txt_mod.1", "img_in", "txt_in", "proj_out", "norm_out.linear", "linear_1"]);
    let lcfg = LoraConfig {
        r: 2,
        alpha: 3.0,
        dropout: 0.0,
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
    (store, model)
}

#[test]
fn qwen_checkpointed_gradients_equal_autograd() {
    let (store, model) = tiny_qwen();
    tch::manual_seed(5);
    let o = (Kind::Double, Device::Cpu);
    // Target 6×4 latents (3×2 tokens) then a 4×4 control (2×2 tokens).
    let hidden = Tensor::cat(
        &[flux::pack_latents(&Tensor::randn([2, 4, 6, 4], o)), flux::pack_latents(&Tensor::randn([2, 4, 4, 4], o))],
        1,
    );
    let shapes = [(1, 3, 2), (1, 2, 2)];
    let ctx = Tensor::randn([2, 5, 12], o).set_requires_grad(true);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]);
    let t = Tensor::from_slice(&[0.9f64, 0.3]);
    let weight = Tensor::randn([2, 10, 16], o);
    let inputs = QwenInputs {
        hidden_states: &hidden,
        encoder_hidden_states: &ctx,
        encoder_hidden_states_mask: Some(&mask),
        timestep: &t,
        img_shapes: &shapes,
    };
    let objective = |y: &Tensor| (y * &weight).sum(Kind::Double) + y.square().sum(Kind::Double) * 0.1;
    let out = model.forward(&inputs).unwrap();
    objective(&out).backward();
    let plain = grads(&store, &ctx);
    zero(&store, &ctx);
    let (leaf, tape) = model.forward_checkpointed(&inputs, None).unwrap();
    assert!(leaf.requires_grad() && leaf.is_leaf(), "the checkpointed output is a leaf with grad");
    assert_eq!((&leaf - &out).abs().max().double_value(&[]), 0.0, "checkpointed forward ≠ plain forward");
    objective(&leaf).backward();
    let recomputed = tape.backward(&model);
    // time + embed + 2 blocks + head
    assert_eq!(recomputed, 5);
    let (rel, scale) = rel_diff(&plain, &grads(&store, &ctx));
    println!("max |Δg| / max |g| = {rel:.3e} (max |g| {scale:.3e})");
    assert!(rel <= REL_TOL, "checkpointed gradients differ from autograd's by {rel:e} (bound {REL_TOL:e})");
}
