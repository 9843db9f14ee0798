//! `host eval-faces`: seed 004's face-consistency evaluator (`evaluate_face_consistency.py`) as
//! an engine function, for any identity-metric plugin.
//!
//! Pairs (control image, generated image) are found by file name (see [`find_sample_pairs`]
//! and [`find_dir_pairs`] for the rules), every distinct image is decoded once (in parallel)
//! and embedded once (in batches), and the cosine similarity of the two embeddings is the
//! pair's score; a pair is *valid* when the metric found a face in both images. The JSON
//! report has exactly seed 004's fields (`total_pairs`, `valid_pairs`, `overall_*`,
//! `by_step{step:{count,mean,std,min,max}}`, std = numpy's default population std), with
//! everything else under `"likeness"`.
//!
//! The cosine and batch embedding it shares with the trainer's validation live in
//! [`crate::similarity`] (re-exported here).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use likeness_abi::CpuTensor;
use serde::ser::SerializeMap;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::parse_device;
use crate::plots::{plot_band, BandPoint};
use crate::plugins::{Metric, Registry};
pub use crate::similarity::{cosine, embed_rows, identity_similarities};
use crate::{write_atomic, EngineError, Result};

/// Image file extensions considered: the engine's one list (it holds seed 004's png, jpg,
/// jpeg, webp); a listed file this build cannot decode is reported per pair.
pub use crate::data::image_io::IMAGE_EXTENSIONS;
use crate::data::image_io::{self, Fit};

// ---------------------------------------------------------------------------------------------
// Steps and file-name rules

/// The training step a generated image belongs to (the `by_step` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepKey {
    /// `…_000500_…` (musubi-tuner) or `…_step_500…`: key `"500"`.
    Step(u64),
    /// `…_e000003_…` (musubi-tuner's per-epoch samples): key `"e3"`.
    Epoch(u64),
    /// No step in the name: key `"unknown"` (as seed 004's script).
    Unknown,
}

impl StepKey {
    /// The `by_step` key.
    pub fn key(self) -> String {
        match self {
            StepKey::Step(n) => n.to_string(),
            StepKey::Epoch(n) => format!("e{n}"),
            StepKey::Unknown => "unknown".to_string(),
        }
    }

