//! `host generate`: images from a trained model through ABI 1.1's `sample`, written as PNGs
//! whose text chunks hold the settings (prompt, seed, steps, guidance, adapter scale, model,
//! weights, LoRA path and scale), so an image says how it was made.

use std::path::{Path, PathBuf};

use abi_stable::std_types::{RSlice, RStr};
use likeness_abi::{CpuTensor, NamedView, SampleRequest};
use tracing::info;

use crate::config::parse_device;
use crate::data::image_io::{self, Fit};
use crate::data::roles;
use crate::plugins::{Model, Registry};
use crate::visual::chw_to_rgb;
use crate::{EngineError, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub plugin: String,
    /// The model config (`model.config` of the run).
    pub model_config: serde_json::Map<String, serde_json::Value>,
    /// A folder written by training (`final/`, `best/`, `checkpoints/step-N/`), loaded with
    /// `load_state`; None = the model as created.
    pub weights: Option<PathBuf>,
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    /// Identity references: none, one for every prompt, or one per prompt.
    pub references: Vec<PathBuf>,
    /// Control images, every one given to every prompt: the k-th is the role
    /// [`roles::control`]`(k)` (`control`, `control_1`, …), as a dataset names an example's
    /// controls, so an edit model declaring `control_*` gets all of them.
    pub controls: Vec<PathBuf>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f64,
    pub seed: u64,
    pub adapter_scale: f64,
    /// The LoRA file/folder applied (`--lora`; already in `model_config` as `lora`), recorded in
    /// the PNG metadata with the scale.
    pub lora: Option<PathBuf>,
    pub device: String,
    pub output: PathBuf,
    /// `model.conditioning` of the run: inputs that are a metric's embedding of the reference
    /// (or control) image (DTBack's `face_embedding` / `body_embedding`).
    pub conditioning: std::collections::BTreeMap<String, crate::config::ConditioningSection>,
}

/// What `host generate --model PATH` names: a trained run as DTBack's inference names it
/// (`checkpoints/identity_preserving/best_model.pt`). Returns (the run folder, the weights
/// folder): `PATH` may be a weights folder (`best/`, `final/`, `checkpoints/step-N/`: it holds
/// `model.safetensors`), a run folder (its `best/`, else `final/`), or a file name in a run
/// folder — DTBack's `best_model.pt` is the run's `best/` (likeness writes safetensors folders,
/// never pickles), any other `<name>.pt` its `final/`.
pub fn resolve_trained_model(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let weights_in = |run: &Path, first: &str| -> Option<PathBuf> {
        [first, "best", "final"].iter().map(|d| run.join(d)).find(|d| d.join("model.safetensors").exists())
    };
    if path.join("model.safetensors").exists() {
        let run = path.parent().map(|p| if p.ends_with("checkpoints") { p.parent().unwrap_or(p) } else { p });
        return Ok((run.unwrap_or(path).to_path_buf(), path.to_path_buf()));
    }
    if path.is_dir() {
        if let Some(w) = weights_in(path, "best") {
            return Ok((path.to_path_buf(), w));
        }
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if let Some(run) = path.parent().filter(|p| !path.is_dir() && p.join("config.toml").exists()) {
        let first = if stem.starts_with("best") { "best" } else { "final" };
        if let Some(w) = weights_in(run, first) {
            return Ok((run.to_path_buf(), w));
        }
    }
    Err(EngineError::Config(format!(
        "--model {}: not a trained run: expected a run folder (with config.toml and best/ or final/), a weights folder          (with model.safetensors), or DTBack's <run>/best_model.pt, which names the run's best/ (likeness writes          safetensors folders, not pickles)",
        path.display()
    )))
}

fn pick<'a>(v: &'a [PathBuf], i: usize, what: &str, n: usize) -> Result<Option<&'a PathBuf>> {
    match v.len() {
        0 => Ok(None),
        1 => Ok(v.first()),
        k if k == n => Ok(v.get(i)),
        k => Err(EngineError::Config(format!(
            "{k} {what} images for {n} prompts: give one for all prompts or one per prompt"
        ))),
    }
}

