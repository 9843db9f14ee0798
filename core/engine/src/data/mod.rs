//! Datasets: every seed's layout as a tagged `data.layout`, each yielding [`Example`]s of
//! **named** images and texts, bucketed by aspect ratio as musubi-tuner buckets, split
//! deterministically by the run seed and batched one bucket at a time.
//!
//! | `data.layout` | on disk | seed |
//! |---|---|---|
//! | `bundles` | `<root>/<bundle>/char_*/img_*` | 000 (DTBack's identity trainer) |
//! | `drip` | `<root>/person_*/{ref_face.jpg, orig.jpg, prompt.txt}` | 002 (DRIP) |
//! | `pairs` | `<datasets_folder>/<attr>/{source,target}/<name>` | 003 (PairEdit) |
//! | `musubi` | a musubi-tuner `dataset.toml` (`--dataset_config`), read as is | 004 (musubi-tuner) |
//!
//! # Roles
//!
//! So that a trainer can use any layout, every example names its images and texts by role:
//!
//! | role | `bundles` | `drip` | `pairs` | `musubi` |
//! |---|---|---|---|---|
//! | image `target` (what the model should produce) | every image but the first of a `char_*` | `orig.jpg` | `target/<name>` | the `image_directory` image |
//! | image `reference` (identity reference) | the alphabetically first image of the `char_*` | `ref_face.jpg` | `source/<name>` | the first control image, if any |
//! | image `control`, `control_1`, … | — | — | `source/<name>` (as `control`) | the control images in musubi-tuner's order (`control` = its `control_0`) |
//! | text `caption` | — | `prompt.txt` | `<name><caption_extension>` beside the target (else beside the source), else the attribute name | `<stem><caption_extension>` (or the JSONL `caption`) |
//! | text `attribute` | — | — | the attribute folder name | — |
//!
//! # Buckets and resizing
//!
//! [`bucket::BucketSelector`] is musubi-tuner's: buckets of the same area as `resolution` in
//! steps of `bucket_reso_steps` (16), the bucket of nearest aspect ratio for each example's
//! **target** image, `bucket_no_upscale` keeping small images at their size (rounded down to
//! the step). With bucketing off there is one bucket, the resolution. Every image of an
//! example (target, reference, controls) is resized to cover the example's bucket and centre
//! cropped, as musubi-tuner's `resize_image_to_bucket` does ([`image_io::Fit::Bucket`]).
//! `bundles` with bucketing off and no `resolution` keeps the historic loader: square
//! `image_size` crops ([`image_io::Fit::SquareCrop`]); use [`ImageCache::for_dataset`] to get
//! that rule.
//!
//! # Bad input
//!
//! Nothing crashes a scan: every bad file is a [`Problem`] naming its path, and the item it
//! belongs to is left out ([`Severity::Error`]) or kept with a note ([`Severity::Warning`]).
//! In every layout: unreadable or undecodable images, truncated JPEG/PNG files, images whose
//! shorter side is below `min_image_side`, formats this build cannot decode, dangling symbolic
//! links. Per layout (the choice follows what the seed's own tool does):
//!
//! - `bundles`: a `char_*` with fewer than `min_images_per_char` usable images is left out
//!   (seed 000); characters beyond `max_chars_per_bundle` are a warning.
//! - `drip`: a person folder without `ref_face.*`, `orig.*` or `prompt.txt` is left out (DRIP
//!   reads all three and would stop with an error); an empty prompt is a warning (kept).
//!   Subfolders holding none of the three files are a warning.
//! - `pairs`: a source without a target of the same stem, or a target without a source, is
//!   left out (PairEdit pairs by sorted position and would silently mis-pair); two files of
//!   the same stem in one folder are ambiguous and left out; a listed attribute folder that is
//!   missing, or lacks `source/` or `target/`, is an error.
//! - `musubi`: an image without its caption file is left out (musubi-tuner's `glob_images`
//!   drops it silently; here it is reported); with `control_directory`, an image without
//!   control images is left out (musubi-tuner stops with "Could not find matching control
//!   images"); a control image matching no image is a warning (musubi-tuner ignores it); a
//!   control whose suffix after `_` is not a number is an error for that image (musubi-tuner
//!   raises "Invalid digits suffix"). Unknown keys in `dataset.toml` are errors naming the file
//!   and the key; keys musubi-tuner knows but this trainer does not implement
//!   (`multiple_target = true`, `no_resize_control = true`, `control_resolution`, video
//!   datasets) are errors saying so; FramePack-only keys are accepted and ignored (a warning).
//!
//! # Splits
//!
//! `data.split = "auto"`: `bundles`, `drip` and `pairs` hold out `val_fraction` and
//! `test_fraction` (sorted, shuffled by the run seed, cut); `musubi` trains on everything (as
//! musubi-tuner does). `"fractions"` applies the fractions to every layout, `"none"` to none.
//! `num_repeats` repeats training examples only (ids `<id>#2`, `<id>#3`, …).

pub mod bucket;
pub mod bundles;
pub mod drip;
pub mod image_io;
pub mod musubi;
pub mod pairs;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use likeness_abi::CpuTensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::DataConfig;
use crate::error::{EngineError, Result};
use bucket::BucketSelector;
use image_io::{Fit, ImageInfo, ImageProblem};

/// The values `data.layout` takes.
pub const LAYOUTS: &[&str] = &["bundles", "drip", "pairs", "musubi"];

/// Role names (see the module docs).
pub mod roles {
    pub const TARGET: &str = "target";
    pub const REFERENCE: &str = "reference";
    pub const CONTROL: &str = "control";
    pub const CAPTION: &str = "caption";
    pub const ATTRIBUTE: &str = "attribute";

    /// `control` for the first control image, then `control_1`, `control_2`, … (musubi-tuner's
    /// `control_0`, `control_1`, …).
    pub fn control(i: usize) -> String {
        if i == 0 {
            CONTROL.to_string()
        } else {
            format!("{CONTROL}_{i}")
        }
    }
}

