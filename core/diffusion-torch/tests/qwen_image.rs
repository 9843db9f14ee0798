//! Qwen-Image's transformer against diffusers 0.42.1 (tests/python/qwen_image_oracle.py: a tiny
//! random QwenImageTransformer2DModel, every parameter perturbed; edit-plus-shaped inputs: the
//! target's tokens then a control image's, a per-sample text mask with padding).
//!
//! f32 tolerance 1e-4 absolute on O(1) outputs, for flux.rs's reason: both sides run libtorch's
//! f32 kernels in the same op order, so what differs is re-association (≲ 2.4e-5 over the deepest
//! path of 2 blocks) and the RoPE tables (ours from f64 angles, diffusers' from f32 ones: ≤ 1e-7
//! relative per rotation).

mod common;

use common::{max_diff, PyOracle};
use likeness_diffusion_torch::qwen_image::{qwen_image_from_diffusers, QwenInputs};
use likeness_diffusion_torch::Mode;
use std::sync::OnceLock;
use tch::{Device, Kind};

fn oracle(test: &str) -> Option<&'static PyOracle> {
    static O: OnceLock<Option<PyOracle>> = OnceLock::new();
    O.get_or_init(|| PyOracle::run("qwen_image_oracle.py", test)).as_ref()
}

#[test]
fn qwen_image_transformer_matches_diffusers() {
    let Some(o) = oracle("qwen_image_transformer_matches_diffusers") else { return };
    let (_s, model) = qwen_image_from_diffusers(&o.path("transformer"), Kind::Float, Device::Cpu, Mode::Alloc).unwrap();
    let shapes: Vec<(i64, i64, i64)> = serde_json::from_value(o.json["img_shapes"].clone()).unwrap();
    let (hidden, ctx, timestep) = (o.tensor("hidden"), o.tensor("ctx"), o.tensor("timestep"));
    let mask = o.tensor("mask");
    let run = |mask| {
        let i = QwenInputs {
            hidden_states: &hidden,
            encoder_hidden_states: &ctx,
            encoder_hidden_states_mask: mask,
            timestep: &timestep,
            img_shapes: &shapes,
        };
        tch::no_grad(|| model.forward(&i)).unwrap()
    };
    let masked = run(Some(&mask));
    assert!(max_diff(&masked, &o.tensor("out"), "masked") <= 1e-4);
    let plain = run(None);
    assert!(max_diff(&plain, &o.tensor("out_nomask"), "no mask") <= 1e-4);
    assert!(max_diff(&masked, &plain, "the mask matters") > 1e-3);
}

/// Qwen-Image(-Edit-2509)'s defaults build exactly the real checkpoint's names and shapes
/// (tests/data/qwen_image_transformer_diffusers.json, a copy of the shared manifest: 1933
/// tensors, 20.4 B parameters), planned (no memory).
#[test]
fn qwen_image_layout_equals_the_real_checkpoint() {
    use likeness_diffusion_torch::qwen_image::{QwenImageConfig, QwenImageTransformer2DModel};
    use likeness_diffusion_torch::Store;
    let cfg = QwenImageConfig::from_value(std::path::Path::new("config.json"), serde_json::json!({})).unwrap();
    let store = Store::new(Mode::Plan, Kind::BFloat16, Device::Cpu);
    let _model = QwenImageTransformer2DModel::new(&store, &cfg);
    common::compare_with_manifest(&store, &common::data_file("qwen_image_transformer_diffusers.json"));
}
