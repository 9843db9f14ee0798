//! Issue 18, part 4: the CPU references of embed.cu and adamw.cu against PyTorch itself (the
//! project venv's python, `tests/python/torch_oracle.py`): F.normalize, the cosine matrix,
//! torch.topk and the identity loss's autograd gradient in f64; `torch.optim.AdamW` over several
//! steps in f32.
//!
//! Why python and not tch: a test of this crate cannot link libtorch with an rpath unless
//! libtorch is a normal dependency (build scripts see only normal dependencies' `links`
//! metadata), and `torch.optim.AdamW` is Python's own code (libtorch's C++ AdamW updates
//! `exp_avg` by mul+add, not `lerp_`). Needs LIKENESS_PYTHON: skipped by a plain `cargo test`
//! without it, a failure under CI.
//!
//! Tolerances (u = 2⁻²⁴; every bound is order-free, so it holds on any CPU):
//! - normalise: a d-term f32 sum of squares errs by ≤ d·u relative, the square root halves it,
//!   the division and the product add 2u: |Δâ| ≤ (d/2 + 3)·u (|â| ≤ 1).
//! - cosine matrix: the inputs' errors (≤ 2·(d/2 + 3)·u through Σ|â_k b̂_k| ≤ 1, Cauchy–Schwarz)
//!   plus the d-term dot product (≤ d·u·Σ|terms| ≤ d·u): |Δs| ≤ (2d + 6)·u.
//! - top-k: the indices are torch's wherever the neighbouring values differ by more than twice
//!   the bound above (≥ ¾ of the positions here); at a near-tie either order is right, and the
//!   two picks' values must agree within that; the values within the bound.
//! - identity loss: three d-term sums (each ≤ d·u relative) and five roundings give |Δcos| ≤
//!   (2d + 8)·u, and the loss, a mean of them, the same; the gradient components are
//!   (b̂ − cos·â)/(N‖a‖) with |b̂_k|, |â_k| ≤ 1: |Δg| ≤ 2·(2d + 8)·u/(N‖a‖) + its own 4 roundings.
//! - AdamW, T steps in f32 on both sides: the operations are the same, but libtorch's vectorised
//!   CPU kernels may fuse one (lerp, addcmul and addcdiv use fmadd), which changes a result by
//!   ≤ 1 ulp. The p·(1 − lr·wd) and the update each carry ≤ 4u of |p| per step, and the update's
//!   size is ≤ lr·(1−β1)/√(1−β2) ≈ 3.2·lr (Adam's bound), its relative error ≤ (2T + 4)·u from
//!   m's and v's accumulated ulps: |Δp| ≤ T·(4u·max|p| + (2T+4)·u·3.2·lr);
//!   |Δm| ≤ 2T·u·max|g|, |Δv| ≤ 3T·u·max g².

use std::path::Path;
use std::process::Command;

use likeness_kernels::adamw::{adamw_ref, AdamwHyper, AdamwScalars};
use likeness_kernels::embed::{self, NORMALIZE_EPS};
use likeness_kernels::half::bf16;
use likeness_sdk::testing::{python_or_skip, uniform_f32};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn write_f32(dir: &Path, name: &str, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.f32")), bytes).unwrap();
}

fn read<const W: usize, T>(dir: &Path, name: &str, conv: fn([u8; W]) -> T) -> Vec<T> {
    let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    bytes.chunks_exact(W).map(|c| conv(c.try_into().unwrap())).collect()
}

fn f64s(dir: &Path, name: &str) -> Vec<f64> {
    read(dir, name, f64::from_le_bytes)
}

fn oracle(python: &Path, what: &str, dir: &Path, spec: String) {
    std::fs::write(dir.join("spec.json"), spec).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/torch_oracle.py");
    let out = Command::new(python).arg(&script).arg(what).arg(dir).output().expect("run the python oracle");
    assert!(out.status.success(), "torch_oracle.py {what}: {}", String::from_utf8_lossy(&out.stderr));
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        assert!(e <= tol(i), "{what}[{i}]: reference {g}, torch {w} (|Δ| {e:.3e} > {:.3e})", tol(i));
        if e / tol(i) > worst.0 {
            worst = (e / tol(i), i);
        }
    }
    eprintln!("{what}: worst |Δ| is {:.2} of its bound (at {})", worst.0, worst.1);
}

