//! Issue 14, parts 1 and 2: the first things a new user runs, run the way a user runs them.
//!
//! The user's environment is modelled by an *empty* environment plus `PATH` and a `HOME` of the
//! test's own whose `~/.cache/likeness/{venv,data}` are links to the set-up's real venv and
//! data: exactly what `scripts/setup.sh` leaves on a machine with its defaults, with none of
//! `LIKENESS_HOME`, `LIKENESS_DATA`, `LIKENESS_PYTHON` or `ORT_DYLIB_PATH` set. Before the fix
//! `host eval-faces --metric dlib` failed there ("`mtcnn_weights` is not set and LIKENESS_DATA
//! is unset"), and the demo's config validated with 0 valid pairs (MTCNN found no face in the
//! 64-px autoencoder outputs while `rect = "full-image"` decided nothing).

use std::path::{Path, PathBuf};

use likeness_tests::{
    built_or_skip, data_or_skip, host_bin, python_or_skip, read_metrics, repo_root, train_records, Dir, TestCommand,
};

/// A `HOME` holding `.cache/likeness/{venv,data}` → the set-up's real ones.
fn user_home(dir: &Dir, data: &Path, python: &Path) -> PathBuf {
    let home = dir.mkdir("home");
    let cache = home.join(".cache/likeness");
    std::fs::create_dir_all(&cache).unwrap();
    // python = <venv>/bin/python
    let venv = python.parent().and_then(Path::parent).expect("LIKENESS_PYTHON is <venv>/bin/python");
    std::os::unix::fs::symlink(std::fs::canonicalize(venv).unwrap(), cache.join("venv")).unwrap();
    std::os::unix::fs::symlink(std::fs::canonicalize(data).unwrap(), cache.join("data")).unwrap();
    home
}

/// `host` as a user runs it: only `PATH` and `HOME`, from the repository root (the README's
/// examples name `configs/…` relative to it).
fn user_host(home: &Path) -> TestCommand {
    let mut t = TestCommand::new(host_bin());
    t.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("HOME", home);
    t.current_dir(repo_root());
    t
}

/// Everything the set-up gives, or `None` after a `skipped:` line (a panic under CI).
fn setup(test: &str) -> Option<(PathBuf, PathBuf)> {
    built_or_skip(test)?;
    Some((data_or_skip(test)?, python_or_skip(test)?))
}

