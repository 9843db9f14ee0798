//! ABI 1.1 is a minor bump: a plugin built for ABI 1.0 keeps loading and training in the 1.1
//! host, and a 1.1-only method called on it is an error sentence, never a crash (DESIGN.md
//! invariant 7).
//!
//! The 1.0 plugin is `testing-abi10-model` (`plugins/testing/abi-1.0/model`), built by
//! `scripts/build.sh` against a frozen byte-exact copy of the 1.0 `likeness-abi`/`likeness-sdk`
//! in a workspace of its own, and staged into `target/release/test-plugins/`. Its root module
//! ends at the 1.0 `load_state` and it was compiled with 1.0's `missing_field(panic)`; the 1.1
//! host reads the appended fields as absent.
//!
//! The last test drives the 1.1 fixture `testing-flow` through the same engine API, so that
//! every appended call is seen to cross the boundary of a real library, not only the SDK's
//! trait methods its unit tests call.

use likeness_abi::{CpuTensor, Device, ForwardMode, OptimizerStep, SampleRequest, StepContext};
use likeness_engine::abi_stable::std_types::{RSlice, RStr};
use likeness_engine::plugins::{Model, Registry, SearchDir, SearchSource};
use likeness_tests::{
    built_or_skip, demo_bundles, demo_bundles_or_skip, staged_plugins, staged_test_plugins, train_records, Dir,
    TestCommand,
};

const ABI10: &str = "testing-abi10-model";
const FLOW: &str = "testing-flow";

fn registry() -> Registry {
    Registry::discover(vec![
        SearchDir { path: staged_plugins(), source: SearchSource::Flag },
        SearchDir { path: staged_test_plugins(), source: SearchSource::Flag },
    ])
}

/// `host --plugin-dir target/release/test-plugins ARGS…` (the real plugins are found next to
/// the executable).
fn host(dir: &Dir, args: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_test_plugins()).args(args);
    t
}

fn step(n: u64) -> OptimizerStep {
    OptimizerStep { step: n, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0 }
}

fn missing(method: &str) -> String {
    format!("plugin {ABI10} was built for ABI 1.0, which has no `{method}`")
}

fn request<'a>(prompts: &'a [RStr<'a>]) -> SampleRequest<'a> {
    SampleRequest {
        prompts: RSlice::from_slice(prompts),
        negative_prompts: RSlice::from_slice(&[]),
        images: RSlice::from_slice(&[]),
        width: 8,
        height: 8,
        steps: 2,
        guidance: 0.0,
        seed: 3,
        adapter_scale: 1.0,
    }
}

#[test]
fn abi10_plugin_inspects_as_abi_1_0() {
    const T: &str = "abi10_plugin_inspects_as_abi_1_0";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("abi10-inspect");
    let out = host(&dir, &["plugins", "inspect", ABI10]).ok();
    for want in [
        format!("id:             {ABI10}"),
        "kind:           model".into(),
        "abi:            1.0".into(),
        "differentiable: true".into(),
    ] {
        assert!(out.contains(&want), "`plugins inspect {ABI10}` lacks `{want}`:\n{out}");
    }
    let list = host(&dir, &["plugins", "list"]).ok();
    let row: Vec<&str> = list
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&ABI10))
        .unwrap_or_else(|| panic!("`plugins list` has no row for {ABI10}:\n{list}"));
    assert_eq!(&row[1..4], ["model", "0.1.0", "1.0"], "{list}");
    let check = host(&dir, &["plugins", "check"]).output();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains(&format!("ok    {ABI10} (model plugin")), "{text}");
}

#[test]
fn abi10_plugin_trains_in_the_1_1_host() {
    const T: &str = "abi10_plugin_trains_in_the_1_1_host";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("abi10-train");
    let out = dir.join("run");
    let steps = 4u64;
    let data = demo_bundles();
    let log = host(
        &dir,
        &[
            "train",
            "--plugin",
            ABI10,
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
            "--batch-size",
            "4",
            "--lr",
            "0.05",
            "--no-progress",
            "--set",
            "data.image_size=32",
        ],
    )
    .ok();
    let records = train_records(&out);
    assert_eq!(records.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=steps).collect::<Vec<_>>(), "{log}");
    for (s, r) in &records {
        let loss = r["loss"].as_f64().unwrap_or_else(|| panic!("step {s} has no loss: {r}"));
        assert!(loss.is_finite() && loss > 0.0, "step {s}: loss {loss}");
    }
    // The final weights are the plugin's own file, and training moved them: the gain/offset
    // init is 1 ± 0.1 and ±0.05, and four AdamW steps at lr 0.05 move each by up to 0.2.
    let weights = out.join("final/model.safetensors");
    let (tensors, meta) =
        likeness_sdk::st::load(&weights).unwrap_or_else(|e| panic!("{}: {e}\n{log}", weights.display()));
    assert_eq!(meta.get("likeness.plugin").map(String::as_str), Some(ABI10));
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    for t in &tensors {
        assert_eq!(t.shape, [3]);
        assert!(t.to_f32().unwrap().iter().all(|v| v.is_finite()));
    }
    let mut fresh = registry().open_model(ABI10, "{}", Device::CPU, 0).unwrap();
    let init = Dir::new("abi10-init");
    fresh.save_state(init.path(), false).unwrap();
    let (init_tensors, _) = likeness_sdk::st::load(&init.join("model.safetensors")).unwrap();
    assert_ne!(init_tensors, tensors, "four training steps left the weights at their initial values");
}

