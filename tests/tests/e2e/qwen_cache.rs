//! Issue 17: the encoding cache of an edit model. Qwen-Image-Edit's conditioning is Qwen2.5-VL's
//! encoding of the caption *with* the control images (one encoding of several inputs, as long as
//! the caption and the controls' image tokens make it) plus each control's VAE latents (a second
//! encoding of the same controls). The cache stores each per sample, pads a batch's embeddings
//! to its longest with their mask, and passes them in place of the caption and the controls.
//!
//! What is tested, through the real `host` and `qwen-edit-lora` on the tiny diffusers model: a
//! run with the cache (cold, then warm from the same folder) ends with the same LoRA weights as
//! one without, at batch 2 with captions of different lengths (so the batch is padded), and the
//! entries are what the rule says (one per sample, the real positions only).
//!
//! Tolerance: bit-identical. Every run is the same binary on the same machine: the cached
//! embeddings are the f32 values the uncached run computes (the VL encoder runs in f32 here, and
//! f32 → f32 is exact), the cache stores each sample's real positions and pads with the zeros
//! the encoder pads with, and the mask keeps padding out of the attention exactly (masked
//! scores are −inf before the softmax). So equal inputs reach the transformer, and equal
//! kernels on equal inputs give equal results on any CPU.

use std::path::{Path, PathBuf};

use likeness_tests::{built_or_skip, data_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

use crate::qwen_edit::{musubi_files, tiny_qwen_edit};

/// Two 64×64 targets (no buckets) with one control each and captions of 3 and 12 words, batch 2.
fn dataset(dir: &Dir, data: &Path) -> PathBuf {
    musubi_files(
        dir,
        data,
        &[
            ("obama.jpg", "img/a.jpg"),
            ("biden.jpg", "img/b.jpg"),
            ("obama2.jpg", "ctl/a.jpg"),
            ("obama3.jpg", "ctl/b.jpg"),
        ],
        &[("a", "make him smile"), ("b", "turn this portrait into a watercolour painting on a rainy evening")],
        "resolution = [64, 64]\nbatch_size = 2\nenable_bucket = false\n",
    )
}

/// `host train --plugin qwen-edit-lora` with musubi's flags, 2 epochs of one batch of 2.
fn train(dir: &Dir, tiny: &Path, ds: &Path, out: &Path, extra: &[&str]) -> String {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_plugins()).args(["train", "--plugin", "qwen-edit-lora"]);
    t.arg("--dit").arg(tiny).arg("--vae").arg(tiny.join("vae")).arg("--text_encoder").arg(tiny.join("text_encoder"));
    t.arg("--dataset_config").arg(ds.join("dataset.toml")).arg("--edit_plus");
    t.args(["--network_module", "networks.lora_qwen_image", "--network_dim", "4", "--learning_rate", "1e-3"]);
    t.args(["--max_train_epochs", "2", "--timestep_sampling", "shift", "--discrete_flow_shift", "2.2"]);
    t.arg("--output_dir").arg(out).args(["--output_name", "lora"]);
    for kv in extra {
        t.args(["--set", kv]);
    }
    t.arg("--no-progress").ok()
}

fn lora_tensors(out: &Path) -> Vec<(String, Vec<u8>)> {
    let (tensors, _) = likeness_sdk::st::load(&out.join("lora.safetensors")).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = tensors.into_iter().map(|t| (t.name, t.bytes)).collect();
    v.sort();
    v
}

/// The cache's entries of one encoding: the shape of `tensor` in each.
fn entry_shapes(cache: &Path, encoding: &str, tensor: &str) -> Vec<Vec<usize>> {
    let mut shapes = Vec::new();
    for shard in std::fs::read_dir(cache.join("qwen-edit-lora").join(encoding)).unwrap() {
        for e in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let (tensors, _) = likeness_sdk::st::load(&e.unwrap().path()).unwrap();
            let t = tensors.iter().find(|t| t.name == tensor).unwrap_or_else(|| panic!("{encoding}: no `{tensor}`"));
            shapes.push(t.shape.clone());
        }
    }
    shapes.sort();
    shapes
}

fn last_cache_record(out: &Path) -> serde_json::Value {
    read_metrics(out).into_iter().rfind(|r| r["type"] == "cache").expect("a cache record")
}

#[test]
fn issue_17_cached_caption_and_control_encodings_train_as_uncached_ones() {
    const T: &str = "issue_17_cached_caption_and_control_encodings_train_as_uncached_ones";
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = tiny_qwen_edit(T) else { return };
    let dir = Dir::new("qwen-edit-cache");
    let ds = dataset(&dir, &data);
    let cache = dir.join("cache");
    let cache_dir = format!("cache.dir={}", serde_json::Value::String(cache.display().to_string()));

    let plain = dir.join("uncached");
    train(&dir, &tiny, &ds, &plain, &["cache.enabled=false"]);
    let cold = dir.join("cold");
    let log = train(&dir, &tiny, &ds, &cold, &[&cache_dir]);
    let warm = dir.join("warm");
    train(&dir, &tiny, &ds, &warm, &[&cache_dir]);

    // The cold run computed each sample's three encodings once (epoch 1) and read them at
    // epoch 2; the warm run read everything.
    let c = last_cache_record(&cold);
    assert_eq!((c["hits"].as_u64(), c["misses"].as_u64()), (Some(6), Some(6)), "{c}\n{log}");
    let w = last_cache_record(&warm);
    assert_eq!((w["hits"].as_u64(), w["misses"].as_u64()), (Some(12), Some(0)), "{w}");
    // One entry per sample; the VL embeddings keep their real positions only (two lengths), each
    // with as long a mask; one VAE latent per control role.
    let embeds = entry_shapes(&cache, "prompt_embeds", "prompt_embeds");
    assert_eq!(embeds.len(), 2, "{embeds:?}");
    assert!(embeds[0][1] < embeds[1][1], "the captions' encodings should differ in length: {embeds:?}");
    let masks = entry_shapes(&cache, "prompt_embeds", "prompt_embeds_mask");
    assert_eq!(masks.iter().map(|s| s[1]).collect::<Vec<_>>(), embeds.iter().map(|s| s[1]).collect::<Vec<_>>());
    assert_eq!(entry_shapes(&cache, "control_latents", "latents.control"), vec![vec![1, 16, 8, 8]; 2]);
    assert_eq!(entry_shapes(&cache, "latents", "latents").len(), 2);

    let reference = lora_tensors(&plain);
    assert!(!reference.is_empty());
    for (what, out) in [("cold cache", &cold), ("warm cache", &warm)] {
        let got = lora_tensors(out);
        let differ: Vec<&str> = reference.iter().zip(&got).filter(|(a, b)| a != b).map(|(a, _)| a.0.as_str()).collect();
        assert!(
            reference.len() == got.len() && differ.is_empty(),
            "{what}: {} tensors differ: {differ:?}",
            differ.len()
        );
    }
    let losses = |out: &Path| -> Vec<String> {
        read_metrics(out).into_iter().filter(|r| r["type"] == "train").map(|r| r["loss"].to_string()).collect()
    };
    assert_eq!(losses(&plain), losses(&cold));
    assert_eq!(losses(&plain), losses(&warm));
}
