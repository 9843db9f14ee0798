//! Issue 15: `host train --plugin flux-lora --metric arcface`, the sentence of the README, end to
//! end through the real `host` binary and the real plugins — `flux-lora` on the tiny random
//! Flux.1-dev that tests/python/make_tiny_flux.py writes with diffusers (transformer, 16-channel
//! VAE, CLIP-L, T5 and both tokenizers), a DRIP-layout dataset of real photographs, and the real
//! `arcface` metric on scripts/make_face_models.py's stand-in buffalo_l pack (InsightFace's own
//! packs cannot be downloaded here).
//!
//! The random detector is run at `det_thresh = 0.01` so that it finds a "face" in the tiny
//! model's noise-like 64-px decodes: what is tested is that the identity term is computed on
//! x̂0 = x_t − σ·v̂ decoded with gradient and trains the transformer's LoRA, not likeness.

use std::path::PathBuf;
use std::sync::OnceLock;

use likeness_tests::{built_or_skip, data_or_skip, python_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

use crate::drip_sd15::drip_photos;

/// Runs a repo script with the venv's python into `CARGO_TARGET_TMPDIR/<name>` once per build
/// directory (both scripts are deterministic; make_tiny_flux.py's stamp makes a rerun instant).
pub(crate) fn generated(
    test: &str,
    cell: &'static OnceLock<PathBuf>,
    script: &str,
    name: &str,
    extra: &[&str],
) -> Option<PathBuf> {
    let python = python_or_skip(test)?;
    Some(
        cell.get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
            let o = std::process::Command::new(python)
                .arg(likeness_tests::repo_root().join(script))
                .arg("--out")
                .arg(&dir)
                .args(extra)
                .output()
                .expect("cannot start LIKENESS_PYTHON");
            assert!(o.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&o.stderr));
            dir
        })
        .clone(),
    )
}

#[test]
fn issue_15_host_train_plugin_flux_lora_metric_arcface_trains_a_tiny_diffusers_flux() {
    const T: &str = "issue_15_host_train_plugin_flux_lora_metric_arcface";
    static FLUX: OnceLock<PathBuf> = OnceLock::new();
    static FACES: OnceLock<PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = generated(T, &FLUX, "tests/python/make_tiny_flux.py", "flux-tiny", &[]) else { return };
    let Some(faces) = generated(T, &FACES, "scripts/make_face_models.py", "face-models", &["--depth", "r-tiny"]) else {
        return;
    };
    let dir = Dir::new("flux-lora-arcface");
    let ds = drip_photos(&dir, &data, 2);
    let out = dir.join("out");
    let log = train(&dir, &ds, &tiny, &faces, &out, &[]);
    check_run(&out, &log);
    // The memory savers of part 3 train too: bf16 compute, fp8 block weights, per-block
    // checkpointing (each is checked numerically in core/diffusion-torch/tests/flux*.rs).
    let saver = dir.join("out-fp8");
    let savers =
        ["model.config.precision=\"bf16\"", "model.config.fp8_base=true", "model.config.gradient_checkpointing=true"];
    let log = train(&dir, &ds, &tiny, &faces, &saver, &savers);
    let steps: Vec<_> = read_metrics(&saver).into_iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(steps.len(), 2, "{log}");
    assert!(steps.iter().all(|s| s["loss"].as_f64().is_some_and(f64::is_finite)), "{log}");
}

/// The sentence, at 64 px, with the settings that make the tiny model's run quick and its
/// identity term live (`extra`: more `--set`s).
fn train(
    dir: &Dir,
    ds: &std::path::Path,
    tiny: &std::path::Path,
    faces: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> String {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_plugins());
    t.args(["train", "--plugin", "flux-lora", "--metric", "arcface"]);
    t.arg("--data_root").arg(ds).arg("--pretrained_model").arg(tiny).arg("--save_dir").arg(out);
    t.args(["--resolution", "64", "--batch_size", "2", "--lr", "1e-3", "--epochs", "2", "--l_face", "1.0"]);
    let root = format!("metric.config.model_root={}", serde_json::Value::String(faces.display().to_string()));
    for s in [
        root.as_str(),
        "metric.config.det_thresh=0.01",
        "metric.config.det_size=64",
        "model.config.lora_rank=4",
        "model.config.lora_targets=[\"all-linear\"]",
        "model.config.max_sequence_length=16",
        "model.config.sample_steps=2",
        "train.sample_count=1",
        "data.val_fraction=0",
        "data.test_fraction=0",
    ]
    .iter()
    .chain(extra)
    {
        t.args(["--set", s]);
    }
    t.arg("--no-progress").ok()
}

/// What the plain run must have done and written.
fn check_run(out: &std::path::Path, log: &str) {
    // Two optimizer steps, each with the flow-matching loss and a live identity term.
    let steps: Vec<_> = read_metrics(out).into_iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(steps.len(), 2, "{log}");
    for s in &steps {
        assert_eq!(s["no_face"], 0, "the detector found no face: the identity term did not run\n{s}");
        let id = s["terms"]["identity.arcface"].as_f64().expect("an identity.arcface term");
        let model = s["terms"]["model"].as_f64().expect("the model's own (flow-matching) loss");
        assert!(id > 0.0 && id.is_finite() && model > 0.0 && model.is_finite(), "{s}");
    }
    // The adapter: kohya with BFL names (fused qkv / linear1), trained away from lora_up = 0.
    let (tensors, meta) = likeness_sdk::st::load(&out.join("likeness.safetensors")).unwrap();
    for stem in [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_1_txt_mlp_0",
        "lora_unet_single_blocks_1_linear1",
    ] {
        assert!(tensors.iter().any(|t| t.name == format!("{stem}.lora_up.weight")), "{stem} missing");
    }
    let moved = tensors
        .iter()
        .filter(|t| t.name.ends_with("lora_up.weight"))
        .any(|t| t.to_f32().unwrap().iter().any(|v| *v != 0.0));
    assert!(moved, "no lora_up weight moved from its zero init");
    assert_eq!(meta.get("modelspec.prediction_type").map(String::as_str), Some("flow"));
    let samples = std::fs::read_dir(out.join("sample"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"));
    assert!(samples.count() >= 1, "no sample image was written\n{log}");
    let inspect = TestCommand::host(&Dir::new("flux-lora-inspect"))
        .arg("lora")
        .arg("inspect")
        .arg(out.join("likeness.safetensors"))
        .ok();
    assert!(inspect.contains("base model:  flux"), "{inspect}");
}
