//! Seed 000's `train/config.yaml`, read as is: `host train --config train/config.yaml`.
//!
//! A `--config` file whose name ends in `.yaml` / `.yml` (and is not PairEdit's,
//! [`crate::pairedit`]) is seed 000's flat YAML (its
//! `train/run_training.py --config train/config.yaml`). It is translated into the keys of
//! [`crate::config::Config`] and becomes the lowest layer, exactly where a TOML file would be:
//! `LIKENESS_*` variables, flags and `--set` still override it, and `host config show` names
//! the YAML file as the source of every value it set.
//!
//! # The keys (exactly seed 000's; any other key is an error naming the file, the key and the closest one)
//!
//! | seed 000 key | likeness key(s) | notes |
//! |---|---|---|
//! | `data_dir` | `data.root` (`data.layout = "bundles"`) | a relative path is relative to the YAML's folder, as seed 000 resolves it against `train/` |
//! | `max_chars_per_bundle` | `data.max_chars_per_bundle` | `null` keeps all; seed 000 keeps a random subset, likeness the first N alphabetically |
//! | `min_images_per_char` | `data.min_images_per_char` | |
//! | `use_simple_model` | `model.plugin` | `true` (seed 000's default): `identity-autoencoder`; `false`: DTBack's IdentityPreservingFlux = `flux-lora` with `model.config.identity`, conditioned on `arcface` / `mtcnn-reid` embeddings of the reference (`model.conditioning`), `[metric] arcface`, `[body] mtcnn-reid`, adapter format `identity` (docs/dtback.md) |
//! | `pretrained_model` | `model.config.pretrained` | likeness's one added key: the Flux weights of `use_simple_model: false` (or `--pretrained_model`) |
//! | `input_size` | `model.config.image_size` and `data.image_size` | the autoencoder needs a multiple of `2^depth` (8 by default) |
//! | `num_face_latents`, `num_body_latents` | `model.config.identity.*` (`use_simple_model: false`) | they size IdentityPreservingFlux's face/body identity tokens; with the simple model they are checked, not used (seed 000's `SimpleIdentityAutoencoder` ignores them too) |
//! | `batch_size` | `train.batch_size` | |
//! | `num_epochs` | `train.epochs` | |
//! | `learning_rate` | `train.lr` | |
//! | `weight_decay` | `train.weight_decay` | AdamW's decoupled decay; seed 000's `Adam(weight_decay=…)` adds it to the gradient (L2) |
//! | `content_weight` | `loss.weight` with `loss.plugin = "pixel"` | seed 000's content loss is a VGG-16 feature MSE; likeness's content loss is the `pixel` plugin (L1 + SSIM) |
//! | `face_weight` | `metric.weight` | only when an identity metric is named (`--metric dlib`, `--set metric.plugin=…`, `LIKENESS_METRIC__PLUGIN`), and only if nothing above the YAML sets `metric.weight`; otherwise unused (a warning says so) |
//! | `body_weight` | `body.weight` (`use_simple_model: false`) | the body identity term through `mtcnn-reid`; with the simple model unused: in seed 000 its body embedding is a zero vector, so its body loss is the constant `body_weight · 1` with no gradient |
//! | `output_dir` | `run.output` | relative to the YAML's folder, as `data_dir` |
//!
//! Seed 000's face loss compares the model's *own* identity code of the reference and of the
//! generated image (`SimpleIdentityAutoencoder.extract_identity`, `1 − cos`). The autoencoder
//! plugin exposes no such code, so likeness's nearest meaning of `face_weight` is the weight of
//! the identity loss through a real face-recognition metric (`[metric]`).
//!
//! The YAML also fixes what seed 000 does but has no key for: a constant learning rate with no
//! warm-up (`train.schedule = "constant"`), no gradient clipping (`train.max_grad_norm = 0`), and
//! its 80 / 10 / 10 split (`data.val_fraction = data.test_fraction = 0.1`). Keys the file leaves
//! out keep likeness's defaults (not seed 000's `.get(…, default)` values).
//!
//! Types follow PyYAML (what seed 000 reads with): integers for counts and sizes, numbers
//! (integers accepted) for rates and weights, strings for paths, YAML 1.1 booleans
//! (`true/false/yes/no/on/off`) for `use_simple_model`. Anything else is an error naming the key.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Source};

