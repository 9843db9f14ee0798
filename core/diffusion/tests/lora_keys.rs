//! The SD1.5 module map against the real checkpoint's tensor list (core/diffusion-torch's
//! tests/data manifests: every name and shape of SD1.5's UNet and CLIP-L), and the readers /
//! writers on a LoRA over every targetable module. Pure Rust, no venv.

use likeness_diffusion::lora_keys::{self, sd15, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use likeness_diffusion::DiffusionError;
use safetensors::Dtype;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn manifest(name: &str) -> BTreeMap<String, Vec<usize>> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffusion-torch/tests/data").join(name);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect()
}

/// (module path, weight shape) of every Linear / Conv2d weight (≥ 2-D) of the real SD1.5 UNet.
fn unet_weights() -> Vec<(String, Vec<usize>)> {
    manifest("sd15_unet_diffusers.json")
        .into_iter()
        .filter_map(|(k, s)| k.strip_suffix(".weight").filter(|_| s.len() >= 2).map(|p| (p.to_string(), s)))
        .collect()
}

#[test]
fn every_sd15_unet_linear_and_conv_is_targetable_and_norms_are_not() {
    let m = manifest("sd15_unet_diffusers.json");
    let mut n = 0;
    for (k, s) in &m {
        let Some(p) = k.strip_suffix(".weight") else { continue };
        let kind = sd15::unet_module(p);
        match s.len() {
            1 => assert_eq!(kind, None, "{p} is a norm, not a LoRA target"),
            2 => {
                assert!(matches!(kind, Some(sd15::LayerKind::Linear | sd15::LayerKind::LinearOrConv)), "{p}: {kind:?}")
            }
            4 => assert!(matches!(kind, Some(sd15::LayerKind::Conv | sd15::LayerKind::LinearOrConv)), "{p}: {kind:?}"),
            _ => panic!("{k}: unexpected rank {s:?}"),
        }
        n += usize::from(s.len() >= 2);
    }
    assert!(n > 250, "only {n} LoRA targets found: wrong manifest?");
}

#[test]
fn sd15_ldm_map_is_a_bijection_on_the_real_unet() {
    let layout = sd15::Sd15Layout::sd15();
    let mut seen = HashMap::new();
    for (p, _) in unet_weights() {
        let l = sd15::unet_to_ldm(&p, &layout).unwrap_or_else(|| panic!("{p} has no LDM name"));
        if let Some(prev) = seen.insert(l.clone(), p.clone()) {
            panic!("{p} and {prev} both map to {l}");
        }
        assert_eq!(sd15::unet_from_ldm(&l, 2).as_deref(), Some(p.as_str()), "{l} does not map back");
        // The kohya spellings (`.` → `_`) of both names parse back to the dotted names.
        assert_eq!(sd15::dotted(&p.replace('.', "_")), p);
        assert_eq!(sd15::dotted(&l.replace('.', "_")), l);
    }
}

#[test]
fn clip_l_targets_are_the_encoder_projections() {
    let mut n = 0;
    for (k, s) in manifest("sd15_text_encoder_clip_l.json") {
        let Some(p) = k.strip_suffix(".weight") else { continue };
        // The manifest has transformers 5 names (no `text_model.`); canonical paths keep it.
        let canon = format!("text_model.{p}");
        let want = s.len() == 2 && p.starts_with("encoder.layers.");
        assert_eq!(sd15::text_encoder_module(&canon).is_some(), want, "{canon} {s:?}");
        if want {
            assert_eq!(sd15::dotted(&canon.replace('.', "_")), canon);
        }
        n += usize::from(want);
    }
    assert_eq!(n, 12 * 6, "CLIP-L: 12 layers × (q, k, v, out_proj, fc1, fc2)");
}

