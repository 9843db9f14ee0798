//! flux-lora's adapter files in the tools users load them with: a LoRA on every Linear kind of
//! the blocks (`all-linear`: fused BFL `qkv` / `linear1` on the kohya side), random non-zero
//! weights, exported as kohya (BFL names), diffusers and PEFT; ComfyUI's key rule maps every
//! module of the kohya file; diffusers' FluxPipeline loads the
//! first two (converting the kohya file itself), peft the folder, each with no warning about an
//! unexpected, missing or ignored key, and gives our transformer's output on our inputs. Each
//! file also loads back into flux-lora (`lora = FILE`) with the same output.
//!
//! Tolerance 1e-5 absolute (outputs O(1)): diffusers' kohya converter rebuilds our rank-3r
//! block-diagonal `qkv` (and `linear1`) as three modules with the full down matrix and zero
//! up-blocks, so ΔW is the same sum plus exact zeros; what differs is the order of f32 additions
//! (≲ √(3r)·2⁻²⁴ relative per layer, over ≈ 20 layers ≈ 1e-6) and, for kohya, the alpha/r
//! scale folded into a different factor (one more f32 rounding, 6e-8 relative).

mod common;

use std::path::Path;

use common::{max_diff, python, read_f32, tiny, write_f32, MAX_SEQ};
use likeness_diffusion_torch::Backbone;
use likeness_plugin_flux_lora::FluxLora;
use likeness_sdk::{Device, ModelPlugin};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;

fn create(dir: &Path, extra: serde_json::Value) -> FluxLora {
    let mut c = serde_json::json!({"pretrained": dir, "max_sequence_length": MAX_SEQ, "lora_rank": 4,
        "lora_alpha": 2.0, "lora_targets": ["all-linear"]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    FluxLora::create(&c.to_string(), Device::CPU, 3).unwrap_or_else(|e| panic!("create: {e}"))
}

struct Inputs {
    x_t: Tensor,
    t: Tensor,
    guidance: Tensor,
    cond: Vec<Tensor>,
}

fn inputs(m: &FluxLora) -> Inputs {
    tch::manual_seed(17);
    let cond = m.backbone().encode_texts(&["a photo of sks person, smiling"], false).unwrap();
    Inputs {
        x_t: Tensor::randn([1, 16, 8, 6], (Kind::Float, tch::Device::Cpu)),
        t: Tensor::from_slice(&[730.0f32]),
        guidance: Tensor::from_slice(&[3.5f32]),
        cond,
    }
}

fn velocity(m: &FluxLora, i: &Inputs) -> Tensor {
    tch::no_grad(|| m.backbone().denoise_guided(&i.x_t, &i.t, Some(&i.guidance), &i.cond, None)).unwrap()
}

#[test]
fn flux_adapters_load_in_diffusers_and_peft_with_our_outputs() {
    let Some((dir, py)) = tiny("flux_adapters_load_in_diffusers_and_peft_with_our_outputs") else { return };
    let mut m = create(dir, serde_json::json!({}));
    {
        let _g = tch::no_grad_guard();
        for (k, (_, mut p)) in m.lora_parameters().into_iter().enumerate() {
            tch::manual_seed(100 + k as i64);
            let _ = p.g_add_(&(Tensor::randn(p.size(), (Kind::Float, tch::Device::Cpu)) * 0.05));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    let meta = serde_json::Map::new();
    for format in ["kohya", "diffusers", "peft"] {
        let out = adapters.join(format);
        std::fs::create_dir_all(&out).unwrap();
        m.export_adapter(&out, format, &meta).unwrap_or_else(|e| panic!("export {format}: {e}"));
    }
    let i = inputs(&m);
    let ours = velocity(&m, &i);
    let inp = adapters.join("inputs");
    std::fs::create_dir_all(&inp).unwrap();
    let mut shapes = serde_json::Map::new();
    for (name, t) in
        [("x_t", &i.x_t), ("t", &i.t), ("guidance", &i.guidance), ("t5", &i.cond[0]), ("pooled", &i.cond[1])]
    {
        write_f32(&inp, name, t);
        shapes.insert(name.into(), t.size().into());
    }
    std::fs::write(inp.join("inputs.json"), serde_json::Value::Object(shapes).to_string()).unwrap();
    let out = tmp.path().join("out");
    let args = [
        "--model".as_ref(),
        dir.as_os_str(),
        "--adapters".as_ref(),
        adapters.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    python(&py, "flux_adapter_oracle.py", &args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("oracle.json")).unwrap()).unwrap();
    let shape = ours.size();
    let base = read_f32(&out, "base", &shape);
    assert!(max_diff(&base, &ours, "base vs ours") > 1e3 * TOL, "the adapter matters");
    let modules = m.lora_parameters().len() / 2;
    // ComfyUI maps every module of the kohya file (its `lora_unet_<BFL path>` rule).
    assert_eq!(report["comfyui"]["unmapped"].as_array().unwrap().len(), 0, "ComfyUI: {}", report["comfyui"]);
    assert!(report["comfyui"]["stems"].as_u64().unwrap() > 0);
    for format in ["kohya", "diffusers", "peft"] {
        let r = &report[format];
        assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{format}: {}", r["warnings"]);
        // kohya: diffusers rebuilds the split modules from the fused ones, one per diffusers Linear.
        assert_eq!(r["lora_layers"].as_u64().unwrap() as usize, modules, "{format}: LoRA layers injected");
        assert!(max_diff(&ours, &read_f32(&out, format, &shape), format) <= TOL);
    }
    // And back into flux-lora from each file: the same output.
    let kohya = std::fs::read_dir(adapters.join("kohya")).unwrap().next().unwrap().unwrap().path();
    for (format, path) in [("kohya", kohya), ("diffusers", adapters.join("diffusers")), ("peft", adapters.join("peft"))]
    {
        let back = create(dir, serde_json::json!({"lora": path}));
        assert!(max_diff(&ours, &velocity(&back, &i), &format!("{format} → flux-lora")) <= TOL);
    }
}