    fn x(self) -> Option<f64> {
        match self {
            StepKey::Step(n) | StepKey::Epoch(n) => Some(n as f64),
            StepKey::Unknown => None,
        }
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// musubi-tuner's sample name `<output_name>_<step:06d | e<epoch:06d>>_<prompt:02d>_<YYYYMMDDHHMMSS>[_<seed>]`:
/// (step, prompt index), searched from the right.
fn musubi_parts(stem: &str) -> Option<(StepKey, u64)> {
    let t: Vec<&str> = stem.split('_').collect();
    (0..t.len().saturating_sub(2)).rev().find_map(|i| {
        let (s, p, ts) = (t[i], t[i + 1], t[i + 2]);
        if !(all_digits(p) && ts.len() == 14 && all_digits(ts)) {
            return None;
        }
        let step = if all_digits(s) {
            StepKey::Step(s.parse().ok()?)
        } else if let Some(e) = s.strip_prefix('e').filter(|e| all_digits(e)) {
            StepKey::Epoch(e.parse().ok()?)
        } else {
            return None;
        };
        Some((step, p.parse().ok()?))
    })
}

/// The step in a generated image's file stem:
/// 1. musubi-tuner's `…_<step:06d>_<prompt>_<YYYYMMDDHHMMSS>[_<seed>]` (or `e<epoch:06d>`);
/// 2. a `_`-separated token `step` followed by a number token (`generated_step_1000_0`, seed
///    004's rule);
/// 3. a token `step<N>` or `step-<N>` (`img_step500`);
/// 4. otherwise [`StepKey::Unknown`].
pub fn parse_step(stem: &str) -> StepKey {
    if let Some((s, _)) = musubi_parts(stem) {
        return s;
    }
    let t: Vec<&str> = stem.split('_').collect();
    for (i, tok) in t.iter().enumerate() {
        if tok.eq_ignore_ascii_case("step") {
            if let Some(n) = t.get(i + 1).filter(|n| all_digits(n)).and_then(|n| n.parse().ok()) {
                return StepKey::Step(n);
            }
        }
    }
    for tok in &t {
        let lower = tok.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("step") {
            let rest = rest.strip_prefix('-').unwrap_or(rest);
            if all_digits(rest) {
                if let Ok(n) = rest.parse() {
                    return StepKey::Step(n);
                }
            }
        }
    }
    StepKey::Unknown
}

/// The prompt index of a generated sample: musubi-tuner's `<prompt>` field, else the last
/// `_`-separated token when it is a number (seed 004's `*_<idx>.png`).
pub fn prompt_index(stem: &str) -> Option<u64> {
    if let Some((_, p)) = musubi_parts(stem) {
        return Some(p);
    }
    stem.rsplit('_').next().filter(|s| all_digits(s)).and_then(|s| s.parse().ok())
}

/// One control/generated pair (not the training dataset's (reference, target) pair).
#[derive(Debug, Clone, PartialEq)]
pub struct FacePair {
    pub control: PathBuf,
    pub generated: PathBuf,
    pub step: StepKey,
}

/// The former name of [`FacePair`].
pub type Pair = FacePair;

/// What the file-name rules found.
#[derive(Debug, Clone, Default)]
pub struct Matching {
    pub pairs: Vec<FacePair>,
    /// Generated images with no control image, and why.
    pub unmatched: Vec<(PathBuf, String)>,
    /// Control images no generated image matched.
    pub unused_controls: Vec<PathBuf>,
}

fn is_image(p: &Path) -> bool {
    p.is_file() && image_io::is_image_path(p)
}

fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, format!("cannot read directory: {e}")))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_image(p)).collect();
    v.sort();
    Ok(v)
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `--sample-dir` rule (a superset of seed 004's `find_sample_pairs`), on the image files
/// (png, jpg, jpeg, webp) directly in `dir`:
/// - control images are named `control_image_<idx>` (seed 004);
/// - every other image whose name does not contain `control` is a generated sample; its prompt
///   index is musubi-tuner's `<prompt>` field (`<name>_<step:06d>_<prompt:02d>_<YYYYMMDDHHMMSS>[_<seed>]`)
///   or else the number after its last `_` (seed 004's `*_<idx>.png`); indices compare as
///   numbers (`_00` = `_0`);
/// - a generated sample pairs with `control_image_<its index>`; one without an index or
///   without that control image is reported as unmatched (not an error).
pub fn find_sample_pairs(dir: &Path) -> Result<Matching> {
    let files = list_images(dir)?;
    let mut controls: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut generated = Vec::new();
    for f in files {
        let s = stem(&f);
        if let Some(idx) =
            s.strip_prefix("control_image_").filter(|i| all_digits(i)).and_then(|i| i.parse::<u64>().ok())
        {
            controls.entry(idx).or_insert(f);
        } else if s.to_ascii_lowercase().contains("control") {
            continue;
        } else {
            generated.push(f);
        }
    }
    let mut m = Matching::default();
    let mut used = std::collections::BTreeSet::new();
    for g in generated {
        let s = stem(&g);
        match prompt_index(&s) {
            None => m.unmatched.push((g, "no prompt index in the file name (expected `…_<idx>` or musubi-tuner's `…_<step>_<idx>_<YYYYMMDDHHMMSS>[_<seed>]`)".into())),
            Some(idx) => match controls.get(&idx) {
                Some(c) => {
                    used.insert(idx);
                    m.pairs.push(FacePair { control: c.clone(), generated: g, step: parse_step(&s) });
                }
                None => m.unmatched.push((g, format!("no control image `control_image_{idx}.*` for prompt index {idx}"))),
            },
        }
    }
    m.unused_controls = controls.iter().filter(|(i, _)| !used.contains(*i)).map(|(_, p)| p.clone()).collect();
    Ok(m)
}

/// `--control-dir C --generated-dir G` rule: each image in G is paired with the image in C
/// 1. whose stem equals its stem (seed 004 matches identical file names; here the extension
///    may differ, the same extension is preferred), else
/// 2. whose stem is the longest one that is a prefix of its stem followed by `_`, `-` or `.`
///    (`alice.png` ← `alice_step500.png`, `alice-1.jpg`).
///
/// A generated image matching no control image is reported as unmatched (not an error). The
/// step comes from the generated stem ([`parse_step`]).
pub fn find_dir_pairs(control_dir: &Path, generated_dir: &Path) -> Result<Matching> {
    let controls = list_images(control_dir)?;
    let generated = list_images(generated_dir)?;
    let mut by_stem: HashMap<String, Vec<&PathBuf>> = HashMap::new();
    for c in &controls {
        by_stem.entry(stem(c)).or_default().push(c);
    }
    let ext = |p: &Path| p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    let mut m = Matching::default();
    let mut used = std::collections::HashSet::new();
    for g in generated {
        let s = stem(&g);
        let found = if let Some(cs) = by_stem.get(&s) {
            Some(cs.iter().find(|c| ext(c) == ext(&g)).copied().unwrap_or(cs[0]))
        } else {
            by_stem
                .iter()
                .filter(|(cs, _)| {
                    !cs.is_empty()
                        && s.len() > cs.len()
                        && s.starts_with(cs.as_str())
                        && matches!(s.as_bytes()[cs.len()], b'_' | b'-' | b'.')
                })
                .max_by(|a, b| a.0.len().cmp(&b.0.len()).then_with(|| b.0.cmp(a.0)))
                .map(|(_, cs)| cs[0])
        };
        match found {
            Some(c) => {
                used.insert(c.clone());
                m.pairs.push(FacePair { control: c.clone(), generated: g, step: parse_step(&s) });
            }
            None => m.unmatched.push((
                g,
                format!(
                    "no control image in {} with the same stem or a stem that prefixes `{s}`",
                    control_dir.display()
                ),
            )),
        }
    }
    m.unused_controls = controls.into_iter().filter(|c| !used.contains(c)).collect();
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// count / mean / std (population, numpy's default `ddof=0`) / min / max.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// Statistics of `v`; None when empty.
pub fn stats(v: &[f64]) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Some(Stats {
        count: v.len(),
        mean,
        std: var.sqrt(),
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// Seed 004's similarity bands.
pub fn band(similarity: f64) -> &'static str {
    if similarity >= 0.8 {
        "very high (likely same person)"
    } else if similarity >= 0.6 {
        "high (possibly same person)"
    } else if similarity >= 0.4 {
        "moderate (different person, similar features)"
    } else {
        "low (different person)"
    }
}

/// Plugin ids whose scores are ArcFace cosines, where seed 004's bands and targets hold.
pub const ARCFACE_LIKE: &[&str] = &["arcface"];

/// How an evaluation's similarities read: bands belong to the metric. Seed 004's bands were
/// stated for ArcFace cosines; another metric's cosines live on another scale (dlib's
/// descriptors of one person sit near 0.9+, a colour statistic near 1 for anything), so it gets
/// a two-sided verdict around the threshold it declares itself, or none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bands {
    /// Seed 004's four bands and its training targets (ArcFace-like metrics).
    Seed004,
    /// Same person at or above the metric's declared threshold, different below.
    Threshold(f64),
    /// The metric declares no threshold: numbers only.
    None,
}

impl Bands {
    /// The bands of metric `id` that declares `threshold` (`MetricInterface.same_person_threshold`
    /// when ≥ −1).
    pub fn for_metric(id: &str, threshold: Option<f64>) -> Bands {
        if ARCFACE_LIKE.contains(&id) {
            Bands::Seed004
        } else {
            match threshold {
                Some(t) => Bands::Threshold(t),
                None => Bands::None,
            }
        }
    }

    /// The verdict for a similarity, when the metric has one.
    pub fn verdict(self, similarity: f64) -> Option<String> {
        match self {
            Bands::Seed004 => Some(band(similarity).to_string()),
            Bands::Threshold(t) if similarity >= t => Some(format!("same person (≥ {t})")),
            Bands::Threshold(t) => Some(format!("different person (< {t})")),
            Bands::None => None,
        }
    }

    /// The threshold the verdicts use (seed 004's "likely same person" line for ArcFace).
    pub fn threshold(self) -> Option<f64> {
        match self {
            Bands::Seed004 => Some(0.8),
            Bands::Threshold(t) => Some(t),
            Bands::None => None,
        }
    }

    /// The name written into the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Bands::Seed004 => "seed004_arcface",
            Bands::Threshold(_) => "metric_threshold",
            Bands::None => "none",
        }
    }
}

