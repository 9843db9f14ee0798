//! Issue 7, part 1: the text-alignment term `w_text · mean(1 − cos(image, text))`, computed by
//! a metric that embeds texts (`testing-color-metric` stands in for CLIP: its text embedding is
//! a fixed vector from a hash of the text, its image embedding the colour statistics).

use likeness_abi::{CpuTensor, Device, ForwardMode};
use likeness_engine::plugins::{Metric, Registry, SearchDir, SearchSource};
use likeness_engine::train::text::text_alignment;
use likeness_tests::{
    built_or_skip, demo_bundles_or_skip, read_metrics, staged_plugins, staged_test_plugins, Dir, TestCommand,
};

use crate::trainer::drip_dataset;

fn registry() -> Registry {
    Registry::discover(vec![
        SearchDir { path: staged_plugins(), source: SearchSource::Flag },
        SearchDir { path: staged_test_plugins(), source: SearchSource::Flag },
    ])
}

fn texts_of(metric: &mut Metric, captions: &[String]) -> Vec<f32> {
    let t = metric.embed_texts(captions).unwrap();
    CpuTensor::<f32>::from_managed(&t, "texts").unwrap().data
}

/// `w · L_text` of `pixels` (Eval embedding: no graph).
fn value_at(metric: &mut Metric, texts: &[f32], pixels: &CpuTensor<f32>, w: f64) -> f64 {
    let e = metric.embed(pixels.view(), ForwardMode::Eval).unwrap();
    let emb = CpuTensor::<f32>::from_managed(&e.embeddings, "e").unwrap();
    let valid = CpuTensor::<u8>::from_managed(&e.valid, "v").unwrap();
    w * text_alignment(&emb.data, texts, &valid.data, emb.shape[1] as usize).value
}

/// The pixel gradient of the text term as the trainer chains it — the engine's `dL/de`, then the
/// metric's `backward_scaled(dL/de, w_text)` across the plugin ABI — against central finite
/// differences of `w·L_text(pixels)`.
///
/// Tolerance: the fixture computes in f64 and exchanges f32 (embeddings, d_embedding,
/// d_pixels), so each evaluation of L ≈ O(1) carries ≈ 6e-8 of rounding: ≈ 6e-8 / 2e-2 = 3e-6
/// in the quotient with eps = 1e-2. Truncation h²·|L'''|/6: the colour statistics are means and
/// mean squares over 30 pixels and the cosine is smooth away from |e| = 0, so |L'''| = O(|L'|)
/// and the error ≈ 1e-4/6·|L'| — covered by the 2 % relative term — with a 2e-3 absolute floor
/// for gradients near 0 (as the identity chain's test). Scalar Rust: the same on every CPU.
#[test]
fn issue_7_text_term_gradient_matches_finite_differences() {
    let Some(()) = built_or_skip("issue_7_text_term_gradient_matches_finite_differences") else { return };
    let reg = registry();
    let mut metric = reg.open_metric("testing-color-metric", "{}", Device::CPU, 0).unwrap();
    assert!(metric.interface.embeds_texts);
    let (b, h, w) = (3usize, 6usize, 5usize);
    let n = b * 3 * h * w;
    let pixels =
        CpuTensor::new(vec![b as i64, 3, h as i64, w as i64], likeness_sdk::testing::uniform_f32(11, n, 0.0, 1.0));
    let captions: Vec<String> =
        ["a photo of a red car", "a portrait", "a photo of a red car"].map(String::from).to_vec();
    let texts = texts_of(&mut metric, &captions);
    assert_eq!(texts.len(), b * 6);
    assert_eq!(texts[..6], texts[12..], "the same text embeds to the same vector");
    let weight = 0.7;

    let g = metric.embed(pixels.view(), ForwardMode::Train).unwrap();
    let emb = CpuTensor::<f32>::from_managed(&g.embeddings, "e").unwrap();
    let valid = CpuTensor::<u8>::from_managed(&g.valid, "v").unwrap();
    let a = text_alignment(&emb.data, &texts, &valid.data, 6);
    assert_eq!(a.valid_rows, 3);
    let base = value_at(&mut metric, &texts, &pixels, weight);
    // Train and Eval run the same code: equal up to f32 rounding of L = O(1).
    assert!((weight * a.value - base).abs() < 1e-6, "{} vs {base}", weight * a.value);
    let d_emb = CpuTensor::new(emb.shape.clone(), a.grad.iter().map(|&v| v as f32).collect());
    let d_pix = metric.backward_scaled(d_emb.view(), weight).unwrap();
    let d_pix = CpuTensor::<f32>::from_managed(&d_pix, "d_pixels").unwrap();
    assert_eq!(d_pix.shape, pixels.shape);

    let eps = 1e-2f32;
    let (mut worst, mut largest) = (0f64, 0f64);
    for idx in (0..n).step_by(5) {
        let mut plus = pixels.clone();
        plus.data[idx] += eps;
        let mut minus = pixels.clone();
        minus.data[idx] -= eps;
        let fd = (value_at(&mut metric, &texts, &plus, weight) - value_at(&mut metric, &texts, &minus, weight))
            / (2.0 * eps as f64);
        let an = d_pix.data[idx] as f64;
        worst = worst.max((fd - an).abs());
        largest = largest.max(fd.abs());
        assert!(
            (fd - an).abs() <= 2e-3 + 0.02 * fd.abs(),
            "pixel {idx}: finite difference {fd}, chained backward {an}"
        );
    }
    // A gradient of all zeros would pass the bound above: the term must really pull.
    assert!(largest > 1e-3, "largest |dL/dx| = {largest}");
    eprintln!("text term chain: max |fd − backward| = {worst:.2e} (max |grad| {largest:.2e})");
}

