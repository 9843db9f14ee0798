//! The whole-chain finite-difference oracle of the identity term, shared by the backbone
//! plugins' `tests/whole_chain_fd.rs` (each includes this file with `#[path]`): the identity
//! term's gradient with respect to the denoiser's LoRA weights against central finite
//! differences through x̂0 = x_t − σ·v̂ → VAE decode → metric → loss, in f64.
//!
//! The chain is the engine's (core/engine/src/train/step.rs) with every piece real: the plugin's
//! `forward_batch(Train)` (`precision = "fp64"`); the metric is the CLIP image tower of
//! `likeness-clip` (random f64 weights, its differentiable `resize_crop_normalize`, what
//! plugins/clip's `embed_tensor` does), the reference embedding that of a real photo; the loss is
//! plugins/loss-identity's cosine mode `L = (1/n)·Σᵢ (1 − cos(eᵢ, rᵢ))`. (Plugin crates cannot
//! share one test binary, so the metric and the loss formula are reproduced here from the
//! libraries they are built on.)
//!
//! Tolerance (h = 10⁻⁴, LoRA weights O(0.1)):
//! * rounding: f64 through the denoiser, VAE and CLIP, reductions over ≤ 10³ O(1) terms:
//!   δ ≲ 10³·ε₆₄ ≈ 1.1·10⁻¹³, so δ/h ≈ 1.1·10⁻⁹ in the central difference;
//! * truncation: h²/6·|∂³L/∂θ³| with ∂³L/∂θ³ ~ S/θ₀² (S the largest checked |grad|):
//!   10⁻⁸/6·100·S ≈ 1.7·10⁻⁷·S.
//!
//! Bound 2·10⁻⁹ + 10⁻⁶·S. Negative control: the pixel gradient skewed by 0.1 % (a chain term off
//! by that much) must leave the bound, so the check is not blind to small errors.

use likeness_clip::preprocess::{resize_crop_normalize, rgb_u8_to_tensor};
use likeness_clip::{l2_normalize, ClipConfig, ClipModel, TextConfig, VisionConfig};
use likeness_diffusion_torch::{Backbone, LoraModel};
use likeness_sdk::abi::{NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{CpuTensor, ForwardMode, Inputs, ModelPlugin, ScaledView, StepContext, Texts};
use tch::{Kind, Tensor};

pub const REFERENCE_PHOTO: &str = "photos/face_recognition/obama.jpg";

/// A tiny CLIP image tower (24×24 in 8×8 patches, 2 blocks of width 32, exact GELU).
pub fn tiny_clip() -> ClipModel {
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

pub fn embed(clip: &ClipModel, pixels: &Tensor) -> Tensor {
    let x = resize_crop_normalize(pixels, clip.cfg.vision.image_size);
    l2_normalize(&clip.vision.forward(&x).unwrap_or_else(|e| panic!("image tower: {e}")).image_embeds)
}

pub fn identity_loss(e: &Tensor, r: &Tensor) -> Tensor {
    let cos = (e * r).sum_dim_intlist([-1i64].as_slice(), false, Kind::Double);
    (cos.neg() + 1.0).mean(Kind::Double)
}

/// What one forward reads: named images (`target`, controls …), captions and per-sample seeds
/// (the same σ and noise at every call), and the metric with the reference embedding `[n, D]`.
pub struct Chain {
    pub images: Vec<(&'static str, CpuTensor<f32>)>,
    pub captions: Vec<&'static str>,
    pub seeds: Vec<u64>,
    pub clip: ClipModel,
    pub reference: Tensor,
}

impl Chain {
    /// The tiny CLIP and the reference photo's embedding for `n` samples.
    pub fn new(
        reference_photo: &std::path::Path,
        images: Vec<(&'static str, CpuTensor<f32>)>,
        captions: Vec<&'static str>,
        seeds: Vec<u64>,
    ) -> Chain {
        let clip = tiny_clip();
        let img =
            image::open(reference_photo).unwrap_or_else(|e| panic!("{}: {e}", reference_photo.display())).to_rgb8();
        let (w, h) = img.dimensions();
        let photo = rgb_u8_to_tensor(img.as_raw(), h as usize, w as usize).to_kind(Kind::Double);
        let reference = tch::no_grad(|| embed(&clip, &photo)).repeat([seeds.len() as i64, 1]);
        Chain { images, captions, seeds, clip, reference }
    }

    fn forward<B: Backbone>(&self, m: &mut LoraModel<B>) {
        let views: Vec<NamedView<'_>> =
            self.images.iter().map(|(n, t)| NamedView { name: RStr::from_str(n), view: t.view() }).collect();
        let strs: Vec<RStr<'_>> = self.captions.iter().map(|s| RStr::from_str(s)).collect();
        let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&strs) }];
        let ctx =
            StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&self.seeds) };
        m.forward_batch(
            Inputs::new(RSlice::from_slice(&views)),
            Texts::new(RSlice::from_slice(&texts)),
            &ctx,
            ForwardMode::Train,
        )
        .unwrap_or_else(|e| panic!("forward_batch: {e}"));
    }

    /// The loss of the current weights, no graph.
    fn objective<B: Backbone>(&self, m: &mut LoraModel<B>) -> f64 {
        self.forward(m);
        let _g = tch::no_grad_guard();
        identity_loss(&embed(&self.clip, &m.pending_pixels().unwrap()), &self.reference).double_value(&[])
    }

    /// The engine's order: model forward, metric + loss backward to dL/dpixels (f64 autograd),
    /// then the model's `backward_scaled` with that pixel gradient (times `skew`, 1 but for the
    /// negative control) and weight 0 on the model's own loss. The f64 gradient crosses the ABI
    /// (f32 only) as the exact sum hi + lo of two f32 tensors. Returns L; the LoRA gradients are
    /// left in `.grad`.
    fn analytic<B: Backbone>(&self, m: &mut LoraModel<B>, skew: f64) -> f64 {
        m.zero_grad().unwrap();
        self.forward(m);
        let px = m.pending_pixels().expect("pixels").copy().set_requires_grad(true);
        assert_eq!(px.kind(), Kind::Double);
        let l = identity_loss(&embed(&self.clip, &px), &self.reference);
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
}