use crate::config::{insert_path, FileLayer};
use crate::{EngineError, Result};

/// The keys seed 000's `train/config.yaml` has, in its order.
pub const KEYS: &[&str] = &[
    "data_dir",
    "max_chars_per_bundle",
    "min_images_per_char",
    "use_simple_model",
    "input_size",
    "num_face_latents",
    "num_body_latents",
    "batch_size",
    "num_epochs",
    "learning_rate",
    "weight_decay",
    "face_weight",
    "body_weight",
    "content_weight",
    "output_dir",
    // likeness's one addition: the Flux weights of `use_simple_model: false` (also
    // --pretrained_model / --set model.config.pretrained=…, which win).
    "pretrained_model",
];

/// The model plugin `use_simple_model: true` selects (seed 000's `SimpleIdentityAutoencoder`).
pub const SIMPLE_MODEL_PLUGIN: &str = "identity-autoencoder";
/// The model plugin `use_simple_model: false` selects: DTBack's IdentityPreservingFlux is
/// flux-lora with its `identity` injection (docs/dtback.md).
pub const DTBACK_MODEL_PLUGIN: &str = "flux-lora";
/// The face metric of DTBack (InsightFace's ArcFace): its embedding conditions the model and
/// its identity loss is `face_weight`'s.
pub const DTBACK_FACE_METRIC: &str = "arcface";
/// The body metric of DTBack (MTCNN + OSNet person re-ID): `body_embedding` and `body_weight`.
pub const DTBACK_BODY_METRIC: &str = "mtcnn-reid";
/// The content-loss plugin `content_weight` weights.
pub const CONTENT_LOSS_PLUGIN: &str = "pixel";

/// Whether `--config PATH` is seed 000's YAML (by extension: `.yaml`, `.yml`, any case).
pub fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// A seed 000 YAML, read, checked and translated.
#[derive(Debug)]
pub struct Seed000Yaml {
    /// Every key it sets except `metric.weight`, as a config-file layer whose source is the YAML.
    pub layer: FileLayer,
    /// `face_weight`: becomes `metric.weight` when a metric plugin is named (see [`Self::metric_layer`]).
    pub face_weight: Option<f64>,
    /// What the translation did not map (logged as info).
    pub notes: Vec<String>,
}

impl Seed000Yaml {
    /// `metric.weight = face_weight` as a layer with the YAML as its source (joined under every
    /// other layer, so a `metric.weight` set anywhere else wins).
    pub fn metric_layer(&self) -> Option<FileLayer> {
        let w = self.face_weight?;
        let mut d = Dict::new();
        insert_path(&mut d, "metric.weight", Value::from(w));
        Some(FileLayer { metadata: self.layer.metadata.clone(), data: default_profile(d) })
    }

    /// The warning for `face_weight` when no metric is named.
    pub fn unused_face_weight(&self) -> Option<String> {
        let w = self.face_weight?;
        Some(format!(
            "{}: face_weight = {w} is not used: seed 000's face loss compares the model's own identity code, which the `{SIMPLE_MODEL_PLUGIN}` plugin does not expose; \
             likeness's identity loss needs an identity-metric plugin. Pass --metric dlib (or arcface) to train with metric.weight = face_weight",
            self.layer_path().display()
        ))
    }

    fn layer_path(&self) -> &Path {
        match &self.layer.metadata.source {
            Some(Source::File(p)) => p,
            _ => Path::new("config.yaml"),
        }
    }
}

fn default_profile(d: Dict) -> Map<Profile, Dict> {
    let mut m = Map::new();
    m.insert(Profile::Default, d);
    m
}

