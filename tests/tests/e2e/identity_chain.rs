//! The identity-loss chain of DESIGN.md invariant 3, across real plugin libraries:
//! `metric.embed` → `loss.value_and_grad` → `metric.backward`, chained by the host, and
//! training with it through the real `host` binary.

use likeness_abi::{CpuTensor, Device, ForwardMode};
use likeness_engine::plugins::{Loss, Metric, MetricResult, Registry, SearchDir, SearchSource};
use likeness_tests::{
    built_or_skip, demo_bundles_or_skip, profile_dir, staged_plugins, tiny_train_args, Dir, TestCommand,
};

fn registry() -> Registry {
    Registry::discover(vec![
        SearchDir { path: staged_plugins(), source: SearchSource::Flag },
        SearchDir { path: profile_dir().join("test-plugins"), source: SearchSource::Flag },
    ])
}

/// dL/dpixels obtained by chaining the plugins' explicit backwards through the ABI matches
/// central finite differences of the same composition (f32 plugins: eps 1e-2 on pixels in
/// [0, 1]; tolerance 2e-3 absolute + 2% relative).
///
/// Why those: both fixtures compute in f64 and exchange f32 (embeddings, d_embedding,
/// d_pixels), so each evaluation of L carries ~u·|L| ≈ 6e-8 of rounding, i.e. ≈ 6e-8 / 2e-2 =
/// 3e-6 in the difference quotient, and the returned gradient is rounded to f32 (6e-8
/// relative). The step is large for the rounding's sake, so the truncation h²·|L⁽³⁾|/6 dominates:
/// the colour statistics are means and variances of 30 pixels, and the seed-004 weighting is
/// quadratic in the distance, so |L⁽³⁾| is O(|L'|) and the error ≈ 1e-4/6·|L'| — the 2 %
/// relative term — plus the 2e-3 absolute floor for gradients near 0. Scalar Rust on both
/// sides: the same on every CPU.
#[test]
fn issue_2_identity_chain_gradient_matches_finite_differences() {
    let Some(()) = built_or_skip("issue_2_identity_chain_gradient_matches_finite_differences") else { return };
    let reg = registry();
    let mut metric = reg.open_metric("testing-color-metric", "{}", Device::CPU, 0).unwrap();
    let mut loss = reg.open_loss("identity", r#"{"mode":"seed004"}"#, Device::CPU, 0).unwrap();
    let (b, h, w) = (2usize, 6usize, 5usize);
    let n = b * 3 * h * w;
    let u = likeness_sdk::testing::uniform_f32(7, 2 * n, 0.0, 1.0);
    let pixels = CpuTensor::new(vec![b as i64, 3, h as i64, w as i64], u[..n].to_vec());
    let reference = CpuTensor::new(vec![b as i64, 3, h as i64, w as i64], u[n..].to_vec());
    let r = metric.embed(reference.view(), ForwardMode::Eval).unwrap();

    let base = value_at(&mut metric, &mut loss, &r, &pixels);
    assert!(base.is_finite() && base > 0.0, "loss {base}");

    // Analytic: the host's chain.
    let g = metric.embed(pixels.view(), ForwardMode::Train).unwrap();
    let l = loss
        .value_and_grad(
            &[
                ("embedding", g.embeddings.view),
                ("reference_embedding", r.embeddings.view),
                ("valid", g.valid.view),
                ("reference_valid", r.valid.view),
            ],
            true,
        )
        .unwrap();
    // Train and Eval run the same code on the same pixels: equal (1e-6 admits only f32
    // rounding of L ≈ O(1)).
    assert!((l.value - base).abs() < 1e-6, "Train and Eval embeddings disagree: {} vs {base}", l.value);
    let d_emb = l.grads.cpu("identity", "embedding").unwrap();
    let d_pix = metric.backward(d_emb.view()).unwrap();
    let d_pix = CpuTensor::<f32>::from_managed(&d_pix, "d_pixels").unwrap();
    assert_eq!(d_pix.shape, pixels.shape);

    let eps = 1e-2f32;
    let mut worst = 0f64;
    for idx in (0..n).step_by(7) {
        let mut plus = pixels.clone();
        plus.data[idx] += eps;
        let mut minus = pixels.clone();
        minus.data[idx] -= eps;
        let fd = (value_at(&mut metric, &mut loss, &r, &plus) - value_at(&mut metric, &mut loss, &r, &minus))
            / (2.0 * eps as f64);
        let an = d_pix.data[idx] as f64;
        let err = (fd - an).abs();
        worst = worst.max(err);
        assert!(err <= 2e-3 + 0.02 * fd.abs(), "pixel {idx}: finite difference {fd}, chained backward {an}");
    }
    eprintln!("identity chain: max |fd - backward| = {worst:.2e}");
}

/// The identity loss of `p`'s embedding against the reference embedding `r`, no gradients.
fn value_at(metric: &mut Metric, loss: &mut Loss, r: &MetricResult, p: &CpuTensor<f32>) -> f64 {
    let g = metric.embed(p.view(), ForwardMode::Eval).unwrap();
    loss.value_and_grad(
        &[
            ("embedding", g.embeddings.view),
            ("reference_embedding", r.embeddings.view),
            ("valid", g.valid.view),
            ("reference_valid", r.valid.view),
        ],
        false,
    )
    .unwrap()
    .value
}

fn plugin_dirs(args: &mut Vec<String>) {
    for d in [staged_plugins(), profile_dir().join("test-plugins")] {
        args.push("--plugin-dir".into());
        args.push(d.to_string_lossy().into_owned());
    }
}

#[test]
fn issue_2_training_with_an_identity_loss_runs_the_whole_chain() {
    const T: &str = "issue_2_training_with_an_identity_loss_runs_the_whole_chain";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("identity-train");
    let out = dir.join("run");
    let mut args = tiny_train_args(&out, 6);
    plugin_dirs(&mut args);
    args.extend(
        ["--metric", "testing-color-metric", "--set", "metric.weight=0.5", "--set", "metric.loss=identity"]
            .map(String::from),
    );
    let text = TestCommand::host(&dir).args(&args).ok();
    assert!(text.contains("identity similarity: first"), "{text}");
    let recs = likeness_tests::read_metrics(&out);
    let train: Vec<_> = recs.iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(train.len(), 6);
    for r in &train {
        let t =
            r["terms"]["identity.testing-color-metric"].as_f64().unwrap_or_else(|| panic!("no identity term in {r}"));
        assert!(t.is_finite() && t >= 0.0, "{r}");
    }
    let val: Vec<_> = recs.iter().filter(|r| r["type"] == "val").collect();
    assert!(!val.is_empty());
    for r in &val {
        let s = r["identity_similarity"].as_f64().unwrap_or_else(|| panic!("no identity_similarity in {r}"));
        assert!((-1.0..=1.0).contains(&s), "{r}");
        assert!(r["identity_valid_pairs"].as_u64().unwrap() > 0);
    }
    assert!(out.join("plots/identity.png").is_file());
}

#[test]
fn issue_2_non_differentiable_metric_is_refused_as_a_loss_but_measures() {
    const T: &str = "issue_2_non_differentiable_metric_is_refused_as_a_loss_but_measures";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("nondiff");
    let mut args = tiny_train_args(&dir.join("a"), 2);
    plugin_dirs(&mut args);
    args.extend(["--metric", "testing-nondiff-metric", "--set", "metric.weight=0.1"].map(String::from));
    let text = TestCommand::host(&dir).args(&args).fails();
    assert!(
        text.contains("testing-nondiff-metric")
            && text.contains("not differentiable")
            && text.contains("metric.weight = 0"),
        "{text}"
    );

    // Weight 0: evaluation only, which needs no backward.
    let out = dir.join("b");
    let mut args = tiny_train_args(&out, 2);
    plugin_dirs(&mut args);
    args.extend(["--metric", "testing-nondiff-metric"].map(String::from));
    TestCommand::host(&dir).args(&args).ok();
    let val: Vec<_> = likeness_tests::read_metrics(&out).into_iter().filter(|r| r["type"] == "val").collect();
    assert!(val.iter().all(|r| r["identity_similarity"].is_number()), "{val:?}");
}
