//! A third-party loss plugin, written and built outside this workspace against `likeness-sdk`
//! only, is found with `--plugin-dir` and trains with the already-built `host` — which is not
//! rebuilt (issue 2: "users swap backbones by changing a config line, never by rebuilding the
//! host").
//!
//! The crate is generated in a temporary directory with its own `[workspace]` table, so cargo
//! treats it as a project of its own; it takes the workspace's `Cargo.lock` so the dependency
//! versions are the ones this repository pins, and builds into `target/third-party` (kept
//! between runs so abi_stable & co. compile once).

use std::time::Instant;

use likeness_tests::{
    built_or_skip, demo_bundles_or_skip, host_bin, repo_root, staged_plugins, train_records, Dir, FileStamp,
    TestCommand,
};

const CARGO_TOML: &str = r#"[package]
name = "charbonnier-loss"
version = "0.3.1"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
likeness-sdk = { path = "@SDK@" }

# Its own workspace: not a member of the one it happens to sit near.
[workspace]
"#;

const LIB_RS: &str = r#"//! Charbonnier loss: mean sqrt((p - t)^2 + eps^2), a smooth L1.
use likeness_sdk::serde_json;
use likeness_sdk::{
    err, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, Inputs, LossOutput, LossPlugin,
    PluginDescriptor, PluginKind,
};

pub struct Charbonnier {
    eps: f64,
}

impl LossPlugin for Charbonnier {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new("charbonnier", PluginKind::Loss, env!("CARGO_PKG_VERSION"))
            .summary("Charbonnier loss mean(sqrt((p - t)^2 + eps^2))")
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .config_schema(serde_json::json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {"eps": {"type": "number", "exclusiveMinimum": 0, "default": 0.001}}
            }))
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        let json = if config_json.trim().is_empty() { "{}" } else { config_json };
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| err::config(format!("charbonnier: {e}")))?;
        let obj = v.as_object().ok_or_else(|| err::config("charbonnier: config must be an object"))?;
        if let Some(k) = obj.keys().find(|k| k.as_str() != "eps") {
            return Err(err::config(format!("charbonnier: unknown key `{k}` (valid: eps)")));
        }
        let eps = obj.get("eps").map(|e| e.as_f64().unwrap_or(f64::NAN)).unwrap_or(1e-3);
        if !(eps.is_finite() && eps > 0.0) {
            return Err(err::config("charbonnier: `eps` must be a number > 0"));
        }
        Ok(Charbonnier { eps })
    }

    fn input_names(&self) -> Vec<String> {
        vec!["prediction".into(), "target".into()]
    }

    fn value_and_grad(&mut self, inputs: Inputs<'_>, want_grad: bool) -> likeness_sdk::Result<LossOutput> {
        let p = CpuTensor::<f32>::from_view(inputs.get("prediction")?, "prediction")?;
        let t = CpuTensor::<f32>::from_view(inputs.get("target")?, "target")?;
        if p.shape != t.shape {
            return Err(err::input(format!("charbonnier: prediction {:?} and target {:?} differ in shape", p.shape, t.shape)));
        }
        let n = p.data.len().max(1) as f64;
        let e2 = self.eps * self.eps;
        let mut sum = 0.0f64;
        let mut grad = Vec::with_capacity(if want_grad { p.data.len() } else { 0 });
        for (a, b) in p.data.iter().zip(&t.data) {
            let d = *a as f64 - *b as f64;
            let r = (d * d + e2).sqrt();
            sum += r;
            if want_grad {
                grad.push((d / r / n) as f32);
            }
        }
        let value = sum / n;
        let grads = if want_grad { vec![("prediction".to_string(), CpuTensor::new(p.shape.clone(), grad).into_managed())] } else { vec![] };
        Ok(LossOutput { value, terms: vec![("charbonnier".into(), value)], grads })
    }
}

likeness_sdk::export_loss_plugin!(Charbonnier);
"#;

const PLUGIN_TOML: &str = r#"[plugin]
id = "charbonnier"
kind = "loss"
version = "0.3.1"
abi = "1.1"
library = "libcharbonnier_loss.so"
summary = "Charbonnier loss mean(sqrt((p - t)^2 + eps^2))"
"#;

/// `[dependencies]` of a Cargo.toml, as (name, spec) pairs — a tiny line parser, enough for the
/// file this test writes.
fn dependencies(cargo_toml: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in cargo_toml.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l == "[dependencies]" || l.ends_with("dependencies]");
            continue;
        }
        if in_deps && !l.is_empty() && !l.starts_with('#') {
            out.push(l.split('=').next().unwrap().trim().to_string());
        }
    }
    out
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

