//! PairEdit's `config/train_image.yaml` (seed 003), read as is: `host train --config
//! config/train_image.yaml` (or the seed's own `--c=train_image`) trains, `host generate` with
//! the same file generates. docs/pairedit.md is the user-facing table of every key.
//!
//! A `.yaml` / `.yml` whose top level has `python_name`, `datasets_folder` or `cfg_eta` is
//! PairEdit's (any other YAML stays seed 000's, [`crate::seed000`]). One PairEdit file is many
//! runs: its driver `train_image_script.py` loops `for dataset in datasets: for i in
//! range(train_start, train_start + train_count): for noise_scale in noise_scales:` and starts
//! one training process per combination. [`PairEditYaml::jobs`] is that list, in that order, each
//! a config-file layer exactly where a TOML file would sit (flags and `--set` still override it).
//!
//! Paths (`datasets_folder`, `output_folder`, `output_folder_gen`, `prompts_file`,
//! `trained_lora_path`) are relative to the current directory, as PairEdit's scripts read them
//! (they are run from its `train/` folder), not to the YAML's folder.
//!
//! `python_name: train_image_real` (`config/train_image_real.yaml`) is PairEdit's real-image
//! editing: one content-LoRA run per `dataset × version × image_id` (`train_image_real_script.py`),
//! and generation that edits with `semantic_lora_path` at `semantic_cfg_scale`.
//!
//! What PairEdit fixes in code and the YAML cannot say is fixed here too: bf16, LoRA rank 16 and
//! alpha 1 on its attention targets (`lora_targets = ["pairedit"]`), AdamW at lr 0.002 with
//! torch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01), a constant schedule, no
//! clipping, batch 1, 512², the empty prompt, every pair trained (no held-out split).

mod generate;

use std::path::{Path, PathBuf};

use figment::value::{Map, Value};
use figment::{Metadata, Profile, Source};
use serde_json::json;

use crate::config::FileLayer;
use crate::{EngineError, Result};

pub use generate::{collage_name, generate, image_name, GenJob, GenKeys, GenerateSummary};

/// The keys `train_image_script.py` reads (all required there), in the seed YAML's order.
pub const TRAIN_KEYS: &[&str] = &[
    "device",
    "pretrained_model_name_or_path",
    "python_name",
    "datasets_folder",
    "datasets",
    "source_folder",
    "target_folder",
    "config_name",
    "start_step",
    "end_step",
    "num_inference_steps",
    "guidance_scale",
    "cfg_eta",
    "noise_scales",
    "train_iteration",
    "save_per_steps",
    "train_start",
    "train_count",
    "output_folder",
    "train_method",
];

/// The keys only `gen_image_script.py` reads (required by `host generate`).
pub const GEN_KEYS: &[&str] = &[
    "use_trained_lora_path",
    "trained_lora_path",
    "use_prompts_file",
    "prompts_file",
    "use_random_seed",
    "output_folder_gen",
    "prompt",
    "skips",
    "start_seed_gen",
    "scales",
    "count_gen",
];

/// `config/train_image_real.yaml`'s extra keys (real-image editing, `python_name:
/// train_image_real`): `image_ids` for training, the semantic LoRA and its scale for generation.
pub const REAL_IMAGE_KEYS: &[&str] = &["image_ids", "semantic_lora_path", "semantic_cfg_scale"];

/// Likeness's own keys (not PairEdit's): `resolution` overrides the 512² PairEdit hard-codes
/// (its tests run a tiny model at a few pixels on a CPU).
pub const LIKENESS_KEYS: &[&str] = &["resolution"];

/// The side PairEdit resizes every image to (`train_image.py`: `height = width = 512`).
pub const PAIREDIT_RESOLUTION: u64 = 512;
/// The model plugin PairEdit's objective lives in.
pub const MODEL_PLUGIN: &str = "flux-lora";

/// `python_name` → the objective variant the model implements (its own definitions of the four
/// ablations, whose scripts are not in PairEdit's public code).
pub const VARIANTS: &[(&str, &str)] = &[
    ("train_image", "full"),
    ("train_image_wocontent", "wocontent"),
    ("train_image_wocfg", "wocfg"),
    ("train_image_fm", "fm"),
    ("train_image_sliders", "sliders"),
    ("train_image_real", "real"),
];