/// Generates one image per prompt (seed `seed + i`) into `opts.output`; returns the files.
pub fn generate(reg: &Registry, opts: &GenerateOptions) -> Result<Vec<PathBuf>> {
    if opts.prompts.is_empty() {
        return Err(EngineError::Config("give at least one --prompt".into()));
    }
    if opts.width == 0 || opts.height == 0 {
        return Err(EngineError::Config("--width and --height must be at least 1".into()));
    }
    let device = parse_device(&opts.device)?;
    let config_json = serde_json::Value::Object(opts.model_config.clone()).to_string();
    let lib = reg.open_model_library(&opts.plugin)?;
    warn_unread_images(&lib.interface(&config_json)?, &lib.id, opts);
    let mut model = lib.create(&config_json, device, opts.seed)?;
    if let Some(w) = &opts.weights {
        model.load_state(w)?;
    }
    std::fs::create_dir_all(&opts.output).map_err(|e| EngineError::io(&opts.output, e))?;
    // The LoRA as the model was given it: --lora, else a model.config.lora from the config.
    let lora = opts
        .lora
        .as_ref()
        .map(|l| l.display().to_string())
        .or_else(|| opts.model_config.get("lora").and_then(|v| v.as_str()).map(String::from))
        .unwrap_or_default();
    let mut conditioners = Vec::new();
    for (input, c) in &opts.conditioning {
        let cfg = serde_json::Value::Object(c.config.clone()).to_string();
        let metric = reg.open_metric(&c.plugin, &cfg, device, opts.seed)?;
        conditioners.push(crate::train::Conditioner { input: input.clone(), image: c.image.clone(), metric });
    }
    let mut written = Vec::new();
    for (i, prompt) in opts.prompts.iter().enumerate() {
        let images = prompt_images(opts, i)?;
        // The conditioning metrics embed their image (the reference) for the model.
        let mut embedded: Vec<(String, CpuTensor<f32>)> = Vec::new();
        for c in conditioners.iter_mut() {
            let Some((_, img)) = images.iter().find(|(r, _)| *r == c.image.as_str()) else {
                return Err(EngineError::Config(format!(
                    "the model's input `{}` is `{}`'s embedding of the `{}` image: give --{} IMAGE",
                    c.input, c.metric.id, c.image, c.image
                )));
            };
            embedded.push((c.input.clone(), c.embed(img)?));
        }
        let seed = opts.seed + i as u64;
        let settings = SampleSettings {
            negative_prompt: &opts.negative_prompt,
            width: opts.width,
            height: opts.height,
            steps: opts.steps,
            guidance: opts.guidance,
            seed,
            adapter_scale: opts.adapter_scale,
        };
        let views: Vec<(&str, &CpuTensor<f32>)> =
            images.iter().map(|(n, t)| (n.as_str(), t)).chain(embedded.iter().map(|(n, t)| (n.as_str(), t))).collect();
        let px = sample_one(&mut model, prompt, &views, &settings)?;
        let path = opts.output.join(format!("{seed}_{i:02}.png"));
        let text = [
            ("prompt", prompt.clone()),
            ("negative_prompt", opts.negative_prompt.clone()),
            ("seed", seed.to_string()),
            ("steps", opts.steps.to_string()),
            ("guidance", opts.guidance.to_string()),
            ("adapter_scale", opts.adapter_scale.to_string()),
            ("width", opts.width.to_string()),
            ("height", opts.height.to_string()),
            ("model", format!("{} {}", model.id, model.descriptor.version)),
            ("weights", opts.weights.as_ref().map(|w| w.display().to_string()).unwrap_or_default()),
            ("lora", lora.clone()),
            ("lora_scale", if lora.is_empty() { String::new() } else { opts.adapter_scale.to_string() }),
            ("software", format!("likeness {}", env!("CARGO_PKG_VERSION"))),
        ];
        write_png_with_text(&path, &px.data, opts.width, opts.height, &text)?;
        info!(path = %path.display(), prompt = %prompt, seed, "generated");
        written.push(path);
    }
    Ok(written)
}

/// The named images of prompt `i`, each fitted to the output size: its reference (one for
/// all prompts or one per prompt), then every control as `control`, `control_1`, … (all of
/// them for every prompt).
fn prompt_images(opts: &GenerateOptions, i: usize) -> Result<Vec<(String, CpuTensor<f32>)>> {
    let fit = Fit::Bucket(opts.width, opts.height);
    let load = |p: &Path| -> Result<CpuTensor<f32>> {
        Ok(CpuTensor::new(vec![1, 3, opts.height as i64, opts.width as i64], image_io::load(p, fit)?))
    };
    let mut images = Vec::new();
    if let Some(p) = pick(&opts.references, i, "reference", opts.prompts.len())? {
        images.push((roles::REFERENCE.to_string(), load(p)?));
    }
    for (k, p) in opts.controls.iter().enumerate() {
        images.push((roles::control(k), load(p)?));
    }
    Ok(images)
}

/// Warns about given images no declared input of the model takes (a third `--control` for a
/// model with one `control`): `sample` would ignore them silently.
fn warn_unread_images(i: &likeness_abi::ModelInterface, model_id: &str, opts: &GenerateOptions) {
    let given: Vec<String> = (!opts.references.is_empty())
        .then(|| roles::REFERENCE.to_string())
        .into_iter()
        .chain((0..opts.controls.len()).map(roles::control))
        .collect();
    let unread: Vec<&str> = given
        .iter()
        .map(String::as_str)
        .filter(|r| !i.images.iter().any(|d| !roles::matching(d.name.as_str(), [*r]).is_empty()))
        // A metric of `model.conditioning` embeds it for the model.
        .filter(|r| !opts.conditioning.values().any(|c| c.image == *r))
        .collect();
    if !unread.is_empty() {
        let takes: Vec<&str> = i.images.iter().map(|d| d.name.as_str()).collect();
        tracing::warn!(
            "model `{model_id}` takes images {}; it does not read {} (the k-th --control is `control`, `control_1`, …)",
            takes.join(", "),
            unread.join(", ")
        );
    }
}

