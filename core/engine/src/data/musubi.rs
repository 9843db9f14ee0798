//! musubi-tuner's dataset config (seed 004's `--dataset_config path/to/dataset.toml`), read as
//! musubi-tuner reads it (kohya-ss/musubi-tuner @ 30c658c: `dataset/config_utils.py`,
//! `dataset/datasources.py`, `dataset/media_utils.py`, `docs/dataset_config.md`):
//!
//! - `[general]` holds the keys every dataset may inherit (`resolution`, `caption_extension`,
//!   `batch_size`, `num_repeats`, `enable_bucket`, `bucket_no_upscale`); each `[[datasets]]`
//!   entry may set those too (its value wins) plus `image_directory` or `image_jsonl_file`,
//!   `control_directory`, `cache_directory` and musubi-tuner's other image keys. Any other key
//!   is an error naming the file and the key (musubi-tuner's voluptuous schema refuses it too).
//!   The deprecated `flux_kontext_no_resize_control`, `qwen_image_edit_no_resize_control` and
//!   `qwen_image_edit_control_resolution` are renamed as musubi-tuner renames them.
//! - Defaults are musubi-tuner's: `resolution = [960, 544]`, `batch_size = 1`, `num_repeats =
//!   1`, bucketing off; `caption_extension` defaults to `data.caption_extension` (`.txt`;
//!   musubi-tuner has no working default). `cache_directory` defaults to the image directory
//!   and must differ between datasets (musubi-tuner stops otherwise); it is reported, latents
//!   are cached by the model plugin's `encode`, not read from it.
//! - Images: files directly in `image_directory` with musubi-tuner's extensions (any case
//!   here; names starting with `.` are skipped as Python's glob skips them), kept only with a
//!   caption file `<stem><caption_extension>` (text trimmed). JSONL: one object per line with
//!   `image_path` (or `image_path_0`), `caption` (as is), `control_path` or `control_path_<n>`.
//! - Controls (`control_directory`): musubi-tuner's matching — images are taken longest file
//!   name first; an image `<stem>` claims every control file whose name starts with `<stem>.`
//!   or `<stem>_` not claimed yet, ordered exact stem first, then by the number after the last
//!   `_` (`image1_0.png`, `image1_1.png` or `image1_0000.png`, …). All of an image's controls
//!   are used (Qwen-Image-Edit and FLUX.2 take several; FLUX.1 Kontext takes the first).
//! - Buckets: musubi-tuner's `BucketSelector` per dataset on the target image. Controls as
//!   musubi-tuner sizes them (`image_video_dataset.py:448-479`): by default resized to the
//!   target's bucket; with `control_resolution = [w, h]` (or an int) each to its own aspect
//!   bucket of area w·h ([`calculate_bucket_resolution`]); with `no_resize_control` kept at
//!   their size rounded down to the step; with both, `control_resolution` is a maximum area
//!   (a larger control gets its bucket of that area). The step is `data.bucket_reso_steps`, 16
//!   by default, the dataset's own: musubi-tuner's for Qwen-Image-Edit (`qie`) and every other
//!   image architecture but HiDream-O1 (32) — the dataset does not know the model, so a run
//!   for a 32-step model sets `data.bucket_reso_steps = 32`. One divergence: with both keys a
//!   control within the maximum area keeps its exact size in musubi-tuner (not rounded, which
//!   latents packed 2×2 cannot take); here it is rounded down to the step as without
//!   `control_resolution`. The `reference` role (the first control's file) stays at the
//!   target's bucket: it is compared with the generated image. A control's size is part of
//!   the example's batching key ([`Example::shapes`]), so a batch holds equal shapes, as
//!   musubi-tuner keys its batches by the target bucket plus every control's shape.
//! - Relative paths are resolved against the working directory, as musubi-tuner does; when
//!   that does not exist but the path exists next to the `dataset.toml`, that one is used and a
//!   warning says so.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::json;
use toml::Value;

use super::bucket::{calculate_bucket_resolution, divisible_by, BucketSelector};
use super::image_io;
use super::{roles, DataSet, Example, Scan, Source};
use crate::config::DataConfig;
use crate::error::{EngineError, Result};

/// What [`open`] expects, quoted in error messages.
pub const EXPECTED_LAYOUT: &str = "expected a musubi-tuner dataset.toml ([general] + [[datasets]] with image_directory or \
     image_jsonl_file; captions <stem>.txt beside the images; optional control_directory with <stem>.png or <stem>_0.png, <stem>_1.png …)";

/// Keys `[general]` and `[[datasets]]` both take (musubi-tuner's `DATASET_ASCENDABLE_SCHEMA`).
pub const ASCENDABLE_KEYS: &[&str] =
    &["caption_extension", "batch_size", "num_repeats", "resolution", "enable_bucket", "bucket_no_upscale"];
/// Keys only `[[datasets]]` takes (musubi-tuner's `IMAGE_DATASET_DISTINCT_SCHEMA`).
pub const IMAGE_DATASET_KEYS: &[&str] = &[
    "image_directory",
    "image_jsonl_file",
    "cache_directory",
    "control_directory",
    "multiple_target",
    "fp_latent_window_size",
    "fp_1f_clean_indices",
    "fp_1f_target_index",
    "fp_1f_no_post",
    "no_resize_control",
    "control_resolution",
];
/// musubi-tuner's video-dataset keys (`VIDEO_DATASET_DISTINCT_SCHEMA`): refused, this trainer
/// trains on images.
pub const VIDEO_DATASET_KEYS: &[&str] = &[
    "video_directory",
    "video_jsonl_file",
    "target_frames",
    "frame_extraction",
    "frame_stride",
    "frame_sample",
    "max_frames",
    "source_fps",
];
const DEPRECATED: &[(&str, &str)] = &[
    ("flux_kontext_no_resize_control", "no_resize_control"),
    ("qwen_image_edit_no_resize_control", "no_resize_control"),
    ("qwen_image_edit_control_resolution", "control_resolution"),
];

