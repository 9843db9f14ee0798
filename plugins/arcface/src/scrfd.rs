//! SCRFD face detection as `insightface/model_zoo/scrfd.py` (insightface 0.7.3) does it:
//! input letterbox and normalisation, output decoding, NMS and the choice among faces.
//!
//! Numerics follow the reference's NumPy dtypes: network outputs, anchor centres, decoded boxes,
//! key points, the division by `det_scale`, areas and IoU are all `float32` there (NumPy 2's
//! rules keep Python-float scalars weak), so they are `f32` here, operation for operation.
//!
//! Ordering: the reference sorts candidates by score with NumPy's (unstable) `argsort` and
//! reverses; here a stable ascending sort is reversed, so equal scores come out with the later
//! candidate first. The two agree whenever the candidate scores are distinct.

use serde::{Deserialize, Serialize};

/// The reference's defaults: `SCRFD.__init__` and `FaceAnalysis.prepare(det_size=(640, 640))`.
pub const DEFAULT_DET_THRESH: f32 = 0.5;
pub const DEFAULT_NMS_THRESH: f32 = 0.4;
pub const DEFAULT_DET_SIZE: usize = 640;
/// `input_mean` / `input_std` of `SCRFD._init_vars`.
pub const INPUT_MEAN: f32 = 127.5;
pub const INPUT_STD: f32 = 128.0;

/// How the detector's outputs are laid out, from their count as `SCRFD._init_vars` reads it:
///
/// | outputs | fmc | strides            | anchors/cell | key points |
/// |---------|-----|--------------------|--------------|------------|
/// | 6       | 3   | 8, 16, 32          | 2            | no         |
/// | 9       | 3   | 8, 16, 32          | 2            | yes        |
/// | 10      | 5   | 8, 16, 32, 64, 128 | 1            | no         |
/// | 15      | 5   | 8, 16, 32, 64, 128 | 1            | yes        |
///
/// Output `i < fmc` holds the scores of level `i` (`[K·A, 1]`), output `fmc + i` the box
/// distances (`[K·A, 4]`, in units of the stride), output `2·fmc + i` the key-point offsets
/// (`[K·A, 10]`); `batched` models (3-D first output) add a leading batch axis, of which the
/// reference reads element 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub fmc: usize,
    pub strides: Vec<usize>,
    pub num_anchors: usize,
    pub use_kps: bool,
    pub batched: bool,
}

impl Layout {
    /// The layout of a graph with `n_outputs` outputs (`batched` when its first output is 3-D).
    pub fn from_output_count(n_outputs: usize, batched: bool) -> Result<Layout, String> {
        let (fmc, strides, num_anchors, use_kps) = match n_outputs {
            6 => (3, vec![8, 16, 32], 2, false),
            9 => (3, vec![8, 16, 32], 2, true),
            10 => (5, vec![8, 16, 32, 64, 128], 1, false),
            15 => (5, vec![8, 16, 32, 64, 128], 1, true),
            n => {
                return Err(format!(
                    "SCRFD detector graph has {n} outputs; insightface's SCRFD layouts have 6, 9, 10 or 15 \
                     (3 or 5 feature levels, with or without key points)"
                ))
            }
        };
        Ok(Layout { fmc, strides, num_anchors, use_kps, batched })
    }

    pub fn n_outputs(&self) -> usize {
        self.fmc * if self.use_kps { 3 } else { 2 }
    }

    /// Anchors of level `level` for an input of `input_w × input_h`: `(H/s)·(W/s)·A`.
    pub fn anchors(&self, level: usize, input_w: usize, input_h: usize) -> usize {
        let s = self.strides[level];
        (input_h / s) * (input_w / s) * self.num_anchors
    }
}

/// Anchor centres of one level as the reference builds them: `(x·stride, y·stride)` for each
/// cell in row-major order (no +0.5), each repeated `num_anchors` times.
pub fn anchor_centers(height: usize, width: usize, stride: usize, num_anchors: usize) -> Vec<[f32; 2]> {
    let mut out = Vec::with_capacity(height * width * num_anchors);
    for i in 0..height {
        for j in 0..width {
            let c = [(j * stride) as f32, (i * stride) as f32];
            for _ in 0..num_anchors {
                out.push(c);
            }
        }
    }
    out
}

