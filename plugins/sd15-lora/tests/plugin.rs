//! `sd15-lora` through its plugin methods, on the tiny random SD1.5 pipeline that
//! tests/python/make_tiny_sd15.py writes with diffusers itself (a folder and the same weights as
//! an original single file; see [`common::tiny`]). 32×32 images → 16×16 latents (the tiny VAE
//! has factor 2).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{images, tiny, CAPTIONS, SIZE};
use likeness_plugin_sd15_lora::Sd15Lora;
use likeness_sdk::abi::{sample_seed, NamedTexts, NamedView};
use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
use likeness_sdk::{
    CpuTensor, Device, ForwardMode, Inputs, ModelPlugin, OptimizerStep, SampleRequest, ScaledView, StepContext, Texts,
};
use tch::Tensor;

fn config(pretrained: &Path, extra: serde_json::Value) -> String {
    let mut c = serde_json::json!({"pretrained": pretrained, "resolution": SIZE, "lora_rank": 4, "sample_steps": 4});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

fn create(cfg: &str, seed: u64) -> Sd15Lora {
    Sd15Lora::create(cfg, Device::CPU, seed).unwrap_or_else(|e| panic!("create: {e}"))
}

fn seeds(run: u64, step: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| sample_seed(run, step, 0, i)).collect()
}

fn ctx(seeds: &[u64], step: u64) -> StepContext<'_> {
    StepContext { optimizer_step: step, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(seeds) }
}

fn opt(step: u64) -> OptimizerStep {
    OptimizerStep { step, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: 1.0 }
}

struct Out {
    outputs: Vec<(String, CpuTensor<f32>)>,
    loss: f64,
}

impl Out {
    fn get(&self, name: &str) -> &CpuTensor<f32> {
        &self.outputs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1
    }
}

/// forward_batch with `images` (name, tensor) and captions.
fn forward(
    m: &mut Sd15Lora,
    imgs: &[(&str, &CpuTensor<f32>)],
    captions: Option<&[&str]>,
    seeds: &[u64],
    mode: ForwardMode,
) -> Out {
    let views: Vec<NamedView<'_>> =
        imgs.iter().map(|(n, t)| NamedView { name: RStr::from_str(n), view: t.view() }).collect();
    let strs: Vec<RStr<'_>> = captions.unwrap_or(&[]).iter().map(|s| RStr::from_str(s)).collect();
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&strs) }];
    let texts = if captions.is_some() { &texts[..] } else { &texts[..0] };
    let out = m
        .forward_batch(
            Inputs::new(RSlice::from_slice(&views)),
            Texts::new(RSlice::from_slice(texts)),
            &ctx(seeds, 1),
            mode,
        )
        .unwrap_or_else(|e| panic!("forward_batch: {e}"));
    let outputs = out.outputs.iter().map(|(n, t)| (n.clone(), CpuTensor::<f32>::from_managed(t, n).unwrap())).collect();
    Out { outputs, loss: out.internal_loss.expect("internal loss") }
}

/// One training step: forward(Train) on `target`, backward with a fixed `pixels` gradient
/// (an identity-term stand-in) plus the diffusion loss, AdamW.
fn train_step(m: &mut Sd15Lora, step: u64) {
    let target = images(2, 100 + step);
    let sd = seeds(7, step, 2);
    let out = forward(m, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Train);
    let px = out.get("pixels");
    let g = CpuTensor::new(px.shape.clone(), likeness_sdk::testing::uniform_f32(900 + step, px.data.len(), -1.0, 1.0));
    let grads = [ScaledView { name: RStr::from_str("pixels"), view: g.view(), scale: 0.5 }];
    m.backward_scaled(&grads, 1.0).unwrap();
    m.optimizer_step_groups(opt(step), &[]).unwrap();
    m.zero_grad().unwrap();
}

/// Bitwise equality of two f32 vectors, reporting the first difference (not the whole vectors).
fn same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        let max = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        panic!("{what}: first difference at {i}: {} vs {} (max |diff| {max:e})", a[i], b[i]);
    }
}

/// Every base weight (`base_parameters` loads the VAE and the text encoder on first use, which
/// can fail: a test panics with the plugin's message).
fn base(m: &Sd15Lora) -> Vec<(String, Tensor)> {
    m.base_parameters().unwrap_or_else(|e| panic!("base_parameters: {e}"))
}

fn snapshot(v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
}

fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && bool::try_from(a.eq_tensor(b).all()).unwrap()
}

fn sample(m: &mut Sd15Lora, seed: u64, scale: f64) -> Vec<f32> {
    let prompts: Vec<RStr<'_>> = CAPTIONS.iter().map(|s| RStr::from_str(s)).collect();
    let r = SampleRequest {
        prompts: RSlice::from_slice(&prompts),
        negative_prompts: RSlice::from_slice(&[]),
        images: RSlice::from_slice(&[]),
        width: 0,
        height: 0,
        steps: 0,
        guidance: 0.0,
        seed,
        adapter_scale: scale,
    };
    let t = m.sample(&r).unwrap_or_else(|e| panic!("sample: {e}"));
    let t = CpuTensor::<f32>::from_managed(&t, "sample").unwrap();
    assert_eq!(t.shape, vec![2, 3, SIZE, SIZE]);
    assert!(t.data.iter().all(|v| (0.0..=1.0).contains(v)));
    t.data
}

