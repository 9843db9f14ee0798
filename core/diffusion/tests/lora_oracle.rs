//! likeness_diffusion::lora_keys against the real loaders (tests/python/lora_oracle.py through
//! $LIKENESS_PYTHON; skipped only without the venv): we read what diffusers, peft and the
//! sd-scripts key scheme write, and diffusers / peft load what we write, every key consumed,
//! with the reference LoRA UNet's output.
//!
//! Bounds. Deltas (scale·up@down) are compared in f64 from the same f32/f16 tensors: each side
//! rounds at most r + 2 times (r products summed, the scale), so per element
//! |ours − ref| ≤ 2(r + 2)·2⁻⁵³·Σₖ|s·uₒₖ·dₖᵢ| (ABS below). A file we write with alpha folded into
//! lora_B (diffusers) adds one f32 rounding of each s·u: + 2⁻²⁴·Σₖ|s·uₒₖ·dₖᵢ|.

use likeness_diffusion::lora_keys::{self, sd15, BaseArch, Component, LoraFormat, LoraModule, LoraSet};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const U64: f64 = 1.0 / (1u64 << 53) as f64;
const U32: f64 = 1.0 / (1u64 << 24) as f64;

struct Oracle {
    dir: PathBuf,
    summary: Value,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/lora_oracle.py")
}

