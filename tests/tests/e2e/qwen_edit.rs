//! Issue 17: seed 004's face-loss command line (musubi-tuner's `qwen_image_train_network_face_loss.py`
//! with `accelerate launch …` replaced by `host train --plugin qwen-edit-lora`), every flag as the
//! seed writes it, through the real `host` and plugins: `qwen-edit-lora` on the tiny random
//! Qwen-Image-Edit-2509 that tests/python/make_tiny_qwen_edit.py writes with diffusers, a musubi
//! `dataset.toml` whose images have one or two control images each (real photographs), musubi's
//! sample-prompt file with `--ci`, and the real `arcface` metric on scripts/make_face_models.py's
//! stand-in buffalo_l pack (InsightFace's packs cannot be downloaded here; its detector runs at
//! `det_thresh = 0.01` so it finds a "face" in the tiny model's decodes). What is tested: the seed's
//! flags are accepted and honoured, the face loss is a live term computed on x̂0 decoded with
//! gradient, musubi's output names and metadata, and `host eval-faces` scores the samples.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use likeness_tests::{built_or_skip, data_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

use crate::flux_lora::generated;

/// A musubi dataset: two targets of different aspect, the first with two controls, the second
/// with one (so batches differ in their control roles), captions beside the images.
fn musubi_dataset(dir: &Dir, data: &Path) -> PathBuf {
    let photos = data.join("photos/face_recognition");
    let copy = |from: &str, to: PathBuf| {
        std::fs::copy(photos.join(from), &to).unwrap_or_else(|e| panic!("{from}: {e} (run scripts/setup.sh)"));
    };
    let (img, ctl) = (dir.mkdir("ds/img"), dir.mkdir("ds/ctl"));
    copy("obama.jpg", img.join("a.jpg"));
    copy("biden.jpg", img.join("b.jpg"));
    copy("obama2.jpg", ctl.join("a.jpg"));
    copy("obama3.jpg", ctl.join("a_1.jpg"));
    copy("biden.jpg", ctl.join("b.jpg"));
    dir.create("ds/img/a.txt", "make him smile\n");
    dir.create("ds/img/b.txt", "a portrait in the rain\n");
    dir.create(
        "ds/dataset.toml",
        "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\nbatch_size = 1\nenable_bucket = true\n\n\
         [[datasets]]\nimage_directory = \"img\"\ncontrol_directory = \"ctl\"\ncache_directory = \"cache\"\n",
    );
    dir.create(
        "ds/sample_prompts.txt",
        format!(
            "# musubi-tuner's syntax\nmake him smile --w 64 --h 64 --s 2 --d 42 --ci {}\n",
            ctl.join("a.jpg").display()
        ),
    );
    dir.join("ds")
}

