//! The Qwen-Image VAE's checkpoint layouts (`qwen_vae_from_path`, musubi-tuner's `--vae`):
//! diffusers' folder, its `diffusion_pytorch_model.safetensors` alone, and the Wan-2.1 names of
//! ComfyUI's `qwen_image_vae.safetensors` (tests/python/qwen_vae_wan_layout.py: a tiny random
//! model saved both ways, the Wan names checked by diffusers' own `convert_wan_vae_to_diffusers`,
//! and the full-size layout's names and shapes).
//!
//! Tolerances: every layout gives bit-identical parameters, so the same kernels on the same
//! weights give bit-identical encodes and decodes (asserted with `equal`, no tolerance). Against
//! diffusers' own outputs 1e-4 absolute, as tests/qwen_vae.rs (f32 re-association of the 3-D vs
//! 2-D convs only, ≈ 1e-5 on O(1) values).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{max_diff, PyOracle};
use likeness_diffusion_torch::qwen_vae::{qwen_vae_from_diffusers, qwen_vae_from_path, QwenImageVae};
use likeness_diffusion_torch::{Mode, Store};
use tch::{Device, Kind, Tensor};

/// The oracle's output, once per test binary.
fn oracle(test: &str) -> Option<&'static PyOracle> {
    static O: std::sync::OnceLock<Option<PyOracle>> = std::sync::OnceLock::new();
    O.get_or_init(|| PyOracle::run("qwen_vae_wan_layout.py", test)).as_ref()
}

fn wan_file(o: &PyOracle) -> PathBuf {
    o.path("comfy/qwen_image_vae.safetensors")
}

fn params(store: &Store) -> BTreeMap<String, Tensor> {
    store.named_parameters().into_iter().collect()
}

fn outputs(vae: &QwenImageVae, o: &PyOracle) -> [Tensor; 3] {
    tch::no_grad(|| {
        let (mean, logvar) = vae.encode(&o.tensor("images"));
        [mean, logvar, vae.decode(&o.tensor("latents"))]
    })
}

#[test]
fn every_layout_loads_the_same_vae_bit_for_bit() {
    let Some(o) = oracle("every_layout_loads_the_same_vae_bit_for_bit") else { return };
    for kind in [Kind::Float, Kind::BFloat16] {
        let (ref_store, ref_vae) = qwen_vae_from_diffusers(&o.path("vae"), kind, Device::Cpu, Mode::Alloc).unwrap();
        let want = params(&ref_store);
        assert_eq!(want.len() as u64, o.json["diffusers_tensors"].as_u64().unwrap());
        let want_out = outputs(&ref_vae, o);
        if kind == Kind::Float {
            for (got, name) in want_out.iter().zip(["mean", "logvar", "decoded"]) {
                assert!(max_diff(got, &o.tensor(name), name) <= 1e-4, "{name} vs diffusers");
            }
        }
        for path in [o.path("vae"), o.path("vae/diffusion_pytorch_model.safetensors"), wan_file(o)] {
            let (store, vae) = qwen_vae_from_path(&path, kind, Device::Cpu, Mode::Alloc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let got = params(&store);
            assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{}", path.display());
            for (n, t) in &got {
                assert!(t.equal(&want[n]), "{} {kind:?}: parameter {n} differs", path.display());
            }
            for (a, b) in outputs(&vae, o).iter().zip(&want_out) {
                assert!(a.equal(b), "{} {kind:?}: encode/decode not bit-identical", path.display());
            }
        }
    }
}

/// Writes a safetensors file with these names and shapes (bf16, as ComfyUI's file) whose data is
/// a hole: a sparse file of the real size, for header-only (`Mode::Plan`) loads.
fn write_sparse(path: &Path, tensors: &BTreeMap<String, Vec<i64>>) {
    let mut header = serde_json::Map::new();
    let mut at = 0i64;
    for (name, shape) in tensors {
        let len = 2 * shape.iter().product::<i64>();
        header
            .insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + len]}));
        at += len;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    let f = std::fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut &f, &bytes).unwrap();
    f.set_len(bytes.len() as u64 + at as u64).unwrap();
}