#[test]
fn issue_14_readme_host_examples_run_with_only_path_and_home() {
    let Some((data, python)) = setup("issue_14_readme_host_examples") else { return };
    let dir = Dir::new("issue14-env");
    let home = user_home(&dir, &data, &python);
    let run = |args: &[&str]| user_host(&home).args(args).ok();

    // The "Using `host`" section, in its order.
    assert!(run(&["--help"]).contains("train"));
    assert!(run(&["plugins", "list"]).contains("identity-autoencoder"));
    run(&["plugins", "inspect", "identity-autoencoder"]);
    run(&["config", "show", "--config", "configs/quickstart-cpu.toml", "--set", "train.lr=3e-4"]);
    let bundles = data.join("demo-bundles");
    let out = dir.join("runs/x");
    let (b, o) = (bundles.to_str().unwrap(), out.to_str().unwrap());
    run(&["data", "check", b]);
    run(&[
        "train",
        "--config",
        "configs/quickstart-cpu.toml",
        "--data",
        b,
        "--output",
        o,
        "--steps",
        "2",
        "--no-progress",
    ]);
    assert!(out.join("final").is_dir(), "the quick-start run wrote no final weights");

    // eval-faces with the dlib metric on the set-up's real photos: it needs the MTCNN weights
    // under $LIKENESS_DATA, which must default to ~/.cache/likeness/data.
    let gen = dir.mkdir("gen");
    std::fs::copy(data.join("faces/obama2.jpg"), gen.join("obama.jpg")).unwrap();
    let json = dir.join("faces.json");
    let faces = data.join("faces");
    let text = run(&[
        "eval-faces",
        "--control-dir",
        faces.to_str().unwrap(),
        "--generated-dir",
        gen.to_str().unwrap(),
        "--metric",
        "dlib",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["valid_pairs"], 1, "obama ← obama2 must be one valid pair\n{text}\n{report}");
    assert!(report["overall_mean"].as_f64().unwrap() > 0.908, "a genuine pair under dlib's threshold: {report}");
}

/// The demo's own config for a few steps: every validation must find the face in every pair
/// (the demo prints `n/a` otherwise), and no training step may lose its identity gradient.
#[test]
fn issue_14_demo_config_validates_with_every_pair() {
    let Some((data, python)) = setup("issue_14_demo_config_validates") else { return };
    let dir = Dir::new("issue14-demo");
    let home = user_home(&dir, &data, &python);
    let out = dir.join("demo");
    let bundles = data.join("demo-bundles");
    // 6 steps over 5-batch epochs with a validation every epoch: validations at steps 0, 5, 6.
    let text = user_host(&home)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .args(["train", "--config", "configs/demo-identity-cpu.toml", "--data", bundles.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap(), "--steps", "6", "--no-progress"])
        .args(["--set", "train.validate_every_epochs=1", "--set", "train.warmup_steps=1"])
        .ok();
    let vals: Vec<_> = read_metrics(&out).into_iter().filter(|r| r["type"] == "val").collect();
    assert!(vals.len() >= 2, "expected validations at the start and the end\n{text}");
    for v in &vals {
        let (valid, total) = (v["identity_valid_pairs"].as_u64(), v["identity_total_pairs"].as_u64());
        assert!(total.unwrap_or(0) > 0 && valid == total, "a validation lost pairs to the face detector: {v}\n{text}");
        assert!(v["identity_similarity"].as_f64().is_some(), "{v}");
    }
    for (step, r) in train_records(&out) {
        assert_eq!(r["no_face"].as_u64(), Some(0), "step {step} trained without a face: {r}");
    }
    let summary = text.lines().find(|l| l.contains("identity similarity: first")).unwrap_or_else(|| panic!("{text}"));
    assert!(!summary.contains("n/a"), "the summary the demo prints: {summary}");
}

/// Issue 14, part 8: `host plugins inspect ID` with an empty config prints every built-in
/// plugin's schema; for a model whose interface needs its config (sd15-lora needs
/// `pretrained`) it says which keys decide it instead of failing, and prints the interface
/// once they are given. Before the fix `inspect sd15-lora` ended with "missing field
/// `pretrained`" and printed no schema.
#[test]
fn issue_14_plugins_inspect_prints_every_builtin_schema() {
    let Some((data, python)) = setup("issue_14_plugins_inspect") else { return };
    let dir = Dir::new("issue14-inspect");
    let home = user_home(&dir, &data, &python);
    let list = user_host(&home).args(["plugins", "list"]).ok();
    // Rows `ID KIND VERSION ABI FOUND-VIA SUMMARY`; the search path follows them.
    let ids: Vec<&str> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() > 2 && ["model", "metric", "loss"].contains(&w[1]))
        .map(|w| w[0])
        .collect();
    for want in ["sd15-lora", "identity-autoencoder", "dlib", "arcface", "clip", "mtcnn-reid", "pixel", "identity"] {
        assert!(ids.contains(&want), "`plugins list` lacks {want}:\n{list}");
    }
    for id in &ids {
        let out = user_host(&home).args(["plugins", "inspect", id]).ok();
        assert!(out.contains("config schema:\n{"), "{id}: no schema\n{out}");
    }
    let sd = user_host(&home).args(["plugins", "inspect", "sd15-lora"]).ok();
    assert!(sd.contains("not available for this config") && sd.contains("`pretrained`"), "{sd}");
    let Some(tiny) = crate::drip_sd15::tiny_sd15("issue_14_plugins_inspect") else { return };
    let sd = user_host(&home).args(["plugins", "inspect", "sd15-lora", "--pretrained_model"]).arg(tiny).ok();
    assert!(
        sd.contains("images in:      target, reference (optional)") && sd.contains("text_embeddings (of caption)"),
        "{sd}"
    );
    let set = format!("model.config.pretrained={}", serde_json::Value::String(tiny.display().to_string()));
    let te = user_host(&home)
        .args(["plugins", "inspect", "sd15-lora", "--set", &set, "--set", "model.config.train_text_encoder=true"])
        .ok();
    assert!(te.contains("param groups:   unet, text_encoder") && !te.contains("text_embeddings"), "{te}");
}