#[test]
fn interface_declares_what_the_engine_needs() {
    let Some((dir, _)) = tiny("interface_declares_what_the_engine_needs") else { return };
    let names = |v: &[likeness_sdk::abi::IoDecl]| v.iter().map(|d| d.name.to_string()).collect::<Vec<_>>();
    let i = Sd15Lora::interface(&config(dir, serde_json::json!({}))).unwrap();
    assert_eq!(names(&i.images), ["target", "reference"]);
    assert!(i.images[0].required && !i.images[1].required);
    assert_eq!(names(&i.texts), ["caption"]);
    assert_eq!(names(&i.outputs), ["pixels", "timesteps", "timestep_weights"]);
    assert!(i.internal_loss && i.can_sample);
    let enc: Vec<(String, String)> = i.encodings.iter().map(|e| (e.name.to_string(), e.source.to_string())).collect();
    assert_eq!(enc, [("latents".into(), "target".into()), ("text_embeddings".into(), "caption".into())]);
    assert_eq!(i.param_groups.iter().map(|g| g.to_string()).collect::<Vec<_>>(), ["unet"]);
    assert_eq!(i.adapter_formats.iter().map(|g| g.to_string()).collect::<Vec<_>>(), ["kohya", "diffusers", "peft"]);

    let i = Sd15Lora::interface(&config(dir, serde_json::json!({"decode_pixels": false, "train_text_encoder": true})))
        .unwrap();
    assert_eq!(names(&i.outputs), ["timesteps", "timestep_weights"], "no pixels without decode_pixels");
    assert_eq!(i.encodings.len(), 1, "texts are not cacheable while the text encoder trains");
    assert_eq!(i.param_groups.iter().map(|g| g.to_string()).collect::<Vec<_>>(), ["unet", "text_encoder"]);

    let e = Sd15Lora::interface(&config(dir, serde_json::json!({"lora_rnk": 4}))).unwrap_err();
    assert!(e.message.contains("lora_rnk"), "{}", e.message);
    let e = Sd15Lora::interface(r#"{"pretrained": "/nonexistent/sd15"}"#).unwrap_err();
    assert!(e.message.contains("pretrained") && e.message.contains("/nonexistent/sd15"), "{}", e.message);
    let e = Sd15Lora::interface(&config(dir, serde_json::json!({"clip_skip": 3}))).unwrap_err();
    assert!(e.message.contains("clip_skip"), "{}", e.message);
}

#[test]
fn single_file_and_folder_give_the_same_outputs_bitwise() {
    let Some((dir, single)) = tiny("single_file_and_folder_give_the_same_outputs_bitwise") else { return };
    let mut a = create(&config(dir, serde_json::json!({})), 3);
    let mut b = create(&config(single, serde_json::json!({"config": dir})), 3);
    let target = images(2, 1);
    let sd = seeds(1, 1, 2);
    let oa = forward(&mut a, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Eval);
    let ob = forward(&mut b, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Eval);
    assert_eq!(oa.loss.to_bits(), ob.loss.to_bits());
    same(&oa.get("pixels").data, &ob.get("pixels").data, "pixels");
    same(&oa.get("timesteps").data, &ob.get("timesteps").data, "timesteps");
    // Every base tensor is the same (the networks are the same names and values).
    for ((na, ta), (nb, tb)) in base(&a).iter().zip(base(&b).iter()) {
        assert_eq!(na, nb);
        assert!(bit_equal(ta, tb), "{na}");
    }
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let Some((dir, single)) = tiny("missing_and_unexpected_tensors_are_named") else { return };
    let bytes = std::fs::read(single).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    let renamed = "first_stage_model.decoder.conv_in.weight";
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for (n, t) in st.tensors() {
        if n == gone {
            continue;
        }
        let n = if n == renamed { "first_stage_model.decoder.conv_inn.weight".to_string() } else { n };
        tensors.push((n, t));
    }
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.safetensors");
    safetensors::serialize_to_file(tensors, &None, &broken).unwrap();
    let cfg = config(&broken, serde_json::json!({"config": dir}));
    let e = Sd15Lora::create(&cfg, Device::CPU, 0).err().expect("a broken checkpoint must fail").message;
    assert!(e.contains("missing: input_blocks") || e.contains("proj_in.weight"), "{e}");
    assert!(e.contains("broken.safetensors"), "{e}");
    // The UNet fails first; the VAE rename is reported when the UNet is intact.
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for (n, t) in st.tensors() {
        let n = if n == renamed { "first_stage_model.decoder.conv_inn.weight".to_string() } else { n };
        tensors.push((n, t));
    }
    safetensors::serialize_to_file(tensors, &None, &broken).unwrap();
    let e = Sd15Lora::create(&cfg, Device::CPU, 0).err().expect("a renamed tensor must fail").message;
    assert!(e.contains("unexpected: first_stage_model.decoder.conv_inn.weight"), "{e}");
    assert!(e.contains("missing: decoder.conv_in.weight"), "{e}");
}

#[test]
fn a_train_step_changes_only_lora_weights() {
    let Some((dir, _)) = tiny("a_train_step_changes_only_lora_weights") else { return };
    let mut m = create(&config(dir, serde_json::json!({"min_snr_gamma": 5.0, "noise_offset": 0.05})), 5);
    let base0 = snapshot(base(&m));
    let lora0 = snapshot(m.lora_parameters());
    assert!(!lora0.is_empty());
    // 4 attention projections × (attn1 + attn2) × 5 transformer blocks (down 2, mid 1, up 2 … of
    // the tiny UNet) — whatever the count, each module has lora_A and lora_B.
    assert!(lora0
        .iter()
        .all(|(n, _)| n.starts_with("unet.") && (n.ends_with("lora_A.weight") || n.ends_with("lora_B.weight"))));
    train_step(&mut m, 1);
    for ((n, before), (_, now)) in base0.iter().zip(base(&m).iter()) {
        assert!(bit_equal(before, now), "base weight {n} changed");
        assert!(!now.requires_grad() && !now.grad().defined(), "base weight {n} has a gradient");
    }
    let mut changed_b = 0;
    for ((n, before), (_, now)) in lora0.iter().zip(m.lora_parameters().iter()) {
        if n.ends_with("lora_B.weight") {
            // B starts at 0; after one AdamW step every element moved by ≈ lr.
            assert!(!bit_equal(before, now), "{n} did not train");
            changed_b += 1;
        }
    }
    assert_eq!(changed_b * 2, lora0.len());
    let info = m.parameters().unwrap();
    assert!(info.trainable > 0 && info.trainable < info.total / 4, "{info:?}");
}

/// 3 steps, save, load into a fresh instance (another init seed, so nothing is inherited by
/// accident), 2 more steps == 5 steps straight, bitwise — with the text encoder trained,
/// min-SNR-γ, noise offset and LoRA dropout (seeded from the step's sample seeds) on.
#[test]
fn resume_is_bit_identical() {
    let Some((dir, _)) = tiny("resume_is_bit_identical") else { return };
    let cfg = config(
        dir,
        serde_json::json!({"train_text_encoder": true, "min_snr_gamma": 5.0, "noise_offset": 0.1,
            "lora_dropout": 0.1, "timestep_sampling": "logit_normal"}),
    );
    let mut straight = create(&cfg, 11);
    for s in 1..=5 {
        train_step(&mut straight, s);
    }
    let mut first = create(&cfg, 11);
    for s in 1..=3 {
        train_step(&mut first, s);
    }
    let tmp = tempfile::tempdir().unwrap();
    first.save_state(tmp.path(), true).unwrap();
    drop(first);
    let mut resumed = create(&cfg, 99);
    resumed.load_state(tmp.path()).unwrap();
    for s in 4..=5 {
        train_step(&mut resumed, s);
    }
    let (a, b) = (straight.lora_parameters(), resumed.lora_parameters());
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|(n, _)| n.starts_with("text_encoder.")));
    for ((n, x), (_, y)) in a.iter().zip(b.iter()) {
        assert!(bit_equal(x, y), "{n} differs after resume");
    }
    // A state saved with other LoRA settings is refused by name.
    let other = create(&config(dir, serde_json::json!({"lora_rank": 2})), 1);
    drop(other);
    let mut other = create(&config(dir, serde_json::json!({"lora_rank": 2, "train_text_encoder": true})), 1);
    let e = other.load_state(tmp.path()).unwrap_err().message;
    assert!(e.contains("lora_rank"), "{e}");
}

