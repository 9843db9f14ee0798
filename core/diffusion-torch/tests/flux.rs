//! Flux.1's transformer against diffusers 0.42.1 (tests/python/flux_oracle.py: tiny random
//! Flux-dev-like and schnell-like models, every parameter perturbed) and against the real
//! Flux.1-dev checkpoint's name/shape manifest.
//!
//! f32 tolerance: 1e-4 absolute on outputs of magnitude O(1) (max |x| printed). Both sides run
//! libtorch's kernels in f32, in the same op order where we could follow it, so they differ by
//! re-association only: a dot product of length K ≤ 4·64 = 256 here is off by ≲ √K·ε ≈ 16 ·
//! 6e-8 ≈ 1e-6 relative; the per-block LayerNorms/RMSNorms keep every block at unit scale, so
//! errors add along the ≈ 4 blocks · 6 matmuls of the deepest path: ≈ 24 · 1e-6 ≈ 2.4e-5 < 1e-4,
//! on any ISA or thread count.
//!
//! bf16 tolerance: each bf16 rounding is 2⁻⁸ ≈ 3.9e-3 relative; when two runs round
//! differently-ordered sums, their results differ by about one bf16 ulp at each of the ≈ 30
//! rounded intermediates of the deepest path, which partly cancel (random signs): √30 · 3.9e-3 ·
//! max|x| ≈ 0.02·max|x|. We allow 0.05·max|x|; the output's dtype is checked to be bf16 (so bf16
//! really ran). Measured here: 0 in f32 and in bf16 (the same libtorch, the same op order).

mod common;

use common::{max_diff, PyOracle};
use likeness_diffusion_torch::flux::{self, FluxConfig, FluxInputs, FluxTransformer2DModel};
use likeness_diffusion_torch::{load, lora, AutoencoderKL, LoraConfig, LoraInit, Mode, Store, VaeConfig};
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn oracle(test: &str) -> Option<&'static PyOracle> {
    static O: OnceLock<Option<PyOracle>> = OnceLock::new();
    O.get_or_init(|| PyOracle::run("flux_oracle.py", test)).as_ref()
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn run(o: &PyOracle, model: &FluxTransformer2DModel, kind: Kind, guided: bool) -> Tensor {
    let t = |n: &str| o.tensor(n).to_kind(kind);
    let (packed, ctx, pooled, timestep, guidance) = (t("packed"), t("ctx"), t("pooled"), t("timestep"), t("guidance"));
    let (img_ids, txt_ids) = (o.tensor("img_ids"), o.tensor("txt_ids"));
    let inputs = FluxInputs {
        hidden_states: &packed,
        encoder_hidden_states: &ctx,
        pooled_projections: &pooled,
        timestep: &timestep,
        img_ids: &img_ids,
        txt_ids: &txt_ids,
        guidance: guided.then_some(&guidance),
        id_tokens: None,
    };
    let y = tch::no_grad(|| model.forward(&inputs)).unwrap();
    assert_eq!(y.kind(), kind, "the forward runs in the weights' dtype");
    y
}

#[test]
fn flux_transformer_matches_diffusers() {
    let Some(o) = oracle("flux_transformer_matches_diffusers") else { return };
    for (variant, guided) in [("dev", true), ("schnell", false)] {
        let (_s, model) =
            flux::flux_from_diffusers(&o.path(variant), Kind::Float, Device::Cpu, Mode::Alloc, false).unwrap();
        let f32_err = max_diff(&run(o, &model, Kind::Float, guided), &o.tensor(&format!("{variant}_out")), variant);
        assert!(f32_err <= TOL, "{variant} f32: {f32_err:.3e} > {TOL:.0e}");
        let (_s, mb) =
            flux::flux_from_diffusers(&o.path(variant), Kind::BFloat16, Device::Cpu, Mode::Alloc, false).unwrap();
        let want = o.tensor(&format!("{variant}_out_bf16"));
        let bf16_err = max_diff(&run(o, &mb, Kind::BFloat16, guided), &want, &format!("{variant} bf16"));
        let scale = want.abs().max().double_value(&[]);
        assert!(bf16_err <= 0.05 * scale, "{variant} bf16: {bf16_err:.3e} > 0.05 · {scale:.3}");
    }
}

