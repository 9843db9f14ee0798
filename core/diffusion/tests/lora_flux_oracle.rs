//! Flux LoRA key maps against the real loaders (tests/python/flux_lora_oracle.py through
//! $LIKENESS_PYTHON; skipped without the venv, failing under CI):
//! - a LoRA made by peft on a tiny random FluxTransformer2DModel and saved by diffusers
//!   (`FluxPipeline.save_lora_weights`, α in `lora_adapter_metadata`) or by peft reads with every
//!   key consumed and the reference ΔW;
//! - our diffusers file loads through FluxPipeline's loader and our PEFT folder through peft,
//!   every key consumed, with the reference output;
//! - diffusers' own converter (`_convert_kohya_flux_lora_to_diffusers`) turns OUR kohya file
//!   (BFL names, fused qkv / linear1, real Flux.1 sizes) into the same ΔW as our own split.
//!
//! Bounds. Reading: ΔW compared in f64 from the same f32 tensors, each side rounding at most
//! r + 2 times: |ours − ref| ≤ 2(r + 2)·2⁻⁵³·Σₖ|s·uₒₖ·dₖᵢ|. Kohya conversion: see the script
//! (each side folds alpha / r into one factor, one f32 rounding each: 2·2⁻²⁴ relative to Σ|B·A|).

use likeness_diffusion::lora_keys::{self, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const U64: f64 = 1.0 / (1u64 << 53) as f64;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/flux_lora_oracle.py")
}

fn run_py(py: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(py).arg(script()).args(args).output().expect("run flux_lora_oracle.py");
    assert!(out.status.success(), "flux_lora_oracle.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("flux_lora_oracle.py {args:?}: bad JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

fn py() -> Option<PathBuf> {
    likeness_sdk::testing::python_or_skip("lora_flux_oracle")
}

/// The generated files, once per test binary (≈ 10 s: torch import and a tiny Flux).
fn oracle_dir() -> Option<&'static PathBuf> {
    static O: OnceLock<Option<PathBuf>> = OnceLock::new();
    O.get_or_init(|| {
        let py = py()?;
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Earlier runs' folders (older than an hour, so never a concurrent run's) are removed.
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if e.file_name().to_string_lossy().starts_with("flux_lora_oracle-")
                && old.is_some_and(|a| a.as_secs() > 3600)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = tmp.join(format!("flux_lora_oracle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = run_py(&py, &["gen", "--out", dir.to_str().unwrap()]);
        assert_eq!(s["lora_modules"], s["linears"], "peft put a LoRA on every Linear: {s}");
        Some(dir)
    })
    .as_ref()
}

fn f64_tensors(file: &Path) -> BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), Dtype::F64);
            (k.to_string(), v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect()
}

fn abs_delta(m: &LoraModule) -> Vec<f64> {
    let abs = |t: &RawTensor| {
        let v: Vec<f32> = t.to_f32().unwrap().iter().map(|x| x.abs()).collect();
        RawTensor::from_f32(Dtype::F32, t.shape.clone(), &v).unwrap()
    };
    LoraModule { up: abs(&m.up), down: abs(&m.down), alpha: m.alpha.abs(), ..m.clone() }.delta()
}

fn assert_reference_deltas(set: &LoraSet, refs: &BTreeMap<String, Vec<f64>>, what: &str) {
    let ours: BTreeMap<String, &LoraModule> =
        set.modules.iter().map(|m| (format!("{}:{}", m.component.as_str(), m.path), m)).collect();
    assert_eq!(ours.keys().collect::<Vec<_>>(), refs.keys().collect::<Vec<_>>(), "{what}: module sets");
    for (k, want) in refs {
        let m = ours[k];
        let (d, a) = (m.delta(), abs_delta(m));
        let eps = 2.0 * (m.rank() as f64 + 2.0) * U64;
        for i in 0..d.len() {
            assert!(
                (d[i] - want[i]).abs() <= eps * a[i] + f64::MIN_POSITIVE,
                "{what} {k}[{i}]: {} vs {}",
                d[i],
                want[i]
            );
        }
    }
}