/// `latents` and `text_embeddings` from `encode` in place of `target` and `caption` give
/// bit-identical outputs (Train, so with the graph, and the same gradients).
#[test]
fn encodings_replace_their_sources_bitwise() {
    let Some((dir, _)) = tiny("encodings_replace_their_sources_bitwise") else { return };
    let mut m = create(&config(dir, serde_json::json!({})), 2);
    let target = images(2, 4);
    let reference = images(2, 5);
    let sd = seeds(3, 1, 2);
    let strs: Vec<RStr<'_>> = CAPTIONS.iter().map(|s| RStr::from_str(s)).collect();
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&strs) }];
    let views = [NamedView { name: RStr::from_str("target"), view: target.view() }];
    let enc = |m: &mut Sd15Lora, name: &str| {
        let o =
            m.encode(name, Inputs::new(RSlice::from_slice(&views)), Texts::new(RSlice::from_slice(&texts))).unwrap();
        CpuTensor::<f32>::from_managed(&o[0].1, name).unwrap()
    };
    let latents = enc(&mut m, "latents");
    assert_eq!(latents.shape, vec![2, 4, SIZE / 2, SIZE / 2]);
    let emb = enc(&mut m, "text_embeddings");
    assert_eq!(emb.shape[..2], [2, 77]);
    let a =
        forward(&mut m, &[("target", &target), ("reference", &reference)], Some(&CAPTIONS), &sd, ForwardMode::Train);
    let a2 =
        forward(&mut m, &[("target", &target), ("reference", &reference)], Some(&CAPTIONS), &sd, ForwardMode::Train);
    same(&a.get("pixels").data, &a2.get("pixels").data, "pixels twice");
    let ga = grads_after_backward(&mut m);
    let b = forward(&mut m, &[("latents", &latents), ("text_embeddings", &emb)], None, &sd, ForwardMode::Train);
    let gb = grads_after_backward(&mut m);
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    for name in ["pixels", "timesteps", "timestep_weights"] {
        same(&a.get(name).data, &b.get(name).data, name);
    }
    for ((n, x), (_, y)) in ga.iter().zip(gb.iter()) {
        assert!(bit_equal(x, y), "gradient of {n}");
    }
    let e = m.encode("pixels", Inputs::new(RSlice::from_slice(&views)), Texts::none()).unwrap_err().message;
    assert!(e.contains("declares no encoding `pixels`"), "{e}");
}