/// Non-zero `lora_B` (it starts at 0, which would make every `lora_A` gradient 0).
pub fn perturb_lora<B: Backbone>(m: &LoraModel<B>) {
    let _g = tch::no_grad_guard();
    for (i, (_, mut p)) in m.lora_parameters().into_iter().enumerate() {
        let r = Tensor::from_slice(&likeness_sdk::testing::uniform(50 + i as u64, p.numel()))
            .view(p.size().as_slice())
            .to_kind(p.kind());
        let _ = p.g_add_(&((r - 0.5) * 0.2));
    }
}

/// The LoRA parameter whose name contains `pat` (the first), with element `k`.
pub fn pick<B: Backbone>(m: &LoraModel<B>, pat: &str, k: i64) -> (String, Tensor, i64) {
    let params = m.lora_parameters();
    let (n, p) = params.iter().find(|(n, _)| n.contains(pat)).unwrap_or_else(|| panic!("no {pat} parameter"));
    (n.clone(), p.shallow_clone(), k)
}

/// The check: each picked element's analytic gradient against the central difference, within
/// the module docs' bound, and the 0.1 %-skewed negative control outside it.
pub fn check<B: Backbone>(m: &mut LoraModel<B>, chain: &Chain, picks: &[(String, Tensor, i64)]) {
    let read = || -> Vec<f64> { picks.iter().map(|(_, p, k)| p.grad().view([-1]).double_value(&[*k])).collect() };
    chain.analytic(m, 1.001);
    let skewed = read();
    let l0 = chain.analytic(m, 1.0);
    let grads = read();
    eprintln!("L = {l0:.12e}");
    let scale = grads.iter().map(|g| g.abs()).fold(0.0, f64::max);
    let bound = 2e-9 + 1e-6 * scale;
    let h = 1e-4;
    let mut control_excess = 0f64;
    for (((name, p, k), &analytic), &wrong) in picks.iter().zip(&grads).zip(&skewed) {
        let bump = |d: f64| {
            let _g = tch::no_grad_guard();
            let _ = p.view([-1]).get(*k).g_add_scalar_(d);
        };
        bump(h);
        let up = chain.objective(m);
        bump(-2.0 * h);
        let down = chain.objective(m);
        bump(h);
        let fd = (up - down) / (2.0 * h);
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
