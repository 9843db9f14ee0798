//! Unit tests through the plugin's trait methods (the ABI shims are exercised by the e2e
//! tests through the real `host`).

use likeness_sdk::abi::{sample_seed, NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};

use super::*;

const CAPTIONS: [&str; 2] = ["a person smiling", "a person in the rain"];

fn model(config: &str, seed: u64) -> FlowFixture {
    FlowFixture::create(config, Device::CPU, seed).unwrap()
}

/// A deterministic `[n, 3, h2, w2]` image batch in [0, 1].
fn images(n: usize, h2: usize, w2: usize, seed: u64) -> CpuTensor<f32> {
    let data = likeness_sdk::testing::uniform_f32(seed, n * C * h2 * w2, 0.0, 1.0);
    CpuTensor::new(vec![n as i64, C as i64, h2 as i64, w2 as i64], data)
}

fn step(n: u64) -> OptimizerStep {
    OptimizerStep { step: n, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: 1.0 }
}

fn seeds(run: u64, step: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| sample_seed(run, step, 0, i)).collect()
}

fn ctx(seeds: &[u64], step: u64) -> StepContext<'_> {
    StepContext { optimizer_step: step, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(seeds) }
}

struct Out {
    pixels: CpuTensor<f32>,
    timesteps: CpuTensor<f32>,
    loss: f64,
}

fn run(
    m: &mut FlowFixture,
    views: &[NamedView<'_>],
    texts: &[NamedTexts<'_>],
    c: &StepContext<'_>,
    mode: ForwardMode,
) -> Result<Out> {
    let out =
        m.forward_batch(Inputs::new(RSlice::from_slice(views)), Texts::new(RSlice::from_slice(texts)), c, mode)?;
    let get = |name: &str| {
        let t = &out.outputs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1;
        CpuTensor::<f32>::from_managed(t, name).unwrap()
    };
    Ok(Out { pixels: get("pixels"), timesteps: get("timesteps"), loss: out.internal_loss.expect("internal loss") })
}

fn view<'a>(name: &'a str, t: &CpuTensor<f32>) -> NamedView<'a> {
    NamedView { name: RStr::from_str(name), view: t.view() }
}

fn caption_texts<'a>(strs: &'a [RStr<'a>]) -> [NamedTexts<'a>; 1] {
    [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(strs) }]
}

fn rstrs<'a>(s: &[&'a str]) -> Vec<RStr<'a>> {
    s.iter().map(|s| RStr::from_str(s)).collect()
}

