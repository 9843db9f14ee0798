//! Aspect-ratio bucketing, transcribed from musubi-tuner's `BucketSelector`
//! (`src/musubi_tuner/dataset/bucket.py`, kohya-ss/musubi-tuner @ 30c658c):
//!
//! ```text
//! bucket_area = W·H;  with bucketing off the only bucket is (W, H) and no_upscale is off
//! sqrt_size = int(sqrt(bucket_area));  min_size = divisible_by(sqrt_size // 2, steps)
//! for w in range(min_size, sqrt_size + steps, steps):
//!     h = divisible_by(bucket_area // w, steps);  add (w, h) and (h, w)
//! buckets = sorted(set(...));  aspect_ratios = [w / h for each bucket]
//! select(image w×h): if no_upscale and w·h ≤ bucket_area → (divisible_by(w), divisible_by(h))
//!                    else the bucket with the smallest |aspect − w/h| (first on ties, argmin)
//! divisible_by(n, d) = n − n % d
//! ```
//!
//! `steps` is 16 for every image architecture musubi-tuner trains (32 for HiDream-O1);
//! `tests/python/bucket_oracle.py` is the same algorithm in Python, used as the oracle.

use serde::Serialize;

/// `n − n % d`, musubi-tuner's `divisible_by`.
pub fn divisible_by(n: u64, d: u64) -> u64 {
    n - n % d
}

/// musubi-tuner's `BucketSelector`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketSelector {
    /// `(width, height)` whose area every bucket keeps.
    pub resolution: (u32, u32),
    pub enable_bucket: bool,
    /// Images no larger (in area) than the resolution keep their size, rounded down to steps.
    pub no_upscale: bool,
    pub reso_steps: u32,
    /// Sorted `(width, height)` buckets.
    pub buckets: Vec<(u32, u32)>,
    #[serde(skip)]
    aspect_ratios: Vec<f64>,
}

impl BucketSelector {
    /// Builds the bucket list. Errors (as a sentence) when the resolution is too small for the
    /// step: musubi-tuner would divide by zero there.
    pub fn new(resolution: (u32, u32), enable_bucket: bool, no_upscale: bool, reso_steps: u32) -> Result<Self, String> {
        let (rw, rh) = resolution;
        if rw == 0 || rh == 0 {
            return Err(format!("resolution {rw}x{rh} must be positive"));
        }
        if reso_steps == 0 {
            return Err("the bucket resolution step must be at least 1".into());
        }
        let buckets = if !enable_bucket {
            vec![resolution]
        } else {
            let steps = reso_steps as u64;
            let area = rw as u64 * rh as u64;
            let sqrt_size = (area as f64).sqrt() as u64;
            let min_size = divisible_by(sqrt_size / 2, steps);
            if min_size == 0 {
                return Err(format!(
                    "resolution {rw}x{rh} is too small for aspect-ratio buckets in steps of {reso_steps} (the area must be at least {}²)",
                    2 * steps
                ));
            }
            let mut set = std::collections::BTreeSet::new();
            let mut w = min_size;
            while w < sqrt_size + steps {
                let h = divisible_by(area / w, steps);
                if h == 0 {
                    return Err(format!("resolution {rw}x{rh}: bucket width {w} leaves a height of 0"));
                }
                set.insert((w as u32, h as u32));
                set.insert((h as u32, w as u32));
                w += steps;
            }
            set.into_iter().collect()
        };
        let aspect_ratios = buckets.iter().map(|&(w, h)| w as f64 / h as f64).collect();
        Ok(BucketSelector {
            resolution,
            enable_bucket,
            no_upscale: enable_bucket && no_upscale,
            reso_steps,
            buckets,
            aspect_ratios,
        })
    }

    /// `resolution[0] · resolution[1]`.
    pub fn bucket_area(&self) -> u64 {
        self.resolution.0 as u64 * self.resolution.1 as u64
    }

    /// The bucket `(width, height)` of an image of `(width, height)`. With `no_upscale` a
    /// small image's own size rounded down to the step; that can be 0 for an image narrower
    /// than one step (the caller reports it).
    pub fn select(&self, (w, h): (u32, u32)) -> (u32, u32) {
        let area = w as u64 * h as u64;
        if self.no_upscale && area <= self.bucket_area() {
            let s = self.reso_steps as u64;
            return (divisible_by(w as u64, s) as u32, divisible_by(h as u64, s) as u32);
        }
        let ar = w as f64 / h as f64;
        let mut best = 0usize;
        let mut best_err = f64::INFINITY;
        for (i, a) in self.aspect_ratios.iter().enumerate() {
            let e = (a - ar).abs();
            if e < best_err {
                best_err = e;
                best = i;
            }
        }
        self.buckets[best]
    }
}