/// `data.resolution`: `512` (square) or `[width, height]`, as musubi-tuner's `resolution`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Resolution {
    Square(u32),
    Size([u32; 2]),
}

impl Resolution {
    /// `(width, height)`.
    pub fn size(self) -> (u32, u32) {
        match self {
            Resolution::Square(s) => (s, s),
            Resolution::Size([w, h]) => (w, h),
        }
    }
}

/// One training example: named images and texts, and its bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Example {
    /// Unique within the dataset, stable across scans (`0/char_00001/img_00002.jpg`,
    /// `person_001`, `age/7000`, `0/image1`; repeats add `#2`, `#3`, …).
    pub id: String,
    /// `(role, path)`, `target` first (see the module docs for the roles).
    pub images: Vec<(String, PathBuf)>,
    /// `(role, text)`.
    pub texts: Vec<(String, String)>,
    /// `(width, height)` every image of this example is fitted to.
    pub bucket: (u32, u32),
}

impl Example {
    /// The image of `role`.
    pub fn image(&self, role: &str) -> Option<&Path> {
        self.images.iter().find(|(r, _)| r == role).map(|(_, p)| p.as_path())
    }

    /// The text of `role`.
    pub fn text(&self, role: &str) -> Option<&str> {
        self.texts.iter().find(|(r, _)| r == role).map(|(_, t)| t.as_str())
    }

    /// Role names of the images, then of the texts: examples batched together must agree.
    pub fn signature(&self) -> (Vec<&str>, Vec<&str>) {
        (self.images.iter().map(|(r, _)| r.as_str()).collect(), self.texts.iter().map(|(r, _)| r.as_str()).collect())
    }
}

/// How bad a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Noted; nothing was left out because of bad input (or it was left out on purpose, by
    /// configuration).
    Warning,
    /// Bad input: the file, and the example it belongs to, were left out.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// A file (or folder) the scan reports, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub path: PathBuf,
    pub message: String,
    pub severity: Severity,
}

/// One part of a dataset with its own settings: a musubi `[[datasets]]` entry, a pairs
/// attribute, a bundle; `settings` are shown by `host data check`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
    /// Examples it yielded (before repeats).
    pub examples: usize,
    pub settings: BTreeMap<String, Value>,
}

/// A scanned, bucketed and split dataset.
#[derive(Debug, Clone)]
pub struct DataSet {
    /// One of [`LAYOUTS`].
    pub layout: String,
    /// The dataset root, or the `dataset.toml` for `musubi`.
    pub root: PathBuf,
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub test: Vec<Example>,
    /// Everything reported while scanning, sorted by path.
    pub problems: Vec<Problem>,
    /// The bucket selector of the layout (for `musubi`, the first dataset's; each source's
    /// own is in its settings).
    pub buckets: BucketSelector,
    /// Whether images are fitted with the historic square crop ([`Fit::SquareCrop`]) rather
    /// than musubi-tuner's bucket resize (only `bundles` without bucketing or resolution).
    pub square_crop: bool,
    /// The batch size the dataset itself asks for (musubi-tuner's `batch_size`, when every
    /// `[[datasets]]` entry agrees).
    pub batch_size: Option<usize>,
    /// The parts of the dataset and their settings.
    pub sources: Vec<Source>,
    /// Size of every usable image.
    pub image_sizes: BTreeMap<PathBuf, (u32, u32)>,
    /// Split seed and rule (`fractions` or `none`).
    pub seed: u64,
    pub split: String,
}

impl DataSet {
    /// Every example: train, then val, then test.
    pub fn all(&self) -> impl Iterator<Item = &Example> {
        self.train.iter().chain(&self.val).chain(&self.test)
    }

    /// Number of examples over all splits.
    pub fn len(&self) -> usize {
        self.train.len() + self.val.len() + self.test.len()
    }

    /// Whether no example is usable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every image role some example has.
    pub fn image_roles(&self) -> BTreeSet<String> {
        self.all().flat_map(|e| e.images.iter().map(|(r, _)| r.clone())).collect()
    }

    /// Every text role some example has.
    pub fn text_roles(&self) -> BTreeSet<String> {
        self.all().flat_map(|e| e.texts.iter().map(|(r, _)| r.clone())).collect()
    }

