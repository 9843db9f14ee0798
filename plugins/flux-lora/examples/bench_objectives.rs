//! Issue 16's benchmark: one training step (forward_batch(Train) + backward + AdamW) of the plain
//! Flux LoRA objective, PairEdit's (two denoiser passes, content frozen for the second) and
//! DTBack's (the identity injection: resamplers + cross-attention at 10 + 10 points), on the same
//! model, image size and seed, each timed over `--steps` steps after one warm-up step; prints
//! the medians and the overhead ratios against the plain step.
//!
//! usage: cargo run --release -p likeness-plugin-flux-lora --example bench_objectives -- \
//!            --model DIR [--size 256] [--steps 5]
//! (DIR: tests/python/make_tiny_flux.py --preset bench writes the bench model.)

use std::time::Instant;

use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::abi::{NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, OptimizerStep, StepContext, Texts};
use serde_json::json;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds per training step of the model `extra` configures.
fn time(model: &str, size: i64, steps: u64, extra: serde_json::Value) -> f64 {
    let mut c = json!({"pretrained": model, "max_sequence_length": 64, "decode_pixels": false, "lora_rank": 16,
                       "lora_targets": ["attn"], "resolution": size});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    let mut m = FluxLora::create(&c.to_string(), Device::CPU, 1).expect("create");
    let px = (3 * size * size) as usize;
    let target = CpuTensor::new(vec![1, 3, size, size], likeness_sdk::testing::uniform_f32(1, px, 0.0, 1.0));
    let control = CpuTensor::new(vec![1, 3, size, size], likeness_sdk::testing::uniform_f32(2, px, 0.0, 1.0));
    let face = CpuTensor::new(vec![1, 512], likeness_sdk::testing::uniform_f32(3, 512, -1.0, 1.0));
    let body = CpuTensor::new(vec![1, 512], likeness_sdk::testing::uniform_f32(4, 512, -1.0, 1.0));
    let views = [
        NamedView { name: RStr::from_str("target"), view: target.view() },
        NamedView { name: RStr::from_str("control"), view: control.view() },
        NamedView { name: RStr::from_str("face_embedding"), view: face.view() },
        NamedView { name: RStr::from_str("body_embedding"), view: body.view() },
    ];
    let caps = [RStr::from_str("a photo of a person")];
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&caps) }];
    let mut times = Vec::new();
    for step in 1..=steps + 1 {
        let seeds = [step];
        let ctx =
            StepContext { optimizer_step: step, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
        let t0 = Instant::now();
        m.forward_batch(
            Inputs::new(RSlice::from_slice(&views)),
            Texts::new(RSlice::from_slice(&texts)),
            &ctx,
            ForwardMode::Train,
        )
        .expect("forward");
        m.backward_scaled(&[], 1.0).expect("backward");
        let s = OptimizerStep {
            step,
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 0.0,
        };
        m.optimizer_step(s).expect("step");
        m.zero_grad().expect("zero_grad");
        if step > 1 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    median(times)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = arg(&args, "--model", "");
    assert!(!model.is_empty(), "usage: bench_objectives --model DIR [--size 256] [--steps 5]");
    let size: i64 = arg(&args, "--size", "256").parse().expect("--size");
    let steps: u64 = arg(&args, "--steps", "5").parse().expect("--steps");
    let plain = time(&model, size, steps, json!({}));
    let pairedit = time(&model, size, steps, json!({"pairedit": {"guidance_scale": 3.5}}));
    let dtback = time(&model, size, steps, json!({"identity": {}}));
    println!(
        "objective  median s/step  ratio to plain  ({size}x{size}, {steps} steps, CPU, {} threads)",
        tch::get_num_threads()
    );
    println!("plain      {plain:.4}        1.00");
    println!("pairedit   {pairedit:.4}        {:.2}", pairedit / plain);
    println!("dtback     {dtback:.4}        {:.2}", dtback / plain);
}