fn run_py(py: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(py).arg(script()).args(args).output().expect("run lora_oracle.py");
    assert!(out.status.success(), "lora_oracle.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("lora_oracle.py {args:?}: bad JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Generated once per test binary (≈ 30 s: torch import, tiny models, the meta-device SD1.5).
fn oracle() -> Option<&'static Oracle> {
    static O: OnceLock<Option<Oracle>> = OnceLock::new();
    O.get_or_init(|| {
        let py = likeness_sdk::testing::python_or_skip("lora_oracle")?;
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Statics are never dropped, so each run's ≈14 MB stays; earlier runs' (older than an
        // hour, so never a concurrent run's) are removed here.
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if e.file_name().to_string_lossy().starts_with("lora_oracle-") && old.is_some_and(|a| a.as_secs() > 3600) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = tmp.join(format!("lora_oracle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let summary = run_py(&py, &["gen", "--out", dir.to_str().unwrap()]);
        Some(Oracle { dir, summary })
    })
    .as_ref()
}

/// Our four files written from the sd-scripts-style reference, then loaded by the real loaders.
fn checked() -> Option<&'static Value> {
    static C: OnceLock<Option<Value>> = OnceLock::new();
    C.get_or_init(|| {
        let o = oracle()?;
        let py = likeness_sdk::testing::python_or_skip("lora_oracle")?;
        let set = lora_keys::read(&o.dir.join("ref_kohya.safetensors")).unwrap();
        for (f, out) in [
            (LoraFormat::Kohya, "ours_kohya.safetensors"),
            (LoraFormat::ComfyUi, "ours_comfyui.safetensors"),
            (LoraFormat::Diffusers, "ours_diffusers"),
            (LoraFormat::Peft, "ours_peft"),
        ] {
            lora_keys::write(&set, f, &o.dir.join(out)).unwrap();
        }
        Some(run_py(&py, &["check", "--dir", o.dir.to_str().unwrap()]))
    })
    .as_ref()
}

fn reference_deltas(file: &str) -> BTreeMap<String, Vec<f64>> {
    let o = oracle().unwrap();
    let bytes = std::fs::read(o.dir.join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F64);
            (k.to_string(), v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect()
}

fn name(m: &LoraModule) -> String {
    format!("{}:{}", m.component.as_str(), m.path)
}

/// Σₖ|s·uₒₖ·dₖᵢ| per element: the magnitude the rounding bounds scale with.
fn abs_delta(m: &LoraModule) -> Vec<f64> {
    let mut a = m.clone();
    let s = m.alpha.abs();
    a.alpha = s;
    let abs = |t: &lora_keys::RawTensor| {
        let v: Vec<f32> = t.to_f32().unwrap().iter().map(|x| x.abs()).collect();
        lora_keys::RawTensor::from_f32(safetensors::Dtype::F32, t.shape.clone(), &v).unwrap()
    };
    // |x| of an f16/bf16 value is exact in f32.
    a.up = abs(&m.up);
    a.down = abs(&m.down);
    a.delta()
}

/// Every module of `set` against the reference deltas, within `rel_extra·ABS + 2(r+2)·2⁻⁵³·ABS`.
fn assert_deltas(set: &LoraSet, refs: &BTreeMap<String, Vec<f64>>, rel_extra: f64, what: &str) {
    let ours: BTreeMap<String, &LoraModule> = set.modules.iter().map(|m| (name(m), m)).collect();
    let want: Vec<&String> = refs.keys().collect();
    let got: Vec<&String> = ours.keys().collect();
    assert_eq!(got, want, "{what}: module sets differ");
    for (k, r) in refs {
        let m = ours[k];
        let d = m.delta();
        let a = abs_delta(m);
        assert_eq!(d.len(), r.len(), "{what} {k}: delta size");
        let eps = rel_extra + 2.0 * (m.rank() as f64 + 2.0) * U64;
        for i in 0..d.len() {
            assert!(
                (d[i] - r[i]).abs() <= eps * a[i] + f64::MIN_POSITIVE,
                "{what} {k}[{i}]: {} vs {} (abs {})",
                d[i],
                r[i],
                a[i]
            );
        }
    }
}

#[test]
fn reads_what_diffusers_peft_and_sd_scripts_write() {
    let Some(o) = oracle() else { return };
    let refs = reference_deltas("deltas.safetensors");
    let refs16 = reference_deltas("deltas_fp16.safetensors");
    let unet_only: BTreeMap<String, Vec<f64>> =
        refs.iter().filter(|(k, _)| k.starts_with("unet:")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let te_only: BTreeMap<String, Vec<f64>> =
        refs.iter().filter(|(k, _)| k.starts_with("text_encoder:")).map(|(k, v)| (k.clone(), v.clone())).collect();
    for (input, format, want) in [
        ("ref_diffusers", LoraFormat::Diffusers, &refs),
        ("ref_kohya.safetensors", LoraFormat::Kohya, &refs),
        ("ref_kohya_ldm.safetensors", LoraFormat::Kohya, &refs),
        ("ref_kohya_fp16.safetensors", LoraFormat::Kohya, &refs16),
        ("ref_peft_unet", LoraFormat::Peft, &unet_only),
        ("ref_peft_te", LoraFormat::Peft, &te_only),
    ] {
        let path = o.dir.join(input);
        let set = lora_keys::read(&path).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(set.format, format, "{input}");
        assert_eq!(set.arch, BaseArch::Sd15, "{input}");
        assert_eq!(lora_keys::detect(&path).unwrap(), (format, BaseArch::Sd15), "{input}");
        assert_deltas(&set, want, 0.0, input);
    }
    // The conv module carries its own rank and alpha (rank_pattern / alpha_pattern / .alpha).
    let conv =
        o.summary["modules"].as_array().unwrap().iter().find(|m| m["path"] == "down_blocks.0.resnets.0.conv1").unwrap();
    let set = lora_keys::read(&o.dir.join("ref_peft_unet")).unwrap();
    let m = set.modules.iter().find(|m| m.path == "down_blocks.0.resnets.0.conv1").unwrap();
    assert_eq!((m.rank() as u64, m.alpha), (conv["rank"].as_u64().unwrap(), conv["alpha"].as_f64().unwrap()));
    assert_eq!(m.down.shape.len(), 4, "LoCon down is [r, in, kh, kw]");
}

#[test]
fn our_files_load_in_diffusers_and_peft_with_every_key() {
    let Some(c) = checked() else { return };
    let o = oracle().unwrap();
    let mods = o.summary["modules"].as_array().unwrap();
    let n_unet = mods.iter().filter(|m| m["component"] == "unet").count() as u64;
    let n_te = mods.len() as u64 - n_unet;
    for name in ["ours_kohya.safetensors", "ours_comfyui.safetensors", "ours_diffusers", "ours_peft"] {
        let r = &c[name];
        // Each module is two tensors (lora_A, lora_B) in the model after loading: all consumed.
        assert_eq!(r["unet_lora_params"].as_u64(), Some(2 * n_unet), "{name}: {r}");
        assert_eq!(r["te_lora_params"].as_u64(), Some(2 * n_te), "{name}: {r}");
        for field in ["warnings", "unexpected", "missing"] {
            if let Some(v) = r.get(field) {
                assert_eq!(v.as_array().map(Vec::len), Some(0), "{name}: {field}: {v}");
            }
        }
        // The loaded UNet / text encoder against the reference LoRA model, same process and
        // kernels: the only differences are the f32 rounding of folded lora_B (diffusers file,
        // 2⁻²⁴ relative per entry) carried through ~20 layers of O(1) gain — ≈1e-6 of the output
        // scale; 1e-4 × scale (the bound) leaves room for a different BLAS path.
        for (diff, scale) in [("unet_max_abs", "unet_ref_max"), ("te_max_abs", "te_ref_max")] {
            let bound = 1e-4 * r[scale].as_f64().unwrap().max(1.0);
            assert!(r[diff].as_f64().unwrap() <= bound, "{name}: {diff} = {} > {bound}", r[diff]);
        }
    }
    let k = &c["comfyui_keys"];
    assert_eq!(k["unmapped"].as_array().unwrap().len(), 0, "ComfyUI would skip: {}", k["unmapped"]);
    assert_eq!(k["stems"].as_u64(), Some(n_unet + n_te));
    assert_eq!(k["suffixes"], serde_json::json!(["alpha", "lora_down.weight", "lora_up.weight"]));
}

/// The alpha choice for our diffusers file, measured: diffusers applies `lora_adapter_metadata`
/// (its own file reproduces the reference), and without it loads alpha = r — here scale 1
/// instead of 2, a large change. Folding alpha/r into lora_B is right either way.
#[test]
fn diffusers_uses_lora_adapter_metadata_and_defaults_alpha_to_rank() {
    let Some(c) = checked() else { return };
    let r = &c["metadata_route"];
    let scale = c["ours_kohya.safetensors"]["unet_ref_max"].as_f64().unwrap().max(1.0);
    // Same bound as the loads above: same process, same kernels, f32.
    assert!(r["ref_diffusers"].as_f64().unwrap() <= 1e-4 * scale, "{r}");
    // Half the LoRA scale on every module moves the output by far more than rounding.
    assert!(r["ref_diffusers_nometa"].as_f64().unwrap() > 1e-2 * scale, "{r}");
}

/// The trap `host lora inspect` warns about: diffusers 0.42.1 given a PEFT folder loads nothing,
/// silently. If a future diffusers fixes it this fails, and the inspect text must change.
#[test]
fn diffusers_load_lora_weights_ignores_a_peft_folder() {
    let Some(c) = checked() else { return };
    let t = &c["trap"];
    assert!(t["error"].is_null(), "diffusers now refuses a PEFT folder: {t}");
    assert_eq!(t["max_abs_change"].as_f64(), Some(0.0), "diffusers now applies a PEFT folder: {t}");
}

#[test]
fn our_files_read_back_to_the_same_modules() {
    let Some(o) = oracle() else { return };
    let _ = checked();
    let refs = reference_deltas("deltas.safetensors");
    for (out, format, extra) in [
        ("ours_kohya.safetensors", LoraFormat::Kohya, 0.0),
        ("ours_comfyui.safetensors", LoraFormat::Kohya, 0.0),
        ("ours_diffusers", LoraFormat::Diffusers, U32),
        ("ours_peft", LoraFormat::Peft, 0.0),
    ] {
        let set = lora_keys::read(&o.dir.join(out)).unwrap_or_else(|e| panic!("{out}: {e}"));
        assert_eq!(set.format, format, "{out}");
        assert_deltas(&set, &refs, extra, out);
    }
    // Deterministic bytes: writing the same set again gives the same file.
    let set = lora_keys::read(&o.dir.join("ref_kohya.safetensors")).unwrap();
    let again = o.dir.join("again_kohya.safetensors");
    lora_keys::write(&set, LoraFormat::Kohya, &again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(o.dir.join("ours_kohya.safetensors")).unwrap());
    // Text encoder at <peft>/text_encoder/, the UNet at the root.
    assert!(o.dir.join("ours_peft/text_encoder/adapter_config.json").is_file());
    let root = lora_keys::read(&o.dir.join("ours_peft/text_encoder")).unwrap();
    assert!(root.modules.iter().all(|m| m.component == Component::TextEncoder));
}

/// The LDM name of every Linear/Conv weight of the real SD1.5 UNet, as diffusers'
/// `convert_ldm_unet_checkpoint` maps it (the oracle checks that round trip on a meta-device model).
#[test]
fn sd15_ldm_names_match_diffusers_converter() {
    let Some(o) = oracle() else { return };
    let v: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(o.dir.join("sd15_ldm.json")).unwrap()).unwrap();
    let layout = sd15::Sd15Layout::sd15();
    let mut n = 0;
    for (d, l) in &v {
        if sd15::unet_module(d).is_none() {
            continue; // e.g. none today: every ≥2-D weight is targetable (checked in lora_keys.rs)
        }
        assert_eq!(sd15::unet_to_ldm(d, &layout).as_deref(), Some(l.as_str()), "{d}");
        assert_eq!(sd15::unet_from_ldm(l, 2).as_deref(), Some(d.as_str()), "{l}");
        n += 1;
    }
    assert_eq!(n, v.len(), "every Linear/Conv weight of SD1.5 is LoRA-targetable");
}
