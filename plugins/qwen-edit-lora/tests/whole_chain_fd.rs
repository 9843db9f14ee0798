//! Issue 17's finite-difference oracle of the face loss on Qwen-Image-Edit-2509: the identity
//! term's gradient with respect to the transformer's LoRA weights matches central finite
//! differences through x̂0 = x_t − σ·v̂ (the control's tokens in the sequence) → unpack → the
//! Qwen-Image VAE's decode (single frame, per-channel mean/std, clamp) → metric → loss, in f64,
//! on the tiny random Qwen-Image-Edit-2509 (tests/python/make_tiny_qwen_edit.py) with musubi's
//! LoRA targets (every Linear of the blocks, modulations included) and Qwen2.5-VL embedding the
//! caption with the control image. The harness, the metric, the loss and the tolerance's
//! derivation: core/diffusion-torch/tests/support/whole_chain.rs.

#[path = "../../../core/diffusion-torch/tests/support/whole_chain.rs"]
mod whole_chain;

use std::path::PathBuf;
use std::process::Command;

use likeness_plugin_qwen_edit_lora::QwenEditLora;
use likeness_sdk::abi::sample_seed;
use likeness_sdk::{CpuTensor, Device, ModelPlugin};
use whole_chain::{check, perturb_lora, pick, Chain, REFERENCE_PHOTO};

/// 32×32 images → 4×4 latents (factor 8) → 2×2 packed tokens; the control 48×32.
const SIZE: i64 = 32;

fn tiny(test: &str) -> Option<PathBuf> {
    let py = likeness_sdk::testing::python_or_skip(test)?;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen-edit-tiny");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new(py)
        .arg(repo.join("tests/python/make_tiny_qwen_edit.py"))
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "make_tiny_qwen_edit.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    Some(dir)
}

#[test]
fn qwen_face_loss_gradient_matches_finite_differences_through_the_whole_chain() {
    let test = "qwen_face_loss_gradient_matches_finite_differences_through_the_whole_chain";
    let Some(dir) = tiny(test) else { return };
    let Some(ref_path) = likeness_sdk::testing::data_path_or_skip(test, REFERENCE_PHOTO) else { return };
    let cfg = serde_json::json!({
        "pretrained": dir, "resolution": SIZE, "lora_rank": 2, "lora_targets": ["musubi"], "precision": "fp64",
    })
    .to_string();
    let mut m = QwenEditLora::create(&cfg, Device::CPU, 8).unwrap_or_else(|e| panic!("create: {e}"));
    perturb_lora(&m);
    let data = likeness_sdk::testing::uniform_f32(6, 3 * (SIZE * SIZE) as usize, 0.0, 1.0);
    let target = CpuTensor::new(vec![1, 3, SIZE, SIZE], data);
    let cdata = likeness_sdk::testing::uniform_f32(7, 3 * (48 * SIZE) as usize, 0.0, 1.0);
    let control = CpuTensor::new(vec![1, 3, 48, SIZE], cdata);
    let seeds = vec![sample_seed(9, 1, 0, 0)];
    let chain = Chain::new(&ref_path, vec![("target", target), ("control", control)], vec!["make him smile"], seeds);
    // Both streams' attention, the image stream's MLP and modulation of the first block, the
    // last block's image MLP output.
    let picks = vec![
        pick(&m, "transformer_blocks.0.attn.to_q", 0),
        pick(&m, "transformer_blocks.0.attn.add_k_proj", 3),
        pick(&m, "transformer_blocks.0.img_mod.1", 2),
        pick(&m, "transformer_blocks.1.img_mlp.net.2", 5),
    ];
    check(&mut m, &chain, &picks);
}