/// The embedding references on storage `T`: every output against torch in f64.
fn embed_case<T: likeness_kernels::Element>(python: &Path, label: &str) {
    let (n, m, d, k) = (24usize, 40usize, 512usize, 5usize);
    let a: Vec<T> = uniform_f32(21, n * d, -1.0, 1.0).into_iter().map(T::from_f32).collect();
    // b's first n rows are a's plus noise (paired rows of one identity), the rest unrelated.
    let noise = uniform_f32(22, m * d, -1.0, 1.0);
    let b: Vec<T> =
        (0..m * d).map(|i| T::from_f32(if i < n * d { a[i].to_f32() + 0.5 * noise[i] } else { noise[i] })).collect();
    let dir = tempfile::tempdir().unwrap();
    let as_f32 = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    write_f32(dir.path(), "a", &as_f32(&a));
    write_f32(dir.path(), "b", &as_f32(&b));
    oracle(python, "embed", dir.path(), format!(r#"{{"n":{n},"m":{m},"d":{d},"k":{k}}}"#));

    let (an, na) = embed::l2_normalize_ref(&a, n, d, NORMALIZE_EPS);
    let (bn, _) = embed::l2_normalize_ref(&b, m, d, NORMALIZE_EPS);
    let norm_tol = (d as f64 / 2.0 + 3.0) * U;
    assert_close(&format!("{label} â"), &an, &f64s(dir.path(), "an.f64"), |_| norm_tol);
    assert_close(&format!("{label} b̂"), &bn, &f64s(dir.path(), "bn.f64"), |_| norm_tol);
    let s = embed::cosine_matrix_ref(&an, &bn, n, m, d);
    let s_tol = (2.0 * d as f64 + 6.0) * U;
    let s_torch = f64s(dir.path(), "s.f64");
    assert_close(&format!("{label} S"), &s, &s_torch, |_| s_tol);

    let (tv, ti) = embed::topk_rows_ref(&s, n, m, k);
    let torch_i: Vec<i64> = read(dir.path(), "topi.i64", i64::from_le_bytes);
    let torch_v = f64s(dir.path(), "topv.f64");
    let mut exact = 0;
    for row in 0..n {
        let st = &s_torch[row * m..(row + 1) * m];
        let mut sorted: Vec<f64> = st.to_vec();
        sorted.sort_by(|x, y| y.partial_cmp(x).unwrap());
        for t in 0..k {
            let (ours, theirs) = (ti[row * k + t] as usize, torch_i[row * k + t] as usize);
            let gap_above = if t == 0 { f64::MAX } else { sorted[t - 1] - sorted[t] };
            if gap_above.min(sorted[t] - sorted[t + 1]) > 2.0 * s_tol {
                assert_eq!(ours, theirs, "{label} row {row}: top-{t} index");
                exact += 1;
            } else {
                // A near-tie within rounding: either order is right, the value must still be.
                assert!((st[ours] - st[theirs]).abs() <= 2.0 * s_tol, "{label} row {row}: top-{t} {ours} vs {theirs}");
            }
        }
    }
    assert!(exact * 4 >= n * k * 3, "{label}: only {exact} of {} top-k positions are clear of ties", n * k);
    assert_close(&format!("{label} top-k values"), &tv, &torch_v, |_| s_tol);

    let r = embed::identity_loss_ref(&a, &b[..n * d], n, d, NORMALIZE_EPS);
    let cos_tol = (2.0 * d as f64 + 8.0) * U;
    assert_close(&format!("{label} cos"), &r.cos, &f64s(dir.path(), "cos.f64"), |_| cos_tol);
    assert_close(&format!("{label} loss"), &[r.loss], &f64s(dir.path(), "loss.f64"), |_| cos_tol);
    let g_tol = |i: usize| (2.0 * cos_tol + 4.0 * U) * 2.0 / (n as f64 * na[i / d] as f64);
    assert_close(&format!("{label} dL/da"), &r.grad_a, &f64s(dir.path(), "grad.f64"), g_tol);
}

#[test]
fn issue18_embedding_references_match_torch() {
    let Some(python) = python_or_skip("issue18_embedding_references_match_torch") else { return };
    embed_case::<f32>(&python, "f32");
    // bf16 storage: the same inputs rounded to bf16 on both sides; arithmetic stays f32.
    embed_case::<bf16>(&python, "bf16");
}

#[test]
fn issue18_adamw_reference_matches_torch_optim_adamw_over_steps() {
    let Some(python) = python_or_skip("issue18_adamw_reference_matches_torch_optim_adamw_over_steps") else { return };
    let (size, steps) = (4099usize, 6usize);
    let h = AdamwHyper { lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let p0 = uniform_f32(31, size, -1.0, 1.0);
    // Gradients of mixed scale, some tiny (eps matters) and one exactly zero.
    let mut g = uniform_f32(32, steps * size, -1.0, 1.0);
    for (i, x) in g.iter_mut().enumerate() {
        *x *= [1.0, 1e-3, 1e-7, 10.0][i % 4];
    }
    g[7] = 0.0;
    let dir = tempfile::tempdir().unwrap();
    write_f32(dir.path(), "p", &p0);
    write_f32(dir.path(), "g", &g);
    let spec = format!(
        r#"{{"size":{size},"steps":{steps},"lr":{},"beta1":{},"beta2":{},"eps":{},"weight_decay":{}}}"#,
        h.lr, h.beta1, h.beta2, h.eps, h.weight_decay
    );
    oracle(&python, "adamw", dir.path(), spec);

    let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; size], vec![0f32; size]);
    for t in 0..steps {
        adamw_ref(&AdamwScalars::new(&h, t as u64 + 1), &mut p, &g[t * size..(t + 1) * size], &mut m, &mut v, None);
    }
    let f32s = |name: &str| read(dir.path(), name, f32::from_le_bytes).into_iter().map(f64::from).collect::<Vec<_>>();
    let tn = steps as f64;
    let max_g = g.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    let p_tol = tn * (4.0 * U * 1.1 + (2.0 * tn + 4.0) * U * 3.2 * h.lr);
    assert_close("p", &p, &f32s("p.out.f32"), |_| p_tol);
    assert_close("exp_avg", &m, &f32s("m.out.f32"), |_| 2.0 * tn * U * max_g);
    assert_close("exp_avg_sq", &v, &f32s("v.out.f32"), |_| 3.0 * tn * U * max_g * max_g);
    // The comparison can fail: the step count of the bias corrections matters by ≫ the bound.
    let (mut q, mut m2, mut v2) = (p0, vec![0f32; size], vec![0f32; size]);
    for t in 0..steps {
        adamw_ref(&AdamwScalars::new(&h, 1), &mut q, &g[t * size..(t + 1) * size], &mut m2, &mut v2, None);
    }
    let off = q.iter().zip(&p).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    assert!(off > 100.0 * p_tol, "a wrong bias correction must be visible ({off:.2e})");
}