/// backward of the diffusion loss alone; returns the LoRA gradients and zeroes them.
fn grads_after_backward(m: &mut Sd15Lora) -> Vec<(String, Tensor)> {
    m.backward_scaled(&[], 1.0).unwrap();
    let g = m.lora_parameters().into_iter().map(|(n, p)| (n, p.grad().copy())).collect();
    m.zero_grad().unwrap();
    g
}

/// `sample` is a function of the seed: the same seed twice gives the same images, another seed
/// others; adapter_scale 0 is the base model (a fresh instance, whose lora_B = 0); the trained
/// adapter at scale 1 changes the images.
#[test]
fn sampling_is_deterministic_and_scale_zero_is_the_base_model() {
    let Some((dir, _)) = tiny("sampling_is_deterministic_and_scale_zero_is_the_base_model") else { return };
    for sampler in ["ddim", "euler"] {
        let cfg = config(dir, serde_json::json!({"sampler": sampler}));
        let mut base = create(&cfg, 1);
        let mut m = create(&cfg, 1);
        for s in 1..=2 {
            train_step(&mut m, s);
        }
        let a = sample(&mut m, 42, 1.0);
        assert_eq!(a, sample(&mut m, 42, 1.0), "{sampler}: same seed");
        assert_ne!(a, sample(&mut m, 43, 1.0), "{sampler}: another seed");
        let zero = sample(&mut m, 42, 0.0);
        assert_eq!(zero, sample(&mut base, 42, 1.0), "{sampler}: scale 0 = base model");
        assert_ne!(zero, a, "{sampler}: the adapter changes the images");
        // The scale is restored: training continues with the adapter on.
        assert_eq!(a, sample(&mut m, 42, 1.0));
    }
}

/// Export in the three formats after training (UNet + text-encoder LoRA), load each back
/// through `lora` into a fresh instance: the same sample, bitwise. (Bitwise holds because the
/// weights are written as f32 and alpha = r, so the diffusers layout's alpha/r fold into
/// lora_B multiplies by exactly 1.)
#[test]
fn exported_adapters_load_back_through_lora() {
    let Some((dir, _)) = tiny("exported_adapters_load_back_through_lora") else { return };
    let mut m = create(
        &config(dir, serde_json::json!({"train_text_encoder": true, "lora_targets": ["to_q", "to_v", "ff"]})),
        4,
    );
    for s in 1..=2 {
        train_step(&mut m, s);
    }
    let want = sample(&mut m, 5, 1.0);
    let tmp = tempfile::tempdir().unwrap();
    let mut meta = serde_json::Map::new();
    meta.insert("ss_output_name".into(), "drip person".into());
    meta.insert("ss_steps".into(), "2".into());
    // The engine's generic placeholders (core/engine/src/train/plan.rs `adapter_metadata`): the
    // model's own SD1.5 values must win over them, and no 1970 date without a start time.
    meta.insert("modelspec.architecture".into(), "sd15-lora/lora".into());
    meta.insert("ss_base_model_version".into(), "sd15-lora".into());
    for format in ["kohya", "diffusers", "peft"] {
        let out = tmp.path().join(format);
        std::fs::create_dir_all(&out).unwrap();
        let files = m.export_adapter(&out, format, &meta).unwrap_or_else(|e| panic!("export {format}: {e}"));
        assert!(!files.is_empty() && files.iter().all(|f| f.exists()), "{format}: {files:?}");
        let path = match format {
            "kohya" => {
                assert_eq!(files.len(), 1);
                assert_eq!(files[0].file_name().unwrap(), "drip_person.safetensors");
                let h = likeness_sdk::st::read_header(&files[0]).unwrap();
                assert_eq!(h.metadata.get("ss_network_module").map(String::as_str), Some("networks.lora"));
                assert_eq!(h.metadata.get("ss_steps").map(String::as_str), Some("2"));
                assert!(h.metadata.keys().any(|k| k.starts_with("modelspec.")), "{:?}", h.metadata.keys());
                let get = |k: &str| h.metadata.get(k).map(String::as_str);
                assert_eq!(get("modelspec.architecture"), Some("stable-diffusion-v1/lora"));
                assert_eq!(get("ss_base_model_version"), Some("sd_v1"));
                assert_eq!(get("modelspec.prediction_type"), Some("epsilon"));
                assert_eq!(get("modelspec.date"), None, "no start time was given");
                files[0].clone()
            }
            "diffusers" => {
                assert!(out.join("pytorch_lora_weights.safetensors").exists());
                out.clone()
            }
            _ => {
                assert!(out.join("adapter_config.json").exists() && out.join("adapter_model.safetensors").exists());
                assert!(out.join("text_encoder").join("adapter_model.safetensors").exists());
                out.clone()
            }
        };
        let mut back = create(&config(dir, serde_json::json!({"lora": path})), 77);
        same(&want, &sample(&mut back, 5, 1.0), format);
        // The same modules, ranks and values.
        let (a, b) = (m.lora_parameters(), back.lora_parameters());
        assert_eq!(a.iter().map(|(n, _)| n).collect::<Vec<_>>(), b.iter().map(|(n, _)| n).collect::<Vec<_>>());
    }
    let e = m.export_adapter(tmp.path(), "comfy", &meta).unwrap_err().message;
    assert!(e.contains("comfy") && e.contains("kohya, diffusers, peft"), "{e}");
}

