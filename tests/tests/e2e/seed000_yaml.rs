//! Seed 000's `train/config.yaml` read as is by the real `host` (issue 6, part 5): it trains
//! the identity autoencoder on the demo data, `host config show` names the YAML as the source,
//! and a bad key is explained (file, line, key, closest key). Also part 6's message when
//! `--plugin` switches away from the plugin a file's `[model.config]` was written for.

use likeness_tests::{built_or_skip, demo_bundles_or_skip, repo_root, staged_plugins, train_records, Dir, TestCommand};

/// Seed 000's keys with values small enough for a CPU test (32 px, batch 4).
fn seed000_yaml(data: &std::path::Path) -> String {
    format!(
        "# Dataset parameters\n\
         data_dir: \"{}\"\n\
         max_chars_per_bundle: 20\n\
         min_images_per_char: 2\n\
         \n\
         # Model parameters\n\
         use_simple_model: true\n\
         input_size: 32\n\
         num_face_latents: 16\n\
         num_body_latents: 16\n\
         \n\
         # Training parameters\n\
         batch_size: 4\n\
         num_epochs: 30\n\
         learning_rate: 0.002\n\
         weight_decay: 0.00001\n\
         face_weight: 1.0\n\
         body_weight: 0.5\n\
         content_weight: 0.5\n\
         \n\
         # Output parameters\n\
         output_dir: \"checkpoints/identity_preserving\"\n",
        data.display()
    )
}

#[test]
fn issue_6_seed000_yaml_trains_the_autoencoder() {
    let Some(()) = built_or_skip("issue_6_seed000_yaml_trains_the_autoencoder") else {
        return;
    };
    let Some(data) = demo_bundles_or_skip("issue_6_seed000_yaml_trains_the_autoencoder") else {
        return;
    };
    let dir = Dir::new("seed000-yaml");
    let cfg = dir.create("train/config.yaml", seed000_yaml(&data));

    // Where each value comes from: the YAML file, except what the command line sets.
    let show = TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&cfg).args(["--steps", "6"]).ok();
    let line = |k: &str| {
        show.lines()
            .find(|l| l.starts_with(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("no {k} in\n{show}"))
            .to_string()
    };
    for k in [
        "model.plugin",
        "model.config",
        "data.root",
        "data.image_size",
        "train.batch_size",
        "train.lr",
        "loss.weight",
        "run.output",
    ] {
        assert!(line(k).ends_with(&format!("# {}", cfg.display())), "{k}: {}\n{show}", line(k));
    }
    assert!(line("model.plugin").contains("\"identity-autoencoder\""), "{show}");
    assert!(line("train.steps").ends_with("# command line"), "{show}");
    assert!(show.contains("face_weight = 1 is not used") && show.contains("--metric dlib"), "{show}");

    // Train a few steps; the run lands in output_dir, relative to the YAML's folder (train/).
    let out = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(staged_plugins())
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--steps", "6", "--no-progress"])
        .args(["--set", "model.config.base_channels=8", "--set", "model.config.latent_dim=16"])
        .ok();
    let run = dir.join("train/checkpoints/identity_preserving");
    assert!(out.contains("training finished: 6 optimizer steps"), "{out}");
    assert!(run.join("final/model.safetensors").is_file(), "{out}");
    let steps: Vec<u64> = train_records(&run).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "{out}");
    // The resolved config the run kept: seed 000's constant learning rate, no clipping, pixel loss at content_weight.
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    for want in [
        "schedule = \"constant\"",
        "max_grad_norm = 0.0",
        "lr = 0.002",
        "batch_size = 4",
        "image_size = 32",
        "weight = 0.5",
    ] {
        assert!(resolved.contains(want), "`{want}` missing from\n{resolved}");
    }
}

#[test]
fn issue_6_seed000_yaml_errors_name_file_and_key() {
    let Some(()) = built_or_skip("issue_6_seed000_yaml_errors_name_file_and_key") else {
        return;
    };
    let dir = Dir::new("seed000-yaml-errors");
    let typo = dir.create("config.yaml", "data_dir: d\nbatch_size: 2\nlerning_rate: 0.0001\n");
    let e = TestCommand::host(&dir).args(["train", "--config"]).arg(&typo).fails();
    assert!(
        e.contains(&format!("{}: unknown key `lerning_rate` (line 3); did you mean `learning_rate`?", typo.display())),
        "{e}"
    );
    let wrong = dir.create("wrong.yml", "data_dir: d\nbatch_size: two\n");
    let e = TestCommand::host(&dir).args(["train", "--config"]).arg(&wrong).fails();
    assert!(
        e.contains(
            "wrong.yml: key `batch_size` (line 2) has the wrong type: found string \"two\", expected an integer"
        ),
        "{e}"
    );
    // Issue 16: `use_simple_model: false` is DTBack's Flux (flux-lora + identity injection).
    let flux = dir.create("flux.yaml", "data_dir: d\nuse_simple_model: false\n");
    let out = TestCommand::host(&dir).args(["config", "show", "--config"]).arg(&flux).ok();
    assert!(out.contains("model.plugin = \"flux-lora\"") && out.contains("identity"), "{out}");
}

#[test]
fn issue_6_plugin_switch_names_the_plugin_model_config_was_written_for() {
    let Some(()) = built_or_skip("issue_6_plugin_switch_names_the_plugin_model_config_was_written_for") else {
        return;
    };
    let dir = Dir::new("plugin-switch");
    let cfg = repo_root().join("configs/quickstart-cpu.toml");
    let out = TestCommand::host(&dir)
        .args(["config", "show", "--config"])
        .arg(&cfg)
        .args(["--plugin", "flux-lora", "--dit", "/w/flux1-dev.safetensors"])
        .ok();
    assert!(
        out.contains(&format!(
            "{}: model.config (base_channels, depth, image_size, latent_dim) was written for `identity-autoencoder`",
            cfg.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("--plugin flux-lora selects `flux-lora`") && out.contains("--set model.config.KEY=VALUE"),
        "{out}"
    );
    assert!(out.contains("model.config = {\"pretrained\":\"/w/flux1-dev.safetensors\"}"), "{out}");
}
