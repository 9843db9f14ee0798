//! CLIP's image preprocessing, as open_clip's `preprocess` (torchvision `Resize(S, BICUBIC)` of
//! the short side, `CenterCrop(S)`, `ToTensor`, `Normalize(CLIP mean, std)`) does it. Two paths:
//!
//! - [`pil_exact`]: on decoded 8-bit RGB, Pillow's own resampling (`ImagingResample`,
//!   `Resample.c`): separable bicubic (a = −0.5) with antialias support `2·max(1, in/out)`,
//!   coefficients normalised and rounded to 22-bit fixed point, horizontal pass first with each
//!   pass rounded and clamped to u8, as Pillow does for mode "RGB". For evaluation; not
//!   differentiable. Bit-identical to Pillow by construction (integer arithmetic; the only
//!   floating point is the coefficient computation, done in f64 in the same order).
//! - [`resize_crop_normalize`]: on `[B, 3, H, W]` tch tensors in [0, 1], libtorch's
//!   `_upsample_bicubic2d_aa` (what `torchvision.transforms.v2.functional.resize(antialias=True)`
//!   and `F.interpolate(mode="bicubic", antialias=True)` call), no u8 rounding. Differentiable;
//!   the `clip` plugin uses it for every `embed` (Train and Eval alike, so that a generated
//!   image and its reference see the same function).
use tch::{Kind, Tensor};

/// OpenAI CLIP's normalisation (open_clip `OPENAI_DATASET_MEAN` / `_STD`), as the Python floats
/// (f64) that torchvision turns into f32 tensors: decimal → f64 → f32, the same double rounding
/// here (`as f32`), so the f32 constants are bit-identical to the reference's.
pub const MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn f32x3(v: [f64; 3]) -> [f32; 3] {
    v.map(|x| x as f32)
}

/// torchvision's `_compute_resized_output_size` for an int size: the short side becomes `s`,
/// the long one `int(s · long / short)`. Returns (new_h, new_w).
pub fn resized_hw(h: usize, w: usize, s: usize) -> (usize, usize) {
    if w <= h {
        (((s * h) as f64 / w as f64) as usize, s)
    } else {
        (s, ((s * w) as f64 / h as f64) as usize)
    }
}

