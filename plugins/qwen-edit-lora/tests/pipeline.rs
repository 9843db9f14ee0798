//! qwen-edit-lora against diffusers' QwenImageEditPlusPipeline (tests/python/qwen_edit_pipeline_oracle.py)
//! on the tiny random Qwen-Image-Edit-2509 that tests/python/make_tiny_qwen_edit.py builds and saves
//! with diffusers: the control image's VAE latents, and a whole 3-step sampling run from the same
//! initial latents and prompt embeddings (true CFG 4 with renormalisation, the 2509 scheduler's
//! dynamic shift and terminal stretch, the control's tokens after the target's with RoPE frame 1)
//! with its VAE decode.
//!
//! Tolerances (f32): the control latents 1e-4 absolute (core/diffusion-torch/tests/qwen_vae.rs:
//! the same libtorch conv kernels, re-association only, ≲ 1e-5 on O(1) values). Sampling 1e-4
//! absolute: each step's velocity is the transformer's (≤ 1e-5 from diffusers' in
//! tests/qwen_image.rs), the schedule's σ differs by the f32 rounding of diffusers' numpy
//! schedule (≤ 6e-8), and 3 Euler steps of |Δσ| ≤ 1 carry that through (≲ 3 · 1e-5 · |v|); the
//! renorm divides by per-token norms of O(1), which does not amplify it. The decode adds the VAE's
//! f32 re-association (≲ 1e-5).

#[path = "../../../core/diffusion-torch/tests/common/mod.rs"]
mod common;

use common::{max_diff, PyOracle};
use likeness_diffusion_torch::sampling::{self, FlowSchedule};
use likeness_diffusion_torch::trainer::TrainConfig;
use likeness_diffusion_torch::{Backbone, SampleScheduler};
use likeness_plugin_qwen_edit_lora::config::QwenEditLoraConfig;
use likeness_plugin_qwen_edit_lora::QwenEdit;
use tch::{Device, Kind, Tensor};

/// The oracle's output, once per test binary (it builds the tiny pipeline and runs it: ≈ 40 s).
fn oracle(test: &str) -> Option<&'static PyOracle> {
    static O: std::sync::OnceLock<Option<PyOracle>> = std::sync::OnceLock::new();
    O.get_or_init(|| PyOracle::run("qwen_edit_pipeline_oracle.py", test)).as_ref()
}

fn backbone(model: &std::path::Path, extra: serde_json::Value) -> QwenEdit {
    let mut v = serde_json::json!({ "pretrained": model });
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let cfg: QwenEditLoraConfig = serde_json::from_value(v).unwrap();
    let train: TrainConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    QwenEdit::load(&cfg, &train, Device::Cpu).unwrap()
}

#[test]
fn qwen_edit_sampling_matches_diffusers_pipeline() {
    let Some(o) = oracle("qwen_edit_sampling_matches_diffusers_pipeline") else { return };
    let q = backbone(&o.path("model"), serde_json::json!({}));
    let ctrl = q.control_latents(&o.tensor("control")).unwrap();
    assert!(max_diff(&ctrl, &o.tensor("control_latents"), "control latents") <= 1e-4);
    let ones = |n: i64| Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let cond = [o.tensor("prompt_embeds"), ones(7), ctrl.shallow_clone()];
    let neg = [o.tensor("negative_embeds"), ones(5), ctrl];
    let steps = o.json["steps"].as_u64().unwrap() as usize;
    let x = o.tensor("latents");
    let (h, w) = (x.size()[2], x.size()[3]);
    let SampleScheduler::FlowMatch(fc) = q.sampling().scheduler else { panic!("flow matching") };
    let sched = FlowSchedule::new(fc, steps, q.image_seq_len(h, w)).unwrap();
    let z = tch::no_grad(|| {
        let model = sampling::guided_model(
            |x: &Tensor, t: &Tensor, g: Option<&Tensor>, c: &[Tensor]| q.denoise_guided(x, t, g, c, None),
            &cond,
            Some(&neg),
            q.guidance(4.0),
        )
        .unwrap();
        sampling::run(&sched, &x, model).unwrap()
    });
    assert!(max_diff(&z, &o.tensor("final_latents"), "latents after 3 steps") <= 1e-4);
    let vae = &q.vae().unwrap().model;
    let image = tch::no_grad(|| (vae.decode(&vae.unscale_latent(&z)) / 2.0 + 0.5).clamp(0.0, 1.0));
    assert!(max_diff(&image, &o.tensor("image"), "decoded image") <= 1e-4);
}

/// The training forward is musubi-tuner's edit-plus `call_dit`: the DiT sees `(t·1000 + 1)/1000`
/// (its timestep offset), the control's tokens after the noisy target's, and the prediction is the
/// target's tokens; the flow-matching loss `mean((v̂ − (ε − x0))²)` matches. Tolerance 1e-4 as the
/// sampling test's per-step velocity (one transformer forward).
#[test]
fn qwen_edit_training_forward_is_musubis() {
    let Some(o) = oracle("qwen_edit_training_forward_is_musubis") else { return };
    let q = backbone(&o.path("model"), serde_json::json!({}));
    let ctrl = q.control_latents(&o.tensor("control")).unwrap();
    let cond = [o.tensor("prompt_embeds"), Tensor::ones([1, 7], (Kind::Int64, Device::Cpu)), ctrl];
    let t = o.json["train_t"].as_f64().unwrap();
    let timesteps = Tensor::from_slice(&[(t * 1000.0) as f32]);
    let pred = tch::no_grad(|| q.denoise(&o.tensor("x_t"), &timesteps, &cond, None)).unwrap();
    assert!(max_diff(&pred, &o.tensor("train_pred"), "training prediction") <= 1e-4);
    let loss = (&pred - (o.tensor("eps") - o.tensor("x0"))).square().mean(Kind::Float).double_value(&[]);
    let want = o.json["train_loss"].as_f64().unwrap();
    assert!((loss - want).abs() <= 1e-4 * want, "loss {loss} vs musubi's {want}");
    // Without the offset the prediction differs by more than the tolerance (the test sees it).
    let plain = tch::no_grad(|| q.denoise_guided(&o.tensor("x_t"), &timesteps, None, &cond, None)).unwrap();
    assert!(max_diff(&plain, &o.tensor("train_pred"), "sampling's σ (no offset)") > 1e-4);
}