/// Seed 004's targets for face-consistency LoRA training.
pub fn target_verdict(mean: f64) -> &'static str {
    if mean > 0.85 {
        "meets the training target (> 0.85)"
    } else if mean > 0.75 {
        "good results (> 0.75), below the training target (> 0.85)"
    } else if mean >= 0.65 {
        "between needs improvement (< 0.65) and good results (> 0.75)"
    } else {
        "needs improvement (< 0.65)"
    }
}

// ---------------------------------------------------------------------------------------------
// Images

/// Decodes `path`, converts it to RGB and fits it into `size`×`size` keeping its aspect ratio
/// (bilinear), placed at the top-left with black padding — the letterbox InsightFace's
/// detector uses. An image already `size`×`size` is passed through untouched. Returns CHW f32
/// in [0, 1].
pub fn load_image(path: &Path, size: u32) -> std::result::Result<Vec<f32>, String> {
    let img = image_io::decode_rgb(path).map_err(|e| e.to_string())?;
    Ok(image_io::fit_image(&img, Fit::Letterbox(size)))
}

// ---------------------------------------------------------------------------------------------
// The evaluation

/// Where the pairs come from.
#[derive(Debug, Clone)]
pub enum EvalInputs {
    SampleDir(PathBuf),
    Dirs { control: PathBuf, generated: PathBuf },
}

/// How `host eval-faces` was asked to run.
#[derive(Debug, Clone)]
pub struct EvalFacesOptions {
    pub inputs: EvalInputs,
    pub output_json: PathBuf,
    /// Default: `<json stem>.pairs.csv` next to the JSON.
    pub csv: Option<PathBuf>,
    /// Default: `<json stem>.png` next to the JSON.
    pub plot: Option<PathBuf>,
    pub metric: String,
    /// A JSON object passed to the metric plugin (`{}` when None).
    pub metric_config: Option<String>,
    /// Added to the metric config as `model_name` when given.
    pub model_name: Option<String>,
    /// Added to the metric config as `det_size` when given.
    pub det_size: Option<u32>,
    pub device: String,
    pub batch_size: usize,
    pub image_size: u32,
    /// Decoding threads (0 = one per CPU).
    pub threads: usize,
    pub progress: bool,
}

