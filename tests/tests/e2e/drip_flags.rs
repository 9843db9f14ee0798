//! Issue 14, part 3: DRIP's flags (seed 002's table) at 0 and at their defaults, through the real
//! `host`. A weight of 0 turns its term off — `--l_face 0` needs no metric plugin (it was
//! "command line: missing key `metric.plugin`") — and the other flags at 0 are errors that
//! name the key.

use likeness_tests::{built_or_skip, data_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

use crate::drip_sd15::{drip_photos, tiny_sd15};

/// `host config show` of a DRIP command line (DRIP dataset, no --plugin) plus `flags`.
fn show(dir: &Dir, flags: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.args(["config", "show", "--data_root", "dataset", "--save_dir", "out"]).args(flags);
    t
}

#[test]
fn issue_14_every_drip_flag_at_zero_and_at_its_default() {
    const T: &str = "issue_14_every_drip_flag_at_zero_and_at_its_default";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("drip-flags");
    dir.mkdir("dataset/person_001");
    let has = |out: &str, row: &str| out.lines().any(|l| l.starts_with(row));

    // The weights at 0: both terms off, and no metric at all.
    for flags in [&["--l_face", "0", "--l_text", "0"][..], &["--l_face", "0"], &["--l_face", "0.0", "--l_text", "0.0"]]
    {
        let out = show(&dir, flags).ok();
        assert!(has(&out, "metric = null"), "{flags:?}: a metric section\n{out}");
        assert!(has(&out, "model.plugin = \"sd15-lora\""), "{flags:?}\n{out}");
        let text_off =
            if flags.contains(&"--l_text") { has(&out, "text.weight = 0.0") } else { has(&out, "text = null") };
        assert!(text_off, "{flags:?}: the text term is on\n{out}");
    }
    // At DRIP's defaults: DRIP's metric and CLIP, weight 1.
    let out = show(&dir, &["--l_face", "1.0", "--l_text", "1.0"]).ok();
    for row in ["metric.plugin = \"mtcnn-reid\"", "metric.weight = 1.0", "text.plugin = \"clip\"", "text.weight = 1.0"]
    {
        assert!(has(&out, row), "no {row:?} in\n{out}");
    }
    // A named metric at --l_face 0 is measured, not trained.
    let out = show(&dir, &["--l_face", "0", "--metric", "dlib"]).ok();
    assert!(has(&out, "metric.plugin = \"dlib\"") && has(&out, "metric.weight = 0.0"), "{out}");

    // The other flags at 0: an error naming the key; at DRIP's defaults, DRIP's values.
    for (flag, want) in [
        ("--batch_size", "`train.batch_size` must be at least 1"),
        ("--lr", "`train.lr` must be a positive number"),
        ("--epochs", "`train.steps` and `train.epochs` are both 0"),
        ("--resolution", "`data.image_size` (DRIP's --resolution) must be at least 1"),
    ] {
        let e = show(&dir, &[flag, "0"]).fails();
        assert!(e.contains(want), "{flag} 0: {e}");
    }
    let out = show(&dir, &["--batch_size", "2", "--lr", "1e-4", "--epochs", "3", "--resolution", "512"]).ok();
    for row in ["train.batch_size = 2", "train.lr = 0.0001", "train.epochs = 3", "data.image_size = 512"] {
        assert!(has(&out, row), "no {row:?} in\n{out}");
    }
}

/// The issue's two commands train: `--l_face 0 --l_text 0` and `--l_face 0` alone leave the
/// diffusion loss as the only term, with no metric plugin opened.
#[test]
fn issue_14_drip_commands_with_l_face_0_train_without_a_metric() {
    const T: &str = "issue_14_drip_commands_with_l_face_0_train_without_a_metric";
    let (Some(()), Some(data)) = (built_or_skip(T), data_or_skip(T)) else { return };
    let Some(tiny) = tiny_sd15(T) else { return };
    let dir = Dir::new("drip-flags-train");
    let ds = drip_photos(&dir, &data, 2);
    for (name, weights) in [("both", &["--l_face", "0", "--l_text", "0"][..]), ("face", &["--l_face", "0"])] {
        let out = dir.join(name);
        let mut t = TestCommand::host(&dir);
        t.arg("--plugin-dir").arg(staged_plugins());
        t.args(["train", "--plugin", "sd15-lora", "--data_root"]).arg(&ds).arg("--pretrained_model").arg(tiny);
        t.args(["--resolution", "64", "--batch_size", "2", "--lr", "1e-4", "--epochs", "1"]).args(weights);
        t.arg("--save_dir").arg(&out).arg("--no-progress");
        for s in [
            "model.config.lora_rank=4",
            "model.config.sample_steps=2",
            "train.sample_count=1",
            "data.val_fraction=0",
            "data.test_fraction=0",
        ] {
            t.args(["--set", s]);
        }
        let log = t.ok();
        assert!(!log.contains("metric.plugin"), "{name}: {log}");
        let recs = read_metrics(&out);
        assert_eq!(recs[0]["terms"], serde_json::json!(["model"]), "{name}: {}\n{log}", recs[0]);
        assert!(out.join("epoch00/likeness.safetensors").is_file(), "{name}: no adapter\n{log}");
    }
}
