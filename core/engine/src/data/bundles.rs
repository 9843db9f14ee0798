//! The bundle dataset of seed 000: `<root>/<bundle>/char_*/img_*`, one person per `char_*`
//! directory, the alphabetically first image being that person's reference and every other
//! image a target. Scanning never crashes on a bad image: it is reported and skipped.
//!
//! Two faces: [`open`] (the `bundles` layout of [`crate::data`]: one [`Example`] per
//! (reference, target) pair, roles `target` and `reference`) and the historic API the
//! trainer still uses ([`scan`], [`Dataset`], [`Pair`], [`make_pair_batch`]), re-exported by
//! `crate::dataset`. Both share one scan, so both report dangling symbolic links and
//! truncated images.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use likeness_abi::CpuTensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::image_io::{self, Fit};
use super::{roles, DataSet, Example, ImageCache, Scan, Source};
use crate::config::DataConfig;
use crate::error::{EngineError, Result};

/// The layout [`scan`] expects, quoted in its error messages.
pub const EXPECTED_LAYOUT: &str =
    "expected <root>/<bundle>/char_<id>/<image>.{jpg,jpeg,png}, e.g. dataset/0/char_00001/img_00001.jpg \
     (each char_* directory holds images of one person; the alphabetically first is the reference)";

/// How to read and split a bundle dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BundleDatasetConfig {
    /// Dataset root holding the bundle directories (`0/`, `1/`, ...).
    pub root: PathBuf,
    /// Side of the square images fed to the model, in pixels.
    pub image_size: u32,
    /// A character needs at least this many usable images (one reference + targets).
    pub min_images_per_char: usize,
    /// Keep only the first N usable characters (alphabetically) of each bundle; `None` keeps all.
    pub max_chars_per_bundle: Option<usize>,
    /// Images whose shorter side is below this are skipped as too small.
    pub min_image_side: u32,
    /// Fraction of pairs held out for validation.
    pub val_fraction: f64,
    /// Fraction of pairs held out for the final test.
    pub test_fraction: f64,
    /// Seed of the split shuffle (same seed, same split).
    pub seed: u64,
    /// Fully decode every image while scanning so a corrupt file is skipped up front instead of
    /// failing a batch later (costs one extra decode per image).
    pub verify_decode: bool,
}

impl Default for BundleDatasetConfig {
    fn default() -> Self {
        BundleDatasetConfig {
            root: PathBuf::from("dataset"),
            image_size: 64,
            min_images_per_char: 2,
            max_chars_per_bundle: None,
            min_image_side: 32,
            val_fraction: 0.15,
            test_fraction: 0.15,
            seed: 0,
            verify_decode: true,
        }
    }
}

/// An image left out of the dataset, and why (unreadable, undecodable, too small).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

/// A character directory left out of the dataset, and why (too few usable images, cap reached).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedCharacter {
    /// `<bundle>/<char_dir>`, e.g. `0/char_00001`.
    pub character: String,
    pub reason: String,
}

/// One usable person: its reference image and the targets paired with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Character {
    /// `<bundle>/<char_dir>`, e.g. `0/char_00001`.
    pub name: String,
    /// Bundle directory name, e.g. `0`.
    pub bundle: String,
    /// Alphabetically first usable image.
    pub reference: PathBuf,
    /// The other usable images, sorted.
    pub targets: Vec<PathBuf>,
}

/// One training example: a reference and a target image of the same character.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Pair {
    /// `<bundle>/<char_dir>`, e.g. `0/char_00001`.
    pub character: String,
    pub reference: PathBuf,
    pub target: PathBuf,
}

/// A scanned and split dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The configuration it was scanned with.
    pub config: BundleDatasetConfig,
    /// Bundle directory names found under the root, sorted.
    pub bundles: Vec<String>,
    /// Usable characters, sorted by name.
    pub characters: Vec<Character>,
    /// Images reported and skipped while scanning.
    pub skipped_images: Vec<SkippedImage>,
    /// Characters reported and skipped while scanning.
    pub skipped_characters: Vec<SkippedCharacter>,
    /// Training pairs (shuffled by the split seed).
    pub train: Vec<Pair>,
    /// Validation pairs.
    pub val: Vec<Pair>,
    /// Test pairs.
    pub test: Vec<Pair>,
    /// Size of every usable image.
    pub image_sizes: BTreeMap<PathBuf, (u32, u32)>,
}

