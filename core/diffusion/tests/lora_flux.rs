//! Flux.1 LoRA key maps: the diffusers ↔ BFL module map over the real `FluxTransformer2DModel`
//! tensor list (../shared/reference/manifests/flux1_dev_transformer_diffusers.json), the split /
//! merge of the fused layers, architecture detection, and every format's round trip on a LoRA
//! over every module of a tiny Flux. Pure Rust, no venv.

use likeness_diffusion::lora_keys::{self, flux, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use safetensors::Dtype;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn flux_manifest() -> Option<BTreeMap<String, Vec<usize>>> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/manifests/flux1_dev_transformer_diffusers.json");
    let p = likeness_sdk::testing::path_or_skip("lora_flux manifest", &p, "the Flux.1-dev transformer manifest")?;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    Some(
        v["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
            .collect(),
    )
}

#[test]
fn every_flux_linear_is_a_target_and_bfl_names_round_trip_over_the_real_model() {
    let Some(man) = flux_manifest() else { return };
    let linears: BTreeMap<&str, &Vec<usize>> =
        man.iter().filter_map(|(k, s)| k.strip_suffix(".weight").filter(|_| s.len() == 2).map(|p| (p, s))).collect();
    assert_eq!(linears.len(), 19 * 14 + 38 * 6 + 10, "Flux.1-dev's Linear layers");
    let mut fused: BTreeMap<String, flux::BflModule> = BTreeMap::new();
    for p in linears.keys() {
        assert!(flux::transformer_module(p).is_some(), "`{p}` must be LoRA-targetable");
        let (b, at) = flux::to_bfl(p).unwrap_or_else(|| panic!("`{p}` has no BFL name"));
        assert_eq!(b.parts[at], *p, "{p} → {} → back", b.bfl);
        assert_eq!(flux::from_bfl(&b.bfl).as_ref(), Some(&b), "{}", b.bfl);
        // kohya spells the BFL path with `_`: it must come back.
        assert_eq!(flux::dotted(&flux::underscored(&b.bfl)), b.bfl);
        fused.insert(b.bfl.clone(), b);
    }
    // Every BFL module's parts are real layers, and the fused rows split into the real sizes:
    // qkv = 3 equal thirds, linear1 = 3 × the input width + the rest (12288 = 4 × 3072).
    let mut covered = BTreeSet::new();
    for b in fused.values() {
        let rows: Vec<usize> = b.parts.iter().map(|p| linears[p.as_str()][0]).collect();
        let in_dim = linears[b.parts[0].as_str()][1];
        let slices = flux::part_rows(b, rows.iter().sum(), in_dim).unwrap();
        let sizes: Vec<usize> = slices.iter().map(|(a, e)| e - a).collect();
        assert_eq!(sizes, rows, "{}", b.bfl);
        covered.extend(b.parts.iter().cloned());
    }
    assert_eq!(covered.len(), linears.len(), "the BFL modules partition the Linear layers");
    assert_eq!(fused.len(), 19 * 10 + 38 * 3 + 10, "BFL modules (fused qkv and linear1 count once)");
    for (k, s) in &man {
        if s.len() == 1 {
            let p = k.rsplit_once('.').unwrap().0;
            if !linears.contains_key(p) {
                assert!(flux::transformer_module(p).is_none(), "norm `{p}` is not a target");
            }
        }
    }
}

fn tensor(shape: Vec<usize>, seed: u32) -> RawTensor {
    let n: usize = shape.iter().product();
    // Small distinct non-zero values, exact in f32 (round trips compare bit for bit).
    let v: Vec<f32> = (0..n).map(|i| (((i as u32).wrapping_mul(31) ^ seed) % 96) as f32 / 128.0 - 0.37890625).collect();
    RawTensor::from_f32(Dtype::F32, shape, &v).unwrap()
}

const D: usize = 8;

/// (path, [out, in]) of every Linear of a tiny FluxTransformer2DModel: hidden D, 2 double and
/// 2 single blocks, mlp 4·D (the layer names and shape rules of the real model).
fn tiny_flux_linears() -> Vec<(String, [usize; 2])> {
    let d = D;
    let mut v: Vec<(String, [usize; 2])> = vec![
        ("x_embedder".into(), [d, 16]),
        ("context_embedder".into(), [d, 12]),
        ("norm_out.linear".into(), [2 * d, d]),
        ("proj_out".into(), [16, d]),
    ];
    for e in ["timestep_embedder", "guidance_embedder", "text_embedder"] {
        v.push((format!("time_text_embed.{e}.linear_1"), [d, 6]));
        v.push((format!("time_text_embed.{e}.linear_2"), [d, d]));
    }
    for i in 0..2 {
        let b = format!("transformer_blocks.{i}");
        for l in ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"] {
            v.push((format!("{b}.attn.{l}"), [d, d]));
        }
        for f in ["ff", "ff_context"] {
            v.push((format!("{b}.{f}.net.0.proj"), [4 * d, d]));
            v.push((format!("{b}.{f}.net.2"), [d, 4 * d]));
        }
        v.push((format!("{b}.norm1.linear"), [6 * d, d]));
        v.push((format!("{b}.norm1_context.linear"), [6 * d, d]));
        let s = format!("single_transformer_blocks.{i}");
        for l in ["attn.to_q", "attn.to_k", "attn.to_v"] {
            v.push((format!("{s}.{l}"), [d, d]));
        }
        v.push((format!("{s}.proj_mlp"), [4 * d, d]));
        v.push((format!("{s}.proj_out"), [d, 5 * d]));
        v.push((format!("{s}.norm.linear"), [3 * d, d]));
    }
    v
}

