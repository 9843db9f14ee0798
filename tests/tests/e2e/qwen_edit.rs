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
use crate::resume::{kill_and_resume_with, Schedule, Weights};

/// The tiny model, shared by every test that trains it: one OnceLock, so tests running in
/// parallel never run make_tiny_qwen_edit.py into the same directory at once.
static QWEN: OnceLock<PathBuf> = OnceLock::new();

/// tests/python/make_tiny_qwen_edit.py's tiny Qwen-Image-Edit-2509 (built once per build
/// directory), or `None` after a `skipped:` line.
pub(crate) fn tiny_qwen_edit(test: &str) -> Option<PathBuf> {
    generated(test, &QWEN, "tests/python/make_tiny_qwen_edit.py", "qwen-edit-tiny", &[])
}

/// A musubi dataset folder `ds/`: demo photos copied as `img/<name>` (targets) and `ctl/<name>`
/// (controls), a caption `img/<stem>.txt` per target, and `dataset.toml` with `general` (the
/// `[general]` lines) over `img` and `ctl`.
pub(crate) fn musubi_files(
    dir: &Dir,
    data: &Path,
    images: &[(&str, &str)],
    captions: &[(&str, &str)],
    general: &str,
) -> PathBuf {
    let photos = data.join("photos/face_recognition");
    dir.mkdir("ds/img");
    dir.mkdir("ds/ctl");
    for (from, to) in images {
        std::fs::copy(photos.join(from), dir.join(format!("ds/{to}")))
            .unwrap_or_else(|e| panic!("{from}: {e} (run scripts/setup.sh)"));
    }
    for (stem, caption) in captions {
        dir.create(format!("ds/img/{stem}.txt"), format!("{caption}\n"));
    }
    dir.create(
        "ds/dataset.toml",
        format!(
            "[general]\n{general}caption_extension = \".txt\"\n\n[[datasets]]\nimage_directory = \"img\"\n\
             control_directory = \"ctl\"\ncache_directory = \"cache\"\n"
        ),
    );
    dir.join("ds")
}