fn tensor(shape: Vec<usize>, seed: u32) -> RawTensor {
    let n: usize = shape.iter().product();
    // Small distinct values: exact in f32, so round trips compare bit for bit.
    let v: Vec<f32> = (0..n).map(|i| ((i as u32 ^ seed) % 97) as f32 / 128.0 - 0.375).collect();
    RawTensor::from_f32(Dtype::F32, shape, &v).unwrap()
}

/// A rank-1 LoRA on every targetable module of the real SD1.5 UNet and CLIP-L (≈ 3 MB).
fn full_set() -> LoraSet {
    let mut modules = Vec::new();
    for (i, (p, s)) in unet_weights().into_iter().enumerate() {
        let (down, up) = if s.len() == 4 {
            (vec![1, s[1], s[2], s[3]], vec![s[0], 1, 1, 1])
        } else {
            (vec![1, s[1]], vec![s[0], 1])
        };
        modules.push(LoraModule {
            component: Component::Unet,
            path: p,
            down: tensor(down, i as u32),
            up: tensor(up, 7 * i as u32),
            alpha: 0.5,
        });
    }
    for (k, s) in manifest("sd15_text_encoder_clip_l.json") {
        let Some(p) = k.strip_suffix(".weight") else { continue };
        if s.len() == 2 && p.starts_with("encoder.layers.") {
            modules.push(LoraModule {
                component: Component::TextEncoder,
                path: format!("text_model.{p}"),
                down: tensor(vec![1, s[1]], 3),
                up: tensor(vec![s[0], 1], 5),
                alpha: 2.0,
            });
        }
    }
    LoraSet { format: LoraFormat::Kohya, arch: BaseArch::Sd15, modules, metadata: BTreeMap::new() }
}

fn by_name(set: &LoraSet) -> BTreeMap<(Component, String), &LoraModule> {
    set.modules.iter().map(|m| ((m.component, m.path.clone()), m)).collect()
}

#[test]
fn every_format_round_trips_the_full_sd15_module_set() {
    let dir = tempfile::tempdir().unwrap();
    let set = full_set();
    for (to, out, back) in [
        (LoraFormat::Kohya, "k.safetensors", LoraFormat::Kohya),
        (LoraFormat::ComfyUi, "c.safetensors", LoraFormat::Kohya),
        (LoraFormat::Diffusers, "d", LoraFormat::Diffusers),
        (LoraFormat::Peft, "p", LoraFormat::Peft),
    ] {
        let out = dir.path().join(out);
        let files = lora_keys::write(&set, to, &out).unwrap();
        assert!(files.iter().all(|f| f.is_file()), "{files:?}");
        let r = lora_keys::read(&out).unwrap();
        assert_eq!(r.format, back, "{to}");
        let (a, b) = (by_name(&set), by_name(&r));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{to}");
        for (k, m) in &a {
            let o = b[k];
            assert_eq!((&m.down.shape, &m.down.data), (&o.down.shape, &o.down.data), "{to} {k:?}");
            if to == LoraFormat::Diffusers {
                // Folded: up·alpha/r with alpha/r = 1 (read back). Exact here: the values are
                // multiples of 2⁻⁷ and alpha/r (0.5 or 2) is a power of two.
                let s = (m.alpha / m.rank() as f64) as f32;
                let want: Vec<f32> = m.up.to_f32().unwrap().iter().map(|x| x * s).collect();
                assert_eq!((o.up.to_f32().unwrap(), o.alpha), (want, o.rank() as f64), "{to} {k:?}");
            } else {
                assert_eq!((m.alpha, &m.up.shape, &m.up.data), (o.alpha, &o.up.shape, &o.up.data), "{to} {k:?}");
            }
        }
    }
}

