//! Issue 8, parts 3–5: DRIP (seed 002) end to end on SD1.5 through the real `host` binary and
//! the real plugins — `sd15-lora` on the tiny random SD1.5 pipeline that
//! tests/python/make_tiny_sd15.py writes with diffusers, a DRIP-layout dataset of real
//! photographs ($LIKENESS_DATA/photos/face_recognition), and the real `dlib` metric.
//!
//! The metric is `dlib` with `detector = "none"` (the whole 64×64 image is the face rectangle;
//! dlib's real weights come from the set-up's venv, no download): the tiny pipeline's random VAE
//! decodes x̂0 to noise-like images in which no detector finds a face — MTCNN, DRIP's own
//! detector in `mtcnn-reid`, needs faces of ≥ 20 px — so a detecting metric would leave the
//! identity term at 0 and test nothing. What is tested is the gradient path and the files, not
//! likeness (see docs/drip-sd15.md).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use likeness_tests::{built_or_skip, data_or_skip, python_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

/// The tiny pipeline folder, written once per build directory (the script's stamp makes a rerun
/// instant).
pub(crate) fn tiny_sd15(test: &str) -> Option<&'static PathBuf> {
    static T: OnceLock<PathBuf> = OnceLock::new();
    let python = python_or_skip(test)?;
    Some(T.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("drip-sd15-tiny");
        let script = likeness_tests::repo_root().join("tests/python/make_tiny_sd15.py");
        let o = std::process::Command::new(python)
            .arg(&script)
            .arg("--out")
            .arg(&dir)
            .args(["--preset", "tiny"])
            .output()
            .expect("cannot start LIKENESS_PYTHON");
        assert!(o.status.success(), "make_tiny_sd15.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
        dir
    }))
}

/// A tiny random transformers CLIPModel (tests/python/clip_oracle.py's, 32-px vision tower) for
/// DRIP's `--l_text` term: `model.safetensors` beside its config.json; the tokenizer is
/// open_clip's real vocabulary from the set-up.
pub(crate) fn tiny_clip(test: &str) -> Option<&'static PathBuf> {
    static T: OnceLock<PathBuf> = OnceLock::new();
    let python = python_or_skip(test)?;
    Some(T.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("drip-sd15-clip");
        let model = root.join("model");
        if !model.join("model.safetensors").is_file() {
            let script = likeness_tests::repo_root().join("tests/python/clip_oracle.py");
            let o = std::process::Command::new(python)
                .arg(&script)
                .arg("--out")
                .arg(root.join("oracle"))
                .arg("--text-model")
                .arg(&model)
                .output()
                .expect("cannot start LIKENESS_PYTHON");
            assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
        }
        model.join("model.safetensors")
    }))
}

/// DRIP's layout from the real photographs: person_*/{orig.jpg, ref_face.jpg, prompt.txt}, the
/// reference another photo of the same person where there is one.
pub(crate) fn drip_photos(dir: &Dir, data: &Path, people: usize) -> PathBuf {
    let photos = data.join("photos/face_recognition");
    let rows = [
        ("obama.jpg", "obama2.jpg", "a photo of barack obama smiling"),
        ("obama3.jpg", "obama.jpg", "a portrait of barack obama"),
        ("biden.jpg", "biden.jpg", "a photo of joe biden"),
        ("obama2.jpg", "obama3.jpg", "barack obama in a suit"),
    ];
    let root = dir.mkdir("dataset");
    for (i, (orig, reference, prompt)) in rows.iter().take(people).enumerate() {
        let p = root.join(format!("person_{:03}", i + 1));
        std::fs::create_dir_all(&p).unwrap();
        for (from, to) in [(orig, "orig.jpg"), (reference, "ref_face.jpg")] {
            let src = photos.join(from);
            std::fs::copy(&src, p.join(to)).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", src.display()));
        }
        std::fs::write(p.join("prompt.txt"), format!("{prompt}\n")).unwrap();
    }
    root
}

