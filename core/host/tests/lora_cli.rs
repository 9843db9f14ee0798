//! `host lora inspect|convert` end to end through the binary (pure Rust, no venv). That the
//! written files load in diffusers / peft is proven in core/diffusion/tests/lora_oracle.rs;
//! here the CLI must produce the same files as the library, say which tool loads what, and fail
//! with the key's name.

use likeness_diffusion::lora_keys::{self, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn host(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_host")).args(args).output().expect("run host");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn t(shape: Vec<usize>, seed: usize) -> RawTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i * 31 + seed * 7) % 53) as f32 / 64.0 - 0.4).collect();
    RawTensor::from_f32(safetensors::Dtype::F32, shape, &v).unwrap()
}

fn sample() -> LoraSet {
    let mut modules = Vec::new();
    for (i, p) in ["to_q", "to_k", "to_v", "to_out.0"].iter().enumerate() {
        modules.push(LoraModule {
            component: Component::Unet,
            path: format!("down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}"),
            down: t(vec![4, 32], i),
            up: t(vec![32, 4], i + 10),
            alpha: 8.0,
        });
    }
    modules.push(LoraModule {
        component: Component::Unet,
        path: "mid_block.resnets.0.conv1".into(),
        down: t(vec![2, 64, 3, 3], 5),
        up: t(vec![64, 2, 1, 1], 6),
        alpha: 1.0,
    });
    modules.push(LoraModule {
        component: Component::TextEncoder,
        path: "text_model.encoder.layers.0.self_attn.q_proj".into(),
        down: t(vec![4, 32], 7),
        up: t(vec![32, 4], 8),
        alpha: 4.0,
    });
    let metadata: BTreeMap<String, String> = [
        ("ss_network_dim".to_string(), "4".to_string()),
        ("modelspec.architecture".into(), "stable-diffusion-v1/lora".into()),
    ]
    .into_iter()
    .collect();
    LoraSet { format: LoraFormat::Kohya, arch: BaseArch::Sd15, modules, metadata }
}

fn same_deltas(a: &LoraSet, b: &LoraSet, what: &str) {
    let key = |s: &LoraSet| -> BTreeMap<String, Vec<f64>> {
        s.modules.iter().map(|m| (format!("{}:{}", m.component.as_str(), m.path), m.delta())).collect()
    };
    let (ka, kb) = (key(a), key(b));
    assert_eq!(ka.keys().collect::<Vec<_>>(), kb.keys().collect::<Vec<_>>(), "{what}");
    for (k, da) in &ka {
        // Values are multiples of 2⁻⁶ and every alpha/r here is a power of two: folding is exact.
        assert_eq!(da, &kb[k], "{what}: {k}");
    }
}

#[test]
fn convert_and_inspect_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("me.safetensors");
    let set = sample();
    lora_keys::write(&set, LoraFormat::Kohya, &src).unwrap();
    let s = src.to_str().unwrap();

    let (ok, out, err) = host(&["lora", "inspect", s]);
    assert!(ok, "{err}");
    assert!(out.contains("format:      kohya") && out.contains("ComfyUI / A1111 / Forge"), "{out}");
    assert!(out.contains("r 4 α 8 on 4 modules") && out.contains("r 2 α 1 on 1 module"), "{out}");
    assert!(out.contains("to_out.0 ×1") && out.contains("conv1 ×1") && out.contains("q_proj ×1"), "{out}");
    assert!(out.contains("modelspec.architecture = stable-diffusion-v1/lora"), "{out}");

    for (to, out_name) in [
        ("diffusers", "me-diffusers"),
        ("peft", "me-peft"),
        ("comfyui", "me-comfy.safetensors"),
        ("kohya", "again.safetensors"),
    ] {
        let o = d.join(out_name);
        let (ok, stdout, err) = host(&["lora", "convert", "--to", to, s, o.to_str().unwrap()]);
        assert!(ok, "{to}: {err}");
        assert!(stdout.contains("wrote"), "{stdout}");
        let back = lora_keys::read(&o).unwrap();
        same_deltas(&set, &back, to);
        // The CLI writes what the library writes.
        let lib = d.join(format!("lib-{out_name}"));
        let files = lora_keys::write(&lora_keys::read(&src).unwrap(), to.parse().unwrap(), &lib).unwrap();
        for f in files {
            let rel = f.strip_prefix(&lib).unwrap();
            let cli = if rel.as_os_str().is_empty() { o.clone() } else { o.join(rel) };
            assert_eq!(std::fs::read(&f).unwrap(), std::fs::read(&cli).unwrap(), "{to}: {}", rel.display());
        }
    }
    assert_eq!(
        std::fs::read(&src).unwrap(),
        std::fs::read(d.join("again.safetensors")).unwrap(),
        "kohya → kohya is byte-identical"
    );

    let (ok, out, _) = host(&["lora", "inspect", d.join("me-peft").to_str().unwrap()]);
    assert!(ok);
    assert!(
        out.contains("PeftModel.from_pretrained(unet, dir)") && out.contains("NOT diffusers pipe.load_lora_weights"),
        "{out}"
    );
    assert!(out.contains("subfolder=\"text_encoder\""), "{out}");
    let (ok, out, _) = host(&["lora", "inspect", "--json", d.join("me-diffusers").to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "diffusers");
    assert_eq!(v["parts"]["unet"]["modules"], 5);
    assert_eq!(v["parts"]["text_encoder"]["modules"], 1);
    assert!(v["loaded_by"].as_str().unwrap().contains("pipe.load_lora_weights(dir)"));
}

fn raw_file(path: &Path, keys: &[(&str, RawTensor)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = keys
        .iter()
        .map(|(k, t)| (k.to_string(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn errors_name_the_key_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    raw_file(
        &bad,
        &[
            (&format!("{q}.lora_down.weight"), t(vec![2, 8], 1)),
            (&format!("{q}.lora_up.weight"), t(vec![8, 2], 2)),
            ("lora_unet_conv_norm_out.lora_down.weight", t(vec![2, 8], 3)),
        ],
    );
    let out = dir.path().join("out.safetensors");
    let (ok, _, err) = host(&["lora", "convert", "--to", "diffusers", bad.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.safetensors") && err.contains("lora_unet_conv_norm_out.lora_down.weight"), "{err}");
    assert!(!out.exists(), "nothing written on error");
    let (ok, _, err) = host(&["lora", "convert", "--to", "lycoris", bad.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(!ok && err.contains("kohya, diffusers, peft or comfyui"), "{err}");

    // A fused Flux qkv whose rows are not three equal parts: named, with the arch.
    let flux = dir.path().join("flux.safetensors");
    let f = "lora_unet_double_blocks_0_img_attn_qkv";
    raw_file(
        &flux,
        &[(&format!("{f}.lora_down.weight"), t(vec![2, 8], 1)), (&format!("{f}.lora_up.weight"), t(vec![8, 2], 2))],
    );
    let (ok, out, err) = host(&["lora", "inspect", flux.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("base model:  flux"), "{out}");
    assert!(err.contains(f) && err.contains("not a multiple of 3"), "{err}");
    // Qwen-Image (issue 17) reads; a key naming no LoRA-targetable Qwen module is refused by name.
    let qwen = dir.path().join("qwen.safetensors");
    let q = "transformer.transformer_blocks.0.img_mlp.net.2";
    let bad = "transformer.transformer_blocks.0.attn.norm_q";
    raw_file(
        &qwen,
        &[(&format!("{q}.lora_A.weight"), t(vec![2, 8], 1)), (&format!("{q}.lora_B.weight"), t(vec![8, 2], 2))],
    );
    let (ok, out, err) = host(&["lora", "inspect", qwen.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("base model:  qwen-image"), "{out}");
    raw_file(
        &qwen,
        &[
            (&format!("{q}.lora_A.weight"), t(vec![2, 8], 1)),
            (&format!("{q}.lora_B.weight"), t(vec![8, 2], 2)),
            (&format!("{bad}.lora_A.weight"), t(vec![2, 8], 3)),
            (&format!("{bad}.lora_B.weight"), t(vec![8, 2], 4)),
        ],
    );
    let (ok, _, err) = host(&["lora", "inspect", qwen.to_str().unwrap()]);
    assert!(!ok && err.contains("norm_q"), "{err}");
}

/// A Flux LoRA: q/k/v (fused in kohya), proj_mlp, an embedder, CLIP-L and T5 layers.
fn flux_sample() -> LoraSet {
    let m = |component, path: &str, out: usize, inn: usize, seed: usize, alpha: f64| LoraModule {
        component,
        path: path.to_string(),
        down: t(vec![2, inn], seed),
        up: t(vec![out, 2], seed + 20),
        alpha,
    };
    let tr = Component::Transformer;
    let modules = vec![
        m(tr, "transformer_blocks.0.attn.to_q", 16, 16, 1, 4.0),
        m(tr, "transformer_blocks.0.attn.to_k", 16, 16, 2, 4.0),
        m(tr, "transformer_blocks.0.attn.to_v", 16, 16, 3, 4.0),
        m(tr, "transformer_blocks.0.ff.net.2", 16, 64, 4, 2.0),
        m(tr, "single_transformer_blocks.0.attn.to_q", 16, 16, 5, 2.0),
        m(tr, "single_transformer_blocks.0.attn.to_k", 16, 16, 6, 2.0),
        m(tr, "single_transformer_blocks.0.attn.to_v", 16, 16, 7, 2.0),
        m(tr, "single_transformer_blocks.0.proj_mlp", 64, 16, 8, 2.0),
        m(tr, "x_embedder", 16, 8, 9, 2.0),
        m(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj", 8, 8, 10, 2.0),
        m(Component::TextEncoder2, "encoder.block.0.layer.0.SelfAttention.q", 8, 8, 11, 2.0),
    ];
    LoraSet { format: LoraFormat::Diffusers, arch: BaseArch::Flux, modules, metadata: BTreeMap::new() }
}

#[test]
fn flux_files_inspect_and_convert_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let set = flux_sample();
    let src = d.join("flux-diffusers");
    lora_keys::write(&set, LoraFormat::Diffusers, &src).unwrap();
    let s = src.to_str().unwrap();
    let (ok, out, err) = host(&["lora", "inspect", s]);
    assert!(ok, "{err}");
    assert!(out.contains("base model:  flux") && out.contains("transformer: 9 modules"), "{out}");
    assert!(out.contains("text_encoder_2: 1 modules") && out.contains("proj_mlp ×1"), "{out}");
    for (to, name) in [
        ("kohya", "flux-kohya.safetensors"),
        ("comfyui", "flux-comfy.safetensors"),
        ("peft", "flux-peft"),
        ("diffusers", "flux-again"),
    ] {
        let o = d.join(name);
        let (ok, stdout, err) = host(&["lora", "convert", "--to", to, s, o.to_str().unwrap()]);
        assert!(ok, "{to}: {err}");
        assert!(stdout.contains("wrote"), "{stdout}");
        let back = lora_keys::read(&o).unwrap();
        assert_eq!(back.arch, BaseArch::Flux, "{to}");
        same_deltas(&set, &back, to);
        let (ok, out, err) = host(&["lora", "inspect", "--json", o.to_str().unwrap()]);
        assert!(ok, "{to}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["base_model"], "flux", "{to}");
        assert_eq!(v["parts"]["transformer"]["modules"], 9, "{to}: {v}");
    }
    // kohya: BFL names, q/k/v fused (rank 3·2) and linear1 = q, k, v, mlp. The diffusers source
    // has alpha / r folded into lora_B (alpha = r), so the merged alpha is the merged rank, 6.
    let bytes = std::fs::read(d.join("flux-kohya.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |k: &str| st.tensor(k).unwrap_or_else(|_| panic!("{k}")).shape().to_vec();
    assert_eq!(shape("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"), vec![48, 6]);
    assert_eq!(shape("lora_unet_single_blocks_0_linear1.lora_up.weight"), vec![3 * 16 + 64, 8]);
    assert_eq!(shape("lora_unet_img_in.lora_down.weight"), vec![2, 8]);
    assert_eq!(shape("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"), vec![8, 2]);
    let alpha = st.tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha").unwrap();
    assert_eq!(alpha.data(), 6.0f32.to_le_bytes(), "alpha scales with the merged rank");
    // And back from kohya: the split modules, every format again.
    let k = d.join("flux-kohya.safetensors");
    let o = d.join("from-kohya");
    let (ok, _, err) = host(&["lora", "convert", "--to", "diffusers", k.to_str().unwrap(), o.to_str().unwrap()]);
    assert!(ok, "{err}");
    same_deltas(&set, &lora_keys::read(&o).unwrap(), "kohya → diffusers");
}

/// Issue 14, part 7: a LoRA whose weights hold NaN converted and inspected without a word.
/// Now `inspect` names every damaged tensor, `convert` refuses (unless --allow-nonfinite).
#[test]
fn issue_14_nonfinite_lora_is_reported_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut set = sample();
    let mut v = set.modules[1].up.to_f32().unwrap();
    v[3] = f32::NAN;
    v[7] = f32::INFINITY;
    set.modules[1].up = RawTensor::from_f32(safetensors::Dtype::F32, set.modules[1].up.shape.clone(), &v).unwrap();
    let file = dir.path().join("nan.safetensors");
    lora_keys::write(&set, LoraFormat::Kohya, &file).unwrap();
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.up";

    let (ok, out, err) = host(&["lora", "inspect", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("NOT FINITE in 1 tensor(s)") && out.contains(&format!("{key}: 2 of 128 values")), "{out}");
    let (ok, out, _) = host(&["lora", "inspect", "--json", file.to_str().unwrap()]);
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["non_finite"], serde_json::json!([{"key": key, "count": 2, "numel": 128}]), "{out}");

    let conv = dir.path().join("conv.safetensors");
    let (ok, _, err) = host(&["lora", "convert", "--to", "diffusers", file.to_str().unwrap(), conv.to_str().unwrap()]);
    assert!(!ok && err.contains(key) && err.contains("--allow-nonfinite"), "{err}");
    assert!(!conv.exists(), "nothing written when refused");
    let (ok, _, err) = host(&[
        "lora",
        "convert",
        "--allow-nonfinite",
        "--to",
        "diffusers",
        file.to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    assert!(ok && err.contains("warning") && conv.exists(), "{err}");

    // A healthy LoRA says so.
    let good = dir.path().join("good.safetensors");
    lora_keys::write(&sample(), LoraFormat::Kohya, &good).unwrap();
    let (ok, out, _) = host(&["lora", "inspect", good.to_str().unwrap()]);
    assert!(ok && out.contains("values:      all finite"), "{out}");
}