/// A LoRA file naming a module the model does not have is refused, naming the module.
#[test]
fn a_lora_for_another_model_is_refused_by_module_name() {
    let Some((dir, _)) = tiny("a_lora_for_another_model_is_refused_by_module_name") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("other.safetensors");
    // kohya keys for a 4th down block, which the tiny UNet (3 blocks) does not have.
    let key = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q";
    let down = vec![0u8; 4 * 64 * 4];
    let up = vec![0u8; 64 * 4 * 4];
    let alpha = 4f32.to_le_bytes().to_vec();
    let t = |shape: Vec<usize>, d: &'static [u8]| {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, d).unwrap()
    };
    let (down, up, alpha): (&'static [u8], &'static [u8], &'static [u8]) =
        (Box::leak(down.into_boxed_slice()), Box::leak(up.into_boxed_slice()), Box::leak(alpha.into_boxed_slice()));
    let tensors = vec![
        (format!("{key}.lora_down.weight"), t(vec![4, 64], down)),
        (format!("{key}.lora_up.weight"), t(vec![64, 4], up)),
        (format!("{key}.alpha"), t(vec![], alpha)),
    ];
    safetensors::serialize_to_file(tensors, &None, &f).unwrap();
    let e = Sd15Lora::create(&config(dir, serde_json::json!({"lora": f})), Device::CPU, 0).err().unwrap().message;
    assert!(e.contains("down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q"), "{e}");
}

/// The identity chain: d/dθ [w·L + s₁⟨g₁, pixels⟩ + s₂⟨g₂, pixels⟩] by `backward_scaled`
/// against central finite differences, for LoRA weights in the UNet's first and last attention
/// blocks (x̂0 from the prediction → VAE decode → pixels), everything in f64 (`precision =
/// fp64`). The draws (t, ε) are the same in every evaluation: the same sample seeds.
///
/// Tolerance: central differences have truncation error h²/6·|J'''| and rounding error
/// ≈ ε₆₄·|J|/h. With h = 1e-4 (weights are O(0.1)), |J| ≲ 10³ (a sum over 2·3·32·32 pixels of
/// O(1) terms) and third derivatives of the same order as the first (a smooth network of O(1)
/// gains), both are ≲ 1e-8·max(1, |grad|) + 2e-16·10³/1e-4 = 2e-9; the bound 1e-6·max(1, |grad|)
/// leaves two orders of margin and fails on any real error (a wrong chain term is O(|grad|)).
#[test]
fn the_identity_chain_gradient_matches_finite_differences() {
    let Some((dir, _)) = tiny("the_identity_chain_gradient_matches_finite_differences") else { return };
    let mut m = create(&config(dir, serde_json::json!({"precision": "fp64", "min_snr_gamma": 5.0})), 8);
    // Non-zero lora_B first (it starts at 0, which would make every lora_A gradient 0).
    common::perturb_lora(&m, 50);
    let target = images(2, 6);
    let sd = seeds(9, 1, 2);
    let out = forward(&mut m, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Train);
    let px = m.pending_pixels().expect("pixels");
    assert_eq!(px.kind(), tch::Kind::Double);
    let n = px.numel();
    let shape = out.get("pixels").shape.clone();
    let g1 = CpuTensor::new(shape.clone(), likeness_sdk::testing::uniform_f32(21, n, -1.0, 1.0));
    let g2 = CpuTensor::new(shape.clone(), likeness_sdk::testing::uniform_f32(22, n, -1.0, 1.0));
    let (s1, s2, w) = (0.5, 2.0, 0.7);
    let grads = [
        ScaledView { name: RStr::from_str("pixels"), view: g1.view(), scale: s1 },
        ScaledView { name: RStr::from_str("pixels"), view: g2.view(), scale: s2 },
    ];
    m.backward_scaled(&grads, w).unwrap();
    let g: Tensor = Tensor::from_slice(&g1.data).to_kind(tch::Kind::Double) * s1
        + Tensor::from_slice(&g2.data).to_kind(tch::Kind::Double) * s2;
    let g = g.view(shape.as_slice());
    let objective = |m: &mut Sd15Lora| {
        let o = forward(m, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Train);
        let p = m.pending_pixels().unwrap();
        (&p * &g).sum(tch::Kind::Double).double_value(&[]) + w * o.loss
    };
    let params = m.lora_parameters();
    let pick: Vec<&(String, Tensor)> =
        [params.first().unwrap(), params.get(1).unwrap(), params.last().unwrap()].to_vec();
    let h = 1e-4;
    for (name, p) in pick {
        let analytic_all = p.grad().copy();
        for k in [0i64, 7] {
            let analytic = analytic_all.view([-1]).double_value(&[k]);
            let fd = common::central_difference(p, k, h, || objective(&mut m));
            eprintln!("{name}[{k}]: analytic {analytic:.10e}, fd {fd:.10e}");
            assert!(analytic != 0.0, "{name}[{k}]: zero gradient proves nothing");
            assert!(
                (fd - analytic).abs() <= 1e-6 * analytic.abs().max(1.0),
                "{name}[{k}]: analytic {analytic} vs fd {fd}"
            );
        }
    }
}