/// What every test needs: the staged plugins, the venv, the data, the tiny pipeline.
fn setup(test: &str) -> Option<(PathBuf, &'static PathBuf)> {
    built_or_skip(test)?;
    let data = data_or_skip(test)?;
    let tiny = tiny_sd15(test)?;
    Some((data, tiny))
}

fn host(dir: &Dir) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_plugins());
    t
}

/// DRIP's training command line, `python train.py` → `host train --plugin sd15-lora`, at 64 px
/// (`--l_text` is added by the test that has a CLIP model).
/// Two people at batch 2 and no held-out split: one optimizer step per epoch. The dlib metric
/// and the small LoRA are the only `--set`s (DRIP has no flags for them).
fn drip_train(dir: &Dir, data: &Path, tiny: &Path, save_dir: &Path, extra: &[&str]) -> TestCommand {
    let mut t = host(dir);
    t.args(["train", "--plugin", "sd15-lora", "--data_root"]).arg(data).arg("--pretrained_model").arg(tiny);
    t.args(["--resolution", "64", "--batch_size", "2", "--lr", "1e-2", "--epochs", "2", "--l_face", "1.0"]);
    t.arg("--save_dir").arg(save_dir);
    for s in [
        "metric.config.detector=\"none\"",
        "model.config.lora_rank=4",
        "model.config.sample_steps=2",
        "train.sample_count=1",
        "data.val_fraction=0",
        "data.test_fraction=0",
    ] {
        t.args(["--set", s]);
    }
    t.args(["--metric", "dlib", "--no-progress"]);
    t.args(extra.iter().copied());
    t
}

/// The f32 values of every tensor of a safetensors file whose name ends with `suffix`.
fn st_values(path: &Path, suffix: &str) -> Vec<(String, Vec<f32>)> {
    let (tensors, _) = likeness_sdk::st::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    tensors
        .into_iter()
        .filter(|t| t.name.ends_with(suffix))
        .map(|t| {
            assert_eq!(t.dtype, likeness_abi::DataType::F32, "{}: {} is not f32", path.display(), t.name);
            let v = t.bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (t.name, v)
        })
        .collect()
}

