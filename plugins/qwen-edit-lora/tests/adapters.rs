//! qwen-edit-lora's adapter files in the tools users load them with (issue 17, "LoRA files"), on
//! the tiny random Qwen-Image-Edit-2509 of tests/python/make_tiny_qwen_edit.py: a LoRA of rank 4,
//! alpha 3 (≠ rank, so a dropped or doubled alpha/r shows), random non-zero weights, once on
//! musubi-tuner's targets (`musubi`: the 14 Linears of every block, `img_mod.1` / `txt_mod.1`
//! included) and once on `all` (plus the 6 top-level Linears), exported in every format the plugin
//! declares (kohya = musubi's `lora_unet_…` with an f32 `.alpha` per module and its `--edit_plus`
//! metadata, diffusers, peft). tests/python/qwen_adapter_oracle.py loads the kohya and diffusers
//! files with QwenImageEditPlusPipeline.load_lora_weights and the PEFT folder with
//! PeftModel.from_pretrained — a LoRA layer on every module, no warning (an unexpected, missing or
//! ignored key is one) — and runs the transformer on our edit-plus inputs (target latents, one
//! control latent of another size, prompt embeddings, mask): our transformer's output. ComfyUI's
//! key rules (re-implemented there) consume every key of the kohya file with our ΔW, and the base
//! model with that ΔW merged gives our output too. Each file also loads back into qwen-edit-lora
//! (`lora = FILE`) with the same output.
//!
//! Tolerance 1e-5 absolute on O(1) velocities (flux-lora's tests/adapters.rs reasoning): our
//! transformer and diffusers' run the same f32 kernels in the same op order, so what differs is
//! the order of f32 additions — per Linear ≲ √n·2⁻²⁴ relative for inner size n ≤ 192 (the
//! MLP's hidden width; the LoRA's two products, of inner sizes ≤ 192 and r = 4, add the same
//! kind), ≈ 8e-7, over the ≈ 8 Linears of the deepest path of 2 blocks ≈ 2.3e-6 — and the RoPE tables (ours from f64 angles,
//! diffusers' from f32 ones, ≤ 1e-7 relative); the diffusers layout folds alpha/r into lora_B
//! and diffusers' kohya converter folds it too (one more f32 rounding each, 6e-8 relative); the
//! merged model (ComfyUI) rounds W + ΔW once in f32. The measured differences are printed
//! (`max |ours - reference|`, ≤ 6e-7 when written); the base models' own difference is checked
//! first so a transformer mismatch is not blamed on the adapter files.

#[path = "../../../core/diffusion-torch/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::max_diff;
use likeness_diffusion_torch::Backbone;
use likeness_plugin_qwen_edit_lora::QwenEditLora;
use likeness_sdk::{Device, ModelPlugin};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;
const RANK: i64 = 4;
const ALPHA: f64 = 3.0;

/// The tiny pipeline, written once per test binary (the script's stamp makes a rerun instant),
/// and the venv's python; `None` after a `skipped:` line without the venv.
fn tiny(test: &str) -> Option<(&'static Path, PathBuf)> {
    static T: OnceLock<PathBuf> = OnceLock::new();
    let py = likeness_sdk::testing::python_or_skip(test)?;
    let dir = T.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen-edit-tiny");
        python(&py, "make_tiny_qwen_edit.py", &["--out".as_ref(), dir.as_os_str()]);
        dir
    });
    Some((dir.as_path(), py))
}

