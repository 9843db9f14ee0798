//! Qwen-Image(-Edit-2509) LoRA key maps, pure Rust: every format round-trips a LoRA over all 840
//! musubi-tuner modules of the 60-block transformer plus the 6 top-level Linears, the files carry
//! the names musubi / diffusers / peft / ComfyUI use, Qwen files are told apart from Flux ones,
//! and a key that maps to no module is an error naming the file and the key. The loaders
//! themselves are checked in tests/lora_qwen_oracle.rs.

use likeness_diffusion::lora_keys::{self, qwen, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

fn tensor(dtype: Dtype, shape: Vec<usize>, seed: u32) -> RawTensor {
    let n: usize = shape.iter().product();
    // Multiples of 1/128 below 0.5: exact in f32 and bf16, so round trips compare bit for bit.
    let v: Vec<f32> = (0..n).map(|i| ((i as u32 ^ seed) % 97) as f32 / 128.0 - 0.375).collect();
    RawTensor::from_f32(dtype, shape, &v).unwrap()
}

/// Every musubi module of `blocks` blocks plus the top-level Linears: ranks 2 / 3, alphas ≠ rank
/// (scales 0.5, 2, 1/3, 1.5), small made-up widths (the readers check LoRA shapes, not the
/// model's), the top-level modules in bf16 (alpha must still be written as fp32).
fn full_set(blocks: usize) -> LoraSet {
    let paths = qwen::musubi_modules(blocks).into_iter().chain(qwen::TOP_LEVEL.iter().map(|s| s.to_string()));
    let modules = paths
        .enumerate()
        .map(|(i, path)| {
            let r = 2 + i % 2;
            let dtype = if qwen::TOP_LEVEL.contains(&path.as_str()) { Dtype::BF16 } else { Dtype::F32 };
            LoraModule {
                component: Component::Transformer,
                down: tensor(dtype, vec![r, 4 + i % 3], i as u32),
                up: tensor(dtype, vec![3 + i % 4, r], 7919 + i as u32),
                alpha: [1.0, 4.0, 1.0, 4.5][i % 4],
                path,
            }
        })
        .collect();
    LoraSet { format: LoraFormat::Kohya, arch: BaseArch::QwenImage, modules, metadata: BTreeMap::new() }
}

fn raw(file: &Path) -> BTreeMap<String, (Dtype, Vec<usize>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter().map(|(k, v)| (k.to_string(), (v.dtype(), v.shape().to_vec()))).collect()
}

fn sorted(set: &LoraSet) -> Vec<&LoraModule> {
    let mut m: Vec<&LoraModule> = set.modules.iter().collect();
    m.sort_by(|a, b| a.path.cmp(&b.path));
    m
}

fn assert_exact(a: &LoraSet, b: &LoraSet, what: &str) {
    assert_eq!(a.modules.len(), b.modules.len(), "{what}: module count");
    for (x, y) in sorted(a).into_iter().zip(sorted(b)) {
        assert_eq!((x.component, &x.path), (y.component, &y.path), "{what}");
        assert_eq!((&x.down.shape, &x.down.data), (&y.down.shape, &y.down.data), "{what} {} down", x.path);
        assert_eq!((&x.up.shape, &x.up.data), (&y.up.shape, &y.up.data), "{what} {} up", x.path);
        assert_eq!(x.alpha, y.alpha, "{what} {} alpha", x.path);
    }
}

/// Same ΔW = alpha / r · up @ down: the diffusers file folds alpha / r into up, one rounding in
/// the weights' dtype (≤ 2⁻⁸ relative for bf16, 2⁻²⁴ for f32) per up element.
fn assert_same_delta(a: &LoraSet, b: &LoraSet, what: &str) {
    assert_eq!(a.modules.len(), b.modules.len(), "{what}: module count");
    for (x, y) in sorted(a).into_iter().zip(sorted(b)) {
        assert_eq!(x.path, y.path, "{what}");
        let u = if x.up.dtype == Dtype::BF16 { 2f64.powi(-8) } else { 2f64.powi(-24) };
        let (dx, dy) = (x.delta(), y.delta());
        let scale = dx.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (p, q)) in dx.iter().zip(&dy).enumerate() {
            assert!((p - q).abs() <= 2.0 * u * scale * x.rank() as f64, "{what} {}[{i}]: {p} vs {q}", x.path);
        }
    }
}