/// One pair's outcome.
#[derive(Debug, Clone)]
pub struct PairResult {
    pub pair: FacePair,
    pub similarity: Option<f64>,
    /// Why the pair is invalid (empty when valid).
    pub reason: String,
}

/// What an evaluation wrote and measured.
#[derive(Debug, Clone)]
pub struct EvalFacesReport {
    pub metric: String,
    /// How the similarities read (from the metric's declared threshold).
    pub bands: Bands,
    pub total_pairs: usize,
    pub valid_pairs: usize,
    pub overall: Option<Stats>,
    pub by_step: Vec<(StepKey, Stats)>,
    pub pairs: Vec<PairResult>,
    pub unmatched: Vec<(PathBuf, String)>,
    pub unused_controls: Vec<PathBuf>,
    pub json: PathBuf,
    pub csv: PathBuf,
    pub plot: PathBuf,
    pub images: usize,
    pub seconds: f64,
}

/// by_step as a JSON object in step order (numeric steps, then epochs, then `unknown`).
struct ByStep<'a>(&'a [(StepKey, Stats)]);

impl Serialize for ByStep<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(&k.key(), v)?;
        }
        m.end()
    }
}

/// Seed 004's JSON, field for field, then `likeness`.
#[derive(Serialize)]
struct ReportJson<'a> {
    total_pairs: usize,
    valid_pairs: usize,
    overall_mean: Option<f64>,
    overall_std: Option<f64>,
    overall_min: Option<f64>,
    overall_max: Option<f64>,
    by_step: ByStep<'a>,
    likeness: Value,
}

/// The metric config: `--metric-config` (an object) plus `model_name` / `det_size` when given.
pub fn metric_config_json(opts: &EvalFacesOptions) -> Result<Value> {
    let mut v: Value = match &opts.metric_config {
        None => json!({}),
        Some(s) => serde_json::from_str(s)
            .map_err(|e| EngineError::Config(format!("--metric-config is not valid JSON ({e}): {s}")))?,
    };
    let Some(o) = v.as_object_mut() else {
        return Err(EngineError::Config(format!("--metric-config must be a JSON object like {{\"key\": 1}}, got {v}")));
    };
    if let Some(m) = &opts.model_name {
        o.insert("model_name".into(), json!(m));
    }
    if let Some(d) = opts.det_size {
        o.insert("det_size".into(), json!(d));
    }
    Ok(v)
}

fn sibling(json: &Path, suffix: &str) -> PathBuf {
    let stem = json.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "face_consistency".into());
    json.with_file_name(format!("{stem}{suffix}"))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

enum ImageState {
    Pending,
    Embedded(Vec<f32>),
    NoFace,
    Failed(String),
}

/// Runs the evaluation and writes the JSON, the per-pair CSV and the plot.
pub fn eval_faces(reg: &Registry, opts: &EvalFacesOptions) -> Result<EvalFacesReport> {
    evaluate(MetricSource::Open(reg), opts, None)
}

/// Where the evaluation's metric comes from.
pub enum MetricSource<'m> {
    /// Opened from the registry with `opts.metric` and the options' config.
    Open(&'m Registry),
    /// An instance the caller already has (the trainer's), with the config it was created with.
    Given(&'m mut Metric, Value),
}

/// [`eval_faces`] with an already-open metric and, optionally, only the generated images of one
/// step (`by_step` key, e.g. `"500"`): what the trainer's `[eval]` writes during training.
pub fn eval_faces_with(
    metric: &mut Metric,
    metric_config: Value,
    opts: &EvalFacesOptions,
    only_step: Option<&str>,
) -> Result<EvalFacesReport> {
    evaluate(MetricSource::Given(metric, metric_config), opts, only_step)
}

fn evaluate(source: MetricSource<'_>, opts: &EvalFacesOptions, only_step: Option<&str>) -> Result<EvalFacesReport> {
    let started = std::time::Instant::now();
    if opts.batch_size == 0 {
        return Err(EngineError::Config("--batch-size must be at least 1".into()));
    }
    if opts.image_size == 0 {
        return Err(EngineError::Config("--image-size must be at least 1".into()));
    }
    let matching = find_pairs(opts, only_step)?;

    let mut opened;
    let (metric, config): (&mut Metric, Value) = match source {
        MetricSource::Open(reg) => {
            let config = metric_config_json(opts)?;
            let device = parse_device(&opts.device).map_err(|_| {
                EngineError::Config(format!("--device is `{}`; expected cpu, cuda or cuda:N", opts.device))
            })?;
            opened = reg.open_metric(&opts.metric, &config.to_string(), device, 0)?;
            (&mut opened, config)
        }
        MetricSource::Given(m, config) => (m, config),
    };

    // Every distinct image once.
    let mut index: HashMap<PathBuf, usize> = HashMap::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    for p in &matching.pairs {
        for f in [&p.control, &p.generated] {
            if !index.contains_key(f) {
                index.insert(f.clone(), paths.len());
                paths.push(f.clone());
            }
        }
    }
    let bands = Bands::for_metric(&metric.id, metric.same_person_threshold());
    let states = embed_all(metric, &paths, opts)?;
    let results = score_pairs(&metric.id, &matching.pairs, |p| &states[index[p]])?;

    let valid: Vec<f64> = results.iter().filter_map(|r| r.similarity).collect();
    let overall = stats(&valid);
    let mut grouped: BTreeMap<StepKey, Vec<f64>> = BTreeMap::new();
    for r in &results {
        if let Some(s) = r.similarity {
            grouped.entry(r.pair.step).or_default().push(s);
        }
    }
    let by_step: Vec<(StepKey, Stats)> = grouped.iter().filter_map(|(k, v)| stats(v).map(|s| (*k, s))).collect();

    let json_path = opts.output_json.clone();
    let csv_path = opts.csv.clone().unwrap_or_else(|| sibling(&json_path, ".pairs.csv"));
    let plot_path = opts.plot.clone().unwrap_or_else(|| sibling(&json_path, ".png"));
    for p in [&json_path, &csv_path, &plot_path] {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| EngineError::io(d, format!("cannot create directory: {e}")))?;
        }
    }
    write_csv(&csv_path, &results)?;
    write_plot(&plot_path, &opts.metric, &by_step)?;
    let mut report = EvalFacesReport {
        metric: opts.metric.clone(),
        bands,
        total_pairs: results.len(),
        valid_pairs: valid.len(),
        overall,
        by_step,
        pairs: results,
        unmatched: matching.unmatched,
        unused_controls: matching.unused_controls,
        json: json_path,
        csv: csv_path,
        plot: plot_path,
        images: paths.len(),
        seconds: 0.0,
    };
    report.seconds = started.elapsed().as_secs_f64();
    write_json(&report, opts, &config, metric.same_person_threshold())?;
    Ok(report)
}