#[test]
fn reads_a_peft_flux_lora_saved_by_diffusers_and_by_peft() {
    let Some(dir) = oracle_dir() else { return };
    let refs = f64_tensors(&dir.join("ref_deltas.safetensors"));
    for (input, format) in [("ref_diffusers", LoraFormat::Diffusers), ("ref_peft", LoraFormat::Peft)] {
        let path = dir.join(input);
        // `read` fails on any key it cannot map: every key is consumed.
        let set = lora_keys::read(&path).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!((set.format, set.arch), (format, BaseArch::Flux), "{input}");
        assert_eq!(lora_keys::detect(&path).unwrap(), (format, BaseArch::Flux), "{input}");
        assert!(set.modules.iter().all(|m| m.component == Component::Transformer));
        assert_reference_deltas(&set, &refs, input);
        // α from lora_adapter_metadata / adapter_config.json: rank_pattern and alpha_pattern.
        let get = |p: &str| set.modules.iter().find(|m| m.path == p).unwrap();
        assert_eq!((get("context_embedder").rank(), get("context_embedder").alpha), (2, 8.0), "{input}");
        assert_eq!((get("norm_out.linear").rank(), get("norm_out.linear").alpha), (4, 3.0), "{input}");
        assert_eq!(get("transformer_blocks.0.attn.to_q").alpha, 8.0, "{input}");
    }
}

#[test]
fn our_flux_files_load_in_diffusers_and_peft_with_the_reference_output() {
    let Some(dir) = oracle_dir() else { return };
    let Some(py) = py() else { return };
    let set = lora_keys::read(&dir.join("ref_diffusers")).unwrap();
    lora_keys::write(&set, LoraFormat::Diffusers, &dir.join("ours_diffusers")).unwrap();
    lora_keys::write(&set, LoraFormat::Peft, &dir.join("ours_peft")).unwrap();
    let r = run_py(&py, &["check-tiny", "--dir", dir.to_str().unwrap()]);
    let n = set.modules.len() as u64;
    assert_eq!(r["diffusers"]["keys"].as_u64(), Some(2 * n), "{r}");
    for which in ["diffusers", "peft"] {
        let c = &r[which];
        assert_eq!(c["layers"].as_u64(), Some(n), "{which}: a LoRA layer on every module: {r}");
        assert_eq!(c["warnings"].as_array().map(Vec::len), Some(0), "{which}: no unexpected/missing keys: {r}");
        // fp32 forward of the same weights (diffusers: alpha/r folded into lora_B, one f32
        // rounding per weight); the LoRA's own effect is ~1, so 1e-5 is far below it.
        let diff = c["max_abs_diff"].as_f64().unwrap();
        assert!(diff <= 1e-5, "{which}: max |ours − reference| = {diff}: {r}");
    }
    assert!(r["diffusers"]["lora_effect"].as_f64().unwrap() > 1e-2, "the LoRA changes the output: {r}");
}