/// One `[[datasets]]` entry with `[general]` and the defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetParams {
    pub index: usize,
    pub resolution: (u32, u32),
    pub caption_extension: String,
    pub batch_size: usize,
    pub num_repeats: usize,
    pub enable_bucket: bool,
    pub bucket_no_upscale: bool,
    pub image_directory: Option<PathBuf>,
    pub image_jsonl_file: Option<PathBuf>,
    pub control_directory: Option<PathBuf>,
    pub cache_directory: Option<PathBuf>,
    /// Controls keep their size (rounded down to the step) instead of the target's bucket.
    pub no_resize_control: bool,
    /// Each control gets its own aspect bucket of this area (with `no_resize_control`: the
    /// maximum area).
    pub control_resolution: Option<(u32, u32)>,
}

/// A parsed `dataset.toml`: its datasets and the warnings reading it produced.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub path: PathBuf,
    pub datasets: Vec<DatasetParams>,
    pub warnings: Vec<(PathBuf, String)>,
}

fn closest(key: &str, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(key, c), *c))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// The `dataset.toml` `cfg` points at: `data.dataset_config`, else `data.root` (a `.toml` file,
/// or a folder holding `dataset.toml`).
pub fn config_path(cfg: &DataConfig) -> PathBuf {
    let p = cfg.dataset_config.clone().unwrap_or_else(|| cfg.root.clone());
    if p.is_dir() {
        p.join("dataset.toml")
    } else {
        p
    }
}

/// musubi-tuner's `normalize_deprecated_keys`.
fn normalize(t: &mut toml::Table, section: &str, path: &Path, warnings: &mut Vec<(PathBuf, String)>) {
    for (old, new) in DEPRECATED {
        if let Some(v) = t.remove(*old) {
            if t.contains_key(*new) {
                warnings.push((
                    path.to_path_buf(),
                    format!("deprecated key `{section}.{old}` ignored because `{new}` is set"),
                ));
            } else {
                warnings.push((path.to_path_buf(), format!("deprecated key `{section}.{old}`: use `{new}`")));
                t.insert(new.to_string(), v);
            }
        }
    }
}

/// Reads and checks a `dataset.toml` (see the module docs). Errors name the file and the key.
pub fn read_config(path: &Path, default_caption_extension: &str) -> Result<DatasetConfig> {
    let cerr = |m: String| EngineError::Config(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| {
        EngineError::Config(format!(
            "{}: cannot read the musubi-tuner dataset config: {e} ({EXPECTED_LAYOUT})",
            path.display()
        ))
    })?;
    let doc: toml::Table = toml::from_str(&text).map_err(|e| cerr(format!("not valid TOML: {e}")))?;
    let mut warnings = Vec::new();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    for k in doc.keys() {
        if k != "general" && k != "datasets" {
            let hint =
                closest(k, &["general", "datasets"]).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            return Err(cerr(format!("unknown key `{k}` (the top level holds only [general] and [[datasets]]){hint}")));
        }
    }
    let general = read_general(&doc, path, &mut warnings)?;
    let entries = match doc.get("datasets") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(v) => {
            return Err(cerr(format!("`datasets` must be an array of tables ([[datasets]]), found {}", v.type_str())))
        }
    };
    let mut datasets = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let Value::Table(mut t) = e else {
            return Err(cerr(format!("`datasets[{i}]` must be a table ([[datasets]])")));
        };
        normalize(&mut t, &format!("datasets[{i}]"), path, &mut warnings);
        let entry = Entry { i, t: &t, general: &general, path, base: &base };
        datasets.push(entry.params(default_caption_extension, &mut warnings)?);
    }
    let mut seen: HashMap<Option<PathBuf>, usize> = HashMap::new();
    for d in &datasets {
        if let Some(j) = seen.insert(d.cache_directory.clone(), d.index) {
            return Err(cerr(format!(
                "datasets[{j}] and datasets[{}] share the cache directory {} (musubi-tuner requires one per dataset; it defaults to the image directory)",
                d.index,
                d.cache_directory.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none)".into())
            )));
        }
    }
    Ok(DatasetConfig { path: path.to_path_buf(), datasets, warnings })
}

/// `[general]`, its deprecated keys renamed; a key it does not take is an error.
fn read_general(doc: &toml::Table, path: &Path, warnings: &mut Vec<(PathBuf, String)>) -> Result<toml::Table> {
    let cerr = |m: String| EngineError::Config(format!("{}: {m}", path.display()));
    let mut general = match doc.get("general") {
        None => toml::Table::new(),
        Some(Value::Table(t)) => t.clone(),
        Some(v) => return Err(cerr(format!("`general` must be a table ([general]), found {}", v.type_str()))),
    };
    normalize(&mut general, "general", path, warnings);
    for k in general.keys() {
        if !ASCENDABLE_KEYS.contains(&k.as_str()) {
            let why = if IMAGE_DATASET_KEYS.contains(&k.as_str()) || VIDEO_DATASET_KEYS.contains(&k.as_str()) {
                "; it belongs in a [[datasets]] entry".to_string()
            } else {
                closest(k, ASCENDABLE_KEYS).map(|c| format!("; did you mean `general.{c}`?")).unwrap_or_default()
            };
            return Err(cerr(format!(
                "unknown key `general.{k}` ([general] takes {}){why}",
                ASCENDABLE_KEYS.join(", ")
            )));
        }
    }
    Ok(general)
}

/// One `[[datasets]]` entry being read: its values, else `[general]`'s (musubi-tuner's
/// `search_value`), each error naming the file and the key.
struct Entry<'a> {
    i: usize,
    t: &'a toml::Table,
    general: &'a toml::Table,
    /// The `dataset.toml` and its folder.
    path: &'a Path,
    base: &'a Path,
}