/// peft's LoRA on every Linear kind of the blocks (musubi-tuner's "all linears" set) loads into
/// our injected slots and gives diffusers + peft's output; merged = un-merged.
#[test]
fn peft_lora_on_flux_matches_diffusers() {
    let Some(o) = oracle("peft_lora_on_flux_matches_diffusers") else { return };
    let (store, model) =
        flux::flux_from_diffusers(&o.path("dev"), Kind::Float, Device::Cpu, Mode::Alloc, false).unwrap();
    let base = run(o, &model, Kind::Float, true);
    let m = &o.json["lora"];
    let cfg = LoraConfig {
        r: m["r"].as_i64().unwrap(),
        alpha: m["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: m["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        init: LoraInit::KaimingUniform,
        conv: false,
    };
    let injected = lora::inject(&store, &cfg).unwrap();
    let tensors = Tensor::read_safetensors(o.path("lora.safetensors")).unwrap();
    assert_eq!(tensors.len() as u64, m["tensors"].as_u64().unwrap());
    assert_eq!(2 * injected.len(), tensors.len(), "the same modules as peft");
    lora::load_peft(&store, tensors, "lora").unwrap();
    let ours = run(o, &model, Kind::Float, true);
    assert!(max_diff(&ours, &o.tensor("lora_out"), "flux lora") <= TOL);
    assert!(max_diff(&base, &ours, "flux lora vs base") > 100.0 * TOL, "the adapter matters");
    lora::merge_all(&store).unwrap();
    assert!(max_diff(&run(o, &model, Kind::Float, true), &ours, "merged vs un-merged") <= TOL);
}

/// The same weights as an original Black Forest Labs file (flux_oracle.py writes it from the
/// diffusers weights and checks it with diffusers' own single-file converter): the same output,
/// bit for bit (the same values reach the same parameters). The ComfyUI-style fp8-scaled copy
/// gives diffusers' output on the dequantised weights (w = fp8 · scale_weight in f32 on both
/// sides; the bound is TOL as for any f32 comparison).
#[test]
fn bfl_single_files_load_as_the_diffusers_folder() {
    let Some(o) = oracle("bfl_single_files_load_as_the_diffusers_folder") else { return };
    let cfg = FluxConfig::from_file(&o.path("dev/transformer/config.json")).unwrap();
    let (_s, m) = flux::flux_from_bfl_single_file(
        &o.path("dev_bfl.safetensors"),
        &cfg,
        Kind::Float,
        Device::Cpu,
        Mode::Alloc,
        false,
    )
    .unwrap();
    assert_eq!(max_diff(&run(o, &m, Kind::Float, true), &o.tensor("dev_out"), "BFL file"), 0.0);
    let file = o.path("dev_bfl_fp8_scaled.safetensors");
    let (_s, m) = flux::flux_from_bfl_single_file(&file, &cfg, Kind::Float, Device::Cpu, Mode::Alloc, false).unwrap();
    let d = max_diff(&run(o, &m, Kind::Float, true), &o.tensor("dev_fp8_out"), "BFL fp8 scaled");
    assert!(d <= TOL, "{d}");
    // A tensor the map does not know is named, not skipped.
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Tensor::read_safetensors(o.path("dev_bfl.safetensors")).unwrap();
    tensors.push(("double_blocks.0.img_attn.extra.weight".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));
    let bad = dir.path().join("bad.safetensors");
    Tensor::write_safetensors(&tensors, &bad).unwrap();
    let e = flux::flux_from_bfl_single_file(&bad, &cfg, Kind::Float, Device::Cpu, Mode::Plan, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unexpected: double_blocks.0.img_attn.extra.weight") && e.contains("bad.safetensors"), "{e}");
}

/// `fp8_blocks`: the blocks' Linear weights held in fp8 (1 byte each) with a per-tensor scale,
/// dequantised in each forward, give diffusers' output with the same quantisation applied to its
/// weights (flux_oracle.py: scale = max|w|/448, q = e4m3fn(w/scale), w' = q·scale, all f32 —
/// the same libtorch ops on both sides, so TOL covers it). The weights really are fp8.
#[test]
fn fp8_block_weights_match_diffusers_on_the_quantised_weights() {
    let Some(o) = oracle("fp8_block_weights_match_diffusers_on_the_quantised_weights") else { return };
    let (store, m) = flux::flux_from_diffusers(&o.path("dev"), Kind::Float, Device::Cpu, Mode::Alloc, true).unwrap();
    let fp8: Vec<_> = store.named_parameters().into_iter().filter(|(_, t)| t.kind() == Kind::Float8e4m3fn).collect();
    assert!(fp8.iter().all(|(n, _)| n.contains("transformer_blocks.") && n.ends_with(".weight")));
    let bytes = |f: &dyn Fn(&Tensor) -> bool| -> i64 {
        store
            .named_parameters()
            .iter()
            .filter(|(_, t)| f(t))
            .map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum()
    };
    let (in_fp8, rest) = (bytes(&|t| t.kind() == Kind::Float8e4m3fn), bytes(&|t| t.kind() != Kind::Float8e4m3fn));
    eprintln!("fp8: {} tensors, {in_fp8} bytes in fp8, {rest} bytes in f32", fp8.len());
    assert!(fp8.len() > 20, "the blocks' Linear weights are stored in fp8");
    let d = max_diff(&run(o, &m, Kind::Float, true), &o.tensor("dev_fp8base_out"), "fp8 blocks");
    assert!(d <= TOL, "{d}");
    // And the quantisation matters (else the comparison proves nothing about it).
    assert!(max_diff(&o.tensor("dev_out"), &o.tensor("dev_fp8base_out"), "fp8 vs full precision") > 10.0 * TOL);
    assert!(lora::merge_all(&store).is_ok(), "no adapter: nothing to merge");
}

#[test]
fn rope_tables_and_packing_match_flux_pipeline() {
    let Some(o) = oracle("rope_tables_and_packing_match_flux_pipeline") else { return };
    let ids = Tensor::cat(&[o.tensor("txt_ids"), o.tensor("img_ids")], 0);
    let (cos, sin) = flux::rope(&ids, &[4, 6, 6]);
    // Same f64 angles then one rounding to f32 on both sides: equal up to libm's cos/sin (≤ 1 ulp
    // of f64, invisible after the f32 rounding except at a tie): 1e-7 absolute.
    assert!(max_diff(&cos, &o.tensor("rope_cos"), "rope cos") <= 1e-7);
    assert!(max_diff(&sin, &o.tensor("rope_sin"), "rope sin") <= 1e-7);
    let latents = o.tensor("latents");
    let (_, _, h, w) = latents.size4().unwrap();
    assert!(flux::pack_latents(&latents).equal(&o.tensor("packed")), "pack_latents");
    assert!(flux::unpack_latents(&o.tensor("packed"), h, w).equal(&latents), "unpack_latents");
    let ids = flux::latent_image_ids(h / 2, w / 2, Device::Cpu);
    assert!(ids.equal(&o.tensor("img_ids")), "latent_image_ids");
}

#[test]
fn guidance_must_match_the_models_guidance_embedding() {
    let Some(o) = oracle("guidance_must_match_the_models_guidance_embedding") else { return };
    for (variant, guided) in [("dev", false), ("schnell", true)] {
        let (_s, model) =
            flux::flux_from_diffusers(&o.path(variant), Kind::Float, Device::Cpu, Mode::Alloc, false).unwrap();
        let (packed, ctx, pooled, t, g) =
            (o.tensor("packed"), o.tensor("ctx"), o.tensor("pooled"), o.tensor("timestep"), o.tensor("guidance"));
        let (img_ids, txt_ids) = (o.tensor("img_ids"), o.tensor("txt_ids"));
        let inputs = FluxInputs {
            hidden_states: &packed,
            encoder_hidden_states: &ctx,
            pooled_projections: &pooled,
            timestep: &t,
            img_ids: &img_ids,
            txt_ids: &txt_ids,
            guidance: guided.then_some(&g),
            id_tokens: None,
        };
        let e = tch::no_grad(|| model.forward(&inputs)).unwrap_err().to_string();
        assert!(e.contains("guidance_embeds"), "{variant}: {e}");
    }
}

#[test]
fn flux_vae_matches_diffusers() {
    let Some(o) = oracle("flux_vae_matches_diffusers") else { return };
    let (_s, vae) = load::vae_from_diffusers(&o.path("vae"), Kind::Float, Device::Cpu).unwrap();
    let (mean, _) = tch::no_grad(|| vae.encode(&o.tensor("vae_image")));
    assert!(max_diff(&mean, &o.tensor("vae_mean"), "vae mean") <= TOL);
    let scaled = vae.scale_latent(&mean);
    assert!(max_diff(&scaled, &o.tensor("vae_scaled"), "scaled latent") <= TOL);
    let decoded = tch::no_grad(|| vae.decode(&vae.unscale_latent(&scaled)));
    assert!(max_diff(&decoded, &o.tensor("vae_decoded"), "vae decode") <= TOL);
}

#[test]
fn flux_vae_layout_equals_the_real_checkpoint() {
    let cfg = VaeConfig::from_file(&data("flux_vae_config.json")).unwrap();
    let store = Store::new(Mode::Plan, Kind::BFloat16, Device::Cpu);
    let _vae = AutoencoderKL::new(&store, &cfg);
    common::compare_with_manifest(&store, &data("flux_vae_diffusers.json"));
}

#[test]
fn flux_dev_layout_equals_the_real_checkpoint() {
    let cfg = FluxConfig::from_file(&data("flux1_dev_transformer_config.json")).unwrap();
    let store = Store::new(Mode::Plan, Kind::BFloat16, Device::Cpu);
    let _model = FluxTransformer2DModel::new(&store, &cfg);
    common::compare_with_manifest(&store, &data("flux1_dev_transformer_diffusers.json"));
}

#[test]
fn bad_flux_config_names_the_field() {
    let p = std::path::Path::new("transformer/config.json");
    let e = FluxConfig::from_value(p, serde_json::json!({"attention_head_dim": 128, "axes_dims_rope": [16, 56, 50]}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("axes_dims_rope") && e.contains("transformer/config.json"), "{e}");
    let e =
        FluxConfig::from_value(p, serde_json::json!({"_class_name": "SD3Transformer2DModel"})).unwrap_err().to_string();
    assert!(e.contains("_class_name"), "{e}");
}