fn write_f32(path: &Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Against diffusers 0.42.1 + peft (tests/sd15_lora_oracle.py) on the same folder, with the
/// adapter this plugin trained (UNet + text encoder) exported as kohya and diffusers files and
/// loaded by diffusers' own `pipe.load_lora_weights`:
/// * `sample` (DDIM and Euler, 4 steps, CFG 5, negative prompts) = `StableDiffusionPipeline`
///   from the same initial noise;
/// * one training forward: the min-SNR-γ weighted diffusion loss and the decoded x̂0 `pixels`
///   = the same formulas in diffusers (`DDPMScheduler.add_noise`, the UNet, the VAE) on the
///   same latents, noise and timesteps.
///
/// Tolerances. Both sides run the same libtorch in f32; they differ by (a) op order inside the
/// networks, which core/diffusion-torch's parity test bounds by 1e-4 on UNet/VAE/text outputs,
/// and (b) the schedule: diffusers holds ᾱ in f32 (a cumprod of ≤ 1000 f32 factors, ≤ 1000·2⁻²⁴
/// ≈ 6e-5 relative), we in f64. Sampling: CFG multiplies a UNet difference by at most 2g − 1 = 9
/// (g = 5): ≤ 9e-4 per step on ε̂; a DDIM/Euler step passes an ε̂ error to the latents with a
/// factor ≤ 1 (√(1−ᾱ_prev) − √(ᾱ_prev(1−ᾱ_t)/ᾱ_t) resp. σ_next − σ ≤ σ_max ≈ 14.6, but Euler's
/// input is scaled by 1/√(σ²+1), so its UNet error enters as ≤ 9e-4 again), so 4 steps ≤ 4e-3;
/// the tiny VAE's gain is O(1) and the output is clamped to [0, 1]: bound 1e-2 per pixel.
/// Training pixels: x̂0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ amplifies an ε̂ error by ≤ 1/√ᾱ_999 ≈ 15 → 1.5e-3,
/// plus the decoder's 1e-4: bound 1e-2. Loss: Δ mean((ε̂−ε)²) ≤ 2·mean|ε̂−ε|·1e-4 + 1e-8 and
/// min-SNR weights ≤ 1 with f32 SNR (6e-5 relative): bound 1e-3·max(1, L).
#[test]
fn matches_diffusers_with_its_own_lora_loader() {
    let Some((dir, _)) = tiny("matches_diffusers_with_its_own_lora_loader") else { return };
    let python = likeness_sdk::testing::python_or_skip("matches_diffusers_with_its_own_lora_loader").unwrap();
    let cfg = config(dir, serde_json::json!({"train_text_encoder": true, "min_snr_gamma": 5.0}));
    let mut m = create(&cfg, 21);
    for s in 1..=2 {
        train_step(&mut m, s);
    }
    let tmp = tempfile::tempdir().unwrap();
    let meta = serde_json::Map::new();
    let kohya_dir = tmp.path().join("kohya");
    let diff_dir = tmp.path().join("diffusers");
    std::fs::create_dir_all(&kohya_dir).unwrap();
    std::fs::create_dir_all(&diff_dir).unwrap();
    let kohya = m.export_adapter(&kohya_dir, "kohya", &meta).unwrap()[0].clone();
    m.export_adapter(&diff_dir, "diffusers", &meta).unwrap();

    // Sampling, ours: DDIM on the trained instance, Euler on one loaded from the diffusers file.
    let (seed, steps, guidance) = (5u64, 4u32, 5.0f64);
    let negatives = ["", "blurry, low quality"];
    let run_sample = |m: &mut Sd15Lora| {
        let prompts: Vec<RStr<'_>> = CAPTIONS.iter().map(|s| RStr::from_str(s)).collect();
        let neg: Vec<RStr<'_>> = negatives.iter().map(|s| RStr::from_str(s)).collect();
        let r = SampleRequest {
            prompts: RSlice::from_slice(&prompts),
            negative_prompts: RSlice::from_slice(&neg),
            images: RSlice::from_slice(&[]),
            width: SIZE as u32,
            height: SIZE as u32,
            steps,
            guidance,
            seed,
            adapter_scale: 1.0,
        };
        CpuTensor::<f32>::from_managed(&m.sample(&r).unwrap(), "sample").unwrap().data
    };
    let ours_ddim = run_sample(&mut m);
    let mut euler =
        create(&config(dir, serde_json::json!({"lora": diff_dir, "sampler": "euler", "min_snr_gamma": 5.0})), 0);
    let ours_euler = run_sample(&mut euler);
    let per = (4 * (SIZE / 2) * (SIZE / 2)) as usize;
    let noise: Vec<f32> =
        (0..2u64).flat_map(|i| likeness_plugin_sd15_lora::rng::noise(seed + i, per)).map(|x| x as f32).collect();
    write_f32(&tmp.path().join("noise.f32"), &noise);

    // Training forwards (Eval: no graph, same draws as Train), ours: epsilon on the trained
    // instance, v-prediction on one loaded from the diffusers file (same weights).
    let mut vpred = create(
        &config(dir, serde_json::json!({"lora": diff_dir, "prediction_type": "v_prediction", "min_snr_gamma": 5.0})),
        0,
    );
    let mut train = Vec::new();
    let mut ours_train = Vec::new();
    for (k, (model, prediction)) in [(&mut m, "epsilon"), (&mut vpred, "v_prediction")].into_iter().enumerate() {
        let target = images(2, 31 + k as u64);
        let sd = seeds(13, 1 + k as u64, 2);
        let out = forward(model, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Eval);
        let views = [NamedView { name: RStr::from_str("target"), view: target.view() }];
        let lat = model.encode("latents", Inputs::new(RSlice::from_slice(&views)), Texts::none()).unwrap();
        let lat = CpuTensor::<f32>::from_managed(&lat[0].1, "latents").unwrap();
        let (z0, epsf) = (tmp.path().join(format!("z0_{k}.f32")), tmp.path().join(format!("eps_{k}.f32")));
        write_f32(&z0, &lat.data);
        let eps: Vec<f32> =
            sd.iter().flat_map(|&s| likeness_plugin_sd15_lora::rng::noise(s, per)).map(|x| x as f32).collect();
        write_f32(&epsf, &eps);
        let t: Vec<i64> = out.get("timesteps").data.iter().map(|&t| (t as f64 * 1000.0).round() as i64).collect();
        train.push(serde_json::json!({"latents": z0, "noise": epsf, "shape": lat.shape, "timesteps": t,
            "captions": CAPTIONS, "min_snr_gamma": 5.0, "prediction_type": prediction}));
        ours_train.push(out);
    }

    let request = serde_json::json!({
        "model": dir, "loras": {"kohya": kohya, "diffusers": diff_dir},
        "prompts": CAPTIONS, "negative_prompts": negatives, "steps": steps, "guidance": guidance,
        "samplers": ["ddim", "euler"], "height": SIZE, "width": SIZE,
        "latents": tmp.path().join("noise.f32"), "latents_shape": [2, 4, SIZE / 2, SIZE / 2],
        "train": train,
    });
    let req = tmp.path().join("request.json");
    std::fs::write(&req, request.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sd15_lora_oracle.py");
    let o = Command::new(python).arg(&script).arg("--request").arg(&req).arg("--out").arg(tmp.path()).output().unwrap();
    assert!(o.status.success(), "sd15_lora_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("oracle.json")).unwrap()).unwrap();
    let n_modules = m.lora_parameters().len() / 2;
    for fmt in ["kohya", "diffusers"] {
        let mods = json[format!("modules_{fmt}")].as_array().unwrap();
        let total = mods[0].as_u64().unwrap() + mods[1].as_u64().unwrap();
        assert_eq!(total as usize, n_modules, "{fmt}: diffusers loaded {mods:?} LoRA modules, we have {n_modules}");
        for (sampler, ours) in [("ddim", &ours_ddim), ("euler", &ours_euler)] {
            let theirs = read_f32(&tmp.path().join(format!("sample_{fmt}_{sampler}.f32")));
            let d = max_diff(ours, &theirs);
            eprintln!("sample {fmt}/{sampler}: max |ours − diffusers| = {d:.3e}");
            assert!(d <= 1e-2, "sample {fmt}/{sampler}: {d}");
        }
        for (k, out) in ours_train.iter().enumerate() {
            let theirs = read_f32(&tmp.path().join(format!("pixels_{fmt}_{k}.f32")));
            let d = max_diff(&out.get("pixels").data, &theirs);
            let loss = json["losses"][fmt][k].as_f64().unwrap();
            eprintln!("train {fmt}/{k}: pixels max diff {d:.3e}; loss ours {} diffusers {loss}", out.loss);
            assert!(d <= 1e-2, "pixels {fmt}/{k}: {d}");
            assert!((out.loss - loss).abs() <= 1e-3 * loss.max(1.0), "loss {fmt}/{k}: ours {} vs {loss}", out.loss);
        }
    }
}

/// bf16 / fp16 base weights: a training step runs, the loss is finite, the LoRA weights stay
/// f32 and train, and the base weights have the asked precision.
#[test]
fn reduced_precision_bases_train_f32_lora() {
    let Some((dir, _)) = tiny("reduced_precision_bases_train_f32_lora") else { return };
    for (precision, kind) in [("bf16", tch::Kind::BFloat16), ("fp16", tch::Kind::Half)] {
        let mut m = create(&config(dir, serde_json::json!({"precision": precision})), 3);
        assert!(base(&m).iter().all(|(_, t)| t.kind() == kind), "{precision}");
        let before = snapshot(m.lora_parameters());
        assert!(before.iter().all(|(_, t)| t.kind() == tch::Kind::Float), "{precision}: LoRA must be f32");
        let target = images(2, 3);
        let out = forward(&mut m, &[("target", &target)], Some(&CAPTIONS), &seeds(1, 1, 2), ForwardMode::Train);
        assert!(out.loss.is_finite() && out.get("pixels").data.iter().all(|v| v.is_finite()), "{precision}");
        m.backward_scaled(&[], 1.0).unwrap();
        m.optimizer_step_groups(opt(1), &[]).unwrap();
        let changed = before.iter().zip(m.lora_parameters().iter()).filter(|((_, a), (_, b))| !bit_equal(a, b)).count();
        assert!(changed * 2 >= before.len(), "{precision}: {changed} of {} LoRA tensors trained", before.len());
    }
}

/// `gradient_checkpointing = true` gives the plain backward's gradients, through everything a
/// training step back-propagates: the diffusion loss with min-SNR weights, a `pixels` gradient
/// through the VAE decode into the checkpointed UNet, text-encoder LoRA (the context gradient
/// the tape hands back) and LoRA dropout (reseeded per UNet segment in both modes).
///
/// Tolerance, fp64: the two backwards differ only in how gradients read by several segments
/// are summed (see core/diffusion-torch/tests/checkpoint.rs): ≲ 40 layers × 16 readers × ε ≈
/// 7e-14 relative; bound 1e-11 of the largest gradient (100× margin).
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let Some((dir, _)) = tiny("gradient_checkpointing_gives_the_same_gradients") else { return };
    let base = serde_json::json!({"precision": "fp64", "train_text_encoder": true, "lora_dropout": 0.2,
        "min_snr_gamma": 5.0});
    let mut with = base.clone();
    with["gradient_checkpointing"] = true.into();
    let grads = |extra: serde_json::Value| {
        let mut m = create(&config(dir, extra), 4);
        // Non-zero lora_B (it starts at 0, which would make every lora_A gradient 0), the same
        // values in both instances.
        common::perturb_lora(&m, 70);
        let target = images(2, 8);
        let sd = seeds(5, 1, 2);
        let out = forward(&mut m, &[("target", &target)], Some(&CAPTIONS), &sd, ForwardMode::Train);
        let px = out.get("pixels");
        let g = CpuTensor::new(px.shape.clone(), likeness_sdk::testing::uniform_f32(31, px.data.len(), -1.0, 1.0));
        m.backward_scaled(&[ScaledView { name: RStr::from_str("pixels"), view: g.view(), scale: 0.5 }], 1.0).unwrap();
        let g: Vec<(String, Tensor)> = m.lora_parameters().into_iter().map(|(n, p)| (n, p.grad().copy())).collect();
        (g, out.loss)
    };
    let (plain, loss_plain) = grads(base);
    let (ckpt, loss_ckpt) = grads(with);
    assert_eq!(loss_plain.to_bits(), loss_ckpt.to_bits(), "the checkpointed forward computes the same loss");
    assert!(plain.iter().any(|(n, _)| n.starts_with("text_encoder.")));
    let scale = plain.iter().map(|(_, g)| g.abs().max().double_value(&[])).fold(0f64, f64::max);
    let mut worst = 0f64;
    for ((n, a), (_, b)) in plain.iter().zip(ckpt.iter()) {
        assert!(a.defined() && b.defined(), "{n}: no gradient");
        worst = worst.max((a - b).abs().max().double_value(&[]));
    }
    eprintln!("gradient checkpointing: max |Δg| = {worst:.3e} (max |g| {scale:.3e}) over {} tensors", plain.len());
    assert!(scale > 0.0 && worst <= 1e-11 * scale, "checkpointed gradients differ by {worst:e} (max |g| {scale:e})");
}

/// With every encoding given (as the engine's cache passes them) and `decode_pixels = false`, a
/// training step never loads the VAE or the text encoder; `encode` loads them on first use, and
/// `parameters()` counts them the same before and after.
#[test]
fn encoders_load_on_first_use() {
    let Some((dir, _)) = tiny("encoders_load_on_first_use") else { return };
    let cfg = config(dir, serde_json::json!({"decode_pixels": false}));
    let mut source = create(&cfg, 2);
    let target = images(2, 4);
    let strs: Vec<RStr<'_>> = CAPTIONS.iter().map(|s| RStr::from_str(s)).collect();
    let texts = [NamedTexts { name: RStr::from_str("caption"), texts: RSlice::from_slice(&strs) }];
    let views = [NamedView { name: RStr::from_str("target"), view: target.view() }];
    let mut enc = |name: &str| {
        let o = source
            .encode(name, Inputs::new(RSlice::from_slice(&views)), Texts::new(RSlice::from_slice(&texts)))
            .unwrap();
        CpuTensor::<f32>::from_managed(&o[0].1, name).unwrap()
    };
    let (latents, emb) = (enc("latents"), enc("text_embeddings"));
    assert_eq!(source.encoders_loaded(), (true, true), "encode loads what it needs");

    let mut m = create(&cfg, 2);
    assert_eq!(m.encoders_loaded(), (false, false));
    let counted = m.parameters().unwrap();
    let sd = seeds(3, 1, 2);
    let out = forward(&mut m, &[("latents", &latents), ("text_embeddings", &emb)], None, &sd, ForwardMode::Train);
    assert!(out.loss.is_finite());
    let g = grads_after_backward(&mut m);
    assert!(g.iter().all(|(_, t)| t.defined()));
    m.optimizer_step_groups(opt(1), &[]).unwrap();
    assert_eq!(m.encoders_loaded(), (false, false), "a cached step must not load the VAE or the text encoder");
    // Loading them changes no count.
    let loaded: i64 = m.base_parameters().unwrap().iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(m.encoders_loaded(), (true, true));
    let trainable: i64 = m.lora_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(counted.total as i64, loaded + trainable);
    assert_eq!(m.parameters().unwrap().total, counted.total);
}

/// `flux_shift` is a flow-matching timestep scheme; SD1.5 is DDPM: refused by name at creation.
#[test]
fn flux_shift_is_refused_for_ddpm() {
    let Some((dir, _)) = tiny("flux_shift_is_refused_for_ddpm") else { return };
    let e = Sd15Lora::create(&config(dir, serde_json::json!({"timestep_sampling": "flux_shift"})), Device::CPU, 0)
        .err()
        .expect("refused")
        .message;
    assert!(e.contains("timestep_sampling") && e.contains("flux_shift"), "{e}");
}