impl Entry<'_> {
    fn cerr(&self, m: String) -> EngineError {
        EngineError::Config(format!("{}: {m}", self.path.display()))
    }

    /// The value of `k` and the name it was found under (`datasets[i].k` or `general.k`).
    fn get(&self, k: &str) -> Option<(&Value, String)> {
        let i = self.i;
        self.t
            .get(k)
            .map(|v| (v, format!("datasets[{i}].{k}")))
            .or_else(|| self.general.get(k).map(|v| (v, format!("general.{k}"))))
    }

    fn int(&self, k: &str, default: i64, min: i64) -> Result<i64> {
        match self.get(k) {
            None => Ok(default),
            Some((Value::Integer(n), _)) if *n >= min => Ok(*n),
            Some((Value::Integer(n), name)) => Err(self.cerr(format!("`{name}` is {n}; it must be at least {min}"))),
            Some((v, name)) => Err(self.cerr(format!("`{name}` must be an integer, found {}", v.type_str()))),
        }
    }

    fn boolean(&self, k: &str) -> Result<bool> {
        match self.get(k) {
            None => Ok(false),
            Some((Value::Boolean(b), _)) => Ok(*b),
            Some((v, name)) => Err(self.cerr(format!("`{name}` must be true or false, found {}", v.type_str()))),
        }
    }

    fn string(&self, k: &str) -> Result<Option<String>> {
        match self.get(k) {
            None => Ok(None),
            Some((Value::String(s), _)) => Ok(Some(s.clone())),
            Some((v, name)) => Err(self.cerr(format!("`{name}` must be a string, found {}", v.type_str()))),
        }
    }

    /// A resolution: an integer (square) or `[width, height]`.
    fn reso(&self, k: &str) -> Result<Option<(u32, u32)>> {
        let pos = |v: &Value| match v {
            Value::Integer(n) if *n > 0 && *n <= u32::MAX as i64 => Some(*n as u32),
            _ => None,
        };
        let Some((v, name)) = self.get(k) else { return Ok(None) };
        match v {
            Value::Integer(_) => {
                pos(v).map(|s| Some((s, s))).ok_or_else(|| self.cerr(format!("`{name}` must be a positive integer")))
            }
            Value::Array(a) if a.len() == 2 => match (pos(&a[0]), pos(&a[1])) {
                (Some(w), Some(h)) => Ok(Some((w, h))),
                _ => Err(self.cerr(format!("`{name}` must be [width, height] of positive integers"))),
            },
            _ => Err(self.cerr(format!("`{name}` must be an integer or [width, height], found {v}"))),
        }
    }

    /// A path key, resolved against the working directory as musubi-tuner does, else next to
    /// the `dataset.toml` (with a warning).
    fn path_value(&self, k: &str, warnings: &mut Vec<(PathBuf, String)>) -> Result<Option<PathBuf>> {
        let Some(s) = self.string(k)? else { return Ok(None) };
        let p = PathBuf::from(&s);
        if p.is_absolute() || p.exists() {
            return Ok(Some(p));
        }
        let q = self.base.join(&p);
        if !q.exists() {
            return Ok(Some(p));
        }
        warnings.push((
            q.clone(),
            format!(
                "`{s}` does not exist relative to the working directory (musubi-tuner's rule); using it relative to {}",
                self.path.display()
            ),
        ));
        Ok(Some(q))
    }

    /// Keys the entry may not hold: unknown ones, video datasets, and the image keys this
    /// trainer does not implement; FramePack-only keys are a warning.
    fn check_keys(&self, warnings: &mut Vec<(PathBuf, String)>) -> Result<()> {
        let i = self.i;
        let known: Vec<&str> = ASCENDABLE_KEYS.iter().chain(IMAGE_DATASET_KEYS).copied().collect();
        for k in self.t.keys() {
            if VIDEO_DATASET_KEYS.contains(&k.as_str()) {
                return Err(self.cerr(format!(
                    "`datasets[{i}].{k}`: video datasets are not supported (this trainer trains on images)"
                )));
            }
            if !known.contains(&k.as_str()) {
                let hint = closest(k, &known).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
                return Err(self.cerr(format!("unknown key `datasets[{i}].{k}`{hint}")));
            }
        }
        if self.boolean("multiple_target")? {
            return Err(self.cerr(format!(
                "`datasets[{i}].multiple_target = true` (Qwen-Image-Layered targets) is not supported"
            )));
        }
        for k in ["fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post"] {
            if self.t.contains_key(k) {
                warnings.push((self.path.to_path_buf(), format!("`datasets[{i}].{k}` is FramePack-only: ignored")));
            }
        }
        Ok(())
    }

    /// The entry with `[general]` and musubi-tuner's defaults applied.
    fn params(&self, default_caption_extension: &str, warnings: &mut Vec<(PathBuf, String)>) -> Result<DatasetParams> {
        let i = self.i;
        self.check_keys(warnings)?;
        let image_directory = self.path_value("image_directory", warnings)?;
        let image_jsonl_file = self.path_value("image_jsonl_file", warnings)?;
        if image_directory.is_none() && image_jsonl_file.is_none() {
            return Err(self.cerr(format!("`datasets[{i}]` needs `image_directory` or `image_jsonl_file`")));
        }
        let control_directory = self.path_value("control_directory", warnings)?;
        let cache_directory = self.path_value("cache_directory", warnings)?.or_else(|| image_directory.clone());
        let caption_extension =
            self.string("caption_extension")?.unwrap_or_else(|| default_caption_extension.to_string());
        Ok(DatasetParams {
            index: i,
            resolution: self.reso("resolution")?.unwrap_or((960, 544)),
            caption_extension,
            batch_size: self.int("batch_size", 1, 1)? as usize,
            num_repeats: self.int("num_repeats", 1, 0)? as usize,
            enable_bucket: self.boolean("enable_bucket")?,
            bucket_no_upscale: self.boolean("bucket_no_upscale")?,
            image_directory,
            image_jsonl_file,
            control_directory,
            cache_directory,
            no_resize_control: self.boolean("no_resize_control")?,
            control_resolution: self.reso("control_resolution")?,
        })
    }
}

/// The `(width, height)` a control image of `size` is resized to, as musubi-tuner's
/// `fetch_and_resize` decides it (`image_video_dataset.py:448-479`; see the module docs);
/// `None` = the target's bucket (the default).
pub fn control_size(d: &DatasetParams, size: (u32, u32), steps: u32) -> Option<(u32, u32)> {
    let round =
        |(w, h): (u32, u32)| (divisible_by(w as u64, steps as u64) as u32, divisible_by(h as u64, steps as u64) as u32);
    match (d.no_resize_control, d.control_resolution) {
        (false, None) => None,
        (false, Some(r)) => Some(calculate_bucket_resolution(size, r, steps)),
        (true, Some(r)) if size.0 as u64 * size.1 as u64 > r.0 as u64 * r.1 as u64 => {
            Some(calculate_bucket_resolution(size, r, steps))
        }
        (true, _) => Some(round(size)),
    }
}

