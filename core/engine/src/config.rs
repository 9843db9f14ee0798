//! Run configuration: a TOML file (or seed 000's `config.yaml`, see [`crate::seed000`]),
//! overridden by `LIKENESS_<SECTION>__<KEY>` environment variables, overridden by command-line
//! flags and `--set key=value` (figment).
//!
//! Unknown keys and wrong types are errors that name the source (file, variable or flag),
//! the key, and the closest valid key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// The metric `--l_face` (`metric.weight`) uses when no layer names one: DRIP's MTCNN +
/// torchreid face path.
pub const DRIP_METRIC: &str = "mtcnn-reid";

/// The model a DRIP dataset trains when no layer names one: DRIP trains Stable Diffusion 1.5 only.
pub const DRIP_MODEL: &str = "sd15-lora";

/// DRIP's `--pretrained_model` default: a hub id, resolved from the local Hugging Face cache.
pub const DRIP_PRETRAINED: &str = "runwayml/stable-diffusion-v1-5";

/// Top-level sections (the fields of [`Config`]); environment variables for anything else are
/// ignored (so `LIKENESS_PLUGIN_PATH` and friends never collide with config keys).
pub fn sections() -> &'static [&'static str] {
    serde_fields::<Config>()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    pub model: PluginSection,
    pub data: DataConfig,
    #[serde(default = "default_loss")]
    pub loss: LossSection,
    #[serde(default)]
    pub metric: Option<MetricSection>,
    /// A second identity term on the body (DTBack's `body_weight`): the same keys as
    /// `[metric]`, with a person re-ID metric (`mtcnn-reid`); absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<MetricSection>,
    /// The text-alignment term (DRIP's λ_text); absent = off.
    #[serde(default)]
    pub text: Option<TextSection>,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub sample: SampleConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub adapter: AdapterConfig,
    /// Whether any layer named a `[loss]` section (set by [`Layered::extract`]): a model with
    /// its own loss gets no content loss unless one was asked for.
    #[serde(skip)]
    pub loss_given: bool,
}

/// How the identity term is weighted by the noise level `t` of each sample (the model's
/// `timesteps` output, t in [0, 1], 0 = clean): at high noise the decoded x̂0 is a blur whose
/// face embedding says little.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentityWeighting {
    /// Every sample weighs 1.
    #[default]
    None,
    /// (1 − t)², seed 004's weighting.
    OneMinusTSquared,
    /// 1 where t ≤ `metric.t_max`, else 0.
    TMax,
    /// The trainer's own timestep weighting of the diffusion loss (e.g. min-SNR-γ), read from
    /// the model's `timestep_weights` output (`[B]`, 1 when the model applies none), so that the
    /// identity term weighs each sample as the diffusion loss does (issue 8). Spelt
    /// `"timestep"` in configs.
    #[serde(rename = "timestep")]
    TimestepWeights,
}

/// Samples written during training (musubi-tuner's file names, so `host eval-faces
/// --sample-dir` reads them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Write samples every N optimizer steps; 0 = at every validation.
    #[serde(default)]
    pub every_steps: u64,
    /// Prompts for models that sample from text; empty = the captions of the sample examples.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub negative_prompt: String,
    /// Image size; 0 = each example's bucket.
    #[serde(default)]
    pub width: u32,
    #[serde(default)]
    pub height: u32,
    /// Denoising steps; 0 = the model's default.
    #[serde(default)]
    pub steps: u32,
    /// Guidance scale; 0 = the model's default.
    #[serde(default)]
    pub guidance: f64,
    /// Seed of prompt i is `seed + i`, the same at every step so samples are comparable.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "one")]
    pub adapter_scale: f64,
    /// musubi-tuner's `--sample_prompts` file (`.txt`, `.toml` or `.json`, read by
    /// [`crate::musubi_prompts`]): one sample per entry, each with its own size, steps, seed,
    /// guidance, negative prompt and control images (`--ci`); it replaces `prompts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_file: Option<PathBuf>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// Seed 004's face-consistency evaluation of the training samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate the samples every N optimizer steps (writes `eval/face_consistency_step<N>.json`
    /// and the curve across steps); 0 = never. Needs a `[metric]`.
    #[serde(default)]
    pub every: u64,
}

/// The on-disk cache of model encodings (VAE latents, text-encoder outputs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Default: `<run.output>/cache`. Entries are keyed by content, so a folder may be shared.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { enabled: true, dir: None }
    }
}

/// Adapter files written at each save and at the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Formats to write (`kohya`, `diffusers`, `peft`, `comfyui`); empty = every one of kohya,
    /// diffusers and peft the model declares.
    #[serde(default)]
    pub formats: Vec<String>,
    /// DRIP's `--save_dir`: at the end of every epoch the adapter files are also written to
    /// `<save_dir>/epochNN/` (NN = the 0-based epoch, two digits, as DRIP names them:
    /// `epoch00/` holds the weights after the first epoch). Unset = no per-epoch folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_dir: Option<PathBuf>,
    /// PairEdit's adapter files (set by its YAML, [`crate::pairedit`]): the `pairedit` format's
    /// semantic / content LoRAs as `<stem>_<E>epoch.safetensors` / `<stem>_<E>epoch_0.safetensors`
    /// in `run.output`, at PairEdit's save cadence, instead of musubi-tuner's names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairedit: Option<PairEditNames>,
}

/// `[adapter.pairedit]`: PairEdit's names and save cadence ([`crate::pairedit::intermediate_save`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PairEditNames {
    /// `<dataset>_<eta:.1f>eta_<ns:.1f>ns_<inf>inf`.
    pub stem: String,
    /// PairEdit's `save_per_steps`.
    pub save_per_steps: u64,
    /// `train_image_real`: the content LoRA alone, named `<stem>_<E>epoch.safetensors` (no `_0`).
    #[serde(default)]
    pub content_only: bool,
}

/// Learning rate and weight decay of one optimizer parameter group (`[train.param_groups.NAME]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamGroupConfig {
    /// Default: `train.lr`; follows the same schedule.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Default: `train.weight_decay`.
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where checkpoints, samples, metrics and plots go.
    #[serde(default = "default_output")]
    pub output: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Base name of the trained adapter's files in `output` (`<output_name>.safetensors`, …) and
    /// the prefix of sample images (musubi-tuner's `--output_name`). Unset by default, as in
    /// musubi-tuner, whose sample names then have no prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_name: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { output: default_output(), seed: default_seed(), device: default_device(), output_name: None }
    }
}

/// A plugin and the JSON config it is created with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub plugin: String,
    /// Weight of the model's own loss (a diffusion / flow-matching loss), `w_model`.
    #[serde(default = "one")]
    pub loss_weight: f64,
    /// Passed to the plugin as a JSON object; the plugin validates it.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Model inputs computed by metric plugins (DTBack: `face_embedding` = arcface's embedding
    /// of the `reference` image, `body_embedding` = mtcnn-reid's): input name → the metric.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conditioning: BTreeMap<String, ConditioningSection>,
}

/// A model input that is a metric's embedding of one of the batch's images (no graph).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConditioningSection {
    /// The metric plugin (e.g. `arcface`, `mtcnn-reid`), opened as its own instance.
    pub plugin: String,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// The image role it embeds.
    #[serde(default = "default_reference")]
    pub image: String,
}

fn default_reference() -> String {
    "reference".into()
}

