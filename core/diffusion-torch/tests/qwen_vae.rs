//! The single-frame Qwen-Image VAE against diffusers 0.42.1's AutoencoderKLQwenImage on one frame
//! (tests/python/qwen_vae_oracle.py: a tiny random model, every parameter perturbed), and the
//! default config's layout against the real checkpoint's manifest.
//!
//! f32 tolerance 1e-4 absolute on O(1) values: the same libtorch f32 kernels (a 3-D conv on a
//! zero-padded frame and our 2-D conv with the kernel's last slice sum the same products, only
//! re-associated: ≲ √K·ε relative per conv, K = 9·C ≤ 144 here, over ≈ 12 convs on the deepest
//! path: ≈ 12 · 12 · 6e-8 ≈ 1e-5).

mod common;

use common::{max_diff, PyOracle};
use likeness_diffusion_torch::qwen_vae::{qwen_vae_from_diffusers, QwenImageVae, QwenVaeConfig};
use likeness_diffusion_torch::{Mode, Store};
use tch::{Device, Kind};

#[test]
fn qwen_image_vae_matches_diffusers_on_one_frame() {
    let Some(o) = PyOracle::run("qwen_vae_oracle.py", "qwen_image_vae_matches_diffusers_on_one_frame") else {
        return;
    };
    let (_s, vae) = qwen_vae_from_diffusers(&o.path("vae"), Kind::Float, Device::Cpu, Mode::Alloc).unwrap();
    let (mean, logvar) = tch::no_grad(|| vae.encode(&o.tensor("images")));
    assert!(max_diff(&mean, &o.tensor("mean"), "mean") <= 1e-4);
    assert!(max_diff(&logvar, &o.tensor("logvar"), "logvar") <= 1e-4);
    let decoded = tch::no_grad(|| vae.decode(&o.tensor("latents")));
    assert!(max_diff(&decoded, &o.tensor("decoded"), "decoded") <= 1e-4);
    // The pipeline's normalisation round-trips.
    let z = vae.normalize(&mean);
    assert!(max_diff(&vae.denormalize(&z), &mean, "denormalize") <= 1e-6);
}

/// Qwen-Image's VAE config builds exactly the real checkpoint's names and shapes (the temporal
/// convs included: they load, and never run on one frame).
#[test]
fn qwen_image_vae_layout_equals_the_real_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, "{\"_class_name\": \"AutoencoderKLQwenImage\"}").unwrap();
    let cfg = QwenVaeConfig::from_file(&cfg_path).unwrap();
    let store = Store::new(Mode::Plan, Kind::BFloat16, Device::Cpu);
    let _vae = QwenImageVae::new(&store, &cfg);
    common::compare_with_manifest(&store, &common::data_file("qwen_image_vae_diffusers.json"));
}