/// Every method appended in 1.1 reads as absent on the 1.0 plugin: the ones with a 1.0
/// fallback use it (interface, forward_batch, backward_scaled, optimizer_step_groups with no
/// groups), the others are the sentence naming the plugin, its ABI and the method.
#[test]
fn abi10_plugin_names_the_missing_1_1_methods() {
    const T: &str = "abi10_plugin_names_the_missing_1_1_methods";
    let Some(()) = built_or_skip(T) else { return };
    let reg = registry();
    let lib = reg.open_model_library(ABI10).unwrap();
    assert_eq!(lib.abi.to_string(), "1.0");
    let i = lib.interface("{}").unwrap();
    assert_eq!(i.images.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["reference", "target"]);
    assert!(!i.can_sample && i.encodings.is_empty() && i.texts.is_empty());
    let mut m: Model = lib.create("{}", Device::CPU, 1).unwrap();

    let x = CpuTensor::new(vec![2, 3, 4, 4], likeness_sdk::testing::uniform_f32(1, 96, 0.2, 0.8));
    let seeds = [7u64, 8];
    let ctx = StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
    let captions = ["a".to_string(), "b".to_string()];
    let out =
        m.forward_batch(&[("reference", x.view())], &[("caption", &captions[..])], ctx, ForwardMode::Train).unwrap();
    let px = out.outputs.cpu(ABI10, "pixels").unwrap();
    assert_eq!(px.shape, x.shape);
    let g = CpuTensor::new(x.shape.clone(), vec![1.0f32; 96]);
    m.backward_scaled(&[("pixels", g.view(), 0.5), ("pixels", g.view(), 0.25)], 0.0).unwrap();
    m.optimizer_step_groups(step(1), &[]).unwrap();

    let e = m.optimizer_step_groups(step(2), &[("unet".into(), 1e-3, 0.0)]).unwrap_err().to_string();
    assert!(e.contains(&missing("optimizer_step_groups")), "{e}");
    let prompts = [RStr::from_str("a photo")];
    let e = m.sample(request(&prompts)).unwrap_err().to_string();
    assert!(e.contains(&missing("sample")), "{e}");
    let out = Dir::new("abi10-export");
    let e = m.export_adapter(out.path(), "kohya", &serde_json::json!({})).unwrap_err().to_string();
    assert!(e.contains(&missing("export_adapter")), "{e}");
    let e = m.encode("latents", &[("target", x.view())], &[]).err().unwrap().to_string();
    assert!(e.contains(&missing("encode")), "{e}");
}

