//! Issue 15's whole-chain oracle on Flux: the identity term's gradient with respect to the
//! transformer's LoRA weights matches central finite differences through
//! x̂0 = x_t − σ·v̂ → unpack → Flux VAE decode (16 channels, shift and scale) → metric → loss, in
//! f64.
//!
//! The chain is the engine's (core/engine/src/train/step.rs) with every piece real: flux-lora's
//! `forward_batch(Train)` on the tiny random Flux.1-dev (tests/python/make_tiny_flux.py,
//! `precision = "fp64"`, LoRA on every Linear kind of the blocks); the metric is the CLIP image
//! tower of `likeness-clip` (random f64 weights, its differentiable `resize_crop_normalize`, what
//! plugins/clip's `embed_tensor` does), the reference embedding that of a real photo; the loss is
//! plugins/loss-identity's cosine mode `L = (1/n)·Σᵢ (1 − cos(eᵢ, rᵢ))`. (Plugin crates cannot
//! share one test binary, so the metric and the loss formula are reproduced here from the
//! libraries they are built on, as in plugins/sd15-lora/tests/whole_chain_fd.rs.)

mod common;

use common::{tiny, MAX_SEQ};
use likeness_clip::preprocess::{resize_crop_normalize, rgb_u8_to_tensor};
use likeness_clip::{l2_normalize, ClipConfig, ClipModel, TextConfig, VisionConfig};
use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::abi::{sample_seed, NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, ScaledView, StepContext, Texts};
use tch::{Kind, Tensor};

const REFERENCE_PHOTO: &str = "photos/face_recognition/obama.jpg";
const CAPTIONS: [&str; 2] = ["a photo of sks person, smiling", "a portrait in the rain"];
/// 16×16 images → 8×8 latents (the tiny VAE's factor 2) → 4×4 packed tokens.
const SIZE: i64 = 16;

/// A tiny CLIP image tower (24×24 in 8×8 patches, 2 blocks of width 32, exact GELU).
fn tiny_clip() -> ClipModel {
    let text = TextConfig {
        layers: 1,
        heads: 2,
        width: 16,
        mlp: 32,
        context_length: 8,
        vocab_size: 64,
        eps: 1e-5,
        quick_gelu: false,
    };
    let vision = VisionConfig {
        layers: 2,
        heads: 4,
        width: 32,
        mlp: 128,
        image_size: 24,
        patch_size: 8,
        eps: 1e-5,
        quick_gelu: false,
    };
    let cfg = ClipConfig { text, vision, projection_dim: 16, logit_scale_init: (1.0f64 / 0.07).ln() };
    ClipModel::random(&cfg, 11, Kind::Double, tch::Device::Cpu).unwrap_or_else(|e| panic!("tiny CLIP: {e}"))
}

fn embed(clip: &ClipModel, pixels: &Tensor) -> Tensor {
    let x = resize_crop_normalize(pixels, clip.cfg.vision.image_size);
    l2_normalize(&clip.vision.forward(&x).unwrap_or_else(|e| panic!("image tower: {e}")).image_embeds)
}

fn identity_loss(e: &Tensor, r: &Tensor) -> Tensor {
    let cos = (e * r).sum_dim_intlist([-1i64].as_slice(), false, Kind::Double);
    (cos.neg() + 1.0).mean(Kind::Double)
}

/// forward_batch(Train) with fixed per-sample seeds (the same σ and noise at every call).
fn forward(m: &mut FluxLora, target: &CpuTensor<f32>, seeds: &[u64]) {
    let views = [NamedView { name: RStr::from_str("target"), view: target.view() }];
    let strs: Vec<RStr<'_>> = CAPTIONS.iter().map(|s| RStr::from_str(s)).collect();
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&strs) }];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(seeds) };
    m.forward_batch(
        Inputs::new(RSlice::from_slice(&views)),
        Texts::new(RSlice::from_slice(&texts)),
        &ctx,
        ForwardMode::Train,
    )
    .unwrap_or_else(|e| panic!("forward_batch: {e}"));
}

