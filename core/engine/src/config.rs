//! Run configuration: a TOML file, overridden by `LIKENESS_<SECTION>__<KEY>` environment
//! variables, overridden by command-line flags and `--set key=value` (figment).
//!
//! Unknown keys and wrong types are errors that name the source (file, variable or flag),
//! the key, and the closest valid key.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Metadata, Profile};
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// Top-level sections; environment variables for anything else are ignored (so
/// `LIKENESS_PLUGIN_PATH` and friends never collide with config keys).
pub const SECTIONS: &[&str] = &["run", "model", "data", "loss", "metric", "train"];

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
    #[serde(default)]
    pub train: TrainConfig,
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
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { output: default_output(), seed: default_seed(), device: default_device() }
    }
}

/// A plugin and the JSON config it is created with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub plugin: String,
    /// Passed to the plugin as a JSON object; the plugin validates it.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
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
    /// Checkpoints kept (older ones are deleted); `best` and `final` are always kept.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Validate, write a sample grid and plots every N epochs.
    #[serde(default = "default_one_u64")]
    pub validate_every_epochs: u64,
    /// Rows in the sample grid.
    #[serde(default = "default_samples")]
    pub sample_count: usize,
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
    /// `key.path=value`; the value is parsed as TOML (so `1e-4`, `true`, `"x"`), else a string.
    pub set: Vec<String>,
}

/// The layered configuration before extraction (kept for `host config show`).
pub struct Layered {
    pub figment: Figment,
}

impl Layered {
    /// File (optional) < environment < flags < `--set`.
    pub fn new(file: Option<&Path>, o: &Overrides) -> Result<Layered> {
        let mut f = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(EngineError::Config(format!(
                    "config file {} does not exist (ready-made configs are in configs/)",
                    path.display()
                )));
            }
            f = f.merge(Toml::file_exact(path));
        }
        f = f.merge(
            Env::prefixed("LIKENESS_")
                .split("__")
                // Keys are still upper case here (figment lowercases after filtering). Only
                // `LIKENESS_<SECTION>__<KEY>`: a bare `LIKENESS_DATA` (the data root of the
                // scripts) is not the `[data]` table.
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    SECTIONS.iter().any(|s| k.starts_with(&format!("{s}.")))
                })
                .lowercase(true),
        );
        let mut flags = Dict::new();
        let mut put = |path: &str, v: Value| insert_path(&mut flags, path, v);
        if let Some(v) = &o.plugin {
            put("model.plugin", Value::from(v.clone()));
        }
        if let Some(v) = &o.metric {
            put("metric.plugin", Value::from(v.clone()));
        }
        if let Some(v) = &o.loss {
            put("loss.plugin", Value::from(v.clone()));
        }
        if let Some(v) = &o.data {
            put("data.root", Value::from(v.to_string_lossy().to_string()));
        }
        if let Some(v) = &o.output {
            put("run.output", Value::from(v.to_string_lossy().to_string()));
        }
        if let Some(v) = o.steps {
            put("train.steps", Value::from(v));
        }
        if let Some(v) = o.epochs {
            put("train.epochs", Value::from(v));
        }
        if let Some(v) = o.lr {
            put("train.lr", Value::from(v));
        }
        if let Some(v) = o.batch_size {
            put("train.batch_size", Value::from(v as u64));
        }
        if let Some(v) = o.seed {
            put("run.seed", Value::from(v));
        }
        if let Some(v) = &o.device {
            put("run.device", Value::from(v.clone()));
        }
        if !flags.is_empty() {
            f = f.merge(Serialized::defaults(flags).profile(Profile::Default));
        }
        let mut sets = Dict::new();
        for s in &o.set {
            let (k, v) = s.split_once('=').ok_or_else(|| {
                EngineError::Config(format!("--set {s}: expected key=value, e.g. --set train.lr=1e-4"))
            })?;
            let v = parse_value(v.trim());
            insert_path(&mut sets, k.trim(), v);
        }
        if !sets.is_empty() {
            f = f.merge(Serialized::defaults(sets));
        }
        Ok(Layered { figment: f })
    }

    /// Extracts and validates the config.
    pub fn extract(&self) -> Result<Config> {
        let cfg: Config = self.figment.extract().map_err(|e| explain(e, &self.figment))?;
        validate(&cfg)?;
        Ok(cfg)
    }

    /// Every leaf key with its value and where it came from (`host config show`).
    pub fn provenance(&self) -> Result<Vec<(String, String, String)>> {
        let cfg = self.extract()?;
        let merged = serde_json::to_value(&cfg).map_err(|e| EngineError::Config(e.to_string()))?;
        let mut out = Vec::new();
        walk(&merged, String::new(), &mut |key, v| {
            let from = self
                .figment
                .find_metadata(&key)
                .map(describe_source)
                .unwrap_or_else(|| "default".to_string());
            out.push((key, v.to_string(), from));
        });
        Ok(out)
    }
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

fn insert_path(dict: &mut Dict, path: &str, v: Value) {
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

/// Valid keys per section, for "did you mean".
fn valid_keys(section: &str) -> &'static [&'static str] {
    match section {
        "" => &["run", "model", "data", "loss", "metric", "train"],
        "run" => &["output", "seed", "device"],
        "model" => &["plugin", "config"],
        "loss" => &["plugin", "weight", "config"],
        "metric" => &["plugin", "config", "weight", "loss", "loss_config"],
        "data" => &["layout", "root", "image_size", "min_images_per_char", "max_chars_per_bundle", "min_image_side", "val_fraction", "test_fraction"],
        "train" => &[
            "steps", "epochs", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "weight_decay", "beta1", "beta2", "eps",
            "max_grad_norm", "save_every", "keep_checkpoints", "validate_every_epochs", "sample_count",
        ],
        _ => &[],
    }
}

fn closest(key: &str, candidates: &[&str]) -> Option<String> {
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
                    .map(|c| format!("; did you mean `{}`?", if section.is_empty() { c } else { format!("{section}.{c}") }))
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
    if c.train.grad_accum == 0 {
        return bad("train.grad_accum", "must be at least 1");
    }
    if c.train.steps == 0 && c.train.epochs == 0 {
        return bad("train.steps", "and `train.epochs` are both 0: set one of them");
    }
    if !(c.train.lr > 0.0 && c.train.lr.is_finite()) {
        return bad("train.lr", "must be a positive number");
    }
    if c.data.layout != "bundles" {
        return bad("data.layout", "must be \"bundles\" (seed 000's <root>/<bundle>/char_*/img_* layout); other layouts are not implemented yet");
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

impl Config {
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
        let o = Overrides { lr: Some(0.5), set: vec!["train.epochs=7".into(), "model.config.image_size=32".into()], ..Default::default() };
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
    }
}