impl Dataset {
    /// Number of usable images (references + targets).
    pub fn num_images(&self) -> usize {
        self.characters.iter().map(|c| 1 + c.targets.len()).sum()
    }

    /// Number of pairs over all splits.
    pub fn num_pairs(&self) -> usize {
        self.train.len() + self.val.len() + self.test.len()
    }

    /// A human-readable summary for logs and `--dry-run`: counts, splits and skip reasons.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dataset {}: {} bundle(s), {} character(s), {} image(s), {} skipped image(s), {} skipped character(s)",
            self.config.root.display(),
            self.bundles.len(),
            self.characters.len(),
            self.num_images(),
            self.skipped_images.len(),
            self.skipped_characters.len()
        );
        let _ = write!(
            s,
            "pairs: {} train, {} val, {} test (seed {}, image size {})",
            self.train.len(),
            self.val.len(),
            self.test.len(),
            self.config.seed,
            self.config.image_size
        );
        const SHOW: usize = 10;
        for sk in self.skipped_images.iter().take(SHOW) {
            let _ = write!(s, "\n  skipped image {}: {}", sk.path.display(), sk.reason);
        }
        if self.skipped_images.len() > SHOW {
            let _ = write!(s, "\n  ... and {} more skipped image(s)", self.skipped_images.len() - SHOW);
        }
        for sk in self.skipped_characters.iter().take(SHOW) {
            let _ = write!(s, "\n  skipped character {}: {}", sk.character, sk.reason);
        }
        if self.skipped_characters.len() > SHOW {
            let _ = write!(s, "\n  ... and {} more skipped character(s)", self.skipped_characters.len() - SHOW);
        }
        s
    }
}

fn dataset_err(root: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Dataset { root: root.to_path_buf(), message: message.into() }
}

/// Sorted subdirectories (name, path) of `dir`; entries that cannot be followed (dangling
/// symbolic links) are pushed to `broken`.
fn sorted_subdirs(dir: &Path, broken: &mut Vec<SkippedImage>) -> std::io::Result<Vec<(String, PathBuf)>> {
    let l = image_io::list_dir(dir)?;
    broken.extend(l.broken.into_iter().map(|(path, reason)| SkippedImage { path, reason }));
    Ok(l.dirs
        .into_iter()
        .map(|p| (p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), p))
        .collect())
}

/// Checks one image; `Ok(size)`, or `Err(reason)` meaning skip it.
fn check_image(path: &Path, cfg: &BundleDatasetConfig) -> std::result::Result<(u32, u32), String> {
    let i = image_io::probe(path, cfg.verify_decode).map_err(|e| e.to_string())?;
    let (w, h) = (i.width, i.height);
    if w.min(h) < cfg.min_image_side {
        return Err(format!(
            "too small: {w}x{h}, the shorter side must be at least {} (min_image_side)",
            cfg.min_image_side
        ));
    }
    Ok((w, h))
}

fn validate_config(cfg: &BundleDatasetConfig) -> Result<()> {
    let frac_ok = |f: f64| f.is_finite() && (0.0..1.0).contains(&f);
    if !frac_ok(cfg.val_fraction) || !frac_ok(cfg.test_fraction) || cfg.val_fraction + cfg.test_fraction >= 1.0 {
        return Err(EngineError::Config(format!(
            "dataset: val_fraction ({}) and test_fraction ({}) must each be in [0, 1) and sum to less than 1",
            cfg.val_fraction, cfg.test_fraction
        )));
    }
    if cfg.image_size == 0 {
        return Err(EngineError::Config("dataset: image_size must be at least 1".into()));
    }
    Ok(())
}

/// Scans `cfg.root`, reports and skips bad images and characters, builds the pairs and splits
/// them deterministically by `cfg.seed`. Fails when the root is missing, holds no `char_*`
/// directory, or none is usable.
pub fn scan(cfg: &BundleDatasetConfig) -> Result<Dataset> {
    let ds = scan_report(cfg)?;
    let root = cfg.root.as_path();
    if ds.characters.is_empty() && ds.skipped_characters.is_empty() {
        return Err(dataset_err(root, format!("no character directories (char_*) found; {EXPECTED_LAYOUT}")));
    }
    if ds.characters.is_empty() {
        let first =
            ds.skipped_characters.first().map(|s| format!(" (e.g. {}: {})", s.character, s.reason)).unwrap_or_default();
        return Err(dataset_err(
            root,
            format!(
                "{} character director(ies) found but none usable{first}; {} image(s) skipped; {EXPECTED_LAYOUT}",
                ds.skipped_characters.len(),
                ds.skipped_images.len()
            ),
        ));
    }
    Ok(ds)
}