fn write_raw(path: &Path, tensors: Vec<(String, RawTensor)>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn ldm_spelled_kohya_reads_as_diffusers_paths() {
    let dir = tempfile::tempdir().unwrap();
    let set = full_set();
    let layout = sd15::Sd15Layout::sd15();
    let mut raw = Vec::new();
    for m in set.modules.iter().filter(|m| m.component == Component::Unet) {
        let stem = format!("lora_unet_{}", sd15::unet_to_ldm(&m.path, &layout).unwrap().replace('.', "_"));
        raw.push((format!("{stem}.lora_down.weight"), m.down.clone()));
        raw.push((format!("{stem}.lora_up.weight"), m.up.clone()));
        raw.push((format!("{stem}.alpha"), RawTensor::from_f32(Dtype::F16, vec![], &[m.alpha as f32]).unwrap()));
    }
    let f = dir.path().join("ldm.safetensors");
    write_raw(&f, raw);
    let r = lora_keys::read(&f).unwrap();
    let want: BTreeSet<String> =
        set.modules.iter().filter(|m| m.component == Component::Unet).map(|m| m.path.clone()).collect();
    let got: BTreeSet<String> = r.modules.iter().map(|m| m.path.clone()).collect();
    assert_eq!(got, want);
    assert!(r.modules.iter().all(|m| m.alpha == 0.5), "f16 0-d alpha read");
}

fn err_of(f: &Path, tensors: Vec<(String, RawTensor)>) -> DiffusionError {
    write_raw(f, tensors);
    lora_keys::read(f).unwrap_err()
}

#[test]
fn bad_files_name_the_file_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.safetensors");
    let d = || tensor(vec![2, 8], 1);
    let u = || tensor(vec![8, 2], 2);
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

    let e = err_of(
        &f,
        vec![
            (format!("{q}.lora_down.weight"), d()),
            ("lora_unet_down_blocks_0_attentions_0_norm.lora_down.weight".into(), d()),
        ],
    );
    let s = e.to_string();
    assert!(
        s.contains("bad.safetensors") && s.contains("lora_unet_down_blocks_0_attentions_0_norm.lora_down.weight"),
        "{s}"
    );
    assert!(s.contains("not a LoRA-targetable"), "{s}");

    let s = err_of(&f, vec![(format!("{q}.lora_down.weight"), d())]).to_string();
    assert!(s.contains(q) && s.contains("no up"), "{s}");

    let s = err_of(
        &f,
        vec![(format!("{q}.lora_down.weight"), d()), (format!("{q}.lora_up.weight"), tensor(vec![8, 3], 2))],
    )
    .to_string();
    assert!(s.contains("rank mismatch"), "{s}");

    let s = err_of(
        &f,
        vec![(format!("{q}.lora_down.weight"), tensor(vec![2, 8, 3, 3], 1)), (format!("{q}.lora_up.weight"), u())],
    )
    .to_string();
    assert!(s.contains("Linear"), "{s}");

    let s = err_of(
        &f,
        vec![
            (format!("{q}.lora_down.weight"), d()),
            (format!("{q}.lora_up.weight"), u()),
            (format!("{q}.dora_scale"), d()),
        ],
    )
    .to_string();
    assert!(s.contains("DoRA"), "{s}");

    let s = err_of(&f, vec![(format!("{q}.lora_down.weight"), d()), (format!("{q}.hada_w1_a"), d())]).to_string();
    assert!(s.contains("LyCORIS"), "{s}");

    let s = err_of(
        &f,
        vec![
            (format!("{q}.lora_down.weight"), d()),
            (format!("{q}.lora_up.weight"), u()),
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight".into(), d()),
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight".into(), u()),
        ],
    )
    .to_string();
    assert!(s.contains("several layouts"), "{s}");

    // Flux reads now; a fused qkv whose up rows are not 3 equal parts is refused by name.
    let flux = "lora_unet_double_blocks_0_img_attn_qkv";
    let s = err_of(&f, vec![(format!("{flux}.lora_down.weight"), d()), (format!("{flux}.lora_up.weight"), u())])
        .to_string();
    assert!(s.contains(flux) && s.contains("not a multiple of 3"), "{s}");
    assert_eq!(lora_keys::detect(&f).unwrap(), (LoraFormat::Kohya, BaseArch::Flux));

    // Qwen-Image reads now (tests/lora_qwen.rs); a non-target in a Qwen file is refused by name.
    let qwen = "transformer.transformer_blocks.0.img_mlp.net.0.proj";
    let norm = "transformer.transformer_blocks.0.attn.norm_q";
    let mut t = vec![(format!("{qwen}.lora_A.weight"), d()), (format!("{qwen}.lora_B.weight"), u())];
    t.extend([(format!("{norm}.lora_A.weight"), d()), (format!("{norm}.lora_B.weight"), u())]);
    let s = err_of(&f, t).to_string();
    assert!(s.contains("attn.norm_q") && s.contains("not a LoRA-targetable Qwen-Image module"), "{s}");

    let p = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let s = err_of(&f, vec![(format!("{p}.lora_A.weight"), d()), (format!("{p}.lora_B.weight"), u())]).to_string();
    assert!(s.contains("adapter_config.json"), "{s}");

    let s = lora_keys::read(&dir.path().join("nope")).unwrap_err().to_string();
    assert!(s.contains("nope") && s.contains("does not exist"), "{s}");
    let s = lora_keys::read(dir.path()).unwrap_err().to_string();
    assert!(s.contains("adapter_config.json") && s.contains("pytorch_lora_weights.safetensors"), "{s}");
    let s = "lycoris".parse::<LoraFormat>().unwrap_err().to_string();
    assert!(s.contains("kohya, diffusers, peft or comfyui"), "{s}");
}

