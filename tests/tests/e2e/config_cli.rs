//! The configuration layers and the CLI's own documentation, through the real `host` binary
//! (issue 2): `host config show` prints each merged value with where it came from (file,
//! `LIKENESS_*` environment, command line), bad configs are explained (file, key, closest
//! valid key), and `--help` documents --resume, --set and the plugin search order.

use likeness_tests::{built_or_skip, repo_root, Dir, TestCommand};

fn quickstart() -> std::path::PathBuf {
    repo_root().join("configs/quickstart-cpu.toml")
}

/// The `host config show` line of `key`: (value, source).
fn show_line(out: &str, key: &str) -> (String, String) {
    let prefix = format!("{key} = ");
    let line = out.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"));
    let (kv, from) = line.split_once("  # ").unwrap_or_else(|| panic!("no `# source` on {line:?}"));
    (kv[prefix.len()..].trim().to_string(), from.trim().to_string())
}

#[test]
fn issue_2_config_show_reports_values_and_their_sources() {
    let Some(()) = built_or_skip("issue_2_config_show_reports_values_and_their_sources") else { return };
    let dir = Dir::new("config-show");
    let cfg = quickstart();
    let out =
        TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&cfg).args(["--set", "train.lr=3e-4"]).ok();
    assert_eq!(show_line(&out, "train.lr"), ("0.0003".into(), "command line".into()), "{out}");
    let (plugin, from) = show_line(&out, "model.plugin");
    assert_eq!(plugin, "\"identity-autoencoder\"");
    assert_eq!(from, cfg.display().to_string(), "model.plugin comes from the file");
    // A key nobody set is a default.
    let (_, from) = show_line(&out, "train.grad_accum");
    assert!(from == "default" || from == cfg.display().to_string(), "{from}");

    // Flags are the command line too, and beat the environment, which beats the file.
    let out = TestCommand::host(&dir)
        .args(["config", "show", "--config"])
        .arg(&cfg)
        .env("LIKENESS_TRAIN__EPOCHS", "7")
        .env("LIKENESS_TRAIN__LR", "0.25")
        .args(["--lr", "0.5"])
        .ok();
    let (epochs, from) = show_line(&out, "train.epochs");
    assert_eq!(epochs, "7", "{out}");
    assert!(from.contains("environment"), "train.epochs source: {from}");
    assert_eq!(show_line(&out, "train.lr"), ("0.5".into(), "command line".into()), "{out}");
    // Variables outside the config sections are not config keys (and are no error).
    let out = TestCommand::host(&dir)
        .args(["config", "show", "--config"])
        .arg(&cfg)
        .env("LIKENESS_PLUGIN_PATH", "/nowhere")
        .ok();
    assert!(!out.contains("plugin_path"), "{out}");
}

#[test]
fn issue_2_bad_config_files_are_explained() {
    let Some(()) = built_or_skip("issue_2_bad_config_files_are_explained") else { return };
    let dir = Dir::new("config-errors");
    let typo =
        dir.create("typo.toml", "[model]\nplugin = \"identity-autoencoder\"\n[data]\nroot = \"d\"\n[train]\nlrr = 1\n");
    let e = TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&typo).fails();
    assert!(e.contains("typo.toml") && e.contains("train.lrr") && e.contains("did you mean `train.lr`"), "{e}");
    // Even when that is the file's only content (other required keys missing), the typo is named.
    let only = dir.create("only.toml", "[train]\nlrr = 1\n");
    let e = TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&only).fails();
    assert!(e.contains("only.toml") && e.contains("train.lrr") && e.contains("train.lr`"), "{e}");
    // The same through `host train` (it fails before looking for plugins or data).
    let e = TestCommand::host(&dir).args(["train", "--config"]).arg(&typo).fails();
    assert!(e.contains("train.lrr") && e.contains("did you mean `train.lr`"), "{e}");

    let wrong = dir.create(
        "wrong.toml",
        "[model]\nplugin = \"identity-autoencoder\"\n[data]\nroot = \"d\"\n[train]\nbatch_size = \"eight\"\n",
    );
    let e = TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&wrong).fails();
    assert!(
        e.contains("wrong.toml") && e.contains("train.batch_size") && e.contains("wrong type") && e.contains("eight"),
        "{e}"
    );

    let missing = dir.join("no-such-config.toml");
    let e = TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&missing).fails();
    assert!(e.contains("no-such-config.toml") && e.contains("does not exist"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let e = TestCommand::host(&dir).args(["train", "--config"]).arg(&missing).fails();
    assert!(e.contains("no-such-config.toml") && e.contains("does not exist"), "{e}");

    // A malformed --set is explained too.
    let e = TestCommand::host(&dir)
        .args(["config", "show", "--config"])
        .arg(quickstart())
        .args(["--set", "train.lr"])
        .fails();
    assert!(e.contains("--set train.lr") && e.contains("key=value"), "{e}");
}

#[test]
fn issue_2_help_documents_resume_set_and_plugin_search_order() {
    let Some(()) = built_or_skip("issue_2_help_documents_resume_set_and_plugin_search_order") else { return };
    let dir = Dir::new("help");
    for args in [&["--help"][..], &["train", "--help"][..]] {
        let h = TestCommand::host(&dir).args(args).ok();
        let what = format!("host {}", args.join(" "));
        assert!(h.contains("--resume"), "{what} does not mention --resume:\n{h}");
        assert!(h.contains("--set"), "{what} does not mention --set:\n{h}");
        // The search order, in order.
        let order = ["--plugin-dir", "LIKENESS_PLUGIN_PATH", "user data dir", "next to"];
        // `--plugin-dir` also appears as an option above: look inside the search-order paragraph.
        let para = &h
            [h.find("Plugins are found").unwrap_or_else(|| panic!("{what}: no plugin search-order paragraph:\n{h}"))..];
        let pos_para: Vec<usize> = order
            .iter()
            .map(|s| para.find(s).unwrap_or_else(|| panic!("{what}: `{s}` missing from:\n{para}")))
            .collect();
        assert!(pos_para.windows(2).all(|w| w[0] < w[1]), "{what}: search order out of order {pos_para:?}:\n{para}");
    }
}
