//! dlib's `shape_predictor` (dlib/image_processing/shape_predictor.h): an ensemble of
//! regression trees (Kazemi & Sullivan) read from dlib's own `.dat` file and evaluated with
//! dlib's arithmetic: float shapes, the similarity transform reference → current shape
//! (Umeyama, double, cast to float), feature pixels mapped to the image through the
//! rectangle's unnormalising affine (double) and rounded with `floor(x + 0.5)`, pixel
//! intensity `(r + g + b) / 3` in integers, 0 outside the image, and the final landmarks
//! rounded to integer pixels as dlib's `point` does.

use crate::dat::{self, Reader};

#[derive(Debug, Clone)]
pub struct Split {
    pub idx1: usize,
    pub idx2: usize,
    pub thresh: f32,
}

#[derive(Debug, Clone)]
pub struct Tree {
    pub splits: Vec<Split>,
    pub leaves: Vec<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct ShapePredictor {
    pub initial_shape: Vec<f32>,
    pub forests: Vec<Vec<Tree>>,
    pub anchor_idx: Vec<Vec<usize>>,
    pub deltas: Vec<Vec<[f32; 2]>>,
}

/// dlib's `rectangle` (inclusive integer corners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub left: i64,
    pub top: i64,
    pub right: i64,
    pub bottom: i64,
}

/// An 8-bit RGB image, row-major HWC.
pub struct RgbImage<'a> {
    pub width: usize,
    pub height: usize,
    pub data: &'a [u8],
}

fn col_f32(r: &mut Reader) -> dat::Result<Vec<f32>> {
    let (nr, nc, v) = r.matrix(|r| r.f32())?;
    if nc != 1 && !(nr == 0 || nc == 0) {
        return r.err(format!("expected a column vector, got {nr}x{nc}"));
    }
    Ok(v)
}

impl ShapePredictor {
    pub fn from_bytes(buf: &[u8]) -> dat::Result<Self> {
        let mut r = Reader::new(buf);
        let version = r.i32()?;
        if version != 1 {
            return r.err(format!("unexpected shape_predictor version {version}"));
        }
        let initial_shape = col_f32(&mut r)?;
        let forests = r.vec(|r| {
            r.vec(|r| {
                let splits =
                    r.vec(|r| Ok(Split { idx1: r.u64()? as usize, idx2: r.u64()? as usize, thresh: r.f32()? }))?;
                let leaves = r.vec(col_f32)?;
                Ok(Tree { splits, leaves })
            })
        })?;
        let anchor_idx = r.vec(|r| r.vec(|r| Ok(r.u64()? as usize)))?;
        let deltas = r.vec(|r| r.vec(|r| Ok([r.f32()?, r.f32()?])))?;
        let sp = ShapePredictor { initial_shape, forests, anchor_idx, deltas };
        sp.validate().map_err(|m| dat::DatError { offset: r.pos, msg: m })?;
        Ok(sp)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let b = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_bytes(&b).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn validate(&self) -> Result<(), String> {
        let n = self.initial_shape.len();
        if n == 0 || !n.is_multiple_of(2) {
            return Err(format!("bad initial shape length {n}"));
        }
        if self.forests.len() != self.anchor_idx.len() || self.forests.len() != self.deltas.len() {
            return Err("cascade counts differ".into());
        }
        for (c, f) in self.forests.iter().enumerate() {
            let nf = self.deltas[c].len();
            if self.anchor_idx[c].len() != nf || self.anchor_idx[c].iter().any(|&a| a >= n / 2) {
                return Err(format!("cascade {c}: bad anchors"));
            }
            for t in f {
                if t.leaves.len() != t.splits.len() + 1 || t.leaves.iter().any(|l| l.len() != n) {
                    return Err(format!("cascade {c}: bad tree"));
                }
                if t.splits.iter().any(|s| s.idx1 >= nf || s.idx2 >= nf) {
                    return Err(format!("cascade {c}: split index out of range"));
                }
            }
        }
        Ok(())
    }

    pub fn num_parts(&self) -> usize {
        self.initial_shape.len() / 2
    }

    /// The landmarks dlib's `shape_predictor::operator()(img, rect)` returns (integer pixels).
    pub fn predict(&self, img: &RgbImage, rect: Rect) -> Vec<[i64; 2]> {
        let to_img = unnormalizing(rect);
        let mut cur = self.initial_shape.clone();
        let mut feats = Vec::new();
        for (c, forest) in self.forests.iter().enumerate() {
            let m = similarity_m(&self.initial_shape, &cur);
            let m = [m[0] as f32, m[1] as f32, m[2] as f32, m[3] as f32];
            feats.clear();
            for (a, d) in self.anchor_idx[c].iter().zip(&self.deltas[c]) {
                let px = m[0] * d[0] + m[1] * d[1] + cur[2 * a];
                let py = m[2] * d[0] + m[3] * d[1] + cur[2 * a + 1];
                let (x, y) = to_img.apply(px as f64, py as f64);
                let (x, y) = (round(x), round(y));
                let v = if x >= 0 && y >= 0 && (x as usize) < img.width && (y as usize) < img.height {
                    let o = 3 * (y as usize * img.width + x as usize);
                    let s = img.data[o] as u32 + img.data[o + 1] as u32 + img.data[o + 2] as u32;
                    (s / 3) as f32
                } else {
                    0.0
                };
                feats.push(v);
            }
            for t in forest {
                let mut i = 0;
                while i < t.splits.len() {
                    let s = &t.splits[i];
                    i = if feats[s.idx1] - feats[s.idx2] > s.thresh { 2 * i + 1 } else { 2 * i + 2 };
                }
                for (c, l) in cur.iter_mut().zip(&t.leaves[i - t.splits.len()]) {
                    *c += *l;
                }
            }
        }
        (0..self.num_parts())
            .map(|i| {
                let (x, y) = to_img.apply(cur[2 * i] as f64, cur[2 * i + 1] as f64);
                [round(x), round(y)]
            })
            .collect()
    }
}

/// dlib's conversion of a floating point vector to an integer `point`.
fn round(v: f64) -> i64 {
    (v + 0.5).floor() as i64
}

struct Affine {
    m: [f64; 4],
    b: [f64; 2],
}

impl Affine {
    fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        (self.m[0] * x + self.m[1] * y + self.b[0], self.m[2] * x + self.m[3] * y + self.b[1])
    }
}

