//! Issue 19: model ids resolve offline from the local Hugging Face cache, and DRIP's command
//! (seed 002) runs as written. The cache is built with huggingface_hub's real layout in a
//! temporary HF_HOME (`blobs/`, `snapshots/<commit>/` of relative symlinks, `refs/main`) around
//! the tiny SD1.5 pipeline that tests/python/make_tiny_sd15.py saves with diffusers; diffusers
//! and huggingface_hub themselves (tests/python/hf_cache_oracle.py) must resolve the same
//! snapshot from it.

use std::path::{Path, PathBuf};

use likeness_sdk::hf_cache::testing::store_snapshot;
use likeness_tests::{built_or_skip, data_or_skip, python_or_skip, read_metrics, Dir, TestCommand};

use crate::drip_sd15::{drip_photos, tiny_clip, tiny_sd15};

const SD15: &str = "runwayml/stable-diffusion-v1-5";
const COMMIT: &str = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14";

/// `<dir>/hf-home/hub` holding the tiny pipeline as DRIP's default model id; returns (HF_HOME,
/// snapshot folder).
fn hf_home_with_sd15(dir: &Dir, tiny: &Path) -> (PathBuf, PathBuf) {
    let home = dir.join("hf-home");
    let snap = store_snapshot(&home.join("hub"), SD15, "main", COMMIT, tiny).unwrap();
    (home, snap)
}

/// `host` with HF_HOME as the only cache setting (a caller's HF_HUB_CACHE would win over it).
fn host_with_cache(dir: &Dir, hf_home: &Path) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.env("HF_HOME", hf_home).env_remove("HF_HUB_CACHE").env_remove("HUGGINGFACE_HUB_CACHE");
    t
}

/// The text after `resolved from the local Hugging Face cache: ` in the log.
fn resolved_path(log: &str) -> PathBuf {
    let key = "resolved from the local Hugging Face cache: ";
    let line = log.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("no resolution logged:\n{log}"));
    PathBuf::from(line.split(key).nth(1).unwrap().trim())
}

/// DRIP's first command, character for character, in a folder holding `dataset/`; only the
/// environment shrinks the run (64 px, rank 4, the tiny CLIP, a random OSNet, no held-out people).
#[test]
fn issue_19_drips_first_command_runs_unchanged_from_the_hf_cache() {
    const T: &str = "issue_19_drips_first_command_runs_unchanged_from_the_hf_cache";
    let (Some(()), Some(data)) = (built_or_skip(T), data_or_skip(T)) else { return };
    let (Some(tiny), Some(clip), Some(python)) = (tiny_sd15(T), tiny_clip(T), python_or_skip(T)) else { return };
    let dir = Dir::new("hf-cache-drip");
    drip_photos(&dir, &data, 2);
    let (hf_home, snap) = hf_home_with_sd15(&dir, tiny);
    let mut t = host_with_cache(&dir, &hf_home);
    t.args(
        "train --data_root dataset --batch_size 2 --lr 1e-4 --epochs 3 --l_face 1.0 --l_text 1.0 --save_dir lora_out"
            .split(' '),
    );
    for (k, v) in [
        ("LIKENESS_DATA__IMAGE_SIZE", "64"),
        ("LIKENESS_DATA__VAL_FRACTION", "0"),
        ("LIKENESS_DATA__TEST_FRACTION", "0"),
        ("LIKENESS_MODEL__CONFIG__LORA_RANK", "4"),
        ("LIKENESS_MODEL__CONFIG__SAMPLE_STEPS", "2"),
        ("LIKENESS_TRAIN__SAMPLE_COUNT", "1"),
        ("LIKENESS_METRIC__CONFIG__ARCH", "osnet_x0_25"),
        ("LIKENESS_METRIC__CONFIG__ALLOW_RANDOM_WEIGHTS", "true"),
    ] {
        t.env(k, v);
    }
    t.env("LIKENESS_TEXT__CONFIG__WEIGHTS", clip);
    let log = t.ok();
    for want in [
        "model.plugin not set: a DRIP dataset trains Stable Diffusion 1.5",
        "`sd15-lora`",
        &format!("DRIP's default --pretrained_model `{SD15}`"),
        &format!("model.config.pretrained `{SD15}` (revision main, commit {COMMIT}) resolved from the local Hugging Face cache"),
        "training finished: 3 optimizer steps",
    ] {
        assert!(log.contains(want), "no {want:?} in the log:\n{log}");
    }
    assert_eq!(resolved_path(&log), snap);
    let save = dir.join("lora_out");
    for e in ["epoch00", "epoch01", "epoch02"] {
        assert!(save.join(e).join("likeness.safetensors").is_file(), "{e}: no LoRA\n{log}");
    }
    let cfg = std::fs::read_to_string(save.join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("pretrained = \"{}\"", snap.display())), "the run's config.toml:\n{cfg}");
    let recs = read_metrics(&save);
    assert_eq!(recs[0]["terms"], serde_json::json!(["model", "identity", "text"]), "{}", recs[0]);
    assert_eq!((recs[0]["metric"].as_str(), recs[0]["text_metric"].as_str()), (Some("mtcnn-reid"), Some("clip")));

    // huggingface_hub and diffusers, offline, on the same HF_HOME: the same snapshot folder.
    let mut py = TestCommand::new(python);
    py.arg(likeness_tests::repo_root().join("tests/python/hf_cache_oracle.py")).args([SD15, COMMIT]);
    py.env("HF_HOME", &hf_home).env_remove("HF_HUB_CACHE").env_remove("HUGGINGFACE_HUB_CACHE");
    let out = py.ok();
    let o: serde_json::Value = serde_json::from_str(out.lines().rfind(|l| l.starts_with('{')).unwrap()).unwrap();
    for k in ["snapshot_download", "snapshot_at_commit", "pipeline_download"] {
        assert_eq!(o[k].as_str().map(PathBuf::from), Some(snap.clone()), "{k}: {o}");
    }
    assert_eq!(
        (o["pipeline_class"].as_str(), o["unet_in_channels"].as_u64()),
        (Some("StableDiffusionPipeline"), Some(4))
    );
    // huggingface_hub refuses a missing ref and a missing id too (ours: the test below).
    assert!(o["missing_ref_error"].is_string() && o["missing_id_error"].is_string(), "{o}");
}