/// The pairs `opts.inputs` names (only those of step `only_step` when given); an error saying
/// the naming rule when there is none.
fn find_pairs(opts: &EvalFacesOptions, only_step: Option<&str>) -> Result<Matching> {
    let mut matching = match &opts.inputs {
        EvalInputs::SampleDir(d) => find_sample_pairs(d)?,
        EvalInputs::Dirs { control, generated } => find_dir_pairs(control, generated)?,
    };
    if let Some(step) = only_step {
        matching.pairs.retain(|p| p.step.key() == step);
    }
    for (g, why) in &matching.unmatched {
        tracing::debug!("unmatched generated image {}: {why}", g.display());
    }
    if matching.pairs.is_empty() {
        let rule = match &opts.inputs {
            EvalInputs::SampleDir(d) => format!(
                "in {}: control images must be named control_image_<idx>.png and generated samples end in _<idx> or follow musubi-tuner's <name>_<step>_<idx>_<YYYYMMDDHHMMSS>_<seed>.png",
                d.display()
            ),
            EvalInputs::Dirs { control, generated } => format!(
                "between {} and {}: a generated image needs a control image with the same stem, or one whose stem prefixes it followed by _ - or .",
                control.display(),
                generated.display()
            ),
        };
        return Err(EngineError::Config(format!(
            "no image pairs found {rule} ({} unmatched generated image(s); see `host eval-faces --help`)",
            matching.unmatched.len()
        )));
    }
    Ok(matching)
}

/// Each pair's similarity, or why it has none; `state` gives an image's embedding state.
fn score_pairs<'s>(
    metric_id: &str,
    pairs: &[FacePair],
    state: impl Fn(&PathBuf) -> &'s ImageState,
) -> Result<Vec<PairResult>> {
    let mut results = Vec::with_capacity(pairs.len());
    for p in pairs {
        let (c, g) = (state(&p.control), state(&p.generated));
        let (similarity, reason) = match (c, g) {
            (ImageState::Failed(e), _) => (None, format!("control image: {e}")),
            (_, ImageState::Failed(e)) => (None, format!("generated image: {e}")),
            (ImageState::NoFace, ImageState::NoFace) => (None, "no face found in either image".to_string()),
            (ImageState::NoFace, _) => (None, "no face found in the control image".to_string()),
            (_, ImageState::NoFace) => (None, "no face found in the generated image".to_string()),
            (ImageState::Embedded(a), ImageState::Embedded(b)) => {
                if a.len() != b.len() {
                    return Err(EngineError::Plugin {
                        plugin: metric_id.to_string(),
                        message: format!("returned {}-d and {}-d embeddings", a.len(), b.len()),
                    });
                }
                let s = cosine(a, b);
                if s.is_finite() {
                    (Some(s), String::new())
                } else {
                    (None, format!("non-finite similarity ({s})"))
                }
            }
            _ => (None, "not embedded".to_string()),
        };
        results.push(PairResult { pair: p.clone(), similarity, reason });
    }
    Ok(results)
}

