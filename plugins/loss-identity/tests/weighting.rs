//! Issue 6: the per-row `weight` input (the trainer's identity weighting by noise level).
//!
//! Checked against central finite differences of the weighted loss itself, in f64, for every
//! mode; and weights of 1 must give the unweighted result bit for bit.

use likeness_plugin_loss_identity::{compute_f64, compute_f64_weighted, Config};

fn data(seed: u64, n: usize) -> Vec<f64> {
    likeness_sdk::testing::uniform(seed, n).into_iter().map(|u| 2.0 * u - 1.0).collect()
}

#[test]
fn issue_6_weights_scale_each_rows_contribution_and_gradient() {
    let (b, d) = (4, 6);
    let e = data(1, b * d);
    // References near the embeddings so cosines spread (and the seed004 branch is exercised).
    let r: Vec<f64> = e.iter().zip(data(2, b * d)).map(|(x, z)| x + 0.6 * z).collect();
    let flags = [true, true, false, true];
    let w = [1.0, 0.25, 0.7, 0.0];
    // Triplet margin 1.5 keeps every hinge active (cos differences lie in [-2, 2] but are small here).
    for cfg in [Config::cosine(), Config::seed004(0.3), Config::triplet(1.5)] {
        let ones = compute_f64_weighted(&cfg, [b, d], &e, &r, &flags, Some(&[1.0; 4]), true);
        let plain = compute_f64(&cfg, [b, d], &e, &r, &flags, true);
        assert_eq!(ones.value, plain.value, "{cfg:?}");
        assert_eq!(ones.grad, plain.grad, "{cfg:?}");

        let out = compute_f64_weighted(&cfg, [b, d], &e, &r, &flags, Some(&w), true);
        let grad = out.grad.unwrap();
        // Central differences with h = 1e-6 on a smooth f64 function of O(1) values: truncation
        // O(h²) ≈ 1e-12 and rounding O(ε/h) ≈ 2e-10, so 1e-7 relative to the largest gradient
        // leaves three orders of margin on any CPU (f64 arithmetic is IEEE-exact per operation).
        let h = 1e-6;
        let gmax = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(gmax > 1e-3, "{cfg:?}: gradient too small to check");
        for i in 0..b * d {
            let mut ep = e.clone();
            ep[i] += h;
            let up = compute_f64_weighted(&cfg, [b, d], &ep, &r, &flags, Some(&w), false).value;
            ep[i] -= 2.0 * h;
            let down = compute_f64_weighted(&cfg, [b, d], &ep, &r, &flags, Some(&w), false).value;
            let fd = (up - down) / (2.0 * h);
            assert!((fd - grad[i]).abs() <= 1e-7 * gmax, "{cfg:?} [{i}]: fd {fd} analytic {}", grad[i]);
        }
        // Weight 0 (row 3) and an invalid row (row 2) get no gradient.
        assert!(grad[3 * d..4 * d].iter().all(|&g| g == 0.0), "{cfg:?}");
        assert!(grad[2 * d..3 * d].iter().all(|&g| g == 0.0), "{cfg:?}");
    }
}
