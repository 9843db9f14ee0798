//! Parity with diffusers 0.42.1 + peft (tests/python/unet_oracle.py): tiny random SD1.5-shaped
//! UNets (conv and linear projections) and VAE saved with save_pretrained, a peft LoRA and a
//! LoCon adapter, and the same weights in the single-file LDM layout.
//!
//! Tolerance (every comparison below): 1e-4 absolute on outputs of magnitude O(1) (the max |x|
//! is printed). Both sides run the same libtorch kernels in f32 but not the same op sequence
//! (reshape/permute orders, GEGLU chunking, the residual additions' order), so the results
//! differ by re-association only. One layer's f32 dot product of length K (≤ 9·128 = 1152 here,
//! 77 or 256 keys in attention) is off by ≲ √K·ε ≈ 34 · 6e-8 ≈ 2e-6 relative (random-sign
//! rounding, ε = 2⁻²⁴); group/layer norms rescale every block to unit size, so errors add rather
//! than multiply along the ≈ 40 layers of the deepest path: ≈ 40 · 2e-6 = 8e-5 < 1e-4. This
//! holds on AVX2 and AVX-512 alike because the bound is on the rounding of any order, not on
//! one kernel's result. Measured on this machine: exactly 0 everywhere (the same libtorch runs
//! both sides, LIBTORCH_USE_PYTORCH=1, with the same op order); the bound covers another thread
//! count or ISA, where reductions may be split differently.

mod common;

use common::{max_diff, PyOracle as Oracle};
use likeness_diffusion_torch::{load, lora, LoraConfig, LoraInit, UNetConfig, VaeConfig};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

/// One oracle run per test binary (the Python start dominates: ≈ 30 s on 2 cores).
fn oracle(test: &str) -> Option<&'static Oracle> {
    static O: OnceLock<Option<Oracle>> = OnceLock::new();
    O.get_or_init(|| Oracle::run("unet_oracle.py", test)).as_ref()
}

fn unet_out(o: &Oracle, unet: &likeness_diffusion_torch::UNet2DConditionModel) -> Tensor {
    tch::no_grad(|| unet.forward(&o.tensor("sample"), &o.tensor("timestep"), &o.tensor("ctx")))
}

#[test]
fn unet_matches_diffusers() {
    let Some(o) = oracle("unet_matches_diffusers") else { return };
    for name in ["unet", "unet_linear"] {
        let (_, unet) = load::unet_from_diffusers(&o.path(name), Kind::Float, Device::Cpu).unwrap();
        let d = max_diff(&unet_out(o, &unet), &o.tensor(&format!("{name}_out")), name);
        assert!(d <= TOL, "{name}: {d}");
    }
}

#[test]
fn vae_matches_diffusers() {
    let Some(o) = oracle("vae_matches_diffusers") else { return };
    let (_, vae) = load::vae_from_diffusers(o.dir.path(), Kind::Float, Device::Cpu).unwrap();
    assert_eq!(vae.config.scaling_factor, 0.18215);
    let (mean, logvar) = tch::no_grad(|| vae.encode(&o.tensor("image")));
    assert!(max_diff(&mean, &o.tensor("vae_mean"), "vae mean") <= TOL);
    assert!(max_diff(&logvar, &o.tensor("vae_logvar"), "vae logvar") <= TOL);
    let img = tch::no_grad(|| vae.decode(&o.tensor("latent")));
    assert!(max_diff(&img, &o.tensor("vae_decoded"), "vae decode") <= TOL);
}

#[test]
fn vae_decode_is_differentiable() {
    // The identity loss backpropagates through decode: the gradient with respect to the latent
    // must equal a central finite difference along a random direction. In f64 (weights cast on
    // load) with step h = 1e-4 the truncation error is O(h²·f''') ≈ 1e-8 and rounding
    // ≈ ε₆₄/h ≈ 2e-12, so a 1e-6 relative bound has a wide margin.
    let Some(o) = oracle("vae_decode_is_differentiable") else { return };
    let (_, vae) = load::vae_from_diffusers(&o.path("vae"), Kind::Double, Device::Cpu).unwrap();
    let z = o.tensor("latent").to_kind(Kind::Double).set_requires_grad(true);
    let w = o.tensor("vae_decoded").to_kind(Kind::Double); // fixed weights for a scalar loss
    let loss = (vae.decode(&z) * &w).sum(Kind::Double);
    loss.backward();
    let g = z.grad();
    let dir = o.tensor("sample").narrow(0, 0, 1).to_kind(Kind::Double);
    let analytic = (&g * &dir).sum(Kind::Double).double_value(&[]);
    let h = 1e-4;
    let f = |s: f64| tch::no_grad(|| (vae.decode(&(z.detach() + &dir * s)) * &w).sum(Kind::Double).double_value(&[]));
    let fd = (f(h) - f(-h)) / (2.0 * h);
    eprintln!("decode directional derivative: autograd {analytic:.9e}, finite difference {fd:.9e}");
    assert!(analytic.abs() > 1e-3, "the gradient does not reach the latent");
    assert!((analytic - fd).abs() <= 1e-6 * fd.abs().max(1.0), "{analytic} vs {fd}");
}