/// musubi-tuner's `glob_images` for one folder: image files directly in `dir` (no dotfiles),
/// sorted by path.
fn glob_images(scan: &mut Scan<'_>, dir: &Path) -> Vec<PathBuf> {
    let Some(l) = scan.list(dir) else {
        return Vec::new();
    };
    l.images().filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))).cloned().collect()
}

fn basename(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Image → its control images in order, or `Err(the control whose suffix is not a number)`.
pub type ControlMatches = BTreeMap<PathBuf, std::result::Result<Vec<PathBuf>, PathBuf>>;

/// musubi-tuner's control matching (`ImageDirectoryDatasource.__init__`): image → its
/// controls in order; an image whose candidate controls include a non-numeric suffix maps to
/// `Err(control path)`; unclaimed controls are returned last.
pub fn match_controls(images: &[PathBuf], controls: &[PathBuf]) -> (ControlMatches, Vec<PathBuf>) {
    let mut order: Vec<&PathBuf> = images.iter().collect();
    order.sort_by_key(|p| std::cmp::Reverse(basename(p).chars().count())); // stable: path order within a length
    let mut pool: BTreeSet<PathBuf> = controls.iter().cloned().collect();
    let mut out = BTreeMap::new();
    for img in order {
        let stem = image_io::stem(img);
        let (dot, us) = (format!("{stem}."), format!("{stem}_"));
        let potential: Vec<PathBuf> =
            pool.iter().filter(|p| basename(p).starts_with(&dot) || basename(p).starts_with(&us)).cloned().collect();
        for p in &potential {
            pool.remove(p);
        }
        if potential.is_empty() {
            continue;
        }
        let mut keyed = Vec::new();
        let mut bad = None;
        for p in potential {
            let s = image_io::stem(&p);
            if s == stem {
                keyed.push((0u128, p));
                continue;
            }
            let suffix = s.rsplit('_').next().unwrap_or_default();
            match suffix.parse::<u128>() {
                Ok(n) if suffix.bytes().all(|b| b.is_ascii_digit()) => keyed.push((n + 1, p)),
                _ => {
                    bad.get_or_insert(p);
                }
            }
        }
        keyed.sort();
        out.insert(
            img.clone(),
            match bad {
                Some(b) => Err(b),
                None => Ok(keyed.into_iter().map(|(_, p)| p).collect()),
            },
        );
    }
    (out, pool.into_iter().collect())
}

/// One image of a dataset before checks: target, caption, controls, id.
struct Item {
    id: String,
    target: PathBuf,
    caption: String,
    controls: Vec<PathBuf>,
}

fn directory_items(scan: &mut Scan<'_>, d: &DatasetParams, dir: &Path) -> Vec<Item> {
    if !dir.is_dir() {
        scan.error(dir, format!("datasets[{}].image_directory does not exist or is not a folder", d.index));
        return Vec::new();
    }
    let all = glob_images(scan, dir);
    let ext = &d.caption_extension;
    let mut captioned = Vec::new();
    for p in all {
        let cap = p.with_file_name(format!("{}{ext}", image_io::stem(&p)));
        if cap.is_file() {
            captioned.push((p, cap));
        } else {
            scan.error(
                &p,
                format!("no caption file {} (musubi-tuner drops images without one): left out", basename(&cap)),
            );
        }
    }
    let images: Vec<PathBuf> = captioned.iter().map(|(p, _)| p.clone()).collect();
    let mut stems: HashMap<String, usize> = HashMap::new();
    for p in &images {
        *stems.entry(image_io::stem(p)).or_insert(0) += 1;
    }
    let mut controls: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    if let Some(cdir) = &d.control_directory {
        if !cdir.is_dir() {
            scan.error(
                cdir,
                format!(
                    "datasets[{}].control_directory does not exist or is not a folder: every image left out",
                    d.index
                ),
            );
            return Vec::new();
        }
        let cs = glob_images(scan, cdir);
        let (m, orphans) = match_controls(&images, &cs);
        for o in orphans {
            scan.warn(&o, "control image matching no image (musubi-tuner ignores it)");
        }
        for (img, r) in m {
            match r {
                Ok(v) => {
                    controls.insert(img, v);
                }
                Err(c) => scan.error(
                    &img,
                    format!("control image {} has no number after its last `_` (musubi-tuner: \"Invalid digits suffix\"): left out", c.display()),
                ),
            }
        }
    }
    let mut items = Vec::new();
    for (p, cap) in captioned {
        let ctl = controls.remove(&p).unwrap_or_default();
        if d.control_directory.is_some() && ctl.is_empty() {
            if !scan.problems.iter().any(|q| q.path == p) {
                scan.error(&p, "no matching control image (musubi-tuner stops: \"Could not find matching control images\"): left out");
            }
            continue;
        }
        let Some(caption) = scan.read_text(&cap) else {
            continue;
        };
        if caption.is_empty() {
            scan.warn(&cap, "empty caption (kept)");
        }
        let stem = image_io::stem(&p);
        let id = if stems.get(&stem).copied().unwrap_or(0) > 1 {
            format!("{}/{}", d.index, basename(&p))
        } else {
            format!("{}/{stem}", d.index)
        };
        items.push(Item { id, target: p, caption, controls: ctl });
    }
    items
}

/// The `control_path` / `control_path_<n>` values of one JSONL line, in musubi-tuner's order;
/// `None` (reported at `at`) when a suffix is not a number.
fn jsonl_controls(scan: &mut Scan<'_>, at: &str, v: &serde_json::Value) -> Option<Vec<(u64, String)>> {
    let mut ctl: Vec<(u64, String)> = Vec::new();
    let mut bad = false;
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let idx = if k == "control_path" {
                Some(0)
            } else if let Some(s) = k.strip_prefix("control_path_") {
                match s.parse::<u64>() {
                    Ok(i) => Some(i),
                    Err(_) => {
                        scan.error(at, format!("`{k}`: the suffix is not a number: left out"));
                        bad = true;
                        None
                    }
                }
            } else {
                None
            };
            if let (Some(i), Some(s)) = (idx, val.as_str()) {
                ctl.push((i, s.to_string()));
            }
        }
    }
    if bad {
        return None;
    }
    ctl.sort();
    Some(ctl)
}

