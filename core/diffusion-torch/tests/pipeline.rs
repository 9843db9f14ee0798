//! Parity with diffusers 0.42.1's StableDiffusionPipeline and transformers 5.24's CLIP on the tiny
//! random SD1.5 model written by tests/python/make_tiny_sd15.py (oracle:
//! tests/python/sd15_pipeline_oracle.py): tokenizer ids, the text encoder, 10-step DDIM/Euler runs
//! with classifier-free guidance (epsilon and v-prediction) from the same initial latents, the
//! DDPM training helpers, and reduced-precision base weights.

use likeness_clip::{ClipTokenizer, Padding};
use likeness_diffusion_torch::sampling::{denoise, unet_model, Prediction, Sampler, Schedule, SchedulerConfig};
use likeness_diffusion_torch::training;
use likeness_diffusion_torch::{load, lora, ClipTextConfig, LoraConfig, LoraInit};
use likeness_sdk::testing;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

struct Oracle {
    dir: tempfile::TempDir,
    model: PathBuf,
    json: Value,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(python: &Path, script: &str, args: &[&std::ffi::OsStr]) {
    let o = Command::new(python).arg(repo().join("tests/python").join(script)).args(args).output().unwrap();
    assert!(o.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// One oracle run per test binary (≈ 15 s of Python on 2 cores). The model folder lives in
/// cargo's per-target temp dir: make_tiny_sd15.py is idempotent (a stamp of its own hash and
/// arguments), so a rerun reuses it and a changed script regenerates it.
fn oracle(test: &str) -> Option<&'static Oracle> {
    static O: OnceLock<Option<Oracle>> = OnceLock::new();
    let python = testing::python_or_skip(test)?;
    O.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffusion-torch-tiny-sd15");
        let out = dir.path().join("oracle");
        run(&python, "make_tiny_sd15.py", &["--out".as_ref(), model.as_os_str()]);
        run(
            &python,
            "sd15_pipeline_oracle.py",
            &["--model".as_ref(), model.as_os_str(), "--out".as_ref(), out.as_os_str()],
        );
        let json = serde_json::from_str(&std::fs::read_to_string(out.join("oracle.json")).unwrap()).unwrap();
        Some(Oracle { dir, model, json })
    })
    .as_ref()
}

impl Oracle {
    fn model(&self) -> PathBuf {
        self.model.clone()
    }

    fn tensor(&self, name: &str) -> Tensor {
        let bytes = std::fs::read(self.dir.path().join("oracle").join(format!("{name}.f32"))).unwrap();
        let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let shape: Vec<i64> = self.json[name].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        Tensor::from_slice(&v).view(shape.as_slice())
    }

    fn ids(&self, name: &str) -> Tensor {
        let rows: Vec<Vec<i64>> = serde_json::from_value(self.json[name].clone()).unwrap();
        let n = rows[0].len() as i64;
        Tensor::from_slice(&rows.concat()).view([-1, n])
    }
}

fn max_diff(a: &Tensor, b: &Tensor, what: &str) -> f64 {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    let m = b.abs().max().double_value(&[]);
    eprintln!("{what}: max |ours - reference| = {d:.3e} (max |x| = {m:.3})");
    d
}

#[test]
fn tokenizer_gives_transformers_ids() {
    let Some(o) = oracle("tokenizer_gives_transformers_ids") else { return };
    let tok = ClipTokenizer::from_hf_folder(&o.model().join("tokenizer")).unwrap();
    let cases = o.json["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let enc = tok.encode(&texts, 77, Padding::Eot).unwrap();
    let mut bad = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let want: Vec<i64> = serde_json::from_value(c["ids"].clone()).unwrap();
        if enc.ids[i * 77..(i + 1) * 77] != want[..] {
            bad.push(texts[i]);
        }
    }
    assert!(bad.is_empty(), "ids differ from transformers' CLIPTokenizer for {bad:?}");
}