fn train_cmd(dir: &Dir, data: &std::path::Path, out: &std::path::Path, steps: u64, extra: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_plugins()).arg("--plugin-dir").arg(staged_test_plugins());
    t.args(["train", "--plugin", "identity-autoencoder", "--data"]).arg(data).arg("--output").arg(out);
    t.args(["--steps", &steps.to_string(), "--batch-size", "4", "--no-progress", "--lr", "0.01"]);
    for s in [
        "data.layout=drip",
        "model.config.image_size=16",
        "data.image_size=16",
        "model.config.base_channels=8",
        "model.config.latent_dim=16",
        "loss.plugin=none",
        "text.plugin=testing-color-metric",
    ] {
        t.args(["--set", s]);
    }
    t.args(extra.iter().copied());
    t
}

/// A run whose only term is the text term (DRIP's `--l_text`) lowers 1 − cos over its steps and
/// logs `text` and `text_similarity` in every train record.
#[test]
fn issue_7_training_on_the_text_term_alone_aligns_images_with_captions() {
    const T: &str = "issue_7_training_on_the_text_term_alone_aligns_images_with_captions";
    let (Some(()), Some(bundles)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("text-term-train");
    let data = drip_dataset(&dir, &bundles);
    let out = dir.join("run");
    train_cmd(&dir, &data, &out, 40, &["--l_text", "1.0"]).ok();
    let recs = read_metrics(&out);
    assert_eq!(recs[0]["terms"], serde_json::json!(["text"]), "{}", recs[0]);
    assert_eq!(recs[0]["text_metric"], "testing-color-metric");
    let train: Vec<_> = recs.iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(train.len(), 40);
    let mut l = Vec::new();
    for r in &train {
        let t = r["text"].as_f64().unwrap_or_else(|| panic!("no `text` in {r}"));
        let s = r["text_similarity"].as_f64().unwrap_or_else(|| panic!("no `text_similarity` in {r}"));
        // The logged loss is 1 − the logged mean cosine (one micro-batch per step).
        assert!((t - (1.0 - s)).abs() < 1e-9 && (0.0..=2.0).contains(&t), "{r}");
        assert!((r["loss"].as_f64().unwrap() - t).abs() < 1e-9, "w_text = 1: loss = text, {r}");
        l.push(t);
    }
    let first = l[..5].iter().sum::<f64>() / 5.0;
    let last = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    // Batches differ step to step (different captions and faces), so compare 5-step means; a
    // training signal that does nothing leaves them equal up to that batch noise.
    assert!(last < first - 0.02, "1 − cos did not fall: first 5 steps {first:.4}, last 5 steps {last:.4} ({l:?})");
    eprintln!("text term: 1 − cos {first:.4} → {last:.4} over 40 steps");

    // With the identity term too, the same plugin as [metric] and [text] (two instances):
    // both terms train, their pixel gradients summed by the model.
    let out = dir.join("both");
    train_cmd(&dir, &data, &out, 3, &["--metric", "testing-color-metric", "--l_face", "0.5", "--l_text", "1"]).ok();
    let recs = read_metrics(&out);
    assert_eq!(recs[0]["terms"], serde_json::json!(["identity", "text"]), "{}", recs[0]);
    for r in recs.iter().filter(|r| r["type"] == "train") {
        let (i, t) = (r["terms"]["identity.testing-color-metric"].as_f64(), r["text"].as_f64());
        let (i, t) = (i.unwrap_or_else(|| panic!("{r}")), t.unwrap_or_else(|| panic!("{r}")));
        // loss = 0.5·L_identity + 1·L_text, both f64 sums of f64 values logged as such.
        assert!((r["loss"].as_f64().unwrap() - (0.5 * i + t)).abs() < 1e-9, "{r}");
    }
}

/// The plan refuses, before any weight loads, a `[text]` metric that embeds no texts and a
/// dataset without captions — both in one message.
#[test]
fn issue_7_text_term_mismatches_are_one_error_before_loading() {
    const T: &str = "issue_7_text_term_mismatches_are_one_error_before_loading";
    let (Some(()), Some(bundles)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("text-term-plan");
    let mut t = TestCommand::host(&dir);
    t.arg("--plugin-dir").arg(staged_plugins()).arg("--plugin-dir").arg(staged_test_plugins());
    t.args(["train", "--plugin", "identity-autoencoder", "--data"]).arg(&bundles).arg("--output").arg(dir.join("o"));
    t.args(["--steps", "1", "--no-progress", "--l_text", "1", "--set", "text.plugin=testing-nondiff-metric"]);
    let text = t.fails();
    assert!(
        text.contains("checked before loading any weights")
            && text.contains("testing-nondiff-metric")
            && text.contains("embeds_texts = false")
            && text.contains("text.prompt"),
        "{text}"
    );
}