/// musubi-tuner's `BucketSelector.calculate_bucket_resolution` (`dataset/bucket.py:123-165`
/// @ 30c658c), which sizes control images under `control_resolution`:
///
/// ```text
/// A = rw·rh;  ar = w / h
/// bw = divisible_by(int(sqrt(A·ar)), s);  bh = divisible_by(int(sqrt(A / ar)), s)
/// for i in -2..=2: cw = bw + i·s;  ch = divisible_by(A // cw, s);  keep the first smallest |cw/ch − ar|
/// ```
///
/// A candidate with a side ≤ 0 is skipped (musubi-tuner divides by zero there); when none is
/// left, `(bw, bh)` as musubi-tuner returns it, which the caller refuses when a side is 0.
pub fn calculate_bucket_resolution(size: (u32, u32), resolution: (u32, u32), reso_steps: u32) -> (u32, u32) {
    let s = reso_steps.max(1) as i64;
    let area = resolution.0 as i64 * resolution.1 as i64;
    let ar = size.0 as f64 / size.1.max(1) as f64;
    let floor = |n: i64| n - n.rem_euclid(s);
    let bw = floor(((area as f64) * ar).sqrt() as i64);
    let bh = floor(((area as f64) / ar).sqrt() as i64);
    let mut best: Option<(i64, i64)> = None;
    let mut best_diff = f64::INFINITY;
    for i in -2..=2 {
        let w = bw + i * s;
        if w <= 0 {
            continue;
        }
        let h = floor(area / w);
        if h <= 0 {
            continue;
        }
        let diff = (w as f64 / h as f64 - ar).abs();
        if diff < best_diff {
            best_diff = diff;
            best = Some((w, h));
        }
    }
    let (w, h) = best.unwrap_or((bw, bh));
    (w.max(0) as u32, h.max(0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values from `tests/python/bucket_oracle.py` (musubi-tuner's algorithm run in
    /// Python): `python tests/python/bucket_oracle.py --table`.
    #[test]
    fn matches_musubi_tuner_numbers() {
        let s = BucketSelector::new((960, 544), true, false, 16).unwrap();
        assert_eq!(s.buckets.len(), 47);
        assert_eq!(s.buckets.first(), Some(&(352, 1472)));
        assert_eq!(s.buckets.last(), Some(&(1472, 352)));
        for (img, want) in [
            ((1920, 1080), (960, 544)),
            ((1080, 1920), (544, 960)),
            ((1000, 1000), (720, 720)),
            ((640, 480), (832, 624)),
            ((300, 2000), (352, 1472)),
            ((4000, 3000), (832, 624)),
            ((123, 457), (368, 1408)),
        ] {
            assert_eq!(s.select(img), want, "960x544, image {img:?}");
        }
        let s = BucketSelector::new((1024, 1024), true, false, 16).unwrap();
        assert_eq!(s.buckets.len(), 65);
        for (img, want) in [
            ((1024, 1024), (1024, 1024)),
            ((1920, 1080), (1360, 768)),
            ((512, 768), (832, 1248)),
            ((3000, 1000), (1760, 592)),
        ] {
            assert_eq!(s.select(img), want, "1024x1024, image {img:?}");
        }
        let s = BucketSelector::new((1024, 1024), true, true, 16).unwrap();
        assert_eq!(s.select((500, 333)), (496, 320));
        assert_eq!(s.select((2000, 1500)), (1184, 880));
        let s = BucketSelector::new((512, 512), true, false, 16).unwrap();
        assert_eq!(s.buckets.len(), 33);
        assert_eq!(s.select((37, 91)), (320, 816));
        let s = BucketSelector::new((64, 64), true, false, 16).unwrap();
        assert_eq!(s.buckets, vec![(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]);
        assert_eq!(s.select((100, 70)), (80, 48));
    }

    /// Expected values from `tests/python/bucket_oracle.py --table` (its last block: musubi-tuner's
    /// `calculate_bucket_resolution` copied into Python), step 16 as for Qwen-Image-Edit.
    #[test]
    fn control_resolution_buckets_match_musubi_tuner() {
        for (img, reso, want) in [
            ((1000, 700), (1024, 1024), (1216, 848)),
            ((500, 500), (1024, 1024), (1024, 1024)),
            ((400, 800), (1024, 1024), (720, 1456)),
            ((1920, 1080), (1024, 1024), (1360, 768)),
            ((123, 457), (512, 512), (272, 960)),
            ((3000, 1000), (768, 768), (1312, 448)),
            ((1000, 700), (960, 544), (864, 592)),
            ((64, 64), (64, 64), (64, 64)),
            ((4000, 100), (512, 512), (3200, 80)),
        ] {
            assert_eq!(calculate_bucket_resolution(img, reso, 16), want, "image {img:?}, control_resolution {reso:?}");
        }
        // Where musubi-tuner would divide by zero, the non-positive candidates are skipped.
        let (w, h) = calculate_bucket_resolution((10, 1000), (32, 32), 16);
        assert!(w > 0 && h > 0 && w % 16 == 0 && h % 16 == 0, "{w}x{h}");
    }

    #[test]
    fn bucketing_off_is_one_bucket_and_never_no_upscale() {
        let s = BucketSelector::new((960, 544), false, true, 16).unwrap();
        assert_eq!(s.buckets, vec![(960, 544)]);
        assert!(!s.no_upscale);
        assert_eq!(s.select((10, 4000)), (960, 544));
    }

    #[test]
    fn too_small_resolutions_are_refused() {
        assert!(BucketSelector::new((24, 24), true, false, 16).unwrap_err().contains("too small"));
        assert!(BucketSelector::new((24, 24), false, false, 16).is_ok());
        assert!(BucketSelector::new((0, 24), false, false, 16).is_err());
    }
}