/// `distance2bbox`: `[cx − l, cy − t, cx + r, cy + b]` (no clamping, as the reference calls it).
#[inline]
pub fn distance2bbox(center: [f32; 2], d: [f32; 4]) -> [f32; 4] {
    [center[0] - d[0], center[1] - d[1], center[0] + d[2], center[1] + d[3]]
}

/// `distance2kps`: each key point is the centre plus its (dx, dy) offset.
#[inline]
pub fn distance2kps(center: [f32; 2], d: &[f32; 10]) -> [[f32; 2]; 5] {
    let mut k = [[0f32; 2]; 5];
    for (i, p) in k.iter_mut().enumerate() {
        *p = [center[0] + d[2 * i], center[1] + d[2 * i + 1]];
    }
    k
}

/// One detected face in input-image pixels: box `[x1, y1, x2, y2]`, score, and the 5 key points
/// (left eye, right eye, nose, left mouth corner, right mouth corner) when the model has them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub bbox: [f32; 4],
    pub score: f32,
    pub kps: Option<[[f32; 2]; 5]>,
}

impl Detection {
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// `SCRFD.forward`'s decoding: every anchor whose score is `>= threshold`, level by level, in
/// anchor order, with boxes and key points in det-image (network input) pixels.
///
/// `outputs[i]` is output `i` of the graph, flattened row-major; for a batched layout pass the
/// whole output and `batch_index` picks the image (the reference uses 0).
pub fn decode(
    layout: &Layout,
    outputs: &[&[f32]],
    input_w: usize,
    input_h: usize,
    threshold: f32,
    batch_index: usize,
) -> Result<Vec<Detection>, String> {
    if outputs.len() != layout.n_outputs() {
        return Err(format!("SCRFD decode: {} outputs given, the layout has {}", outputs.len(), layout.n_outputs()));
    }
    let fmc = layout.fmc;
    let mut dets = Vec::new();
    for (idx, &stride) in layout.strides.iter().enumerate() {
        let (height, width) = (input_h / stride, input_w / stride);
        let n = height * width * layout.num_anchors;
        let per_image = |o: usize, c: usize| -> Result<&[f32], String> {
            let data = outputs[o];
            let len = n * c;
            let start = if layout.batched { batch_index * len } else { 0 };
            let ok = if layout.batched {
                data.len().is_multiple_of(len) && start + len <= data.len()
            } else {
                data.len() == len
            };
            if !ok {
                return Err(format!(
                    "SCRFD output {o} (stride {stride}) has {} values; an input of {input_w}x{input_h} needs {len} \
                     per image ({height}x{width} cells x {} anchors x {c})",
                    data.len(),
                    layout.num_anchors
                ));
            }
            Ok(&data[start..start + len])
        };
        let scores = per_image(idx, 1)?;
        let bbox = per_image(idx + fmc, 4)?;
        let kps = if layout.use_kps { Some(per_image(idx + 2 * fmc, 10)?) } else { None };
        let centers = anchor_centers(height, width, stride, layout.num_anchors);
        let s = stride as f32;
        for (a, &score) in scores.iter().enumerate() {
            // `!(score >= threshold)`, not `score < threshold`: a NaN score is skipped, as
            // insightface's `np.where(scores >= threshold)` skips it.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(score >= threshold) {
                continue;
            }
            let c = centers[a];
            let d = [bbox[4 * a] * s, bbox[4 * a + 1] * s, bbox[4 * a + 2] * s, bbox[4 * a + 3] * s];
            let kps = kps.map(|k| {
                let mut d = [0f32; 10];
                for (j, v) in d.iter_mut().enumerate() {
                    *v = k[10 * a + j] * s;
                }
                distance2kps(c, &d)
            });
            dets.push(Detection { bbox: distance2bbox(c, d), score, kps });
        }
    }
    Ok(dets)
}