/// A `model.conditioning` entry with no config takes that of the `[metric]` or `[body]` section
/// naming the same plugin (DTBack embeds the reference with the very metrics its identity terms
/// use, so their model paths are given once), resolved here so the run's config.toml — which
/// `host generate --model` reads — holds it.
fn resolve_conditioning(cfg: &mut Config) {
    let sections: Vec<MetricSection> = [cfg.metric.clone(), cfg.body.clone()].into_iter().flatten().collect();
    for c in cfg.model.conditioning.values_mut() {
        if c.config.is_empty() {
            if let Some(m) = sections.iter().find(|m| m.plugin == c.plugin) {
                c.config = m.config.clone();
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    pub plugin: String,
    /// Weight of this (content) loss in the total (seed 000's `content_weight`).
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// Identity metric used as a training loss (seed 000's `face_weight`) and for validation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricSection {
    pub plugin: String,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Weight of the identity loss; 0 = measure only.
    #[serde(default)]
    pub weight: f64,
    /// Loss plugin turning embeddings into the identity loss.
    #[serde(default = "default_identity_loss")]
    pub loss: String,
    #[serde(default)]
    pub loss_config: serde_json::Map<String, serde_json::Value>,
    /// Weighting of the identity term by each sample's noise level (`one_minus_t_squared` and
    /// `t_max` need a model that outputs `timesteps`, `timestep` one that outputs
    /// `timestep_weights`).
    #[serde(default)]
    pub identity_weighting: IdentityWeighting,
    /// The cut-off of `identity_weighting = "t_max"`.
    #[serde(default = "one")]
    pub t_max: f64,
    /// The model output the metric embeds.
    #[serde(default = "default_pixels")]
    pub output: String,
}

/// Text alignment `L_text = mean over valid rows of 1 − cos(image embedding, text embedding)`,
/// computed by a metric plugin that declares `embeds_texts` (DRIP: CLIP). The plugin is opened
/// as its own instance even when it is also the `[metric]` (its `embed(Train)` state is then
/// not shared with the identity term's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TextSection {
    /// The metric plugin embedding both images and texts. `clip` by default so that DRIP's
    /// `--l_text 1` alone turns the term on.
    #[serde(default = "default_text_plugin")]
    pub plugin: String,
    /// `w_text` (DRIP's λ_text default 1.0); 0 = off.
    #[serde(default = "one")]
    pub weight: f64,
    /// Passed to the metric plugin as a JSON object.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// The example's text role the images are aligned with.
    #[serde(default = "default_caption")]
    pub prompt: String,
    /// The model output embedded (the same output the identity term embeds by default).
    #[serde(default = "default_pixels")]
    pub output: String,
}

fn default_text_plugin() -> String {
    "clip".into()
}

fn default_caption() -> String {
    "caption".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset layout. `bundles`: seed 000's `<root>/<bundle>/char_*/img_*`.
    #[serde(default = "default_layout")]
    pub layout: String,
    pub root: PathBuf,
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    #[serde(default = "default_min_images")]
    pub min_images_per_char: usize,
    #[serde(default)]
    pub max_chars_per_bundle: Option<usize>,
    #[serde(default = "default_min_side")]
    pub min_image_side: u32,
    #[serde(default = "default_fraction")]
    pub val_fraction: f64,
    #[serde(default = "default_fraction")]
    pub test_fraction: f64,
    // The fields below serve every layout of `crate::data` (module docs there); their serde
    // defaults live in `crate::data` too.
    /// `musubi`: a musubi-tuner `dataset.toml` (its `--dataset_config`); unset = `root` is that
    /// file, or a folder holding `dataset.toml`.
    #[serde(default)]
    pub dataset_config: Option<PathBuf>,
    /// `pairs`: attribute folders to use (PairEdit's `datasets:`); empty = every one found.
    #[serde(default)]
    pub attributes: Vec<String>,
    /// `pairs`: only the pairs with these file stems (PairEdit's `image_ids`: one real image per
    /// run); empty = every pair.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stems: Vec<String>,
    /// `pairs`: PairEdit's `source_folder` / `target_folder`.
    #[serde(default = "crate::data::default_source_folder")]
    pub source_folder: String,
    #[serde(default = "crate::data::default_target_folder")]
    pub target_folder: String,
    /// Caption files `<stem><caption_extension>` (`pairs`; `musubi` when its toml sets none).
    #[serde(default = "crate::data::default_caption_extension")]
    pub caption_extension: String,
    /// Aspect-ratio buckets as musubi-tuner makes them (`bundles`, `drip`, `pairs`; `musubi`
    /// reads its own from the toml).
    #[serde(default)]
    pub enable_bucket: bool,
    /// `512` or `[width, height]`: the bucket area / the single bucket; unset = `image_size` square.
    #[serde(default)]
    pub resolution: Option<crate::data::Resolution>,
    #[serde(default)]
    pub bucket_no_upscale: bool,
    /// Bucket sides are multiples of this (musubi-tuner: 16).
    #[serde(default = "crate::data::default_reso_steps")]
    pub bucket_reso_steps: u32,
    /// `auto` (musubi: no held-out split; others: the fractions), `fractions` or `none`.
    #[serde(default = "crate::data::default_split")]
    pub split: String,
    /// Decode every image fully while scanning (a corrupt file is reported up front).
    #[serde(default = "crate::data::default_true")]
    pub verify_decode: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warm-up, then constant (diffusers' `constant_with_warmup`).
    Constant,
    /// Linear warm-up, then half a cosine to 0 (diffusers' `cosine`).
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps; 0 = derive from `epochs`.
    #[serde(default)]
    pub steps: u64,
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_one_usize")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm; 0 disables.
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    /// Checkpoint every N optimizer steps (0 = only at the end).
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    /// musubi-tuner's `--save_every_n_epochs`: after epoch e (1-based) with e % N == 0 and e
    /// below the run's last epoch, the adapter files as `<output_name>-<e:06>` (the last epoch's
    /// weights are the final `<output_name>` files, as musubi-tuner writes no numbered file for
    /// it); 0 = never.
    #[serde(default)]
    pub save_every_epochs: u64,
    /// Checkpoints kept (older ones are deleted); `best` and `final` are always kept.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Validate, write a sample grid and plots every N epochs.
    #[serde(default = "default_one_u64")]
    pub validate_every_epochs: u64,
    /// Rows in the sample grid (examples sampled); 0 = no samples.
    #[serde(default = "default_samples")]
    pub sample_count: usize,
    /// Per-group learning rate / weight decay (`[train.param_groups.text_encoder] lr = 1e-5`);
    /// the names are the model's (`host plugins inspect` lists them).
    #[serde(default)]
    pub param_groups: std::collections::BTreeMap<String, ParamGroupConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

fn default_output() -> PathBuf {
    PathBuf::from("runs/default")
}
fn default_seed() -> u64 {
    42
}
fn default_device() -> String {
    "cpu".into()
}
fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_pixels() -> String {
    "pixels".into()
}
fn default_loss() -> LossSection {
    LossSection { plugin: "pixel".into(), weight: 1.0, config: Default::default() }
}
fn default_identity_loss() -> String {
    "identity".into()
}
fn default_layout() -> String {
    "bundles".into()
}
fn default_image_size() -> u32 {
    64
}
fn default_min_images() -> usize {
    2
}
fn default_min_side() -> u32 {
    32
}
fn default_fraction() -> f64 {
    0.15
}
fn default_epochs() -> u64 {
    10
}
fn default_batch() -> usize {
    8
}
fn default_one_usize() -> usize {
    1
}
fn default_one_u64() -> u64 {
    1
}
fn default_lr() -> f64 {
    1e-3
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_wd() -> f64 {
    0.01
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_save_every() -> u64 {
    50
}
fn default_keep() -> usize {
    3
}
fn default_samples() -> usize {
    4
}

/// Values given on the command line (each `None` leaves the lower layers alone).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub plugin: Option<String>,
    pub metric: Option<String>,
    pub loss: Option<String>,
    pub data: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    pub lr: Option<f64>,
    pub batch_size: Option<usize>,
    pub seed: Option<u64>,
    pub device: Option<String>,
    /// `model.config.pretrained`: the base weights (DRIP's `--pretrained_model`, musubi-tuner's `--dit`).
    pub pretrained: Option<PathBuf>,
    /// `run.output_name` (musubi-tuner's `--output_name`).
    pub output_name: Option<String>,
    /// musubi-tuner's `--dataset_config`: `data.dataset_config` with `data.layout = "musubi"`
    /// (and `data.root`, when no layer sets one).
    pub dataset_config: Option<PathBuf>,
    /// DRIP's `--save_dir`: `adapter.save_dir`, and `run.output` when no layer sets one (DRIP
    /// has no other output flag, so the whole run goes there).
    pub save_dir: Option<PathBuf>,
    /// `key.path=value`; the value is parsed as TOML (so `1e-4`, `true`, `"x"`), else a string.
    pub set: Vec<String>,
    /// `key.path=value` defaults of a command-line dialect (musubi-tuner's, whose defaults are
    /// not likeness's): joined below every layer, so the file, the environment, the flags and
    /// `--set` all win over them.
    pub defaults: Vec<String>,
}

impl Overrides {
    /// The model plugin chosen above the config file, and how it was chosen (for messages):
    /// `--set model.plugin=…` (the last), else `--plugin`, else `LIKENESS_MODEL__PLUGIN`.
    fn model_plugin(&self) -> Option<(String, String)> {
        let set = self.set.iter().rev().find_map(|s| {
            let (k, v) = s.split_once('=')?;
            (k.trim() == "model.plugin").then(|| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        });
        if let Some(v) = set {
            return Some((v.clone(), format!("--set model.plugin={v}")));
        }
        if let Some(v) = &self.plugin {
            return Some((v.clone(), format!("--plugin {v}")));
        }
        std::env::var("LIKENESS_MODEL__PLUGIN")
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (v.clone(), format!("LIKENESS_MODEL__PLUGIN={v}")))
    }
}

/// A config file already read (TOML, or seed 000's YAML translated) with its source, merged
/// as a figment provider; read first so its keys can be checked against the flags.
#[derive(Debug, Clone)]
pub struct FileLayer {
    pub metadata: Metadata,
    pub data: Map<Profile, Dict>,
}

impl Provider for FileLayer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

impl FileLayer {
    /// When the model plugin chosen above the file (`--plugin`…) is not the file's
    /// `model.plugin`, the file's `model.config` was written for another plugin: it is dropped
    /// (not passed to the chosen plugin) and the warning returned says so and how to fix it.
    fn drop_foreign_model_config(&mut self, file: &Path, o: &Overrides) -> Option<String> {
        let (chosen, how) = o.model_plugin()?;
        let model = match self.data.get_mut(&Profile::Default)?.get_mut("model")? {
            Value::Dict(_, d) => d,
            _ => return None,
        };
        let written_for = model.get("plugin")?.as_str()?.to_string();
        let keys: Vec<String> = match model.get("config")? {
            Value::Dict(_, c) if !c.is_empty() && written_for != chosen => c.keys().cloned().collect(),
            _ => return None,
        };
        model.remove("config");
        let (what, remove) = if crate::seed000::is_yaml(file) {
            ("model.config, from seed 000's input_size,", "or set `use_simple_model: false` in the file")
        } else {
            ("model.config", "or remove [model.config] from the file")
        };
        Some(format!(
            "{}: {what} ({}) was written for `{written_for}` (the file's model.plugin), but {how} selects `{chosen}`: \
             it is not passed to `{chosen}`. Give `{chosen}`'s own keys with --set model.config.KEY=VALUE \
             (`host plugins inspect {chosen}` lists them), {remove}",
            file.display(),
            keys.join(", ")
        ))
    }
}

/// The layered configuration before extraction (kept for `host config show`).
pub struct Layered {
    pub figment: Figment,
    /// What was noticed while layering (also logged): a `model.config` dropped because
    /// `--plugin` switched the model, seed 000 YAML keys that have no effect.
    pub warnings: Vec<String>,
}

impl Layered {
    /// File (optional) < environment < flags < `--set`, then the defaults that depend on what
    /// the layers hold (joined: any layer's own value wins).
    pub fn new(file: Option<&Path>, o: &Overrides) -> Result<Layered> {
        if let Some(path) = file.filter(|p| crate::pairedit::is_yaml(p)) {
            // Many runs in one file: `host train` runs each (pairedit::PairEditYaml::jobs); any
            // other reader (`host config show`) gets the first, and a warning says so.
            let jobs = crate::pairedit::load(path)?.jobs();
            let mut l = Layered::with_file_layer(jobs[0].layer.clone(), o)?;
            if jobs.len() > 1 {
                l.warnings.push(format!(
                    "{}: this PairEdit YAML describes {} training runs (datasets x versions x noise_scales); this is the first, {}",
                    path.display(),
                    jobs.len(),
                    jobs[0].lora_name
                ));
                tracing::warn!("{}", l.warnings[l.warnings.len() - 1]);
            }
            return Ok(l);
        }
        let mut f = Figment::new();
        let mut warnings = Vec::new();
        let mut seed000 = None;
        if let Some(path) = file {
            let (layer, yaml) = file_layer(path, o, &mut warnings)?;
            seed000 = yaml;
            f = match layer {
                Some(layer) => f.merge(layer),
                // A file that does not parse is merged as is: extract() reports it.
                None => f.merge(Toml::file_exact(path)),
            };
        }
        Self::above_file(f, seed000, warnings, o)
    }

    /// A config-file layer made by the caller (one run of a PairEdit YAML), with the layers
    /// above it as [`Layered::new`] puts them.
    pub fn with_file_layer(mut layer: FileLayer, o: &Overrides) -> Result<Layered> {
        let path = match &layer.metadata.source {
            Some(figment::Source::File(p)) => p.clone(),
            _ => PathBuf::from("config"),
        };
        let warnings: Vec<String> = layer.drop_foreign_model_config(&path, o).into_iter().collect();
        Self::above_file(Figment::new().merge(layer), None, warnings, o)
    }

    /// The environment, flags and `--set` over the file layer already in `f`, then the defaults.
    fn above_file(
        mut f: Figment,
        seed000: Option<crate::seed000::Seed000Yaml>,
        mut warnings: Vec<String>,
        o: &Overrides,
    ) -> Result<Layered> {
        f = f.merge(env_layer());
        let flags = flag_layer(o);
        if !flags.is_empty() {
            f = f.merge(Serialized::defaults(flags).profile(Profile::Default));
        }
        let sets = set_layer(&o.set)?;
        if !sets.is_empty() {
            f = f.merge(Serialized::defaults(sets));
        }
        let defaults = set_layer(&o.defaults)?;
        if !defaults.is_empty() {
            f = f.join(Serialized::defaults(defaults));
        }
        f = output_defaults(f, o);
        f = drip_defaults(f);
        f = musubi_batch_size(f);
        // Seed 000's face_weight is the identity-loss weight once a metric is named anywhere;
        // joined, so a metric.weight from any layer wins.
        if let Some(y) = &seed000 {
            match y.metric_layer() {
                Some(m) if f.contains("metric.plugin") => f = f.join(m),
                Some(_) => warnings.extend(y.unused_face_weight()),
                None => {}
            }
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(Layered { figment: f, warnings })
    }

    /// Extracts and validates the config.
    pub fn extract(&self) -> Result<Config> {
        // DRIP's `--l_face 0` with no metric named in any layer: `[metric]` holds only
        // `weight = 0`, which turns the face term off, so there is no metric at all. A placeholder
        // plugin lets the section extract (every other key keeps its source for messages); the
        // section is then dropped. Any other metric key without a plugin stays an error.
        let metric_off = self.metric_off();
        let fig = match metric_off {
            true => self.figment.clone().merge(Serialized::default("metric.plugin", "")),
            false => self.figment.clone(),
        };
        let mut cfg: Config = fig.extract().map_err(|e| explain(e, &fig))?;
        if metric_off {
            cfg.metric = None;
        }
        cfg.loss_given = self.figment.contains("loss");
        resolve_conditioning(&mut cfg);
        validate(&cfg)?;
        Ok(cfg)
    }

    /// Whether `[metric]` is only a `weight` of 0 with no `metric.plugin` in any layer.
    fn metric_off(&self) -> bool {
        let only_weight =
            self.figment.find_value("metric").ok().and_then(|v| v.into_dict()).is_some_and(|d| d.len() == 1);
        only_weight
            && !self.figment.contains("metric.plugin")
            && self.figment.extract_inner::<f64>("metric.weight").is_ok_and(|w| w == 0.0)
    }

    /// Every leaf key with its value and where it came from (`host config show`).
    pub fn provenance(&self) -> Result<Vec<(String, String, String)>> {
        let cfg = self.extract()?;
        let merged = serde_json::to_value(&cfg).map_err(|e| EngineError::Config(e.to_string()))?;
        let mut out = Vec::new();
        walk(&merged, String::new(), &mut |key, v| {
            let from = self.figment.find_metadata(&key).map(describe_source).unwrap_or_else(|| "default".to_string());
            out.push((key, v.to_string(), from));
        });
        Ok(out)
    }
}

/// The config file as a layer: seed 000's YAML translated, or TOML (`None` when it does not
/// parse); a `model.config` written for another model than the one selected is dropped with a
/// warning. The seed 000 translation is returned for its later, metric-dependent layer.
fn file_layer(
    path: &Path,
    o: &Overrides,
    warnings: &mut Vec<String>,
) -> Result<(Option<FileLayer>, Option<crate::seed000::Seed000Yaml>)> {
    if !path.exists() {
        return Err(EngineError::Config(format!(
            "config file {} does not exist (ready-made configs are in configs/)",
            path.display()
        )));
    }
    let (layer, yaml) = if crate::seed000::is_yaml(path) {
        let y = crate::seed000::load(path, o.model_plugin().map(|p| p.0).as_deref())?;
        for n in &y.notes {
            tracing::info!("{n}");
        }
        (Some(y.layer.clone()), Some(y))
    } else {
        let toml = Toml::file_exact(path);
        (toml.data().ok().map(|data| FileLayer { metadata: toml.metadata(), data }), None)
    };
    let layer = layer.map(|mut l| {
        warnings.extend(l.drop_foreign_model_config(path, o));
        l
    });
    Ok((layer, yaml))
}

/// `LIKENESS_<SECTION>__<KEY>` variables.
fn env_layer() -> Env {
    Env::prefixed("LIKENESS_")
        .split("__")
        // Keys are still upper case here (figment lowercases after filtering). Only
        // `LIKENESS_<SECTION>__<KEY>`: a bare `LIKENESS_DATA` (the data root of the scripts) is
        // not the `[data]` table.
        .filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            sections().iter().any(|s| k.starts_with(&format!("{s}.")))
        })
        .lowercase(true)
}

/// The named flags (`--plugin`, `--steps`, DRIP's and musubi-tuner's spellings …) as keys.
fn flag_layer(o: &Overrides) -> Dict {
    let path = |p: &Path| Value::from(p.to_string_lossy().to_string());
    let entries: [(&str, Option<Value>); 15] = [
        ("model.plugin", o.plugin.clone().map(Value::from)),
        ("metric.plugin", o.metric.clone().map(Value::from)),
        ("loss.plugin", o.loss.clone().map(Value::from)),
        ("data.root", o.data.as_deref().map(path)),
        ("run.output", o.output.as_deref().map(path)),
        ("train.steps", o.steps.map(Value::from)),
        ("train.epochs", o.epochs.map(Value::from)),
        ("train.lr", o.lr.map(Value::from)),
        ("train.batch_size", o.batch_size.map(|v| Value::from(v as u64))),
        ("run.seed", o.seed.map(Value::from)),
        ("run.device", o.device.clone().map(Value::from)),
        ("model.config.pretrained", o.pretrained.as_deref().map(path)),
        ("run.output_name", o.output_name.clone().map(Value::from)),
        ("adapter.save_dir", o.save_dir.as_deref().map(path)),
        ("data.dataset_config", o.dataset_config.as_deref().map(path)),
    ];
    let mut flags = Dict::new();
    for (key, v) in entries {
        if let Some(v) = v {
            insert_path(&mut flags, key, v);
        }
    }
    // musubi-tuner's --dataset_config names its layout.
    if o.dataset_config.is_some() {
        insert_path(&mut flags, "data.layout", Value::from("musubi"));
    }
    flags
}

/// `--set key=value` (values parsed as TOML, else taken as strings).
fn set_layer(sets: &[String]) -> Result<Dict> {
    let mut d = Dict::new();
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| EngineError::Config(format!("--set {s}: expected key=value, e.g. --set train.lr=1e-4")))?;
        insert_path(&mut d, k.trim(), parse_value(v.trim()));
    }
    Ok(d)
}

/// Output places that follow from other keys, joined so that any layer's own value wins:
/// musubi-tuner needs no data root beside `--dataset_config`, and DRIP's `--save_dir` is its
/// only output flag, so the run's other files go there too unless a layer names `run.output`.
fn output_defaults(mut f: Figment, o: &Overrides) -> Figment {
    let join = |f: Figment, key: &str, v: String| {
        let mut d = Dict::new();
        insert_path(&mut d, key, Value::from(v));
        f.join(Serialized::defaults(d))
    };
    if let Some(v) = o.dataset_config.as_ref().filter(|_| !f.contains("data.root")) {
        f = join(f, "data.root", v.to_string_lossy().to_string());
    }
    if !f.contains("run.output") {
        if let Ok(v) = f.extract_inner::<String>("adapter.save_dir") {
            f = join(f, "run.output", v);
        }
    }
    f
}

/// DRIP's weight of its reconstruction (diffusion) loss, fixed in its objective (seed 002).
pub const DRIP_RECON_WEIGHT: f64 = 0.1;

/// musubi-tuner's batch size is a dataset.toml key (`[general]` or per dataset, default 1):
/// with `data.dataset_config` and no `train.batch_size` in any layer, the file's one value is
/// the run's (datasets asking for different sizes keep `train.batch_size`'s default; `host
/// data check` reports them).
fn musubi_batch_size(f: Figment) -> Figment {
    if f.contains("train.batch_size") {
        return f;
    }
    let Ok(path) = f.extract_inner::<PathBuf>("data.dataset_config") else { return f };
    let Ok(text) = std::fs::read_to_string(&path) else { return f };
    let Ok(doc) = text.parse::<toml::Table>() else { return f };
    let size = |t: Option<&toml::Value>| t.and_then(|v| v.get("batch_size")).and_then(toml::Value::as_integer);
    let general = size(doc.get("general")).unwrap_or(1);
    let sizes: std::collections::BTreeSet<i64> = match doc.get("datasets").and_then(toml::Value::as_array) {
        Some(ds) => ds.iter().map(|d| size(Some(d)).unwrap_or(general)).collect(),
        None => [general].into(),
    };
    match sizes.into_iter().collect::<Vec<_>>()[..] {
        [b] if b >= 1 => {
            tracing::info!(
                "train.batch_size not set: {} asks for batch_size = {b} (musubi-tuner's key)",
                path.display()
            );
            let mut d = Dict::new();
            insert_path(&mut d, "train.batch_size", Value::from(b));
            f.join(Serialized::defaults(d))
        }
        _ => f,
    }
}

/// What DRIP's command line (seed 002) leaves unsaid, each filled in only where no layer says
/// it (joined, so any layer's value wins) and logged:
/// - `data.layout = "drip"` for a data root of person_*/ folders (`host data check`'s guess; any
///   other root keeps the `bundles` default);
/// - on a DRIP dataset, `model.plugin` = [`DRIP_MODEL`] (DRIP trains SD1.5 only) and, for that
///   model, `model.config.pretrained` = DRIP's default [`DRIP_PRETRAINED`];
/// - `metric.plugin` = [`DRIP_METRIC`] for a `metric.weight` > 0 (DRIP's `--l_face` names no
///   metric; like `[text]`'s `clip` default). A weight of 0 with no metric named is no metric
///   ([`Layered::extract`]); a wrong type is left to extract(), which reports it;
/// - for that model on a DRIP dataset, `model.loss_weight` = [`DRIP_RECON_WEIGHT`].
fn drip_defaults(mut f: Figment) -> Figment {
    let join = |f: Figment, key: &str, v: &str| {
        let mut d = Dict::new();
        insert_path(&mut d, key, Value::from(v.to_string()));
        f.join(Serialized::defaults(d))
    };
    if !f.contains("data.layout") {
        if let Ok(root) = f.extract_inner::<PathBuf>("data.root") {
            if crate::data::guess_layout(&root) == "drip" {
                f = join(f, "data.layout", "drip");
                tracing::info!("data.layout not set: {} holds person_*/ folders, read as `drip`", root.display());
            }
        }
    }
    let drip = f.extract_inner::<String>("data.layout").is_ok_and(|l| l == "drip");
    if drip && !f.contains("model.plugin") {
        f = join(f, "model.plugin", DRIP_MODEL);
        tracing::info!(
            "model.plugin not set: a DRIP dataset trains Stable Diffusion 1.5, as DRIP does: using `{DRIP_MODEL}` (pass --plugin ID for another)"
        );
    }
    let sd15 = f.extract_inner::<String>("model.plugin").is_ok_and(|p| p == DRIP_MODEL);
    if drip && sd15 && !f.contains("model.config.pretrained") {
        f = join(f, "model.config.pretrained", DRIP_PRETRAINED);
        tracing::info!(
            "model.config.pretrained not set: DRIP's default --pretrained_model `{DRIP_PRETRAINED}`, resolved from the local Hugging Face cache (pass --pretrained_model PATH_OR_ID for another)"
        );
    }
    if drip && sd15 && !f.contains("model.loss_weight") {
        // DRIP's objective is L = λ₁·L_face + λ₂·L_text + 0.1·L_recon with the 0.1 fixed (seed
        // 002): its command as written trains that, as configs/drip-sd15.toml does.
        let mut d = Dict::new();
        insert_path(&mut d, "model.loss_weight", Value::from(DRIP_RECON_WEIGHT));
        f = f.join(Serialized::defaults(d));
        tracing::info!(
            "model.loss_weight not set: DRIP's fixed {DRIP_RECON_WEIGHT} on the diffusion loss (L_recon); --l_recon W for another"
        );
    }
    let face_weight = f.extract_inner::<f64>("metric.weight").unwrap_or(0.0);
    if face_weight > 0.0 && !f.contains("metric.plugin") {
        f = join(f, "metric.plugin", DRIP_METRIC);
        tracing::info!("metric.weight given with no metric.plugin: using DRIP's face metric `{DRIP_METRIC}` (pass --metric ID for another)");
    }
    f
}

fn describe_source(m: &Metadata) -> String {
    match &m.source {
        Some(figment::Source::File(p)) => p.display().to_string(),
        _ => {
            if m.name.contains("environment") {
                "environment (LIKENESS_*)".into()
            } else if m.name.contains("Dict") || m.name.contains("Serialized") || m.name.contains("Map") {
                "command line".into()
            } else {
                m.name.to_string()
            }
        }
    }
}

fn walk(v: &serde_json::Value, prefix: String, f: &mut dyn FnMut(String, &serde_json::Value)) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() && !prefix.ends_with(".config") => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                walk(v, key, f);
            }
        }
        _ => {
            if !prefix.is_empty() {
                f(prefix, v)
            }
        }
    }
}