/// Whether `path` is a PairEdit YAML: `.yaml` / `.yml` with `python_name`, `datasets_folder`
/// or `cfg_eta` at the top level (seed 000's YAML has none of them).
pub fn is_yaml(path: &Path) -> bool {
    if !crate::seed000::is_yaml(path) {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    is_pairedit_text(&text)
}

fn is_pairedit_text(text: &str) -> bool {
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        Ok(serde_yaml_ng::Value::Mapping(m)) => {
            ["python_name", "datasets_folder", "cfg_eta"].iter().any(|k| m.contains_key(*k))
        }
        _ => false,
    }
}

/// The seed's `--c=NAME`: `config/NAME.yaml` relative to the current directory, as
/// `train_image_script.py` / `gen_image_script.py` build it; an error names the path tried.
pub fn config_by_name(name: &str) -> Result<PathBuf> {
    config_by_name_in(Path::new(""), name)
}

/// [`config_by_name`] from the folder `cwd` (`""` = the current directory).
pub fn config_by_name_in(cwd: &Path, name: &str) -> Result<PathBuf> {
    let path = cwd.join("config").join(format!("{name}.yaml"));
    if path.is_file() {
        return Ok(path);
    }
    let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| "?".into());
    Err(EngineError::Config(format!(
        "--c {name}: {} does not exist (PairEdit's scripts read config/<NAME>.yaml relative to the current directory, here {cwd}); \
         run from the folder that holds config/, or pass --config PATH",
        path.display()
    )))
}

/// The objective variant selected by `python_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant(pub &'static str);

/// A PairEdit YAML, read and checked. Generation keys are kept raw until `host generate`
/// needs them, so a training-only file trains.
#[derive(Debug, Clone)]
pub struct PairEditYaml {
    pub path: PathBuf,
    /// `cpu`, or `cuda:N` for `device: N`.
    pub device: String,
    pub pretrained: String,
    pub python_name: String,
    pub variant: Variant,
    pub datasets_folder: PathBuf,
    pub datasets: Vec<String>,
    pub source_folder: String,
    pub target_folder: String,
    pub config_name: String,
    pub start_step: u64,
    pub end_step: u64,
    pub num_inference_steps: u64,
    pub guidance_scale: f64,
    pub cfg_eta: f64,
    pub noise_scales: Vec<f64>,
    pub train_iteration: u64,
    pub save_per_steps: u64,
    pub train_start: u64,
    pub train_count: u64,
    pub output_folder: PathBuf,
    pub train_method: String,
    pub resolution: u64,
    /// `image_ids` (real-image editing): one run per image, `<source_folder>/<id>.*`.
    pub image_ids: Vec<u64>,
    /// Every key of the file (the generation keys are read from here).
    pub(crate) map: serde_yaml_ng::Mapping,
    pub(crate) text: String,
}

/// One training run of a PairEdit YAML: one dataset, version and noise scale.
#[derive(Debug, Clone)]
pub struct Job {
    pub dataset: String,
    /// The `v<i>` of the folder name.
    pub version: u64,
    pub noise_scale: f64,
    /// The image of a real-image run (`image_ids`).
    pub image_id: Option<u64>,
    /// `<dataset>_v<python_name>_<eta:.1f>eta_<ns:.1f>ns_<train_method>_<config_name>_v<i>`.
    pub lora_name: String,
    /// `<output_folder>/<dataset>/<lora_name>`: the run's output folder (checkpoints too).
    pub run_dir: PathBuf,
    /// `<dataset>_<eta:.1f>eta_<ns:.1f>ns_<inf>inf`: the adapter files' stem.
    pub stem: String,
    /// The engine config of this run, as a config-file layer whose source is the YAML.
    pub layer: FileLayer,
}

impl Job {
    /// The semantic LoRA written at the end (`…_<train_iteration>epoch.safetensors`).
    pub fn final_semantic(&self, train_iteration: u64) -> PathBuf {
        self.run_dir.join(semantic_file_name(&self.stem, train_iteration))
    }
}

/// Reads and checks the PairEdit YAML at `path`.
pub fn load(path: &Path) -> Result<PairEditYaml> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    translate(path, &text)
}

