//! Issue 15's whole-chain oracle on Flux: the identity term's gradient with respect to the
//! transformer's LoRA weights matches central finite differences through
//! x̂0 = x_t − σ·v̂ → unpack → Flux VAE decode (16 channels, shift and scale) → metric → loss, in
//! f64, on the tiny random Flux.1-dev (tests/python/make_tiny_flux.py) with LoRA on every Linear
//! kind of the blocks. The harness, the metric, the loss and the tolerance's derivation:
//! core/diffusion-torch/tests/support/whole_chain.rs.

mod common;
#[path = "../../../core/diffusion-torch/tests/support/whole_chain.rs"]
mod whole_chain;

use common::{tiny, MAX_SEQ};
use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::abi::sample_seed;
use likeness_sdk::{CpuTensor, Device, ModelPlugin};
use whole_chain::{check, perturb_lora, pick, Chain, REFERENCE_PHOTO};

/// 16×16 images → 8×8 latents (the tiny VAE's factor 2) → 4×4 packed tokens.
const SIZE: i64 = 16;

#[test]
fn flux_identity_term_gradient_matches_finite_differences_through_the_whole_chain() {
    let test = "flux_identity_term_gradient_matches_finite_differences_through_the_whole_chain";
    let Some((dir, _)) = tiny(test) else { return };
    let Some(ref_path) = likeness_sdk::testing::data_path_or_skip(test, REFERENCE_PHOTO) else { return };
    let cfg = serde_json::json!({
        "pretrained": dir, "resolution": SIZE, "lora_rank": 2, "lora_targets": ["all-linear"],
        "precision": "fp64", "max_sequence_length": MAX_SEQ,
    })
    .to_string();
    let mut m = FluxLora::create(&cfg, Device::CPU, 8).unwrap_or_else(|e| panic!("create: {e}"));
    perturb_lora(&m);
    let data = likeness_sdk::testing::uniform_f32(6, 2 * 3 * (SIZE * SIZE) as usize, 0.0, 1.0);
    let target = CpuTensor::new(vec![2, 3, SIZE, SIZE], data);
    let seeds: Vec<u64> = (0..2).map(|i| sample_seed(9, 1, 0, i)).collect();
    let chain = Chain::new(
        &ref_path,
        vec![("target", target)],
        vec!["a photo of sks person, smiling", "a portrait in the rain"],
        seeds,
    );
    let params = m.lora_parameters();
    let last = |i: usize| {
        let (n, p) = &params[params.len() - i];
        (n.clone(), p.shallow_clone())
    };
    let (l1, l2) = (last(1), last(2));
    // A fused-in-BFL attention projection of a double block, a single block's MLP input, and
    // the last module (a single block's output), down and up.
    let picks = vec![
        pick(&m, "transformer_blocks.0.attn.to_q", 0),
        pick(&m, "single_transformer_blocks.0.proj_mlp", 3),
        (l1.0, l1.1, 1),
        (l2.0, l2.1, 5),
    ];
    check(&mut m, &chain, &picks);
}
