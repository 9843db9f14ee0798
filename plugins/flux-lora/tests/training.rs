//! flux-lora's training forward: flow matching's σ draws (`flux_shift` at the batch's own token
//! count, musubi-tuner's / sd-scripts' scheme) and the DDPM-only settings refused.

mod common;

use common::{tiny, MAX_SEQ};
use likeness_diffusion::timesteps::{Sampling, TimestepSampler};
use likeness_diffusion_torch::rng;
use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::abi::{sample_seed, NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, StepContext, Texts};

fn create(dir: &std::path::Path, extra: serde_json::Value) -> Result<FluxLora, String> {
    let mut c = serde_json::json!({"pretrained": dir, "max_sequence_length": MAX_SEQ, "lora_rank": 2});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    FluxLora::create(&c.to_string(), Device::CPU, 1).map_err(|e| e.message.to_string())
}

/// The `timesteps` output (σ per sample) of a Train forward on `n` images of `h`×`w` px.
fn sigmas(m: &mut FluxLora, h: i64, w: i64, seeds: &[u64]) -> Vec<f32> {
    let n = seeds.len();
    let target = CpuTensor::new(
        vec![n as i64, 3, h, w],
        likeness_sdk::testing::uniform_f32(4, n * 3 * (h * w) as usize, 0.0, 1.0),
    );
    let views = [NamedView { name: RStr::from_str("target"), view: target.view() }];
    let caps: Vec<RStr<'_>> = (0..n).map(|_| RStr::from_str("a photo of a person")).collect();
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&caps) }];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(seeds) };
    let out = m
        .forward_batch(
            Inputs::new(RSlice::from_slice(&views)),
            Texts::new(RSlice::from_slice(&texts)),
            &ctx,
            ForwardMode::Eval,
        )
        .unwrap_or_else(|e| panic!("forward_batch: {e}"));
    let (name, t) = out.outputs.iter().find(|(n, _)| n == "timesteps").expect("a timesteps output");
    CpuTensor::<f32>::from_managed(t, name).unwrap().data
}

#[test]
fn flux_shift_draws_sigma_shifted_by_the_batchs_token_count() {
    let Some((dir, _)) = tiny("flux_shift_draws_sigma_shifted_by_the_batchs_token_count") else { return };
    let mut m = create(dir, serde_json::json!({"timestep_sampling": "flux_shift", "resolution": 16})).unwrap();
    let seeds: Vec<u64> = (0..3).map(|i| sample_seed(5, 1, 0, i)).collect();
    // 16×16 and 32×64 px → 8×8 and 16×32 latents (the tiny VAE's factor 2): μ differs.
    for (h, w) in [(16i64, 16i64), (32, 64)] {
        let got = sigmas(&mut m, h, w, &seeds);
        let (lh, lw) = ((h / 2) as usize, (w / 2) as usize);
        let want: Vec<f32> = seeds
            .iter()
            .map(|&s| {
                let mut ts = TimestepSampler::new(
                    Sampling::FluxShift { sigmoid_scale: 1.0, latent_h: lh, latent_w: lw },
                    0.0,
                    1000.0,
                    rng::timestep_seed(s),
                )
                .unwrap();
                ts.sample() as f32
            })
            .collect();
        assert_eq!(got, want, "{h}×{w}: σ must be flux_shift's at {lh}×{lw} latents");
    }
    // The shift is real: the same seeds without it give other σ.
    let mut plain = create(dir, serde_json::json!({"timestep_sampling": "sigmoid", "resolution": 16})).unwrap();
    assert_ne!(sigmas(&mut plain, 32, 64, &seeds), sigmas(&mut m, 32, 64, &seeds));
}

#[test]
fn min_snr_gamma_is_refused_for_flow_matching() {
    let Some((dir, _)) = tiny("min_snr_gamma_is_refused_for_flow_matching") else { return };
    let e = create(dir, serde_json::json!({"min_snr_gamma": 5.0})).err().expect("refused");
    assert!(e.contains("min_snr_gamma") && e.contains("flow matching"), "{e}");
    let e = create(dir, serde_json::json!({"train_text_encoder": true})).err().expect("refused");
    assert!(e.contains("train_text_encoder"), "{e}");
}