    /// Problems of `severity`.
    pub fn problems_of(&self, severity: Severity) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.severity == severity)
    }

    /// How an image of `example` is fitted.
    pub fn fit(&self, example: &Example) -> Fit {
        fit_for(self.square_crop, example.bucket)
    }

    /// Buckets with their example counts, sorted.
    pub fn bucket_counts(&self) -> BTreeMap<(u32, u32), usize> {
        let mut m = BTreeMap::new();
        for e in self.all() {
            *m.entry(e.bucket).or_insert(0) += 1;
        }
        m
    }

    /// Examples per image role, per text role, with a non-empty caption, with controls, and
    /// the number of control images.
    fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.all() {
            for (r, p) in &e.images {
                *c.images.entry(r.clone()).or_insert(0) += 1;
                c.files.entry(r.clone()).or_default().insert(p.clone());
            }
            for (r, t) in &e.texts {
                *c.texts.entry(r.clone()).or_insert(0) += 1;
                if r == roles::CAPTION && !t.trim().is_empty() {
                    c.captions += 1;
                }
            }
            let n = e.images.iter().filter(|(r, _)| r == roles::CONTROL || r.starts_with("control_")).count();
            if n > 0 {
                c.with_controls += 1;
                c.controls += n;
            }
        }
        c
    }

    /// Summary for logs: counts, roles, buckets, splits and the first problems.
    pub fn describe(&self) -> String {
        self.report(Some(10))
    }

    /// [`describe`](Self::describe) listing every problem (`host data check`).
    pub fn describe_all(&self) -> String {
        self.report(None)
    }

    fn report(&self, max_problems: Option<usize>) -> String {
        let c = self.counts();
        let mut s = String::new();
        let errors = self.problems_of(Severity::Error).count();
        let _ = writeln!(
            s,
            "dataset {} (layout {}): {} example(s): {} train, {} val, {} test (split {}, seed {})",
            self.root.display(),
            self.layout,
            self.len(),
            self.train.len(),
            self.val.len(),
            self.test.len(),
            self.split,
            self.seed
        );
        let list = |m: &BTreeMap<String, usize>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
        };
        let per_role = c
            .images
            .iter()
            .map(|(k, v)| format!("{k} {v} ({} file(s))", c.files.get(k).map_or(0, BTreeSet::len)))
            .collect::<Vec<_>>();
        let _ = writeln!(
            s,
            "images per role (examples): {}",
            if per_role.is_empty() { "none".to_string() } else { per_role.join(", ") }
        );
        let _ = writeln!(s, "texts per role: {}", list(&c.texts));
        let _ = writeln!(s, "captions: {} example(s) with a non-empty caption", c.captions);
        let _ = writeln!(
            s,
            "controls: {} example(s) with control images, {} control image(s)",
            c.with_controls, c.controls
        );
        let b = self.bucket_counts();
        let _ = writeln!(
            s,
            "buckets ({}; resolution {}x{}, bucketing {}{}): {}",
            if self.square_crop { "square crops" } else { "width x height: examples" },
            self.buckets.resolution.0,
            self.buckets.resolution.1,
            if self.buckets.enable_bucket { "on" } else { "off" },
            if self.buckets.no_upscale { ", no upscale" } else { "" },
            if b.is_empty() {
                "none".into()
            } else {
                b.iter().map(|((w, h), n)| format!("{w}x{h}: {n}")).collect::<Vec<_>>().join(", ")
            }
        );
        if let Some(bs) = self.batch_size {
            let _ = writeln!(s, "batch size asked by the dataset: {bs}");
        }
        if self.sources.len() > 1 || self.layout == "musubi" {
            for src in &self.sources {
                let settings = src.settings.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ");
                let _ = writeln!(
                    s,
                    "source {} ({}): {} example(s); {settings}",
                    src.name,
                    src.path.display(),
                    src.examples
                );
            }
        }
        let _ = write!(
            s,
            "problems: {} ({} error(s): left out, {} warning(s))",
            self.problems.len(),
            errors,
            self.problems.len() - errors
        );
        let show = max_problems.unwrap_or(usize::MAX);
        for p in self.problems.iter().take(show) {
            let _ = write!(s, "\n  {:<7} {}: {}", p.severity.as_str(), p.path.display(), p.message);
        }
        if self.problems.len() > show {
            let _ = write!(s, "\n  ... and {} more (host data check lists them all)", self.problems.len() - show);
        }
        s
    }

    /// The machine-readable report of `host data check --json`.
    pub fn report_json(&self) -> Value {
        let c = self.counts();
        let split_of = |e: &Example, name: &str| {
            let mut v = json!({
                "id": e.id,
                "split": name,
                "bucket": [e.bucket.0, e.bucket.1],
                "images": e.images.iter().map(|(r, p)| (r.clone(), json!(p))).collect::<serde_json::Map<_, _>>(),
                "texts": e.texts.iter().map(|(r, t)| (r.clone(), json!(t))).collect::<serde_json::Map<_, _>>(),
            });
            if let Some((w, h)) = e.image(roles::TARGET).and_then(|p| self.image_sizes.get(p)) {
                v["size"] = json!([w, h]);
            }
            v
        };
        let examples: Vec<Value> = self
            .train
            .iter()
            .map(|e| split_of(e, "train"))
            .chain(self.val.iter().map(|e| split_of(e, "val")))
            .chain(self.test.iter().map(|e| split_of(e, "test")))
            .collect();
        json!({
            "layout": self.layout,
            "root": self.root,
            "usable": !self.is_empty(),
            "counts": {
                "examples": self.len(),
                "train": self.train.len(),
                "val": self.val.len(),
                "test": self.test.len(),
                "images_per_role": c.images,
                "files_per_role": c.files.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
                "texts_per_role": c.texts,
                "captions": c.captions,
                "examples_with_controls": c.with_controls,
                "control_images": c.controls,
                "errors": self.problems_of(Severity::Error).count(),
                "warnings": self.problems_of(Severity::Warning).count(),
            },
            "buckets": self.bucket_counts().iter().map(|((w, h), n)| json!({"width": w, "height": h, "count": n})).collect::<Vec<_>>(),
            "bucketing": self.buckets,
            "square_crop": self.square_crop,
            "batch_size": self.batch_size,
            "split": self.split,
            "seed": self.seed,
            "sources": self.sources,
            "problems": self.problems,
            "examples": examples,
        })
    }
}

#[derive(Default)]
struct Counts {
    images: BTreeMap<String, usize>,
    files: BTreeMap<String, BTreeSet<PathBuf>>,
    texts: BTreeMap<String, usize>,
    captions: usize,
    with_controls: usize,
    controls: usize,
}