/// What a scan of characters collects besides the characters.
struct Found<'a> {
    skipped_images: &'a mut Vec<SkippedImage>,
    skipped_characters: &'a mut Vec<SkippedCharacter>,
    image_sizes: &'a mut BTreeMap<PathBuf, (u32, u32)>,
}

/// The character in `char_path` (named `name`): its alphabetically first usable image is the
/// reference, the others its targets; `None` (reported) when it cannot be listed or has fewer
/// than `min_images_per_char` usable images.
fn scan_character(
    cfg: &BundleDatasetConfig,
    found: &mut Found<'_>,
    bundle: &str,
    name: String,
    char_path: &Path,
) -> Option<Character> {
    let files = match image_io::list_dir(char_path) {
        Ok(l) => {
            for (path, reason) in l.broken.iter().filter(|(p, _)| image_io::is_image_path(p)) {
                tracing::warn!(path = %path.display(), "skipping image: {reason}");
                found.skipped_images.push(SkippedImage { path: path.clone(), reason: reason.clone() });
            }
            for (path, reason) in l.broken.iter().filter(|(p, _)| !image_io::is_image_path(p)) {
                found.skipped_images.push(SkippedImage { path: path.clone(), reason: reason.clone() });
            }
            l.images().cloned().collect::<Vec<_>>()
        }
        Err(e) => {
            tracing::warn!(path = %char_path.display(), "skipping character: cannot list: {e}");
            found.skipped_characters.push(SkippedCharacter { character: name, reason: format!("cannot list: {e}") });
            return None;
        }
    };
    let checks = super::parallel_map(&files, |p| check_image(p, cfg));
    let mut usable = Vec::with_capacity(files.len());
    for (p, r) in files.into_iter().zip(checks) {
        match r {
            Ok(size) => {
                found.image_sizes.insert(p.clone(), size);
                usable.push(p)
            }
            Err(reason) => {
                tracing::warn!(path = %p.display(), "skipping image: {reason}");
                found.skipped_images.push(SkippedImage { path: p, reason });
            }
        }
    }
    let min_images = cfg.min_images_per_char.max(2);
    if usable.len() < min_images {
        let reason = format!("{} usable image(s), fewer than min_images_per_char = {min_images}", usable.len());
        tracing::warn!(path = %char_path.display(), "skipping character: {reason}");
        found.skipped_characters.push(SkippedCharacter { character: name, reason });
        return None;
    }
    let reference = usable.remove(0);
    Some(Character { name, bundle: bundle.to_string(), reference, targets: usable })
}

/// [`scan`] without its two last checks: an empty or wholly unusable tree is returned with
/// what was skipped (for `host data check`). Fails only on bad settings or an unreadable root.
pub fn scan_report(cfg: &BundleDatasetConfig) -> Result<Dataset> {
    validate_config(cfg)?;
    let root = cfg.root.as_path();
    if !root.is_dir() {
        let what = if root.exists() { "is not a directory" } else { "does not exist" };
        return Err(dataset_err(root, format!("the dataset root {what}; {EXPECTED_LAYOUT}")));
    }
    let mut skipped_images = Vec::new();
    let bundles =
        sorted_subdirs(root, &mut skipped_images).map_err(|e| dataset_err(root, format!("cannot list: {e}")))?;

    let mut bundle_names = Vec::new();
    let mut characters = Vec::new();
    let mut skipped_characters = Vec::new();
    let mut image_sizes = BTreeMap::new();

    for (bundle, bundle_path) in &bundles {
        let chars = match sorted_subdirs(bundle_path, &mut skipped_images) {
            Ok(c) => c,
            Err(e) => {
                skipped_images.push(SkippedImage { path: bundle_path.clone(), reason: format!("cannot list: {e}") });
                continue;
            }
        };
        let chars: Vec<_> = chars.into_iter().filter(|(n, _)| n.starts_with("char_")).collect();
        if chars.is_empty() {
            continue;
        }
        bundle_names.push(bundle.clone());
        let mut kept = 0usize;
        for (char_dir, char_path) in &chars {
            let name = format!("{bundle}/{char_dir}");
            if let Some(max) = cfg.max_chars_per_bundle {
                if kept >= max {
                    skipped_characters.push(SkippedCharacter {
                        character: name,
                        reason: format!("beyond max_chars_per_bundle = {max}"),
                    });
                    continue;
                }
            }
            let mut found = Found {
                skipped_images: &mut skipped_images,
                skipped_characters: &mut skipped_characters,
                image_sizes: &mut image_sizes,
            };
            if let Some(c) = scan_character(cfg, &mut found, bundle, name, char_path) {
                kept += 1;
                characters.push(c);
            }
        }
    }
    skipped_images.sort_by(|a, b| a.path.cmp(&b.path));

    let mut pairs = pairs_of(&characters);
    let (train, val, test) = split_pairs(&mut pairs, cfg.val_fraction, cfg.test_fraction, cfg.seed);

    Ok(Dataset {
        config: cfg.clone(),
        bundles: bundle_names,
        characters,
        skipped_images,
        skipped_characters,
        train,
        val,
        test,
        image_sizes,
    })
}