fn module(component: Component, path: &str, shape: [usize; 2], r: usize, seed: u32, alpha: f64) -> LoraModule {
    LoraModule {
        component,
        path: path.to_string(),
        down: tensor(vec![r, shape[1]], seed),
        up: tensor(vec![shape[0], r], seed.wrapping_mul(7) + 3),
        alpha,
    }
}

/// Rank 2, alpha 1 on every tiny-Flux Linear, plus a CLIP and a T5 layer.
fn tiny_flux_set() -> LoraSet {
    let mut modules: Vec<LoraModule> = tiny_flux_linears()
        .iter()
        .enumerate()
        .map(|(i, (p, s))| module(Component::Transformer, p, *s, 2, i as u32, 1.0))
        .collect();
    modules.push(module(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj", [6, 6], 2, 91, 2.0));
    modules.push(module(Component::TextEncoder2, "encoder.block.0.layer.1.DenseReluDense.wi_0", [10, 4], 2, 92, 2.0));
    LoraSet { format: LoraFormat::Diffusers, arch: BaseArch::Flux, modules, metadata: BTreeMap::new() }
}

fn by_name(set: &LoraSet) -> BTreeMap<(Component, String), &LoraModule> {
    set.modules.iter().map(|m| ((m.component, m.path.clone()), m)).collect()
}

fn assert_same_deltas(a: &LoraSet, b: &LoraSet, rel: f64, what: &str) {
    let (ma, mb) = (by_name(a), by_name(b));
    assert_eq!(ma.keys().collect::<Vec<_>>(), mb.keys().collect::<Vec<_>>(), "{what}: module sets");
    for (k, m) in &ma {
        let (da, db) = (m.delta(), mb[k].delta());
        assert_eq!(da.len(), db.len(), "{what} {k:?}");
        for (x, y) in da.iter().zip(&db) {
            assert!((x - y).abs() <= rel * x.abs().max(1e-30), "{what} {k:?}: {x} vs {y}");
        }
    }
}

fn safetensors_keys(p: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter().map(|(k, v)| (k.to_string(), v.shape().to_vec())).collect()
}

#[test]
fn every_format_round_trips_a_lora_on_every_tiny_flux_module() {
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_flux_set();
    for (f, out) in [
        (LoraFormat::Kohya, "k.safetensors"),
        (LoraFormat::ComfyUi, "c.safetensors"),
        (LoraFormat::Diffusers, "diff"),
        (LoraFormat::Peft, "peft"),
    ] {
        let out: PathBuf = dir.path().join(out);
        lora_keys::write(&set, f, &out).unwrap();
        let back = lora_keys::read(&out).unwrap();
        assert_eq!(back.arch, BaseArch::Flux, "{f}: read reports the detected architecture");
        assert_eq!(lora_keys::detect(&out).unwrap().1, BaseArch::Flux, "{f}");
        if f == LoraFormat::Diffusers {
            // alpha / r folded into lora_B: one f32 rounding of up·s (s = 1/2 here: exact).
            assert_same_deltas(&set, &back, 0.0, "diffusers");
            continue;
        }
        // kohya: the merged fused layers split back exactly (block-diagonal up, alpha·3 or ·4
        // → back to each part's alpha): the same tensors bit for bit.
        let (a, b) = (by_name(&set), by_name(&back));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{f}: module sets");
        for (k, m) in &a {
            let n = b[k];
            if f != LoraFormat::Peft && ["norm_out.linear", "proj_out"].contains(&k.1.as_str()) {
                // final_layer: alpha / r folded into up (diffusers ignores its alpha); ×0.5 is exact.
                assert_eq!((n.alpha, m.delta()), (n.rank() as f64, n.delta()), "{f} {k:?}");
                continue;
            }
            assert_eq!(
                (&m.down.data, &m.up.data, &m.down.shape, &m.up.shape),
                (&n.down.data, &n.up.data, &n.down.shape, &n.up.shape),
                "{f} {k:?}"
            );
            assert_eq!(m.alpha, n.alpha, "{f} {k:?} alpha");
        }
    }
    let keys = safetensors_keys(&dir.path().join("k.safetensors"));
    let d = D;
    // The BFL layout sd-scripts writes: fused qkv (3·r rank, 3·d rows), linear1 (4 parts).
    for (k, shape) in [
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", vec![3 * d, 6]),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", vec![6, d]),
        ("lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight", vec![3 * d, 6]),
        ("lora_unet_single_blocks_1_linear1.lora_up.weight", vec![3 * d + 4 * d, 8]),
        ("lora_unet_single_blocks_1_linear2.lora_down.weight", vec![2, 5 * d]),
        ("lora_unet_double_blocks_0_img_mod_lin.lora_up.weight", vec![6 * d, 2]),
        ("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight", vec![2 * d, 2]),
        ("lora_unet_guidance_in_out_layer.lora_up.weight", vec![d, 2]),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", vec![6, 2]),
        ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_up.weight", vec![10, 2]),
    ] {
        assert_eq!(keys.get(k), Some(&shape), "{k}");
    }
    assert!(keys.keys().all(|k| !k.contains("to_q")), "no diffusers names in a kohya Flux file");
    let diff = safetensors_keys(&dir.path().join("diff/pytorch_lora_weights.safetensors"));
    assert!(diff.contains_key("transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"));
    assert!(diff.contains_key("text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0.lora_B.weight"));
    assert!(dir.path().join("peft/text_encoder/adapter_config.json").is_file());
    assert!(dir.path().join("peft/text_encoder_2/adapter_config.json").is_file());
}

fn write_raw(path: &Path, tensors: &[(String, RawTensor)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn scalar(x: f32) -> RawTensor {
    RawTensor::from_f32(Dtype::F32, vec![], &[x]).unwrap()
}

/// ΔW of a module's rows [a, b).
fn delta_rows(m: &LoraModule, rows: (usize, usize)) -> Vec<f64> {
    let n = m.down.shape[1];
    m.delta()[rows.0 * n..rows.1 * n].to_vec()
}

#[test]
fn a_fused_bfl_module_splits_exactly_and_merges_back_block_diagonal() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bfl.safetensors");
    let d = D;
    // A dense (trained) fused qkv: one shared down, up rows [q; k; v]; and linear1 = 3d + 4d rows.
    let qkv = "lora_unet_double_blocks_0_img_attn_qkv";
    let l1 = "diffusion_model.single_blocks.0.linear1";
    write_raw(
        &f,
        &[
            (format!("{qkv}.lora_down.weight"), tensor(vec![4, d], 1)),
            (format!("{qkv}.lora_up.weight"), tensor(vec![3 * d, 4], 2)),
            (format!("{qkv}.alpha"), scalar(2.0)),
            (format!("{l1}.lora_down.weight"), tensor(vec![4, d], 3)),
            (format!("{l1}.lora_up.weight"), tensor(vec![7 * d, 4], 4)),
            (format!("{l1}.alpha"), scalar(8.0)),
        ],
    );
    let set = lora_keys::read(&f).unwrap();
    assert_eq!((set.arch, set.format), (BaseArch::Flux, LoraFormat::ComfyUi));
    let m = by_name(&set);
    let fused = LoraModule {
        component: Component::Transformer,
        path: "x".into(),
        down: tensor(vec![4, d], 1),
        up: tensor(vec![3 * d, 4], 2),
        alpha: 2.0,
    };
    for (j, p) in ["attn.to_q", "attn.to_k", "attn.to_v"].iter().enumerate() {
        let part = m[&(Component::Transformer, format!("transformer_blocks.0.{p}"))];
        // Shared down copied, up rows sliced, alpha and rank unchanged: ΔW rows bit for bit.
        assert_eq!((part.rank(), part.alpha, &part.down.data), (4, 2.0, &fused.down.data), "{p}");
        assert_eq!(part.delta(), delta_rows(&fused, (j * d, (j + 1) * d)), "{p}");
    }
    let mlp = m[&(Component::Transformer, "single_transformer_blocks.0.proj_mlp".to_string())];
    assert_eq!(mlp.up.shape, vec![4 * d, 4], "linear1 rows = 3d + 4d, d = the input width");

    // Merging back: rank 3·4 = 12 with alpha 3·2 (alpha / rank kept), up block-diagonal; read
    // again, the block structure is recognised and the parts come back bit for bit.
    let k = dir.path().join("k.safetensors");
    lora_keys::write(&set, LoraFormat::Kohya, &k).unwrap();
    let keys = safetensors_keys(&k);
    assert_eq!(keys[&format!("{qkv}.lora_up.weight")], vec![3 * d, 12]);
    assert_eq!(keys["lora_unet_single_blocks_0_linear1.lora_down.weight"], vec![16, d]);
    let back = lora_keys::read(&k).unwrap();
    assert_same_deltas(&set, &back, 0.0, "split → merge → split");
    for (key, m0) in by_name(&set) {
        let m1 = by_name(&back)[&key];
        assert_eq!((&m0.down.data, &m0.up.data, m0.alpha), (&m1.down.data, &m1.up.data, m1.alpha), "{key:?}");
    }
}

#[test]
fn merging_parts_with_different_scales_or_missing_parts() {
    let dir = tempfile::tempdir().unwrap();
    let d = D;
    // q rank 2 alpha 1, k rank 4 alpha 8 (different alpha / r), no v; single block without proj_mlp.
    let modules = vec![
        module(Component::Transformer, "transformer_blocks.0.attn.to_q", [d, d], 2, 1, 1.0),
        module(Component::Transformer, "transformer_blocks.0.attn.to_k", [d, d], 4, 2, 8.0),
        module(Component::Transformer, "single_transformer_blocks.0.attn.to_q", [d, d], 2, 3, 2.0),
        module(Component::Transformer, "single_transformer_blocks.0.attn.to_k", [d, d], 2, 4, 2.0),
        module(Component::Transformer, "single_transformer_blocks.0.attn.to_v", [d, d], 2, 5, 2.0),
        module(Component::Transformer, "norm_out.linear", [2 * d, d], 2, 6, 2.0),
    ];
    let set = LoraSet { format: LoraFormat::Diffusers, arch: BaseArch::Flux, modules, metadata: BTreeMap::new() };
    let k = dir.path().join("k.safetensors");
    lora_keys::write(&set, LoraFormat::Kohya, &k).unwrap();
    let keys = safetensors_keys(&k);
    assert_eq!(keys["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], vec![3 * d, 6]);
    assert_eq!(keys["lora_unet_single_blocks_0_linear1.lora_up.weight"], vec![7 * d, 6], "mlp rows zero-filled");
    let back = lora_keys::read(&k).unwrap();
    // The missing parts (ΔW = 0) are not invented on read; the folded scales (1/2 and 2:
    // powers of two) are exact.
    assert_same_deltas(&set, &back, 0.0, "merge with folded scales");
    // final_layer.adaLN_modulation.1 holds norm_out.linear's rows with the halves swapped.
    let bytes = std::fs::read(&k).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let up = st.tensor("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight").unwrap();
    let ours = &set.modules[5].up.data;
    let half = ours.len() / 2;
    assert_eq!(&up.data()[..half], &ours[half..], "BFL: shift first (diffusers: scale first)");
    assert_eq!(&up.data()[half..], &ours[..half]);
}

fn ab(stem: &str, out: usize, inn: usize) -> Vec<(String, RawTensor)> {
    vec![
        (format!("{stem}.lora_A.weight"), tensor(vec![2, inn], 1)),
        (format!("{stem}.lora_B.weight"), tensor(vec![out, 2], 2)),
    ]
}

#[test]
fn flux_and_qwen_image_are_told_apart_and_read_reports_the_arch() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.safetensors");
    // A diffusers Flux LoRA on double-block attention only (no single blocks): Flux, not Qwen.
    let mut t = ab("transformer.transformer_blocks.0.attn.to_q", D, D);
    t.extend(ab("transformer.transformer_blocks.18.attn.add_k_proj", D, D));
    write_raw(&f, &t);
    assert_eq!(lora_keys::detect(&f).unwrap(), (LoraFormat::Diffusers, BaseArch::Flux));
    let set = lora_keys::read(&f).unwrap();
    assert_eq!((set.arch, set.modules.len()), (BaseArch::Flux, 2));
    assert_eq!(set.modules[0].component, Component::Transformer);
    // Flux's ff / norm1 names decide even without single blocks.
    write_raw(&f, &ab("transformer.transformer_blocks.0.ff.net.2", D, 4 * D));
    assert_eq!(lora_keys::read(&f).unwrap().arch, BaseArch::Flux);
    // Qwen-Image: its own names (img_mlp, img_mod), or attention past Flux's 19 double blocks.
    for qwen in ["transformer.transformer_blocks.0.img_mlp.net.2", "transformer.transformer_blocks.40.attn.to_q"] {
        write_raw(&f, &ab(qwen, D, D));
        assert_eq!(lora_keys::detect(&f).unwrap().1, BaseArch::QwenImage, "{qwen}");
    }
    // An SD1.5 file still reads as SD1.5.
    write_raw(&f, &ab("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320));
    assert_eq!(lora_keys::read(&f).unwrap().arch, BaseArch::Sd15);
    // A Flux key that is not a target names the key and the Flux targets.
    write_raw(&f, &ab("transformer.transformer_blocks.0.attn.norm_q", D, D));
    let s = lora_keys::read(&f).unwrap_err().to_string();
    assert!(s.contains("attn.norm_q") && s.contains("not a LoRA-targetable Flux module"), "{s}");
}
