//! `host generate --config train_image.yaml`: PairEdit's `gen_image_script.py` →
//! `generate_image.py`, with its loops, LoRA paths, seeds, prompts and file names.
//!
//! Loops: `for dataset (index d): for version: for noise_scale: for skip:`, then `count_gen`
//! seeds, then every scale. The LoRA is the run's final *semantic* file (PairEdit never loads
//! the content LoRA to generate), or `trained_lora_path` when `use_trained_lora_path` is set.
//! It is active only at sampling steps `i > skip` (0-based; `model.config.sample_adapter_skip`)
//! at multiplier `scale`, with the same seed for every scale.

use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use tracing::info;

use super::{f2, number, string, Job, Keys, PairEditYaml, MODEL_PLUGIN};
use crate::config::{parse_device, PluginSection};
use crate::generate::{sample_one, SampleSettings};
use crate::plugins::Registry;
use crate::visual::chw_to_rgb;
use crate::{EngineError, Result};

/// The generation keys, typed.
#[derive(Debug, Clone)]
pub struct GenKeys {
    pub use_trained_lora_path: bool,
    pub trained_lora_path: PathBuf,
    pub use_prompts_file: bool,
    pub prompts_file: Vec<String>,
    pub use_random_seed: bool,
    pub output_folder_gen: PathBuf,
    pub prompt: Vec<String>,
    pub skips: Vec<u64>,
    pub start_seed_gen: u64,
    pub scales: Vec<f64>,
    pub count_gen: u64,
    /// Real-image editing (`train_image_real`): `semantic_lora_path` and `semantic_cfg_scale`.
    pub semantic: Option<(PathBuf, f64)>,
}

/// One `generate_image.py` call: a trained LoRA, a skip, the prompt (or prompt file) of its dataset.
#[derive(Debug, Clone)]
pub struct GenJob {
    pub dataset: String,
    pub lora_name: String,
    /// The LoRA candidates, the first that exists is used (ours, then PairEdit's `.pt`).
    pub lora: Vec<PathBuf>,
    /// `<output_folder_gen>/<dataset>/<lora_name>`.
    pub output_path: PathBuf,
    pub skip: u64,
    pub prompt: String,
    /// `prompts_file[d]` (or the last) when `use_prompts_file`.
    pub prompts_file: Option<String>,
}

/// What `host generate` wrote.
#[derive(Debug, Clone, Default)]
pub struct GenerateSummary {
    pub images: Vec<PathBuf>,
    pub collages: Vec<PathBuf>,
}

impl PairEditYaml {
    /// The generation keys (all required, as `gen_image_script.py` reads them); every bad or
    /// missing key is reported at once.
    pub fn gen_keys(&self) -> Result<GenKeys> {
        let file = self.path.display().to_string();
        let mut k = Keys::new(&file, &self.text, &self.map);
        let use_trained_lora_path = k.get("use_trained_lora_path", flag);
        let trained_lora_path = k.get("trained_lora_path", string_or_null);
        let use_prompts_file = k.get("use_prompts_file", flag);
        let prompts_file = k.get("prompts_file", strings);
        let use_random_seed = k.get("use_random_seed", flag);
        let output_folder_gen = k.get("output_folder_gen", string);
        let prompt = k.get("prompt", strings);
        let skips = k.get("skips", skips);
        let start_seed_gen = k.get("start_seed_gen", |v| super::count(v, 0));
        let scales = k.get("scales", scales);
        let count_gen = k.get("count_gen", |v| super::count(v, 1));
        let semantic = match self.is_real() {
            true => Some((k.get("semantic_lora_path", string), k.get("semantic_cfg_scale", number))),
            false => None,
        };
        k.finish()?;
        let g = (|| {
            Some(GenKeys {
                use_trained_lora_path: use_trained_lora_path?,
                trained_lora_path: PathBuf::from(trained_lora_path?),
                use_prompts_file: use_prompts_file?,
                prompts_file: prompts_file?,
                use_random_seed: use_random_seed?,
                output_folder_gen: PathBuf::from(output_folder_gen?),
                prompt: prompt?,
                skips: skips?,
                start_seed_gen: start_seed_gen?,
                scales: scales?,
                count_gen: count_gen?,
                semantic: match semantic {
                    Some((p, s)) => Some((PathBuf::from(p?), s?)),
                    None => None,
                },
            })
        })()
        .ok_or_else(|| EngineError::Other(format!("{file}: a generation key was not read (engine bug)")))?;
        if g.use_trained_lora_path && g.trained_lora_path.as_os_str().is_empty() {
            return Err(EngineError::Config(format!(
                "{file}: use_trained_lora_path is 1 but trained_lora_path is empty: give the LoRA file to generate with"
            )));
        }
        Ok(g)
    }