#[test]
fn peft_config_drives_alpha_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("peft");
    std::fs::create_dir(&p).unwrap();
    let a = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let b = "mid_block.resnets.0.conv1";
    write_raw(
        &p.join("adapter_model.safetensors"),
        vec![
            (format!("base_model.model.{a}.lora_A.weight"), tensor(vec![4, 8], 1)),
            (format!("base_model.model.{a}.lora_B.weight"), tensor(vec![8, 4], 2)),
            (format!("base_model.model.{b}.lora_A.weight"), tensor(vec![2, 8, 3, 3], 3)),
            (format!("base_model.model.{b}.lora_B.weight"), tensor(vec![8, 2, 1, 1], 4)),
        ],
    );
    let cfg = |extra: &str| {
        std::fs::write(
            p.join("adapter_config.json"),
            format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q", "conv1"]{extra}}}"#),
        )
        .unwrap()
    };
    cfg(r#", "rank_pattern": {"resnets.0.conv1": 2}, "alpha_pattern": {"mid_block.resnets.0.conv1": 3}"#);
    let set = lora_keys::read(&p).unwrap();
    let alpha: BTreeMap<&str, f64> = set.modules.iter().map(|m| (m.path.as_str(), m.alpha)).collect();
    assert_eq!(alpha[a], 8.0);
    assert_eq!(alpha[b], 3.0);
    // rsLoRA: scale alpha/√r, i.e. canonical alpha · √r.
    cfg(r#", "rank_pattern": {"resnets.0.conv1": 2}, "use_rslora": true"#);
    let set = lora_keys::read(&p).unwrap();
    assert_eq!(set.modules.iter().find(|m| m.path == a).unwrap().alpha, 16.0);
    cfg("");
    let s = lora_keys::read(&p).unwrap_err().to_string();
    assert!(s.contains("rank 4") && s.contains("rank 2") && s.contains("rank_pattern"), "{s}");
    std::fs::write(
        p.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "target_modules": ["to_k"], "rank_pattern": {"conv1": 2}}"#,
    )
    .unwrap();
    let s = lora_keys::read(&p).unwrap_err().to_string();
    assert!(s.contains("target_modules") && s.contains(a), "{s}");
    std::fs::write(p.join("adapter_config.json"), r#"{"peft_type": "LORA", "use_dora": true}"#).unwrap();
    assert!(lora_keys::read(&p).unwrap_err().to_string().contains("use_dora"));
}

#[test]
fn peft_write_refuses_to_clobber_other_files_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let set = full_set();
    let out: PathBuf = dir.path().join("x");
    lora_keys::write(&set, LoraFormat::Peft, &out).unwrap();
    let first = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let cfg1 = std::fs::read(out.join("text_encoder/adapter_config.json")).unwrap();
    // Rewriting an existing PEFT folder replaces it, byte for byte the same.
    lora_keys::write(&set, LoraFormat::Peft, &out).unwrap();
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), first);
    assert_eq!(std::fs::read(out.join("text_encoder/adapter_config.json")).unwrap(), cfg1);
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let s = lora_keys::write(&set, LoraFormat::Peft, &out).unwrap_err().to_string();
    assert!(s.contains("notes.txt"), "{s}");
    let s = lora_keys::write(&set, LoraFormat::Kohya, &dir.path().join("k.bin")).unwrap_err().to_string();
    assert!(s.contains(".safetensors"), "{s}");
    let cfg: serde_json::Value = serde_json::from_slice(&cfg1).unwrap();
    assert!(cfg["target_modules"][0].as_str().unwrap().starts_with("encoder.layers."), "{cfg}");
}

