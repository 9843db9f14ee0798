//! Qwen-Image LoRA files written by `lora_keys::write` against the real loaders
//! (tests/python/qwen_lora_oracle.py through $LIKENESS_PYTHON; skipped without the venv, failing
//! under CI). A tiny random `QwenImageTransformer2DModel` (2 blocks) gets a LoRA on every Linear —
//! musubi-tuner's 14 per block and the 6 top-level ones — with random non-zero up and down and
//! alpha ≠ rank, written as kohya, comfyui, diffusers and peft; then:
//! - diffusers (`QwenImagePipeline.lora_state_dict` + `load_lora_into_transformer`) loads the
//!   kohya, comfyui and diffusers files with every key consumed and no warning, and the model's
//!   output equals the base model with ΔW = alpha / r · up @ down merged by hand;
//! - peft (`PeftModel.from_pretrained`) loads the PEFT folder: the same;
//! - ComfyUI's key rules (re-implemented in the script, ComfyUI is not installed) consume every
//!   key of the comfyui / kohya file and give the same ΔW.
//!
//! The tolerances are derived in the script's docstring.

use likeness_diffusion::lora_keys::{self, qwen, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/qwen_lora_oracle.py")
}

fn run_py(py: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(py).arg(script()).args(args).output().expect("run qwen_lora_oracle.py");
    assert!(out.status.success(), "qwen_lora_oracle.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("qwen_lora_oracle.py {args:?}: bad JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

/// A LoRA on every Linear of the tiny model (`linears`: path → [out, in]): rank 4 (alpha 3) on
/// most, rank 2 (alpha 5) on every third, values uniform in ±0.5 (non-zero up and down).
fn lora_over(linears: &BTreeMap<String, [usize; 2]>) -> LoraSet {
    let modules = linears
        .iter()
        .enumerate()
        .map(|(i, (path, &[o, n]))| {
            let (r, alpha) = if i % 3 == 2 { (2, 5.0) } else { (4, 3.0) };
            let t = |shape: Vec<usize>, seed: u64| {
                let v = likeness_sdk::testing::uniform_f32(seed, shape.iter().product(), -0.5, 0.5);
                RawTensor::from_f32(Dtype::F32, shape, &v).unwrap()
            };
            LoraModule {
                component: Component::Transformer,
                path: path.clone(),
                down: t(vec![r, n], 2 * i as u64 + 1),
                up: t(vec![o, r], 2 * i as u64 + 2),
                alpha,
            }
        })
        .collect();
    LoraSet { format: LoraFormat::Kohya, arch: BaseArch::QwenImage, modules, metadata: BTreeMap::new() }
}

fn write_deltas(set: &LoraSet, file: &Path) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = set
        .modules
        .iter()
        .map(|m| {
            let bytes = m.delta().iter().flat_map(|x| x.to_le_bytes()).collect();
            (m.path.clone(), vec![m.up.shape[0], m.down.shape[1]], bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(Dtype::F64, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(file, safetensors::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn our_qwen_files_load_in_diffusers_peft_and_comfyui_with_every_key_and_the_merged_output() {
    let Some(py) = likeness_sdk::testing::python_or_skip("lora_qwen_oracle") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let g = run_py(&py, &["gen", "--out", d.to_str().unwrap()]);
    let linears: BTreeMap<String, [usize; 2]> =
        serde_json::from_str(&std::fs::read_to_string(d.join("linears.json")).unwrap()).unwrap();
    // Our grammar covers exactly the model's Linears: 14 per block (2) + 6 top-level.
    assert_eq!(linears.len(), 2 * qwen::MUSUBI_TARGETS.len() + qwen::TOP_LEVEL.len(), "{g}");
    for p in linears.keys() {
        assert!(qwen::transformer_module(p).is_some(), "the model's Linear `{p}` is not in our Qwen grammar");
    }
    let set = lora_over(&linears);
    let n = set.modules.len() as u64;
    lora_keys::write(&set, LoraFormat::Kohya, &d.join("ours_kohya.safetensors")).unwrap();
    lora_keys::write(&set, LoraFormat::ComfyUi, &d.join("ours_comfyui.safetensors")).unwrap();
    lora_keys::write(&set, LoraFormat::Diffusers, &d.join("ours_diffusers")).unwrap();
    lora_keys::write(&set, LoraFormat::Peft, &d.join("ours_peft")).unwrap();
    write_deltas(&set, &d.join("ref_deltas.safetensors"));
    let r = run_py(&py, &["check", "--dir", d.to_str().unwrap()]);
    let tol = r["tol"].as_f64().unwrap();
    assert!(r["lora_effect"].as_f64().unwrap() > 100.0 * tol, "the LoRA visibly changes the output: {r}");
    for which in ["diffusers_kohya", "diffusers_comfyui", "diffusers_diffusers", "peft"] {
        let c = &r[which];
        assert_eq!(c["layers"].as_u64(), Some(n), "{which}: a LoRA layer on every module: {c}");
        assert_eq!(c["warnings"].as_array().map(Vec::len), Some(0), "{which}: no unexpected/missing keys: {c}");
        if which != "peft" {
            assert_eq!(c["keys"].as_u64(), Some(2 * n), "{which}: lora_A + lora_B for every module: {c}");
        }
        let diff = c["max_abs_diff"].as_f64().unwrap();
        assert!(diff <= tol, "{which}: max |out − merged reference| = {diff} > tol {tol}: {c}");
    }
    for which in ["comfy_comfyui", "comfy_kohya"] {
        let c = &r[which];
        assert_eq!(c["keys"].as_u64(), Some(3 * n), "{which}: down, up, alpha per module: {c}");
        for list in ["not_loaded", "unpatched", "extra", "shape_mismatch"] {
            assert_eq!(c[list].as_array().map(Vec::len), Some(0), "{which}: {list}: {c}");
        }
        assert!(c["max_ratio"].as_f64().unwrap() <= 1.0, "{which}: ComfyUI's ΔW differs from ours: {c}");
    }
    eprintln!("qwen LoRA oracle: tol {tol:.3e}, {r}");
}