// Text encoder tolerance: 1e-4 absolute on outputs of magnitude ≤ ~5 (printed). Both sides run
// libtorch's f32 kernels, differing only in association order (the causal mask as `is_causal`
// here vs an explicit additive mask in transformers' sdpa call, fused vs separate ops): each
// dot product of length K ≤ 128 is off by ≲ √K·ε₃₂ ≈ 11 · 6e-8 ≈ 7e-7 relative, ≈ 10 such ops
// per layer × 2 layers + the embedding sum and 5 layer norms add up to ≲ 25 · 7e-7 ≈ 2e-5
// relative, ≈ 1e-4 at |x| = 5. Any wrong weight, mask or activation moves outputs by O(0.1).
const TEXT_TOL: f64 = 1e-4;

#[test]
fn text_encoder_matches_transformers() {
    let Some(o) = oracle("text_encoder_matches_transformers") else { return };
    let (_, te) = load::text_encoder_from_diffusers(&o.model(), Kind::Float, Device::Cpu).unwrap();
    assert_eq!(te.config.eos_token_id, 2, "the tiny model mirrors SD1.5's legacy eos id");
    let ids = o.ids("text_ids");
    let out = tch::no_grad(|| te.forward(&ids)).unwrap();
    assert!(max_diff(&out.last_hidden_state, &o.tensor("text_last"), "last_hidden_state") <= TEXT_TOL);
    assert!(max_diff(&out.penultimate_hidden_state, &o.tensor("text_penultimate"), "hidden_states[-2]") <= TEXT_TOL);
    assert!(max_diff(&out.pooled, &o.tensor("text_pooled"), "pooler_output") <= TEXT_TOL);
    let short = tch::no_grad(|| te.forward(&o.ids("text_short_ids"))).unwrap();
    assert!(max_diff(&short.last_hidden_state, &o.tensor("text_short_last"), "unpadded last_hidden_state") <= TEXT_TOL);

    // The single file (cond_stage_model.transformer.text_model.*, plus the position_ids buffer)
    // gives the same weights, so bit-identical outputs.
    let single = o.model.with_file_name("diffusion-torch-tiny-sd15-single.safetensors");
    let cfg = ClipTextConfig::from_file(&o.model().join("text_encoder/config.json")).unwrap();
    let (_, te1) = load::text_encoder_from_single_file(&single, &cfg, Kind::Float, Device::Cpu).unwrap();
    assert!(tch::no_grad(|| te1.forward(&ids)).unwrap().last_hidden_state.equal(&out.last_hidden_state));

    // Bad input is an error naming the field.
    let e = te.forward(&Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu))).err().unwrap().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let e = te.forward(&Tensor::full([1, 3], 49408, (Kind::Int64, Device::Cpu))).err().unwrap().to_string();
    assert!(e.contains("vocab_size"), "{e}");
}

