//! Issue 6, part 3: the backbone-agnostic trainer through every ABI 1.1 call, on the real
//! `host` with the `testing-flow` fixture (a tiny flow-matching model: texts in, noise and
//! timesteps from the step context, its own loss, `sample`, `export_adapter`, `encode`,
//! two parameter groups) and the differentiable colour metric standing in for a face metric.

use std::path::{Path, PathBuf};

use likeness_sdk::st;
use likeness_tests::{
    built_or_skip, demo_bundles_or_skip, read_metrics, staged_plugins, staged_test_plugins as test_plugins, Dir,
    TestCommand,
};

/// A DRIP-layout dataset (`person_*/{ref_face.jpg, orig.jpg, prompt.txt}`) made from the demo
/// faces: each person's first photo is the reference, the second the target.
pub(crate) fn drip_dataset(dir: &Dir, bundles: &Path) -> PathBuf {
    let root = dir.mkdir("drip");
    let mut people = 0;
    for bundle in std::fs::read_dir(bundles).unwrap().flatten() {
        let mut chars: Vec<PathBuf> = std::fs::read_dir(bundle.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        chars.sort();
        for c in chars {
            let mut imgs: Vec<PathBuf> = std::fs::read_dir(&c).unwrap().flatten().map(|e| e.path()).collect();
            imgs.sort();
            if imgs.len() < 2 {
                continue;
            }
            let p = root.join(format!("person_{people:03}"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::copy(&imgs[0], p.join("ref_face.jpg")).unwrap();
            std::fs::copy(&imgs[1], p.join("orig.jpg")).unwrap();
            std::fs::write(p.join("prompt.txt"), format!("a photo of person {people}")).unwrap();
            people += 1;
        }
    }
    assert!(people >= 4, "only {people} people in {}", bundles.display());
    root
}

pub(crate) fn flow_train(dir: &Dir, data: &Path, out: &Path, steps: u64, extra: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_plugins()).arg("--plugin-dir").arg(test_plugins());
    t.args(["train", "--plugin", "testing-flow", "--data"]).arg(data).arg("--output").arg(out);
    t.args(["--steps", &steps.to_string(), "--batch-size", "2", "--no-progress", "--lr", "0.01"]);
    for s in [
        "data.layout=drip",
        "data.image_size=16",
        "train.validate_every_epochs=1",
        "train.sample_count=2",
        "train.save_every=2",
    ] {
        t.args(["--set", s]);
    }
    t.args(extra.iter().copied());
    t
}

fn tensor(path: &Path, name: &str) -> Vec<f32> {
    let (ts, _) = st::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = ts.iter().find(|t| t.name == name).unwrap_or_else(|| {
        panic!("{}: no tensor `{name}` (has {:?})", path.display(), ts.iter().map(|t| &t.name).collect::<Vec<_>>())
    });
    t.to_f32().unwrap()
}

#[test]
fn issue_6_flow_model_trains_with_texts_cache_groups_samples_eval_and_adapters() {
    let (Some(_), Some(bundles)) =
        (built_or_skip("issue_6_flow_model_trains"), demo_bundles_or_skip("issue_6_flow_model_trains"))
    else {
        return;
    };
    let dir = Dir::new("trainer-flow");
    let data = drip_dataset(&dir, &bundles);
    let out = dir.join("run");
    let cache = dir.join("cache");
    let log = flow_train(
        &dir,
        &data,
        &out,
        4,
        &[
            "--metric",
            "testing-color-metric",
            "--set",
            "metric.weight=0.5",
            "--set",
            "metric.identity_weighting=\"one_minus_t_squared\"",
            "--set",
            "train.param_groups.text_encoder.lr=0.0",
            "--set",
            "eval.every=2",
            "--set",
            &format!("cache.dir=\"{}\"", cache.display()),
            "--output-name",
            "face_lora",
        ],
    )
    .ok();
    assert!(log.contains("training finished: 4 optimizer steps"), "{log}");

    // The loss is the model's own plus the weighted identity term; no content loss by default.
    let records = read_metrics(&out);
    let run = records.iter().find(|r| r["type"] == "run").expect("run record");
    assert_eq!(run["terms"], serde_json::json!(["model", "identity"]), "{run}");
    let train: Vec<&serde_json::Value> = records.iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(train.len(), 4);
    for r in &train {
        let model = r["terms"]["model"].as_f64().unwrap_or_else(|| panic!("no model term: {r}"));
        let id =
            r["terms"]["identity.testing-color-metric"].as_f64().unwrap_or_else(|| panic!("no identity term: {r}"));
        let loss = r["loss"].as_f64().unwrap();
        // loss = 1·L_model + 0.5·L_identity, computed in f64 from the logged f64 terms.
        assert!((loss - (model + 0.5 * id)).abs() <= 1e-9 * loss.abs().max(1.0), "{r}");
        // Batch size 2; the last batch of an epoch may hold one example.
        assert!(r["no_face"].as_u64().is_some() && matches!(r["identity_samples"].as_u64(), Some(1 | 2)), "{r}");
    }

    // Encodings were cached on disk, one file per sample and encoding.
    let entries = |enc: &str| {
        walk(&cache.join("testing-flow").join(enc))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .count()
    };
    assert!(entries("latents") > 0 && entries("text_embeddings") > 0, "cache {}", cache.display());

    // Samples with musubi-tuner's names beside seed 004's control images, evaluated at steps 0, 2, 4.
    let sample = out.join("sample");
    let names: Vec<String> =
        std::fs::read_dir(&sample).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n == "control_image_0.png"), "{names:?}");
    for step in ["000000", "000002", "000004"] {
        assert!(
            names.iter().any(|n| n.starts_with(&format!("face_lora_{step}_00_")) && n.ends_with(".png")),
            "no sample of step {step}: {names:?}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/face_consistency.json")).unwrap()).unwrap();
    for k in ["total_pairs", "valid_pairs", "overall_mean", "overall_std", "overall_min", "overall_max", "by_step"] {
        assert!(report.get(k).is_some(), "missing {k}: {report}");
    }
    for step in ["0", "2", "4"] {
        assert!(report["by_step"].get(step).is_some(), "by_step lacks {step}: {report}");
        assert!(out.join(format!("eval/face_consistency_step{:06}.json", step.parse::<u64>().unwrap())).is_file());
    }
    // `host eval-faces` reads the same folder.
    let json = dir.join("faces.json");
    TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(test_plugins())
        .args(["eval-faces", "--metric", "testing-color-metric", "--sample-dir"])
        .arg(&sample)
        .arg("--output-json")
        .arg(&json)
        .ok();

    // Adapters under musubi-tuner's names, with per-save copies; the text-encoder group trained
    // at lr 0 has no delta, the unet group has one.
    let kohya = out.join("face_lora.safetensors");
    assert!(kohya.is_file() && out.join("face_lora-diffusers/pytorch_lora_weights.safetensors").is_file());
    assert!(
        out.join("face_lora-peft/adapter_config.json").is_file()
            && out.join("face_lora-step00000002.safetensors").is_file()
    );
    // (The fixture stores the 3×8 text projection's delta in `lora_down`, with `lora_up` = I.)
    let te_delta = tensor(&kohya, "lora_te_proj.lora_down.weight");
    let unet_up = tensor(&kohya, "lora_unet_proj.lora_up.weight");
    assert!(te_delta.iter().all(|&x| x == 0.0), "text_encoder trained at lr 0 moved: {te_delta:?}");
    assert!(unet_up.iter().any(|&x| x != 0.0), "unet did not move: {unet_up:?}");
    let (_, meta) = st::load(&kohya).unwrap();
    assert_eq!(meta.get("ss_steps").map(String::as_str), Some("4"), "{meta:?}");

    // A second run on the same cache computes no encoding.
    let out2 = dir.join("run2");
    let log2 = flow_train(
        &dir,
        &data,
        &out2,
        1,
        &["--set", &format!("cache.dir=\"{}\"", cache.display()), "--set", "train.sample_count=1"],
    )
    .ok();
    let cache_rec = read_metrics(&out2)
        .into_iter()
        .find(|r| r["type"] == "cache")
        .unwrap_or_else(|| panic!("no cache record\n{log2}"));
    assert_eq!(cache_rec["misses"], 0, "{cache_rec}");
    assert!(cache_rec["hits"].as_u64().unwrap() > 0, "{cache_rec}");

    // `host generate` samples the trained model and writes the settings into the PNG.
    let gen = dir.join("gen");
    let printed = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(test_plugins())
        .args(["generate", "--config"])
        .arg(out.join("config.toml"))
        .arg("--weights")
        .arg(out.join("final"))
        .args([
            "--prompt",
            "a photo of person 1",
            "--seed",
            "7",
            "--steps",
            "4",
            "--width",
            "16",
            "--height",
            "16",
            "--output",
        ])
        .arg(&gen)
        .ok();
    let png = gen.join("7_00.png");
    assert!(png.is_file(), "{printed}");
    let bytes = std::fs::read(&png).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("a photo of person 1") && text.contains("testing-flow"), "PNG text chunks missing");
}

#[test]
fn issue_6_interface_mismatch_is_reported_before_weights_load() {
    let (Some(_), Some(bundles)) =
        (built_or_skip("issue_6_interface_mismatch"), demo_bundles_or_skip("issue_6_interface_mismatch"))
    else {
        return;
    };
    let dir = Dir::new("trainer-mismatch");
    // Bundles have no captions; the flow model needs `caption`.
    let e = flow_train(&dir, &bundles, &dir.join("run"), 1, &["--set", "data.layout=\"bundles\""]).fails();
    assert!(e.contains("needs text `caption`") && e.contains("before loading any weights"), "{e}");
    // Identity weighting by noise level needs `timesteps`, which the autoencoder does not output.
    let mut t = TestCommand::host(&dir);
    t.arg("--plugin-dir").arg(staged_plugins()).arg("--plugin-dir").arg(test_plugins());
    let e = t
        .args(likeness_tests::tiny_train_args(&dir.join("run2"), 1))
        .args([
            "--metric",
            "testing-color-metric",
            "--set",
            "metric.weight=1",
            "--set",
            "metric.identity_weighting=\"t_max\"",
        ])
        .fails();
    assert!(e.contains("does not output `timesteps`"), "{e}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