fn fit_for(square_crop: bool, (w, h): (u32, u32)) -> Fit {
    if square_crop && w == h {
        Fit::SquareCrop(w)
    } else {
        Fit::Bucket(w, h)
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration helpers (the serde defaults of the `DataConfig` fields this module added)

pub fn default_source_folder() -> String {
    "source".into()
}
pub fn default_target_folder() -> String {
    "target".into()
}
pub fn default_caption_extension() -> String {
    ".txt".into()
}
pub fn default_reso_steps() -> u32 {
    16
}
pub fn default_split() -> String {
    "auto".into()
}
pub fn default_true() -> bool {
    true
}

/// A `[data]` config with every default and `root` (what `host data check` starts from).
pub fn default_config(root: &Path) -> DataConfig {
    serde_json::from_value(json!({ "root": root })).expect("DataConfig defaults")
}

/// A `[data]` config for `host data check`: `root`, the layout (guessed by [`guess_layout`]
/// when `None`) and `key=value` settings (values parsed as TOML, else taken as strings), e.g.
/// `enable_bucket=true`, `resolution=[960, 544]`, `attributes=["age"]`.
pub fn config_with(root: &Path, layout: Option<&str>, set: &[String]) -> Result<DataConfig> {
    let mut m = serde_json::Map::new();
    m.insert("root".into(), json!(root));
    m.insert("layout".into(), json!(layout.unwrap_or_else(|| guess_layout(root))));
    for kv in set {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            EngineError::Config(format!("--set {kv}: expected key=value, e.g. --set enable_bucket=true"))
        })?;
        let k = k.trim().strip_prefix("data.").unwrap_or(k.trim());
        let v = match toml::from_str::<toml::Table>(&format!("v = {}", v.trim())) {
            Ok(t) => serde_json::to_value(&t["v"]).unwrap_or_else(|_| json!(v.trim())),
            Err(_) => json!(v.trim()),
        };
        m.insert(k.to_string(), v);
    }
    serde_json::from_value(Value::Object(m)).map_err(|e| EngineError::Config(format!("--set: {e}")))
}

/// The layout of `path` when none is given: a `.toml` file → `musubi`; a folder holding
/// `dataset.toml` → `musubi`; `person_*/` folders (or folders holding `ref_face.*`) → `drip`;
/// `<attr>/source/` → `pairs`; otherwise `bundles`.
pub fn guess_layout(path: &Path) -> &'static str {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
        return "musubi";
    }
    if path.join("dataset.toml").is_file() {
        return "musubi";
    }
    let Ok(l) = image_io::list_dir(path) else {
        return "bundles";
    };
    let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if l.dirs.iter().any(|d| name(d).starts_with("person_") || drip::find_file(d, "ref_face").is_some()) {
        return "drip";
    }
    if l.dirs.iter().any(|d| d.join("source").is_dir() || d.join("target").is_dir()) {
        return "pairs";
    }
    "bundles"
}

fn validate(cfg: &DataConfig) -> Result<()> {
    let bad = |m: String| Err(EngineError::Config(m));
    if !LAYOUTS.contains(&cfg.layout.as_str()) {
        return bad(format!("`data.layout` is `{}`; expected one of {}", cfg.layout, LAYOUTS.join(", ")));
    }
    let frac_ok = |f: f64| f.is_finite() && (0.0..1.0).contains(&f);
    if !frac_ok(cfg.val_fraction) || !frac_ok(cfg.test_fraction) || cfg.val_fraction + cfg.test_fraction >= 1.0 {
        return bad(format!(
            "`data.val_fraction` ({}) and `data.test_fraction` ({}) must each be in [0, 1) and sum to less than 1",
            cfg.val_fraction, cfg.test_fraction
        ));
    }
    if cfg.image_size == 0 {
        return bad("`data.image_size` must be at least 1".into());
    }
    if !["auto", "fractions", "none"].contains(&cfg.split.as_str()) {
        return bad(format!("`data.split` is `{}`; expected auto, fractions or none", cfg.split));
    }
    Ok(())
}

/// The bucket selector of the non-musubi layouts: `data.resolution` (default `image_size`
/// square), `enable_bucket`, `bucket_no_upscale`, `bucket_reso_steps`.
pub fn selector_for(cfg: &DataConfig) -> Result<BucketSelector> {
    let reso = cfg.resolution.map(Resolution::size).unwrap_or((cfg.image_size, cfg.image_size));
    BucketSelector::new(reso, cfg.enable_bucket, cfg.bucket_no_upscale, cfg.bucket_reso_steps)
        .map_err(|e| EngineError::Config(format!("`data.resolution`: {e}")))
}

/// Scans the dataset `cfg` describes, reports every problem, buckets and splits it by `seed`.
/// Fails only when the dataset cannot be read at all (missing root, unreadable or invalid
/// `dataset.toml`, bad settings); a dataset with no usable example is returned (empty) so its
/// problems can be shown. [`open`] is the variant that also refuses an empty dataset.
pub fn inspect(cfg: &DataConfig, seed: u64) -> Result<DataSet> {
    validate(cfg)?;
    let mut ds = match cfg.layout.as_str() {
        "bundles" => bundles::open(cfg, seed)?,
        "drip" => drip::open(cfg, seed)?,
        "pairs" => pairs::open(cfg, seed)?,
        "musubi" => musubi::open(cfg, seed)?,
        other => return Err(EngineError::Config(format!("unknown data.layout `{other}`"))),
    };
    ds.problems.sort();
    ds.problems.dedup();
    for p in &ds.problems {
        match p.severity {
            Severity::Error => tracing::warn!(path = %p.path.display(), "{}", p.message),
            Severity::Warning => tracing::debug!(path = %p.path.display(), "{}", p.message),
        }
    }
    Ok(ds)
}

/// Opens the dataset `cfg` describes ([`inspect`]) and fails when no example is usable, with
/// the first problems in the message. The split is deterministic in `seed`.
pub fn open(cfg: &DataConfig, seed: u64) -> Result<DataSet> {
    let ds = inspect(cfg, seed)?;
    if ds.is_empty() {
        let first: Vec<String> =
            ds.problems_of(Severity::Error).take(3).map(|p| format!("{}: {}", p.path.display(), p.message)).collect();
        return Err(EngineError::Dataset {
            root: ds.root.clone(),
            message: format!(
                "no usable example (layout {}){}; {}",
                ds.layout,
                if first.is_empty() { String::new() } else { format!(", e.g. {}", first.join("; ")) },
                expected_layout(&ds.layout)
            ),
        });
    }
    Ok(ds)
}