fn pairs_of(characters: &[Character]) -> Vec<Pair> {
    characters
        .iter()
        .flat_map(|c| {
            c.targets.iter().map(move |t| Pair {
                character: c.name.clone(),
                reference: c.reference.clone(),
                target: t.clone(),
            })
        })
        .collect()
}

/// Sorts, shuffles by `seed` and cuts `pairs` into (train, val, test). At least one validation
/// pair when there are three or more pairs; at least one training pair whenever there is any.
pub fn split_pairs(
    pairs: &mut [Pair],
    val_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> (Vec<Pair>, Vec<Pair>, Vec<Pair>) {
    pairs.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    pairs.shuffle(&mut rng);
    let n = pairs.len();
    let mut n_test = (n as f64 * test_fraction).round() as usize;
    let mut n_val = (n as f64 * val_fraction).round() as usize;
    if n >= 3 && n_val == 0 {
        n_val = 1;
    }
    // Keep at least one training pair.
    while n > 0 && n_test + n_val >= n {
        if n_test > 0 && (n_test >= n_val || n_val <= 1) {
            n_test -= 1;
        } else if n_val > 0 {
            n_val -= 1;
        } else {
            break;
        }
    }
    let test = pairs[..n_test].to_vec();
    let val = pairs[n_test..n_test + n_val].to_vec();
    let train = pairs[n_test + n_val..].to_vec();
    (train, val, test)
}

/// Decodes an image, converts it to RGB, center-crops it to a square and resizes it to
/// `size`×`size` (triangle filter); returns CHW `f32` in [0, 1] ([`Fit::SquareCrop`]).
pub fn load_image(path: &Path, size: u32) -> Result<Vec<f32>> {
    image_io::load(path, Fit::SquareCrop(size))
}

/// A batch of the historic API: references and targets as `[B, 3, S, S]` tensors in [0, 1].
#[derive(Debug, Clone)]
pub struct PairBatch {
    pub reference: CpuTensor<f32>,
    pub target: CpuTensor<f32>,
    /// Character name of each sample (`<bundle>/<char_dir>`).
    pub characters: Vec<String>,
}

impl PairBatch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.characters.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.characters.is_empty()
    }
}

/// Loads (through `cache`, square crops of `size`) and stacks the images of `pairs`; takes
/// `&[Pair]` or `&[&Pair]`.
pub fn make_pair_batch<P: Borrow<Pair>>(pairs: &[P], size: u32, cache: &mut ImageCache) -> Result<PairBatch> {
    if pairs.is_empty() {
        return Err(EngineError::Other("make_batch: no pairs given (batch size 0)".into()));
    }
    let per = 3 * (size as usize) * (size as usize);
    let mut reference = Vec::with_capacity(per * pairs.len());
    let mut target = Vec::with_capacity(per * pairs.len());
    let mut characters = Vec::with_capacity(pairs.len());
    for p in pairs {
        let p = p.borrow();
        reference.extend_from_slice(&cache.get(&p.reference, size)?);
        target.extend_from_slice(&cache.get(&p.target, size)?);
        characters.push(p.character.clone());
    }
    let shape = vec![pairs.len() as i64, 3, size as i64, size as i64];
    Ok(PairBatch {
        reference: CpuTensor::new(shape.clone(), reference),
        target: CpuTensor::new(shape, target),
        characters,
    })
}

// ---------------------------------------------------------------------------------------------
// The `bundles` layout of `crate::data`