/// Indices that sort `values` descending as `values.argsort()[::-1]` does (ties: later first).
fn argsort_desc(values: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].partial_cmp(&values[b]).unwrap_or(std::cmp::Ordering::Equal));
    idx.reverse();
    idx
}

/// `SCRFD.nms`: greedy NMS over boxes sorted by score, IoU with the `+1` pixel convention in
/// widths, heights and areas, dropping boxes whose IoU with a kept one is `> thresh`. Returns the
/// kept indices, best first.
pub fn nms(dets: &[Detection], thresh: f32) -> Vec<usize> {
    let scores: Vec<f32> = dets.iter().map(|d| d.score).collect();
    let areas: Vec<f32> = dets.iter().map(|d| (d.bbox[2] - d.bbox[0] + 1.0) * (d.bbox[3] - d.bbox[1] + 1.0)).collect();
    let mut order = argsort_desc(&scores);
    let mut keep = Vec::new();
    while let Some(&i) = order.first() {
        keep.push(i);
        let bi = dets[i].bbox;
        order = order[1..]
            .iter()
            .copied()
            .filter(|&j| {
                let bj = dets[j].bbox;
                let xx1 = bi[0].max(bj[0]);
                let yy1 = bi[1].max(bj[1]);
                let xx2 = bi[2].min(bj[2]);
                let yy2 = bi[3].min(bj[3]);
                let w = (xx2 - xx1 + 1.0).max(0.0);
                let h = (yy2 - yy1 + 1.0).max(0.0);
                let inter = w * h;
                let ovr = inter / (areas[i] + areas[j] - inter);
                ovr <= thresh
            })
            .collect();
    }
    keep
}

/// Which faces to keep when there are more than `max_num`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaceChoice {
    /// insightface's `metric='default'`: area − 2·(squared distance of the box centre from the
    /// image centre).
    #[default]
    Default,
    /// insightface's `metric='max'`: the largest boxes.
    Largest,
    /// The boxes whose centres are nearest the image centre.
    MostCentral,
}

/// The `max_num` step of `SCRFD.detect`: when `max_num > 0` and more faces remain, keep the
/// `max_num` best by `choice`, best first; otherwise keep all in NMS order. `img_w`/`img_h` are
/// the original image's size.
pub fn choose(dets: Vec<Detection>, img_w: usize, img_h: usize, max_num: usize, choice: FaceChoice) -> Vec<Detection> {
    if max_num == 0 || dets.len() <= max_num {
        return dets;
    }
    // img_center = img.shape[0] // 2, img.shape[1] // 2  →  (cy, cx) as integers.
    let (cy, cx) = ((img_h / 2) as f32, (img_w / 2) as f32);
    let values: Vec<f32> = dets
        .iter()
        .map(|d| {
            let b = d.bbox;
            let area = (b[2] - b[0]) * (b[3] - b[1]);
            let ox = (b[0] + b[2]) / 2.0 - cx;
            let oy = (b[1] + b[3]) / 2.0 - cy;
            let off2 = ox * ox + oy * oy;
            match choice {
                FaceChoice::Default => area - off2 * 2.0,
                FaceChoice::Largest => area,
                FaceChoice::MostCentral => -off2,
            }
        })
        .collect();
    let order = argsort_desc(&values);
    order.into_iter().take(max_num).map(|i| dets[i].clone()).collect()
}

