//! Parity of the `pixel` loss plugin (L1 / MSE / SSIM, value and dL/d(prediction)) with an
//! independent torch-autograd reference (`tests/python/pixel_loss_oracle.py`).
//!
//! The oracle draws a seeded f32 prediction/target pair, computes the loss and its gradient in
//! float64 with F.conv2d and autograd, and writes everything as JSON. The plugin's `compute`
//! runs on the same f32 inputs (f64 inside, gradient returned as f32).
//!
//! Tolerances (the brief's): value relative error ≤ 1e-5; gradient max absolute error ≤ 1e-5.
//! Because the gradients of mean losses are small (≈ 1/numel), the gradient is also held to
//! max abs error ≤ 1e-5 × max |reference grad| (the f32 rounding of the returned gradient is
//! ≈ 6e-8 relative, so this still has ample room).
//!
//! Machine independence: the plugin is scalar Rust in f64 (the same bits on every CPU); the
//! oracle's f64 convolutions and sums may use other orders on other CPUs, which moves them by
//! ~1e-16 relative. What the bounds budget for is the f32 rounding of the inputs (shared by
//! both sides) and of the returned gradient (6e-8 relative).
//!
//! Calls `compute` directly (the plugin crate is linked as an rlib); loading the staged
//! cdylib through the ABI is covered by the plugin-loading tests.

use likeness_plugin_loss_pixel::{compute, Weights};
use likeness_sdk::CpuTensor;
use likeness_tests::{python_or_skip, run_python, Dir};

struct Parity {
    value_rel: f64,
    grad_abs: f64,
    grad_rel_to_max: f64,
}

fn floats(v: &serde_json::Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("oracle output has no `{key}` list"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn parity(case: &str, seed: u64, shape: [i64; 4], weights: Weights) -> Parity {
    let dir = Dir::new(&format!("pixel-loss-{case}"));
    let out = dir.join("oracle.json");
    let shape_arg = shape.map(|d| d.to_string()).join(",");
    let weights_arg = format!("{},{},{}", weights.l1, weights.mse, weights.ssim);
    run_python(
        "pixel_loss_oracle.py",
        &[
            "--seed",
            &seed.to_string(),
            "--shape",
            &shape_arg,
            "--weights",
            &weights_arg,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let oracle: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let got_shape: Vec<i64> = oracle["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(got_shape, shape.to_vec());

    let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let prediction = CpuTensor::new(shape.to_vec(), to_f32(floats(&oracle, "prediction")));
    let target = CpuTensor::new(shape.to_vec(), to_f32(floats(&oracle, "target")));
    let ref_value = oracle["value"].as_f64().unwrap();
    let ref_grad = floats(&oracle, "grad");

    let (value, terms, grad) = compute(weights, &prediction, &target, true).unwrap_or_else(|e| panic!("{case}: {e}"));
    let grad = grad.expect("want_grad = true returns a gradient");
    assert_eq!(grad.shape, shape.to_vec(), "{case}: gradient shape");

    // Every logged term matches the oracle's unweighted component.
    let ref_terms = oracle["terms"].as_object().unwrap();
    assert_eq!(terms.len(), ref_terms.len(), "{case}: terms {terms:?} vs {ref_terms:?}");
    for (name, v) in &terms {
        let r = ref_terms[name.as_str()].as_f64().unwrap();
        assert!((v - r).abs() <= 1e-5 * r.abs().max(1e-12), "{case}: term `{name}` = {v}, reference {r}");
    }

    let value_rel = (value - ref_value).abs() / ref_value.abs().max(1e-12);
    let grad_abs = grad.data.iter().zip(&ref_grad).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    let gmax = ref_grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let grad_rel_to_max = grad_abs / gmax.max(1e-30);
    eprintln!(
        "pixel loss parity [{case}] shape {shape:?} weights {weights:?}: value {value:.12} vs {ref_value:.12} \
         (rel err {value_rel:.3e}); grad max abs err {grad_abs:.3e} (max |grad| {gmax:.3e}, ratio {grad_rel_to_max:.3e})"
    );
    assert!(value_rel <= 1e-5, "{case}: value {value} vs reference {ref_value} (rel err {value_rel:e})");
    assert!(grad_abs <= 1e-5, "{case}: gradient max abs err {grad_abs:e}");
    assert!(grad_rel_to_max <= 1e-5, "{case}: gradient max abs err {grad_abs:e} vs max |grad| {gmax:e}");
    Parity { value_rel, grad_abs, grad_rel_to_max }
}

#[test]
fn pixel_loss_l1_matches_torch() {
    let Some(_) = python_or_skip("pixel_loss_l1_matches_torch") else { return };
    parity("l1", 11, [2, 3, 9, 7], Weights { l1: 1.0, mse: 0.0, ssim: 0.0 });
}

#[test]
fn pixel_loss_mse_matches_torch() {
    let Some(_) = python_or_skip("pixel_loss_mse_matches_torch") else { return };
    parity("mse", 12, [2, 3, 9, 7], Weights { l1: 0.0, mse: 1.0, ssim: 0.0 });
}

#[test]
fn pixel_loss_ssim_matches_torch() {
    let Some(_) = python_or_skip("pixel_loss_ssim_matches_torch") else { return };
    parity("ssim", 13, [2, 3, 24, 31], Weights { l1: 0.0, mse: 0.0, ssim: 1.0 });
    // The smallest legal image: one SSIM position per channel.
    parity("ssim-11x11", 14, [1, 2, 11, 11], Weights { l1: 0.0, mse: 0.0, ssim: 1.0 });
}

#[test]
fn pixel_loss_mix_matches_torch() {
    let Some(_) = python_or_skip("pixel_loss_mix_matches_torch") else { return };
    let p = parity("mix", 15, [2, 3, 32, 27], Weights { l1: 0.5, mse: 2.0, ssim: 0.8 });
    assert!(p.value_rel.is_finite() && p.grad_abs.is_finite() && p.grad_rel_to_max.is_finite());
}
