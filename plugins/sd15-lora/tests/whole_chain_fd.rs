//! Issue 8's whole-chain oracle: the identity term's gradient with respect to the LoRA weights
//! matches central finite differences through x̂0 → VAE decode → metric → loss, in f64.
//!
//! The chain is the engine's (core/engine/src/train/step.rs) with every piece real: the plugin's
//! `forward_batch(Train)` on the tiny random SD1.5 pipeline (tests/python/make_tiny_sd15.py,
//! `precision = "fp64"`, min-SNR-γ so the per-sample weights are not all 1); the metric is the
//! CLIP image tower of `likeness-clip` (random f64 weights, its differentiable
//! `resize_crop_normalize` from the 32×32 decoded pixels to 24×24, what plugins/clip's
//! `embed_tensor` does), the reference embedding that of a real photo (no graph); the loss is
//! plugins/loss-identity's cosine mode with `identity_weighting = "timestep"`:
//! `L = (1/n)·Σᵢ wᵢ·(1 − cos(eᵢ, rᵢ))`, `wᵢ` = the model's `timestep_weights` output.
//! (Plugin crates cannot share one test binary — their exported symbols clash — so the metric
//! and the loss formula are reproduced here from the libraries they are built on.)

mod common;

use std::path::Path;

use common::{images, tiny, CAPTIONS, SIZE};
use likeness_clip::preprocess::{resize_crop_normalize, rgb_u8_to_tensor};
use likeness_clip::{l2_normalize, ClipConfig, ClipModel, TextConfig, VisionConfig};
use likeness_plugin_sd15_lora::Sd15Lora;
use likeness_sdk::abi::{sample_seed, NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, ScaledView, StepContext, Texts};
use tch::{Kind, Tensor};

const REFERENCE_PHOTO: &str = "photos/face_recognition/obama.jpg";

/// A tiny CLIP (both towers, since `ClipModel::random` builds both; only the image tower is
/// used): 24×24 images in 8×8 patches, 2 blocks of width 32, exact GELU (open_clip's default).
fn tiny_clip() -> ClipModel {
    let cfg = ClipConfig {
        text: TextConfig {
            layers: 1,
            heads: 2,
            width: 16,
            mlp: 32,
            context_length: 8,
            vocab_size: 64,
            eps: 1e-5,
            quick_gelu: false,
        },
        vision: VisionConfig {
            layers: 2,
            heads: 4,
            width: 32,
            mlp: 128,
            image_size: 24,
            patch_size: 8,
            eps: 1e-5,
            quick_gelu: false,
        },
        projection_dim: 16,
        logit_scale_init: (1.0f64 / 0.07).ln(),
    };
    ClipModel::random(&cfg, 11, Kind::Double, tch::Device::Cpu).unwrap_or_else(|e| panic!("tiny CLIP: {e}"))
}

/// plugins/clip's differentiable embedding: [B, 3, H, W] in [0, 1] → [B, D] unit rows.
fn embed(clip: &ClipModel, pixels: &Tensor) -> Tensor {
    let x = resize_crop_normalize(pixels, clip.cfg.vision.image_size);
    l2_normalize(&clip.vision.forward(&x).unwrap_or_else(|e| panic!("image tower: {e}")).image_embeds)
}

/// plugins/loss-identity's cosine mode with a weight per row, every row valid:
/// `(1/n)·Σ wᵢ·(1 − cos(eᵢ, rᵢ))` (rows of `e` and `r` are unit, so cos is their dot product).
fn identity_loss(e: &Tensor, r: &Tensor, w: &Tensor) -> Tensor {
    let cos = (e * r).sum_dim_intlist([-1i64].as_slice(), false, Kind::Double);
    ((cos.neg() + 1.0) * w).mean(Kind::Double)
}

/// forward_batch(Train) on `target` with fixed per-sample seeds (hence the same t and noise at
/// every call); returns the `timestep_weights` output.
fn forward(m: &mut Sd15Lora, target: &CpuTensor<f32>, seeds: &[u64]) -> Vec<f32> {
    let views = [NamedView { name: RStr::from_str("target"), view: target.view() }];
    let strs: Vec<RStr<'_>> = CAPTIONS.iter().map(|s| RStr::from_str(s)).collect();
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&strs) }];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(seeds) };
    let out = m
        .forward_batch(
            Inputs::new(RSlice::from_slice(&views)),
            Texts::new(RSlice::from_slice(&texts)),
            &ctx,
            ForwardMode::Train,
        )
        .unwrap_or_else(|e| panic!("forward_batch: {e}"));
    let (name, w) = out.outputs.iter().find(|(n, _)| n == "timestep_weights").expect("no output timestep_weights");
    CpuTensor::<f32>::from_managed(w, name).unwrap().data
}