/// The post-network half of `SCRFD.detect`: decode at `det_thresh`, scale back to the original
/// image by `det_scale`, sort by score, NMS at `nms_thresh`, then [`choose`].
#[allow(clippy::too_many_arguments)]
pub fn detect_from_outputs(
    layout: &Layout,
    outputs: &[&[f32]],
    input_w: usize,
    input_h: usize,
    det_scale: f64,
    det_thresh: f32,
    nms_thresh: f32,
    img_w: usize,
    img_h: usize,
    max_num: usize,
    choice: FaceChoice,
) -> Result<Vec<Detection>, String> {
    let mut dets = decode(layout, outputs, input_w, input_h, det_thresh, 0)?;
    // `np.vstack(bboxes_list) / det_scale`: float32 array / Python float → float32.
    let s = det_scale as f32;
    for d in &mut dets {
        for v in &mut d.bbox {
            *v /= s;
        }
        if let Some(k) = &mut d.kps {
            for p in k.iter_mut() {
                p[0] /= s;
                p[1] /= s;
            }
        }
    }
    let scores: Vec<f32> = dets.iter().map(|d| d.score).collect();
    let order = argsort_desc(&scores);
    let pre: Vec<Detection> = order.into_iter().map(|i| dets[i].clone()).collect();
    let keep = nms(&pre, nms_thresh);
    let kept: Vec<Detection> = keep.into_iter().map(|i| pre[i].clone()).collect();
    Ok(choose(kept, img_w, img_h, max_num, choice))
}

/// Letterbox geometry of `SCRFD.detect`: the resized size `(new_w, new_h)` that keeps the
/// image's aspect inside `input_w × input_h`, and `det_scale = new_h / img_h`.
pub fn letterbox_geometry(img_w: usize, img_h: usize, input_w: usize, input_h: usize) -> (usize, usize, f64) {
    let im_ratio = img_h as f64 / img_w as f64;
    let model_ratio = input_h as f64 / input_w as f64;
    let (new_w, new_h) = if im_ratio > model_ratio {
        (((input_h as f64) / im_ratio) as usize, input_h)
    } else {
        (input_w, ((input_w as f64) * im_ratio) as usize)
    };
    let det_scale = new_h as f64 / img_h as f64;
    (new_w, new_h, det_scale)
}

/// `cv2.resize(img, (new_w, new_h))` with `INTER_LINEAR` on an interleaved `u8` image (any
/// channel count): half-pixel centres, edge clamping, 11-bit fixed-point coefficients, and the
/// vertical pass rounded as OpenCV's SIMD `VResizeLinearVec_32s8u` rounds.
pub fn resize_linear_u8(src: &[u8], w: usize, h: usize, c: usize, new_w: usize, new_h: usize) -> Vec<u8> {
    const COEF_SCALE: f32 = 2048.0;
    assert_eq!(src.len(), w * h * c, "resize: buffer is not {w}x{h}x{c}");
    let tables = |dst: usize, srcn: usize| -> Vec<(usize, i32, i32)> {
        let scale = srcn as f64 / dst as f64;
        (0..dst)
            .map(|d| {
                let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let mut s = f.floor() as i64;
                f -= s as f32;
                if s < 0 {
                    s = 0;
                    f = 0.0;
                }
                if s >= srcn as i64 - 1 {
                    s = srcn as i64 - 1;
                    f = 0.0;
                }
                let a0 = ((1.0 - f) * COEF_SCALE).round_ties_even() as i32;
                let a1 = (f * COEF_SCALE).round_ties_even() as i32;
                (s as usize, a0, a1)
            })
            .collect()
    };
    let xt = tables(new_w, w);
    let yt = tables(new_h, h);
    // Horizontal pass for each source row on demand (rows are reused by neighbouring outputs).
    let hrow = |y: usize| -> Vec<i32> {
        let row = &src[y * w * c..(y + 1) * w * c];
        let mut out = vec![0i32; new_w * c];
        for (dx, &(sx, a0, a1)) in xt.iter().enumerate() {
            let sx1 = (sx + 1).min(w - 1);
            for k in 0..c {
                out[dx * c + k] = row[sx * c + k] as i32 * a0 + row[sx1 * c + k] as i32 * a1;
            }
        }
        out
    };
    let mut dst = vec![0u8; new_w * new_h * c];
    let mut cache: Option<(usize, Vec<i32>, Vec<i32>)> = None;
    for (dy, &(sy, b0, b1)) in yt.iter().enumerate() {
        let sy1 = (sy + 1).min(h - 1);
        let (r0, r1) = match cache.take() {
            Some((y, r0, r1)) if y == sy => (r0, r1),
            Some((y, _, r1)) if y + 1 == sy => (r1, hrow(sy1)),
            _ => (hrow(sy), hrow(sy1)),
        };
        let out = &mut dst[dy * new_w * c..(dy + 1) * new_w * c];
        for x in 0..new_w * c {
            // ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16), then (+2) >> 2.
            let v = ((((r0[x] >> 4) * b0) >> 16) + (((r1[x] >> 4) * b1) >> 16) + 2) >> 2;
            out[x] = v.clamp(0, 255) as u8;
        }
        cache = Some((sy, r0, r1));
    }
    dst
}