/// The per-pair CSV.
fn write_csv(path: &Path, results: &[PairResult]) -> Result<()> {
    let mut csv = String::from("control,generated,step,similarity,valid,reason\n");
    for r in results {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{}",
            csv_field(&r.pair.control.to_string_lossy()),
            csv_field(&r.pair.generated.to_string_lossy()),
            csv_field(&r.pair.step.key()),
            r.similarity.map(|s| format!("{s}")).unwrap_or_default(),
            r.similarity.is_some() as u8,
            csv_field(&r.reason)
        );
    }
    write_atomic(path, csv.as_bytes())
}

/// The band plot: numeric steps; epochs only when there are no steps (the two axes do not mix).
fn write_plot(path: &Path, metric: &str, by_step: &[(StepKey, Stats)]) -> Result<()> {
    let has_steps = by_step.iter().any(|(k, _)| matches!(k, StepKey::Step(_)));
    let pts: Vec<BandPoint> = by_step
        .iter()
        .filter(|(k, _)| if has_steps { matches!(k, StepKey::Step(_)) } else { matches!(k, StepKey::Epoch(_)) })
        .filter_map(|(k, s)| k.x().map(|x| BandPoint { x, mean: s.mean, min: s.min, max: s.max }))
        .collect();
    let x_label = if has_steps || pts.is_empty() { "training step" } else { "epoch" };
    plot_band(
        path,
        &format!("face similarity ({metric}), generated vs control"),
        x_label,
        "cosine similarity (mean, min–max)",
        &pts,
    )
}

/// Seed 004's JSON of `r`, with this evaluator's own fields under `likeness`.
fn write_json(r: &EvalFacesReport, opts: &EvalFacesOptions, config: &Value, declared: Option<f64>) -> Result<()> {
    let (mode, inputs) = match &opts.inputs {
        EvalInputs::SampleDir(d) => ("sample_dir", json!({"sample_dir": d})),
        EvalInputs::Dirs { control, generated } => {
            ("control_generated_dirs", json!({"control_dir": control, "generated_dir": generated}))
        }
    };
    let mut likeness = json!({
        "metric": opts.metric,
        "metric_config": config,
        "model_name": opts.model_name,
        "det_size": opts.det_size,
        "device": opts.device,
        "image_size": opts.image_size,
        "mode": mode,
        "inputs": inputs,
        "images": r.images,
        "per_pair_csv": r.csv,
        "plot": r.plot,
        "invalid_pairs": r.pairs.iter().filter(|r| r.similarity.is_none()).map(|r| json!({"control": r.pair.control, "generated": r.pair.generated, "reason": r.reason})).collect::<Vec<_>>(),
        "unmatched_generated": r.unmatched.iter().map(|(p, why)| json!({"generated": p, "reason": why})).collect::<Vec<_>>(),
        "unused_controls": r.unused_controls,
        "seconds": r.seconds,
        // Added to seed 004's schema: the bands used and the threshold behind the verdicts.
        "bands": r.bands.name(),
        "same_person_threshold": r.bands.threshold(),
        "declared_same_person_threshold": declared,
        "verdict": r.overall.and_then(|o| r.bands.verdict(o.mean)),
    });
    if r.valid_pairs == 0 {
        likeness["error"] = json!("No valid face pairs detected");
    }
    let report = ReportJson {
        total_pairs: r.total_pairs,
        valid_pairs: r.valid_pairs,
        overall_mean: r.overall.map(|s| s.mean),
        overall_std: r.overall.map(|s| s.std),
        overall_min: r.overall.map(|s| s.min),
        overall_max: r.overall.map(|s| s.max),
        by_step: ByStep(&r.by_step),
        likeness,
    };
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| EngineError::Other(format!("cannot serialise the report: {e}")))?;
    write_atomic(&r.json, format!("{text}\n").as_bytes())
}