/// What a layout expects on disk, for error messages.
pub fn expected_layout(layout: &str) -> &'static str {
    match layout {
        "bundles" => bundles::EXPECTED_LAYOUT,
        "drip" => drip::EXPECTED_LAYOUT,
        "pairs" => pairs::EXPECTED_LAYOUT,
        "musubi" => musubi::EXPECTED_LAYOUT,
        _ => "see `host data check --help`",
    }
}

// ---------------------------------------------------------------------------------------------
// The shared scanning context of the layouts

/// Problems, image checks (each file probed once, in parallel) and sizes, for one scan.
pub(crate) struct Scan<'a> {
    pub cfg: &'a DataConfig,
    pub problems: Vec<Problem>,
    pub sizes: BTreeMap<PathBuf, (u32, u32)>,
    probed: HashMap<PathBuf, std::result::Result<ImageInfo, ImageProblem>>,
    reported: HashSet<PathBuf>,
}

impl<'a> Scan<'a> {
    pub fn new(cfg: &'a DataConfig) -> Self {
        Scan { cfg, problems: Vec::new(), sizes: BTreeMap::new(), probed: HashMap::new(), reported: HashSet::new() }
    }

    pub fn error(&mut self, path: impl Into<PathBuf>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into(), severity: Severity::Error });
    }

    pub fn warn(&mut self, path: impl Into<PathBuf>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into(), severity: Severity::Warning });
    }

    /// Lists `dir`, reporting its dangling links and unreadable entries (errors); `None`
    /// (reported) when the folder cannot be listed.
    pub fn list(&mut self, dir: &Path) -> Option<image_io::Listing> {
        match image_io::list_dir(dir) {
            Ok(l) => {
                for (p, m) in &l.broken {
                    if self.reported.insert(p.clone()) {
                        self.error(p, m.clone());
                    }
                }
                Some(l)
            }
            Err(e) => {
                self.error(dir, format!("cannot list: {e}"));
                None
            }
        }
    }

    /// Probes `paths` not probed yet, on all CPUs.
    pub fn prefetch<'p>(&mut self, paths: impl IntoIterator<Item = &'p PathBuf>) {
        let todo: Vec<PathBuf> = paths
            .into_iter()
            .filter(|p| !self.probed.contains_key(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let verify = self.cfg.verify_decode;
        for (p, r) in todo.iter().zip(parallel_map(&todo, |p| image_io::probe(p, verify))) {
            self.probed.insert(p.clone(), r);
        }
    }

    /// The size of a usable image; `None` (reported once) when it cannot be read or decoded
    /// or its shorter side is below `min_image_side`.
    pub fn image(&mut self, path: &Path) -> Option<(u32, u32)> {
        if !self.probed.contains_key(path) {
            let r = image_io::probe(path, self.cfg.verify_decode);
            self.probed.insert(path.to_path_buf(), r);
        }
        let msg = match &self.probed[path] {
            Ok(i) if i.width.min(i.height) < self.cfg.min_image_side => format!(
                "too small: {}x{}, the shorter side must be at least {} (data.min_image_side)",
                i.width, i.height, self.cfg.min_image_side
            ),
            Ok(i) => {
                let s = (i.width, i.height);
                self.sizes.insert(path.to_path_buf(), s);
                return Some(s);
            }
            Err(e) => e.to_string(),
        };
        if self.reported.insert(path.to_path_buf()) {
            self.error(path, msg);
        }
        None
    }

    /// The bucket of an image of `size`; `None` (reported) when `bucket_no_upscale` rounds it
    /// to zero.
    pub fn bucket(&mut self, sel: &BucketSelector, path: &Path, size: (u32, u32)) -> Option<(u32, u32)> {
        let b = sel.select(size);
        if b.0 == 0 || b.1 == 0 {
            self.error(
                path,
                format!(
                    "{}x{} is smaller than one bucket step ({}) with bucket_no_upscale: its bucket would be {}x{}",
                    size.0, size.1, sel.reso_steps, b.0, b.1
                ),
            );
            return None;
        }
        Some(b)
    }

    /// A UTF-8 text file, trimmed; `None` (reported as an error) when unreadable.
    pub fn read_text(&mut self, path: &Path) -> Option<String> {
        match std::fs::read(path) {
            Ok(b) => match String::from_utf8(b) {
                Ok(s) => Some(s.trim().to_string()),
                Err(e) => {
                    self.error(path, format!("not UTF-8 text: {e}"));
                    None
                }
            },
            Err(e) => {
                self.error(path, format!("cannot read: {e}"));
                None
            }
        }
    }
}

/// `f` over `items` on up to one thread per CPU, results in order.
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(items.len()).max(1);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_iter().map(|r| r.expect("every item mapped")).collect()
}

/// Whether the layout holds out validation/test examples under `data.split`.
pub(crate) fn uses_fractions(cfg: &DataConfig, layout_default: bool) -> bool {
    match cfg.split.as_str() {
        "fractions" => true,
        "none" => false,
        _ => layout_default,
    }
}