#[test]
fn every_musubi_and_top_level_module_round_trips_through_all_four_formats() {
    let dir = tempfile::tempdir().unwrap();
    let set = full_set(qwen::NUM_BLOCKS);
    assert_eq!(set.modules.len(), 846);
    let kohya = dir.path().join("kohya.safetensors");
    lora_keys::write(&set, LoraFormat::Kohya, &kohya).unwrap();
    let keys = raw(&kohya);
    assert_eq!(keys.len(), 3 * 846, "down, up and alpha for every module");
    for m in &set.modules {
        let n = format!("lora_unet_{}", m.path.replace('.', "_"));
        assert_eq!(keys[&format!("{n}.alpha")], (Dtype::F32, vec![]), "{n}: a 0-d fp32 alpha on every module");
        assert!(
            keys.contains_key(&format!("{n}.lora_down.weight")) && keys.contains_key(&format!("{n}.lora_up.weight"))
        );
    }
    for k in [
        "lora_unet_transformer_blocks_0_attn_to_out_0.lora_down.weight",
        "lora_unet_transformer_blocks_59_img_mlp_net_0_proj.lora_up.weight",
        "lora_unet_transformer_blocks_0_img_mod_1.alpha",
        "lora_unet_transformer_blocks_7_attn_add_k_proj.alpha",
        "lora_unet_norm_out_linear.alpha",
        "lora_unet_time_text_embed_timestep_embedder_linear_2.lora_down.weight",
    ] {
        assert!(keys.contains_key(k), "musubi's spelling {k}");
    }
    let back = lora_keys::read(&kohya).unwrap();
    assert_eq!((back.format, back.arch), (LoraFormat::Kohya, BaseArch::QwenImage));
    assert_eq!(lora_keys::detect(&kohya).unwrap(), (LoraFormat::Kohya, BaseArch::QwenImage));
    assert_exact(&set, &back, "kohya");

    let comfy = dir.path().join("comfy.safetensors");
    lora_keys::write(&set, LoraFormat::ComfyUi, &comfy).unwrap();
    assert_exact(&set, &lora_keys::read(&comfy).unwrap(), "comfyui");

    let diff = dir.path().join("diffusers");
    lora_keys::write(&set, LoraFormat::Diffusers, &diff).unwrap();
    let dkeys = raw(&diff.join("pytorch_lora_weights.safetensors"));
    assert_eq!(dkeys.len(), 2 * 846, "lora_A / lora_B only: alpha is folded into lora_B");
    assert!(dkeys.contains_key("transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"));
    assert!(dkeys.contains_key("transformer.time_text_embed.timestep_embedder.linear_1.lora_B.weight"));
    let dset = lora_keys::read(&diff).unwrap();
    assert_eq!((dset.format, dset.arch), (LoraFormat::Diffusers, BaseArch::QwenImage));
    assert_same_delta(&set, &dset, "diffusers");

    let peft = dir.path().join("peft");
    lora_keys::write(&set, LoraFormat::Peft, &peft).unwrap();
    let pkeys = raw(&peft.join("adapter_model.safetensors"));
    assert!(pkeys.contains_key("base_model.model.transformer_blocks.59.txt_mod.1.lora_A.weight"));
    assert!(pkeys.contains_key("base_model.model.img_in.lora_B.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 846);
    let pset = lora_keys::read(&peft).unwrap();
    assert_eq!((pset.format, pset.arch), (LoraFormat::Peft, BaseArch::QwenImage));
    assert_exact(&set, &pset, "peft");

    // A chain through every format keeps ΔW (one fold, in diffusers).
    let mut cur = back;
    for (i, f) in
        [LoraFormat::Diffusers, LoraFormat::Peft, LoraFormat::ComfyUi, LoraFormat::Kohya].into_iter().enumerate()
    {
        let out = dir.path().join(format!("chain{i}.safetensors"));
        let out = if f == LoraFormat::Peft { dir.path().join(format!("chain{i}")) } else { out };
        lora_keys::write(&cur, f, &out).unwrap();
        cur = lora_keys::read(&out).unwrap();
        assert_eq!(cur.arch, BaseArch::QwenImage, "{f}");
    }
    assert_same_delta(&set, &cur, "kohya → diffusers → peft → comfyui → kohya");
}

/// Named tensors of a hand-made file.
type Tensors = Vec<(String, RawTensor)>;

fn ab(stem: &str, down: &str, up: &str) -> Tensors {
    vec![
        (format!("{stem}{down}"), tensor(Dtype::F32, vec![2, 6], 1)),
        (format!("{stem}{up}"), tensor(Dtype::F32, vec![5, 2], 2)),
    ]
}

fn write_raw(path: &Path, tensors: &[(String, RawTensor)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn comfyui_and_other_tools_spellings_read_as_qwen_image() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    let (kd, ku) = (".lora_down.weight", ".lora_up.weight");
    let (da, db) = (".lora_A.weight", ".lora_B.weight");
    // (stems + suffixes, format read, canonical path): ComfyUI's QwenImage rules
    // (comfy/lora.py model_lora_keys_unet) and PEFT's `.default` spelling.
    let cases: Vec<(Tensors, LoraFormat, &str)> = vec![
        (
            ab("diffusion_model.transformer_blocks.3.img_mlp.net.2", kd, ku),
            LoraFormat::ComfyUi,
            "transformer_blocks.3.img_mlp.net.2",
        ),
        (ab("transformer_blocks.1.txt_mod.1", da, db), LoraFormat::ComfyUi, "transformer_blocks.1.txt_mod.1"),
        (
            ab("lycoris_transformer_blocks_2_img_mlp_net_0_proj", kd, ku),
            LoraFormat::ComfyUi,
            "transformer_blocks.2.img_mlp.net.0.proj",
        ),
        (
            ab("transformer.transformer_blocks.0.img_mod.1", ".lora_A.default.weight", ".lora_B.default.weight"),
            LoraFormat::Diffusers,
            "transformer_blocks.0.img_mod.1",
        ),
        (ab("transformer.txt_in", da, db), LoraFormat::Diffusers, "txt_in"),
    ];
    for (t, format, path) in cases {
        write_raw(&f, &t);
        let set = lora_keys::read(&f).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((set.format, set.arch), (format, BaseArch::QwenImage), "{path}");
        assert_eq!(set.modules.len(), 1);
        assert_eq!((set.modules[0].component, set.modules[0].path.as_str()), (Component::Transformer, path));
        assert_eq!(set.modules[0].alpha, 2.0, "no alpha key: alpha = r (scale 1), as every loader does");
    }
}

#[test]
fn qwen_image_and_flux_files_are_told_apart_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    let (kd, ku) = (".lora_down.weight", ".lora_up.weight");
    let (da, db) = (".lora_A.weight", ".lora_B.weight");
    let cases: Vec<(Tensors, LoraFormat, BaseArch)> = vec![
        (ab("lora_unet_transformer_blocks_0_img_mod_1", kd, ku), LoraFormat::Kohya, BaseArch::QwenImage),
        (ab("lora_unet_transformer_blocks_5_txt_mlp_net_0_proj", kd, ku), LoraFormat::Kohya, BaseArch::QwenImage),
        (ab("lora_unet_double_blocks_0_img_mod_lin", kd, ku), LoraFormat::Kohya, BaseArch::Flux),
        (ab("transformer.transformer_blocks.0.img_mlp.net.0.proj", da, db), LoraFormat::Diffusers, BaseArch::QwenImage),
        (ab("transformer.transformer_blocks.0.ff.net.0.proj", da, db), LoraFormat::Diffusers, BaseArch::Flux),
        (ab("transformer.transformer_blocks.0.norm1.linear", da, db), LoraFormat::Diffusers, BaseArch::Flux),
        (ab("diffusion_model.transformer_blocks.9.img_mod.1", kd, ku), LoraFormat::ComfyUi, BaseArch::QwenImage),
    ];
    for (t, format, arch) in cases {
        write_raw(&f, &t);
        assert_eq!(lora_keys::detect(&f).unwrap(), (format, arch), "{}", t[0].0);
        assert_eq!(lora_keys::read(&f).unwrap().arch, arch, "{}", t[0].0);
    }
    // A PEFT folder (the arch comes from the weights' names).
    let set = full_set(1);
    let p = dir.path().join("peft");
    lora_keys::write(&set, LoraFormat::Peft, &p).unwrap();
    assert_eq!(lora_keys::detect(&p).unwrap(), (LoraFormat::Peft, BaseArch::QwenImage));
}

#[test]
fn a_key_that_maps_to_no_qwen_module_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.safetensors");
    let (kd, ku) = (".lora_down.weight", ".lora_up.weight");
    let good = ab("lora_unet_transformer_blocks_0_img_mod_1", kd, ku);
    for (stem, want) in [
        // A norm is no LoRA target (and diffusers / ComfyUI would drop it silently).
        ("lora_unet_transformer_blocks_0_attn_norm_q", "not a LoRA-targetable Qwen-Image module"),
        // txt_norm is an RMSNorm, not a Linear.
        ("lora_unet_txt_norm", "not a LoRA-targetable Qwen-Image module"),
        ("te.transformer_blocks.0.img_mod.1", "unknown prefix for a Qwen-Image LoRA"),
    ] {
        let mut t = good.clone();
        t.extend(ab(stem, kd, ku));
        write_raw(&f, &t);
        let e = lora_keys::read(&f).unwrap_err();
        let s = e.to_string();
        assert!(s.contains(&format!("{stem}.lora_")), "the key: {s}");
        assert!(s.contains("bad.safetensors") && s.contains(want), "{s}");
    }
    // Writing refuses a module the grammar does not know, naming it.
    let mut set = full_set(1);
    set.modules[0].path = "transformer_blocks.0.attn.norm_k".into();
    let s = lora_keys::write(&set, LoraFormat::Kohya, &dir.path().join("o.safetensors")).unwrap_err().to_string();
    assert!(s.contains("transformer_blocks.0.attn.norm_k") && s.contains("qwen-image"), "{s}");
}