/// Maps (0,0) → tl, (1,0) → tr, (1,1) → br.
fn unnormalizing(r: Rect) -> Affine {
    Affine { m: [(r.right - r.left) as f64, 0.0, 0.0, (r.bottom - r.top) as f64], b: [r.left as f64, r.top as f64] }
}

/// The 2×2 part `c·R` of dlib's `find_similarity_transform(from, to)` (Umeyama), in the
/// closed form for 2-D points: `[[a, −b], [b, a]]`, `a = (C00 + C11)/σ²`, `b = (C10 − C01)/σ²`
/// (equal to Umeyama's `c·U·S·Vᵀ` including the reflection case).
pub fn similarity_m(from: &[f32], to: &[f32]) -> [f64; 4] {
    let n = from.len() / 2;
    if n == 1 {
        return [1.0, 0.0, 0.0, 1.0];
    }
    let (mut mf, mut mt) = ([0f64; 2], [0f64; 2]);
    for i in 0..n {
        for k in 0..2 {
            mf[k] += from[2 * i + k] as f64;
            mt[k] += to[2 * i + k] as f64;
        }
    }
    for k in 0..2 {
        mf[k] /= n as f64;
        mt[k] /= n as f64;
    }
    let mut sigma = 0.0;
    let mut cov = [0f64; 4];
    for i in 0..n {
        let f = [from[2 * i] as f64 - mf[0], from[2 * i + 1] as f64 - mf[1]];
        let t = [to[2 * i] as f64 - mt[0], to[2 * i + 1] as f64 - mt[1]];
        sigma += f[0] * f[0] + f[1] * f[1];
        cov[0] += t[0] * f[0];
        cov[1] += t[0] * f[1];
        cov[2] += t[1] * f[0];
        cov[3] += t[1] * f[1];
    }
    if sigma == 0.0 {
        return [1.0, 0.0, 0.0, 1.0];
    }
    let a = (cov[0] + cov[3]) / sigma;
    let b = (cov[2] - cov[1]) / sigma;
    [a, -b, b, a]
}