/// (a) DRIP's command line runs its epochs and writes `save_dir/epochNN/` after each — 0-based
/// as the seed names them (`epoch00/` = after the first epoch) — each holding the adapter in
/// every format the plugin exports; the whole run goes to `save_dir` (DRIP has no other output
/// flag). Also: `--l_recon` is the diffusion loss's weight, and `identity_weighting = "timestep"`
/// is refused (before any weight loads) for a model without `timestep_weights`.
#[test]
fn issue_8_drip_command_line_writes_an_adapter_per_epoch() {
    const T: &str = "issue_8_drip_command_line_writes_an_adapter_per_epoch";
    let Some((data, tiny)) = setup(T) else { return };
    let dir = Dir::new("drip-cli");
    let ds = drip_photos(&dir, &data, 2);
    let save = dir.join("lora_out");
    let Some(clip) = tiny_clip(T) else { return };
    let text_weights = format!("text.config.weights={}", serde_json::Value::String(clip.display().to_string()));
    let log = drip_train(&dir, &ds, tiny, &save, &["--l_text", "1.0", "--l_recon", "0.1", "--set", &text_weights]).ok();
    for e in ["epoch00", "epoch01"] {
        let d = save.join(e);
        assert!(d.join("likeness.safetensors").is_file(), "{e}: no kohya file\n{log}");
        assert!(d.join("likeness-diffusers/pytorch_lora_weights.safetensors").is_file(), "{e}: no diffusers file");
        assert!(d.join("likeness-peft/adapter_config.json").is_file(), "{e}: no PEFT folder");
        assert!(d.join("likeness-peft/adapter_model.safetensors").is_file(), "{e}: no PEFT weights");
    }
    assert!(!save.join("epoch02").exists(), "2 epochs write epoch00 and epoch01 only");
    let leftovers: Vec<_> = std::fs::read_dir(&save)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
    // The two epochs hold different weights (the second epoch trained on).
    let a = st_values(&save.join("epoch00/likeness.safetensors"), "lora_up.weight");
    let b = st_values(&save.join("epoch01/likeness.safetensors"), "lora_up.weight");
    assert!(!a.is_empty() && a.len() == b.len());
    assert_ne!(a, b, "epoch01 holds the same LoRA as epoch00");

    let recs = read_metrics(&save);
    assert_eq!(recs[0]["terms"], serde_json::json!(["model", "identity", "text"]), "{}", recs[0]);
    assert_eq!((recs[0]["metric"].as_str(), recs[0]["text_metric"].as_str()), (Some("dlib"), Some("clip")));
    let train: Vec<_> = recs.iter().filter(|r| r["type"] == "train").collect();
    assert_eq!(train.len(), 2, "one step per epoch");
    for r in &train {
        // L_total = λ_face·L_face + λ_text·L_text + λ_recon·L_recon (1, 1, 0.1), logged term by term.
        let term = |k: &str| r["terms"][k].as_f64().unwrap_or_else(|| panic!("no term {k}: {r}"));
        let (m, f, x) = (term("model"), term("identity.dlib"), term("text"));
        let total = r["loss"].as_f64().unwrap();
        // The same f64 products summed in another order: a few ulps of |L| ≈ 1.
        assert!((total - (f + x + 0.1 * m)).abs() <= 1e-12 * total.abs().max(1.0), "{r}");
        assert!(f > 0.0 && x > 0.0 && m > 0.0, "{r}");
    }
    let epochs: Vec<_> = recs.iter().filter(|r| r["type"] == "epoch_adapter").map(|r| r["epoch"].clone()).collect();
    assert_eq!(epochs, [0, 1]);

    // `timestep` weighting needs the model's `timestep_weights`: the flow fixture has none.
    let mut t = TestCommand::host(&dir);
    t.arg("--plugin-dir").arg(staged_plugins()).arg("--plugin-dir").arg(likeness_tests::staged_test_plugins());
    let e = t
        .args(["train", "--plugin", "testing-flow", "--data_root"])
        .arg(&ds)
        .args(["--steps", "1", "--metric", "testing-color-metric", "--l_face", "1"])
        .args(["--set", "metric.identity_weighting=\"timestep\"", "--output"])
        .arg(dir.join("flow"))
        .fails();
    assert!(e.contains("does not output `timestep_weights`") && e.contains("before loading any weights"), "{e}");
}

