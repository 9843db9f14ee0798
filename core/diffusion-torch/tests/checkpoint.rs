//! Gradient checkpointing (`UNet2DConditionModel::forward_checkpointed` + `UNetTape::backward`)
//! against the plain autograd backward of the same UNet: the same LoRA gradients and the same
//! context gradient (the text-encoder path), with and without LoRA dropout.
//!
//! The oracle here is libtorch's own autograd over the un-checkpointed graph: checkpointing must
//! change memory, never the gradient. The model is random and tiny but has every segment kind
//! (cross-attention and plain down/up blocks, downsamplers, upsamplers to an odd size, the time
//! MLP with LoRA, LoCon convolutions).
//!
//! Tolerance, f64: both backwards compute the same products; they differ only in how the
//! gradient of an activation read by several segments (temb by every resnet, the context by
//! every transformer, each skip by its down successor and its up resnet) is summed — autograd
//! sums as the graph is traversed, the tape sums per slot in reverse program order. A
//! re-associated sum of n terms differs by ≤ n·ε·Σ|terms|; with ≤ 16 readers per slot and
//! ≈ 40 layers on the deepest path, each re-rounding again, the relative difference is
//! ≲ 40·16·ε = 640 · 1.1e-16 ≈ 7e-14 of the gradient's scale. Bound: 1e-11 relative to the
//! largest |gradient| (100× margin, for reductions split differently on another ISA or thread
//! count). Measured here: printed by the test.

mod common;

use common::{grads, rel_diff, zero};
use likeness_diffusion_torch::{lora, LoraConfig, LoraInit, Mode, Store, UNet2DConditionModel, UNetConfig};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const REL_TOL: f64 = 1e-11;

/// libtorch's global generator is process-wide and the tests run on parallel threads: each test
/// holds this for its whole run, or another test's draws would land between a reseed and the
/// dropout it is meant for.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny_unet(dropout: f64) -> (Store, UNet2DConditionModel) {
    let json = serde_json::json!({
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [16, 32, 32], "layers_per_block": 2, "cross_attention_dim": 24,
        "attention_head_dim": 4, "norm_num_groups": 8
    });
    let cfg = UNetConfig::from_value(Path::new("<test>"), json).expect("tiny config");
    let store = Store::new(Mode::Alloc, Kind::Double, Device::Cpu);
    let unet = UNet2DConditionModel::new(&store, &cfg);
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (_, mut p) in store.named_parameters() {
            let r = Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.2;
            p.copy_(&r);
        }
    });
    let lcfg = LoraConfig {
        r: 3,
        alpha: 5.0,
        dropout,
        target_modules: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "time_embedding.linear_1", "proj_in"]
            .map(String::from)
            .to_vec(),
        init: LoraInit::Gaussian,
        conv: true,
    };
    lora::inject(&store, &lcfg).expect("inject");
    // Non-zero B (the init's B = 0 would give A no gradient), f64 like the base.
    tch::no_grad(|| {
        for (_, mut p) in lora::parameters(&store) {
            let r = Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.3;
            p.set_data(&r);
        }
    });
    lora::set_training(&store, dropout > 0.0);
    (store, unet)
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    ctx: Tensor,
    weight: Tensor,
}

fn inputs() -> Inputs {
    tch::manual_seed(5);
    let o = (Kind::Double, Device::Cpu);
    // 9×11 latents: the upsamplers must target the skips' odd sizes.
    Inputs {
        x: Tensor::randn([2, 4, 9, 11], o),
        t: Tensor::from_slice(&[17i64, 801]),
        ctx: Tensor::randn([2, 7, 24], o).set_requires_grad(true),
        weight: Tensor::randn([2, 4, 9, 11], o),
    }
}

/// A nonlinear objective of the output, as the trainer's loss + identity term are.
fn objective(out: &Tensor, w: &Tensor) -> Tensor {
    (out * w).sum(Kind::Double) + out.square().sum(Kind::Double) * 0.1
}

fn run(dropout: f64, plain_reseed: Option<i64>, ckpt_reseed: Option<i64>) -> (f64, f64, usize) {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (store, unet) = tiny_unet(dropout);
    let i = inputs();
    let out = unet.forward_reseeded(&i.x, &i.t, &i.ctx, plain_reseed);
    objective(&out, &i.weight).backward();
    let plain = grads(&store, &i.ctx);
    zero(&store, &i.ctx);
    let (leaf, tape) = unet.forward_checkpointed(&i.x, &i.t, &i.ctx, ckpt_reseed);
    assert!(leaf.requires_grad() && leaf.is_leaf(), "the checkpointed output is a leaf with grad");
    let same_out = (&leaf - &out).abs().max().double_value(&[]);
    // Same kernels on the same inputs (and, reseeded, the same dropout masks): the no-grad
    // forward gives the graph forward's output exactly.
    if plain_reseed == ckpt_reseed {
        assert_eq!(same_out, 0.0, "the checkpointed forward's output differs from the plain one");
    }
    objective(&leaf, &i.weight).backward();
    let recomputed = tape.backward(&unet);
    let ckpt = grads(&store, &i.ctx);
    let (rel, scale) = rel_diff(&plain, &ckpt);
    (rel, scale, recomputed)
}

#[test]
fn checkpointed_gradients_equal_autograd() {
    let (rel, scale, recomputed) = run(0.0, None, None);
    println!("no dropout: max |Δg| / max |g| = {rel:.3e} (max |g| {scale:.3e}), {recomputed} segments recomputed");
    // 1 time MLP + conv_in + 3×2 down resnets + 4 down transformers + 2 downsamplers + 3 mid +
    // 3×3 up resnets + 6 up transformers + 2 upsamplers + conv_out = 35 segments; all but
    // conv_in (no LoRA, and its input, the noisy sample, needs no gradient) record a graph.
    assert_eq!(recomputed, 34);
    assert!(rel <= REL_TOL, "checkpointed gradients differ from autograd's by {rel:e} relative (bound {REL_TOL:e})");
}

#[test]
fn checkpointing_with_dropout_reseeds_the_recomputation() {
    let (rel, _, _) = run(0.3, Some(1234), Some(1234));
    println!("dropout 0.3, reseeded: max |Δg| / max |g| = {rel:.3e}");
    assert!(rel <= REL_TOL, "reseeded checkpointing differs by {rel:e} relative (bound {REL_TOL:e})");
    // Negative control: the same dropout without reseeding draws other masks in the
    // recomputation, and the gradient is wrong by O(1) — the test above can fail.
    let (rel, _, _) = run(0.3, Some(1234), None);
    println!("dropout 0.3, recomputation not reseeded: {rel:.3e}");
    assert!(rel > 1e-3, "without reseeding the masks should differ (got {rel:e})");
}