/// [`load`] on text already read (`path` names the file in messages).
pub fn translate(path: &Path, text: &str) -> Result<PairEditYaml> {
    let file = path.display().to_string();
    let map = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        Ok(serde_yaml_ng::Value::Mapping(m)) => m,
        Ok(_) => {
            return Err(EngineError::Config(format!(
                "{file}: expected PairEdit's config (a mapping of `key: value` lines)"
            )))
        }
        Err(e) => return Err(EngineError::Config(format!("{file}: not valid YAML: {e}"))),
    };
    let mut k = Keys::new(&file, text, &map);
    k.check_known();
    let y = read_train_keys(&mut k, path, text, &map);
    k.finish()?;
    let y = y.ok_or_else(|| EngineError::Other(format!("{file}: a training key was not read (engine bug)")))?;
    check_ranges(&y)?;
    Ok(y)
}

/// The typed training keys; `None` when a problem was recorded in `k`.
fn read_train_keys(k: &mut Keys<'_>, path: &Path, text: &str, map: &serde_yaml_ng::Mapping) -> Option<PairEditYaml> {
    let device = k.get("device", device);
    let pretrained = k.get("pretrained_model_name_or_path", string);
    let python_name = k.get("python_name", string);
    let variant = python_name.as_ref().and_then(|p| k.check("python_name", variant_of(p)));
    let datasets_folder = k.get("datasets_folder", string);
    let datasets = k.get("datasets", string_list);
    let source_folder = k.get("source_folder", string);
    let target_folder = k.get("target_folder", string);
    let config_name = k.get("config_name", string);
    let start_step = k.get("start_step", |v| count(v, 0));
    let end_step = k.get("end_step", |v| count(v, 0));
    let num_inference_steps = k.get("num_inference_steps", |v| count(v, 1));
    let guidance_scale = k.get("guidance_scale", number);
    let cfg_eta = k.get("cfg_eta", number);
    let noise_scales = k.get("noise_scales", number_list);
    let train_iteration = k.get("train_iteration", |v| count(v, 1));
    let save_per_steps = k.get("save_per_steps", |v| count(v, 1));
    let train_start = k.get("train_start", |v| count(v, 0));
    let train_count = k.get("train_count", |v| count(v, 1));
    let output_folder = k.get("output_folder", string);
    let train_method = k.get("train_method", string);
    let train_method = train_method.and_then(|m| k.check("train_method", full_only(&m)));
    let resolution = k.opt("resolution", |v| count(v, 1)).unwrap_or(PAIREDIT_RESOLUTION);
    let real = variant.is_some_and(|v| v.0 == "real");
    let image_ids = match real {
        true if !map.contains_key("image_ids") => {
            k.problems.push(
                "python_name train_image_real trains one content LoRA per image, and needs `image_ids` \
                 (the file stems in <datasets_folder>/<dataset>/<source_folder>/, e.g. image_ids: [610, 1743])"
                    .into(),
            );
            None
        }
        true => k.get("image_ids", id_list),
        // train_image_script.py does not read it.
        false => Some(Vec::new()),
    };
    Some(PairEditYaml {
        path: path.to_path_buf(),
        device: device?,
        pretrained: pretrained?,
        python_name: python_name?,
        variant: variant?,
        datasets_folder: PathBuf::from(datasets_folder?),
        datasets: datasets?,
        source_folder: source_folder?,
        target_folder: target_folder?,
        config_name: config_name?,
        start_step: start_step?,
        end_step: end_step?,
        num_inference_steps: num_inference_steps?,
        guidance_scale: guidance_scale?,
        cfg_eta: cfg_eta?,
        noise_scales: noise_scales?,
        train_iteration: train_iteration?,
        save_per_steps: save_per_steps?,
        train_start: train_start?,
        train_count: train_count?,
        output_folder: PathBuf::from(output_folder?),
        train_method: train_method?,
        resolution,
        image_ids: image_ids?,
        map: map.clone(),
        text: text.to_string(),
    })
}

/// The checks between keys.
fn check_ranges(y: &PairEditYaml) -> Result<()> {
    let file = y.path.display();
    if y.start_step > y.end_step || y.end_step >= y.num_inference_steps {
        return Err(EngineError::Config(format!(
            "{file}: start_step = {}, end_step = {}, num_inference_steps = {}: the t index is drawn from start_step..=end_step \
             of the num_inference_steps schedule (0 = the noisiest), so 0 <= start_step <= end_step <= num_inference_steps - 1 \
             (PairEdit's seed: start_step 0, end_step 27, num_inference_steps 28)",
            y.start_step, y.end_step, y.num_inference_steps
        )));
    }
    Ok(())
}