/// (b) The identity chain with the real metric: with the diffusion loss off (`--l_recon 0`) the
/// identity term is the only gradient, and it is non-zero, found a "face" in every sample, and
/// reached the LoRA: kohya's `lora_up` (peft's `lora_B`) starts at exactly 0, so any non-zero
/// value after one step came through x̂0 → VAE decode → dlib → identity loss → backward. The term
/// is weighted by the trainer's timestep weighting (`identity_weighting = "timestep"`, min-SNR-γ).
#[test]
fn issue_8_identity_term_reaches_the_lora_through_the_vae() {
    const T: &str = "issue_8_identity_term_reaches_the_lora_through_the_vae";
    let Some((data, tiny)) = setup(T) else { return };
    let dir = Dir::new("drip-chain");
    let ds = drip_photos(&dir, &data, 2);
    let save = dir.join("out");
    let extra = [
        "--l_recon",
        "0",
        "--set",
        "metric.identity_weighting=\"timestep\"",
        "--set",
        "model.config.min_snr_gamma=5.0",
        "--set",
        "train.epochs=1",
    ];
    let log = drip_train(&dir, &ds, tiny, &save, &extra).ok();
    let recs = read_metrics(&save);
    assert_eq!(recs[0]["terms"], serde_json::json!(["identity"]), "{}\n{log}", recs[0]);
    let r = recs.iter().find(|r| r["type"] == "train").unwrap();
    let id = r["terms"]["identity.dlib"].as_f64().unwrap();
    // 1 − cos of a noise-like decode against a real face, times min(SNR, 5)/SNR ∈ (0, 1]: well
    // above 0 (an exact 0 would mean no weight or no valid row).
    assert!(id > 1e-4 && id < 2.0, "identity term {id}: {r}");
    assert_eq!((r["no_face"].as_u64(), r["identity_samples"].as_u64()), (Some(0), Some(2)), "{r}");
    assert!(r["grad_norm"].as_f64().unwrap() > 0.0, "{r}");
    let ups = st_values(&save.join("epoch00/likeness.safetensors"), "lora_up.weight");
    assert!(!ups.is_empty());
    let moved = ups.iter().filter(|(_, v)| v.iter().any(|x| *x != 0.0)).count();
    // AdamW's first step moves every parameter with a non-zero gradient by ≈ lr; every targeted
    // attention projection of the UNet lies on the path to x̂0.
    assert_eq!(moved, ups.len(), "lora_up tensors still 0 after the identity-only step: {moved}/{}", ups.len());
}

/// (c) `host generate --lora`: PNGs with the LoRA path and scale in their text chunks, and
/// `--lora-scale 0` gives the base model's image exactly (the LoRA's delta is multiplied by 0),
/// while scale 1 gives another.
#[test]
fn issue_8_generate_with_a_lora_writes_its_settings_and_scale_0_is_the_base_model() {
    const T: &str = "issue_8_generate_with_a_lora_writes_its_settings_and_scale_0_is_the_base_model";
    let Some((data, tiny)) = setup(T) else { return };
    let dir = Dir::new("drip-generate");
    let ds = drip_photos(&dir, &data, 2);
    let save = dir.join("lora_out");
    // A large learning rate so that the trained LoRA visibly changes 8-bit images.
    drip_train(
        &dir,
        &ds,
        tiny,
        &save,
        &["--set", "train.epochs=1", "--set", "train.lr=0.2", "--set", "train.max_grad_norm=0"],
    )
    .ok();
    let lora = save.join("epoch00/likeness.safetensors");
    let gen = |out: &str, lora: Option<&Path>, scale: &str| -> PathBuf {
        let mut t = host(&dir);
        t.args(["generate", "--plugin", "sd15-lora", "--pretrained_model"]).arg(tiny);
        if let Some(l) = lora {
            t.arg("--lora").arg(l);
        }
        t.args(["--prompt", "a photo of barack obama", "--seed", "3", "--steps", "3", "--cfg", "2.0"]);
        t.args(["--width", "64", "--height", "64", "--lora-scale", scale, "--output"]).arg(dir.join(out));
        let printed = t.ok();
        let png = dir.join(out).join("3_00.png");
        assert!(png.is_file(), "{printed}");
        png
    };
    let with = gen("with", Some(&lora), "1");
    let zero = gen("zero", Some(&lora), "0");
    let base = gen("base", None, "1");
    let bytes = std::fs::read(&with).unwrap();
    let has = |k: &str, v: &str| bytes.windows(k.len() + 1 + v.len()).any(|w| w == format!("{k}\0{v}").as_bytes());
    assert!(has("lora", &lora.display().to_string()), "no lora path in the PNG text chunks");
    assert!(has("lora_scale", "1") && has("prompt", "a photo of barack obama") && has("seed", "3"));
    let zero_bytes = std::fs::read(&zero).unwrap();
    assert!(zero_bytes.windows(12).any(|w| w == b"lora_scale\x000"), "scale 0 is not recorded");
    let px = |p: &Path| likeness_engine::data::image_io::decode_rgb(p).unwrap().into_raw();
    // The same computation with the LoRA's contribution scaled to 0 (x + 0·BAx): identical.
    assert_eq!(px(&zero), px(&base), "--lora-scale 0 differs from the base model");
    assert_ne!(px(&with), px(&base), "the trained LoRA at scale 1 changed nothing");
}