fn jsonl_items(scan: &mut Scan<'_>, d: &DatasetParams, file: &Path) -> Vec<Item> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            scan.error(file, format!("cannot read datasets[{}].image_jsonl_file: {e}", d.index));
            return Vec::new();
        }
    };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |scan: &mut Scan<'_>, s: &str| {
        let p = PathBuf::from(s);
        if p.is_absolute() || p.exists() || !base.join(&p).exists() {
            p
        } else {
            scan.warn(
                base.join(&p),
                format!(
                    "`{s}` does not exist relative to the working directory; using it relative to {}",
                    file.display()
                ),
            );
            base.join(p)
        }
    };
    let mut items = Vec::new();
    let mut ids = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{}:{}", file.display(), n + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                scan.error(&at, format!("not a JSON object: {e}: left out"));
                continue;
            }
        };
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let Some(image) = get("image_path").or_else(|| get("image_path_0")) else {
            scan.error(&at, "no `image_path`: left out");
            continue;
        };
        let Some(caption) = get("caption") else {
            scan.error(&at, "no `caption`: left out");
            continue;
        };
        let Some(ctl) = jsonl_controls(scan, &at, &v) else { continue };
        let target = resolve(scan, &image);
        let controls = ctl.iter().map(|(_, s)| resolve(scan, s)).collect();
        let mut id = format!("{}/{}", d.index, image_io::stem(&target));
        if !ids.insert(id.clone()) {
            id = format!("{id}~{}", n + 1);
            ids.insert(id.clone());
        }
        items.push(Item { id, target, caption, controls });
    }
    items
}

/// The example of one image and its controls; `None` (reported) when one of them is unusable
/// or it has no bucket.
fn item_example(scan: &mut Scan<'_>, d: &DatasetParams, sel: &BucketSelector, it: Item) -> Option<Example> {
    let t = scan.image(&it.target);
    let cs: Vec<Option<(u32, u32)>> = it.controls.iter().map(|c| scan.image(c)).collect();
    let tsize = t?;
    if cs.iter().any(Option::is_none) {
        scan.error(&it.target, "left out: one of its control images is unusable (see its problem)");
        return None;
    }
    let bucket = scan.bucket(sel, &it.target, tsize)?;
    let mut images = vec![(roles::TARGET.to_string(), it.target.clone())];
    if let Some(c0) = it.controls.first() {
        images.push((roles::REFERENCE.to_string(), c0.clone()));
    }
    let mut sizes = BTreeMap::new();
    for (k, (c, csize)) in it.controls.iter().zip(cs.into_iter().flatten()).enumerate() {
        if let Some(s) = control_size(d, csize, sel.reso_steps) {
            if s.0 == 0 || s.1 == 0 {
                scan.error(
                    c,
                    format!(
                        "{}x{} is smaller than one bucket step ({}) with no_resize_control: it would be resized to {}x{}",
                        csize.0, csize.1, sel.reso_steps, s.0, s.1
                    ),
                );
                scan.error(&it.target, "left out: one of its control images is unusable (see its problem)");
                return None;
            }
            sizes.insert(roles::control(k), s);
        }
        images.push((roles::control(k), c.clone()));
    }
    Some(Example { id: it.id, images, texts: vec![(roles::CAPTION.to_string(), it.caption)], bucket, sizes })
}

/// A `[[datasets]]` entry as `host data check` shows it.
fn source_of(d: &DatasetParams, examples: usize, buckets: BTreeMap<String, usize>) -> Source {
    let opt = |p: &Option<PathBuf>| p.as_ref().map(|p| json!(p)).unwrap_or(serde_json::Value::Null);
    Source {
        name: format!("datasets[{}]", d.index),
        path: d.image_directory.clone().or_else(|| d.image_jsonl_file.clone()).unwrap_or_default(),
        examples,
        settings: BTreeMap::from([
            ("resolution".to_string(), json!([d.resolution.0, d.resolution.1])),
            ("caption_extension".to_string(), json!(d.caption_extension)),
            ("batch_size".to_string(), json!(d.batch_size)),
            ("num_repeats".to_string(), json!(d.num_repeats)),
            ("enable_bucket".to_string(), json!(d.enable_bucket)),
            ("bucket_no_upscale".to_string(), json!(d.bucket_no_upscale)),
            ("image_directory".to_string(), opt(&d.image_directory)),
            ("image_jsonl_file".to_string(), opt(&d.image_jsonl_file)),
            ("control_directory".to_string(), opt(&d.control_directory)),
            ("cache_directory".to_string(), opt(&d.cache_directory)),
            ("no_resize_control".to_string(), json!(d.no_resize_control)),
            (
                "control_resolution".to_string(),
                d.control_resolution.map(|(w, h)| json!([w, h])).unwrap_or(serde_json::Value::Null),
            ),
            ("buckets".to_string(), json!(buckets)),
        ]),
    }
}