fn variant_of(python_name: &str) -> std::result::Result<Variant, String> {
    VARIANTS.iter().find(|(p, _)| *p == python_name).map(|(_, v)| Variant(v)).ok_or_else(|| {
        let names: Vec<&str> = VARIANTS.iter().map(|(p, _)| *p).collect();
        format!(
            "is `{python_name}`: PairEdit runs `{python_name}.py`, and likeness implements only: {}",
            names.join(", ")
        )
    })
}

fn full_only(method: &str) -> std::result::Result<String, String> {
    if method == "full" {
        return Ok(method.to_string());
    }
    Err(format!(
        "is `{method}`: only `full` is accepted. PairEdit's train_image.py ignores this key and always trains `full` \
         (the 266 attention Linears of Flux, lora_up zero-initialised); the other utils/lora.py methods (noxattn, \
         innoxattn, xattn, …) freeze an orthogonal lora_up, which likeness does not implement. Set `train_method: full`"
    ))
}

impl PairEditYaml {
    /// Whether this is `train_image_real` (one content LoRA per real image).
    pub fn is_real(&self) -> bool {
        self.variant.0 == "real"
    }

    /// The training runs, in PairEdit's loop order: datasets × versions × noise scales
    /// (train_image_real_script.py: datasets × versions × image_ids).
    pub fn jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        for dataset in &self.datasets {
            for version in self.train_start..self.train_start + self.train_count {
                if self.is_real() {
                    // train_image_real.py has no noise scale (plain rectified flow).
                    jobs.extend(self.image_ids.iter().map(|&id| self.job(dataset, version, 1.0, Some(id))));
                } else {
                    jobs.extend(self.noise_scales.iter().map(|&ns| self.job(dataset, version, ns, None)));
                }
            }
        }
        jobs
    }

    /// `<dataset>_v<python_name>_<eta:.1f>eta_<ns:.1f>ns_<train_method>_<config_name>_v<i>`.
    pub fn lora_name(&self, dataset: &str, version: u64, ns: f64) -> String {
        format!(
            "{dataset}_v{}_{}eta_{}ns_{}_{}_v{version}",
            self.python_name,
            f1(self.cfg_eta),
            f1(ns),
            self.train_method,
            self.config_name
        )
    }

    fn job(&self, dataset: &str, version: u64, ns: f64, image_id: Option<u64>) -> Job {
        let inf = self.num_inference_steps;
        let (lora_name, stem) = match image_id {
            // train_image_real_script.py / train_image_real.py's names.
            Some(id) => (
                format!("{dataset}_{id}_v{}_{}_v{version}", self.python_name, self.config_name),
                format!("{dataset}_{id}_{inf}inf"),
            ),
            None => (
                self.lora_name(dataset, version, ns),
                format!("{dataset}_{}eta_{}ns_{inf}inf", f1(self.cfg_eta), f1(ns)),
            ),
        };
        let run_dir = self.output_folder.join(dataset).join(&lora_name);
        let layer = self.layer(dataset, version, ns, image_id, &run_dir, &stem);
        Job { dataset: dataset.to_string(), version, noise_scale: ns, image_id, lora_name, run_dir, stem, layer }
    }

    /// The `pairedit` object of the model config.
    pub(crate) fn objective(&self, ns: f64) -> serde_json::Value {
        json!({
            "variant": self.variant.0,
            "cfg_eta": self.cfg_eta,
            "noise_scale": ns,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "prompt": "",
        })
    }

    /// The model keys PairEdit's train_image.py hard-codes, plus the base weights.
    pub(crate) fn model_config(&self) -> serde_json::Value {
        json!({
            "pretrained": self.pretrained,
            "precision": "bf16",
            "lora_rank": 16,
            "lora_alpha": 1.0,
            "lora_targets": ["pairedit"],
            "decode_pixels": false,
            "resolution": self.resolution,
        })
    }

    /// One job's engine config (see docs/pairedit.md for every value and why).
    fn layer(&self, dataset: &str, version: u64, ns: f64, id: Option<u64>, run_dir: &Path, stem: &str) -> FileLayer {
        let mut model = self.model_config();
        // utils/lora.py: kaiming_uniform_(lora_down, a=1), lora_up = 0.
        model["lora_init"] = json!("kaiming_a1");
        model["pairedit"] = self.objective(ns);
        // A real-image run trains on `<source_folder>/<id>.*` alone: the pairs layout over the
        // source folder twice (each image its own pair), kept to that one stem.
        let (target_folder, stems) = match id {
            Some(id) => (&self.source_folder, vec![id.to_string()]),
            None => (&self.target_folder, Vec::new()),
        };
        let cfg = json!({
            // PairEdit's versions are unseeded reruns; here version i is run.seed = i.
            "run": {"output": run_dir, "seed": version, "device": self.device},
            "model": {"plugin": MODEL_PLUGIN, "loss_weight": 1.0, "config": model},
            "data": {
                "layout": "pairs", "root": self.datasets_folder, "attributes": [dataset],
                "source_folder": self.source_folder, "target_folder": target_folder, "stems": stems,
                "image_size": self.resolution, "split": "none",
            },
            "train": {
                "steps": self.train_iteration, "batch_size": 1, "grad_accum": 1, "lr": 0.002,
                "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01, "beta1": 0.9,
                "beta2": 0.999, "eps": 1e-8, "max_grad_norm": 0.0, "save_every": self.save_per_steps,
                "sample_count": 0,
            },
            "adapter": {"formats": ["pairedit"], "pairedit": {
                "stem": stem, "save_per_steps": self.save_per_steps, "content_only": id.is_some(),
            }},
        });
        // A JSON object always serializes to a figment dict.
        let dict = Value::serialize(&cfg).ok().and_then(|v| v.into_dict()).unwrap_or_default();
        let mut data = Map::new();
        data.insert(Profile::Default, dict);
        FileLayer { metadata: Metadata::from("PairEdit YAML", Source::File(self.path.clone())), data }
    }
}