/// Issue 14, part 7: training on from a LoRA the user brings (`model.config.lora`), with the
/// default encoding cache. Before the fix a LoRA with text-encoder modules failed with "declares
/// no encoding `text_embeddings`": `create` made the text encoder train, while the interface
/// declared before it still promised cached text embeddings. Checked with a LoRA that has
/// text-encoder modules, the same LoRA with the UNet's modules only, and a NaN LoRA (refused by
/// key before training).
#[test]
fn issue_14_training_on_from_a_users_lora_with_and_without_text_encoder_modules() {
    const T: &str = "issue_14_training_on_from_a_users_lora";
    let Some((data, tiny)) = setup(T) else { return };
    let dir = Dir::new("drip-initial-lora");
    let ds = drip_photos(&dir, &data, 2);
    let one_epoch = ["--set", "train.epochs=1"];
    let first = dir.join("first");
    let te = ["--set", "model.config.train_text_encoder=true"];
    drip_train(&dir, &ds, tiny, &first, &[&one_epoch[..], &te[..]].concat()).ok();
    let with_te = first.join("epoch00/likeness.safetensors");
    let (tensors, meta) = likeness_sdk::st::load(&with_te).unwrap();
    assert!(tensors.iter().any(|t| t.name.starts_with("lora_te")), "the first run wrote no text-encoder LoRA");
    let unet_only = dir.join("unet-only.safetensors");
    let kept: Vec<_> = tensors.iter().filter(|t| t.name.starts_with("lora_unet_")).cloned().collect();
    likeness_sdk::st::save(&unet_only, &kept, &meta).unwrap();

    for (name, lora, trains_text) in [("te", &with_te, true), ("unet", &unet_only, false)] {
        let out = dir.join(format!("on-{name}"));
        let set = format!("model.config.lora={}", serde_json::Value::String(lora.display().to_string()));
        let log = drip_train(&dir, &ds, tiny, &out, &[&one_epoch[..], &["--set", &set]].concat()).ok();
        // The adapter trained on holds the text encoder's modules exactly when the initial
        // LoRA had them (they are a parameter group then), and the UNet's in both cases.
        let (after, _) = likeness_sdk::st::load(&out.join("epoch00/likeness.safetensors")).unwrap();
        let has_te = after.iter().any(|t| t.name.starts_with("lora_te"));
        assert_eq!(has_te, trains_text, "{name}: text-encoder modules in the result\n{log}");
        assert!(after.iter().any(|t| t.name.starts_with("lora_unet_")), "{name}: no UNet modules\n{log}");
        let cache = read_metrics(&out).into_iter().find(|r| r["type"] == "cache");
        assert!(cache.is_some(), "{name}: the default encoding cache was not used\n{log}");
    }

    let mut nan = tensors.clone();
    let up = nan.iter_mut().find(|t| t.name.ends_with("lora_up.weight")).unwrap();
    let mut v = up.to_f32().unwrap();
    v[0] = f32::NAN;
    *up = likeness_sdk::st::StTensor::from_f32(&up.name, &up.shape.clone(), &v);
    let nan_file = dir.join("nan.safetensors");
    likeness_sdk::st::save(&nan_file, &nan, &meta).unwrap();
    let set = format!("model.config.lora={}", serde_json::Value::String(nan_file.display().to_string()));
    let e = drip_train(&dir, &ds, tiny, &dir.join("on-nan"), &[&one_epoch[..], &["--set", &set]].concat()).fails();
    assert!(e.contains("nan.safetensors") && e.contains("non-finite"), "{e}");
}