/// Builds a [`DataSet`] from examples: split by `seed` (when `split`), training examples
/// repeated by `repeats` (id → count, absent = 1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble(
    layout: &str,
    root: PathBuf,
    cfg: &DataConfig,
    seed: u64,
    split: bool,
    examples: Vec<Example>,
    scan: Scan<'_>,
    buckets: BucketSelector,
    square_crop: bool,
    sources: Vec<Source>,
    repeats: &HashMap<String, usize>,
) -> DataSet {
    let (vf, tf) = if split { (cfg.val_fraction, cfg.test_fraction) } else { (0.0, 0.0) };
    let (mut train, val, test) = split_examples(examples, vf, tf, seed);
    if repeats.values().any(|&r| r != 1) {
        let mut out = Vec::with_capacity(train.len());
        for e in train {
            let n = repeats.get(&e.id).copied().unwrap_or(1);
            for k in 1..n {
                let mut r = e.clone();
                r.id = format!("{}#{}", e.id, k + 1);
                out.push(r);
            }
            if n > 0 {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        train = out;
    }
    DataSet {
        layout: layout.into(),
        root,
        train,
        val,
        test,
        problems: scan.problems,
        buckets,
        square_crop,
        batch_size: None,
        sources,
        image_sizes: scan.sizes,
        seed,
        split: if split { "fractions".into() } else { "none".into() },
    }
}

// ---------------------------------------------------------------------------------------------
// Split, epochs, batches

/// `(n_test, n_val)` of `n` items: rounded fractions, at least one validation item when
/// `n ≥ 3` and `val_fraction > 0`, at least one training item whenever there is any.
pub fn split_counts(n: usize, val_fraction: f64, test_fraction: f64) -> (usize, usize) {
    let mut n_test = (n as f64 * test_fraction).round() as usize;
    let mut n_val = (n as f64 * val_fraction).round() as usize;
    if n >= 3 && n_val == 0 && val_fraction > 0.0 {
        n_val = 1;
    }
    while n > 0 && n_test + n_val >= n {
        if n_test > 0 && (n_test >= n_val || n_val <= 1) {
            n_test -= 1;
        } else if n_val > 0 {
            n_val -= 1;
        } else {
            break;
        }
    }
    (n_test, n_val)
}

/// Sorts `examples` by id, shuffles them by `seed` and cuts (train, val, test)
/// ([`split_counts`]).
pub fn split_examples(
    mut examples: Vec<Example>,
    val_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>, Vec<Example>) {
    examples.sort_by(|a, b| a.id.cmp(&b.id));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    let (n_test, n_val) = split_counts(examples.len(), val_fraction, test_fraction);
    let train = examples.split_off(n_test + n_val);
    let val = examples.split_off(n_test);
    (train, val, examples)
}

/// The order of `n` training examples in `epoch`: a permutation seeded by (`seed`, `epoch`), so a
/// resumed run sees exactly the order the interrupted one would have.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = epoch_rng(seed, epoch, b"epochord");
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

fn epoch_rng(seed: u64, epoch: u64, tag: &[u8; 8]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(tag);
    ChaCha8Rng::from_seed(key)
}

/// The batches of one epoch, as indices into `examples`, deterministic in (`seed`, `epoch`):
/// musubi-tuner's `BucketBatchManager` — examples grouped by bucket (and by their image and
/// text roles, so a batch stacks), each group shuffled and cut into batches of at most
/// `batch_size`, then the order of all batches shuffled. Every batch holds one bucket only;
/// every example appears exactly once. With a single group (one bucket, one role set) the
/// batches are consecutive cuts of one shuffled order that does not depend on `batch_size`,
/// so `k` micro-batches of `b` (gradient accumulation) consume exactly the examples of one
/// batch of `k·b`.
pub fn epoch_batches(examples: &[Example], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    type Key<'a> = ((u32, u32), (Vec<&'a str>, Vec<&'a str>));
    let mut groups: BTreeMap<Key<'_>, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        groups.entry((e.bucket, e.signature())).or_default().push(i);
    }
    let mut rng = epoch_rng(seed, epoch, b"buckets\0");
    let mut batches = Vec::new();
    let several = groups.len() > 1;
    for (_, mut idx) in groups {
        idx.shuffle(&mut rng);
        batches.extend(idx.chunks(bs).map(|c| c.to_vec()));
    }
    if several {
        batches.shuffle(&mut rng);
    }
    batches
}

/// Decoded, fitted images keyed by (path, fit), so each image is decoded once per run (up to
/// a memory budget, default 2 GiB; the oldest entries are dropped beyond it).
#[derive(Debug, Clone)]
pub struct ImageCache {
    images: HashMap<(PathBuf, Fit), Arc<Vec<f32>>>,
    order: VecDeque<(PathBuf, Fit)>,
    bytes: usize,
    budget: usize,
    square_crop: bool,
}

impl Default for ImageCache {
    fn default() -> Self {
        ImageCache { images: HashMap::new(), order: VecDeque::new(), bytes: 0, budget: 2 << 30, square_crop: false }
    }
}

impl ImageCache {
    /// An empty cache fitting images with musubi-tuner's bucket resize.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache fitting images as `ds` asks (the historic square crop for `bundles`
    /// without bucketing).
    pub fn for_dataset(ds: &DataSet) -> Self {
        ImageCache { square_crop: ds.square_crop, ..Self::default() }
    }

    /// Sets the memory budget in bytes.
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self
    }

    /// The CHW image at `path` square-cropped and resized to `size` (the historic bundle
    /// loader), decoded on first use.
    pub fn get(&mut self, path: &Path, size: u32) -> Result<Arc<Vec<f32>>> {
        self.get_fit(path, Fit::SquareCrop(size))
    }

    /// The CHW image at `path` fitted to `bucket` by this cache's rule.
    pub fn get_bucket(&mut self, path: &Path, bucket: (u32, u32)) -> Result<Arc<Vec<f32>>> {
        self.get_fit(path, fit_for(self.square_crop, bucket))
    }

    /// The CHW image at `path` fitted by `fit`, decoded on first use.
    pub fn get_fit(&mut self, path: &Path, fit: Fit) -> Result<Arc<Vec<f32>>> {
        let key = (path.to_path_buf(), fit);
        if let Some(img) = self.images.get(&key) {
            return Ok(img.clone());
        }
        let img = Arc::new(image_io::load(path, fit)?);
        self.insert(key, img.clone());
        Ok(img)
    }

    fn insert(&mut self, key: (PathBuf, Fit), img: Arc<Vec<f32>>) {
        self.bytes += img.len() * 4;
        self.images.insert(key.clone(), img);
        self.order.push_back(key);
        while self.bytes > self.budget && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(v) = self.images.remove(&old) {
                    self.bytes -= v.len() * 4;
                }
            }
        }
    }

    /// Decodes the images of `examples` that are not cached yet, on all CPUs.
    pub fn prefetch(&mut self, examples: &[&Example]) -> Result<()> {
        let mut todo: Vec<(PathBuf, Fit)> = Vec::new();
        let mut seen = HashSet::new();
        for e in examples {
            let fit = fit_for(self.square_crop, e.bucket);
            for (_, p) in &e.images {
                let k = (p.clone(), fit);
                if !self.images.contains_key(&k) && seen.insert(k.clone()) {
                    todo.push(k);
                }
            }
        }
        for (k, r) in todo.iter().zip(parallel_map(&todo, |(p, f)| image_io::load(p, *f))) {
            self.insert(k.clone(), Arc::new(r?));
        }
        Ok(())
    }

    /// Number of cached images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Drops every cached image (frees memory).
    pub fn clear(&mut self) {
        self.images.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

/// A batch ready for a model: each image role as an NCHW RGB `f32` tensor in [0, 1], each
/// text role as one string per sample, and the example ids.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<(String, CpuTensor<f32>)>,
    pub texts: Vec<(String, Vec<String>)>,
    pub ids: Vec<String>,
}