/// The same sentence through the real `host generate`.
#[test]
fn abi10_plugin_cannot_generate_and_says_why() {
    const T: &str = "abi10_plugin_cannot_generate_and_says_why";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("abi10-generate");
    let gen = dir.join("gen");
    let out = host(
        &dir,
        &[
            "generate",
            "--plugin",
            ABI10,
            "--prompt",
            "a photo",
            "--width",
            "16",
            "--height",
            "16",
            "--output",
            gen.to_str().unwrap(),
        ],
    )
    .fails();
    assert!(out.contains(&missing("sample")), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

/// Every 1.1 call of the `testing-flow` fixture through its real library: texts and the step
/// context in, `pixels`/`timesteps`/internal loss out, `encode` in place of the sources,
/// `backward_scaled`, parameter groups, `sample`, `export_adapter`, and state round trips.
#[test]
fn flow_fixture_exercises_every_1_1_call_through_the_abi() {
    const T: &str = "flow_fixture_exercises_every_1_1_call_through_the_abi";
    let Some(()) = built_or_skip(T) else { return };
    let reg = registry();
    let lib = reg.open_model_library(FLOW).unwrap();
    assert_eq!(lib.abi.to_string(), "1.1");
    let i = lib.interface(r#"{"latent_scale": 0.5}"#).unwrap();
    assert!(i.internal_loss && i.can_sample);
    assert_eq!(i.param_groups.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["unet", "text_encoder"]);
    let e = lib.interface(r#"{"latent_scal": 0.5}"#).unwrap_err().to_string();
    assert!(e.contains("latent_scal"), "{e}");
    let mut m = lib.create(r#"{"latent_scale": 0.5}"#, Device::CPU, 4).unwrap();

    let (n, h, w) = (2usize, 4usize, 6usize);
    let x = CpuTensor::new(
        vec![n as i64, 3, h as i64, w as i64],
        likeness_sdk::testing::uniform_f32(2, n * 3 * h * w, 0.0, 1.0),
    );
    let captions = ["a smiling face".to_string(), "a face in the rain".to_string()];
    let seeds: Vec<u64> = (0..n as u64).map(|i| likeness_abi::sample_seed(11, 1, 0, i)).collect();
    let ctx = || StepContext { optimizer_step: 1, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };

    // encode → forward_batch from the encodings = forward_batch from the sources, bit for bit.
    let lat = m.encode("latents", &[("target", x.view())], &[]).unwrap().cpu(FLOW, "latents").unwrap();
    let emb =
        m.encode("text_embeddings", &[], &[("caption", &captions[..])]).unwrap().cpu(FLOW, "text_embeddings").unwrap();
    assert_eq!((lat.shape.clone(), emb.shape.clone()), (vec![2, 3, 2, 3], vec![2, 8]));
    let raw =
        m.forward_batch(&[("target", x.view())], &[("caption", &captions[..])], ctx(), ForwardMode::Eval).unwrap();
    let cached = m
        .forward_batch(&[("latents", lat.view()), ("text_embeddings", emb.view())], &[], ctx(), ForwardMode::Train)
        .unwrap();
    for name in ["pixels", "timesteps"] {
        assert_eq!(raw.outputs.cpu(FLOW, name).unwrap(), cached.outputs.cpu(FLOW, name).unwrap(), "{name}");
    }
    assert_eq!(raw.internal_loss, cached.internal_loss);
    let loss = cached.internal_loss.expect("internal loss");
    assert!(loss.is_finite() && loss > 0.0);
    let t = cached.outputs.cpu(FLOW, "timesteps").unwrap();
    assert!(t.data.iter().all(|t| (0.02..=0.98).contains(t)), "{:?}", t.data);

    // Train needs the seeds.
    let e = m
        .forward_batch(&[("target", x.view())], &[("caption", &captions[..])], StepContext::NONE, ForwardMode::Train)
        .err()
        .unwrap();
    assert!(e.to_string().contains("ctx.sample_seeds"), "{e}");

    let px = cached.outputs.cpu(FLOW, "pixels").unwrap();
    let g = CpuTensor::new(px.shape.clone(), px.data.iter().map(|p| p - 0.5).collect());
    m.backward_scaled(&[("pixels", g.view(), 0.5)], 1.0).unwrap();
    let r = m.optimizer_step_groups(step(1), &[("text_encoder".into(), 1e-3, 0.0)]).unwrap();
    assert!(r.grad_norm.is_finite() && r.grad_norm > 0.0);
    m.zero_grad().unwrap();
    let e = m.optimizer_step_groups(step(2), &[("vae".into(), 1e-3, 0.0)]).unwrap_err().to_string();
    assert!(e.contains("no parameter group `vae`"), "{e}");

    let prompts = [RStr::from_str("a smiling face"), RStr::from_str("a face in the rain")];
    let s = CpuTensor::<f32>::from_managed(&m.sample(request(&prompts)).unwrap(), "sample").unwrap();
    assert_eq!(s.shape, [2, 3, 8, 8]);
    assert!(s.data.iter().all(|v| (0.0..=1.0).contains(v)));

    let out = Dir::new("flow-export");
    let files = m.export_adapter(out.path(), "kohya", &serde_json::json!({"ss_output_name": "alice"})).unwrap();
    assert_eq!(files, [out.join("adapter.safetensors")]);
    let (tensors, meta) = likeness_sdk::st::load(&files[0]).unwrap();
    assert!(tensors.iter().any(|t| t.name == "lora_unet_proj.lora_up.weight"));
    assert_eq!(meta.get("ss_output_name").map(String::as_str), Some("alice"));
    assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("3"));
    let e = m.export_adapter(out.path(), "comfyui", &serde_json::json!({})).unwrap_err().to_string();
    assert!(e.contains("kohya, diffusers, peft"), "{e}");

    // State round trip: a new instance (another seed) continues identically.
    let state = Dir::new("flow-state");
    m.save_state(state.path(), true).unwrap();
    let mut m2 = lib.create(r#"{"latent_scale": 0.5}"#, Device::CPU, 99).unwrap();
    m2.load_state(state.path()).unwrap();
    let a = CpuTensor::<f32>::from_managed(&m.sample(request(&prompts)).unwrap(), "a").unwrap();
    let b = CpuTensor::<f32>::from_managed(&m2.sample(request(&prompts)).unwrap(), "b").unwrap();
    assert_eq!(a, b);
}
