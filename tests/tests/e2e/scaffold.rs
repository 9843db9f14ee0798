//! Plugins written outside this repository keep working (issue 14, part 4).
//!
//! - `host plugins new NAME --kind model|metric|loss [--torch]` writes a crate that builds with
//!   `cargo build --release` in its folder and trains or measures in the unchanged host the
//!   first time, found through `--plugin-dir` on that folder;
//! - `host plugins manifest LIB` writes a library's `plugin.toml` from its descriptor: the
//!   scaffold's manifest is byte for byte what its built library says, and so is every
//!   manifest checked into this repository (field by field);
//! - a model plugin written for SDK 1.0 and rebuilt against today's SDK with no change to its
//!   code (its `plugin.toml` still says `abi = "1.0"`, its summary reworded) loads and trains,
//!   with warnings that print the fix; an id or version difference is an error with that fix.
//!
//! The crates build into `target/scaffold` (shared, kept between runs, so the SDK's
//! dependencies compile once), `--offline` with the workspace's `Cargo.lock`, which `plugins
//! new` copies. The library is then copied where a plain `cargo build --release` in the crate
//! folder puts it (`target/release/` there), which is where the scaffold's manifest names it.

use std::path::{Path, PathBuf};

use likeness_engine::plugins::Manifest;
use likeness_tests::{
    built_or_skip, demo_bundles, demo_bundles_or_skip, host_bin, python_or_skip, read_metrics, repo_root,
    staged_plugins, staged_test_plugins, tiny_train_args, train_records, Dir, FileStamp, TestCommand,
};

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn lib_name(name: &str) -> String {
    format!("lib{}.so", name.replace('-', "_"))
}

/// `host plugins new NAME --kind KIND [--torch] --output DIR/NAME`; returns the crate folder.
fn scaffold(dir: &Dir, name: &str, kind: &str, torch: bool) -> PathBuf {
    let krate = dir.join(name);
    let mut new = TestCommand::host(dir);
    new.args(["plugins", "new", name, "--kind", kind, "--output"]).arg(&krate);
    if torch {
        new.arg("--torch");
    }
    let out = new.ok();
    for f in ["Cargo.toml", "Cargo.lock", "plugin.toml", "src/lib.rs", "README.md"] {
        assert!(krate.join(f).is_file(), "`plugins new` wrote no {f}:\n{out}");
    }
    assert!(!krate.starts_with(repo_root()), "the crate must live outside the repository: {}", krate.display());
    krate
}

/// `cargo build --release` in the crate folder (into the shared target dir), then the library
/// copied to `<crate>/target/release/`, where a build without CARGO_TARGET_DIR leaves it.
fn build(krate: &Path, name: &str, envs: &[(&str, String)]) -> PathBuf {
    let target = repo_root().join("target/scaffold");
    let mut b = TestCommand::new(cargo());
    b.current_dir(krate).args(["build", "--release", "--offline", "--quiet"]).env("CARGO_TARGET_DIR", &target);
    for (k, v) in envs {
        b.env(k, v);
    }
    b.ok();
    let built = target.join("release").join(lib_name(name));
    assert!(built.is_file(), "{} was not built", built.display());
    let dest = krate.join("target/release");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::copy(&built, dest.join(lib_name(name))).unwrap();
    dest.join(lib_name(name))
}