    /// The `generate_image.py` calls of `gen_image_script.py`, in its order.
    pub fn gen_jobs(&self, g: &GenKeys) -> Vec<GenJob> {
        let pick = |list: &[String], d: usize| list.get(d).or(list.last()).cloned().unwrap_or_default();
        let mut out = Vec::new();
        let jobs = self.jobs();
        for (d, dataset) in self.datasets.iter().enumerate() {
            for job in jobs.iter().filter(|j| &j.dataset == dataset) {
                let lora = match g.use_trained_lora_path {
                    true => vec![g.trained_lora_path.clone()],
                    false => self.final_lora_candidates(job),
                };
                for &skip in &g.skips {
                    out.push(GenJob {
                        dataset: dataset.clone(),
                        lora_name: job.lora_name.clone(),
                        lora: lora.clone(),
                        output_path: g.output_folder_gen.join(dataset).join(&job.lora_name),
                        skip,
                        prompt: pick(&g.prompt, d),
                        prompts_file: g.use_prompts_file.then(|| pick(&g.prompts_file, d)),
                    });
                }
            }
        }
        out
    }

    /// Our final semantic file, then PairEdit's own `.pt` name for it.
    fn final_lora_candidates(&self, job: &Job) -> Vec<PathBuf> {
        let ours = job.final_semantic(self.train_iteration);
        let theirs = job.run_dir.join(format!("{}_{}epoch.pt", job.stem, self.train_iteration));
        vec![ours, theirs]
    }

    /// The model config of one generation job: the training keys without the PairEdit
    /// objective, the LoRA and the skip. Real-image editing (`semantic`) keeps the objective
    /// (the model's edit sampling needs it): the semantic LoRA is `lora`, the run's content LoRA
    /// `lora_content`, and generate_real_image's `i >= skip` is `sample_adapter_skip = skip − 1`.
    fn gen_model_config(&self, lora: &Path, skip: u64, semantic: Option<&(PathBuf, f64)>) -> Result<PluginSection> {
        let config = self.gen_model_json(lora, skip, semantic);
        let mut section =
            PluginSection { plugin: MODEL_PLUGIN.into(), loss_weight: 1.0, config, conditioning: Default::default() };
        section.resolve_pretrained()?;
        Ok(section)
    }

    /// [`Self::gen_model_config`] before the model id is resolved.
    pub(crate) fn gen_model_json(
        &self,
        lora: &Path,
        skip: u64,
        semantic: Option<&(PathBuf, f64)>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut config = self.model_config();
        let obj = config.as_object_mut().expect("model_config is an object");
        obj.remove("lora_targets");
        match semantic {
            None => {
                // Pixels are decoded when sampling; decode_pixels is about training outputs.
                obj.remove("decode_pixels");
                obj.insert("lora".into(), lora.display().to_string().into());
                obj.insert("sample_adapter_skip".into(), skip.into());
            }
            Some((path, cfg_scale)) => {
                obj.insert("pairedit".into(), self.objective(1.0));
                obj.insert("lora".into(), path.display().to_string().into());
                obj.insert("lora_content".into(), lora.display().to_string().into());
                obj.insert("sample_edit_cfg".into(), (*cfg_scale).into());
                if let Some(k) = skip.checked_sub(1) {
                    obj.insert("sample_adapter_skip".into(), k.into());
                }
            }
        }
        obj.clone()
    }
}

/// `{seed}_{dataset}_skip{skip}_{epoch}epoch_scale{s:.2f}_{prompt}.jpg` (under `origin/<seed>/`).
pub fn image_name(seed: u64, dataset: &str, skip: u64, epoch: u64, scale: f64, prompt: &str) -> String {
    format!("{seed}_{dataset}_skip{skip}_{epoch}epoch_scale{}_{}.jpg", f2(scale), prompt_file_name(prompt))
}