/// Reads and translates seed 000's YAML at `path`. `model_override` is the model plugin chosen
/// above the file (`--plugin`…), which lifts the refusal of `use_simple_model: false`.
pub fn load(path: &Path, model_override: Option<&str>) -> Result<Seed000Yaml> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    translate(path, &text, model_override)
}

/// [`load`] on text already read (`path` names the file in messages and resolves relative paths).
pub fn translate(path: &Path, text: &str, model_override: Option<&str>) -> Result<Seed000Yaml> {
    let file = path.display().to_string();
    let err = |m: String| EngineError::Config(format!("{file}: {m}"));
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let at = e.location().map(|l| format!(" (line {}, column {})", l.line(), l.column())).unwrap_or_default();
        err(format!("not valid YAML{at}: {e}"))
    })?;
    let map = match doc {
        serde_yaml_ng::Value::Null => serde_yaml_ng::Mapping::new(),
        serde_yaml_ng::Value::Mapping(m) => m,
        other => {
            return Err(err(format!(
                "expected seed 000's config (a mapping of `key: value` lines), found {}",
                describe(&other)
            )))
        }
    };
    let v = read_values(&file, text, &map)?;
    // `use_simple_model: false` is DTBack's IdentityPreservingFlux (flux-lora + identity), unless
    // another model plugin was chosen above the file.
    let dtback = !v.use_simple_model.unwrap_or(true) && model_override.is_none_or(|m| m == DTBACK_MODEL_PLUGIN);
    let mut d = layer_values(path, &v);
    let mut notes = Vec::new();
    if dtback {
        dtback_values(&mut d, &v);
    } else {
        for (key, n) in [("num_face_latents", v.num_face_latents), ("num_body_latents", v.num_body_latents)] {
            if let Some(n) = n {
                notes.push(format!(
                    "{file}: {key} = {n} is not used: it sizes IdentityPreservingFlux's identity tokens (use_simple_model: false); seed 000's SimpleIdentityAutoencoder ignores it too"
                ));
            }
        }
        if let Some(w) = v.body_weight.filter(|w| *w != 0.0) {
            notes.push(format!(
                "{file}: body_weight = {w} is not used: the body identity term is DTBack's (use_simple_model: false); with seed 000's simple model the body loss is a constant with no gradient"
            ));
        }
        if v.pretrained_model.is_some() {
            notes.push(format!(
                "{file}: pretrained_model is not used: it names the Flux weights of use_simple_model: false"
            ));
        }
    }

    let metadata = Metadata::from("seed 000 YAML", Source::File(path.to_path_buf()));
    Ok(Seed000Yaml { layer: FileLayer { metadata, data: default_profile(d) }, face_weight: v.face_weight, notes })
}

/// The typed values of `map`; every unknown key or bad value is reported at once, by line.
fn read_values(file: &str, text: &str, map: &serde_yaml_ng::Mapping) -> Result<Values> {
    let mut v = Values::default();
    let mut problems = Vec::new();
    for (k, val) in map {
        let Some(key) = k.as_str() else {
            problems.push(format!("key {} is not a string", describe(k)));
            continue;
        };
        let at = line_of(text, key).map(|n| format!(" (line {n})")).unwrap_or_default();
        if !KEYS.contains(&key) {
            let hint = crate::config::closest(key, KEYS)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_else(|| format!("; seed 000's keys are: {}", KEYS.join(", ")));
            problems.push(format!("unknown key `{key}`{at}{hint}"));
            continue;
        }
        if let Err(m) = v.set(key, val) {
            problems.push(format!("key `{key}`{at} {m}"));
        }
    }
    if !problems.is_empty() {
        return Err(EngineError::Config(
            problems.iter().map(|p| format!("{file}: {p}")).collect::<Vec<_>>().join("\n"),
        ));
    }
    Ok(v)
}