fn parse_value(s: &str) -> Value {
    // TOML scalar/array/inline-table syntax; bare words fall back to strings.
    match toml::from_str::<toml::Table>(&format!("v = {s}")) {
        Ok(t) => figment::value::Value::serialize(&t["v"]).unwrap_or_else(|_| Value::from(s.to_string())),
        Err(_) => Value::from(s.to_string()),
    }
}

pub(crate) fn insert_path(dict: &mut Dict, path: &str, v: Value) {
    let mut parts = path.split('.').peekable();
    let mut cur = dict;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_string(), v);
            return;
        }
        let entry = cur.entry(p.to_string()).or_insert_with(|| Value::from(Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::from(Dict::new());
        }
        let Value::Dict(_, d) = entry else { unreachable!() };
        cur = d;
    }
}

/// Valid keys per section, for "did you mean": read from the section structs' own derived
/// `Deserialize` (their serde field names), so a new field is a valid key the moment it exists.
fn valid_keys(section: &str) -> &'static [&'static str] {
    match section {
        "" => serde_fields::<Config>(),
        "run" => serde_fields::<RunConfig>(),
        "model" => serde_fields::<PluginSection>(),
        "data" => serde_fields::<DataConfig>(),
        "loss" => serde_fields::<LossSection>(),
        "metric" | "body" => serde_fields::<MetricSection>(),
        "text" => serde_fields::<TextSection>(),
        "train" => serde_fields::<TrainConfig>(),
        "sample" => serde_fields::<SampleConfig>(),
        "eval" => serde_fields::<EvalConfig>(),
        "cache" => serde_fields::<CacheConfig>(),
        "adapter" => serde_fields::<AdapterConfig>(),
        _ => &[],
    }
}