/// The progress bar of [`embed_all`] (hidden unless `progress`).
fn image_bar(n: usize, progress: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(n as u64),
        if progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images | {per_sec} | ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Decodes and embeds `paths` in batches of `batch_size`: each batch is first decoded on
/// `threads` workers, then embedded, one phase after the other. Overlapping the two (decoders
/// feeding a queue while the metric runs) was slower: the decoders take cores from ONNX
/// Runtime's / libtorch's intra-op pool, whose parallel loops wait for their slowest worker, so
/// on 2 cores a little decoding stalled whole convolutions (issue 14, part 6: scripts/bench.sh).
/// Decoding is a few percent of the work, so running it alone costs less than it stole.
fn embed_all(metric: &mut Metric, paths: &[PathBuf], opts: &EvalFacesOptions) -> Result<Vec<ImageState>> {
    let n = paths.len();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        opts.threads
    };
    let (bs, size) = (opts.batch_size, opts.image_size);
    let bar = image_bar(n, opts.progress);
    let mut states: Vec<ImageState> = (0..n).map(|_| ImageState::Pending).collect();
    for (c, chunk) in paths.chunks(bs).enumerate() {
        let mut data = Vec::with_capacity(chunk.len() * 3 * (size as usize).pow(2));
        let mut rows_of = Vec::with_capacity(chunk.len());
        for (k, decoded) in decode_all(chunk, size, threads).into_iter().enumerate() {
            match decoded {
                Ok(px) => {
                    data.extend_from_slice(&px);
                    rows_of.push(c * bs + k);
                }
                Err(e) => states[c * bs + k] = ImageState::Failed(e),
            }
        }
        if !rows_of.is_empty() {
            let t = CpuTensor::new(vec![rows_of.len() as i64, 3, size as i64, size as i64], data);
            for (i, row) in rows_of.into_iter().zip(embed_rows(metric, &t)?) {
                states[i] = match row {
                    Some(e) => ImageState::Embedded(e),
                    None => ImageState::NoFace,
                };
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    for (p, s) in paths.iter().zip(&states) {
        if let ImageState::Failed(e) = s {
            tracing::warn!("{}: {e}", p.display());
        }
    }
    Ok(states)
}

/// One decoded image (CHW f32 in [0, 1]) or why it could not be read.
type Decoded = std::result::Result<Vec<f32>, String>;

/// Decodes `paths` (fitted into `size`×`size`) on up to `threads` scoped workers, in order.
fn decode_all(paths: &[PathBuf], size: u32, threads: usize) -> Vec<Decoded> {
    let threads = threads.clamp(1, paths.len().max(1));
    if threads == 1 {
        return paths.iter().map(|p| load_image(p, size)).collect();
    }
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<Decoded>> = (0..paths.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, Decoded)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= paths.len() {
                            return mine;
                        }
                        mine.push((i, load_image(&paths[i], size)));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    for (i, r) in done.into_iter().flatten() {
        out[i] = Some(r);
    }
    out.into_iter().map(|r| r.unwrap_or_else(|| Err("the decoding thread panicked".into()))).collect()
}

/// Seed 004's troubleshooting for `valid_pairs: 0`.
pub const NO_VALID_PAIRS_CAUSES: [&str; 4] = [
    "image resolution: faces should be at least 50×50 pixels (raise --image-size if the images are being shrunk)",
    "detection size: increase it, e.g. --det-size 1024",
    "the control images may not actually contain faces (check control_image_<idx> / the control dir)",
    "image preprocessing: images must be RGB (they are converted to RGB here; check they are not blank or corrupt)",
];

/// The printed summary: totals, seed 004's bands and targets, per-step table, warnings.
pub fn summary_text(r: &EvalFacesReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "face consistency ({}): {} pairs, {} valid, {} images in {:.1} s",
        r.metric, r.total_pairs, r.valid_pairs, r.images, r.seconds
    );
    if let Some(o) = r.overall {
        summary_overall(&mut s, r, o);
    }
    summary_warnings(&mut s, r);
    let _ = writeln!(s, "  report: {}", r.json.display());
    let _ = writeln!(s, "  pairs:  {}", r.csv.display());
    let _ = writeln!(s, "  plot:   {}", r.plot.display());
    s
}

/// The overall, per-step and band lines of [`summary_text`].
fn summary_overall(s: &mut String, r: &EvalFacesReport, o: Stats) {
    let _ = writeln!(s, "  overall: mean {:.4} ± {:.4}  range [{:.4}, {:.4}]", o.mean, o.std, o.min, o.max);
    match r.bands.verdict(o.mean) {
        Some(v) => {
            let _ = writeln!(s, "  similarity: {v}");
        }
        None => {
            let _ = writeln!(s, "  similarity: no verdict (metric `{}` declares no same-person threshold)", r.metric);
        }
    }
    if r.bands == Bands::Seed004 {
        let _ = writeln!(s, "  target: {}", target_verdict(o.mean));
    }
    if !r.by_step.is_empty() {
        let _ = writeln!(s, "  by step:");
        let _ = writeln!(s, "    {:>10} {:>5} {:>8} {:>8} {:>8} {:>8}  band", "step", "n", "mean", "std", "min", "max");
        for (k, st) in &r.by_step {
            let _ = writeln!(
                s,
                "    {:>10} {:>5} {:>8.4} {:>8.4} {:>8.4} {:>8.4}  {}",
                k.key(),
                st.count,
                st.mean,
                st.std,
                st.min,
                st.max,
                r.bands.verdict(st.mean).unwrap_or_else(|| "-".into())
            );
        }
    }
    match r.bands {
        Bands::Seed004 => {
            let _ = writeln!(
                s,
                "  bands: ≥ 0.8 very high (likely same person) · 0.6–0.8 high (possibly same person) · 0.4–0.6 moderate (different person, similar features) · < 0.4 low (different person)"
            );
            let _ = writeln!(s, "  targets: training target > 0.85 · good results > 0.75 · needs improvement < 0.65");
        }
        Bands::Threshold(t) => {
            let _ = writeln!(
                s,
                "  bands (metric `{}`'s declared threshold): ≥ {t} same person · < {t} different person",
                r.metric
            );
        }
        Bands::None => {}
    }
}

/// The warnings of [`summary_text`]: invalid pairs, seed 004's troubleshooting, unmatched files.
fn summary_warnings(s: &mut String, r: &EvalFacesReport) {
    let invalid = r.total_pairs - r.valid_pairs;
    if invalid > 0 && r.valid_pairs > 0 {
        let _ = writeln!(s, "  {invalid} invalid pair(s) (no face found or unreadable): see the CSV");
    }
    if r.valid_pairs == 0 {
        let _ = writeln!(s, "warning: valid_pairs = 0 — no pair had a face found in both images. Likely causes (seed 004's troubleshooting):");
        for (i, c) in NO_VALID_PAIRS_CAUSES.iter().enumerate() {
            let _ = writeln!(s, "  {}. {c}", i + 1);
        }
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &r.pairs {
            *reasons.entry(p.reason.as_str()).or_default() += 1;
        }
        for (why, n) in reasons {
            let _ = writeln!(s, "  ({n} pair(s): {why})");
        }
    }
    if !r.unmatched.is_empty() {
        let _ =
            writeln!(s, "warning: {} generated image(s) matched no control image and were skipped:", r.unmatched.len());
        for (p, why) in r.unmatched.iter().take(20) {
            let _ = writeln!(s, "  {}: {why}", p.display());
        }
        if r.unmatched.len() > 20 {
            let _ = writeln!(
                s,
                "  … and {} more (all listed in the JSON under likeness.unmatched_generated)",
                r.unmatched.len() - 20
            );
        }
    }
    if !r.unused_controls.is_empty() {
        let _ = writeln!(s, "note: {} control image(s) matched no generated image", r.unused_controls.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_indices() {
        assert_eq!(parse_step("face_lora_000500_00_20250101120000_42"), StepKey::Step(500));
        assert_eq!(prompt_index("face_lora_000500_03_20250101120000_42"), Some(3));
        assert_eq!(parse_step("face_lora_e000002_01_20250101120000"), StepKey::Epoch(2));
        assert_eq!(prompt_index("face_lora_e000002_01_20250101120000"), Some(1));
        assert_eq!(parse_step("generated_step_1000_0"), StepKey::Step(1000));
        assert_eq!(prompt_index("generated_step_1000_0"), Some(0));
        assert_eq!(parse_step("alice_step500"), StepKey::Step(500));
        assert_eq!(parse_step("alice_step-7"), StepKey::Step(7));
        assert_eq!(parse_step("alice_1"), StepKey::Unknown);
        assert_eq!(prompt_index("alice"), None);
    }

    #[test]
    fn population_std() {
        let s = stats(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.count, 4);
        assert!((s.mean - 2.5).abs() < 1e-15);
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-15);
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert!(stats(&[]).is_none());
    }

    #[test]
    fn bands_belong_to_the_metric() {
        assert_eq!(Bands::for_metric("arcface", None), Bands::Seed004);
        assert_eq!(Bands::for_metric("arcface", Some(0.3)), Bands::Seed004);
        assert_eq!(Bands::for_metric("dlib", Some(0.6)), Bands::Threshold(0.6));
        assert_eq!(Bands::for_metric("testing-color-metric", None), Bands::None);
        let t = Bands::Threshold(0.6);
        assert!(t.verdict(0.6).unwrap().starts_with("same person"));
        assert!(t.verdict(0.59).unwrap().starts_with("different person"));
        assert_eq!(Bands::None.verdict(0.99), None);
        assert_eq!(Bands::Seed004.verdict(0.81).as_deref(), Some("very high (likely same person)"));
    }

    #[test]
    fn bands() {
        assert!(band(0.8).starts_with("very high"));
        assert!(band(0.79).starts_with("high"));
        assert!(band(0.4).starts_with("moderate"));
        assert!(band(0.39).starts_with("low"));
    }

    #[test]
    fn dir_matching() {
        let d = tempfile::tempdir().unwrap();
        let (c, g) = (d.path().join("c"), d.path().join("g"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::create_dir_all(&g).unwrap();
        for f in ["alice.png", "alice_b.png", "bob.jpg"] {
            std::fs::write(c.join(f), b"x").unwrap();
        }
        for f in ["alice.png", "alice_b_step500.png", "alice_1.png", "bob-2.png", "carol.png", "alicex.png"] {
            std::fs::write(g.join(f), b"x").unwrap();
        }
        let m = find_dir_pairs(&c, &g).unwrap();
        let got: Vec<(String, String)> = m
            .pairs
            .iter()
            .map(|p| (stem(&p.generated), p.control.file_name().unwrap().to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alice".into(), "alice.png".into()),
                ("alice_1".into(), "alice.png".into()),
                ("alice_b_step500".into(), "alice_b.png".into()),
                ("bob-2".into(), "bob.jpg".into()),
            ]
        );
        assert_eq!(m.pairs[2].step, StepKey::Step(500));
        let un: Vec<String> = m.unmatched.iter().map(|(p, _)| stem(p)).collect();
        assert_eq!(un, vec!["alicex", "carol"]);
    }
}