/// The engine's order: model forward, metric + loss backward to dL/dpixels (f64 autograd), then
/// the model's `backward_scaled` with that pixel gradient (times `skew`, 1 but for the negative
/// control) and weight 0 on the flow-matching loss. The f64 gradient crosses the ABI (f32 only)
/// as the exact sum hi + lo of two f32 tensors. Returns L; the LoRA gradients are left in `.grad`.
fn analytic(m: &mut FluxLora, clip: &ClipModel, r: &Tensor, target: &CpuTensor<f32>, seeds: &[u64], skew: f64) -> f64 {
    m.zero_grad().unwrap();
    forward(m, target, seeds);
    let px = m.pending_pixels().expect("pixels").copy().set_requires_grad(true);
    assert_eq!(px.kind(), Kind::Double);
    let l = identity_loss(&embed(clip, &px), r);
    l.backward();
    let g = px.grad() * skew;
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

/// Tolerance (h = 10⁻⁴, LoRA weights O(0.1)), as in sd15-lora's test:
/// * rounding: f64 through transformer (≈ 10 blocks), VAE and CLIP, reductions over ≤ 10³ O(1)
///   terms: δ ≲ 10³·ε₆₄ ≈ 1.1·10⁻¹³, so δ/h ≈ 1.1·10⁻⁹ in the central difference;
/// * truncation: h²/6·|∂³L/∂θ³| with ∂³L/∂θ³ ~ S/θ₀² (S the largest checked |grad|):
///   10⁻⁸/6·100·S ≈ 1.7·10⁻⁷·S.
///
/// Bound 2·10⁻⁹ + 10⁻⁶·S. Negative control: the pixel gradient skewed by 0.1 % (a chain term off
/// by that much) must leave the bound, so the check is not blind to small errors.
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
    {
        // Non-zero lora_B first (it starts at 0, which would make every lora_A gradient 0).
        let _g = tch::no_grad_guard();
        for (i, (_, mut p)) in m.lora_parameters().into_iter().enumerate() {
            let r = Tensor::from_slice(&likeness_sdk::testing::uniform(50 + i as u64, p.numel()))
                .view(p.size().as_slice())
                .to_kind(p.kind());
            let _ = p.g_add_(&((r - 0.5) * 0.2));
        }
    }
    let clip = tiny_clip();
    let img = image::open(&ref_path).unwrap_or_else(|e| panic!("{}: {e}", ref_path.display())).to_rgb8();
    let (w, h) = img.dimensions();
    let photo = rgb_u8_to_tensor(img.as_raw(), h as usize, w as usize).to_kind(Kind::Double);
    let r = tch::no_grad(|| embed(&clip, &photo)).repeat([2, 1]);
    let data = likeness_sdk::testing::uniform_f32(6, 2 * 3 * (SIZE * SIZE) as usize, 0.0, 1.0);
    let target = CpuTensor::new(vec![2, 3, SIZE, SIZE], data);
    let sd: Vec<u64> = (0..2).map(|i| sample_seed(9, 1, 0, i)).collect();

    let params = m.lora_parameters();
    let find = |pat: &str| params.iter().find(|(n, _)| n.contains(pat)).unwrap_or_else(|| panic!("no {pat} parameter"));
    // A fused-in-BFL attention projection of a double block, a single block's MLP input, and
    // the last module (a single block's output), down and up.
    let pick: Vec<(String, Tensor, i64)> = [
        (find("transformer_blocks.0.attn.to_q"), 0i64),
        (find("single_transformer_blocks.0.proj_mlp"), 3),
        (params.last().unwrap(), 1),
        (&params[params.len() - 2], 5),
    ]
    .into_iter()
    .map(|((n, p), k)| (n.clone(), p.shallow_clone(), k))
    .collect();
    let read = |pick: &[(String, Tensor, i64)]| -> Vec<f64> {
        pick.iter().map(|(_, p, k)| p.grad().view([-1]).double_value(&[*k])).collect()
    };
    analytic(&mut m, &clip, &r, &target, &sd, 1.001);
    let skewed = read(&pick);
    let l0 = analytic(&mut m, &clip, &r, &target, &sd, 1.0);
    let grads = read(&pick);
    eprintln!("L = {l0:.12e}");
    let objective = |m: &mut FluxLora| {
        forward(m, &target, &sd);
        let _g = tch::no_grad_guard();
        identity_loss(&embed(&clip, &m.pending_pixels().unwrap()), &r).double_value(&[])
    };
    let scale = grads.iter().map(|g| g.abs()).fold(0.0, f64::max);
    let bound = 2e-9 + 1e-6 * scale;
    let h = 1e-4;
    let mut control_excess = 0f64;
    for (((name, p, k), &analytic), &wrong) in pick.iter().zip(&grads).zip(&skewed) {
        let fd = {
            let bump = |d: f64| {
                let _g = tch::no_grad_guard();
                let _ = p.view([-1]).get(*k).g_add_scalar_(d);
            };
            bump(h);
            let up = objective(&mut m);
            bump(-2.0 * h);
            let down = objective(&mut m);
            bump(h);
            (up - down) / (2.0 * h)
        };
        eprintln!(
            "{name}[{k}]: analytic {analytic:.10e}, fd {fd:.10e}, |diff| {:.3e} (bound {bound:.3e}); skewed |diff| {:.3e}",
            (fd - analytic).abs(),
            (fd - wrong).abs()
        );
        assert!(analytic != 0.0, "{name}[{k}]: zero gradient proves nothing");
        assert!((fd - analytic).abs() <= bound, "{name}[{k}]: analytic {analytic} vs fd {fd} (bound {bound})");
        control_excess = control_excess.max((fd - wrong).abs() / bound);
    }
    assert!(control_excess > 10.0, "a 0.1 % error in the chain stays within the bound: the check is blind");
}