/// A musubi dataset: two targets of different aspect, the first with two controls, the second
/// with one (so batches differ in their control roles), captions beside the images.
fn musubi_dataset(dir: &Dir, data: &Path) -> PathBuf {
    let ds = musubi_files(
        dir,
        data,
        &[
            ("obama.jpg", "img/a.jpg"),
            ("biden.jpg", "img/b.jpg"),
            ("obama2.jpg", "ctl/a.jpg"),
            ("obama3.jpg", "ctl/a_1.jpg"),
            ("biden.jpg", "ctl/b.jpg"),
        ],
        &[("a", "make him smile"), ("b", "a portrait in the rain")],
        "resolution = [64, 64]\nbatch_size = 1\nenable_bucket = true\n",
    );
    let ctl = ds.join("ctl");
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
    static FACES: OnceLock<PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = tiny_qwen_edit(T) else { return };
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

/// Checkpoint interval of the resume test: odd, so with two examples a batch the kill lands
/// mid-epoch (step 5 is the first half of epoch 3) and the resumed data order is checked too.
const QWEN_SAVE_EVERY: u64 = 5;

/// Issue 17: a `host train --plugin qwen-edit-lora` run (musubi-tuner's flags, the tiny
/// Qwen-Image-Edit-2509, the musubi dataset with one or two controls per image, 64 px, bf16 base
/// weights, `shift` timesteps, gradient checkpointing, AdamW) SIGKILLed after a checkpoint and
/// continued with `--resume` ends bit-identical to an uninterrupted run: `final/model.safetensors`
/// (the LoRA state) byte for byte, the exported kohya adapter's tensors byte for byte (its
/// metadata too, but for the two start-time keys), every train step's loss exactly.
///
/// Tolerance 0, because nothing differs between the runs but the process boundary: the same
/// `host` and plugin binaries on the same machine, the same shapes (the same buckets, batch 1),
/// hence the same libtorch CPU kernels, thread count and summation orders; every random draw
/// (noise, timesteps, data order) comes from the step context (run seed, step), the LoRA's random
/// init is overwritten by the checkpoint, and the checkpoint holds the AdamW moments and step;
/// the learning rate is a function of the step. The encoding cache is each run's own
/// (`<run>/cache`) and stores f32, which holds the encoders' f32/bf16 outputs exactly, so a
/// cache hit (the resumed run's entries from before the kill) feeds the same values as a miss.
#[test]
fn issue_17_qwen_edit_killed_and_resumed_run_is_bit_identical() {
    const T: &str = "issue_17_qwen_edit_killed_and_resumed_run_is_bit_identical";
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = tiny_qwen_edit(T) else { return };
    let dir = Dir::new("qwen-edit-resume");
    let ds = musubi_dataset(&dir, &data);
    let cmd = |dir: &Dir, out: &Path, steps: u64| {
        let mut t = TestCommand::host(dir);
        t.arg("--plugin-dir").arg(staged_plugins()).args(["train", "--plugin", "qwen-edit-lora"]);
        t.arg("--dit").arg(&tiny).arg("--vae").arg(tiny.join("vae"));
        t.arg("--text_encoder").arg(tiny.join("text_encoder"));
        t.arg("--dataset_config").arg(ds.join("dataset.toml"));
        t.args(["--edit_plus", "--sdpa", "--mixed_precision", "bf16", "--gradient_checkpointing"]);
        t.args(["--timestep_sampling", "shift", "--discrete_flow_shift", "2.2"]);
        // lr 1e-3 (not the seed's 5e-5) so the adapter moves visibly in a few steps.
        t.args(["--optimizer_type", "adamw", "--learning_rate", "1e-3"]);
        t.args(["--network_module", "networks.lora_qwen_image", "--network_dim", "4"]);
        t.args(["--max_train_steps", &steps.to_string(), "--save_every_n_steps", &QWEN_SAVE_EVERY.to_string()]);
        t.arg("--output_dir").arg(out).args(["--output_name", "lora"]);
        // No sample grid (sampling denoises on the CPU; it has no part in the training state).
        t.args(["--set", "train.sample_count=0", "--no-progress"]);
        t
    };
    // A step of the tiny model takes ≈ 50 ms here, so 24 steps leave SIGKILL ≈ 1 s after the
    // step-5 checkpoint; longer runs only if a run still ends first.
    let schedule = Schedule { attempts: &[24, 120, 600], save_every: QWEN_SAVE_EVERY, loss_tolerance: 0.0 };
    let r = kill_and_resume_with(&dir, &cmd, Weights::Bytes, &schedule);

    // The exported adapter: every tensor's bytes, and the metadata but for the start time.
    let (ta, ma) = likeness_sdk::st::load(&r.a.join("lora.safetensors")).unwrap();
    let (tb, mb) = likeness_sdk::st::load(&r.b.join("lora.safetensors")).unwrap();
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert!(x == y, "adapter tensor `{}` differs (or the order of the tensors)", x.name);
    }
    let timeless = |m: &std::collections::BTreeMap<String, String>| {
        let mut m = m.clone();
        for k in ["modelspec.date", "ss_training_started_at"] {
            assert!(m.remove(k).is_some(), "adapter metadata lacks `{k}`");
        }
        m
    };
    assert_eq!(timeless(&ma), timeless(&mb), "adapter metadata");
    assert!(
        ta.iter().filter(|t| t.name.ends_with("lora_up.weight")).any(|t| t.to_f32().unwrap().iter().any(|v| *v != 0.0)),
        "no lora_up weight moved from its zero init: the comparison would be vacuous"
    );
    eprintln!(
        "qwen-edit resume: {} steps, killed after checkpoint {}; adapter {} tensors bit-identical",
        r.steps,
        r.killed_at,
        ta.len()
    );
}