fn python(py: &Path, script: &str, args: &[&std::ffi::OsStr]) {
    let o = Command::new(py)
        .arg(common::repo().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn config(dir: &Path, targets: &str, extra: serde_json::Value) -> String {
    let mut c = serde_json::json!({"pretrained": dir, "lora_rank": RANK, "lora_alpha": ALPHA,
        "lora_targets": [targets]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

fn create(dir: &Path, targets: &str, extra: serde_json::Value) -> QwenEditLora {
    QwenEditLora::create(&config(dir, targets, extra), Device::CPU, 3).unwrap_or_else(|e| panic!("create: {e}"))
}

/// Uniform ±0.1 on every LoRA weight (whole_chain.rs's `perturb_lora`): non-zero up and down.
fn perturb_lora(m: &QwenEditLora) {
    let _g = tch::no_grad_guard();
    for (i, (_, mut p)) in m.lora_parameters().into_iter().enumerate() {
        let r = Tensor::from_slice(&likeness_sdk::testing::uniform(50 + i as u64, p.numel()))
            .view(p.size().as_slice())
            .to_kind(p.kind());
        let _ = p.g_add_(&((r - 0.5) * 0.2));
    }
}

/// The edit-plus conditioning `[embeds, mask, control latents]` and the target latents: a
/// 4×6 target (2×3 tokens) and a 6×4 control (3×2 tokens), 7 text tokens, σ = 0.73.
struct Inputs {
    x_t: Tensor,
    t: Tensor,
    cond: Vec<Tensor>,
}

fn inputs() -> Inputs {
    // From fixed seeds, not tch's global generator (the two tests run in parallel, and `create`
    // draws the LoRA's initial down weights from it).
    let u = |seed: u64, shape: &[i64]| {
        let n = shape.iter().product::<i64>() as usize;
        Tensor::from_slice(&likeness_sdk::testing::uniform_f32(seed, n, -1.7, 1.7)).view(shape)
    };
    Inputs {
        x_t: u(17, &[1, 16, 4, 6]),
        t: Tensor::from_slice(&[730.0f32]),
        cond: vec![u(18, &[1, 7, 16]), Tensor::ones([1, 7], (Kind::Int64, tch::Device::Cpu)), u(19, &[1, 16, 6, 4])],
    }
}

fn velocity(m: &QwenEditLora, i: &Inputs) -> Tensor {
    tch::no_grad(|| m.backbone().denoise_guided(&i.x_t, &i.t, None, &i.cond, None)).unwrap()
}

fn write_inputs(dir: &Path, i: &Inputs) {
    std::fs::create_dir_all(dir).unwrap();
    let sigma = &i.t / 1000.0;
    let named =
        [("x_t", &i.x_t), ("sigma", &sigma), ("embeds", &i.cond[0]), ("mask", &i.cond[1]), ("control", &i.cond[2])];
    let mut shapes = serde_json::Map::new();
    for (name, t) in named {
        let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
        std::fs::write(dir.join(format!("{name}.f32")), v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
            .unwrap();
        shapes.insert(name.into(), t.size().into());
    }
    std::fs::write(dir.join("inputs.json"), serde_json::Value::Object(shapes).to_string()).unwrap();
}

/// Our ΔW = alpha / r · up @ down per module (f64, from the in-memory weights, not the files):
/// ComfyUI's reference. Returns the module paths.
fn write_deltas(m: &QwenEditLora, file: &Path) -> Vec<String> {
    let params: BTreeMap<String, Tensor> = m.lora_parameters().into_iter().collect();
    let mut deltas = Vec::new();
    for (name, down) in &params {
        let Some(module) = name.strip_suffix(".lora_A.weight") else { continue };
        let up = &params[&format!("{module}.lora_B.weight")];
        let d = up.to_kind(Kind::Double).matmul(&down.to_kind(Kind::Double)) * (ALPHA / RANK as f64);
        deltas.push((module.strip_prefix("transformer.").expect("a transformer module").to_string(), d));
    }
    Tensor::write_safetensors(&deltas, file).unwrap();
    deltas.into_iter().map(|(p, _)| p).collect()
}

/// The kohya file is musubi-tuner's `--edit_plus` LoRA: `lora_unet_<path _>` down/up and an f32
/// 0-d `.alpha` (= ALPHA) on every module, and musubi's model metadata.
fn check_kohya_file(path: &Path, modules: &[String]) {
    let h = likeness_sdk::st::read_header(path).unwrap();
    for (k, v) in [
        ("modelspec.architecture", "Qwen-Image-Edit-Plus/lora"),
        ("ss_base_model_version", "qwen_image_edit"),
        ("ss_network_module", "networks.lora_qwen_image"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "3.0"),
    ] {
        assert_eq!(h.metadata.get(k).map(String::as_str), Some(v), "kohya metadata {k}");
    }
    assert_eq!(h.tensors.len(), 3 * modules.len(), "down, up, alpha per module");
    let bytes = std::fs::read(path).unwrap();
    for p in modules {
        let stem = format!("lora_unet_{}", p.replace('.', "_"));
        for s in ["lora_down.weight", "lora_up.weight"] {
            assert!(h.tensors.iter().any(|t| t.name == format!("{stem}.{s}")), "{stem}.{s} missing");
        }
        let a = h.tensors.iter().find(|t| t.name == format!("{stem}.alpha")).unwrap_or_else(|| panic!("{stem}.alpha"));
        let dtype = format!("{:?}", a.dtype);
        assert!(dtype == "F32" && a.shape.is_empty(), "{stem}.alpha: {dtype} {:?}, want a 0-d F32", a.shape);
        let o = h.data_start() + a.data_offsets.0;
        let v = f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(v as f64, ALPHA, "{stem}.alpha");
    }
}

fn check(test: &str, targets: &str, want_modules: usize) {
    let Some((dir, py)) = tiny(test) else { return };
    let mut m = create(dir, targets, serde_json::json!({}));
    let i = inputs();
    let unperturbed = velocity(&m, &i);
    perturb_lora(&m);
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    let declared = QwenEditLora::interface(&config(dir, targets, serde_json::json!({}))).unwrap().adapter_formats;
    let declared: Vec<&str> = declared.iter().map(|f| f.as_str()).collect();
    assert_eq!(declared, ["kohya", "diffusers", "peft"], "the formats qwen-edit-lora declares (all exported here)");
    for format in declared {
        let out = adapters.join(format);
        std::fs::create_dir_all(&out).unwrap();
        m.export_adapter(&out, format, &serde_json::Map::new()).unwrap_or_else(|e| panic!("export {format}: {e}"));
    }
    let ours = velocity(&m, &i);
    write_inputs(&adapters.join("inputs"), &i);
    let modules = write_deltas(&m, &adapters.join("deltas.safetensors"));
    assert_eq!(modules.len(), want_modules, "LoRA modules for `{targets}`");
    let kohya = std::fs::read_dir(adapters.join("kohya")).unwrap().next().unwrap().unwrap().path();
    check_kohya_file(&kohya, &modules);
    let out = tmp.path().join("out");
    let args = [
        "--model".as_ref(),
        dir.as_os_str(),
        "--adapters".as_ref(),
        adapters.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    python(&py, "qwen_adapter_oracle.py", &args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("oracle.json")).unwrap()).unwrap();
    let read = |name: &str| {
        let b = std::fs::read(out.join(format!("{name}.f32"))).unwrap();
        let v: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        Tensor::from_slice(&v).view(ours.size().as_slice())
    };
    let base = read("base");
    assert!(max_diff(&unperturbed, &base, "our base (LoRA up = 0) vs diffusers' base") <= TOL);
    assert!(max_diff(&base, &ours, "base vs ours") > 1e3 * TOL, "the adapter matters");
    let c = &report["comfyui_keys"];
    assert_eq!(c["keys"].as_u64(), Some(3 * modules.len() as u64), "ComfyUI: {c}");
    for list in ["not_loaded", "unpatched", "extra", "shape_mismatch"] {
        assert_eq!(c[list].as_array().map(Vec::len), Some(0), "ComfyUI {list}: {c}");
    }
    assert!(c["max_ratio"].as_f64().unwrap() <= 1.0, "ComfyUI's ΔW differs from ours: {c}");
    assert!(max_diff(&ours, &read("comfyui"), "ComfyUI (ΔW merged)") <= TOL);
    for format in ["kohya", "diffusers", "peft"] {
        let r = &report[format];
        assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{format}: {}", r["warnings"]);
        assert_eq!(r["lora_layers"].as_u64().unwrap() as usize, modules.len(), "{format}: LoRA layers injected");
        assert!(max_diff(&ours, &read(format), format) <= TOL);
    }
    // And back into qwen-edit-lora from each file: the same output.
    for (format, path) in [("kohya", kohya), ("diffusers", adapters.join("diffusers")), ("peft", adapters.join("peft"))]
    {
        let back = create(dir, targets, serde_json::json!({"lora": path}));
        assert_eq!(back.lora_parameters().len(), 2 * modules.len(), "{format} → qwen-edit-lora: modules");
        assert!(max_diff(&ours, &velocity(&back, &i), &format!("{format} → qwen-edit-lora")) <= TOL);
    }
}

#[test]
fn qwen_musubi_adapters_load_in_diffusers_peft_comfyui_with_our_outputs() {
    // 14 Linears per block (modulations included) × 2 blocks.
    check("qwen_musubi_adapters_load_in_diffusers_peft_comfyui_with_our_outputs", "musubi", 28);
}

#[test]
fn qwen_all_linear_adapters_load_in_diffusers_peft_comfyui_with_our_outputs() {
    // … plus img_in, txt_in, proj_out, norm_out.linear and the timestep MLP's two.
    check("qwen_all_linear_adapters_load_in_diffusers_peft_comfyui_with_our_outputs", "all", 34);
}