/// Python's `f"{x:.1f}"` (both round the exact binary value half to even).
pub fn f1(x: f64) -> String {
    format!("{x:.1}")
}

/// Python's `f"{x:.2f}"`.
pub fn f2(x: f64) -> String {
    format!("{x:.2}")
}

/// The semantic LoRA PairEdit names `{stem}_{epoch}epoch.pt`; likeness writes safetensors.
pub fn semantic_file_name(stem: &str, epoch: u64) -> String {
    format!("{stem}_{epoch}epoch.safetensors")
}

/// The content LoRA (`…_{epoch}epoch_0`).
pub fn content_file_name(stem: &str, epoch: u64) -> String {
    format!("{stem}_{epoch}epoch_0.safetensors")
}

/// The `{e}` of the intermediate save after optimizer step `step` (1-based), if any.
///
/// PairEdit's loop `for epoch in range(train_iteration)` saves after its update when `epoch %
/// save_per_steps == 0 and epoch != 0`, naming the files `{epoch}epoch`: the 0-based index,
/// so a file named `200epoch` holds 201 updates. After step s the loop index is s − 1; the
/// names are kept as PairEdit writes them, off by one included.
pub fn intermediate_save(step: u64, save_per_steps: u64) -> Option<u64> {
    let e = step.checked_sub(1)?;
    (save_per_steps > 0 && e != 0 && e.is_multiple_of(save_per_steps)).then_some(e)
}

/// Reads keys of one mapping, recording every problem (all reported at once, by line).
pub(crate) struct Keys<'a> {
    file: &'a str,
    text: &'a str,
    map: &'a serde_yaml_ng::Mapping,
    problems: Vec<String>,
}

