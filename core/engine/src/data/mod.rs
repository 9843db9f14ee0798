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
//! cropped, as musubi-tuner's `resize_image_to_bucket` does ([`image_io::Fit::Bucket`]) — or
//! to its own size when the example says so ([`Example::sizes`]: musubi's
//! `control_resolution` / `no_resize_control` controls).
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
//!   (`multiple_target = true`, video datasets) are errors saying so; FramePack-only keys are
//!   accepted and ignored (a warning). `control_resolution` and `no_resize_control` size the
//!   controls as musubi-tuner does ([`musubi`]'s module docs): such an image is fitted to its
//!   own size ([`Example::sizes`]), not the bucket.
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

// One module per job; their items are re-exported here so `crate::data::X` paths stay as they were.
mod batch;
mod image_cache;
mod report;
pub mod roles;
mod scan;
mod split;

pub use batch::{epoch_batches, epoch_order, make_batch, Batch};
pub use image_cache::ImageCache;
pub(crate) use scan::{parallel_map, Scan};
pub(crate) use split::{assemble, uses_fractions};
pub use split::{split_counts, split_examples};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::DataConfig;
use crate::error::{EngineError, Result};
use bucket::BucketSelector;
use image_io::Fit;

/// The values `data.layout` takes.
pub const LAYOUTS: &[&str] = &["bundles", "drip", "pairs", "musubi"];

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
    /// `(width, height)` every image of this example is fitted to, unless `sizes` says otherwise.
    pub bucket: (u32, u32),
    /// `(width, height)` of the images fitted to their own size instead of `bucket`, by role
    /// (musubi's controls under `control_resolution` / `no_resize_control`); empty elsewhere.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sizes: BTreeMap<String, (u32, u32)>,
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

    /// The `(width, height)` the image of `role` is fitted to: its own size, else the bucket.
    pub fn size_of(&self, role: &str) -> (u32, u32) {
        self.sizes.get(role).copied().unwrap_or(self.bucket)
    }

    /// Every image's role and size, in order: examples batched together must agree (musubi
    /// keys its batches by the target bucket plus every control's shape).
    pub fn shapes(&self) -> Vec<(&str, (u32, u32))> {
        self.images.iter().map(|(r, _)| (r.as_str(), self.size_of(r))).collect()
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

    /// How the image of `role` of `example` is fitted.
    pub fn fit(&self, example: &Example, role: &str) -> Fit {
        image_cache::fit_for(self.square_crop, example.size_of(role))
    }

    /// Buckets with their example counts, sorted.
    pub fn bucket_counts(&self) -> BTreeMap<(u32, u32), usize> {
        let mut m = BTreeMap::new();
        for e in self.all() {
            *m.entry(e.bucket).or_insert(0) += 1;
        }
        m
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

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};

    use super::Example;

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

    /// An example with one image per role (paths that need not exist) and a caption.
    pub fn ex(id: &str, bucket: (u32, u32), roles: &[&str]) -> Example {
        Example {
            id: id.into(),
            images: roles.iter().map(|r| (r.to_string(), PathBuf::from(format!("{id}-{r}.png")))).collect(),
            texts: vec![("caption".into(), format!("caption of {id}"))],
            bucket,
            sizes: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