/// The other spellings ComfyUI and older diffusers write (lora-formats.md; diffusers'
/// `UNET_TO_DIFFUSERS` / `DIFFUSERS_OLD_TO_PEFT`) name the same canonical modules.
#[test]
fn other_spellings_map_to_the_same_modules() {
    let dir = tempfile::tempdir().unwrap();
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let o = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0";
    let te = "text_model.encoder.layers.3.self_attn.k_proj";
    let fc = "text_model.encoder.layers.3.mlp.fc1";
    let d = || tensor(vec![2, 8], 1);
    let u = || tensor(vec![8, 2], 2);
    // (file, format read, [(key stem, component, canonical path)])
    type Case<'a> = (&'a str, LoraFormat, Vec<(String, Component, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "comfy",
            LoraFormat::ComfyUi,
            vec![
                ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_".into(), Component::Unet, q),
                (
                    "lycoris_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_".into(),
                    Component::Unet,
                    o,
                ),
                ("text_model.encoder.layers.3.self_attn.k_proj.lora_".into(), Component::TextEncoder, te),
            ],
        ),
        (
            "old-diffusers",
            LoraFormat::Diffusers,
            vec![
                (
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.".into(),
                    Component::Unet,
                    q,
                ),
                (
                    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out_lora.".into(),
                    Component::Unet,
                    o,
                ),
                ("text_encoder.text_model.encoder.layers.3.self_attn.to_k_lora.".into(), Component::TextEncoder, te),
                (
                    "text_encoder.text_model.encoder.layers.3.mlp.fc1.lora_linear_layer.".into(),
                    Component::TextEncoder,
                    fc,
                ),
            ],
        ),
        (
            "kohya-te1",
            LoraFormat::Kohya,
            vec![("lora_te1_text_model_encoder_layers_3_self_attn_k_proj.lora_".into(), Component::TextEncoder, te)],
        ),
    ];
    for (name, format, keys) in cases {
        let mut raw = Vec::new();
        for (stem, _, _) in &keys {
            // Every stem above ends where its spelling's `down.weight` / `up.weight` follow.
            let (dn, up) = (format!("{stem}down.weight"), format!("{stem}up.weight"));
            raw.push((dn, d()));
            raw.push((up, u()));
        }
        let f = dir.path().join(format!("{name}.safetensors"));
        write_raw(&f, raw);
        let set = lora_keys::read(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(set.format, format, "{name}");
        let got: BTreeSet<(Component, String)> = set.modules.iter().map(|m| (m.component, m.path.clone())).collect();
        let want: BTreeSet<(Component, String)> = keys.iter().map(|(_, c, p)| (*c, p.to_string())).collect();
        assert_eq!(got, want, "{name}");
        assert!(set.modules.iter().all(|m| m.alpha == 2.0), "{name}: no alpha means alpha = r");
    }
}