/// ComfyUI's real layout (the full-size model's Wan names and shapes, from diffusers' converter)
/// loads without a config: Qwen-Image's is used, with or without another component's config.json
/// beside the file.
#[test]
fn comfyui_full_size_layout_loads_with_qwen_images_config() {
    let Some(o) = oracle("comfyui_full_size_layout_loads_with_qwen_images_config") else { return };
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.path("wan_manifest.json")).unwrap()).unwrap();
    let tensors: BTreeMap<String, Vec<i64>> = manifest["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("qwen_image_vae.safetensors");
    write_sparse(&file, &tensors);
    for beside in [None, Some("{\"_class_name\": \"QwenImageTransformer2DModel\"}")] {
        if let Some(text) = beside {
            std::fs::write(dir.path().join("config.json"), text).unwrap();
        }
        let (store, vae) = qwen_vae_from_path(&file, Kind::BFloat16, Device::Cpu, Mode::Plan).unwrap();
        assert_eq!(store.parameter_count(), manifest["num_params"].as_i64().unwrap());
        assert_eq!((vae.config.base_dim, vae.config.z_dim), (96, 16), "Qwen-Image's config");
    }
}

/// Rewrites `src` into `dst` with every name passed through `rename`, the config beside it.
fn rewrite(src: &Path, dst: &Path, rename: impl Fn(&str) -> String) {
    let tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(src).unwrap().into_iter().map(|(n, t)| (rename(&n), t)).collect();
    Tensor::write_safetensors(&tensors, dst).unwrap();
    std::fs::copy(src.with_file_name("config.json"), dst.with_file_name("config.json")).unwrap();
}

fn load_error(path: &Path) -> String {
    match qwen_vae_from_path(path, Kind::Float, Device::Cpu, Mode::Plan) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn renamed_tensors_and_foreign_files_are_refused_by_name() {
    let Some(o) = oracle("renamed_tensors_and_foreign_files_are_refused_by_name") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // A Wan-layout file with one tensor renamed: reported in the file's own names.
        (wan_file(o), "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.4.skip.weight", "Wan-2.1 / ComfyUI"),
        // The same in diffusers' layout.
        (
            o.path("vae/diffusion_pytorch_model.safetensors"),
            "encoder.down_blocks.3.conv_shortcut.weight",
            "encoder.down_blocks.3.shortcut.weight",
            "",
        ),
    ];
    for (i, (src, old, new, layout)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("vae.safetensors");
        rewrite(&src, &file, |n| if n == old { new.to_string() } else { n.to_string() });
        let e = load_error(&file);
        eprintln!("{e}");
        assert!(e.contains(&file.display().to_string()) && e.contains(layout), "{e}");
        assert!(e.contains("(1 missing, 1 unexpected, 0 with a wrong shape)"), "{e}");
        assert!(e.contains(&format!("missing: {old}\n")) && e.contains(&format!("unexpected: {new}\n")), "{e}");
    }
    // Neither layout (every name under a prefix this loader does not strip): the counts and a
    // few names, not the whole file.
    let file = dir.path().join("prefixed.safetensors");
    rewrite(&wan_file(o), &file, |n| format!("first_stage_model.{n}"));
    let e = load_error(&file);
    eprintln!("{e}");
    assert!(e.contains(&file.display().to_string()) && e.contains("not a Qwen-Image VAE in a layout"), "{e}");
    assert!(e.contains("the file holds 0 under diffusers' names") && e.contains("and 0 under the Wan-2.1"), "{e}");
    assert!(e.contains("unexpected: first_stage_model.conv1.bias, first_stage_model.conv1.weight,"), "{e}");
    assert!(e.contains("(194 in all)") && e.lines().count() == 1, "{e}");
}