fn tensor(shape: Vec<usize>, seed: u32) -> RawTensor {
    let n: usize = shape.iter().product();
    // Full-mantissa values, so that folding a scale of 1.5 rounds (the bound is exercised).
    let v: Vec<f32> = (0..n)
        .map(|i| ((((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1_048_573) as f32 / 1_048_573.0 - 0.5) * 0.7)
        .collect();
    RawTensor::from_f32(Dtype::F32, shape, &v).unwrap()
}

/// A LoRA with Flux.1's real layer sizes (hidden 3072, mlp 12288) on the first and last double
/// and single blocks and every global layer: equal alpha / r across qkv (merged to rank 6,
/// alpha ·3; s = 1.5 is not a power of two, so both sides round), different ones across
/// txt qkv (folded), single block 37 without proj_mlp (zero rows in linear1), and final_layer
/// alphas ≠ r (diffusers ignores their alpha: we fold it).
fn real_size_set() -> LoraSet {
    let (d, mlp) = (3072, 12288);
    let mut shapes: Vec<(String, [usize; 2], f64)> = vec![
        ("x_embedder".into(), [d, 64], 2.0),
        ("context_embedder".into(), [d, 4096], 2.0),
        ("norm_out.linear".into(), [2 * d, d], 1.0),
        ("proj_out".into(), [64, d], 3.0),
    ];
    for e in ["timestep_embedder", "guidance_embedder", "text_embedder"] {
        shapes.push((format!("time_text_embed.{e}.linear_1"), [d, if e == "text_embedder" { 768 } else { 256 }], 2.0));
        shapes.push((format!("time_text_embed.{e}.linear_2"), [d, d], 2.0));
    }
    for i in [0, 18] {
        let b = format!("transformer_blocks.{i}");
        for (l, a) in
            [("to_q", 3.0), ("to_k", 3.0), ("to_v", 3.0), ("add_q_proj", 1.0), ("add_k_proj", 2.0), ("add_v_proj", 4.0)]
        {
            shapes.push((format!("{b}.attn.{l}"), [d, d], a));
        }
        shapes.push((format!("{b}.attn.to_out.0"), [d, d], 2.0));
        shapes.push((format!("{b}.attn.to_add_out"), [d, d], 2.0));
        for f in ["ff", "ff_context"] {
            shapes.push((format!("{b}.{f}.net.0.proj"), [mlp, d], 2.0));
            shapes.push((format!("{b}.{f}.net.2"), [d, mlp], 2.0));
        }
        shapes.push((format!("{b}.norm1.linear"), [6 * d, d], 2.0));
        shapes.push((format!("{b}.norm1_context.linear"), [6 * d, d], 2.0));
    }
    for i in [0, 37] {
        let s = format!("single_transformer_blocks.{i}");
        for l in ["attn.to_q", "attn.to_k", "attn.to_v"] {
            shapes.push((format!("{s}.{l}"), [d, d], 2.0));
        }
        if i == 0 {
            shapes.push((format!("{s}.proj_mlp"), [mlp, d], 2.0));
        }
        shapes.push((format!("{s}.proj_out"), [d, d + mlp], 2.0));
        shapes.push((format!("{s}.norm.linear"), [3 * d, d], 2.0));
    }
    let modules = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (path, [o, n], alpha))| LoraModule {
            component: Component::Transformer,
            path,
            down: tensor(vec![2, n], i as u32),
            up: tensor(vec![o, 2], 1000 + i as u32),
            alpha,
        })
        .collect();
    LoraSet { format: LoraFormat::Diffusers, arch: BaseArch::Flux, modules, metadata: BTreeMap::new() }
}

#[test]
fn diffusers_converts_our_kohya_flux_file_to_the_same_deltas_as_we_do() {
    let Some(py) = py() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (kohya, ours) = (dir.path().join("ours_kohya.safetensors"), dir.path().join("ours_split.safetensors"));
    lora_keys::write(&real_size_set(), LoraFormat::Kohya, &kohya).unwrap();
    // Our conversion of that file: read (split) and write as diffusers (alpha / r folded).
    let split = lora_keys::read(&kohya).unwrap();
    assert_eq!((split.arch, split.format), (BaseArch::Flux, LoraFormat::Kohya));
    lora_keys::write(&split, LoraFormat::Diffusers, &ours).unwrap();
    let r = run_py(&py, &["check-kohya", "--kohya", kohya.to_str().unwrap(), "--ours", ours.to_str().unwrap()]);
    assert_eq!(r["warnings"].as_array().map(Vec::len), Some(0), "diffusers left keys unconverted: {r}");
    assert_eq!(r["only_ours"].as_array().map(Vec::len), Some(0), "{r}");
    // diffusers copies a non-block-diagonal down into every part, including a proj_mlp whose
    // rows are zero (ΔW = 0); we leave such a part out.
    let only = r["only_diffusers"].as_array().unwrap();
    assert!(only.iter().all(|p| p == "single_transformer_blocks.37.proj_mlp"), "{r}");
    assert_eq!(r["only_diffusers_max_abs_delta"].as_f64(), Some(0.0), "{r}");
    let mods = r["modules"].as_object().unwrap();
    assert_eq!(mods.len(), split.modules.len(), "{r}");
    let (mut worst, mut max_diff): (f64, f64) = (0.0, 0.0);
    for (p, m) in mods {
        let ratio = m["max_ratio"].as_f64().unwrap();
        worst = worst.max(ratio);
        max_diff = max_diff.max(m["max_abs_diff"].as_f64().unwrap());
        assert!(ratio <= 1.0, "{p}: |ΔW ours − diffusers| exceeds 2·2⁻²⁴·Σ|B·A|: {m}");
        assert!(m["max_abs_delta"].as_f64().unwrap() > 0.0, "{p}: {m}");
    }
    eprintln!(
        "kohya → diffusers: {} modules, max |ΔW diff| = {max_diff:.3e}, worst |diff| / bound = {worst:.3e}",
        mods.len()
    );
}
