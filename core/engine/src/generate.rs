//! `host generate`: images from a trained model through ABI 1.1's `sample`, written as PNGs
//! whose text chunks hold the settings (prompt, seed, steps, guidance, adapter scale, model,
//! weights, LoRA path and scale), so an image says how it was made.

use std::path::{Path, PathBuf};

use abi_stable::std_types::{RSlice, RStr};
use likeness_abi::{CpuTensor, NamedView, SampleRequest};
use tracing::info;

use crate::config::parse_device;
use crate::data::image_io::{self, Fit};
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
    /// Control images, with the same rule.
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
    let fit = Fit::Bucket(opts.width, opts.height);
    let mut conditioners = Vec::new();
    for (input, c) in &opts.conditioning {
        let cfg = serde_json::Value::Object(c.config.clone()).to_string();
        let metric = reg.open_metric(&c.plugin, &cfg, device, opts.seed)?;
        conditioners.push(crate::train::Conditioner { input: input.clone(), image: c.image.clone(), metric });
    }
    let mut written = Vec::new();
    let n = opts.prompts.len();
    for (i, prompt) in opts.prompts.iter().enumerate() {
        let mut images: Vec<(&str, CpuTensor<f32>)> = Vec::new();
        for (role, list) in [("reference", &opts.references), ("control", &opts.controls)] {
            if let Some(p) = pick(list, i, role, n)? {
                let data = image_io::load(p, fit)?;
                images.push((role, CpuTensor::new(vec![1, 3, opts.height as i64, opts.width as i64], data)));
            }
        }
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
            images.iter().map(|(n, t)| (*n, t)).chain(embedded.iter().map(|(n, t)| (n.as_str(), t))).collect();
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