#[test]
fn issue_2_third_party_plugin_built_outside_the_workspace_trains_with_the_unchanged_host() {
    const T: &str = "issue_2_third_party_plugin_built_outside_the_workspace_trains_with_the_unchanged_host";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let repo = repo_root();
    let dir = Dir::new("third-party");
    let krate = dir.mkdir("charbonnier-loss");
    let sdk = repo.join("core/sdk");
    let cargo_toml = CARGO_TOML.replace("@SDK@", &sdk.to_string_lossy());
    std::fs::write(krate.join("Cargo.toml"), &cargo_toml).unwrap();
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(krate.join("src/lib.rs"), LIB_RS).unwrap();
    std::fs::write(krate.join("plugin.toml"), PLUGIN_TOML).unwrap();
    // Same dependency versions as the workspace (cargo drops the entries it does not need).
    std::fs::copy(repo.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();

    // The plugin depends on the SDK and nothing else.
    assert_eq!(dependencies(&cargo_toml), ["likeness-sdk"], "{cargo_toml}");
    assert!(!krate.starts_with(&repo), "the plugin crate must live outside the repository: {}", krate.display());

    let host = host_bin();
    let before = FileStamp::of(&host);

    let target_dir = repo.join("target/third-party");
    let t0 = Instant::now();
    let mut build = TestCommand::new(cargo());
    build.current_dir(&krate).args(["build", "--release", "--offline", "--quiet"]).env("CARGO_TARGET_DIR", &target_dir);
    build.ok();
    let build_s = t0.elapsed().as_secs_f64();
    let so = target_dir.join("release/libcharbonnier_loss.so");
    assert!(so.is_file(), "{} was not built", so.display());
    eprintln!("third-party plugin built in {build_s:.1} s ({})", so.display());

    // Install: a folder with the manifest and the library, like any plugin.
    let plugins = dir.mkdir("my-plugins/charbonnier");
    std::fs::copy(krate.join("plugin.toml"), plugins.join("plugin.toml")).unwrap();
    std::fs::copy(&so, plugins.join("libcharbonnier_loss.so")).unwrap();
    let plugin_root = dir.join("my-plugins");

    // Discovery sees it, and the full check (open, ABI, layout, descriptor) passes.
    let list = TestCommand::host(&dir).args(["plugins", "list", "--plugin-dir"]).arg(&plugin_root).ok();
    assert!(list.contains("charbonnier") && list.contains("loss"), "{list}");
    let inspect =
        TestCommand::host(&dir).args(["plugins", "inspect", "charbonnier", "--plugin-dir"]).arg(&plugin_root).ok();
    assert!(inspect.contains("differentiable: true") && inspect.contains("0.3.1"), "{inspect}");

    let out = dir.join("run");
    let t1 = Instant::now();
    let mut train = TestCommand::host(&dir);
    train
        .arg("--plugin-dir")
        .arg(&plugin_root)
        .arg("--plugin-dir")
        .arg(staged_plugins())
        .args(likeness_tests::tiny_train_args(&out, 3))
        .args(["--loss", "charbonnier"]);
    let log = train.ok();
    let train_s = t1.elapsed().as_secs_f64();
    assert!(log.contains("training finished: 3 optimizer steps"), "{log}");
    assert!(out.join("final/model.safetensors").is_file());

    let records = train_records(&out);
    assert_eq!(records.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3], "train records of {}", out.display());
    for (step, r) in &records {
        let loss = r["loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite() && loss > 0.0, "step {step}: loss {loss} ({r})");
        let term =
            r["terms"]["charbonnier"].as_f64().unwrap_or_else(|| panic!("step {step}: no `charbonnier` term in {r}"));
        // loss.weight defaults to 1: the logged loss is the plugin's value (1.0 · term is exact;
        // 1e-12 only admits serde_json's last-digit misrounding of an f64, ~1e-16).
        assert!((term - loss).abs() <= 1e-12 * loss.abs().max(1.0), "step {step}: term {term} vs loss {loss}");
        // Charbonnier ≥ eps and ≈ mean |p − t| for images in [0, 1] (a range, not a tolerance).
        assert!((1e-3..1.0).contains(&term), "step {step}: {term}");
    }
    let run_record = likeness_tests::read_metrics(&out).into_iter().find(|r| r["type"] == "run").unwrap();
    assert_eq!(run_record["loss"], "charbonnier", "{run_record}");

    // The host was not rebuilt or touched.
    let after = FileStamp::of(&host);
    assert_eq!(before, after, "{} changed while the third-party plugin was built and used", host.display());
    eprintln!(
        "third-party plugin: build {build_s:.1} s, train 3 steps {train_s:.1} s, losses {:?}; host {} unchanged ({} bytes)",
        records.iter().map(|(_, r)| r["loss"].as_f64().unwrap()).collect::<Vec<_>>(),
        host.display(),
        after.len
    );
}
