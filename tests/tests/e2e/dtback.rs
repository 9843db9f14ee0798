//! Issue 16, part 2: DTBack. Seed 000's `config.yaml` with `use_simple_model: false` trains the
//! identity-preserving Flux (flux-lora + the identity injection, conditioned on the `arcface` and
//! `mtcnn-reid` embeddings of each reference) on the tiny random Flux.1-dev and the demo bundles,
//! with its face, body and content weights; seed 001's inference command then generates from
//! the best checkpoint by the seed's own `best_model.pt` path.
//!
//! The metrics are stand-ins (scripts/make_face_models.py's random buffalo_l pack at a low
//! detection threshold, a seeded random OSNet): what is tested is the wiring — the embeddings
//! reach the model, the three terms train the injection, the outputs are where the seeds say.

use std::sync::OnceLock;

use likeness_tests::{built_or_skip, demo_bundles_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

use crate::flux_lora::generated;

fn seed000_dtback_yaml(data: &std::path::Path, flux: &std::path::Path) -> String {
    format!(
        "data_dir: \"{}\"\n\
         max_chars_per_bundle: 20\n\
         min_images_per_char: 2\n\
         use_simple_model: false\n\
         input_size: 64\n\
         num_face_latents: 4\n\
         num_body_latents: 2\n\
         batch_size: 2\n\
         num_epochs: 1\n\
         learning_rate: 0.001\n\
         weight_decay: 0.00001\n\
         face_weight: 1.0\n\
         body_weight: 0.5\n\
         content_weight: 0.5\n\
         output_dir: \"checkpoints/identity_preserving\"\n\
         pretrained_model: \"{}\"\n",
        data.display(),
        flux.display()
    )
}

#[test]
fn issue_16_seed000_use_simple_model_false_trains_dtback_and_seed001_generates() {
    const T: &str = "issue_16_seed000_use_simple_model_false_trains_dtback_and_seed001_generates";
    static FLUX: OnceLock<std::path::PathBuf> = OnceLock::new();
    static FACES: OnceLock<std::path::PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = demo_bundles_or_skip(T) else { return };
    let Some(tiny) = generated(T, &FLUX, "tests/python/make_tiny_flux.py", "flux-tiny", &[]) else { return };
    let Some(faces) = generated(T, &FACES, "scripts/make_face_models.py", "face-models", &["--depth", "r-tiny"]) else {
        return;
    };
    let dir = Dir::new("dtback");
    let cfg = dir.create("train/config.yaml", seed000_dtback_yaml(&data, &tiny));
    let root = format!("metric.config.model_root={}", serde_json::Value::String(faces.display().to_string()));
    let sets = [
        root.as_str(),
        "metric.config.det_thresh=0.01",
        "metric.config.det_size=64",
        "body.config.allow_random_weights=true",
        "model.config.max_sequence_length=16",
        "model.config.sample_steps=2",
        "model.config.identity.width=32",
        "model.config.identity.ca_heads=2",
        "model.config.identity.ca_head_dim=16",
        "train.sample_count=0",
    ];
    let mut t = TestCommand::host(&dir);
    t.arg("--plugin-dir").arg(staged_plugins()).args(["train", "--config"]).arg(&cfg);
    t.args(["--steps", "3", "--no-progress"]);
    for s in sets {
        t.args(["--set", s]);
    }
    let log = t.ok();
    let run = dir.join("train/checkpoints/identity_preserving");
    let steps: Vec<_> = read_metrics(&run).into_iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(steps.len(), 3, "{log}");
    for s in &steps {
        for term in ["model", "pixel", "identity.arcface", "body.mtcnn-reid"] {
            let v = s["terms"][term].as_f64();
            assert!(v.is_some_and(f64::is_finite), "no finite `{term}` term in {s}\n{log}");
        }
    }
    // The adapter is the injection (no LoRA trains), the best state is kept for seed 001.
    assert!(run.join("likeness-identity/identity.safetensors").is_file(), "{log}");
    assert!(run.join("best/model.safetensors").is_file(), "no best/ in {}\n{log}", run.display());
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("[model.conditioning.face_embedding]"), "{resolved}");

    // Seed 001: `python inference/generate.py --model checkpoints/identity_preserving/best_model.pt
    // --reference … --prompt "…" --output …`.
    let reference = data.join("0/char_00001/img_00001.jpg");
    let out = dir.join("generated");
    let gen = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(staged_plugins())
        .arg("generate")
        .arg("--model")
        .arg(run.join("best_model.pt"))
        .arg("--reference")
        .arg(&reference)
        .args(["--prompt", "A photo of a person in Paris", "--width", "64", "--height", "64", "--steps", "2"])
        .arg("--output")
        .arg(&out)
        .ok();
    let pngs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .collect();
    assert_eq!(pngs.len(), 1, "{gen}");
    // Without the reference the model's input cannot be computed: the error says which flag.
    let e = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(staged_plugins())
        .arg("generate")
        .arg("--model")
        .arg(run.join("best_model.pt"))
        .args(["--prompt", "x", "--width", "64", "--height", "64", "--steps", "1"])
        .arg("--output")
        .arg(dir.join("none"))
        .fails();
    assert!(e.contains("--reference"), "{e}");
}