/// The per-sample weights as the loss reads them (the engine passes them as f32).
fn weights(w: &[f32]) -> Tensor {
    Tensor::from_slice(w).to_kind(Kind::Double)
}

/// The reference photo as a [1, 3, H, W] f64 tensor in [0, 1].
fn photo(path: &Path) -> Tensor {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    let (w, h) = img.dimensions();
    rgb_u8_to_tensor(img.as_raw(), h as usize, w as usize).to_kind(Kind::Double)
}

/// The analytic gradient of L (rows weighted by `w`) in the engine's order: model forward, the
/// metric and the loss backward to dL/dpixels (f64 autograd here), then the model's
/// `backward_scaled` with that pixel gradient and weight 0 on the diffusion loss (only the
/// identity term is checked). The f64 gradient crosses the ABI (f32 only) as the exact sum of two
/// f32 tensors hi + lo, lo = g − f32(g) (itself rounded by 2⁻²⁴·|lo| ≈ 2⁻⁴⁸·|g|), which the
/// plugin sums in f64. Returns L and leaves the LoRA gradients in the parameters' `.grad`.
fn analytic(m: &mut Sd15Lora, clip: &ClipModel, r: &Tensor, target: &CpuTensor<f32>, seeds: &[u64], w: &[f32]) -> f64 {
    m.zero_grad().unwrap();
    let w_model = forward(m, target, seeds);
    assert_eq!(w_model.len(), w.len());
    let px = m.pending_pixels().expect("pixels").copy().set_requires_grad(true);
    assert_eq!(px.kind(), Kind::Double);
    let l = identity_loss(&embed(clip, &px), r, &weights(w));
    l.backward();
    let g = px.grad();
    let hi = g.to_kind(Kind::Float);
    let lo = (&g - hi.to_kind(Kind::Double)).to_kind(Kind::Float);
    let shape = px.size();
    let as_cpu = |t: &Tensor| CpuTensor::new(shape.clone(), Vec::<f32>::try_from(t.flatten(0, -1)).unwrap());
    let (hi, lo) = (as_cpu(&hi), as_cpu(&lo));
    let grads = [
        ScaledView { name: RStr::from_str("pixels"), view: hi.view(), scale: 1.0 },
        ScaledView { name: RStr::from_str("pixels"), view: lo.view(), scale: 1.0 },
    ];
    m.backward_scaled(&grads, 0.0).unwrap_or_else(|e| panic!("backward_scaled: {e}"));
    l.double_value(&[])
}