/// The likeness keys of seed 000's values (relative paths against the YAML's folder).
fn layer_values(path: &Path, v: &Values) -> Dict {
    let base = path.parent().filter(|p| !p.as_os_str().is_empty());
    let resolve = |p: &str| -> String {
        let p = PathBuf::from(p);
        match base {
            Some(b) if p.is_relative() => b.join(p).to_string_lossy().into_owned(),
            _ => p.to_string_lossy().into_owned(),
        }
    };
    let mut d = Dict::new();
    let mut put = |k: &str, val: Value| insert_path(&mut d, k, val);
    if v.use_simple_model.unwrap_or(true) {
        put("model.plugin", Value::from(SIMPLE_MODEL_PLUGIN));
    }
    put("data.layout", Value::from("bundles"));
    if let Some(p) = &v.data_dir {
        put("data.root", Value::from(resolve(p)));
    }
    if let Some(n) = v.max_chars_per_bundle {
        put("data.max_chars_per_bundle", Value::from(n));
    }
    if let Some(n) = v.min_images_per_char {
        put("data.min_images_per_char", Value::from(n));
    }
    if let Some(n) = v.input_size {
        put("data.image_size", Value::from(n));
        // Under `use_simple_model: false` with --plugin, the model's config is the user's to give.
        if v.use_simple_model.unwrap_or(true) {
            put("model.config.image_size", Value::from(n));
        }
    }
    put("data.val_fraction", Value::from(0.1));
    put("data.test_fraction", Value::from(0.1));
    if let Some(n) = v.batch_size {
        put("train.batch_size", Value::from(n));
    }
    if let Some(n) = v.num_epochs {
        put("train.epochs", Value::from(n));
    }
    if let Some(x) = v.learning_rate {
        put("train.lr", Value::from(x));
    }
    if let Some(x) = v.weight_decay {
        put("train.weight_decay", Value::from(x));
    }
    put("train.schedule", Value::from("constant"));
    put("train.warmup_steps", Value::from(0u64));
    put("train.max_grad_norm", Value::from(0.0));
    if let Some(x) = v.content_weight {
        put("loss.plugin", Value::from(CONTENT_LOSS_PLUGIN));
        put("loss.weight", Value::from(x));
    }
    if let Some(p) = &v.output_dir {
        put("run.output", Value::from(resolve(p)));
    }
    d
}

/// DTBack's keys (`use_simple_model: false`, docs/dtback.md): flux-lora with the identity
/// injection sized by num_face_latents / num_body_latents, conditioned on ArcFace's embedding of
/// the reference (and mtcnn-reid's), trained by the face identity loss (face_weight, through
/// [`Seed000Yaml::metric_layer`]), the body identity loss (body_weight), the content loss
/// (content_weight) and the flow-matching loss; the injection weights are the adapter.
fn dtback_values(d: &mut Dict, v: &Values) {
    let mut put = |k: &str, val: Value| insert_path(d, k, val);
    put("model.plugin", Value::from(DTBACK_MODEL_PLUGIN));
    if let Some(p) = &v.pretrained_model {
        put("model.config.pretrained", Value::from(p.clone()));
    }
    let (nf, nb) = (v.num_face_latents.unwrap_or(16), v.num_body_latents.unwrap_or(16));
    put("model.config.identity.num_face_latents", Value::from(nf));
    put("model.config.identity.num_body_latents", Value::from(nb));
    if let Some(n) = v.input_size {
        put("model.config.resolution", Value::from(n));
    }
    put("model.conditioning.face_embedding.plugin", Value::from(DTBACK_FACE_METRIC));
    put("metric.plugin", Value::from(DTBACK_FACE_METRIC));
    if nb > 0 {
        put("model.conditioning.body_embedding.plugin", Value::from(DTBACK_BODY_METRIC));
        put("body.plugin", Value::from(DTBACK_BODY_METRIC));
        put("body.weight", Value::from(v.body_weight.unwrap_or(0.0)));
    }
    put("adapter.formats", Value::from(vec![Value::from("identity")]));
}

