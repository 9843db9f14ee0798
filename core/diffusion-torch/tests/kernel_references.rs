//! Issue 18: the CPU references of the fused LoRA kernels (`likeness_kernels::lora`) against
//! libtorch's autograd of the unfused layer `y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`, with the same
//! dropout mask, in f64 (the oracle) — forward y and the backward's dx, dA, dB.
//!
//! Tolerance: the reference accumulates in f32 (as the kernels do) over at most K = 96 terms of
//! O(1) values; a sum of K products in f32 has relative error ≤ K·u with u = 2⁻²⁴ ≈ 6e-8, so
//! ≤ 6e-6 relative to the sum of |terms|; we bound the error by 1e-5 · (1 + Σ|terms|), with
//! Σ|terms| computed in f64 from the same operands. bf16 storage rounds each stored output once
//! more (u = 2⁻⁸): checked separately with 2⁻⁸ relative on y.

use likeness_kernels::lora::{self, LoraShape};
use likeness_kernels::mask::Dropout;
use tch::{Kind, Tensor};

fn data(seed: u64, n: usize) -> Vec<f32> {
    likeness_sdk::testing::uniform_f32(seed, n, -1.0, 1.0)
}

fn t64(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).to_kind(Kind::Double).view(shape)
}

fn vec64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().contiguous().view([-1])).unwrap()
}

fn close(what: &str, got: &[f32], want: &[f64], scale: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let tol = 1e-5 * (1.0 + s);
        assert!((g as f64 - w).abs() <= tol, "{what}[{i}]: reference {g}, libtorch {w} (tolerance {tol:.2e})");
    }
}

#[test]
fn issue18_fused_lora_reference_matches_libtorch_autograd_with_dropout() {
    let (n, k, m, r) = (37usize, 96usize, 80usize, 8usize);
    let scale = 16.0f32 / r as f32 * 0.5;
    let drop = Dropout { p: 0.25, seed: 0x5eed, offset: 1234 };
    let sh = LoraShape { n, k, m, r, scale, drop, rows_per_split: 16 };
    let (x, w, a, b, dy) = (data(1, n * k), data(2, m * k), data(3, r * k), data(4, m * r), data(5, n * m));
    // The mask as a tensor, from the same function the kernels use.
    let mask: Vec<f32> = (0..n * k).map(|i| drop.apply(i as u64, 1.0)).collect();
    let (xt, wt, at, bt) = (
        t64(&x, &[n as i64, k as i64]).set_requires_grad(true),
        t64(&w, &[m as i64, k as i64]),
        t64(&a, &[r as i64, k as i64]).set_requires_grad(true),
        t64(&b, &[m as i64, r as i64]).set_requires_grad(true),
    );
    let y0 = xt.matmul(&wt.tr());
    let y = &y0 + (&xt * t64(&mask, &[n as i64, k as i64])).matmul(&at.tr()).matmul(&bt.tr()) * scale as f64;
    let dyt = t64(&dy, &[n as i64, m as i64]);
    (&y * &dyt).sum(Kind::Double).backward();

    // The reference, given the base GEMMs (y0 = x·Wᵀ, dx_base = dy·W) as libtorch computes them.
    let y0_f32: Vec<f32> = vec64(&y0).iter().map(|&v| v as f32).collect();
    let dx_base: Vec<f32> = vec64(&dyt.matmul(&wt)).iter().map(|&v| v as f32).collect();
    let (y_ref, h) = lora::forward(&sh, &x, &y0_f32, &a, &b);
    let g = lora::backward(&sh, &x, &dy, &dx_base, &a, &b, &h);

    // Σ|terms| of each output, for the f32 accumulation bound (|x|,|w| ≤ 1, |mask| ≤ 4/3).
    let y_scale = vec![(k as f64) * 4.0 / 3.0 * (1.0 + scale as f64 * r as f64); n * m];
    close("y", &y_ref, &vec64(&y), &y_scale);
    close("dx", &g.dx, &vec64(&xt.grad()), &vec![m as f64 * (1.0 + scale as f64 * r as f64 * r as f64); n * k]);
    close("dA", &g.da, &vec64(&at.grad()), &vec![(n * m) as f64 * scale as f64 * 4.0 / 3.0; r * k]);
    close("dB", &g.db, &vec64(&bt.grad()), &vec![(n * k) as f64 * scale as f64 * 4.0 / 3.0; m * r]);
    // The check can fail: without the mask the reference's y differs from the oracle.
    let (y_nodrop, _) = lora::forward(&LoraShape { drop: Dropout::NONE, ..sh }, &x, &y0_f32, &a, &b);
    let max = y_nodrop.iter().zip(vec64(&y)).map(|(&p, q)| (p as f64 - q).abs()).fold(0.0, f64::max);
    assert!(max > 1e-2, "dropout must change y (max difference {max})");
}

#[test]
fn issue18_bf16_storage_rounds_once_per_stored_value() {
    use likeness_kernels::half::bf16;
    let (n, k, m, r) = (9usize, 64usize, 24usize, 4usize);
    let sh = LoraShape { n, k, m, r, scale: 1.0, drop: Dropout::NONE, rows_per_split: 4 };
    let q = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let (x, a, b) = (q(data(11, n * k)), q(data(12, r * k)), q(data(13, m * r)));
    let y0 = q(vec![0.0; n * m]);
    let (y, h) = lora::forward(&sh, &x, &y0, &a, &b);
    let f = |v: &[bf16]| v.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    let (xt, at, bt) =
        (t64(&f(&x), &[n as i64, k as i64]), t64(&f(&a), &[r as i64, k as i64]), t64(&f(&b), &[m as i64, r as i64]));
    let want = vec64(&xt.matmul(&at.tr()).matmul(&bt.tr()));
    assert_eq!(h.len(), n * r);
    for (i, (g, w)) in y.iter().zip(&want).enumerate() {
        // One bf16 rounding of the stored y (relative 2⁻⁸) plus the f32 sums (≤ 1e-5 · Σ|terms| = k·r).
        let tol = w.abs() * 2f64.powi(-8) + 1e-5 * (k * r) as f64;
        assert!((g.to_f32() as f64 - w).abs() <= tol, "y[{i}]: {g} vs {w}");
    }
}
