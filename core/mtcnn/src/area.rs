//! `interpolate(mode='area')` (= libtorch's CPU `adaptive_avg_pool2d`) of `u8` images from
//! summed-area tables, bit-identical to libtorch's kernel and without its per-call cost.
//!
//! Why it is exact: libtorch's NCHW kernel (`cpu_adaptive_avg_pool2d`) computes each output cell
//! as an f32 sum over the cell's rows then columns, in order, and then `sum / kh / kw` (two f32
//! divisions). On whole-valued pixels 0..255 every partial sum of that loop is a whole number no
//! larger than the cell's total S; while S ≤ 2²⁴ every such partial sum is exactly representable
//! in f32, so the f32 loop yields exactly S, which the table gives in integer arithmetic. A cell
//! with S > 2²⁴ (more than 65 793 bright pixels: a box side over ~6 000 px into 24 cells) takes
//! the same sequential f32 loop as libtorch. The cell bounds are libtorch's `start_index` /
//! `end_index`.
//!
//! Why it is faster: MTCNN area-resamples every pyramid level and then one crop per candidate
//! box (hundreds to thousands of overlapping boxes after P-Net), each a libtorch call that first
//! copies the box's pixels to a contiguous tensor and then visits each of them; here each output
//! value costs four table reads.

/// libtorch's `start_index(a, b, c)` = ⌊a·c / b⌋.
fn start_index(a: usize, b: usize, c: usize) -> usize {
    (a / b) * c + ((a % b) * c) / b
}

/// libtorch's `end_index(a, b, c)` = ⌈(a + 1)·c / b⌉.
fn end_index(a: usize, b: usize, c: usize) -> usize {
    1 + ((a + 1) * c - 1) / b
}

/// Largest cell sum the integer path serves (see the module comment).
const EXACT_F32_SUM: u32 = 1 << 24;

/// Planar `[N, 3, H, W]` `u8` images and their per-plane summed-area tables `[N, 3, H+1, W+1]`.
pub struct AreaSums {
    h: usize,
    w: usize,
    pixels: Vec<u8>,
    sat: Vec<u32>,
}

impl AreaSums {
    /// `None` when a plane's total could overflow `u32` (over 16.8 M pixels): the caller then
    /// keeps libtorch's resampling.
    pub fn new(pixels: Vec<u8>, n: usize, h: usize, w: usize) -> Option<Self> {
        assert_eq!(pixels.len(), n * 3 * h * w, "planar [N, 3, H, W] u8 pixels");
        if (h as u64) * (w as u64) * 255 > u32::MAX as u64 {
            return None;
        }
        let (sh, sw) = (h + 1, w + 1);
        let mut sat = vec![0u32; n * 3 * sh * sw];
        for p in 0..n * 3 {
            let src = &pixels[p * h * w..(p + 1) * h * w];
            let dst = &mut sat[p * sh * sw..(p + 1) * sh * sw];
            for y in 0..h {
                let mut row = 0u32;
                for x in 0..w {
                    row += src[y * w + x] as u32;
                    dst[(y + 1) * sw + x + 1] = dst[y * sw + x + 1] + row;
                }
            }
        }
        Some(AreaSums { h, w, pixels, sat })
    }

    /// Image `img`'s region rows `y0..y0+rh`, columns `x0..x0+rw` area-resampled to `oh`×`ow`:
    /// appends `[3, oh, ow]` f32 values to `out`, each bit-identical to
    /// `adaptive_avg_pool2d(region as f32, [oh, ow])`.
    pub fn resample(
        &self,
        img: usize,
        (y0, x0): (usize, usize),
        (rh, rw): (usize, usize),
        (oh, ow): (usize, usize),
        out: &mut Vec<f32>,
    ) {
        assert!(rh >= 1 && rw >= 1 && y0 + rh <= self.h && x0 + rw <= self.w, "region inside the image");
        let (sh, sw) = (self.h + 1, self.w + 1);
        out.reserve(3 * oh * ow);
        for c in 0..3 {
            let p = img * 3 + c;
            let sat = &self.sat[p * sh * sw..(p + 1) * sh * sw];
            let px = &self.pixels[p * self.h * self.w..(p + 1) * self.h * self.w];
            for o in 0..oh {
                let (ih0, ih1) = (y0 + start_index(o, oh, rh), y0 + end_index(o, oh, rh));
                for q in 0..ow {
                    let (iw0, iw1) = (x0 + start_index(q, ow, rw), x0 + end_index(q, ow, rw));
                    // Non-negative: the table is monotone in both directions.
                    let s = sat[ih1 * sw + iw1] + sat[ih0 * sw + iw0] - sat[ih0 * sw + iw1] - sat[ih1 * sw + iw0];
                    let sum = if s <= EXACT_F32_SUM {
                        s as f32
                    } else {
                        let mut acc = 0f32;
                        for y in ih0..ih1 {
                            for x in iw0..iw1 {
                                acc += px[y * self.w + x] as f32;
                            }
                        }
                        acc
                    };
                    out.push(sum / (ih1 - ih0) as f32 / (iw1 - iw0) as f32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// Bit-for-bit against libtorch's kernel on random photos-like data, odd sizes, up- and
    /// down-sampling, and a bright region whose cell sums exceed 2²⁴ (the fallback loop).
    #[test]
    fn matches_libtorch_adaptive_avg_pool2d_bit_for_bit() {
        tch::manual_seed(3);
        let (h, w) = (431usize, 517usize);
        let img = Tensor::randint(256, [3, h as i64, w as i64], (Kind::Uint8, tch::Device::Cpu));
        // A saturated block: 400×400 px of 255 into 1×2 cells sums to 20.4 M > 2²⁴ per cell.
        // (Not 1×1: libtorch sends a 1×1 output to `mean`, which MTCNN never asks for.)
        let _ = img.narrow(1, 0, 400).narrow(2, 0, 400).fill_(255);
        let px = Vec::<u8>::try_from(&img.flatten(0, -1)).unwrap();
        let sums = AreaSums::new(px, 1, h, w).unwrap();
        let cases = [
            ((0, 0), (h, w), (233, 364)),
            ((0, 0), (h, w), (12, 17)),
            ((5, 7), (100, 57), (24, 24)),
            ((200, 300), (131, 217), (48, 48)),
            ((3, 4), (10, 9), (24, 24)), // upsampling: cells of one pixel, repeated
            ((0, 0), (400, 400), (1, 2)),
            ((0, 0), (400, 400), (2, 1)),
            ((0, 0), (400, 400), (2, 3)),
        ];
        for ((y0, x0), (rh, rw), (oh, ow)) in cases {
            let mut ours = Vec::new();
            sums.resample(0, (y0, x0), (rh, rw), (oh, ow), &mut ours);
            let region = img.narrow(1, y0 as i64, rh as i64).narrow(2, x0 as i64, rw as i64);
            let theirs = region.unsqueeze(0).to_kind(Kind::Float).adaptive_avg_pool2d([oh as i64, ow as i64]);
            let theirs = Vec::<f32>::try_from(&theirs.flatten(0, -1)).unwrap();
            assert_eq!(ours.len(), theirs.len());
            let diff = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(diff, 0, "region {:?}+{:?} → {oh}×{ow}: {diff} values differ", (y0, x0), (rh, rw));
        }
    }

    #[test]
    fn too_large_planes_are_left_to_libtorch() {
        assert!(AreaSums::new(Vec::new(), 0, 5000, 4000).is_none());
    }
}