impl Batch {
    /// The tensor of image role `role`.
    pub fn image(&self, role: &str) -> Option<&CpuTensor<f32>> {
        self.images.iter().find(|(r, _)| r == role).map(|(_, t)| t)
    }

    /// The strings of text role `role`.
    pub fn text(&self, role: &str) -> Option<&[String]> {
        self.texts.iter().find(|(r, _)| r == role).map(|(_, t)| t.as_slice())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Loads (through `cache`) and stacks `examples`, which must share one bucket and the same
/// image and text roles (as [`epoch_batches`] groups them).
pub fn make_batch(examples: &[&Example], cache: &mut ImageCache) -> Result<Batch> {
    let first =
        examples.first().ok_or_else(|| EngineError::Other("make_batch: no examples given (batch size 0)".into()))?;
    let sig = first.signature();
    for e in &examples[1..] {
        if e.bucket != first.bucket {
            return Err(EngineError::Other(format!(
                "make_batch: `{}` is in bucket {}x{} but `{}` in {}x{}: a batch holds one bucket (use epoch_batches)",
                first.id, first.bucket.0, first.bucket.1, e.id, e.bucket.0, e.bucket.1
            )));
        }
        if e.signature() != sig {
            return Err(EngineError::Other(format!(
                "make_batch: `{}` has roles {:?} but `{}` has {:?}: a batch needs the same roles",
                first.id,
                sig,
                e.id,
                e.signature()
            )));
        }
    }
    cache.prefetch(examples)?;
    let (w, h) = first.bucket;
    let n = examples.len();
    let per = 3 * w as usize * h as usize;
    let mut images = Vec::with_capacity(first.images.len());
    for (k, (role, _)) in first.images.iter().enumerate() {
        let mut data = Vec::with_capacity(per * n);
        for e in examples {
            let img = cache.get_bucket(&e.images[k].1, e.bucket)?;
            data.extend_from_slice(&img);
        }
        images.push((role.clone(), CpuTensor::new(vec![n as i64, 3, h as i64, w as i64], data)));
    }
    let texts = first
        .texts
        .iter()
        .enumerate()
        .map(|(k, (role, _))| (role.clone(), examples.iter().map(|e| e.texts[k].1.clone()).collect()))
        .collect();
    Ok(Batch { images, texts, ids: examples.iter().map(|e| e.id.clone()).collect() })
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    use image::{Rgb, RgbImage};

    /// A PNG or JPEG (by extension) of `w`×`h` with a colour pattern.
    pub fn write_img(path: &Path, w: u32, h: u32, seed: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x as u8).wrapping_mul(3).wrapping_add(seed), (y as u8).wrapping_mul(5), seed])
        })
        .save(path)
        .unwrap();
    }

    /// A JPEG cut to two thirds of its length.
    pub fn write_truncated_jpeg(path: &Path, w: u32, h: u32) {
        let tmp = path.with_extension("full.jpg");
        write_img(&tmp, w, h, 9);
        let b = std::fs::read(&tmp).unwrap();
        std::fs::remove_file(&tmp).unwrap();
        std::fs::write(path, &b[..b.len() * 2 / 3]).unwrap();
    }

    #[cfg(unix)]
    pub fn dangling_link(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(path.with_file_name("does-not-exist.jpg"), path).unwrap();
    }

    pub fn cfg(root: &Path, layout: &str) -> crate::config::DataConfig {
        let mut c = super::default_config(root);
        c.layout = layout.into();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, bucket: (u32, u32), roles: &[&str]) -> Example {
        Example {
            id: id.into(),
            images: roles.iter().map(|r| (r.to_string(), PathBuf::from(format!("{id}-{r}.png")))).collect(),
            texts: vec![("caption".into(), format!("caption of {id}"))],
            bucket,
        }
    }

    #[test]
    fn epoch_batches_are_deterministic_single_bucket_and_complete() {
        let mut v = Vec::new();
        for i in 0..23 {
            let b = if i % 3 == 0 { (64, 32) } else { (32, 32) };
            let roles: &[&str] = if i % 5 == 0 {
                &["target", "reference", "control", "control_1"]
            } else {
                &["target", "reference", "control"]
            };
            v.push(ex(&format!("e{i:02}"), b, roles));
        }
        let a = epoch_batches(&v, 4, 7, 0);
        assert_eq!(a, epoch_batches(&v, 4, 7, 0));
        assert_ne!(a, epoch_batches(&v, 4, 7, 1));
        assert_ne!(a, epoch_batches(&v, 4, 8, 0));
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        for b in &a {
            assert!(!b.is_empty() && b.len() <= 4);
            assert!(
                b.iter().all(|&i| v[i].bucket == v[b[0]].bucket && v[i].signature() == v[b[0]].signature()),
                "{b:?}"
            );
        }
        assert!(epoch_batches(&[], 4, 1, 1).is_empty());
        assert_eq!(epoch_batches(&v[..3], 0, 1, 1).iter().map(|b| b.len()).sum::<usize>(), 3);
    }

    #[test]
    fn split_examples_is_deterministic_and_order_free() {
        let v: Vec<Example> = (0..20).map(|i| ex(&format!("x{i}"), (8, 8), &["target"])).collect();
        let mut r = v.clone();
        r.reverse();
        let a = split_examples(v.clone(), 0.15, 0.15, 3);
        assert_eq!(a, split_examples(r, 0.15, 0.15, 3));
        assert_eq!((a.0.len(), a.1.len(), a.2.len()), (14, 3, 3));
        assert_ne!(a, split_examples(v.clone(), 0.15, 0.15, 4));
        let none = split_examples(v, 0.0, 0.0, 3);
        assert_eq!(none.0.len(), 20);
        assert_eq!(split_counts(3, 0.15, 0.15), (0, 1));
        assert_eq!(split_counts(1, 0.15, 0.15), (0, 0));
        assert_eq!(split_counts(5, 0.0, 0.0), (0, 0));
    }

    #[test]
    fn make_batch_stacks_roles_and_refuses_mixed_buckets() {
        let d = tempfile::tempdir().unwrap();
        let mut e = ex("a", (32, 16), &["target", "reference"]);
        let mut f = ex("b", (32, 16), &["target", "reference"]);
        for x in [&mut e, &mut f] {
            for (i, (_, p)) in x.images.iter_mut().enumerate() {
                *p = d.path().join(format!("{}-{i}.png", x.id));
                testutil::write_img(p, 40 + 10 * i as u32, 30, i as u8);
            }
        }
        let mut cache = ImageCache::new();
        let b = make_batch(&[&e, &f], &mut cache).unwrap();
        assert_eq!(b.ids, vec!["a", "b"]);
        assert_eq!(b.image("target").unwrap().shape, vec![2, 3, 16, 32]);
        assert_eq!(b.image("reference").unwrap().shape, vec![2, 3, 16, 32]);
        assert_eq!(b.text("caption").unwrap(), &["caption of a".to_string(), "caption of b".to_string()]);
        assert_eq!(cache.len(), 4);
        let b2 = make_batch(&[&e, &f], &mut cache).unwrap();
        assert_eq!(b.images, b2.images);
        let mut g = f.clone();
        g.bucket = (16, 16);
        let err = make_batch(&[&e, &g], &mut cache).unwrap_err().to_string();
        assert!(err.contains("one bucket"), "{err}");
        let mut h = f.clone();
        h.images.pop();
        assert!(make_batch(&[&e, &h], &mut cache).unwrap_err().to_string().contains("roles"));
        assert!(make_batch(&[], &mut cache).is_err());
        // The memory budget drops old entries.
        let mut small = ImageCache::new().with_budget(3 * 32 * 16 * 4);
        make_batch(&[&e], &mut small).unwrap();
        assert_eq!(small.len(), 1);
    }

    #[test]
    fn guess_layout_by_shape() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        assert_eq!(guess_layout(&p.join("x.toml")), "musubi");
        std::fs::create_dir_all(p.join("drip/person_001")).unwrap();
        assert_eq!(guess_layout(&p.join("drip")), "drip");
        std::fs::create_dir_all(p.join("pairs/age/source")).unwrap();
        assert_eq!(guess_layout(&p.join("pairs")), "pairs");
        std::fs::create_dir_all(p.join("b/0/char_00001")).unwrap();
        assert_eq!(guess_layout(&p.join("b")), "bundles");
        std::fs::write(p.join("b/dataset.toml"), "").unwrap();
        assert_eq!(guess_layout(&p.join("b")), "musubi");
    }

    #[test]
    fn bad_settings_are_config_errors() {
        let d = tempfile::tempdir().unwrap();
        let mut c = testutil::cfg(d.path(), "nope");
        assert!(inspect(&c, 0).unwrap_err().to_string().contains("data.layout"));
        c.layout = "bundles".into();
        c.split = "half".into();
        assert!(inspect(&c, 0).unwrap_err().to_string().contains("data.split"));
        c.split = "auto".into();
        c.enable_bucket = true;
        c.resolution = Some(Resolution::Square(20));
        assert!(inspect(&c, 0).unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn config_with_parses_settings() {
        let c = config_with(
            Path::new("x.toml"),
            None,
            &["enable_bucket=true".into(), "data.resolution=[960, 544]".into(), "split=none".into()],
        )
        .unwrap();
        assert_eq!(
            (c.layout.as_str(), c.enable_bucket, c.resolution, c.split.as_str()),
            ("musubi", true, Some(Resolution::Size([960, 544])), "none")
        );
        let e = config_with(Path::new("d"), Some("drip"), &["enable_buckets=true".into()]).unwrap_err().to_string();
        assert!(e.contains("enable_buckets"), "{e}");
    }

    #[test]
    fn resolution_parses_as_musubi_writes_it() {
        #[derive(Deserialize)]
        struct T {
            r: Resolution,
        }
        assert_eq!(toml::from_str::<T>("r = 512").unwrap().r.size(), (512, 512));
        assert_eq!(toml::from_str::<T>("r = [960, 544]").unwrap().r.size(), (960, 544));
        let c = default_config(Path::new("d"));
        assert_eq!(
            (c.layout.as_str(), c.image_size, c.split.as_str(), c.bucket_reso_steps),
            ("bundles", 64, "auto", 16)
        );
        assert!(c.verify_decode && !c.enable_bucket && c.resolution.is_none());
    }
}