#[test]
fn issue_17_seed_004_face_loss_command_trains_a_tiny_qwen_image_edit_plus() {
    const T: &str = "issue_17_seed_004_face_loss_command_trains_a_tiny_qwen_image_edit_plus";
    static QWEN: OnceLock<PathBuf> = OnceLock::new();
    static FACES: OnceLock<PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = generated(T, &QWEN, "tests/python/make_tiny_qwen_edit.py", "qwen-edit-tiny", &[]) else { return };
    let Some(faces) = generated(T, &FACES, "scripts/make_face_models.py", "face-models", &["--depth", "r-tiny"]) else {
        return;
    };
    let dir = Dir::new("qwen-edit-seed004");
    let ds = musubi_dataset(&dir, &data);
    let out = dir.join("out");
    let (p, s) = (|x: &Path| x.display().to_string(), |x: &str| x.to_string());
    // Seed 004's second command, flag for flag (16 epochs → 2, the paths ours).
    let seed: Vec<String> = vec![
        s("--dit"),
        p(&tiny),
        s("--vae"),
        p(&tiny.join("vae")),
        s("--text_encoder"),
        p(&tiny.join("text_encoder")),
        s("--dataset_config"),
        p(&ds.join("dataset.toml")),
        s("--edit_plus"),
        s("--enable_face_loss"),
        s("--use_face_as_loss"),
        s("--face_loss_weight"),
        s("0.1"),
        s("--face_model_name"),
        s("buffalo_l"),
        s("--face_eval_frequency"),
        s("100"),
        s("--sdpa"),
        s("--mixed_precision"),
        s("bf16"),
        s("--timestep_sampling"),
        s("shift"),
        s("--discrete_flow_shift"),
        s("2.2"),
        s("--optimizer_type"),
        s("adamw8bit"),
        s("--learning_rate"),
        s("5e-5"),
        s("--gradient_checkpointing"),
        s("--network_module"),
        s("networks.lora_qwen_image"),
        s("--network_dim"),
        s("16"),
        s("--max_train_epochs"),
        s("2"),
        s("--save_every_n_epochs"),
        s("1"),
        s("--output_dir"),
        p(&out),
        s("--output_name"),
        s("face_lora"),
        // Option 1's sampling flags.
        s("--sample_prompts"),
        p(&ds.join("sample_prompts.txt")),
        s("--sample_every_n_steps"),
        s("2"),
    ];
    let root = format!("metric.config.model_root={}", serde_json::Value::String(p(&faces)));
    let mut t = TestCommand::host(&dir);
    t.arg("--plugin-dir").arg(staged_plugins()).args(["train", "--plugin", "qwen-edit-lora"]).args(&seed);
    for kv in [root.as_str(), "metric.config.det_thresh=0.01", "metric.config.det_size=64"] {
        t.args(["--set", kv]);
    }
    let log = t.arg("--no-progress").ok();

    // Four steps (two examples, batch 1, two epochs), each with the flow-matching loss and a live
    // face term on x̂0.
    let steps: Vec<_> = read_metrics(&out).into_iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(steps.len(), 4, "{log}");
    for r in &steps {
        assert_eq!(r["no_face"], 0, "the detector found no face: the face loss did not run\n{r}");
        let face = r["terms"]["identity.arcface"].as_f64().expect("an identity.arcface term");
        let model = r["terms"]["model"].as_f64().expect("the model's own loss");
        assert!(face > 0.0 && face.is_finite() && model > 0.0 && model.is_finite(), "{r}");
    }
    // musubi-tuner's names: epoch 1's file, none for the last epoch, the final file; metadata
    // as musubi writes it for --edit_plus, musubi's 840-module layout (here 2 blocks × 14).
    assert!(out.join("face_lora-000001.safetensors").is_file(), "{log}");
    assert!(!out.join("face_lora-000002.safetensors").exists(), "the last epoch gets no numbered file");
    let (tensors, meta) = likeness_sdk::st::load(&out.join("face_lora.safetensors")).unwrap();
    assert_eq!(meta.get("modelspec.architecture").map(String::as_str), Some("Qwen-Image-Edit-Plus/lora"));
    assert_eq!(meta.get("ss_base_model_version").map(String::as_str), Some("qwen_image_edit"));
    assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("16"));
    let alphas: Vec<_> = tensors.iter().filter(|t| t.name.ends_with(".alpha")).collect();
    assert_eq!(alphas.len(), 2 * 14, "one .alpha per module of musubi's set");
    for stem in ["lora_unet_transformer_blocks_0_img_mod_1", "lora_unet_transformer_blocks_1_txt_mlp_net_2"] {
        assert!(tensors.iter().any(|t| t.name == format!("{stem}.lora_up.weight")), "{stem} missing");
    }
    assert!(
        tensors.iter().filter(|t| t.name.ends_with("lora_up.weight")).any(|t| t
            .to_f32()
            .unwrap()
            .iter()
            .any(|v| *v != 0.0)),
        "no lora_up weight moved from its zero init"
    );
    // Samples under musubi's names, scored by `host eval-faces --sample-dir` (seed 004's JSON).
    let sample = out.join("sample");
    let names: Vec<String> =
        std::fs::read_dir(&sample).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n.starts_with("face_lora_000002_00_")), "{names:?}");
    assert!(names.iter().any(|n| n == "control_image_0.png"), "{names:?}");
    let json = dir.join("face_metrics.json");
    let mut e = TestCommand::host(&dir);
    e.arg("--plugin-dir")
        .arg(staged_plugins())
        .args(["eval-faces", "--metric", "arcface", "--sample-dir"])
        .arg(&sample);
    let metric_config = serde_json::json!({"model_root": p(&faces), "det_thresh": 0.01, "det_size": 64}).to_string();
    e.arg("--output-json").arg(&json).args(["--metric-config", &metric_config, "--image-size", "64"]);
    let text = e.arg("--no-progress").ok();
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["valid_pairs"].as_u64().is_some_and(|n| n >= 1), "{report}\n{text}");
    assert!(report["by_step"]["2"]["count"].as_u64().is_some_and(|n| n >= 1), "{report}");
}

/// A musubi network module of another backbone is refused by name, with the one to use.
#[test]
fn issue_17_network_module_must_match_the_plugin() {
    const T: &str = "issue_17_network_module_must_match_the_plugin";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("qwen-edit-network-module");
    let mut t = TestCommand::host(&dir);
    t.arg("--plugin-dir").arg(staged_plugins());
    t.args(["train", "--plugin", "qwen-edit-lora", "--network_module", "networks.lora_flux", "--dit", "x"]);
    let err = t.fails();
    assert!(err.contains("networks.lora_flux") && err.contains("networks.lora_qwen_image"), "{err}");
}