#[test]
fn text_encoder_lora_targets_and_missing_keys() {
    let Some(o) = oracle("text_encoder_lora_targets_and_missing_keys") else { return };
    let (store, te) = load::text_encoder_from_diffusers(&o.model(), Kind::Float, Device::Cpu).unwrap();
    let ids = o.ids("text_ids");
    let base = tch::no_grad(|| te.forward(&ids)).unwrap().last_hidden_state;
    let cfg = LoraConfig {
        r: 4,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"].map(String::from).to_vec(),
        init: LoraInit::KaimingUniform,
        conv: false,
    };
    let injected = lora::inject(&store, &cfg).unwrap();
    assert_eq!(injected.len(), 2 * 6);
    assert!(injected.contains(&"text_model.encoder.layers.1.mlp.fc2".to_string()));
    assert!(tch::no_grad(|| te.forward(&ids)).unwrap().last_hidden_state.equal(&base), "B = 0 changed the output");
    // A LoRA gradient reaches the text encoder's adapters.
    let loss = te.forward(&ids).unwrap().last_hidden_state.square().mean(Kind::Float);
    loss.backward();
    let params = lora::parameters(&store);
    assert!(params.iter().any(|(_, p)| p.grad().defined() && p.grad().abs().max().double_value(&[]) > 0.0));

    // A file lacking a tensor is refused by name.
    let dir = tempfile::tempdir().unwrap();
    let src = o.model().join("text_encoder");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    t.retain(|(n, _)| n != "encoder.layers.1.mlp.fc1.bias");
    t.push(("text_projection.weight".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&t, dir.path().join("model.safetensors")).unwrap();
    let e = load::text_encoder_from_diffusers(dir.path(), Kind::Float, Device::Cpu).err().unwrap().to_string();
    for s in ["missing: text_model.encoder.layers.1.mlp.fc1.bias", "unexpected: text_projection.weight"] {
        assert!(e.contains(s), "{s} not in:\n{e}");
    }
}

fn prediction(v: &Value) -> Prediction {
    match v["prediction_type"].as_str().unwrap() {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::VPrediction,
        p => panic!("{p}"),
    }
}

#[test]
fn pipeline_runs_match_diffusers() {
    // Tolerances. Latents: 4e-3·max|x| and the decoded image 1e-3 per pixel (the bound),
    // with tests/oracle.rs's reasoning: each step mixes two UNet outputs with weights up to 8.5
    // and DDIM divides by √ᾱ_t ≥ √ᾱ_901 ≈ 0.2 (Euler multiplies by σ ≤ 8.4 and divides the input
    // by √(σ²+1): the same amplification), so a per-step UNet discrepancy (≤ 8e-5 relative, the
    // re-association bound of one UNet pass) grows ≲ 40× over the run: ≈ 3e-3 relative worst
    // case. core/diffusion's schedule is f64 where diffusers' is f32: ᾱ differs by ≤ 1000 f32
    // roundings of the cumulative product ≈ 6e-5 relative, which moves the step coefficients by
    // ≲ 3e-5 relative — inside the same budget. The image is (decode/2 + 0.5) clamped to [0, 1]:
    // half the decoder's error, and the group norms renormalise the latents' relative error.
    let Some(o) = oracle("pipeline_runs_match_diffusers") else { return };
    let m = o.model();
    let (_, unet) = load::unet_from_diffusers(&m, Kind::Float, Device::Cpu).unwrap();
    let (_, vae) = load::vae_from_diffusers(&m, Kind::Float, Device::Cpu).unwrap();
    let (_, te) = load::text_encoder_from_diffusers(&m, Kind::Float, Device::Cpu).unwrap();
    let tok = ClipTokenizer::from_hf_folder(&m.join("tokenizer")).unwrap();

    // Our tokenizer + text encoder give the pipeline's own prompt embeddings.
    let enc = tok.encode(&["a photo of sks person", ""], 77, Padding::Eot).unwrap();
    let ids = Tensor::from_slice(&enc.ids).view([2, 77]);
    let emb = tch::no_grad(|| te.forward(&ids)).unwrap().last_hidden_state;
    assert!(max_diff(&emb.narrow(0, 0, 1), &o.tensor("pipe_cond"), "prompt_embeds") <= TEXT_TOL);
    assert!(max_diff(&emb.narrow(0, 1, 1), &o.tensor("pipe_uncond"), "negative_prompt_embeds") <= TEXT_TOL);

    // The folder's scheduler_config.json parses (PNDMScheduler's, SD1.5's values).
    let folder = SchedulerConfig::from_file(&m.join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(folder.steps_offset, 1);
    let (cond, uncond, lat) = (o.tensor("pipe_cond"), o.tensor("pipe_uncond"), o.tensor("pipe_latents"));
    let runs = o.json["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 5);
    for (name, run) in runs {
        let cfg = SchedulerConfig::from_value(Path::new(name), &run["scheduler"]).unwrap();
        assert_eq!(cfg.prediction, prediction(&run["scheduler"]));
        let sampler = if name.starts_with("ddim") { Sampler::Ddim } else { Sampler::Euler };
        let sched = Schedule::new(sampler, &cfg, 10).unwrap();
        let want_t: Vec<f64> = serde_json::from_value(run["timesteps"].clone()).unwrap();
        assert_eq!(sched.timesteps, want_t, "{name}: timesteps");
        // diffusers' init_noise_sigma is an f32 → relative 6e-8.
        let ins = run["init_noise_sigma"].as_f64().unwrap();
        assert!((sched.init_noise_sigma - ins).abs() <= 1e-6 * ins, "{name}: {} vs {ins}", sched.init_noise_sigma);
        let x = tch::no_grad(|| {
            let model = unet_model(&unet, &cond, Some(&uncond), 7.5).unwrap();
            denoise(sampler, &cfg, 10, &lat, 7.5, model).unwrap()
        });
        let want = o.tensor(&format!("{name}_latents"));
        let scale = want.abs().max().double_value(&[]).max(1.0);
        assert!(max_diff(&x, &want, &format!("{name} latents")) <= 4e-3 * scale);
        let img = tch::no_grad(|| (vae.decode(&vae.unscale_latent(&x)) / 2.0 + 0.5).clamp(0.0, 1.0));
        let d = max_diff(&img, &o.tensor(&format!("{name}_image")), &format!("{name} image"));
        assert!(d <= 1e-3, "{name}: {d}");
    }

    // guidance > 1 without negative embeddings is refused; a wrong-shape model output too.
    assert!(unet_model(&unet, &cond, None, 7.5).is_err());
    let e = denoise(Sampler::Ddim, &folder, 2, &lat, 1.0, |x, _| Ok(x.narrow(1, 0, 1))).unwrap_err().to_string();
    assert!(e.contains("model output"), "{e}");
}

#[test]
fn scheduler_config_refuses_unbuilt_features() {
    let p = Path::new("scheduler_config.json");
    for (field, v) in [
        ("clip_sample", serde_json::json!(true)),
        ("use_karras_sigmas", serde_json::json!(true)),
        ("timestep_spacing", serde_json::json!("sideways")),
        ("beta_schedule", serde_json::json!("sigmoid")),
        ("prediction_type", serde_json::json!("flow")),
    ] {
        let e = SchedulerConfig::from_value(p, &serde_json::json!({ field: v })).unwrap_err().to_string();
        assert!(e.contains("scheduler_config.json") && e.contains(field), "{e}");
    }
}

#[test]
fn training_helpers_match_ddpm_scheduler() {
    // add_noise / get_velocity: diffusers computes ᾱ in f32 (≤ 6e-5 relative off the exact
    // product after 1000 roundings, see above) and the square roots and products in f32; ours
    // uses core/diffusion's f64 ᾱ cast to f32. Inputs are N(0, 1) (|x| ≤ ~4.5), so the
    // difference is ≲ 4.5 · (3e-5 + a few ε₃₂) ≈ 1.5e-4; bound 2e-4. The exact check of the
    // schedule itself is core/diffusion's.
    let Some(o) = oracle("training_helpers_match_ddpm_scheduler") else { return };
    let cfg = SchedulerConfig::from_file(&o.model().join("scheduler/scheduler_config.json")).unwrap();
    let ac = cfg.alphas_cumprod().unwrap();
    let theirs = o.tensor("ddpm_alphas_cumprod");
    let ours = Tensor::from_slice(&ac).to_kind(Kind::Float);
    assert!(max_diff(&ours, &theirs, "alphas_cumprod (f64 vs diffusers' f32)") <= 6e-5);
    let (x0, noise) = (o.tensor("ddpm_x0"), o.tensor("ddpm_noise"));
    let t = Tensor::from_slice(&serde_json::from_value::<Vec<i64>>(o.json["ddpm_t"].clone()).unwrap());
    let xt = training::add_noise(&ac, &x0, &noise, &t).unwrap();
    assert!(max_diff(&xt, &o.tensor("ddpm_noisy"), "add_noise") <= 2e-4);
    let v = training::v_target(&ac, &x0, &noise, &t).unwrap();
    assert!(max_diff(&v, &o.tensor("ddpm_velocity"), "get_velocity") <= 2e-4);

    // predict_x0 inverts the forward process for the exact prediction (f32 rounding only; the
    // division by √ᾱ_999 ≈ 0.068 amplifies ε₃₂·|x_t| ≈ 3e-7 to ≈ 5e-6; bound 1e-5 · max(1, |x0|)).
    let a = training::alpha_bar(&ac, &t, &x0).unwrap();
    for (pred, out) in [(Prediction::Epsilon, &noise), (Prediction::VPrediction, &v)] {
        let x = training::predict_x0(&xt, out, &a, pred).unwrap();
        assert!(max_diff(&x, &x0, &format!("predict_x0 {pred:?}")) <= 1e-5 * 5.0);
    }
    // Differentiable: d x̂0 / d ε̂ = −√(1−ᾱ)/√ᾱ elementwise, exactly what autograd gives.
    let e = noise.set_requires_grad(true);
    training::predict_x0(&xt, &e, &a, Prediction::Epsilon).unwrap().sum(Kind::Float).backward();
    let want = (-(a.neg() + 1.0).sqrt() / a.sqrt()).expand_as(&x0);
    assert!(max_diff(&e.grad(), &want, "d x0 / d eps") <= 1e-6 * want.abs().max().double_value(&[]));
    assert!(training::add_noise(&ac, &x0, &noise.narrow(0, 0, 2), &t).is_err());
    assert!(training::alpha_bar(&ac, &Tensor::from_slice(&[0i64, 1, 2, 1000]), &x0).is_err());
}

#[test]
fn reduced_precision_base_with_fp32_lora() {
    // bf16 / fp16 base weights against our fp32 model (itself checked against diffusers above)
    // on the same inputs. Bound: bf16 keeps 8 significant bits, unit roundoff u = 2⁻⁸ ≈ 3.9e-3
    // (fp16: 11 bits, u = 2⁻¹¹ ≈ 4.9e-4). Every weight and every layer output is rounded once
    // (libtorch's CPU kernels accumulate in f32), so each of the D ≈ 40 layers on the UNet's
    // deepest path adds ≈ 2u relative error (its weights' and its output's rounding, averaged over
    // the dot product); norms keep activations O(1), so independent errors add in quadrature:
    // relative RMS error ≈ √D · 2u ≈ 6.3 · 7.8e-3 ≈ 0.05 (bf16), 6e-3 (fp16). We bound the
    // relative RMS at 2× that (0.1, 0.0125): a cast that goes wrong (a weight left in zeros, a
    // kind mismatch silently truncating) gives O(1).
    let Some(o) = oracle("reduced_precision_base_with_fp32_lora") else { return };
    let m = o.model();
    tch::manual_seed(0);
    let g = Tensor::randn([2, 4, 16, 16], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[10.0f32, 731.0]);
    let ctx = Tensor::randn([2, 77, 32], (Kind::Float, Device::Cpu));
    let (_, unet32) = load::unet_from_diffusers(&m, Kind::Float, Device::Cpu).unwrap();
    let want = tch::no_grad(|| unet32.forward(&g, &t, &ctx));
    let norm = want.square().mean(Kind::Double).sqrt().double_value(&[]);
    for (kind, bound) in [(Kind::BFloat16, 0.1), (Kind::Half, 0.0125)] {
        let (store, unet) = load::unet_from_diffusers(&m, kind, Device::Cpu).unwrap();
        assert!(store.named_parameters().iter().all(|(_, p)| p.kind() == kind));
        let out = tch::no_grad(|| unet.forward(&g, &t, &ctx));
        assert_eq!(out.kind(), kind);
        let rel = (out.to_kind(Kind::Double) - want.to_kind(Kind::Double))
            .square()
            .mean(Kind::Double)
            .sqrt()
            .double_value(&[])
            / norm;
        eprintln!("{kind:?} base: relative RMS error {rel:.3e} (bound {bound})");
        assert!(rel <= bound, "{kind:?}: {rel}");
        // LoRA on top stays fp32 and gets fp32 gradients through the reduced-precision base.
        let cfg = LoraConfig {
            r: 4,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
            init: LoraInit::KaimingUniform,
            conv: false,
        };
        lora::inject(&store, &cfg).unwrap();
        let params = lora::parameters(&store);
        assert!(!params.is_empty() && params.iter().all(|(_, p)| p.kind() == Kind::Float && p.requires_grad()));
        unet.forward(&g, &t, &ctx).to_kind(Kind::Float).square().mean(Kind::Float).backward();
        // B starts at 0, so only the `up` (lora_B) gradients are non-zero at step 0.
        let nonzero = params.iter().filter(|(_, p)| p.grad().defined() && p.grad().abs().max().double_value(&[]) > 0.0);
        assert!(nonzero.count() >= params.len() / 2, "{kind:?}: LoRA gradients missing");
        assert!(params.iter().all(|(_, p)| !p.grad().defined() || p.grad().kind() == Kind::Float));
        assert!(store.named_parameters().iter().all(|(_, p)| !p.requires_grad()), "base weights must stay frozen");
    }
}
