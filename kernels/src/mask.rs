//! The dropout mask of the fused LoRA kernels: a counter-based hash, so the mask is a pure
//! function of (seed, offset, element index) and the backward regenerates it instead of
//! storing N×K bytes. `kernels/cu/prelude.cuh`'s `dropout_keep` is the same function.
//!
//! Invariant 8 (everything random derives from run seed, step, micro-batch, sample): the caller
//! derives `seed` from those and uses `offset` to give each LoRA layer its own stream.

/// Dropout parameters: probability `p` of zeroing an element, and the counter's origin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub offset: u64,
}

impl Dropout {
    /// No dropout (`p = 0`).
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0, offset: 0 };

    /// The integer threshold the 24-bit hash is compared with: an element is kept when
    /// `hash ≥ threshold`, so P(keep) = 1 − threshold/2²⁴ = 1 − p up to 2⁻²⁴.
    pub fn threshold(&self) -> u32 {
        (self.p.clamp(0.0, 1.0) as f64 * (1u64 << 24) as f64).round() as u32
    }

    /// 1/(1 − p): the kept elements' scale (inverted dropout, as torch.nn.Dropout).
    pub fn scale(&self) -> f32 {
        if self.threshold() == 0 {
            1.0
        } else {
            (1.0 / (1.0 - self.p as f64)) as f32
        }
    }

    /// Whether element `idx` (row-major index into x) is kept.
    pub fn keep(&self, idx: u64) -> bool {
        let t = self.threshold();
        t == 0 || hash24(self.seed, self.offset.wrapping_add(idx)) >= t
    }

    /// `v·mask/(1 − p)` for element `idx`.
    pub fn apply(&self, idx: u64, v: f32) -> f32 {
        if self.threshold() == 0 {
            v
        } else if self.keep(idx) {
            v * self.scale()
        } else {
            0.0
        }
    }
}

/// SplitMix64's finaliser over `seed + counter·φ`, top 24 bits.
pub fn hash24(seed: u64, counter: u64) -> u32 {
    let mut z = seed.wrapping_add(counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_follows_p() {
        let d = Dropout { p: 0.25, seed: 7, offset: 100 };
        let kept = (0..200_000u64).filter(|&i| d.keep(i)).count() as f64 / 200_000.0;
        // Binomial: σ = √(p(1−p)/n) ≈ 1e-3; 6σ.
        assert!((kept - 0.75).abs() < 6e-3, "kept {kept}");
        assert!((0..1000).all(|i| Dropout::NONE.keep(i)));
        assert_eq!(Dropout::NONE.apply(3, 2.5), 2.5);
    }

    #[test]
    fn offsets_shift_the_stream() {
        let a = Dropout { p: 0.5, seed: 1, offset: 0 };
        let b = Dropout { p: 0.5, seed: 1, offset: 10 };
        assert!((0..100).all(|i| a.keep(i + 10) == b.keep(i)));
        let c = Dropout { p: 0.5, seed: 2, offset: 0 };
        assert!((0..100).any(|i| a.keep(i) != c.keep(i)));
    }

    #[test]
    fn hash_is_splitmix64() {
        // SplitMix64 from state 0: first output 0xE220A8397B1DCDAF (state after one step = φ).
        assert_eq!(hash24(0, 1), (0xE220_A839_7B1D_CDAFu64 >> 40) as u32);
    }
}