/// Opens a musubi-tuner dataset config (see the module docs).
pub fn open(cfg: &DataConfig, seed: u64) -> Result<DataSet> {
    let path = config_path(cfg);
    let conf = read_config(&path, &cfg.caption_extension)?;
    let mut scan = Scan::new(cfg);
    for (p, w) in &conf.warnings {
        scan.warn(p, w.clone());
    }
    if conf.datasets.is_empty() {
        scan.error(&path, format!("no [[datasets]] entry; {EXPECTED_LAYOUT}"));
    }
    let mut selectors = Vec::new();
    let mut per_dataset = Vec::new();
    for d in &conf.datasets {
        let sel = BucketSelector::new(d.resolution, d.enable_bucket, d.bucket_no_upscale, cfg.bucket_reso_steps)
            .map_err(|e| EngineError::Config(format!("{}: datasets[{}].resolution: {e}", path.display(), d.index)))?;
        let items = match (&d.image_directory, &d.image_jsonl_file) {
            (Some(dir), _) => directory_items(&mut scan, d, dir),
            (None, Some(f)) => jsonl_items(&mut scan, d, f),
            (None, None) => Vec::new(),
        };
        selectors.push(sel);
        per_dataset.push(items);
    }
    let all: Vec<PathBuf> = per_dataset
        .iter()
        .flatten()
        .flat_map(|i| std::iter::once(i.target.clone()).chain(i.controls.iter().cloned()))
        .collect();
    scan.prefetch(&all);
    let mut examples = Vec::new();
    let mut repeats = HashMap::new();
    let mut sources = Vec::new();
    for ((d, items), sel) in conf.datasets.iter().zip(per_dataset).zip(&selectors) {
        let mut buckets: BTreeMap<String, usize> = BTreeMap::new();
        let before = examples.len();
        for it in items {
            if let Some(e) = item_example(&mut scan, d, sel, it) {
                repeats.insert(e.id.clone(), d.num_repeats);
                *buckets.entry(format!("{}x{}", e.bucket.0, e.bucket.1)).or_insert(0) += 1;
                examples.push(e);
            }
        }
        sources.push(source_of(d, examples.len() - before, buckets));
    }
    let first = match selectors.first() {
        Some(s) => s.clone(),
        None => BucketSelector::new((960, 544), false, false, cfg.bucket_reso_steps).map_err(EngineError::Config)?,
    };
    let split = super::uses_fractions(cfg, false);
    let mut ds = super::assemble("musubi", path, cfg, seed, split, examples, scan, first, false, sources, &repeats);
    let sizes: BTreeSet<usize> = conf.datasets.iter().map(|d| d.batch_size).collect();
    ds.batch_size = if sizes.len() == 1 { sizes.into_iter().next() } else { None };
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{self, write_img};
    use crate::data::{inspect, Severity};

    /// A dataset.toml in the style of musubi-tuner's docs/dataset_config.md.
    fn write_toml(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("dataset.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    fn cfg_for(toml: &Path) -> DataConfig {
        let mut c = testutil::cfg(toml, "musubi");
        c.min_image_side = 16;
        c
    }

    #[test]
    fn control_matching_is_musubi_tuners() {
        let p = |s: &str| PathBuf::from(format!("/c/{s}"));
        let i = |s: &str| PathBuf::from(format!("/i/{s}"));
        let images = vec![i("a.jpg"), i("a_1.jpg"), i("b.png"), i("c.png"), i("d.png")];
        let controls = vec![
            p("a.png"),
            p("a_0.png"),
            p("a_10.png"),
            p("a_2.png"),
            p("a_1.png"),
            p("a_1_0.png"),
            p("b_0000.png"),
            p("b_0001.png"),
            p("c_x.png"),
            p("e.png"),
        ];
        let (m, orphans) = match_controls(&images, &controls);
        // a_1.jpg (the longer name) claims a_1.png and a_1_0.png first.
        assert_eq!(m[&i("a_1.jpg")], Ok(vec![p("a_1.png"), p("a_1_0.png")]));
        assert_eq!(m[&i("a.jpg")], Ok(vec![p("a.png"), p("a_0.png"), p("a_2.png"), p("a_10.png")]));
        assert_eq!(m[&i("b.png")], Ok(vec![p("b_0000.png"), p("b_0001.png")]));
        assert_eq!(m[&i("c.png")], Err(p("c_x.png")));
        assert!(!m.contains_key(&i("d.png")));
        assert_eq!(orphans, vec![p("e.png")]);
    }

    #[cfg(unix)]
    /// The `dataset.toml` of musubi-tuner's docs over two image folders (captions, controls and
    /// every kind of bad file) under `r`.
    fn musubi_docs_fixture(r: &Path) -> PathBuf {
        let (img, ctl, img2) = (r.join("image_dir"), r.join("control_dir"), r.join("image_dir2"));
        write_img(&img.join("image1.jpg"), 1920, 1080, 1);
        std::fs::write(img.join("image1.txt"), "a photo of alice\n").unwrap();
        write_img(&img.join("image2.png"), 600, 900, 2);
        std::fs::write(img.join("image2.txt"), "alice, portrait").unwrap();
        write_img(&img.join("nocap.png"), 600, 900, 3);
        testutil::write_truncated_jpeg(&img.join("cut.jpg"), 640, 480);
        std::fs::write(img.join("cut.txt"), "x").unwrap();
        write_img(&img.join("noctl.png"), 600, 600, 3);
        std::fs::write(img.join("noctl.txt"), "x").unwrap();
        testutil::dangling_link(&img.join("gone.png"));
        write_img(&ctl.join("image1.png"), 1000, 700, 4);
        write_img(&ctl.join("image2_0.png"), 500, 500, 5);
        write_img(&ctl.join("image2_1.png"), 400, 800, 6);
        write_img(&ctl.join("cut.png"), 64, 64, 6);
        write_img(&ctl.join("orphan.png"), 64, 64, 7);
        write_img(&img2.join("x.png"), 300, 300, 8);
        std::fs::write(img2.join("x.caption"), "x caption").unwrap();
        write_toml(
            r,
            &format!(
                r#"# resolution, caption_extension, batch_size, num_repeats, enable_bucket, bucket_no_upscale should be set in either general or datasets
# otherwise, the default values will be used for each item

# general configurations
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "{}"
control_directory = "{}"
cache_directory = "{}"
num_repeats = 2 # optional, default is 1. Number of times to repeat the dataset.

[[datasets]]
image_directory = "{}"
caption_extension = ".caption"
resolution = 512
enable_bucket = false
batch_size = 2
"#,
                img.display(),
                ctl.display(),
                r.join("cache").display(),
                img2.display()
            ),
        )
    }

    #[cfg(unix)]
    #[test]
    fn reads_a_dataset_toml_as_musubi_does() {
        let d = tempfile::tempdir().unwrap();
        let toml = musubi_docs_fixture(d.path());
        let ds = inspect(&cfg_for(&toml), 1).unwrap();
        assert_eq!(ds.root, toml);
        // No split for musubi; repeats of dataset 0 only.
        assert!(ds.val.is_empty() && ds.test.is_empty());
        let ids: Vec<&str> = ds.train.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, vec!["0/image1", "0/image1#2", "0/image2", "0/image2#2", "1/x"]);
        let e1 = &ds.train[0];
        assert_eq!(e1.text("caption"), Some("a photo of alice"));
        assert_eq!(e1.bucket, (960, 544));
        assert!(e1.image("reference").unwrap().ends_with("control_dir/image1.png"));
        assert_eq!(e1.image("reference"), e1.image("control"));
        let e2 = ds.train.iter().find(|e| e.id == "0/image2").unwrap();
        assert_eq!(e2.signature().0, vec!["target", "reference", "control", "control_1"]);
        assert!(e2.image("control_1").unwrap().ends_with("image2_1.png"));
        assert_eq!(e2.bucket, BucketSelector::new((960, 544), true, false, 16).unwrap().select((600, 900)));
        let x = ds.train.iter().find(|e| e.id == "1/x").unwrap();
        assert_eq!((x.bucket, x.text("caption")), ((512, 512), Some("x caption")));
        assert_eq!(ds.batch_size, None); // 1 and 2
        let find = |f: &str, s: Severity| {
            ds.problems
                .iter()
                .find(|p| p.path.ends_with(f) && p.severity == s)
                .unwrap_or_else(|| panic!("{f}: {:#?}", ds.problems))
                .message
                .clone()
        };
        assert!(find("image_dir/nocap.png", Severity::Error).contains("no caption file nocap.txt"));
        assert!(find("image_dir/cut.jpg", Severity::Error).contains("truncated JPEG"));
        assert!(find("image_dir/noctl.png", Severity::Error).contains("no matching control image"));
        assert!(find("image_dir/gone.png", Severity::Error).contains("dangling"));
        assert!(find("control_dir/orphan.png", Severity::Warning).contains("matching no image"));
        // Batches of one bucket, made at the bucket's size with every control.
        let mut cache = crate::data::ImageCache::new();
        let b = crate::data::make_batch(&[e2], &mut cache).unwrap();
        let (w, h) = e2.bucket;
        assert_eq!(b.image("control_1").unwrap().shape, vec![1, 3, h as i64, w as i64]);
        let d = ds.describe_all();
        assert!(d.contains("datasets[1]") && d.contains("orphan.png"), "{d}");
        let j = ds.report_json();
        assert_eq!(j["counts"]["examples"], 5);
        assert_eq!(j["counts"]["control_images"], 3 * 2);
        assert_eq!(j["examples"][0]["size"], json!([1920, 1080]));
    }

    #[test]
    fn unknown_and_unsupported_keys_name_file_and_key() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let cases = [
            (
                "[general]\nresolutoin = 512\n[[datasets]]\nimage_directory = 'x'\n",
                "unknown key `general.resolutoin`",
                Some("did you mean `general.resolution`"),
            ),
            (
                "[[datasets]]\nimage_directory = 'x'\ncaption_extention = '.txt'\n",
                "unknown key `datasets[0].caption_extention`",
                Some("caption_extension"),
            ),
            ("[general]\nimage_directory = 'x'\n", "unknown key `general.image_directory`", Some("[[datasets]]")),
            ("[dataset]\n", "unknown key `dataset`", Some("datasets")),
            ("[[datasets]]\nvideo_directory = 'v'\n", "video datasets are not supported", None),
            ("[[datasets]]\nimage_directory = 'x'\nmultiple_target = true\n", "multiple_target", None),
            (
                "[[datasets]]\nimage_directory = 'x'\ncontrol_resolution = [1024]\n",
                "`datasets[0].control_resolution` must be",
                None,
            ),
            ("[[datasets]]\nimage_directory = 'x'\nno_resize_control = 1\n", "true or false", None),
            (
                "[[datasets]]\nimage_directory = 'x'\nbatch_size = 'two'\n",
                "`datasets[0].batch_size` must be an integer",
                None,
            ),
            (
                "[general]\nresolution = [1, 2, 3]\n[[datasets]]\nimage_directory = 'x'\n",
                "`general.resolution` must be",
                None,
            ),
            (
                "[[datasets]]\nimage_directory = 'x'\n[[datasets]]\nimage_directory = 'x'\n",
                "share the cache directory",
                None,
            ),
            ("[[datasets]]\ncache_directory = 'x'\n", "needs `image_directory` or `image_jsonl_file`", None),
            ("[general\n", "not valid TOML", None),
        ];
        for (body, want, hint) in cases {
            let t = write_toml(r, body);
            let e = inspect(&cfg_for(&t), 0).unwrap_err().to_string();
            assert!(e.contains("dataset.toml") && e.contains(want), "{body}\n=> {e}");
            if let Some(h) = hint {
                assert!(e.contains(h), "{body}\n=> {e}");
            }
        }
        // Deprecated names are renamed with a warning, FramePack keys are accepted with a warning.
        let t = write_toml(
            r,
            "[[datasets]]\nimage_directory = 'x'\nqwen_image_edit_no_resize_control = true\nqwen_image_edit_control_resolution = 512\n",
        );
        let c = read_config(&t, ".txt").unwrap();
        assert_eq!((c.datasets[0].no_resize_control, c.datasets[0].control_resolution), (true, Some((512, 512))));
        assert!(c.warnings.iter().any(|(_, w)| w.contains("qwen_image_edit_no_resize_control")), "{:?}", c.warnings);
        let t = write_toml(r, "[[datasets]]\nimage_directory = 'missing'\nfp_latent_window_size = 9\n");
        let ds = inspect(&cfg_for(&t), 0).unwrap();
        assert!(ds.problems.iter().any(|p| p.message.contains("FramePack")));
        assert!(ds.problems.iter().any(|p| p.message.contains("image_directory does not exist")));
        // The folder form: root holds dataset.toml.
        let c = cfg_for(r);
        assert_eq!(config_path(&c), r.join("dataset.toml"));
    }

    /// `control_resolution` and `no_resize_control` size each control as musubi-tuner's
    /// `fetch_and_resize` does (the sizes are `tests/python/bucket_oracle.py`'s `control_size`,
    /// musubi-tuner's lines re-typed); the size is part of the batching key, so two examples of
    /// one bucket whose controls differ in shape never share a batch. Before, both keys were
    /// refused.
    #[test]
    fn control_resolution_and_no_resize_control_size_controls_as_musubi_does() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let dirs: Vec<(PathBuf, PathBuf)> =
            (0..4).map(|k| (r.join(format!("img{k}")), r.join(format!("ctl{k}")))).collect();
        let target = |k: usize, stem: &str| {
            write_img(&dirs[k].0.join(format!("{stem}.png")), 64, 64, 1);
            std::fs::write(dirs[k].0.join(format!("{stem}.txt")), stem).unwrap();
        };
        target(0, "a");
        target(0, "a2");
        write_img(&dirs[0].1.join("a.png"), 200, 100, 2);
        write_img(&dirs[0].1.join("a2.png"), 100, 200, 2);
        target(1, "b");
        write_img(&dirs[1].1.join("b.png"), 70, 90, 3);
        target(2, "c");
        write_img(&dirs[2].1.join("c_0.png"), 40, 40, 4);
        write_img(&dirs[2].1.join("c_1.png"), 200, 100, 5);
        target(3, "e");
        write_img(&dirs[3].1.join("e.png"), 200, 100, 6);
        let keys = [
            "control_resolution = 128",
            "no_resize_control = true",
            "no_resize_control = true\ncontrol_resolution = [64, 64]",
            "",
        ];
        let mut body = "[general]\nresolution = 64\nbatch_size = 2\n".to_string();
        for (k, (img, ctl)) in dirs.iter().enumerate() {
            body += &format!(
                "[[datasets]]\nimage_directory = '{}'\ncontrol_directory = '{}'\n{}\n",
                img.display(),
                ctl.display(),
                keys[k]
            );
        }
        let ds = inspect(&cfg_for(&write_toml(r, &body)), 0).unwrap();
        assert_eq!(ds.problems_of(Severity::Error).count(), 0, "{:#?}", ds.problems);
        let sizes = |id: &str| {
            let e = ds.train.iter().find(|e| e.id == id).unwrap();
            assert_eq!((e.bucket, e.size_of("target"), e.size_of("reference")), ((64, 64), (64, 64), (64, 64)), "{id}");
            e.sizes.iter().map(|(r, s)| (r.as_str(), *s)).collect::<Vec<_>>()
        };
        assert_eq!(sizes("0/a"), vec![("control", (176, 80))]);
        assert_eq!(sizes("0/a2"), vec![("control", (80, 192))]);
        assert_eq!(sizes("1/b"), vec![("control", (64, 80))]);
        // Within the maximum area: musubi-tuner keeps 40x40 as is; here rounded to the step.
        assert_eq!(sizes("2/c"), vec![("control", (32, 32)), ("control_1", (80, 48))]);
        assert_eq!(sizes("3/e"), vec![]);
        let by_id = |id: &str| ds.train.iter().find(|e| e.id == id).unwrap();
        let mut cache = crate::data::ImageCache::new();
        let b = crate::data::make_batch(&[by_id("2/c")], &mut cache).unwrap();
        assert_eq!(b.image("control").unwrap().shape, vec![1, 3, 32, 32]);
        assert_eq!(b.image("control_1").unwrap().shape, vec![1, 3, 48, 80]);
        assert_eq!(b.image("reference").unwrap().shape, vec![1, 3, 64, 64]);
        // 0/a and 0/a2: one bucket and one role set, but controls of two shapes.
        let (a, a2) = (by_id("0/a"), by_id("0/a2"));
        assert!(crate::data::make_batch(&[a, a2], &mut cache).unwrap_err().to_string().contains("same sizes"));
        let ia = ds.train.iter().position(|e| e.id == "0/a").unwrap();
        // Several epochs: one shuffled group of four would pair them in some of them.
        for batch in (0..20).flat_map(|epoch| crate::data::epoch_batches(&ds.train, 2, 0, epoch)) {
            assert!(!(batch.contains(&ia) && batch.iter().any(|&i| ds.train[i].id == "0/a2")), "{batch:?}");
        }
        let j = ds.report_json();
        let c = j["examples"].as_array().unwrap().iter().find(|e| e["id"] == "2/c").unwrap();
        assert_eq!(c["fitted_sizes"], json!({"control": [32, 32], "control_1": [80, 48]}));
    }

    #[test]
    fn jsonl_datasets() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write_img(&r.join("a.png"), 64, 64, 1);
        write_img(&r.join("a_c0.png"), 64, 64, 2);
        write_img(&r.join("a_c1.png"), 64, 64, 3);
        let lines = [
            format!(
                r#"{{"image_path": "{}", "caption": " kept as is ", "control_path_1": "{}", "control_path_0": "{}"}}"#,
                r.join("a.png").display(),
                r.join("a_c1.png").display(),
                r.join("a_c0.png").display()
            ),
            r#"{"caption": "no image"}"#.to_string(),
            "not json".to_string(),
            String::new(),
        ];
        std::fs::write(r.join("meta.jsonl"), lines.join("\n")).unwrap();
        let t = write_toml(
            r,
            &format!(
                "[[datasets]]\nimage_jsonl_file = '{}'\ncache_directory = '{}'\n",
                r.join("meta.jsonl").display(),
                r.join("cache").display()
            ),
        );
        let ds = inspect(&cfg_for(&t), 0).unwrap();
        assert_eq!(ds.len(), 1);
        let e = &ds.train[0];
        assert_eq!(e.text("caption"), Some(" kept as is "));
        assert!(
            e.image("control").unwrap().ends_with("a_c0.png") && e.image("control_1").unwrap().ends_with("a_c1.png")
        );
        assert_eq!(e.bucket, (960, 544));
        assert_eq!(ds.problems_of(Severity::Error).count(), 2, "{:#?}", ds.problems);
    }
}