/// How one image is sampled (the non-prompt half of a [`SampleRequest`]).
pub struct SampleSettings<'a> {
    pub negative_prompt: &'a str,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f64,
    pub seed: u64,
    pub adapter_scale: f64,
}

/// One image of `prompt` from `model.sample`, checked to be `[1, 3, height, width]`; `images`
/// are the named conditioning images (`reference`, `control` …).
pub fn sample_one(
    model: &mut Model,
    prompt: &str,
    images: &[(&str, &CpuTensor<f32>)],
    s: &SampleSettings<'_>,
) -> Result<CpuTensor<f32>> {
    let views: Vec<NamedView<'_>> =
        images.iter().map(|(n, t)| NamedView { name: RStr::from_str(n), view: t.view() }).collect();
    let prompts = [RStr::from_str(prompt)];
    let negative = [RStr::from_str(s.negative_prompt)];
    let out = model.sample(SampleRequest {
        prompts: RSlice::from_slice(&prompts),
        negative_prompts: if s.negative_prompt.is_empty() {
            RSlice::from_slice(&[])
        } else {
            RSlice::from_slice(&negative)
        },
        images: RSlice::from_slice(&views),
        width: s.width,
        height: s.height,
        steps: s.steps,
        guidance: s.guidance,
        seed: s.seed,
        adapter_scale: s.adapter_scale,
    })?;
    let px = CpuTensor::<f32>::from_managed(&out, "pixels")
        .map_err(|e| EngineError::Plugin { plugin: model.id.clone(), message: format!("sample: {}", e.message) })?;
    if px.shape != [1, 3, s.height as i64, s.width as i64] {
        return Err(EngineError::Plugin {
            plugin: model.id.clone(),
            message: format!("sample returned shape {:?}, asked for [1, 3, {}, {}]", px.shape, s.height, s.width),
        });
    }
    Ok(px)
}

/// A PNG with `tEXt` chunks, written atomically.
pub fn write_png_with_text(path: &Path, chw: &[f32], width: u32, height: u32, text: &[(&str, String)]) -> Result<()> {
    let img = chw_to_rgb(chw, width, height);
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone())
                .map_err(|e| EngineError::io(path, format!("PNG text `{k}`: {e}")))?;
        }
        let mut w = enc.write_header().map_err(|e| EngineError::io(path, format!("PNG: {e}")))?;
        w.write_image_data(img.as_raw()).map_err(|e| EngineError::io(path, format!("PNG: {e}")))?;
    }
    crate::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::write_img;

    /// The k-th `--control` is the role `control(k)` and every prompt gets all of them (issue
    /// 17: an edit model reads several); before, the controls were one per prompt under the one
    /// role `control`, and three controls for two prompts were refused.
    #[test]
    fn every_prompt_gets_every_control_as_control_k() {
        let d = tempfile::tempdir().unwrap();
        let img = |name: &str, seed: u8| {
            let p = d.path().join(name);
            write_img(&p, 32, 32, seed);
            p
        };
        let opts = GenerateOptions {
            plugin: "edit".into(),
            model_config: Default::default(),
            weights: None,
            prompts: vec!["a".into(), "b".into()],
            negative_prompt: String::new(),
            references: vec![img("r0.png", 1), img("r1.png", 2)],
            controls: vec![img("c0.png", 3), img("c1.png", 4), img("c2.png", 5)],
            width: 16,
            height: 16,
            steps: 0,
            guidance: 0.0,
            seed: 0,
            adapter_scale: 1.0,
            lora: None,
            device: "cpu".into(),
            output: d.path().join("out"),
            conditioning: Default::default(),
        };
        let load = |name: &str| image_io::load(&d.path().join(name), Fit::Bucket(16, 16)).unwrap();
        for (i, reference) in ["r0.png", "r1.png"].iter().enumerate() {
            let images = prompt_images(&opts, i).unwrap();
            let names: Vec<&str> = images.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, vec!["reference", "control", "control_1", "control_2"]);
            assert_eq!(images[0].1.data, load(reference), "prompt {i}: its own reference");
            for (k, c) in ["c0.png", "c1.png", "c2.png"].iter().enumerate() {
                assert_eq!(images[k + 1].1.shape, vec![1, 3, 16, 16]);
                assert_eq!(images[k + 1].1.data, load(c), "prompt {i}, control {k}");
            }
        }
    }
}