/// The detector input of `SCRFD.detect` + `forward` for an interleaved RGB `u8` image: resized
/// into `input_w × input_h` keeping its aspect, placed at the top-left of a black canvas, then
/// `cv2.dnn.blobFromImage(img, 1/128, size, (127.5,)*3, swapRB=True)` — which turns the
/// reference's BGR array into RGB, so an RGB image goes in as is. Returns the `[1, 3, H, W]`
/// blob (row-major) and `det_scale`.
pub fn preprocess_rgb(rgb: &[u8], img_w: usize, img_h: usize, input_w: usize, input_h: usize) -> (Vec<f32>, f64) {
    let (new_w, new_h, det_scale) = letterbox_geometry(img_w, img_h, input_w, input_h);
    let resized = resize_linear_u8(rgb, img_w, img_h, 3, new_w, new_h);
    let mut blob = vec![(0.0 - INPUT_MEAN) * (1.0 / INPUT_STD); 3 * input_w * input_h];
    let plane = input_w * input_h;
    for y in 0..new_h {
        for x in 0..new_w {
            for ch in 0..3 {
                let v = resized[(y * new_w + x) * 3 + ch] as f32;
                blob[ch * plane + y * input_w + x] = (v - INPUT_MEAN) * (1.0 / INPUT_STD);
            }
        }
    }
    (blob, det_scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        for (n, fmc, a, kps) in [(6, 3, 2, false), (9, 3, 2, true), (10, 5, 1, false), (15, 5, 1, true)] {
            let l = Layout::from_output_count(n, false).unwrap();
            assert_eq!((l.fmc, l.num_anchors, l.use_kps, l.n_outputs()), (fmc, a, kps, n));
        }
        assert!(Layout::from_output_count(7, false).unwrap_err().contains("6, 9, 10 or 15"));
    }

    #[test]
    fn centers_have_no_half_pixel() {
        let c = anchor_centers(2, 3, 8, 2);
        assert_eq!(c.len(), 12);
        assert_eq!(c[0], [0.0, 0.0]);
        assert_eq!(c[1], [0.0, 0.0]);
        assert_eq!(c[2], [8.0, 0.0]);
        assert_eq!(c[6], [0.0, 8.0]);
    }

    #[test]
    fn nms_plus_one_convention() {
        let d = |b: [f32; 4], s| Detection { bbox: b, score: s, kps: None };
        // IoU with +1: boxes [0,0,9,9] and [5,0,14,9]: inter 5*10 = 50, union 200-50 = 150 → 0.333.
        let dets = vec![d([0., 0., 9., 9.], 0.9), d([5., 0., 14., 9.], 0.8), d([2., 0., 11., 9.], 0.7)];
        // Third: inter with first 8*10 = 80 / (200-80) = 0.667 → dropped.
        assert_eq!(nms(&dets, 0.4), vec![0, 1]);
    }

    #[test]
    fn letterbox() {
        let (w, h, s) = letterbox_geometry(1280, 886, 640, 640);
        assert_eq!((w, h), (640, 443));
        // One f64 division of integers, correctly rounded on every CPU.
        assert!((s - 443.0 / 886.0).abs() < 1e-15);
        let (w, h, _) = letterbox_geometry(626, 1200, 640, 640);
        assert_eq!((w, h), (333, 640));
    }
}