/// A missing id, a missing ref and a broken symlink each stop the run before anything loads,
/// with what was looked at and the fix; a commit hash as the revision and an `org/name/subfolder`
/// value are resolved too (the sub-folder run then fails in the plugin, which is not tested here).
#[test]
fn issue_19_missing_id_ref_or_blob_is_a_clear_error_before_training() {
    const T: &str = "issue_19_missing_id_ref_or_blob_is_a_clear_error_before_training";
    let (Some(()), Some(data)) = (built_or_skip(T), data_or_skip(T)) else { return };
    let Some(tiny) = tiny_sd15(T) else { return };
    let dir = Dir::new("hf-cache-errors");
    drip_photos(&dir, &data, 2);
    let (hf_home, snap) = hf_home_with_sd15(&dir, tiny);
    let train = |extra: &[&str]| {
        let mut t = host_with_cache(&dir, &hf_home);
        t.args(["train", "--data_root", "dataset", "--epochs", "1", "--save_dir", "out"]).args(extra);
        t
    };
    let e = train(&["--pretrained_model", "nobody/not-cached"]).fails();
    let hub = hf_home.join("hub");
    for want in [
        "`nobody/not-cached` is not an existing path".to_string(),
        "not in the local Hugging Face cache (models are never downloaded)".into(),
        format!("{} (as a local path): does not exist", dir.join("nobody/not-cached").display()),
        format!(
            "{}: does not exist (the hub cache, from HF_HOME={} (+ /hub))",
            hub.join("models--nobody--not-cached").display(),
            hf_home.display()
        ),
        "huggingface-cli download nobody/not-cached".into(),
    ] {
        assert!(e.contains(&want), "no {want:?} in:\n{e}");
    }
    let e = train(&["--revision", "fp16"]).fails();
    for want in ["revision `fp16`", "refs/fp16 does not exist", "cached refs: main", COMMIT, "--revision fp16"] {
        assert!(e.contains(want), "no {want:?} in:\n{e}");
    }
    let blob = std::fs::canonicalize(snap.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let e = train(&[]).fails();
    for want in [
        "unet/diffusion_pytorch_model.safetensors is a symlink to",
        "which does not exist",
        "cp -a",
        "huggingface-cli download",
    ] {
        assert!(e.contains(want), "no {want:?} in:\n{e}");
    }
    // A commit hash is a revision of its own (huggingface_hub's rule: no refs/ file is read).
    let e = train(&["--revision", COMMIT]).fails();
    assert!(e.contains(&format!("(commit {COMMIT}) is only partly in the Hugging Face cache")), "{e}");
    // A sub-folder without the broken file resolves (and then fails in sd15-lora, not here).
    let e = train(&["--pretrained_model", &format!("{SD15}/text_encoder")]).fails();
    assert!(
        e.contains(&format!("resolved from the local Hugging Face cache: {}", snap.join("text_encoder").display())),
        "{e}"
    );
}
