//! flux-lora against diffusers' FluxPipeline (tests/python/flux_pipeline_oracle.py) on the tiny
//! random Flux.1-dev that tests/python/make_tiny_flux.py builds and saves with diffusers: the
//! tokenizers' ids, `encode_prompt`'s T5 states and CLIP pooled vector, and a whole 4-step
//! sampling run from the same initial latents (FLUX.1-dev's dynamic shift, embedded guidance
//! 3.5) with its VAE decode.
//!
//! Tolerances: token ids exact. Encodings 1e-5 absolute (T5's and CLIP's f32 layers differ from
//! transformers' by re-association and GELU's op split only, ≈ 1e-6; see
//! core/diffusion-torch/tests/t5.rs). Sampling 1e-4 absolute: each step's velocity is the
//! transformer's output (bitwise equal to diffusers' in core/diffusion-torch/tests/flux.rs given
//! equal inputs), so what differs is the encodings' ≈ 1e-6 and the schedule's σ (f64 here, f32
//! in diffusers: ≤ 6e-8 each), carried through 4 Euler steps of |Δσ| ≤ 1 on O(1) velocities:
//! ≲ 4 · (1e-6 + 6e-8) · |v| ≪ 1e-4. The decode adds the VAE's f32 re-association (≲ 1e-5).

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::{max_diff, python, read_f32, tiny};
use likeness_diffusion_torch::sampling::{self, FlowSchedule};
use likeness_diffusion_torch::{Backbone, SampleScheduler};
use likeness_plugin_flux_lora::Flux;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The tiny pipeline and the oracle's output, once per test binary.
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
        python(&py, "flux_pipeline_oracle.py", &args);
        let json = serde_json::from_str(&std::fs::read_to_string(out.path().join("oracle.json")).unwrap()).unwrap();
        Setup { model, out, json }
    }))
}

impl Setup {
    fn tensor(&self, name: &str) -> Tensor {
        let shape: Vec<i64> = self.json[name].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        read_f32(self.out.path(), name, &shape)
    }

    fn flux(&self) -> Flux {
        assert_eq!(self.json["max_sequence_length"], common::MAX_SEQ);
        common::flux(self.model)
    }

    fn prompts(&self) -> Vec<&str> {
        self.json["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect()
    }
}

#[test]
fn prompt_encoding_matches_flux_pipeline() {
    let Some(s) = setup("prompt_encoding_matches_flux_pipeline") else { return };
    let flux = s.flux();
    let p = flux.pipeline();
    let prompts = s.prompts();
    assert!(p.t5_ids(&prompts, Device::Cpu).unwrap().to_kind(Kind::Float).equal(&s.tensor("t5_ids")), "T5 ids");
    assert!(p.clip_ids(&prompts, Device::Cpu).unwrap().to_kind(Kind::Float).equal(&s.tensor("clip_ids")), "CLIP ids");
    let enc = flux.encode_texts(&prompts, false).unwrap();
    assert!(max_diff(&enc[0], &s.tensor("prompt_embeds"), "T5 states") <= 1e-5);
    assert!(max_diff(&enc[1], &s.tensor("pooled"), "CLIP pooled") <= 1e-5);
}

#[test]
fn sampling_matches_flux_pipeline() {
    let Some(s) = setup("sampling_matches_flux_pipeline") else { return };
    let flux = s.flux();
    let cond = flux.encode_texts(&s.prompts()[..1], false).unwrap();
    let x = s.tensor("init_latents");
    let (_, _, h, w) = x.size4().unwrap();
    let steps = s.json["steps"].as_u64().unwrap() as usize;
    let SampleScheduler::FlowMatch(fc) = flux.sampling().scheduler else { panic!("Flux samples by flow matching") };
    let sched = FlowSchedule::new(fc, steps, flux.image_seq_len(h, w)).unwrap();
    let guidance = flux.guidance(s.json["guidance"].as_f64().unwrap());
    let z = tch::no_grad(|| {
        let model = sampling::guided_model(
            |x: &Tensor, t: &Tensor, g: Option<&Tensor>, c: &[Tensor]| flux.denoise_guided(x, t, g, c, None),
            &cond,
            None,
            guidance,
        )
        .unwrap();
        sampling::run(&sched, &x, model).unwrap()
    });
    assert!(max_diff(&z, &s.tensor("final_latents"), "latents after 4 steps") <= 1e-4);
    let vae = &flux.vae().unwrap().model;
    let image = tch::no_grad(|| (vae.decode(&vae.unscale_latent(&z)) / 2.0 + 0.5).clamp(0.0, 1.0));
    assert!(max_diff(&image, &s.tensor("image"), "decoded image") <= 1e-4);
}

/// The transformer from the original BFL single file (`pretrained` = the file, `config` = the
/// folder for everything else) is the folder's, bit for bit.
#[test]
fn bfl_single_file_with_config_folder_is_the_same_model() {
    let Some(s) = setup("bfl_single_file_with_config_folder_is_the_same_model") else { return };
    let folder = s.flux();
    let cfg: likeness_plugin_flux_lora::config::FluxLoraConfig = serde_json::from_value(serde_json::json!({
        "pretrained": s.model.join("transformer-bfl.safetensors"), "config": s.model,
        "max_sequence_length": common::MAX_SEQ,
    }))
    .unwrap();
    let train = serde_json::from_value(serde_json::json!({})).unwrap();
    let single = Flux::load(&cfg, &train, Device::Cpu).unwrap();
    let cond = folder.encode_texts(&s.prompts()[..1], false).unwrap();
    let x = s.tensor("init_latents");
    let t = Tensor::from_slice(&[500.0f32]);
    let g = Tensor::from_slice(&[3.5f32]);
    let a = tch::no_grad(|| folder.denoise_guided(&x, &t, Some(&g), &cond, None)).unwrap();
    let b = tch::no_grad(|| single.denoise_guided(&x, &t, Some(&g), &cond, None)).unwrap();
    assert_eq!(max_diff(&b, &a, "single file vs folder"), 0.0);
    // Without `config` the file alone is refused before any weight loads, naming the fix.
    let cfg = serde_json::json!({"pretrained": s.model.join("transformer-bfl.safetensors")}).to_string();
    let e =
        <likeness_plugin_flux_lora::FluxLora as likeness_sdk::ModelPlugin>::create(&cfg, likeness_sdk::Device::CPU, 0)
            .err()
            .unwrap()
            .message;
    assert!(e.contains("`config`") && e.contains("FluxPipeline folder"), "{e}");
}