/// The historic scan's skipped images and characters as [`super::Problem`]s.
fn report_scan<'a>(cfg: &'a DataConfig, raw: &Dataset) -> Scan<'a> {
    let mut scan = Scan::new(cfg);
    for s in &raw.skipped_images {
        scan.error(&s.path, s.reason.clone());
    }
    for s in &raw.skipped_characters {
        let path = cfg.root.join(&s.character);
        if s.reason.starts_with("beyond max_chars_per_bundle") {
            scan.warn(path, format!("character left out: {}", s.reason));
        } else {
            scan.error(path, format!("character left out: {}", s.reason));
        }
    }
    if raw.characters.is_empty() && raw.skipped_characters.is_empty() {
        scan.error(&cfg.root, format!("no character directories (char_*) found; {EXPECTED_LAYOUT}"));
    }
    scan.sizes = raw.image_sizes.clone();
    scan
}

/// One source per bundle, with its example and character counts.
fn sources_of<'e>(cfg: &DataConfig, raw: &Dataset, examples: impl Iterator<Item = &'e Example>) -> Vec<Source> {
    let mut per_bundle: BTreeMap<String, usize> = BTreeMap::new();
    for e in examples {
        *per_bundle.entry(e.id.split('/').next().unwrap_or_default().to_string()).or_insert(0) += 1;
    }
    raw.bundles
        .iter()
        .map(|b| Source {
            name: b.clone(),
            path: cfg.root.join(b),
            examples: per_bundle.get(b).copied().unwrap_or(0),
            settings: BTreeMap::from([(
                "characters".to_string(),
                serde_json::json!(raw.characters.iter().filter(|c| &c.bundle == b).count()),
            )]),
        })
        .collect()
}

