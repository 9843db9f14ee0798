//! The real SD1.5 UNet and VAE built by shape only (Plan mode: no per-parameter memory) have
//! exactly the tensor names and shapes of the real checkpoint (tests/data manifests), and the
//! LDM map is a bijection onto single-file names.

use likeness_diffusion_torch::{
    ldm, load, AutoencoderKL, ClipTextConfig, ClipTextModel, Mode, Store, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use tch::{Device, Kind};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn manifest(name: &str) -> BTreeMap<String, Vec<i64>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data(name)).unwrap()).unwrap();
    v["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
        .collect()
}

fn compare(ours: Vec<(String, Vec<i64>)>, want: &BTreeMap<String, Vec<i64>>, what: &str) {
    let ours: BTreeMap<String, Vec<i64>> = ours.into_iter().collect();
    let missing: Vec<_> = want.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want.iter().filter(|(k, s)| ours.get(*k).is_some_and(|o| o != *s)).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{what}: missing {missing:?}\nextra {extra:?}\nwrong {wrong:?}"
    );
}

#[test]
fn sd15_unet_layout_equals_the_real_checkpoint() {
    let cfg = UNetConfig::from_file(&data("sd15_unet_config.json")).unwrap();
    let store = Store::new(Mode::Plan, Kind::Float, Device::Cpu);
    let _unet = UNet2DConditionModel::new(&store, &cfg);
    let want = manifest("sd15_unet_diffusers.json");
    compare(store.shapes(), &want, "unet");
    let n: i64 = store.shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    assert_eq!(n, 859_520_964, "the manifest's num_params");
    // The LDM names are distinct (a bijection), and carry SD1.5's known single-file landmarks.
    let l = load::ldm_shapes(&store, ldm::UNET_PREFIX, |k| ldm::unet_to_ldm(k, &cfg).map(|x| (x, false))).unwrap();
    let names: HashSet<_> = l.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(names.len(), want.len());
    let l: BTreeMap<_, _> = l.into_iter().collect();
    // Landmarks of v1-5-pruned.safetensors (names and shapes from the original LDM layout).
    for (k, s) in [
        ("model.diffusion_model.input_blocks.0.0.weight", vec![320, 4, 3, 3]),
        ("model.diffusion_model.input_blocks.3.0.op.weight", vec![320, 320, 3, 3]),
        ("model.diffusion_model.input_blocks.4.0.skip_connection.weight", vec![640, 320, 1, 1]),
        ("model.diffusion_model.input_blocks.11.0.emb_layers.1.weight", vec![1280, 1280]),
        ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", vec![1280, 768]),
        ("model.diffusion_model.middle_block.2.out_layers.3.weight", vec![1280, 1280, 3, 3]),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", vec![1280, 1280, 3, 3]),
        ("model.diffusion_model.output_blocks.5.2.conv.weight", vec![1280, 1280, 3, 3]),
        ("model.diffusion_model.output_blocks.11.1.proj_out.weight", vec![320, 320, 1, 1]),
        ("model.diffusion_model.time_embed.2.bias", vec![1280]),
        ("model.diffusion_model.out.2.weight", vec![4, 320, 3, 3]),
    ] {
        assert_eq!(l.get(k), Some(&s), "{k}");
    }
}

#[test]
fn sd15_vae_layout_equals_the_real_checkpoint() {
    let cfg = VaeConfig::from_file(&data("sd15_vae_config.json")).unwrap();
    assert_eq!(cfg.scaling_factor, 0.18215);
    let store = Store::new(Mode::Plan, Kind::Float, Device::Cpu);
    let _vae = AutoencoderKL::new(&store, &cfg);
    let want = manifest("sd15_vae_diffusers.json");
    compare(store.shapes(), &want, "vae");
    let n: i64 = store.shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    assert_eq!(n, 83_653_863);
    let l = load::ldm_shapes(&store, ldm::VAE_PREFIX, |k| ldm::vae_to_ldm(k, 4)).unwrap();
    let l: BTreeMap<_, _> = l.into_iter().collect();
    assert_eq!(l.len(), want.len());
    for (k, s) in [
        ("first_stage_model.encoder.mid.attn_1.q.weight", vec![512, 512, 1, 1]),
        ("first_stage_model.decoder.mid.attn_1.proj_out.weight", vec![512, 512, 1, 1]),
        ("first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", vec![128, 256, 1, 1]),
        ("first_stage_model.decoder.up.3.upsample.conv.weight", vec![512, 512, 3, 3]),
        ("first_stage_model.encoder.down.0.downsample.conv.weight", vec![128, 128, 3, 3]),
        ("first_stage_model.encoder.norm_out.weight", vec![512]),
        ("first_stage_model.quant_conv.weight", vec![8, 8, 1, 1]),
    ] {
        assert_eq!(l.get(k), Some(&s), "{k}");
    }
}

#[test]
fn sd15_text_encoder_layout_equals_the_real_checkpoint() {
    let cfg = ClipTextConfig::from_file(&data("sd15_text_encoder_config.json")).unwrap();
    assert_eq!(cfg, ClipTextConfig::sd15());
    let store = Store::new(Mode::Plan, Kind::Float, Device::Cpu);
    let _te = ClipTextModel::new(&store, &cfg);
    // The manifest holds transformers 5's names (no `text_model.` prefix); SD1.5's files and
    // this crate use `text_model.…`.
    let want: BTreeMap<String, Vec<i64>> =
        manifest("sd15_text_encoder_clip_l.json").into_iter().map(|(k, s)| (format!("text_model.{k}"), s)).collect();
    compare(store.shapes(), &want, "text encoder");
    let n: i64 = store.shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    assert_eq!(n, 123_060_480, "the manifest's num_params");
    // Every projection and MLP layer is a LoRA target under its transformers module path.
    let targets: HashSet<String> = store.targets().into_iter().map(|t| t.path).collect();
    assert_eq!(targets.len(), 12 * 6);
    for t in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"] {
        assert!(targets.contains(&format!("text_model.encoder.layers.11.{t}")), "{t}");
    }
}

#[test]
fn plan_mode_allocates_no_parameter_memory() {
    // Every planned parameter is a stride-0 view of one element: the 860 M-parameter UNet costs
    // nothing, which is what lets the layout tests run in CI.
    let cfg = UNetConfig::from_file(&data("sd15_unet_config.json")).unwrap();
    let store = Store::new(Mode::Plan, Kind::Float, Device::Cpu);
    let _unet = UNet2DConditionModel::new(&store, &cfg);
    for (n, t) in store.named_parameters() {
        // (a size-1 dimension keeps stride 1: it spans nothing either way)
        let spans = t.size().iter().zip(t.stride()).any(|(&d, s)| d > 1 && s != 0);
        assert!(!spans, "{n} is allocated");
    }
}

#[test]
fn bad_config_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("sd15_unet_config.json")).unwrap()).unwrap();
    v["up_block_types"][0] = "AttnUpBlock2D".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = UNetConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("up_block_types") && e.contains("AttnUpBlock2D"), "{e}");
    v["up_block_types"][0] = "UpBlock2D".into();
    v["class_embed_type"] = "timestep".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = UNetConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("class_embed_type"), "{e}");
}