/// The typed values of the keys present.
#[derive(Debug, Default)]
struct Values {
    data_dir: Option<String>,
    max_chars_per_bundle: Option<u64>,
    min_images_per_char: Option<u64>,
    use_simple_model: Option<bool>,
    input_size: Option<u64>,
    num_face_latents: Option<u64>,
    num_body_latents: Option<u64>,
    batch_size: Option<u64>,
    num_epochs: Option<u64>,
    learning_rate: Option<f64>,
    weight_decay: Option<f64>,
    face_weight: Option<f64>,
    body_weight: Option<f64>,
    content_weight: Option<f64>,
    output_dir: Option<String>,
    pretrained_model: Option<String>,
}

impl Values {
    /// Checks and stores one key; the error completes "key `K` …".
    fn set(&mut self, key: &str, v: &serde_yaml_ng::Value) -> std::result::Result<(), String> {
        match key {
            "data_dir" => self.data_dir = Some(string(v)?),
            "output_dir" => self.output_dir = Some(string(v)?),
            "pretrained_model" => self.pretrained_model = Some(string(v)?),
            // `null` = no limit (seed 000 passes None on, and `if max_chars_per_bundle and …` keeps all).
            "max_chars_per_bundle" => self.max_chars_per_bundle = if v.is_null() { None } else { Some(count(v, 0)?) },
            "min_images_per_char" => self.min_images_per_char = Some(count(v, 1)?),
            "use_simple_model" => self.use_simple_model = Some(boolean(v)?),
            "input_size" => self.input_size = Some(count(v, 1)?),
            "num_face_latents" => self.num_face_latents = Some(count(v, 1)?),
            "num_body_latents" => self.num_body_latents = Some(count(v, 0)?),
            "batch_size" => self.batch_size = Some(count(v, 1)?),
            "num_epochs" => self.num_epochs = Some(count(v, 1)?),
            "learning_rate" => self.learning_rate = Some(positive(v)?),
            "weight_decay" => self.weight_decay = Some(non_negative(v)?),
            "face_weight" => self.face_weight = Some(non_negative(v)?),
            "body_weight" => self.body_weight = Some(non_negative(v)?),
            "content_weight" => self.content_weight = Some(non_negative(v)?),
            _ => unreachable!("checked against KEYS"),
        }
        Ok(())
    }
}

fn describe(v: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => "null".into(),
        Y::Bool(b) => format!("boolean {b}"),
        Y::Number(n) if n.is_f64() => format!("float {n}"),
        Y::Number(n) => format!("integer {n}"),
        Y::String(s) => format!("string {s:?}"),
        Y::Sequence(_) => "a list".into(),
        Y::Mapping(_) => "a mapping".into(),
        Y::Tagged(t) => format!("tagged value {}", t.tag),
    }
}

fn wrong(v: &serde_yaml_ng::Value, expected: &str) -> String {
    format!("has the wrong type: found {}, expected {expected}", describe(v))
}

fn string(v: &serde_yaml_ng::Value) -> std::result::Result<String, String> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        Some(_) => Err("is empty; expected a path".into()),
        None => Err(wrong(v, "a string (a path)")),
    }
}

fn count(v: &serde_yaml_ng::Value, min: u64) -> std::result::Result<u64, String> {
    match v.as_u64() {
        Some(n) if n >= min => Ok(n),
        Some(n) => Err(format!("is {n}; it must be at least {min}")),
        None if v.as_i64().is_some() => Err(format!("is {}; it must be at least {min}", describe(v))),
        None => Err(wrong(v, "an integer")),
    }
}

fn number(v: &serde_yaml_ng::Value) -> std::result::Result<f64, String> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        Some(x) => Err(format!("is {x}; expected a finite number")),
        None => Err(wrong(v, "a number")),
    }
}

fn positive(v: &serde_yaml_ng::Value) -> std::result::Result<f64, String> {
    let x = number(v)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("is {x}; it must be positive"))
    }
}