/// The collage: `{seed}_{dataset}_skip{skip}_{epoch}epoch_{s0:.2f}-{sN:.2f}_{prompt}.jpg`
/// (one scale: `{s0:.2f}`).
pub fn collage_name(seed: u64, dataset: &str, skip: u64, epoch: u64, scales: &[f64], prompt: &str) -> String {
    let s = match scales {
        [one] => f2(*one),
        _ => format!("{}-{}", f2(scales[0]), f2(scales[scales.len() - 1])),
    };
    format!("{seed}_{dataset}_skip{skip}_{epoch}epoch_{s}_{}.jpg", prompt_file_name(prompt))
}

/// `re.sub(r'\s', '_', prompt)`.
fn prompt_file_name(prompt: &str) -> String {
    prompt.chars().map(|c| if c.is_whitespace() { '_' } else { c }).collect()
}

/// The seed of image `k`: `start_seed_gen + k`, or PairEdit's `random.randint(0, 2**15)`.
pub fn seed_of(g: &GenKeys, k: u64) -> u64 {
    match g.use_random_seed {
        true => rand::thread_rng().gen_range(0..=1u64 << 15),
        false => g.start_seed_gen + k,
    }
}

/// A prompt from the prompt file for `seed`. PairEdit picks with the unseeded
/// `random.randint`; here the pick derives from the image's seed, so a rerun makes the same images.
pub fn pick_prompt(prompts: &[String], seed: u64) -> &str {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    &prompts[rng.gen_range(0..prompts.len())]
}

/// A prompt file: `prompts/<name>` (what gen_image_script.py passes), else `<name>` as given,
/// both relative to the current directory; a YAML list of strings.
pub fn load_prompts(name: &str) -> Result<Vec<String>> {
    load_prompts_in(Path::new(""), name)
}

/// [`load_prompts`] from the folder `cwd` (`""` = the current directory).
pub fn load_prompts_in(cwd: &Path, name: &str) -> Result<Vec<String>> {
    let candidates = [cwd.join("prompts").join(name), cwd.join(name)];
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Err(EngineError::Config(format!(
            "prompts_file `{name}`: neither {} nor {} exists (PairEdit reads prompts/<name> relative to the current directory)",
            candidates[0].display(),
            candidates[1].display()
        )));
    };
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    let v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| EngineError::io(path, format!("not valid YAML: {e}")))?;
    super::string_list(&v).map_err(|m| EngineError::io(path, format!("the prompt file {m} (a YAML list of prompts)")))
}

/// Generates every image of a PairEdit YAML (see the module docs).
pub fn generate(y: &PairEditYaml, reg: &Registry) -> Result<GenerateSummary> {
    let g = y.gen_keys()?;
    let device = parse_device(&y.device)?;
    let lib = reg.open_model_library(MODEL_PLUGIN)?;
    let mut summary = GenerateSummary::default();
    let jobs = y.gen_jobs(&g);
    for (n, job) in jobs.iter().enumerate() {
        let lora = job.lora.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            let tried: Vec<String> = job.lora.iter().map(|p| p.display().to_string()).collect();
            EngineError::Config(format!(
                "{}: no LoRA for {} (tried {}): train it first with `host train --config {}`, or set use_trained_lora_path: 1 and trained_lora_path",
                y.path.display(),
                job.lora_name,
                tried.join(", "),
                y.path.display()
            ))
        })?;
        info!(job = n + 1, of = jobs.len(), lora = %lora.display(), skip = job.skip, "PairEdit generation");
        let prompts = job.prompts_file.as_deref().map(load_prompts).transpose()?;
        let section = y.gen_model_config(&lora, job.skip, g.semantic.as_ref())?;
        let config = serde_json::Value::Object(section.config).to_string();
        let mut model = lib.create(&config, device, g.start_seed_gen)?;
        for k in 0..g.count_gen {
            let seed = seed_of(&g, k);
            let prompt = prompts.as_deref().map(|p| pick_prompt(p, seed)).unwrap_or(&job.prompt);
            generate_seed(y, &g, job, &mut model, seed, prompt, &mut summary)?;
        }
    }
    Ok(summary)
}