/// Tolerance (h = 10⁻⁴; the LoRA weights are O(0.1)).
/// * Rounding: cos and the weights are O(1) (wᵢ = min(SNR, γ)/SNR ≤ 1, 1 − cos ∈ [0, 2]); f64
///   evaluation through UNet, VAE and CLIP (~10 stages, reductions over ≤ 10³ terms of O(1)
///   values, errors added linearly in the worst case) errs by δ ≲ 10³·ε₆₄ ≈ 1.1·10⁻¹³ absolute,
///   so the central difference carries δ/h ≈ 1.1·10⁻⁹.
/// * Truncation: h²/6·|∂³L/∂θ³|. L depends on a weight through a smooth network in which the
///   weights are O(θ₀ = 0.1), so ∂³L/∂θ³ ~ S/θ₀² with S the scale of the first derivatives
///   (the largest |grad| among the checked entries: third derivatives mix directions, so one
///   entry's own small gradient does not bound them): 10⁻⁸/6·100·S ≈ 1.7·10⁻⁷·S.
/// * Analytic side: f64 autograd throughout, the hi + lo transport adds ≈ 2⁻⁴⁸ relative.
///
/// Bound: 2·10⁻⁹ + 10⁻⁶·S (about twice the rounding, six times the truncation estimate). The
/// negative control below shows that a wrong chain term (the timestep weights dropped) exceeds
/// it by orders of magnitude.
#[test]
fn the_identity_term_gradient_matches_finite_differences_through_the_whole_chain() {
    let test = "the_identity_term_gradient_matches_finite_differences_through_the_whole_chain";
    // The pipeline folder (the single file beside it is plugin.rs's).
    let Some((dir, _)) = tiny(test) else { return };
    let Some(ref_path) = likeness_sdk::testing::data_path_or_skip(test, REFERENCE_PHOTO) else { return };
    let cfg = serde_json::json!({
        "pretrained": dir, "resolution": SIZE, "lora_rank": 4, "sample_steps": 4,
        "precision": "fp64", "min_snr_gamma": 5.0,
    })
    .to_string();
    let mut m = Sd15Lora::create(&cfg, Device::CPU, 8).unwrap_or_else(|e| panic!("create: {e}"));
    // Non-zero lora_B first (it starts at 0, which would make every lora_A gradient 0).
    common::perturb_lora(&m, 50);
    let clip = tiny_clip();
    // The reference embedding of the real photo, repeated per row; no graph (the engine embeds
    // references in Eval mode).
    let r = tch::no_grad(|| embed(&clip, &photo(&ref_path))).repeat([2, 1]);
    let target = images(2, 6);
    let sd: Vec<u64> = (0..2).map(|i| sample_seed(9, 1, 0, i)).collect();

    // identity_weighting = "timestep": the weights are the model's own output for these seeds.
    let w32 = forward(&mut m, &target, &sd);
    assert!(w32.iter().any(|&w| w != 1.0), "min-SNR-γ weights are all 1 ({w32:?}): the weighting is not exercised");
    let params = m.lora_parameters();
    let find = |pat: &str| params.iter().find(|(n, _)| n.contains(pat)).unwrap_or_else(|| panic!("no {pat} parameter"));
    // Four entries (each costs two forwards): lora_A and lora_B of the first UNet module and a
    // lora_B at the far end of the UNet (up_blocks), entry 7 of lora_A being a small gradient.
    let pick: Vec<(String, Tensor, i64)> =
        [(find("lora_A"), 0i64), (find("lora_A"), 7), (find("lora_B"), 0), (params.last().unwrap(), 7)]
            .into_iter()
            .map(|((n, p), k)| (n.clone(), p.shallow_clone(), k))
            .collect();
    let read = |pick: &[(String, Tensor, i64)]| -> Vec<f64> {
        pick.iter().map(|(_, p, k)| p.grad().view([-1]).double_value(&[*k])).collect()
    };
    // Negative control first: the same chain with the timestep weights dropped (w = 1).
    analytic(&mut m, &clip, &r, &target, &sd, &[1.0; 2]);
    let unweighted = read(&pick);
    let l0 = analytic(&mut m, &clip, &r, &target, &sd, &w32);
    let grads = read(&pick);
    eprintln!("L = {l0:.12e}, timestep_weights {w32:?}");

    let objective = |m: &mut Sd15Lora| {
        let w = forward(m, &target, &sd);
        assert_eq!(w, w32, "same seeds must give the same timesteps");
        let _g = tch::no_grad_guard();
        identity_loss(&embed(&clip, &m.pending_pixels().unwrap()), &r, &weights(&w)).double_value(&[])
    };
    let scale = grads.iter().map(|g| g.abs()).fold(0.0, f64::max);
    let bound = 2e-9 + 1e-6 * scale;
    let h = 1e-4;
    let mut control_excess = 0f64;
    for (((name, p, k), &analytic), &wrong) in pick.iter().zip(&grads).zip(&unweighted) {
        let fd = common::central_difference(p, *k, h, || objective(&mut m));
        eprintln!(
            "{name}[{k}]: analytic {analytic:.10e}, fd {fd:.10e}, |diff| {:.3e} (bound {bound:.3e}); unweighted {wrong:.4e}, |diff| {:.3e}",
            (fd - analytic).abs(),
            (fd - wrong).abs()
        );
        assert!(analytic != 0.0, "{name}[{k}]: zero gradient proves nothing");
        assert!((fd - analytic).abs() <= bound, "{name}[{k}]: analytic {analytic} vs fd {fd} (bound {bound})");
        control_excess = control_excess.max((fd - wrong).abs() / bound);
    }
    assert!(control_excess > 10.0, "dropping the timestep weights stays within the bound: the check is blind");
}