/// Opens a bundle tree as [`Example`]s: one per (reference, target) pair of a character,
/// id `<bundle>/<char_dir>/<target file name>`, images `target` then `reference`. The split is
/// the historic one ([`split_pairs`], so the same seed gives the same pairs); `data.split =
/// "none"` keeps every pair for training. Without bucketing and `data.resolution` every
/// example is an `image_size` square crop; with them, the target's bucket.
pub fn open(cfg: &DataConfig, seed: u64) -> Result<DataSet> {
    let bcfg = BundleDatasetConfig {
        root: cfg.root.clone(),
        image_size: cfg.image_size,
        min_images_per_char: cfg.min_images_per_char,
        max_chars_per_bundle: cfg.max_chars_per_bundle,
        min_image_side: cfg.min_image_side,
        val_fraction: cfg.val_fraction,
        test_fraction: cfg.test_fraction,
        seed,
        verify_decode: cfg.verify_decode,
    };
    let sel = super::selector_for(cfg)?;
    let raw = scan_report(&bcfg)?;
    let square_crop = !cfg.enable_bucket && cfg.resolution.is_none();
    let mut scan = report_scan(cfg, &raw);

    let example = |p: &Pair, scan: &mut Scan<'_>| -> Option<Example> {
        let size = *raw.image_sizes.get(&p.target)?;
        let bucket = if square_crop { (cfg.image_size, cfg.image_size) } else { scan.bucket(&sel, &p.target, size)? };
        let name = p.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Some(Example {
            id: format!("{}/{name}", p.character),
            images: vec![(roles::TARGET.into(), p.target.clone()), (roles::REFERENCE.into(), p.reference.clone())],
            texts: Vec::new(),
            bucket,
            sizes: Default::default(),
        })
    };
    let (train, val, test) = if super::uses_fractions(cfg, true) {
        (raw.train.clone(), raw.val.clone(), raw.test.clone())
    } else {
        let mut all = pairs_of(&raw.characters);
        all.sort();
        (all, Vec::new(), Vec::new())
    };
    let mut conv = |v: &[Pair]| v.iter().filter_map(|p| example(p, &mut scan)).collect::<Vec<_>>();
    let (train, val, test) = (conv(&train), conv(&val), conv(&test));
    let sources = sources_of(cfg, &raw, train.iter().chain(&val).chain(&test));
    let mut ds = super::assemble(
        "bundles",
        cfg.root.clone(),
        cfg,
        seed,
        false,
        Vec::new(),
        scan,
        sel,
        square_crop,
        sources,
        &HashMap::new(),
    );
    ds.train = train;
    ds.val = val;
    ds.test = test;
    ds.split = if super::uses_fractions(cfg, true) { "fractions".into() } else { "none".into() };
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::epoch_order;
    use image::{Rgb, RgbImage};

    fn write_img(path: &Path, w: u32, h: u32, color: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, Rgb(color)).save(path).unwrap();
    }

    /// 2 bundles; bundle 0: char_00001 (3 imgs), char_00002 (2 imgs + corrupt + tiny);
    /// bundle 1: char_00003 (1 img, skipped), char_00004 (4 imgs, mixed case ext), not_a_char/.
    fn make_tree(root: &Path) {
        write_img(&root.join("0/char_00001/img_00001.png"), 40, 40, [255, 0, 0]);
        write_img(&root.join("0/char_00001/img_00002.png"), 40, 40, [0, 255, 0]);
        write_img(&root.join("0/char_00001/img_00003.jpg"), 40, 48, [0, 0, 255]);
        write_img(&root.join("0/char_00002/img_00001.png"), 40, 40, [10, 10, 10]);
        write_img(&root.join("0/char_00002/img_00002.png"), 50, 40, [20, 20, 20]);
        std::fs::write(root.join("0/char_00002/img_00003.jpg"), b"not a jpeg").unwrap();
        write_img(&root.join("0/char_00002/img_00004.png"), 8, 8, [30, 30, 30]);
        std::fs::write(root.join("0/char_00002/notes.txt"), b"ignored").unwrap();
        write_img(&root.join("1/char_00003/img_00001.png"), 40, 40, [1, 2, 3]);
        write_img(&root.join("1/char_00004/a.PNG"), 40, 40, [4, 5, 6]);
        write_img(&root.join("1/char_00004/b.JPEG"), 40, 40, [7, 8, 9]);
        write_img(&root.join("1/char_00004/c.png"), 40, 40, [7, 8, 9]);
        write_img(&root.join("1/char_00004/d.png"), 40, 40, [7, 8, 9]);
        write_img(&root.join("1/not_a_char/x.png"), 40, 40, [7, 8, 9]);
    }

    fn cfg(root: &Path) -> BundleDatasetConfig {
        BundleDatasetConfig { root: root.to_path_buf(), seed: 7, ..Default::default() }
    }

    #[test]
    fn scan_pairs_skips_and_references() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let ds = scan(&cfg(dir.path())).unwrap();
        assert_eq!(ds.bundles, vec!["0", "1"]);
        let names: Vec<_> = ds.characters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["0/char_00001", "0/char_00002", "1/char_00004"]);
        assert!(ds.characters[0].reference.ends_with("img_00001.png"));
        assert!(ds.characters[2].reference.ends_with("a.PNG"));
        assert_eq!(ds.characters[2].targets.len(), 3);
        assert_eq!(ds.skipped_images.len(), 2);
        assert!(ds.skipped_images.iter().any(|s| s.path.ends_with("img_00003.jpg") && s.reason.contains("decode")));
        assert!(ds.skipped_images.iter().any(|s| s.path.ends_with("img_00004.png") && s.reason.contains("too small")));
        assert_eq!(ds.skipped_characters.len(), 1);
        assert_eq!(ds.skipped_characters[0].character, "1/char_00003");
        // pairs: 2 + 1 + 3 = 6
        assert_eq!(ds.num_pairs(), 6);
        assert!(!ds.val.is_empty());
        assert!(!ds.train.is_empty());
        for p in ds.train.iter().chain(&ds.val).chain(&ds.test) {
            assert_ne!(p.reference, p.target);
        }
        let d = ds.describe();
        assert!(d.contains("2 bundle(s)") && d.contains("3 character(s)") && d.contains("2 skipped image(s)"), "{d}");
    }

    #[test]
    fn split_is_deterministic_and_seed_dependent() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let a = scan(&cfg(dir.path())).unwrap();
        let b = scan(&cfg(dir.path())).unwrap();
        assert_eq!(a.train, b.train);
        assert_eq!(a.val, b.val);
        assert_eq!(a.test, b.test);

        // Order of input does not matter.
        let mut pairs: Vec<Pair> = (0..20)
            .map(|i| Pair { character: format!("c{}", i % 4), reference: "r".into(), target: format!("t{i}").into() })
            .collect();
        let mut rev = pairs.clone();
        rev.reverse();
        let s1 = split_pairs(&mut pairs, 0.15, 0.15, 3);
        let s2 = split_pairs(&mut rev, 0.15, 0.15, 3);
        assert_eq!(s1, s2);
        assert_eq!((s1.0.len(), s1.1.len(), s1.2.len()), (14, 3, 3));
        let s3 = split_pairs(&mut pairs, 0.15, 0.15, 4);
        assert_ne!(s1, s3);
    }

    #[test]
    fn split_small_counts() {
        let mk = |n: usize| -> Vec<Pair> {
            (0..n)
                .map(|i| Pair { character: "c".into(), reference: "r".into(), target: format!("t{i}").into() })
                .collect()
        };
        let (tr, va, te) = split_pairs(&mut mk(3), 0.15, 0.15, 0);
        assert_eq!((tr.len(), va.len(), te.len()), (2, 1, 0));
        let (tr, va, te) = split_pairs(&mut mk(1), 0.15, 0.15, 0);
        assert_eq!((tr.len(), va.len(), te.len()), (1, 0, 0));
        let (tr, va, te) = split_pairs(&mut mk(2), 0.5, 0.49, 0);
        assert_eq!(tr.len(), 1);
        assert_eq!(va.len() + te.len(), 1);
    }

    #[test]
    fn max_chars_and_min_images() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let ds = scan(&BundleDatasetConfig { max_chars_per_bundle: Some(1), ..cfg(dir.path()) }).unwrap();
        let names: Vec<_> = ds.characters.iter().map(|c| c.name.as_str()).collect();
        // bundle 1's first character has a single image: the cap counts usable characters only.
        assert_eq!(names, vec!["0/char_00001", "1/char_00004"]);
        let ds = scan(&BundleDatasetConfig { min_images_per_char: 4, ..cfg(dir.path()) }).unwrap();
        let names: Vec<_> = ds.characters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["1/char_00004"]);
    }

    #[test]
    fn missing_root_and_empty_root_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = scan(&cfg(&dir.path().join("nope"))).unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains("char_"), "{err}");
        std::fs::create_dir_all(dir.path().join("0/other")).unwrap();
        let err = scan(&cfg(dir.path())).unwrap_err().to_string();
        assert!(err.contains("no character directories") && err.contains("<bundle>"), "{err}");
        let err = scan(&BundleDatasetConfig { val_fraction: 0.6, test_fraction: 0.5, ..cfg(dir.path()) }).unwrap_err();
        assert!(matches!(err, EngineError::Config(_)));
    }

    #[test]
    fn load_image_crops_resizes_and_scales() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        // 60x40: left 10 px blue, middle 40 px red, right 10 px blue; center crop is all red.
        let img =
            RgbImage::from_fn(60, 40, |x, _| if (10..50).contains(&x) { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
        img.save(&p).unwrap();
        let v = load_image(&p, 16).unwrap();
        assert_eq!(v.len(), 3 * 16 * 16);
        assert!(v[..256].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(v[256..].iter().all(|&x| x.abs() < 1e-6));
        let err = load_image(&dir.path().join("missing.png"), 16).unwrap_err().to_string();
        assert!(err.contains("missing.png"), "{err}");
        std::fs::write(dir.path().join("bad.png"), b"junk").unwrap();
        let err = load_image(&dir.path().join("bad.png"), 16).unwrap_err().to_string();
        assert!(err.contains("bad.png"), "{err}");
    }

    #[test]
    fn batch_and_cache() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let ds = scan(&cfg(dir.path())).unwrap();
        let mut cache = ImageCache::new();
        let pairs: Vec<&Pair> = ds.train.iter().take(2).collect();
        let b = make_pair_batch(&pairs, 8, &mut cache).unwrap();
        assert_eq!(b.reference.shape, vec![2, 3, 8, 8]);
        assert_eq!(b.target.shape, vec![2, 3, 8, 8]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.characters[0], pairs[0].character);
        let n = cache.len();
        assert!(n >= 2);
        let b2 = make_pair_batch(&ds.train[..2], 8, &mut cache).unwrap();
        assert_eq!(cache.len(), n);
        assert_eq!(b.reference, b2.reference);
        let empty: [Pair; 0] = [];
        assert!(make_pair_batch(&empty, 8, &mut cache).is_err());
    }

    #[test]
    fn epoch_order_is_a_stable_permutation() {
        let a = epoch_order(50, 1, 3);
        assert_eq!(a, epoch_order(50, 1, 3));
        assert_ne!(a, epoch_order(50, 1, 4));
        assert_ne!(a, epoch_order(50, 2, 3));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert!(epoch_order(0, 1, 1).is_empty());
    }

    #[test]
    fn config_serde_defaults() {
        let c: BundleDatasetConfig = serde_json::from_str(r#"{"root": "data", "seed": 5}"#).unwrap();
        assert_eq!(c.image_size, 64);
        assert_eq!(c.min_images_per_char, 2);
        assert_eq!(c.min_image_side, 32);
        assert_eq!(c.seed, 5);
        assert_eq!(c.root, PathBuf::from("data"));
    }

    // -----------------------------------------------------------------------------------------
    // The `bundles` layout of `crate::data`

    use crate::data::testutil;
    use crate::data::Severity;

    #[cfg(unix)]
    #[test]
    fn layout_reports_dangling_links_truncated_and_tiny_images() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        make_tree(r);
        testutil::dangling_link(&r.join("0/char_00001/img_00009.jpg"));
        testutil::write_truncated_jpeg(&r.join("1/char_00004/e.jpg"), 64, 64);
        let ds = crate::data::open(&testutil::cfg(r, "bundles"), 7).unwrap();
        let err = |f: &str| {
            ds.problems
                .iter()
                .find(|p| p.path.ends_with(f) && p.severity == Severity::Error)
                .unwrap_or_else(|| panic!("{f}: {:?}", ds.problems))
        };
        assert!(err("img_00009.jpg").message.contains("dangling"), "{:?}", err("img_00009.jpg"));
        assert!(err("e.jpg").message.contains("truncated JPEG"), "{:?}", err("e.jpg"));
        assert!(err("img_00004.png").message.contains("too small"));
        assert!(err("img_00003.jpg").message.contains("decode"));
        assert!(err("char_00003").message.contains("min_images_per_char"));
        // The legacy scan reports the same files.
        let legacy = scan(&cfg(r)).unwrap();
        for f in ["img_00009.jpg", "e.jpg"] {
            assert!(legacy.skipped_images.iter().any(|s| s.path.ends_with(f)), "{f}: {:?}", legacy.skipped_images);
        }
        // Same pairs, same split as the historic API; roles target + reference, square crops.
        assert_eq!(ds.len(), legacy.num_pairs());
        let ids = |v: &[Pair]| {
            v.iter()
                .map(|p| format!("{}/{}", p.character, p.target.file_name().unwrap().to_string_lossy()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ds.train.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids(&legacy.train));
        assert_eq!(ds.val.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids(&legacy.val));
        assert!(ds.square_crop);
        for e in ds.all() {
            assert_eq!(e.images[0].0, "target");
            assert_eq!(e.bucket, (64, 64));
            assert_ne!(e.image("target"), e.image("reference"));
        }
        assert_eq!(ds.image_roles().into_iter().collect::<Vec<_>>(), vec!["reference", "target"]);
        assert!(ds.text_roles().is_empty());
        let d = ds.describe_all();
        assert!(d.contains("img_00009.jpg") && d.contains("layout bundles"), "{d}");
        // The historic square crop is what the dataset's cache produces.
        let e = &ds.train[0];
        let mut cache = ImageCache::for_dataset(&ds);
        let b = crate::data::make_batch(&[e], &mut cache).unwrap();
        assert_eq!(b.image("target").unwrap().data, load_image(e.image("target").unwrap(), 64).unwrap());
    }

    #[test]
    fn layout_buckets_by_target_and_can_keep_everything_for_training() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        testutil::write_img(&r.join("0/char_1/a.png"), 64, 64, 1);
        testutil::write_img(&r.join("0/char_1/b.png"), 128, 64, 2);
        testutil::write_img(&r.join("0/char_1/c.jpg"), 64, 128, 3);
        let mut c = testutil::cfg(r, "bundles");
        c.enable_bucket = true;
        c.split = "none".into();
        let ds = crate::data::open(&c, 1).unwrap();
        assert!(!ds.square_crop && ds.val.is_empty() && ds.test.is_empty());
        let b: Vec<_> = ds.train.iter().map(|e| (e.id.as_str(), e.bucket)).collect();
        assert_eq!(b, vec![("0/char_1/b.png", (80, 48)), ("0/char_1/c.jpg", (48, 80))]);
        let batch = crate::data::make_batch(&[&ds.train[0]], &mut ImageCache::for_dataset(&ds)).unwrap();
        assert_eq!(batch.image("reference").unwrap().shape, vec![1, 3, 48, 80]);
        // No character directory at all: inspect reports it, open refuses.
        let empty = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(empty.path().join("0/other")).unwrap();
        let c = testutil::cfg(empty.path(), "bundles");
        let ds = crate::data::inspect(&c, 0).unwrap();
        assert!(ds.is_empty() && ds.problems[0].message.contains("char_"));
        let e = crate::data::open(&c, 0).unwrap_err().to_string();
        assert!(e.contains("no usable example") && e.contains("char_"), "{e}");
    }
}