impl<'a> Keys<'a> {
    pub(crate) fn new(file: &'a str, text: &'a str, map: &'a serde_yaml_ng::Mapping) -> Keys<'a> {
        Keys { file, text, map, problems: Vec::new() }
    }

    /// Unknown keys, each with the closest known one.
    fn check_known(&mut self) {
        let all: Vec<&str> =
            TRAIN_KEYS.iter().chain(GEN_KEYS).chain(REAL_IMAGE_KEYS).chain(LIKENESS_KEYS).copied().collect();
        for key in self.map.keys() {
            let Some(key) = key.as_str() else {
                self.problems.push(format!("a key is not a string: {key:?}"));
                continue;
            };
            if !all.contains(&key) {
                let hint = crate::config::closest(key, &all)
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_else(|| format!("; PairEdit's keys are: {}", all.join(", ")));
                self.problems.push(format!("unknown key `{key}`{}{hint}", self.at(key)));
            }
        }
    }

    fn at(&self, key: &str) -> String {
        line_of(self.text, key).map(|n| format!(" (line {n})")).unwrap_or_default()
    }

    /// A required key.
    pub(crate) fn get<T>(&mut self, key: &str, f: impl Fn(&serde_yaml_ng::Value) -> Result<T, String>) -> Option<T> {
        match self.map.get(key) {
            Some(v) => self.check(key, f(v)),
            None => {
                self.problems.push(format!("missing key `{key}` (PairEdit's scripts read it with config['{key}'])"));
                None
            }
        }
    }

    /// An optional key.
    pub(crate) fn opt<T>(&mut self, key: &str, f: impl Fn(&serde_yaml_ng::Value) -> Result<T, String>) -> Option<T> {
        let v = self.map.get(key)?;
        self.check(key, f(v))
    }

    pub(crate) fn check<T>(&mut self, key: &str, r: Result<T, String>) -> Option<T> {
        r.map_err(|m| self.problems.push(format!("key `{key}`{} {m}", self.at(key)))).ok()
    }

    pub(crate) fn finish(self) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        Err(EngineError::Config(
            self.problems.iter().map(|p| format!("{}: {p}", self.file)).collect::<Vec<_>>().join("\n"),
        ))
    }
}

/// `device: N` (a GPU index; PairEdit's own code only works with 0, see docs) or `cpu`.
fn device(v: &serde_yaml_ng::Value) -> Result<String, String> {
    if let Some(n) = v.as_u64() {
        return Ok(format!("cuda:{n}"));
    }
    match v.as_str() {
        Some("cpu") => Ok("cpu".into()),
        Some(s) if s.parse::<u64>().is_ok() => Ok(format!("cuda:{s}")),
        Some(s) if s == "cuda" || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<u64>().is_ok()) => Ok(s.into()),
        _ => Err(format!("is {}; expected a GPU index (0, 1, …) or `cpu`", describe(v))),
    }
}

pub(crate) fn describe(v: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => "empty (null)".into(),
        Y::Bool(b) => format!("boolean {b}"),
        Y::Number(n) => format!("number {n}"),
        Y::String(s) => format!("string {s:?}"),
        Y::Sequence(_) => "a list".into(),
        Y::Mapping(_) => "a mapping".into(),
        Y::Tagged(t) => format!("tagged value {}", t.tag),
    }
}

pub(crate) fn string(v: &serde_yaml_ng::Value) -> Result<String, String> {
    match v.as_str() {
        Some(s) => Ok(s.to_string()),
        None => Err(format!("is {}; expected a string", describe(v))),
    }
}

pub(crate) fn count(v: &serde_yaml_ng::Value, min: u64) -> Result<u64, String> {
    match v.as_u64() {
        Some(n) if n >= min => Ok(n),
        Some(n) => Err(format!("is {n}; it must be at least {min}")),
        None => Err(format!("is {}; expected an integer of at least {min}", describe(v))),
    }
}

pub(crate) fn number(v: &serde_yaml_ng::Value) -> Result<f64, String> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(format!("is {}; expected a number", describe(v))),
    }
}

/// A non-empty YAML list of strings.
pub(crate) fn string_list(v: &serde_yaml_ng::Value) -> Result<Vec<String>, String> {
    let items = v
        .as_sequence()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("is {}; expected a non-empty list", describe(v)))?;
    items.iter().map(string).collect()
}

/// `image_ids`: a non-empty list of image numbers (train_image_real.py's `--image_id int`).
fn id_list(v: &serde_yaml_ng::Value) -> Result<Vec<u64>, String> {
    let items = v
        .as_sequence()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("is {}; expected a non-empty list of image ids (e.g. [610, 1743])", describe(v)))?;
    items.iter().map(|i| count(i, 0)).collect()
}

/// A non-empty YAML list of numbers.
pub(crate) fn number_list(v: &serde_yaml_ng::Value) -> Result<Vec<f64>, String> {
    let items = v
        .as_sequence()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("is {}; expected a non-empty list of numbers", describe(v)))?;
    items.iter().map(number).collect()
}

/// The 1-based line where top-level `key:` starts, for messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.strip_prefix(key).map(str::trim_start).is_some_and(|rest| rest.starts_with(':')))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests;