/// The crate's own unit tests (the templates' finite-difference checks) pass.
fn unit_tests(krate: &Path, envs: &[(&str, String)]) {
    let mut t = TestCommand::new(cargo());
    t.current_dir(krate)
        .args(["test", "--release", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", repo_root().join("target/scaffold"));
    for (k, v) in envs {
        t.env(k, v);
    }
    t.ok();
}

/// `host plugins manifest target/release/LIB`, run in the crate folder.
fn manifest_of(dir: &Dir, krate: &Path, lib: &str) -> String {
    let mut m = TestCommand::host(dir);
    m.current_dir(krate).args(["plugins", "manifest", &format!("target/release/{lib}")]);
    let o = m.output();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// `plugins check` on the crate folder passes, without a warning about the crate.
fn checks_clean(dir: &Dir, krate: &Path, name: &str) {
    let out = TestCommand::host(dir).arg("--plugin-dir").arg(krate).args(["plugins", "check"]).ok();
    assert!(out.lines().any(|l| l.starts_with(&format!("ok    {name} "))), "{out}");
    let krate = krate.to_string_lossy();
    assert!(!out.lines().any(|l| l.contains("WARN") && l.contains(krate.as_ref())), "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");
}

#[test]
fn issue_14_scaffolded_model_builds_out_of_tree_and_trains_in_the_unchanged_host() {
    const T: &str = "issue_14_scaffolded_model_builds_out_of_tree_and_trains_in_the_unchanged_host";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let host = FileStamp::of(&host_bin());
    let dir = Dir::new("scaffold-model");
    let name = "my-colour-model";
    let krate = scaffold(&dir, name, "model", false);
    let cargo_toml = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    assert!(!cargo_toml.contains("tch") && !cargo_toml.contains("torch"), "pure Rust:\n{cargo_toml}");
    build(&krate, name, &[]);
    unit_tests(&krate, &[]);
    // The manifest `plugins new` wrote is exactly what the built library says.
    let written = std::fs::read_to_string(krate.join("plugin.toml")).unwrap();
    assert_eq!(manifest_of(&dir, &krate, &lib_name(name)), written);
    checks_clean(&dir, &krate, name);

    let out = dir.join("run");
    let steps = 6u64;
    let log = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(&krate)
        .args(["train", "--plugin", name, "--data"])
        .arg(demo_bundles())
        .arg("--output")
        .arg(&out)
        .args(["--steps", &steps.to_string(), "--batch-size", "4", "--lr", "0.05", "--no-progress"])
        .args(["--set", "data.image_size=32"])
        .ok();
    assert!(log.contains(&format!("training finished: {steps} optimizer steps")), "{log}");
    let records = train_records(&out);
    assert_eq!(records.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=steps).collect::<Vec<_>>(), "{log}");
    for (s, r) in &records {
        let (loss, g) = (r["loss"].as_f64().unwrap_or(f64::NAN), r["grad_norm"].as_f64().unwrap_or(f64::NAN));
        assert!(loss.is_finite() && loss > 0.0 && g.is_finite() && g > 0.0, "step {s}: {r}");
    }
    // It learns: the validation loss (deterministic in the run's seed) goes down.
    let vals: Vec<f64> =
        read_metrics(&out).iter().filter(|r| r["type"] == "val").filter_map(|r| r["val_loss"].as_f64()).collect();
    assert!(vals.len() >= 2 && vals.last() < vals.first(), "validation losses {vals:?}\n{log}");
    let (tensors, meta) = likeness_sdk::st::load(&out.join("final/model.safetensors")).unwrap();
    assert_eq!(meta.get("likeness.plugin").map(String::as_str), Some(name));
    let params = tensors[0].to_f32().unwrap();
    assert_eq!(params.len(), 12);
    assert!(params.iter().all(|v| v.is_finite()), "{params:?}");
    assert_eq!(FileStamp::of(&host_bin()), host, "the host must not be rebuilt");
}

#[test]
fn issue_14_scaffolded_metric_measures_with_eval_faces_and_trains_an_identity_loss() {
    const T: &str = "issue_14_scaffolded_metric_measures_with_eval_faces_and_trains_an_identity_loss";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("scaffold-metric");
    let name = "my-colour-metric";
    let krate = scaffold(&dir, name, "metric", false);
    build(&krate, name, &[]);
    unit_tests(&krate, &[]);
    assert_eq!(manifest_of(&dir, &krate, &lib_name(name)), std::fs::read_to_string(krate.join("plugin.toml")).unwrap());
    checks_clean(&dir, &krate, name);

    // Pairs: the first image of each of four characters against its second.
    let (control, generated) = (dir.mkdir("control"), dir.mkdir("generated"));
    let bundle = std::fs::read_dir(demo_bundles()).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    let mut chars: Vec<PathBuf> =
        std::fs::read_dir(&bundle).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    chars.sort();
    for (i, c) in chars.iter().take(4).enumerate() {
        let mut imgs: Vec<PathBuf> = std::fs::read_dir(c).unwrap().map(|e| e.unwrap().path()).collect();
        imgs.sort();
        let ext = imgs[0].extension().unwrap().to_string_lossy().into_owned();
        std::fs::copy(&imgs[0], control.join(format!("c{i}.{ext}"))).unwrap();
        std::fs::copy(&imgs[1], generated.join(format!("c{i}.{ext}"))).unwrap();
    }
    let json = dir.join("faces.json");
    TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(&krate)
        .args(["eval-faces", "--metric", name, "--image-size", "64", "--no-progress", "--control-dir"])
        .arg(&control)
        .arg("--generated-dir")
        .arg(&generated)
        .arg("--output-json")
        .arg(&json)
        .ok();
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((report["total_pairs"].as_u64(), report["valid_pairs"].as_u64()), (Some(4), Some(4)), "{report}");
    let mean = report["overall_mean"].as_f64().unwrap_or(f64::NAN);
    assert!((-1.0..=1.0).contains(&mean), "{report}");

    // As the identity metric of a training run (the host differentiates through `backward`).
    let out = dir.join("run");
    let log = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(&krate)
        .args(tiny_train_args(&out, 3))
        .args(["--metric", name, "--l_face", "0.1"])
        .ok();
    assert!(log.contains("training finished: 3 optimizer steps"), "{log}");
    let vals: Vec<serde_json::Value> = read_metrics(&out).into_iter().filter(|r| r["type"] == "val").collect();
    assert!(!vals.is_empty(), "{log}");
    for v in &vals {
        let s = v["identity_similarity"].as_f64().unwrap_or_else(|| panic!("no identity_similarity in {v}"));
        assert!((-1.0..=1.0).contains(&s), "{v}");
    }
}

#[test]
fn issue_14_scaffolded_loss_trains_as_the_content_loss() {
    const T: &str = "issue_14_scaffolded_loss_trains_as_the_content_loss";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("scaffold-loss");
    let name = "my-charbonnier";
    let krate = scaffold(&dir, name, "loss", false);
    build(&krate, name, &[]);
    unit_tests(&krate, &[]);
    assert_eq!(manifest_of(&dir, &krate, &lib_name(name)), std::fs::read_to_string(krate.join("plugin.toml")).unwrap());
    checks_clean(&dir, &krate, name);

    let out = dir.join("run");
    let log = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(&krate)
        .args(tiny_train_args(&out, 3))
        .args(["--loss", name])
        .ok();
    assert!(log.contains("training finished: 3 optimizer steps"), "{log}");
    for (step, r) in train_records(&out) {
        let (loss, term) = (r["loss"].as_f64().unwrap_or(f64::NAN), r["terms"][name].as_f64());
        let term = term.unwrap_or_else(|| panic!("step {step}: no `{name}` term in {r}"));
        // loss.weight is 1: the logged loss is the plugin's value (1e-12: serde_json's last digit).
        assert!((term - loss).abs() <= 1e-12 * loss.abs().max(1.0) && (1e-3..1.0).contains(&term), "step {step}: {r}");
    }
}

/// The libtorch model: built like the libtorch plugins of this repository (LIBTORCH_USE_PYTORCH
/// with the reference venv's torch), so it runs where they do (scripts/test.sh, CI).
#[test]
fn issue_14_scaffolded_torch_model_builds_out_of_tree_and_trains() {
    const T: &str = "issue_14_scaffolded_torch_model_builds_out_of_tree_and_trains";
    let (Some(()), Some(_), Some(python)) = (built_or_skip(T), demo_bundles_or_skip(T), python_or_skip(T)) else {
        return;
    };
    let dir = Dir::new("scaffold-torch");
    let name = "my-torch-model";
    let krate = scaffold(&dir, name, "model", true);
    // torch-sys asks `python` for torch's libtorch: the venv's comes first on PATH.
    let path = format!("{}:{}", python.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let envs = [("LIBTORCH_USE_PYTORCH", "1".to_string()), ("PATH", path)];
    build(&krate, name, &envs);
    // The written manifest has no [requires] libtorch (unknown before the build); the library's has.
    let written = std::fs::read_to_string(krate.join("plugin.toml")).unwrap();
    let from_lib = manifest_of(&dir, &krate, &lib_name(name));
    let m = Manifest::parse(&from_lib, &krate.join("plugin.toml")).unwrap();
    assert!(m.requires.libtorch.is_some(), "{from_lib}");
    let before_requires = |t: &str| t.split("[requires]").next().unwrap().to_string();
    assert_eq!(before_requires(&from_lib), before_requires(&written));
    std::fs::write(krate.join("plugin.toml"), &from_lib).unwrap();
    checks_clean(&dir, &krate, name);

    let out = dir.join("run");
    let log = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(&krate)
        .args(["train", "--plugin", name, "--data"])
        .arg(demo_bundles())
        .arg("--output")
        .arg(&out)
        .args(["--steps", "3", "--batch-size", "4", "--lr", "0.05", "--no-progress", "--set", "data.image_size=32"])
        .ok();
    assert!(log.contains("training finished: 3 optimizer steps"), "{log}");
    for (s, r) in train_records(&out) {
        let g = r["grad_norm"].as_f64().unwrap_or(f64::NAN);
        assert!(r["loss"].as_f64().is_some_and(f64::is_finite) && g.is_finite() && g > 0.0, "step {s}: {r}");
    }
}

/// Every manifest checked into this repository says what its library says (`plugins manifest`
/// on the staged library, compared field by field; runtime versions by their base version, so
/// a CUDA or CPU build of the same libtorch agrees). A summary that drifts only warns when the
/// plugin is loaded: this is where it fails.
#[test]
fn issue_14_checked_in_manifests_are_what_their_libraries_say() {
    const T: &str = "issue_14_checked_in_manifests_are_what_their_libraries_say";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("manifest-from-library");
    let repo = repo_root();
    let mut sources: Vec<PathBuf> = ["plugins", "plugins/testing"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo.join(d)).unwrap().map(|e| e.unwrap().path().join("plugin.toml")))
        .filter(|p| p.is_file())
        .collect();
    sources.push(repo.join("plugins/testing/abi-1.0/model/plugin.toml"));
    // Fixtures that exist to be refused when opened.
    let refused = ["testing-abi-mismatch", "testing-layout-mismatch"];
    let base = |v: &Option<String>| v.as_deref().map(|v| v.split('+').next().unwrap().to_string());
    let mut compared = 0;
    for src in &sources {
        let checked_in = Manifest::read(src).unwrap();
        let staged = [staged_plugins(), staged_test_plugins()]
            .iter()
            .map(|d| d.join(&checked_in.id))
            .find(|d| d.join("plugin.toml").is_file())
            .unwrap_or_else(|| panic!("{} is not staged: run scripts/build.sh", src.display()));
        let lib = checked_in.library.file_name().unwrap().to_string_lossy().into_owned();
        let o = TestCommand::host(&dir).current_dir(&staged).args(["plugins", "manifest", &lib]).output();
        if refused.contains(&checked_in.id.as_str()) {
            assert!(!o.status.success(), "{} must be refused", checked_in.id);
            continue;
        }
        assert!(o.status.success(), "{}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        let lib_says = Manifest::parse(&text, src).unwrap();
        let fields = |m: &Manifest| {
            (m.id.clone(), m.kind, m.version.clone(), m.abi.to_string(), m.library.clone(), m.summary.clone())
        };
        assert_eq!(fields(&checked_in), fields(&lib_says), "{} against its library:\n{text}", src.display());
        let r = |m: &Manifest| (base(&m.requires.libtorch), base(&m.requires.onnxruntime), base(&m.requires.cuda));
        assert_eq!(r(&checked_in), r(&lib_says), "{} [requires] against its library:\n{text}", src.display());
        compared += 1;
    }
    assert!(compared >= 12, "{compared} manifests compared");
}

/// The frozen ABI-1.0 fixture's model, its code unchanged, rebuilt against today's SDK.
#[test]
fn issue_14_plugin_rebuilt_against_a_newer_sdk_loads_and_trains_with_warnings() {
    const T: &str = "issue_14_plugin_rebuilt_against_a_newer_sdk_loads_and_trains_with_warnings";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let repo = repo_root();
    let dir = Dir::new("rebuilt-sdk");
    let name = "likeness-testing-abi10-model";
    let krate = dir.mkdir("abi10-model");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::copy(repo.join("plugins/testing/abi-1.0/model/src/lib.rs"), krate.join("src/lib.rs")).unwrap();
    std::fs::copy(repo.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    let sdk = serde_json::Value::String(repo.join("core/sdk").to_string_lossy().into_owned());
    std::fs::write(
        krate.join("Cargo.toml"),
        format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nlikeness-sdk = {{ path = {sdk} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n[workspace]\n"),
    )
    .unwrap();
    // The manifest as the author wrote it for SDK 1.0, the summary worded differently.
    let old = std::fs::read_to_string(repo.join("plugins/testing/abi-1.0/model/plugin.toml")).unwrap();
    assert!(old.contains("abi = \"1.0\""), "{old}");
    let old = old.replace(
        "library = \"liblikeness_testing_abi10_model.so\"",
        "library = \"target/release/liblikeness_testing_abi10_model.so\"",
    );
    let reworded = old.replace(
        "summary = \"Test fixture: per-channel affine model built for ABI 1.0\"",
        "summary = \"per-channel gain and offset\"",
    );
    assert_ne!(reworded, old);
    std::fs::write(krate.join("plugin.toml"), &reworded).unwrap();
    build(&krate, name, &[]);

    let fix = format!("host plugins manifest {}", krate.join("target/release").join(lib_name(name)).display());
    let check = TestCommand::host(&dir).arg("--plugin-dir").arg(&krate).args(["plugins", "check"]).ok();
    assert!(check.contains("ok    testing-abi10-model (model plugin"), "{check}");
    for want in
        ["says abi = \"1.0\" but its library was built for ABI 1.1", "`plugin.summary` \"per-channel gain and offset\""]
    {
        let line = check.lines().find(|l| l.contains(want)).unwrap_or_else(|| panic!("no warning `{want}`:\n{check}"));
        assert!(line.contains("WARN") && line.contains(&fix) && line.contains("--library target/release/"), "{line}");
    }
    let out = dir.join("run");
    let log = TestCommand::host(&dir)
        .arg("--plugin-dir")
        .arg(&krate)
        .args(["train", "--plugin", "testing-abi10-model", "--data"])
        .arg(demo_bundles())
        .arg("--output")
        .arg(&out)
        .args(["--steps", "2", "--batch-size", "4", "--no-progress", "--set", "data.image_size=32"])
        .ok();
    assert!(log.contains("training finished: 2 optimizer steps"), "{log}");

    // The printed fix, run as printed, leaves a manifest that loads without a warning.
    let mut m = TestCommand::host(&dir);
    m.args(["plugins", "manifest"]).arg(krate.join("target/release").join(lib_name(name)));
    m.args(["--library", &format!("target/release/{}", lib_name(name))]);
    let o = m.output();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(krate.join("plugin.toml"), &o.stdout).unwrap();
    checks_clean(&dir, &krate, "testing-abi10-model");

    // An id or version difference, or a manifest ABI newer than the library's, stays an error,
    // with the same fix.
    let text = String::from_utf8(o.stdout).unwrap();
    for (from, to, says) in [
        ("id = \"testing-abi10-model\"", "id = \"renamed\"", "says `renamed` (`plugin.id`)"),
        ("version = \"0.1.0\"", "version = \"0.2.0\"", "says `0.2.0` (`plugin.version`)"),
        ("abi = \"1.1\"", "abi = \"1.2\"", "says abi = \"1.2\" (`plugin.abi`)"),
    ] {
        assert!(text.contains(from), "{text}");
        std::fs::write(krate.join("plugin.toml"), text.replace(from, to)).unwrap();
        let out = TestCommand::host(&dir).arg("--plugin-dir").arg(&krate).args(["plugins", "check"]).fails();
        let line = out.lines().find(|l| l.starts_with("FAIL  ")).unwrap_or_else(|| panic!("{out}"));
        assert!(line.contains(&fix) && line.contains(says), "{to}: {line}");
    }
}