/// torchvision's `center_crop` offset: `int(round((size - crop) / 2.0))`, Python's round (ties
/// to even).
pub fn crop_offset(size: usize, crop: usize) -> usize {
    ((size as f64 - crop as f64) / 2.0).round_ties_even() as usize
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    // Pillow's bicubic_filter, a = -0.5.
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full box [0, in_size]:
/// per output index, (first input index, fixed-point weights).
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    // (float)(in1 - in0) in C; exact for sizes < 2^24.
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..n).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1i64 << PRECISION_BITS) as f64;
            let fixed =
                k.iter().map(|&v| if v < 0.0 { (-0.5 + v * one) as i64 } else { (0.5 + v * one) as i64 }).collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Which separable pass Pillow runs first (each pass rounds to u8, so the order shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassOrder {
    HorizontalFirst,
    VerticalFirst,
}

impl PassOrder {
    /// Pillow 9–12's choice (`Image.resize`): vertical first only for a very tall image that
    /// shrinks in height (h > 100·w). Pillow 13.0.0 (the venv's) chooses by another rule, not
    /// in any source available here: on biden.jpg (970×2204 → 224×508) it runs the vertical
    /// pass first (see the crate docs for the measured effect).
    pub fn pillow(h: usize, w: usize, out_h: usize) -> Self {
        if h > w * 100 && out_h < h {
            PassOrder::VerticalFirst
        } else {
            PassOrder::HorizontalFirst
        }
    }
}

/// One Pillow resampling pass along x (`horizontal`) or y of interleaved RGB u8.
fn pass(src: &[u8], h: usize, w: usize, out: usize, horizontal: bool) -> Vec<u8> {
    let init = 1i64 << (PRECISION_BITS - 1);
    if horizontal {
        let kx = coeffs(w, out);
        let mut dst = vec![0u8; h * out * 3];
        for y in 0..h {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            for (xx, (xmin, k)) in kx.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = init;
                    for (x, &kv) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i64 * kv;
                    }
                    dst[(y * out + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        dst
    } else {
        let ky = coeffs(h, out);
        let mut dst = vec![0u8; out * w * 3];
        for (yy, (ymin, k)) in ky.iter().enumerate() {
            for i in 0..w * 3 {
                let mut ss = init;
                for (y, &kv) in k.iter().enumerate() {
                    ss += src[(y + ymin) * w * 3 + i] as i64 * kv;
                }
                dst[yy * w * 3 + i] = clip8(ss);
            }
        }
        dst
    }
}

/// Pillow's `Image.resize((out_w, out_h), Image.BICUBIC)` of interleaved RGB u8 (`h`×`w`),
/// with the pass order of [`PassOrder::pillow`].
pub fn pil_resize_bicubic(rgb: &[u8], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<u8> {
    pil_resize_bicubic_ordered(rgb, h, w, out_h, out_w, PassOrder::pillow(h, w, out_h))
}

/// [`pil_resize_bicubic`] with an explicit pass order (a pass whose size does not change is
/// skipped, as Pillow skips it).
pub fn pil_resize_bicubic_ordered(
    rgb: &[u8],
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    order: PassOrder,
) -> Vec<u8> {
    assert_eq!(rgb.len(), h * w * 3, "RGB u8 buffer of {h}x{w}");
    let mut img = rgb.to_vec();
    let (mut ch, mut cw) = (h, w);
    let axes = match order {
        PassOrder::HorizontalFirst => [true, false],
        PassOrder::VerticalFirst => [false, true],
    };
    for horizontal in axes {
        if horizontal && out_w != cw {
            img = pass(&img, ch, cw, out_w, true);
            cw = out_w;
        } else if !horizontal && out_h != ch {
            img = pass(&img, ch, cw, out_h, false);
            ch = out_h;
        }
    }
    img
}

/// open_clip's eval `preprocess` of a PIL RGB image, on its decoded pixels: interleaved RGB u8
/// `h`×`w` → `[3, s, s]` CHW f32, normalised (row-major).
pub fn pil_exact(rgb: &[u8], h: usize, w: usize, s: usize) -> Vec<f32> {
    let (nh, _) = resized_hw(h, w, s);
    pil_exact_ordered(rgb, h, w, s, PassOrder::pillow(h, w, nh))
}

/// [`pil_exact`] with an explicit resize pass order.
pub fn pil_exact_ordered(rgb: &[u8], h: usize, w: usize, s: usize, order: PassOrder) -> Vec<f32> {
    let (nh, nw) = resized_hw(h, w, s);
    let r = pil_resize_bicubic_ordered(rgb, h, w, nh, nw, order);
    let (top, left) = (crop_offset(nh, s), crop_offset(nw, s));
    let (mean, std) = (f32x3(MEAN), f32x3(STD));
    let mut out = vec![0f32; 3 * s * s];
    for c in 0..3 {
        for y in 0..s {
            for x in 0..s {
                // ToTensor: u8 → f32 / 255; Normalize: (x − mean) / std, both in f32.
                let v = r[((y + top) * nw + x + left) * 3 + c] as f32 / 255.0;
                out[(c * s + y) * s + x] = (v - mean[c]) / std[c];
            }
        }
    }
    out
}

/// The differentiable path: `[B, 3, H, W]` in [0, 1] (any float kind/device) → `[B, 3, s, s]`
/// normalised, as torchvision v2 `resize(s, BICUBIC, antialias=True)` → `center_crop(s)` →
/// `normalize(MEAN, STD)` on the same tensor.
pub fn resize_crop_normalize(pixels: &Tensor, s: usize) -> Tensor {
    let size = pixels.size();
    let (h, w) = (size[2] as usize, size[3] as usize);
    let (nh, nw) = resized_hw(h, w, s);
    // torchvision returns the image unchanged when the size already matches.
    let r = if (nh, nw) == (h, w) {
        pixels.shallow_clone()
    } else {
        pixels.internal_upsample_bicubic2d_aa([nh as i64, nw as i64], false, None, None)
    };
    let (top, left) = (crop_offset(nh, s), crop_offset(nw, s));
    let r = r.narrow(2, top as i64, s as i64).narrow(3, left as i64, s as i64);
    let opts = (pixels.kind(), pixels.device());
    let mean = Tensor::from_slice(&MEAN).to_kind(opts.0).to_device(opts.1).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&STD).to_kind(opts.0).to_device(opts.1).view([1, 3, 1, 1]);
    (r - mean) / std
}

/// Interleaved RGB u8 → `[1, 3, h, w]` f32 in [0, 1] (ToTensor without the normalisation).
pub fn rgb_u8_to_tensor(rgb: &[u8], h: usize, w: usize) -> Tensor {
    Tensor::from_slice(rgb).view([h as i64, w as i64, 3]).permute([2, 0, 1]).unsqueeze(0).to_kind(Kind::Float) / 255.0
}