/// The field names a struct's derived `Deserialize` reads (serde's `FIELDS`: primary names,
/// no skipped fields): [`FieldNames`] is handed them by `deserialize_struct` and stops there.
fn serde_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    let mut fields = None;
    let _ = T::deserialize(FieldNames(&mut fields));
    fields.unwrap_or(&[])
}

/// A deserializer that only records the field list of the struct asked of it.
struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(serde::de::Error::custom("field names read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

pub(crate) fn closest(key: &str, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(key, c), *c))
        .filter(|(s, _)| *s > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

fn explain(e: figment::Error, fig: &Figment) -> EngineError {
    let mut msgs = Vec::new();
    for e in e {
        let path = e.path.join(".");
        let source = e
            .metadata
            .as_ref()
            .map(describe_source)
            .or_else(|| fig.find_metadata(&path).map(describe_source))
            .unwrap_or_else(|| "configuration".into());
        let msg = match &e.kind {
            figment::error::Kind::UnknownField(field, _) => {
                // figment's path already ends with the unknown field.
                let mut parts = e.path.clone();
                if parts.last() == Some(field) {
                    parts.pop();
                }
                let section = parts.join(".");
                let full = if section.is_empty() { field.clone() } else { format!("{section}.{field}") };
                let hint = closest(field, valid_keys(&section))
                    .map(|c| {
                        format!("; did you mean `{}`?", if section.is_empty() { c } else { format!("{section}.{c}") })
                    })
                    .unwrap_or_else(|| format!("; valid keys here: {}", valid_keys(&section).join(", ")));
                format!("{source}: unknown key `{full}`{hint}")
            }
            figment::error::Kind::MissingField(field) => {
                let full = if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
                let how = match full.as_str() {
                    "model" | "model.plugin" => " (set it in the config file's [model] section or pass --plugin ID)",
                    "data" | "data.root" => " (set [data] root = \"…\" in the config file or pass --data DIR)",
                    _ => "",
                };
                format!("{source}: missing key `{full}`{how}")
            }
            figment::error::Kind::InvalidType(actual, expected) => {
                format!("{source}: key `{path}` has the wrong type: found {actual}, expected {expected}")
            }
            other => format!("{source}: key `{path}`: {other}"),
        };
        msgs.push(msg);
    }
    EngineError::Config(msgs.join("\n"))
}

fn validate(c: &Config) -> Result<()> {
    let bad = |k: &str, why: &str| Err(EngineError::Config(format!("`{k}` {why}")));
    if c.train.batch_size == 0 {
        return bad("train.batch_size", "must be at least 1");
    }
    if c.data.image_size == 0 {
        return bad("data.image_size", "(DRIP's --resolution) must be at least 1");
    }
    if c.train.grad_accum == 0 {
        return bad("train.grad_accum", "must be at least 1");
    }
    if c.train.steps == 0 && c.train.epochs == 0 {
        return bad("train.steps", "and `train.epochs` are both 0: set one of them");
    }
    if !(c.train.lr > 0.0 && c.train.lr.is_finite()) {
        return bad("train.lr", "must be a positive number");
    }
    if !crate::data::LAYOUTS.contains(&c.data.layout.as_str()) {
        return bad("data.layout", "must be one of bundles, drip, pairs, musubi (see `host data check --help`)");
    }
    if !(0.0..1.0).contains(&(c.data.val_fraction + c.data.test_fraction)) {
        return bad("data.val_fraction", "plus `data.test_fraction` must be in [0, 1)");
    }
    parse_device(&c.run.device)?;
    Ok(())
}

/// `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<likeness_abi::Device> {
    match s {
        "cpu" => Ok(likeness_abi::Device::CPU),
        "cuda" => Ok(likeness_abi::Device::cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(likeness_abi::Device::cuda)
            .ok_or_else(|| EngineError::Config(format!("`run.device` is `{s}`; expected cpu, cuda or cuda:N"))),
    }
}

/// The `[model]` section alone (for `host generate`): from `file` (a run's config.toml or any
/// config), with `plugin`, `pretrained` and `--set model.…` on top. No other section is needed.
pub fn model_section(
    file: Option<&Path>,
    plugin: Option<&str>,
    pretrained: Option<&Path>,
    set: &[String],
) -> Result<PluginSection> {
    let mut f = Figment::new();
    if let Some(p) = file {
        if !p.exists() {
            return Err(EngineError::Config(format!("config file {} does not exist", p.display())));
        }
        f = f.merge(Toml::file_exact(p));
    }
    let mut flags = Dict::new();
    if let Some(v) = plugin {
        insert_path(&mut flags, "model.plugin", Value::from(v.to_string()));
    }
    if let Some(v) = pretrained {
        insert_path(&mut flags, "model.config.pretrained", Value::from(v.to_string_lossy().to_string()));
    }
    for s in set {
        let (k, v) = s.split_once('=').ok_or_else(|| EngineError::Config(format!("--set {s}: expected key=value")))?;
        let k = k.trim();
        if !k.starts_with("model.") {
            return Err(EngineError::Config(format!(
                "--set {s}: only model.* keys apply here (e.g. --set model.config.KEY=VALUE)"
            )));
        }
        insert_path(&mut flags, k, parse_value(v.trim()));
    }
    f = f.merge(Serialized::defaults(flags));
    if !f.contains("model.plugin") {
        return Err(EngineError::Config(
            "no model plugin: pass --plugin ID or --config FILE with a [model] section".into(),
        ));
    }
    let mut model = f.extract_inner::<PluginSection>("model").map_err(|e| explain(e, &f))?;
    model.resolve_pretrained()?;
    Ok(model)
}

impl PluginSection {
    /// `config.pretrained` as the plugin gets it (issue 19): an existing path stays as given; an
    /// `org/name[/sub/path]` hub id becomes its folder or file in the local Hugging Face cache
    /// (`likeness_hf_cache`: `refs/<revision>` → `snapshots/<commit>/`, offline, never a
    /// download), logged with the id. `config.revision` (`--revision`; default `main`; a branch,
    /// a tag or a commit hash) picks the revision and is consumed here: the plugin never sees it.
    pub fn resolve_pretrained(&mut self) -> Result<()> {
        let revision = match self.config.remove("revision") {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(v) => {
                return Err(EngineError::Config(format!(
                    "`model.config.revision` is {v}; expected a branch, tag or commit name (e.g. --revision main)"
                )))
            }
        };
        let value = match self.config.get("pretrained") {
            Some(serde_json::Value::String(v)) => v.clone(),
            // Absent or of a wrong type: the plugin reports it in its own words.
            _ => {
                if let Some(r) = revision {
                    tracing::warn!("model.config.revision = `{r}` is ignored: model.config.pretrained is not set");
                }
                return Ok(());
            }
        };
        match likeness_hf_cache::resolve(&value, revision.as_deref()) {
            Ok(likeness_hf_cache::Pretrained::Cached(r)) => {
                tracing::info!(
                    "model.config.pretrained `{value}` (revision {}, commit {}) resolved from the local Hugging Face cache: {}",
                    r.revision,
                    r.commit,
                    r.path.display()
                );
                self.config.insert("pretrained".into(), serde_json::Value::from(r.path.to_string_lossy().into_owned()));
            }
            Ok(likeness_hf_cache::Pretrained::Path(_)) => {
                if let Some(r) = revision {
                    tracing::warn!("model.config.revision = `{r}` is ignored: model.config.pretrained `{value}` is a local path, not a hub id");
                }
            }
            Err(e) => return Err(EngineError::Config(format!("model.config.pretrained: {e}"))),
        }
        Ok(())
    }
}

impl Config {
    /// This config with `model.config.pretrained` resolved ([`PluginSection::resolve_pretrained`]):
    /// what a run hands its model plugin.
    pub fn with_model_ids_resolved(&self) -> Result<Config> {
        let mut c = self.clone();
        c.model.resolve_pretrained()?;
        Ok(c)
    }

    pub fn model_config_json(&self) -> String {
        serde_json::Value::Object(self.model.config.clone()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("c.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const BASE: &str = "[model]\nplugin = 'identity-autoencoder'\n[data]\nroot = 'd'\n";

    #[test]
    fn unknown_key_names_file_key_and_closest() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{BASE}[train]\nlrr = 0.1\n"));
        let e = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("train.lrr") && e.contains("did you mean `train.lr`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{BASE}[train]\nbatch_size = 'eight'\n"));
        let e = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("train.batch_size") && e.contains("wrong type"), "{e}");
    }

    #[test]
    fn layers_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{BASE}[train]\nlr = 0.1\nepochs = 3\n"));
        let o = Overrides {
            lr: Some(0.5),
            set: vec!["train.epochs=7".into(), "model.config.image_size=32".into()],
            ..Default::default()
        };
        let l = Layered::new(Some(&p), &o).unwrap();
        let c = l.extract().unwrap();
        assert_eq!(c.train.lr, 0.5);
        assert_eq!(c.train.epochs, 7);
        assert_eq!(c.model.config["image_size"], serde_json::json!(32));
        let prov = l.provenance().unwrap();
        let lr = prov.iter().find(|(k, _, _)| k == "train.lr").unwrap();
        assert_eq!(lr.2, "command line");
        let plugin = prov.iter().find(|(k, _, _)| k == "model.plugin").unwrap();
        assert!(plugin.2.ends_with("c.toml"), "{plugin:?}");
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn plugin_switch_drops_the_model_config_written_for_another_plugin() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{BASE}[model.config]\nimage_size = 32\ndepth = 2\n"));
        // The same plugin: kept, no warning.
        let o = Overrides { plugin: Some("identity-autoencoder".into()), ..Default::default() };
        let l = Layered::new(Some(&p), &o).unwrap();
        assert_eq!(l.extract().unwrap().model.config.len(), 2);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        // Another plugin: dropped, with a warning naming the file, the plugin it was for and the fix;
        // a model.config given on the command line still reaches the chosen plugin.
        for o in [
            Overrides {
                plugin: Some("flux-lora".into()),
                pretrained: Some("/w/flux1-dev.safetensors".into()),
                ..Default::default()
            },
            Overrides {
                set: vec!["model.plugin=flux-lora".into(), "model.config.pretrained='/w/flux1-dev.safetensors'".into()],
                ..Default::default()
            },
        ] {
            let l = Layered::new(Some(&p), &o).unwrap();
            let c = l.extract().unwrap();
            assert_eq!(c.model.plugin, "flux-lora");
            assert_eq!(
                serde_json::Value::Object(c.model.config),
                serde_json::json!({"pretrained": "/w/flux1-dev.safetensors"})
            );
            let w = l.warnings.join("\n");
            assert!(
                w.contains("c.toml: model.config (depth, image_size) was written for `identity-autoencoder`"),
                "{w}"
            );
            assert!(
                w.contains("selects `flux-lora`")
                    && w.contains("--set model.config.KEY=VALUE")
                    && w.contains("remove [model.config]"),
                "{w}"
            );
        }
        // No model.config in the file: nothing to say.
        let p = write(d.path(), BASE);
        let o = Overrides { plugin: Some("flux-lora".into()), ..Default::default() };
        assert!(Layered::new(Some(&p), &o).unwrap().warnings.is_empty());
    }

    #[test]
    fn musubi_and_drip_flags() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), BASE);
        let o =
            Overrides { pretrained: Some("sd15".into()), output_name: Some("face_lora".into()), ..Default::default() };
        let l = Layered::new(Some(&p), &o).unwrap();
        let c = l.extract().unwrap();
        assert_eq!(c.model.config["pretrained"], serde_json::json!("sd15"));
        assert_eq!(c.run.output_name.as_deref(), Some("face_lora"));
        assert_eq!(Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap().run.output_name, None);
        // --dataset_config: musubi-tuner's dataset.toml; it is the data root unless one is given.
        let o = Overrides { dataset_config: Some("ds/dataset.toml".into()), ..Default::default() };
        let c = Layered::new(None, &Overrides { plugin: Some("m".into()), ..o.clone() }).unwrap().extract().unwrap();
        assert_eq!(
            (c.data.layout.as_str(), c.data.dataset_config.as_deref()),
            ("musubi", Some(Path::new("ds/dataset.toml")))
        );
        assert_eq!(c.data.root, PathBuf::from("ds/dataset.toml"));
        let c = Layered::new(Some(&p), &o).unwrap().extract().unwrap();
        assert_eq!((c.data.layout.as_str(), c.data.root.as_path()), ("musubi", Path::new("d")));
        let p = write(d.path(), &format!("{BASE}[run]\noutput_nam = 'x'\n"));
        let e = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("did you mean `run.output_name`"), "{e}");
    }

    /// Issue 17: a musubi dataset.toml's `batch_size` is the run's unless a layer sets one.
    #[test]
    fn issue_17_musubi_dataset_batch_size_is_the_runs() {
        let d = tempfile::tempdir().unwrap();
        let ds = d.path().join("dataset.toml");
        let cfg = |o: Overrides| Layered::new(None, &o).unwrap().extract().unwrap().train.batch_size;
        let o = Overrides { plugin: Some("m".into()), dataset_config: Some(ds.clone()), ..Default::default() };
        std::fs::write(&ds, "[general]\nbatch_size = 3\n[[datasets]]\nimage_directory = 'a'\n").unwrap();
        assert_eq!(cfg(o.clone()), 3);
        // musubi's default is 1.
        std::fs::write(&ds, "[[datasets]]\nimage_directory = 'a'\n").unwrap();
        assert_eq!(cfg(o.clone()), 1);
        // Any layer's value wins.
        assert_eq!(cfg(Overrides { batch_size: Some(5), ..o.clone() }), 5);
        // Datasets asking for different sizes: the trainer's default.
        std::fs::write(&ds, "[[datasets]]\nbatch_size = 1\n[[datasets]]\nbatch_size = 2\n").unwrap();
        let default =
            Layered::new(None, &Overrides { plugin: Some("m".into()), data: Some("d".into()), ..Default::default() })
                .unwrap()
                .extract()
                .unwrap()
                .train
                .batch_size;
        assert_eq!(cfg(o), default);
    }

    #[test]
    fn text_section_defaults_and_drip_flag() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), BASE);
        // What `host train --l_text 0.5` passes: the section with DRIP's plugin and caption.
        let o = Overrides { set: vec!["text.weight=0.5".into()], ..Default::default() };
        let c = Layered::new(Some(&p), &o).unwrap().extract().unwrap();
        let t = c.text.expect("a [text] section");
        assert_eq!(
            (t.plugin.as_str(), t.weight, t.prompt.as_str(), t.output.as_str()),
            ("clip", 0.5, "caption", "pixels")
        );
        let c = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap();
        assert!(c.text.is_none(), "no [text] = the term is off");
        // configs/reference.toml's commented [text] block, uncommented, is a valid section.
        let r = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/reference.toml"))
            .unwrap();
        let block: String = r
            .lines()
            .skip_while(|l| !l.starts_with("# [text]"))
            .take_while(|l| l.starts_with("# ") && !l.starts_with("# L_text"))
            .filter(|l| !l.starts_with("#  "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        assert!(block.contains("plugin = \"clip\""), "{block}");
        let p = write(d.path(), &format!("{BASE}{block}"));
        let t = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap().text.unwrap();
        assert_eq!((t.plugin.as_str(), t.weight), ("clip", 1.0));
        let p = write(d.path(), &format!("{BASE}[text]\nweigth = 1\n"));
        let e = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("did you mean `text.weight`"), "{e}");
    }

    #[test]
    fn drip_save_dir_and_face_metric_default() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), BASE);
        // `--save_dir lora_out` alone: the per-epoch folders and the run both go there.
        let o = Overrides { save_dir: Some("lora_out".into()), ..Default::default() };
        let c = Layered::new(Some(&p), &o).unwrap().extract().unwrap();
        assert_eq!(c.adapter.save_dir.as_deref(), Some(Path::new("lora_out")));
        assert_eq!(c.run.output, PathBuf::from("lora_out"));
        // Any layer's run.output wins over the save_dir default.
        let o2 = Overrides { output: Some("runs/x".into()), ..o.clone() };
        let c = Layered::new(Some(&p), &o2).unwrap().extract().unwrap();
        assert_eq!(
            (c.run.output.as_path(), c.adapter.save_dir.as_deref()),
            (Path::new("runs/x"), Some(Path::new("lora_out")))
        );
        let pf = write(d.path(), &format!("{BASE}[run]\noutput = 'from_file'\n"));
        assert_eq!(Layered::new(Some(&pf), &o).unwrap().extract().unwrap().run.output, PathBuf::from("from_file"));
        // A config file's adapter.save_dir does the same as the flag; the flag wins over it.
        let pf = write(d.path(), &format!("{BASE}[adapter]\nsave_dir = 'file_out'\n"));
        let c = Layered::new(Some(&pf), &Overrides::default()).unwrap().extract().unwrap();
        assert_eq!(
            (c.run.output.as_path(), c.adapter.save_dir.as_deref()),
            (Path::new("file_out"), Some(Path::new("file_out")))
        );
        let c = Layered::new(Some(&pf), &o).unwrap().extract().unwrap();
        assert_eq!(
            (c.run.output.as_path(), c.adapter.save_dir.as_deref()),
            (Path::new("lora_out"), Some(Path::new("lora_out")))
        );
        let p = write(d.path(), BASE);
        assert_eq!(Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap().adapter.save_dir, None);
        // A root of person_*/ folders is read as DRIP's layout unless a layer names one.
        std::fs::create_dir_all(d.path().join("ds/person_001")).unwrap();
        let root = d.path().join("ds");
        let p = write(d.path(), "[model]\nplugin = 'm'\n");
        let o = Overrides { data: Some(root.clone()), ..Default::default() };
        assert_eq!(Layered::new(Some(&p), &o).unwrap().extract().unwrap().data.layout, "drip");
        let o = Overrides { set: vec!["data.layout=bundles".into()], ..o };
        assert_eq!(Layered::new(Some(&p), &o).unwrap().extract().unwrap().data.layout, "bundles");
        // `--l_face 2` with no metric named: DRIP's metric.
        let p = write(d.path(), BASE);
        let o = Overrides { set: vec!["metric.weight=2.0".into()], ..Default::default() };
        let m = Layered::new(Some(&p), &o).unwrap().extract().unwrap().metric.unwrap();
        assert_eq!((m.plugin.as_str(), m.weight), (DRIP_METRIC, 2.0));
        // A named metric wins.
        let o =
            Overrides { metric: Some("arcface".into()), set: vec!["metric.weight=1.0".into()], ..Default::default() };
        assert_eq!(Layered::new(Some(&p), &o).unwrap().extract().unwrap().metric.unwrap().plugin, "arcface");
    }

    /// Issue 14, part 3: `--l_face 0` (and `--l_text 0`) turn their term off; with no metric named
    /// anywhere `--l_face 0` means no metric at all (it was "missing key `metric.plugin`").
    #[test]
    fn issue_14_drip_weights_at_zero_turn_their_term_off() {
        let d = tempfile::tempdir().unwrap();
        let extract = |file: &str, set: &[&str]| {
            let p = write(d.path(), file);
            let o = Overrides { set: set.iter().map(|s| s.to_string()).collect(), ..Default::default() };
            Layered::new(Some(&p), &o).unwrap().extract()
        };
        // What `--l_face 0 --l_text 0`, `--l_face 0` and `--l_face 0.0` pass.
        for set in [&["metric.weight=0.0", "text.weight=0.0"][..], &["metric.weight=0.0"], &["metric.weight=0"]] {
            let c = extract(BASE, set).unwrap_or_else(|e| panic!("{set:?}: {e}"));
            assert_eq!(c.metric, None, "{set:?}");
        }
        let c = extract(BASE, &["metric.weight=0.0", "text.weight=0.0"]).unwrap();
        assert_eq!(c.text.map(|t| t.weight), Some(0.0), "text.weight = 0: the term is off (the trainer skips it)");
        // A file's [metric] weight with no plugin, and the flag at 0 above it: still no metric.
        let c = extract(&format!("{BASE}[metric]\nweight = 1.0\n"), &["metric.weight=0.0"]).unwrap();
        assert_eq!(c.metric, None);
        // A named metric at weight 0 is measured, not trained.
        let c =
            extract(&format!("{BASE}[metric]\nplugin = 'arcface'\nweight = 1.0\n"), &["metric.weight=0.0"]).unwrap();
        assert_eq!(c.metric.map(|m| (m.plugin, m.weight)), Some(("arcface".into(), 0.0)));
        // Other metric keys with no plugin are still an error naming the missing key.
        let e = extract(BASE, &["metric.weight=0.0", "metric.config.arch='osnet_x0_25'"]).unwrap_err().to_string();
        assert!(e.contains("missing key `metric.plugin`"), "{e}");
        // At their defaults (DRIP's 1.0): DRIP's metric and CLIP.
        let c = extract(BASE, &["metric.weight=1.0", "text.weight=1.0"]).unwrap();
        assert_eq!(c.metric.map(|m| (m.plugin, m.weight)), Some((DRIP_METRIC.into(), 1.0)));
        assert_eq!(c.text.map(|t| (t.plugin, t.weight)), Some(("clip".into(), 1.0)));
    }

    /// Issue 14, part 3: DRIP's other flags at 0 fail with the key and the fix; at DRIP's defaults
    /// they extract to DRIP's values.
    #[test]
    fn issue_14_drip_flags_at_zero_are_clear_errors_and_at_default_drips_values() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), BASE);
        let extract = |set: &[&str]| {
            let o = Overrides { set: set.iter().map(|s| s.to_string()).collect(), ..Default::default() };
            Layered::new(Some(&p), &o).unwrap().extract()
        };
        for (flag, want) in [
            ("train.batch_size=0", "`train.batch_size` must be at least 1"),
            ("train.lr=0.0", "`train.lr` must be a positive number"),
            ("train.epochs=0", "`train.steps` and `train.epochs` are both 0"),
            ("data.image_size=0", "`data.image_size` (DRIP's --resolution) must be at least 1"),
        ] {
            let e = extract(&[flag]).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(want), "{flag}: {e}");
        }
        let c = extract(&["train.batch_size=2", "train.lr=1e-4", "train.epochs=3", "data.image_size=512"]).unwrap();
        assert_eq!((c.train.batch_size, c.train.lr, c.train.epochs, c.data.image_size), (2, 1e-4, 3, 512));
    }

    /// Issue 19, part 2: a DRIP dataset with no model named is SD1.5 with DRIP's default base model
    /// (an id, resolved when the run starts); any layer's model or pretrained wins.
    #[test]
    fn issue_19_a_drip_dataset_defaults_to_sd15_and_drips_pretrained_id() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("dataset/person_001")).unwrap();
        let data = Some(d.path().join("dataset"));
        let layered =
            |o: Overrides| Layered::new(None, &Overrides { data: data.clone(), ..o }).unwrap().extract().unwrap();
        let c = layered(Overrides::default());
        assert_eq!((c.data.layout.as_str(), c.model.plugin.as_str()), ("drip", DRIP_MODEL));
        assert_eq!(c.model.config["pretrained"], serde_json::json!(DRIP_PRETRAINED));
        // DRIP's objective: 0.1 on L_recon, unless --l_recon says otherwise.
        assert_eq!(c.model.loss_weight, DRIP_RECON_WEIGHT);
        let c = layered(Overrides { set: vec!["model.loss_weight=0.5".into()], ..Default::default() });
        assert_eq!(c.model.loss_weight, 0.5);
        let c = layered(Overrides { pretrained: Some("/models/sd15".into()), ..Default::default() });
        assert_eq!(c.model.config["pretrained"], serde_json::json!("/models/sd15"));
        let c = layered(Overrides { plugin: Some("testing-flow".into()), ..Default::default() });
        assert_eq!((c.model.plugin.as_str(), c.model.config.get("pretrained")), ("testing-flow", None));
        // Not a DRIP dataset: no model is guessed.
        std::fs::create_dir_all(d.path().join("bundles/b/char_0")).unwrap();
        let o = Overrides { data: Some(d.path().join("bundles")), ..Default::default() };
        let e = Layered::new(None, &o).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("missing key `model`"), "{e}");
    }

    /// Issue 19: `model.config.pretrained` ids resolve from the cache and `revision` is consumed;
    /// a path is left alone.
    #[test]
    fn issue_19_pretrained_paths_stay_and_revision_is_consumed() {
        let mut m: PluginSection = serde_json::from_value(serde_json::json!({
            "plugin": "sd15-lora", "config": {"pretrained": "/models/sd15", "revision": "fp16", "lora_rank": 4}
        }))
        .unwrap();
        m.resolve_pretrained().unwrap();
        assert_eq!(
            serde_json::Value::Object(m.config),
            serde_json::json!({"pretrained": "/models/sd15", "lora_rank": 4})
        );
        let mut m: PluginSection =
            serde_json::from_value(serde_json::json!({"plugin": "x", "config": {"pretrained": "a/b", "revision": []}}))
                .unwrap();
        let e = m.resolve_pretrained().unwrap_err().to_string();
        assert!(e.contains("model.config.revision"), "{e}");
    }

    #[test]
    fn drip_sd15_config_is_drips_objective() {
        // configs/drip-sd15.toml: λ_face = λ_text = 1, λ_recon = 0.1, DRIP's metric and text plugin,
        // the timestep weighting, and DRIP's command-line defaults.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/drip-sd15.toml");
        let c = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap();
        let (m, t) = (c.metric.clone().unwrap(), c.text.clone().unwrap());
        assert_eq!((c.model.plugin.as_str(), c.model.loss_weight), ("sd15-lora", 0.1));
        assert_eq!(
            (m.plugin.as_str(), m.weight, m.identity_weighting),
            (DRIP_METRIC, 1.0, IdentityWeighting::TimestepWeights)
        );
        assert_eq!((t.plugin.as_str(), t.weight, t.prompt.as_str()), ("clip", 1.0, "caption"));
        assert_eq!((c.data.layout.as_str(), c.data.image_size), ("drip", 512));
        assert_eq!((c.train.epochs, c.train.batch_size, c.train.lr), (3, 2, 1e-4));
        assert_eq!(c.adapter.save_dir.as_deref(), Some(Path::new("lora_out")));
        assert_eq!(c.run.output, PathBuf::from("lora_out"));
    }

    /// Issue 14, part 5: the keys "did you mean" offers are the structs' own fields, not a
    /// hand-kept copy (the old list lacked nothing yet, but had to be edited with every field).
    #[test]
    fn issue_14_valid_keys_come_from_the_structs() {
        assert_eq!(
            sections(),
            ["run", "model", "data", "loss", "metric", "body", "text", "train", "sample", "eval", "cache", "adapter"]
        );
        assert!(valid_keys("data").contains(&"verify_decode") && valid_keys("train").contains(&"param_groups"));
        assert!(!valid_keys("").contains(&"loss_given"), "a skipped field is no key");
        for s in sections() {
            assert!(!valid_keys(s).is_empty(), "section {s} has no keys");
        }
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{BASE}[train]\nverify_decod = true\n"));
        let e = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("train.verify_decod"), "{e}");
        let p = write(d.path(), &format!("{BASE}[train]\nbatch_sise = 2\n"));
        let e = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap_err().to_string();
        assert!(e.contains("batch_size"), "the closest key is offered: {e}");
    }

    #[test]
    fn identity_weighting_timestep_parses() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{BASE}[metric]\nplugin = 'x'\nidentity_weighting = 'timestep'\n"));
        let m = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap().metric.unwrap();
        assert_eq!(m.identity_weighting, IdentityWeighting::TimestepWeights);
    }

    #[test]
    fn reference_config_parses_with_every_section() {
        // configs/reference.toml documents every key: it must stay a valid config.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/reference.toml");
        let c = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap();
        assert!(c.loss_given && c.cache.enabled && c.eval.every == 0 && c.sample.seed == 42);
        assert_eq!(c.model.loss_weight, 1.0);
    }
}