/// One seed: an image per scale in `origin/<seed>/`, then the collage of them.
fn generate_seed(
    y: &PairEditYaml,
    g: &GenKeys,
    job: &GenJob,
    model: &mut crate::plugins::Model,
    seed: u64,
    prompt: &str,
    summary: &mut GenerateSummary,
) -> Result<()> {
    let side = y.resolution as u32;
    let origin = job.output_path.join("origin").join(seed.to_string());
    std::fs::create_dir_all(&origin).map_err(|e| EngineError::io(&origin, e))?;
    let mut images = Vec::new();
    for &scale in &g.scales {
        let settings = SampleSettings {
            negative_prompt: "",
            width: side,
            height: side,
            steps: y.num_inference_steps as u32,
            guidance: y.guidance_scale,
            seed,
            adapter_scale: scale,
        };
        let px = sample_one(model, prompt, &[], &settings)?;
        let img = chw_to_rgb(&px.data, side, side);
        let path = origin.join(image_name(seed, &job.dataset, job.skip, y.train_iteration, scale, prompt));
        write_jpeg(&path, &img)?;
        info!(path = %path.display(), seed, scale, "generated");
        summary.images.push(path);
        images.push(img);
    }
    let mut collage = RgbImage::new(side * images.len() as u32, side);
    for (i, img) in images.iter().enumerate() {
        image::imageops::replace(&mut collage, img, i as i64 * side as i64, 0);
    }
    let name = collage_name(seed, &job.dataset, job.skip, y.train_iteration, &g.scales, prompt);
    let path = job.output_path.join(name);
    write_jpeg(&path, &collage)?;
    summary.collages.push(path);
    Ok(())
}

/// A JPEG at PIL's default quality (75), written atomically.
fn write_jpeg(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 75)
        .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| EngineError::io(path, format!("JPEG: {e}")))?;
    crate::write_atomic(path, &bytes)
}

/// `0` / `1` (PairEdit tests them with `if x:`) or a boolean.
fn flag(v: &serde_yaml_ng::Value) -> Result<bool, String> {
    v.as_bool()
        .or_else(|| v.as_i64().map(|n| n != 0))
        .ok_or_else(|| format!("is {}; expected 0 or 1", super::describe(v)))
}

/// A string, or empty (`trained_lora_path:` with nothing after it).
fn string_or_null(v: &serde_yaml_ng::Value) -> Result<String, String> {
    if v.is_null() {
        return Ok(String::new());
    }
    string(v)
}

/// A list of strings, or one string (taken as a list of one: PairEdit would index its characters).
fn strings(v: &serde_yaml_ng::Value) -> Result<Vec<String>, String> {
    match v.as_str() {
        Some(s) => Ok(vec![s.to_string()]),
        None => super::string_list(v),
    }
}

fn skips(v: &serde_yaml_ng::Value) -> Result<Vec<u64>, String> {
    let items = v
        .as_sequence()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("is {}; expected a non-empty list of step indices (e.g. [10])", super::describe(v)))?;
    items.iter().map(|i| super::count(i, 0)).collect()
}

/// PairEdit's comma string `"0,0.8,1.0,1.2"` (`comma_separated_numbers`), a YAML list, or one number.
pub fn scales(v: &serde_yaml_ng::Value) -> Result<Vec<f64>, String> {
    let parsed: Result<Vec<f64>, String> = if let Some(s) = v.as_str() {
        s.split(',')
            .map(|p| p.trim().parse::<f64>().map_err(|_| format!("has `{}`, which is not a number", p.trim())))
            .collect()
    } else if let Some(items) = v.as_sequence() {
        items.iter().map(number).collect()
    } else {
        number(v).map(|x| vec![x])
    };
    let list = parsed.map_err(|m| format!("{m}; expected comma-separated numbers such as \"0,0.8,1.0,1.2\""))?;
    if list.is_empty() {
        return Err("is empty; expected comma-separated numbers such as \"0,0.8,1.0,1.2\"".into());
    }
    Ok(list)
}