/// One Train forward + backward with `pixels` gradients split into two scaled views and a
/// `timesteps` gradient (which must contribute nothing), against central differences of
/// `J(θ) = Σ (s1·g1 + s2·g2)·pixels + w·L` computed with the f64 helpers on the same draws.
///
/// Tolerance: `J` is quadratic in θ, so central differences are exact up to cancellation,
/// ≈ 2⁻⁵²·|J|/h ≈ 2e-16·100/1e-4 = 2e-10 here; the gradients handed to backward are f32
/// values, but the objective uses those same values (as f64, summed in the same order), so
/// f32 rounding does not enter. Bound: 1e-8·max(1, |grad|).
#[test]
fn backward_scaled_is_the_exact_vjp() {
    let (n, h2, w2) = (2, 4, 6);
    let mut m = model(r#"{"latent_scale": 0.8}"#, 11);
    let target = images(n, h2, w2, 3);
    let strs = rstrs(&CAPTIONS);
    let sd = seeds(7, 1, n);
    let out = run(&mut m, &[view("target", &target)], &caption_texts(&strs), &ctx(&sd, 1), ForwardMode::Train).unwrap();
    assert_eq!(out.pixels.shape, vec![n as i64, 3, h2 as i64, w2 as i64]);
    let numel = n * C * h2 * w2;
    let g1 = CpuTensor::new(out.pixels.shape.clone(), likeness_sdk::testing::uniform_f32(21, numel, -1.0, 1.0));
    let g2 = CpuTensor::new(out.pixels.shape.clone(), likeness_sdk::testing::uniform_f32(22, numel, -1.0, 1.0));
    let gt = CpuTensor::new(vec![n as i64], vec![5.0f32, -3.0]);
    let (s1, s2, w) = (0.5, 2.0, 0.7);
    let grads = [
        ScaledView { name: RStr::from_str("pixels"), view: g1.view(), scale: s1 },
        ScaledView { name: RStr::from_str("timesteps"), view: gt.view(), scale: 1.0 },
        ScaledView { name: RStr::from_str("pixels"), view: g2.view(), scale: s2 },
    ];
    m.backward_scaled(&grads, w).unwrap();
    let analytic = m.grad;

    let x: Vec<f64> = target.data.iter().map(|&v| v as f64).collect();
    let z0 = flow::encode_latents(&x, n, h2, w2, 0.8);
    let e: Vec<f64> = CAPTIONS.iter().flat_map(|s| flow::embed_text(s)).collect();
    let (t, eps): (Vec<f64>, Vec<Vec<f64>>) = sd.iter().map(|&s| flow::draw(s, C * h2 * w2 / 4)).unzip();
    let g: Vec<f64> = g1.data.iter().zip(&g2.data).map(|(a, b)| 0.0 + s1 * *a as f64 + s2 * *b as f64).collect();
    let dims = [n, h2 / 2, w2 / 2];
    let objective = |th: &[f64; N_PARAMS]| {
        let f = flow::forward(th, &z0, &e, dims, &t, &eps, true);
        let px = flow::decode(&f.x0_hat, dims, 0.8, false);
        px.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>() + w * f.loss
    };
    assert!(
        (objective(&m.theta) - w * out.loss - g.iter().zip(&out.pixels.data).map(|(a, b)| a * *b as f64).sum::<f64>())
            .abs()
            < 1e-3
    );
    let h = 1e-4;
    for k in 0..N_PARAMS {
        let (mut a, mut b) = (m.theta, m.theta);
        a[k] += h;
        b[k] -= h;
        let fd = (objective(&a) - objective(&b)) / (2.0 * h);
        assert!(
            (fd - analytic[k]).abs() <= 1e-8 * analytic[k].abs().max(1.0),
            "slot {k}: fd {fd} vs analytic {}",
            analytic[k]
        );
    }
    // Accumulates, and the pending forward was consumed.
    assert_eq!(m.backward_scaled(&grads, w).unwrap_err().code, ErrorCode::NoPendingForward);
    run(&mut m, &[view("target", &target)], &caption_texts(&strs), &ctx(&sd, 1), ForwardMode::Train).unwrap();
    m.backward_scaled(&grads, w).unwrap();
    for (g, a) in m.grad.iter().zip(&analytic) {
        assert_eq!(*g, a + a);
    }
}

#[test]
fn the_1_0_backward_is_backward_scaled_with_scale_one() {
    let mut a = model("{}", 2);
    let mut b = model("{}", 2);
    let target = images(1, 4, 4, 9);
    let strs = rstrs(&CAPTIONS[..1]);
    let sd = seeds(1, 1, 1);
    for m in [&mut a, &mut b] {
        run(m, &[view("target", &target)], &caption_texts(&strs), &ctx(&sd, 1), ForwardMode::Train).unwrap();
    }
    let g = images(1, 4, 4, 10);
    a.backward(Inputs::new(RSlice::from_slice(&[view("pixels", &g)])), 0.3).unwrap();
    b.backward_scaled(&[ScaledView { name: RStr::from_str("pixels"), view: g.view(), scale: 1.0 }], 0.3).unwrap();
    assert_eq!(a.grad, b.grad);
    assert!(a.grad.iter().any(|&v| v != 0.0));
}

#[test]
fn cached_encodings_give_bit_identical_results() {
    let (n, h2, w2) = (2, 4, 4);
    let mut m = model(r#"{"latent_scale": 0.5}"#, 4);
    let target = images(n, h2, w2, 5);
    let strs = rstrs(&CAPTIONS);
    let texts = caption_texts(&strs);
    let imgs = [view("target", &target)];
    let none = Texts::none();
    let latents = m.encode("latents", Inputs::new(RSlice::from_slice(&imgs)), none).unwrap();
    let embeds = m
        .encode("text_embeddings", Inputs::new(RSlice::from_slice(&[])), Texts::new(RSlice::from_slice(&texts)))
        .unwrap();
    let lat = CpuTensor::<f32>::from_managed(&latents[0].1, "latents").unwrap();
    let emb = CpuTensor::<f32>::from_managed(&embeds[0].1, "text_embeddings").unwrap();
    assert_eq!((latents[0].0.as_str(), lat.shape.clone()), ("latents", vec![2, 3, 2, 2]));
    assert_eq!((embeds[0].0.as_str(), emb.shape.clone()), ("text_embeddings", vec![2, 8]));
    let sd = seeds(3, 5, n);
    let raw = run(&mut m, &imgs, &texts, &ctx(&sd, 5), ForwardMode::Eval).unwrap();
    let cached =
        run(&mut m, &[view("latents", &lat), view("text_embeddings", &emb)], &[], &ctx(&sd, 5), ForwardMode::Eval)
            .unwrap();
    assert_eq!(raw.pixels, cached.pixels);
    assert_eq!(raw.timesteps, cached.timesteps);
    assert_eq!(raw.loss, cached.loss);
    // Unknown encodings are named.
    let e = m.encode("vae", Inputs::new(RSlice::from_slice(&imgs)), none).err().unwrap();
    assert!(e.message.contains("no encoding `vae`") && e.message.contains("latents, text_embeddings"), "{}", e.message);
}

#[test]
fn noise_and_timesteps_come_from_the_step_context_only() {
    let (n, h2, w2) = (3, 4, 4);
    let target = images(n, h2, w2, 6);
    let caps = ["x", "y", "z"];
    let strs = rstrs(&caps);
    let texts = caption_texts(&strs);
    let imgs = [view("target", &target)];
    let s1 = seeds(9, 1, n);
    let s2 = seeds(9, 2, n);
    let mut a = model("{}", 1);
    let mut b = model("{}", 1);
    let a1 = run(&mut a, &imgs, &texts, &ctx(&s1, 1), ForwardMode::Train).unwrap();
    let b1 = run(&mut b, &imgs, &texts, &ctx(&s1, 1), ForwardMode::Train).unwrap();
    assert_eq!(a1.pixels, b1.pixels);
    assert_eq!(a1.timesteps, b1.timesteps);
    assert_eq!(a1.loss, b1.loss);
    let a2 = run(&mut a, &imgs, &texts, &ctx(&s2, 2), ForwardMode::Train).unwrap();
    assert_ne!(a1.timesteps, a2.timesteps);
    assert_ne!(a1.pixels, a2.pixels);
    for (i, &t) in a1.timesteps.data.iter().enumerate() {
        assert!((flow::T_MIN as f32..=flow::T_MAX as f32).contains(&t), "t[{i}] = {t}");
        assert_eq!(t, flow::draw(s1[i], C * 4).0 as f32);
    }
    // Train without (or with mis-sized) seeds is an error; Eval falls back to t = 0.5, seed 0.
    let e = run(&mut a, &imgs, &texts, &StepContext::NONE, ForwardMode::Train).err().unwrap();
    assert!(e.message.contains("ctx.sample_seeds") && e.message.contains("got 0 for a batch of 3"), "{}", e.message);
    assert!(run(&mut a, &imgs, &texts, &ctx(&s1[..2], 1), ForwardMode::Train).is_err());
    assert!(run(&mut a, &imgs, &texts, &ctx(&s1[..2], 1), ForwardMode::Eval).is_err());
    let ev = run(&mut a, &imgs, &texts, &StepContext::NONE, ForwardMode::Eval).unwrap();
    assert_eq!(ev.timesteps.data, vec![0.5; n]);
    assert_eq!(ev.loss, run(&mut b, &imgs, &texts, &StepContext::NONE, ForwardMode::Eval).unwrap().loss);
}

#[test]
fn inputs_are_checked_with_messages() {
    let mut m = model(r#"{"image_size": 4}"#, 0);
    let t6 = images(1, 6, 6, 1);
    let strs = rstrs(&CAPTIONS[..1]);
    let sd = seeds(0, 1, 1);
    let e = run(&mut m, &[view("target", &t6)], &caption_texts(&strs), &ctx(&sd, 1), ForwardMode::Train).err().unwrap();
    assert!(e.message.contains("image_size = 4"), "{}", e.message);
    let t4 = images(1, 4, 4, 1);
    let e = run(&mut m, &[view("target", &t4)], &[], &ctx(&sd, 1), ForwardMode::Train).err().unwrap();
    assert!(e.message.contains("needs text `caption` or its encoding `text_embeddings`"), "{}", e.message);
    let e = run(&mut m, &[], &caption_texts(&strs), &ctx(&sd, 1), ForwardMode::Train).err().unwrap();
    assert!(e.message.contains("needs image `target` or its encoding `latents`"), "{}", e.message);
    let odd = images(1, 3, 4, 1);
    let mut free = model("{}", 0);
    assert!(run(&mut free, &[view("target", &odd)], &caption_texts(&strs), &ctx(&sd, 1), ForwardMode::Train).is_err());
    // Without text, captions are not needed.
    let mut nt = model(r#"{"use_text": false}"#, 0);
    run(&mut nt, &[view("target", &t4)], &[], &ctx(&sd, 1), ForwardMode::Train).unwrap();
    // Gradient names and shapes are checked.
    let g = images(1, 4, 4, 2);
    let bad = [ScaledView { name: RStr::from_str("latents"), view: g.view(), scale: 1.0 }];
    assert!(nt.backward_scaled(&bad, 1.0).unwrap_err().message.contains("no output `latents`"));
}

#[test]
fn optimizer_groups_set_their_own_learning_rates() {
    let mut m = model("{}", 8);
    m.grad = std::array::from_fn(|i| (i as f64 - 17.0) / 10.0);
    let before = m.theta;
    let groups = [GroupHyper { name: RStr::from_str("text_encoder"), lr: 0.0, weight_decay: 0.0 }];
    let rep = m.optimizer_step_groups(step(1), &groups).unwrap();
    let norm = m.grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert_eq!(rep.grad_norm, norm);
    for (i, &b0) in before.iter().enumerate() {
        if flow::P.contains(&i) {
            assert_eq!(m.theta[i], b0, "text_encoder at lr 0 must not move");
        } else {
            // First AdamW step: m̂ = g, v̂ = g² after clipping to norm 1.
            let g = m.grad[i] / (norm + 1e-6);
            let expect = b0 * (1.0 - 1e-2 * 0.01) - 1e-2 * g / (g.abs() + 1e-8);
            assert!((m.theta[i] - expect).abs() < 1e-15, "slot {i}: {} vs {expect}", m.theta[i]);
        }
    }
    let bad = [GroupHyper { name: RStr::from_str("vae"), lr: 1.0, weight_decay: 0.0 }];
    let e = m.optimizer_step_groups(step(2), &bad).unwrap_err();
    assert!(
        e.message.contains("no parameter group `vae`") && e.message.contains("unet, text_encoder"),
        "{}",
        e.message
    );
    // Without text only `unet` exists and P never moves.
    let mut nt = model(r#"{"use_text": false}"#, 8);
    nt.grad = [1.0; N_PARAMS];
    let p0 = nt.theta;
    let rep = nt.optimizer_step(step(1)).unwrap();
    assert_eq!(rep.grad_norm, 12f64.sqrt());
    assert_eq!(nt.theta[flow::P], p0[flow::P]);
    assert_eq!(nt.parameters().unwrap().trainable, 12);
}

fn train_steps(m: &mut FlowFixture, from: u64, to: u64) {
    let target = images(2, 4, 4, 30);
    let strs = rstrs(&CAPTIONS);
    for s in from..=to {
        let sd = seeds(5, s, 2);
        let out = run(m, &[view("target", &target)], &caption_texts(&strs), &ctx(&sd, s), ForwardMode::Train).unwrap();
        let g = CpuTensor::new(out.pixels.shape.clone(), out.pixels.data.iter().map(|p| p - 0.5).collect());
        m.backward_scaled(&[ScaledView { name: RStr::from_str("pixels"), view: g.view(), scale: 0.1 }], 1.0).unwrap();
        m.optimizer_step_groups(step(s), &[GroupHyper { name: RStr::from_str("unet"), lr: 5e-2, weight_decay: 0.0 }])
            .unwrap();
        m.zero_grad().unwrap();
    }
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("likeness-flow-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resume_from_saved_state_is_bit_identical() {
    let mut a = model("{}", 12);
    train_steps(&mut a, 1, 3);
    let dir = tmpdir("resume");
    a.save_state(&dir, true).unwrap();
    let mut b = model("{}", 999);
    b.load_state(&dir).unwrap();
    assert_eq!((b.theta, b.init, b.exp_avg, b.exp_avg_sq), (a.theta, a.init, a.exp_avg, a.exp_avg_sq));
    train_steps(&mut a, 4, 6);
    train_steps(&mut b, 4, 6);
    assert_eq!(a.theta, b.theta);
    // A state saved for another config is refused.
    let mut c = model(r#"{"latent_scale": 2.0}"#, 0);
    assert!(c.load_state(&dir).unwrap_err().message.contains("latent_scale"));
    std::fs::remove_dir_all(&dir).ok();
}

fn sample(
    m: &mut FlowFixture,
    prompts: &[&str],
    size: (u32, u32),
    guidance: f64,
    adapter_scale: f64,
) -> CpuTensor<f32> {
    let p = rstrs(prompts);
    let r = SampleRequest {
        prompts: RSlice::from_slice(&p),
        negative_prompts: RSlice::from_slice(&[]),
        images: RSlice::from_slice(&[]),
        width: size.0,
        height: size.1,
        steps: 0,
        guidance,
        seed: 40,
        adapter_scale,
    };
    CpuTensor::<f32>::from_managed(&m.sample(&r).unwrap(), "sample").unwrap()
}

#[test]
fn sample_is_deterministic_clamped_and_scales_the_adapter() {
    let mut m = model("{}", 12);
    let fresh = sample(&mut m, &CAPTIONS, (6, 4), 1.0, 1.0);
    assert_eq!(fresh.shape, vec![2, 3, 4, 6]);
    assert!(fresh.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(fresh, sample(&mut m, &CAPTIONS, (6, 4), 1.0, 1.0));
    // Image i uses seed + i: the second image alone with seed 41 is the second of the pair.
    let p = rstrs(&CAPTIONS[1..]);
    let r = SampleRequest {
        prompts: RSlice::from_slice(&p),
        negative_prompts: RSlice::from_slice(&[]),
        images: RSlice::from_slice(&[]),
        width: 6,
        height: 4,
        steps: DEFAULT_STEPS,
        guidance: 1.0,
        seed: 41,
        adapter_scale: 1.0,
    };
    let second = CpuTensor::<f32>::from_managed(&m.sample(&r).unwrap(), "s").unwrap();
    assert_eq!(second.data[..], fresh.data[72..]);
    train_steps(&mut m, 1, 5);
    let trained = sample(&mut m, &CAPTIONS, (6, 4), 1.0, 1.0);
    assert_ne!(trained, fresh);
    assert_eq!(sample(&mut m, &CAPTIONS, (6, 4), 1.0, 0.0), fresh, "adapter_scale 0 is the base model");
    assert_ne!(sample(&mut m, &CAPTIONS, (6, 4), 4.0, 1.0), trained, "guidance changes the result");
    let e = m.sample(&SampleRequest { width: 0, height: 0, ..r }).unwrap_err();
    assert!(e.message.contains("width and a height"), "{}", e.message);
}

#[test]
fn exported_adapters_parse_and_carry_the_metadata() {
    let mut m = model("{}", 12);
    train_steps(&mut m, 1, 4);
    let dir = tmpdir("export");
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
        serde_json::json!({"ss_output_name": "alice", "ss_steps": 4, "modelspec.title": "Alice"}),
    )
    .unwrap();
    let delta = |r: std::ops::Range<usize>| -> Vec<f32> { r.map(|i| (m.theta[i] - m.init[i]) as f32).collect() };
    let (dw, db, dp) = (delta(flow::W), delta(flow::B), delta(flow::P));
    let f32s = |t: &safetensors::tensor::TensorView<'_>| -> Vec<f32> {
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let eye: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();

    // kohya
    let files = m.export_adapter(&dir, "kohya", &meta).unwrap();
    assert_eq!(files, vec![dir.join("adapter.safetensors")]);
    let bytes = std::fs::read(&files[0]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "lora_te_proj.alpha",
            "lora_te_proj.lora_down.weight",
            "lora_te_proj.lora_up.weight",
            "lora_unet_proj.alpha",
            "lora_unet_proj.diff_b",
            "lora_unet_proj.lora_down.weight",
            "lora_unet_proj.lora_up.weight"
        ]
    );
    let t = |n: &str| st.tensor(n).unwrap();
    assert_eq!(t("lora_unet_proj.lora_down.weight").shape(), [3, 3]);
    assert_eq!(f32s(&t("lora_unet_proj.lora_down.weight")), eye);
    assert_eq!(f32s(&t("lora_unet_proj.lora_up.weight")), dw);
    assert_eq!(f32s(&t("lora_unet_proj.diff_b")), db);
    assert_eq!(t("lora_unet_proj.alpha").shape(), [] as [usize; 0]);
    assert_eq!(f32s(&t("lora_unet_proj.alpha")), [3.0]);
    assert_eq!(t("lora_te_proj.lora_down.weight").shape(), [3, 8]);
    assert_eq!(f32s(&t("lora_te_proj.lora_down.weight")), dp);
    assert_eq!(f32s(&t("lora_te_proj.lora_up.weight")), eye);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = header.metadata().clone().unwrap();
    assert_eq!(md["ss_output_name"], "alice");
    assert_eq!(md["ss_steps"], "4");
    assert_eq!(md["modelspec.title"], "Alice");
    assert_eq!(
        (md["ss_network_module"].as_str(), md["ss_network_dim"].as_str(), md["ss_network_alpha"].as_str()),
        ("networks.lora", "3", "3")
    );

    // diffusers
    let files = m.export_adapter(&dir, "diffusers", &meta).unwrap();
    assert_eq!(files, vec![dir.join("pytorch_lora_weights.safetensors")]);
    let bytes = std::fs::read(&files[0]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(f32s(&st.tensor("unet.proj.lora_A.weight").unwrap()), eye);
    assert_eq!(f32s(&st.tensor("unet.proj.lora_B.weight").unwrap()), dw);
    assert_eq!(f32s(&st.tensor("unet.proj.lora_B.bias").unwrap()), db);
    assert_eq!(f32s(&st.tensor("text_encoder.proj.lora_A.weight").unwrap()), dp);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().clone().unwrap()["ss_output_name"], "alice");

    // peft
    let files = m.export_adapter(&dir, "peft", &meta).unwrap();
    assert_eq!(files, vec![dir.join("adapter_model.safetensors"), dir.join("adapter_config.json")]);
    let bytes = std::fs::read(&files[0]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(f32s(&st.tensor("base_model.model.unet.proj.lora_B.weight").unwrap()), dw);
    assert_eq!(st.len(), 5);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64(), cfg["lora_alpha"].as_u64()),
        (Some("LORA"), Some(3), Some(3))
    );
    assert_eq!(cfg["target_modules"], serde_json::json!(["proj"]));

    let e = m.export_adapter(&dir, "comfyui", &meta).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(e.message.contains("`comfyui`") && e.message.contains("kohya, diffusers, peft"), "{}", e.message);

    // Without text there is no text-encoder module.
    let mut nt = model(r#"{"use_text": false}"#, 1);
    let files = nt.export_adapter(&dir, "kohya", &serde_json::Map::new()).unwrap();
    let bytes = std::fs::read(&files[0]).unwrap();
    assert_eq!(safetensors::SafeTensors::deserialize(&bytes).unwrap().len(), 4);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn interface_and_config() {
    let i = FlowFixture::interface("{}").unwrap();
    let names = |v: &likeness_sdk::abi_stable::std_types::RVec<likeness_sdk::abi::IoDecl>| {
        v.iter().map(|d| (d.name.to_string(), d.required)).collect::<Vec<_>>()
    };
    assert_eq!(names(&i.images), [("target".to_string(), true), ("reference".to_string(), false)]);
    assert_eq!(names(&i.texts), [("caption".to_string(), true)]);
    assert_eq!(names(&i.outputs), [("pixels".to_string(), true), ("timesteps".to_string(), true)]);
    assert!(i.internal_loss && i.can_sample);
    let enc: Vec<_> = i
        .encodings
        .iter()
        .map(|e| (e.name.to_string(), e.source.to_string(), e.source_kind, e.config_keys.len()))
        .collect();
    assert_eq!(
        enc,
        [
            ("latents".into(), "target".into(), InputKind::Image, 1),
            ("text_embeddings".into(), "caption".into(), InputKind::Text, 0)
        ]
    );
    assert_eq!(i.encodings[0].config_keys[0].as_str(), "latent_scale");
    assert_eq!(i.param_groups.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["unet", "text_encoder"]);
    assert_eq!(i.adapter_formats.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["kohya", "diffusers", "peft"]);
    let nt = FlowFixture::interface(r#"{"use_text": false}"#).unwrap();
    assert_eq!(names(&nt.texts), [("caption".to_string(), false)]);
    assert_eq!(nt.encodings.len(), 1);
    assert_eq!(nt.param_groups.len(), 1);

    let e = FlowFixture::interface(r#"{"latent_scal": 1}"#).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.message.contains("latent_scal"), "{}", e.message);
    assert!(FlowFixture::interface(r#"{"latent_scale": 0}"#).is_err());
    assert!(FlowFixture::interface(r#"{"image_size": 7}"#).is_err());
    let e = FlowFixture::interface(r#"{"pretrained": "/nonexistent/flux.safetensors"}"#).unwrap_err();
    assert!(e.message.contains("does not exist"), "{}", e.message);
    let here = std::env::current_dir().unwrap();
    FlowFixture::interface(&serde_json::json!({"pretrained": here}).to_string()).unwrap();
    assert!(FlowFixture::create("{}", Device::cuda(0), 0).is_err());
    // The schema names every key the config accepts.
    let schema = config_schema();
    let keys: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 4);
}