fn peft_config(o: &Oracle, name: &str) -> LoraConfig {
    let m = &o.json[name];
    LoraConfig {
        r: m["r"].as_i64().unwrap(),
        alpha: m["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: m["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        init: LoraInit::KaimingUniform,
        conv: true,
    }
}

#[test]
fn peft_lora_and_locon_match_diffusers() {
    let Some(o) = oracle("peft_lora_and_locon_match_diffusers") else { return };
    for name in ["lora", "locon"] {
        let (store, unet) = load::unet_from_diffusers(&o.path("unet"), Kind::Float, Device::Cpu).unwrap();
        let base = unet_out(o, &unet);
        let injected = lora::inject(&store, &peft_config(o, name)).unwrap();
        // Fresh adapters (B = 0) leave the output unchanged, bit for bit.
        assert!(unet_out(o, &unet).equal(&base), "{name}: zero-initialised B changed the output");
        let tensors = Tensor::read_safetensors(o.path(&format!("{name}.safetensors"))).unwrap();
        assert_eq!(tensors.len() as u64, o.json[name]["tensors"].as_u64().unwrap());
        assert_eq!(2 * injected.len(), tensors.len(), "{name}: the same modules as peft");
        lora::load_peft(&store, tensors, name).unwrap();
        let ours = unet_out(o, &unet);
        let d = max_diff(&ours, &o.tensor(&format!("{name}_out")), name);
        assert!(d <= TOL, "{name}: {d}");
        // The adapter matters at all (else the comparison above proves nothing about it).
        assert!(max_diff(&base, &ours, &format!("{name} vs base")) > 100.0 * TOL);
        // Adapter scale 0 = the base model; merged weights = the un-merged path (same bound).
        lora::set_adapter_scale(&store, 0.0);
        assert!(unet_out(o, &unet).equal(&base));
        lora::set_adapter_scale(&store, 1.0);
        lora::merge_all(&store).unwrap();
        assert!(lora::parameters(&store).is_empty());
        assert!(max_diff(&unet_out(o, &unet), &ours, &format!("{name} merged vs un-merged")) <= TOL);
    }
}

#[test]
fn single_file_layout_gives_the_same_outputs() {
    let Some(o) = oracle("single_file_layout_gives_the_same_outputs") else { return };
    let file = o.path("single_file.safetensors");
    let ucfg = UNetConfig::from_file(&o.path("unet/config.json")).unwrap();
    let (_, unet) = load::unet_from_single_file(&file, &ucfg, Kind::Float, Device::Cpu).unwrap();
    assert!(max_diff(&unet_out(o, &unet), &o.tensor("unet_out"), "single-file unet") <= TOL);
    let vcfg = VaeConfig::from_file(&o.path("vae/config.json")).unwrap();
    let (_, vae) = load::vae_from_single_file(&file, &vcfg, Kind::Float, Device::Cpu).unwrap();
    let img = tch::no_grad(|| vae.decode(&o.tensor("latent")));
    assert!(max_diff(&img, &o.tensor("vae_decoded"), "single-file vae decode") <= TOL);
    let (mean, _) = tch::no_grad(|| vae.encode(&o.tensor("image")));
    assert!(max_diff(&mean, &o.tensor("vae_mean"), "single-file vae mean") <= TOL);
}

#[test]
fn reduced_precision_base_loads_cast() {
    // bf16 base weights (cast on load), LoRA in fp32: the output tracks the fp32 one within
    // bf16's precision. bf16 keeps 8 significant bits (ε = 2⁻⁸ ≈ 3.9e-3 relative per rounding);
    // the weights and every activation are rounded, with norms resetting the scale per block, so
    // ≈ 40 layers · 3.9e-3 / √(averaging over K terms ≥ 36) ≈ 0.03 relative; we bound the max
    // abs error at 0.25 · max|x| to stay safe on outliers — this checks the casting works (a
    // wrong cast gives garbage, O(max|x|)), not bf16 accuracy.
    let Some(o) = oracle("reduced_precision_base_loads_cast") else { return };
    let (store, unet) = load::unet_from_diffusers(&o.path("unet"), Kind::BFloat16, Device::Cpu).unwrap();
    assert!(store.named_parameters().iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    lora::inject(&store, &peft_config(o, "lora")).unwrap();
    assert!(lora::parameters(&store).iter().all(|(_, t)| t.kind() == Kind::Float));
    lora::load_peft(&store, Tensor::read_safetensors(o.path("lora.safetensors")).unwrap(), "lora").unwrap();
    let out = unet_out(o, &unet).to_kind(Kind::Float);
    let want = o.tensor("lora_out");
    let m = want.abs().max().double_value(&[]);
    assert!(max_diff(&out, &want, "bf16 base + fp32 lora") <= 0.25 * m);
}

#[test]
fn mismatched_weights_are_all_named() {
    let Some(o) = oracle("mismatched_weights_are_all_named") else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = o.path("unet");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t = Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    t.retain(|(n, _)| n != "conv_in.bias" && n != "mid_block.resnets.1.conv2.weight");
    for (n, x) in t.iter_mut() {
        if n == "conv_out.weight" {
            *x = x.narrow(0, 0, 2);
        }
    }
    t.push(("extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&t, dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let e = match load::unet_from_diffusers(dir.path(), Kind::Float, Device::Cpu) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    for s in [
        "missing: conv_in.bias",
        "missing: mid_block.resnets.1.conv2.weight",
        "unexpected: extra.weight",
        "conv_out.weight: model has [4, 32, 3, 3], file has [2, 32, 3, 3]",
    ] {
        assert!(e.contains(s), "{s} not in:\n{e}");
    }
    // A LoRA file for a different rank is refused with the names too.
    let (store, _unet) = load::unet_from_diffusers(&src, Kind::Float, Device::Cpu).unwrap();
    let mut cfg = peft_config(o, "lora");
    cfg.r = 2;
    lora::inject(&store, &cfg).unwrap();
    let e = lora::load_peft(&store, Tensor::read_safetensors(o.path("lora.safetensors")).unwrap(), "lora.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.safetensors") && e.contains("wrong shape") && e.contains("to_q.lora_A.weight"), "{e}");
}

#[test]
fn sharded_folder_loads() {
    let Some(o) = oracle("sharded_folder_loads") else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(o.path("vae/config.json"), dir.path().join("config.json")).unwrap();
    let all = Tensor::read_safetensors(o.path("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| n.starts_with("encoder."));
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("diffusion_pytorch_model-00001-of-00002.safetensors", &a),
        ("diffusion_pytorch_model-00002-of-00002.safetensors", &b),
    ] {
        Tensor::write_safetensors(part, dir.path().join(file)).unwrap();
        for (n, _) in part.iter() {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let (_, vae) = load::vae_from_diffusers(dir.path(), Kind::Float, Device::Cpu).unwrap();
    let img = tch::no_grad(|| vae.decode(&o.tensor("latent")));
    assert!(max_diff(&img, &o.tensor("vae_decoded"), "sharded vae decode") <= TOL);
}

#[test]
fn ddim_cfg_ten_steps_matches_diffusers() {
    // 10 DDIM steps with guidance 7.5 then the VAE decode. Each step mixes two UNet outputs
    // with weights up to 8.5 and divides by √ᾱ_t (≥ √ᾱ_901 ≈ 0.2), so a per-step UNet
    // discrepancy δ (relative, ≤ 8e-5 by the bound above) can grow by ≲ 8.5 / 0.2 ≈ 40 over the
    // run before later steps' √ᾱ_prev shrink it: ≈ 3e-3 relative in the worst case. The latents
    // of this random tiny model reach |x| ≈ 45, so they are bounded relatively at 4e-3·max|x|;
    // the decoded image (|x| ≈ 2) at the task's 1e-3 per pixel: the decoder's group norms
    // renormalise, so the image carries about the latents' relative error (typically far below
    // the worst case, whose rounding signs would all have to align) times O(1). The schedule is
    // core/diffusion's f64 ᾱ where diffusers' is f32 (≤ 6e-5 relative apart, inside the same
    // budget). Measured here: latents 3.3e-5 (|x| ≤ 45), image 3.0e-6. A wrong schedule (one
    // timestep off) moves pixels by ~1e-2, so the test still bites.
    let Some(o) = oracle("ddim_cfg_ten_steps_matches_diffusers") else { return };
    use likeness_diffusion_torch::sampling::{denoise, unet_model, Sampler, Schedule, SchedulerConfig};
    let (_, unet) = load::unet_from_diffusers(&o.path("unet"), Kind::Float, Device::Cpu).unwrap();
    let (_, vae) = load::vae_from_diffusers(&o.path("vae"), Kind::Float, Device::Cpu).unwrap();
    let cfg = SchedulerConfig::sd15();
    let sched = Schedule::new(Sampler::Ddim, &cfg, 10).unwrap();
    let want_t: Vec<f64> = o.json["ddim_timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    assert_eq!(sched.timesteps, want_t);
    let x = tch::no_grad(|| {
        let model = unet_model(&unet, &o.tensor("ddim_cond"), Some(&o.tensor("ddim_uncond")), 7.5).unwrap();
        denoise(Sampler::Ddim, &cfg, 10, &o.tensor("ddim_latents"), 7.5, model).unwrap()
    });
    let want = o.tensor("ddim_x");
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(max_diff(&x, &want, "ddim latents") <= 4e-3 * scale);
    let img = tch::no_grad(|| vae.decode(&vae.unscale_latent(&x)));
    assert!(max_diff(&img, &o.tensor("ddim_image"), "ddim decoded image") <= 1e-3);
}