fn non_negative(v: &serde_yaml_ng::Value) -> std::result::Result<f64, String> {
    let x = number(v)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("is {x}; it must be 0 or more"))
    }
}

/// A YAML 1.1 boolean, as PyYAML reads one (`yes`, `On`, `FALSE` … are booleans there).
fn boolean(v: &serde_yaml_ng::Value) -> std::result::Result<bool, String> {
    if let Some(b) = v.as_bool() {
        return Ok(b);
    }
    match v.as_str() {
        Some("y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "True" | "TRUE") => Ok(true),
        Some("n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "False" | "FALSE") => Ok(false),
        _ => Err(wrong(v, "true or false")),
    }
}

/// The 1-based line where top-level `key:` starts, for messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.strip_prefix(key).map(str::trim_start);
            l.is_some_and(|rest| rest.starts_with(':'))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Layered, Overrides};

    /// Seed 000's `train/config.yaml`, verbatim.
    pub(crate) const SEED_000: &str = r#"# Dataset parameters
data_dir: "dataset"
max_chars_per_bundle: 20
min_images_per_char: 3

# Model parameters
use_simple_model: true
input_size: 512
num_face_latents: 16
num_body_latents: 16

# Training parameters
batch_size: 2
num_epochs: 30
learning_rate: 0.0001
weight_decay: 0.00001
face_weight: 1.0
body_weight: 0.5
content_weight: 0.5

# Output parameters
output_dir: "checkpoints/identity_preserving"
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn err(text: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "train/config.yaml", text);
        Layered::new(Some(&p), &Overrides::default()).and_then(|l| l.extract()).unwrap_err().to_string()
    }

    #[test]
    fn seed_000_yaml_translates_key_by_key() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "train/config.yaml", SEED_000);
        let l = Layered::new(Some(&p), &Overrides::default()).unwrap();
        let c = l.extract().unwrap();
        let train_dir = d.path().join("train");
        assert_eq!(c.model.plugin, "identity-autoencoder");
        assert_eq!(c.model.config["image_size"], serde_json::json!(512));
        assert_eq!(c.model.config.len(), 1, "{:?}", c.model.config);
        assert_eq!(c.data.layout, "bundles");
        assert_eq!(
            c.data.root,
            train_dir.join("dataset"),
            "relative to the YAML's folder, as seed 000 resolves it against train/"
        );
        assert_eq!(c.data.image_size, 512);
        assert_eq!(c.data.max_chars_per_bundle, Some(20));
        assert_eq!(c.data.min_images_per_char, 3);
        assert_eq!((c.data.val_fraction, c.data.test_fraction), (0.1, 0.1));
        assert_eq!(c.train.batch_size, 2);
        assert_eq!(c.train.epochs, 30);
        assert_eq!(c.train.steps, 0);
        assert_eq!(c.train.lr, 0.0001);
        assert_eq!(c.train.weight_decay, 0.00001);
        assert_eq!(c.train.schedule, crate::config::Schedule::Constant);
        assert_eq!((c.train.warmup_steps, c.train.max_grad_norm), (0, 0.0));
        assert_eq!(c.loss.plugin, "pixel");
        assert_eq!(c.loss.weight, 0.5);
        assert_eq!(c.metric, None, "no metric plugin named: face_weight is unused");
        assert_eq!(c.run.output, train_dir.join("checkpoints/identity_preserving"));
        assert!(
            l.warnings.iter().any(|w| w.contains("face_weight = 1 is not used") && w.contains("--metric dlib")),
            "{:?}",
            l.warnings
        );

        // Provenance: the YAML file, for keys it set; the flag layer still wins.
        let o = Overrides { lr: Some(0.5), ..Default::default() };
        let l = Layered::new(Some(&p), &o).unwrap();
        let prov = l.provenance().unwrap();
        let from =
            |k: &str| prov.iter().find(|(key, _, _)| key == k).unwrap_or_else(|| panic!("{k} in {prov:?}")).2.clone();
        assert!(from("train.batch_size").ends_with("config.yaml"), "{prov:?}");
        assert!(from("model.plugin").ends_with("config.yaml"));
        assert_eq!(from("train.lr"), "command line");
        assert_eq!(from("train.grad_accum"), "default");
    }

    #[test]
    fn face_weight_becomes_the_metric_weight_when_a_metric_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "c.yml", SEED_000);
        let o = Overrides { metric: Some("dlib".into()), ..Default::default() };
        let l = Layered::new(Some(&p), &o).unwrap();
        let m = l.extract().unwrap().metric.unwrap();
        assert_eq!((m.plugin.as_str(), m.weight), ("dlib", 1.0));
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let prov = l.provenance().unwrap();
        let w = prov.iter().find(|(k, _, _)| k == "metric.weight").unwrap();
        assert!(w.2.ends_with("c.yml"), "{w:?}");
        // A metric.weight set above the YAML wins over face_weight.
        let o = Overrides { metric: Some("dlib".into()), set: vec!["metric.weight=0".into()], ..Default::default() };
        assert_eq!(Layered::new(Some(&p), &o).unwrap().extract().unwrap().metric.unwrap().weight, 0.0);
    }

    #[test]
    fn unknown_key_names_file_line_and_closest_key() {
        let e = err("data_dir: d\nlerning_rate: 0.1\n");
        assert!(
            e.contains("config.yaml")
                && e.contains("unknown key `lerning_rate` (line 2)")
                && e.contains("did you mean `learning_rate`?"),
            "{e}"
        );
        let e = err("data_dir: d\nzzz: 1\n");
        assert!(e.contains("unknown key `zzz`") && e.contains("seed 000's keys are: data_dir,"), "{e}");
        // A TOML-style table is not seed 000's config either.
        let e = err("train:\n  lr: 0.1\n");
        assert!(e.contains("unknown key `train`"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = err("batch_size: eight\n");
        assert!(
            e.contains("key `batch_size` (line 1) has the wrong type: found string \"eight\", expected an integer"),
            "{e}"
        );
        let e = err("learning_rate: \"1e-4\"\n");
        assert!(e.contains("key `learning_rate`") && e.contains("expected a number"), "{e}");
        let e = err("use_simple_model: maybe\n");
        assert!(e.contains("key `use_simple_model`") && e.contains("expected true or false"), "{e}");
        let e = err("data_dir: [a, b]\n");
        assert!(e.contains("key `data_dir`") && e.contains("found a list"), "{e}");
        let e = err("batch_size: 2.5\n");
        assert!(e.contains("found float 2.5, expected an integer"), "{e}");
        let e = err("batch_size: 0\n");
        assert!(e.contains("key `batch_size` (line 1) is 0; it must be at least 1"), "{e}");
        let e = err("input_size: -64\n");
        assert!(e.contains("key `input_size`") && e.contains("at least 1"), "{e}");
        // Every problem at once.
        let e = err("batch_size: x\nnum_epochs: y\n");
        assert!(e.contains("`batch_size`") && e.contains("`num_epochs`"), "{e}");
        let e = err("- a\n- b\n");
        assert!(e.contains("expected seed 000's config") && e.contains("a list"), "{e}");
        let e = err("data_dir: [\n");
        assert!(e.contains("not valid YAML (line"), "{e}");
        let e = err("batch_size: 1\nbatch_size: 2\n");
        assert!(e.contains("not valid YAML") && e.contains("duplicate"), "{e}");
    }

    #[test]
    fn yaml_1_1_booleans_and_int_weights_are_accepted() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "c.yaml",
            "data_dir: /abs/data\nuse_simple_model: yes\ncontent_weight: 1\nmax_chars_per_bundle: null\n",
        );
        let c = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap();
        assert_eq!(c.model.plugin, "identity-autoencoder");
        assert_eq!(c.loss.weight, 1.0);
        assert_eq!(c.data.root, PathBuf::from("/abs/data"));
        assert_eq!(c.data.max_chars_per_bundle, None);
    }

    #[test]
    fn issue_16_use_simple_model_false_is_dtbacks_identity_preserving_flux() {
        let d = tempfile::tempdir().unwrap();
        let yaml = "data_dir: d\nuse_simple_model: false\ninput_size: 32\nnum_face_latents: 8\nnum_body_latents: 4\n\
                    face_weight: 1.0\nbody_weight: 0.5\ncontent_weight: 0.5\npretrained_model: /w/flux1-dev\n";
        let p = write(d.path(), "c.yaml", yaml);
        let c = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap();
        assert_eq!(c.model.plugin, DTBACK_MODEL_PLUGIN);
        let mc = serde_json::Value::Object(c.model.config.clone());
        assert_eq!(mc["pretrained"], "/w/flux1-dev");
        assert_eq!(
            (mc["identity"]["num_face_latents"].as_u64(), mc["identity"]["num_body_latents"].as_u64()),
            (Some(8), Some(4))
        );
        assert_eq!(c.model.conditioning["face_embedding"].plugin, "arcface");
        assert_eq!(c.model.conditioning["body_embedding"].plugin, "mtcnn-reid");
        let m = c.metric.as_ref().expect("the face term");
        assert_eq!((m.plugin.as_str(), m.weight), ("arcface", 1.0));
        let b = c.body.as_ref().expect("the body term");
        assert_eq!((b.plugin.as_str(), b.weight), ("mtcnn-reid", 0.5));
        assert_eq!((c.loss.plugin.as_str(), c.loss.weight), ("pixel", 0.5));
        assert_eq!(c.adapter.formats, vec!["identity".to_string()]);
        // num_body_latents: 0 drops the body stream and its term.
        let p = write(d.path(), "f.yaml", "data_dir: d\nuse_simple_model: false\nnum_body_latents: 0\n");
        let c = Layered::new(Some(&p), &Overrides::default()).unwrap().extract().unwrap();
        assert!(c.body.is_none() && !c.model.conditioning.contains_key("body_embedding"));
        // --plugin chooses another model instead; input_size still sizes the data.
        let p = write(d.path(), "o.yaml", "data_dir: d\nuse_simple_model: false\ninput_size: 32\n");
        let o = Overrides { plugin: Some("other".into()), ..Default::default() };
        let c = Layered::new(Some(&p), &o).unwrap().extract().unwrap();
        assert_eq!((c.model.plugin.as_str(), c.data.image_size), ("other", 32));
        assert!(c.model.config.is_empty());
    }

    #[test]
    fn empty_yaml_is_all_defaults_with_the_autoencoder() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "c.yaml", "# nothing\n");
        let o = Overrides { data: Some("d".into()), ..Default::default() };
        let c = Layered::new(Some(&p), &o).unwrap().extract().unwrap();
        assert_eq!(c.model.plugin, "identity-autoencoder");
        assert_eq!(c.data.root, PathBuf::from("d"));
        assert!(is_yaml(Path::new("x/CONFIG.YML")) && !is_yaml(Path::new("c.toml")));
    }

    #[test]
    fn the_example_in_configs_is_seed_000s_keys() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/seed000-config.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        let doc: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(&text).unwrap();
        let keys: Vec<&str> = doc.keys().map(|k| k.as_str().unwrap()).collect();
        // Seed 000's own keys; likeness's added `pretrained_model` (last) is not in the seed's file.
        assert_eq!(keys, KEYS[..KEYS.len() - 1]);
        let seed: serde_yaml_ng::Value = serde_yaml_ng::from_str(SEED_000).unwrap();
        assert_eq!(serde_yaml_ng::Value::Mapping(doc), seed, "the example keeps seed 000's values");
        translate(&p, &text, None).unwrap();
    }
}
