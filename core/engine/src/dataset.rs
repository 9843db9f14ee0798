//! The bundle dataset of seed 000: `<root>/<bundle>/char_*/img_*`, one person per `char_*`
//! directory, the alphabetically first image being that person's reference and every other
//! image a target. Scanning never crashes on a bad image: it is reported and skipped.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use likeness_abi::CpuTensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// The layout [`scan`] expects, quoted in its error messages.
pub const EXPECTED_LAYOUT: &str =
    "expected <root>/<bundle>/char_<id>/<image>.{jpg,jpeg,png}, e.g. dataset/0/char_00001/img_00001.jpg \
     (each char_* directory holds images of one person; the alphabetically first is the reference)";

/// Image extensions the dataset accepts (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

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
            let _ = write!(
                s,
                "\n  ... and {} more skipped image(s)",
                self.skipped_images.len() - SHOW
            );
        }
        for sk in self.skipped_characters.iter().take(SHOW) {
            let _ = write!(s, "\n  skipped character {}: {}", sk.character, sk.reason);
        }
        if self.skipped_characters.len() > SHOW {
            let _ = write!(
                s,
                "\n  ... and {} more skipped character(s)",
                self.skipped_characters.len() - SHOW
            );
        }
        s
    }
}

fn dataset_err(root: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Dataset {
        root: root.to_path_buf(),
        message: message.into(),
    }
}

/// Sorted subdirectories (name, path) of `dir`.
fn sorted_subdirs(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.is_dir() {
            out.push((entry.file_name().to_string_lossy().into_owned(), path));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
        .unwrap_or(false)
}

/// Checks one image; `Err(reason)` means skip it.
fn check_image(path: &Path, cfg: &BundleDatasetConfig) -> std::result::Result<(), String> {
    let (w, h) = if cfg.verify_decode {
        let img = image::ImageReader::open(path)
            .map_err(|e| format!("cannot read: {e}"))?
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))?
            .decode()
            .map_err(|e| format!("cannot decode: {e}"))?;
        (img.width(), img.height())
    } else {
        image::ImageReader::open(path)
            .map_err(|e| format!("cannot read: {e}"))?
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))?
            .into_dimensions()
            .map_err(|e| format!("cannot decode header: {e}"))?
    };
    if w.min(h) < cfg.min_image_side {
        return Err(format!(
            "too small: {w}x{h}, the shorter side must be at least {} (min_image_side)",
            cfg.min_image_side
        ));
    }
    Ok(())
}

fn validate_config(cfg: &BundleDatasetConfig) -> Result<()> {
    let frac_ok = |f: f64| f.is_finite() && (0.0..1.0).contains(&f);
    if !frac_ok(cfg.val_fraction)
        || !frac_ok(cfg.test_fraction)
        || cfg.val_fraction + cfg.test_fraction >= 1.0
    {
        return Err(EngineError::Config(format!(
            "dataset: val_fraction ({}) and test_fraction ({}) must each be in [0, 1) and sum to less than 1",
            cfg.val_fraction, cfg.test_fraction
        )));
    }
    if cfg.image_size == 0 {
        return Err(EngineError::Config(
            "dataset: image_size must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Scans `cfg.root`, reports and skips bad images and characters, builds the pairs and splits
/// them deterministically by `cfg.seed`.
pub fn scan(cfg: &BundleDatasetConfig) -> Result<Dataset> {
    validate_config(cfg)?;
    let root = cfg.root.as_path();
    if !root.is_dir() {
        let what = if root.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(dataset_err(
            root,
            format!("the dataset root {what}; {EXPECTED_LAYOUT}"),
        ));
    }
    let bundles =
        sorted_subdirs(root).map_err(|e| dataset_err(root, format!("cannot list: {e}")))?;
    let min_images = cfg.min_images_per_char.max(2);

    let mut bundle_names = Vec::new();
    let mut characters = Vec::new();
    let mut skipped_images = Vec::new();
    let mut skipped_characters = Vec::new();
    let mut found_chars = 0usize;

    for (bundle, bundle_path) in &bundles {
        let chars = sorted_subdirs(bundle_path)
            .map_err(|e| EngineError::io(bundle_path, format!("cannot list: {e}")))?;
        let chars: Vec<_> = chars
            .into_iter()
            .filter(|(n, _)| n.starts_with("char_"))
            .collect();
        if chars.is_empty() {
            continue;
        }
        bundle_names.push(bundle.clone());
        found_chars += chars.len();
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
            let mut files = Vec::new();
            match std::fs::read_dir(char_path) {
                Ok(rd) => {
                    for entry in rd.flatten() {
                        let p = entry.path();
                        if p.is_file() && is_image_path(&p) {
                            files.push(p);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %char_path.display(), "skipping character: cannot list: {e}");
                    skipped_characters.push(SkippedCharacter {
                        character: name,
                        reason: format!("cannot list: {e}"),
                    });
                    continue;
                }
            }
            files.sort();
            let mut usable = Vec::with_capacity(files.len());
            for p in files {
                match check_image(&p, cfg) {
                    Ok(()) => usable.push(p),
                    Err(reason) => {
                        tracing::warn!(path = %p.display(), "skipping image: {reason}");
                        skipped_images.push(SkippedImage { path: p, reason });
                    }
                }
            }
            if usable.len() < min_images {
                let reason = format!(
                    "{} usable image(s), fewer than min_images_per_char = {min_images}",
                    usable.len()
                );
                tracing::warn!(path = %char_path.display(), "skipping character: {reason}");
                skipped_characters.push(SkippedCharacter {
                    character: name,
                    reason,
                });
                continue;
            }
            let reference = usable.remove(0);
            kept += 1;
            characters.push(Character {
                name,
                bundle: bundle.clone(),
                reference,
                targets: usable,
            });
        }
    }

    if found_chars == 0 {
        return Err(dataset_err(
            root,
            format!("no character directories (char_*) found; {EXPECTED_LAYOUT}"),
        ));
    }
    if characters.is_empty() {
        let first = skipped_characters
            .first()
            .map(|s| format!(" (e.g. {}: {})", s.character, s.reason))
            .unwrap_or_default();
        return Err(dataset_err(
            root,
            format!(
                "{found_chars} character director(ies) found but none usable{first}; {} image(s) skipped; {EXPECTED_LAYOUT}",
                skipped_images.len()
            ),
        ));
    }

    let mut pairs: Vec<Pair> = characters
        .iter()
        .flat_map(|c| {
            c.targets.iter().map(move |t| Pair {
                character: c.name.clone(),
                reference: c.reference.clone(),
                target: t.clone(),
            })
        })
        .collect();
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
    })
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

/// The order of `n` training examples in `epoch`: a permutation seeded by (`seed`, `epoch`), so a
/// resumed run sees exactly the order the interrupted one would have.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(b"epochord");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// Decodes an image, converts it to RGB, center-crops it to a square and resizes it to
/// `size`×`size` (triangle filter); returns CHW `f32` in [0, 1].
pub fn load_image(path: &Path, size: u32) -> Result<Vec<f32>> {
    let img_err = |message: String| EngineError::Image {
        path: path.to_path_buf(),
        message,
    };
    if size == 0 {
        return Err(img_err("requested size 0".into()));
    }
    let img = image::ImageReader::open(path)
        .map_err(|e| EngineError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| EngineError::io(path, e))?
        .decode()
        .map_err(|e| img_err(e.to_string()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(img_err(format!("empty image {w}x{h}")));
    }
    let side = w.min(h);
    let square =
        image::imageops::crop_imm(&img, (w - side) / 2, (h - side) / 2, side, side).to_image();
    let resized = if side == size {
        square
    } else {
        image::imageops::resize(&square, size, size, image::imageops::FilterType::Triangle)
    };
    let plane = (size * size) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in resized.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c] as f32 / 255.0;
        }
    }
    Ok(out)
}

/// Decoded images keyed by (path, size), so each image is decoded once per run.
#[derive(Debug, Default, Clone)]
pub struct ImageCache {
    images: HashMap<(PathBuf, u32), Arc<Vec<f32>>>,
}

impl ImageCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The CHW image at `path` resized to `size`, decoded on first use.
    pub fn get(&mut self, path: &Path, size: u32) -> Result<Arc<Vec<f32>>> {
        if let Some(img) = self.images.get(&(path.to_path_buf(), size)) {
            return Ok(img.clone());
        }
        let img = Arc::new(load_image(path, size)?);
        self.images.insert((path.to_path_buf(), size), img.clone());
        Ok(img)
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
    }
}

/// A batch ready for a model: references and targets as `[B, 3, S, S]` tensors in [0, 1].
#[derive(Debug, Clone)]
pub struct Batch {
    pub reference: CpuTensor<f32>,
    pub target: CpuTensor<f32>,
    /// Character name of each sample (`<bundle>/<char_dir>`).
    pub characters: Vec<String>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.characters.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.characters.is_empty()
    }
}

/// Loads (through `cache`) and stacks the images of `pairs`; takes `&[Pair]` or `&[&Pair]`.
pub fn make_batch<P: Borrow<Pair>>(
    pairs: &[P],
    size: u32,
    cache: &mut ImageCache,
) -> Result<Batch> {
    if pairs.is_empty() {
        return Err(EngineError::Other(
            "make_batch: no pairs given (batch size 0)".into(),
        ));
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
    Ok(Batch {
        reference: CpuTensor::new(shape.clone(), reference),
        target: CpuTensor::new(shape, target),
        characters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn write_img(path: &Path, w: u32, h: u32, color: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, Rgb(color)).save(path).unwrap();
    }

    /// 2 bundles; bundle 0: char_00001 (3 imgs), char_00002 (2 imgs + corrupt + tiny);
    /// bundle 1: char_00003 (1 img, skipped), char_00004 (4 imgs, mixed case ext), not_a_char/.
    fn make_tree(root: &Path) {
        write_img(
            &root.join("0/char_00001/img_00001.png"),
            40,
            40,
            [255, 0, 0],
        );
        write_img(
            &root.join("0/char_00001/img_00002.png"),
            40,
            40,
            [0, 255, 0],
        );
        write_img(
            &root.join("0/char_00001/img_00003.jpg"),
            40,
            48,
            [0, 0, 255],
        );
        write_img(
            &root.join("0/char_00002/img_00001.png"),
            40,
            40,
            [10, 10, 10],
        );
        write_img(
            &root.join("0/char_00002/img_00002.png"),
            50,
            40,
            [20, 20, 20],
        );
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
        BundleDatasetConfig {
            root: root.to_path_buf(),
            seed: 7,
            ..Default::default()
        }
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
        assert!(ds
            .skipped_images
            .iter()
            .any(|s| s.path.ends_with("img_00003.jpg") && s.reason.contains("decode")));
        assert!(ds
            .skipped_images
            .iter()
            .any(|s| s.path.ends_with("img_00004.png") && s.reason.contains("too small")));
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
        assert!(
            d.contains("2 bundle(s)")
                && d.contains("3 character(s)")
                && d.contains("2 skipped image(s)"),
            "{d}"
        );
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
            .map(|i| Pair {
                character: format!("c{}", i % 4),
                reference: "r".into(),
                target: format!("t{i}").into(),
            })
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
                .map(|i| Pair {
                    character: "c".into(),
                    reference: "r".into(),
                    target: format!("t{i}").into(),
                })
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
        let ds = scan(&BundleDatasetConfig {
            max_chars_per_bundle: Some(1),
            ..cfg(dir.path())
        })
        .unwrap();
        let names: Vec<_> = ds.characters.iter().map(|c| c.name.as_str()).collect();
        // bundle 1's first character has a single image: the cap counts usable characters only.
        assert_eq!(names, vec!["0/char_00001", "1/char_00004"]);
        let ds = scan(&BundleDatasetConfig {
            min_images_per_char: 4,
            ..cfg(dir.path())
        })
        .unwrap();
        let names: Vec<_> = ds.characters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["1/char_00004"]);
    }

    #[test]
    fn missing_root_and_empty_root_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = scan(&cfg(&dir.path().join("nope")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("char_"),
            "{err}"
        );
        std::fs::create_dir_all(dir.path().join("0/other")).unwrap();
        let err = scan(&cfg(dir.path())).unwrap_err().to_string();
        assert!(
            err.contains("no character directories") && err.contains("<bundle>"),
            "{err}"
        );
        let err = scan(&BundleDatasetConfig {
            val_fraction: 0.6,
            test_fraction: 0.5,
            ..cfg(dir.path())
        })
        .unwrap_err();
        assert!(matches!(err, EngineError::Config(_)));
    }

    #[test]
    fn load_image_crops_resizes_and_scales() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        // 60x40: left 10 px blue, middle 40 px red, right 10 px blue; center crop is all red.
        let img = RgbImage::from_fn(60, 40, |x, _| {
            if (10..50).contains(&x) {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        img.save(&p).unwrap();
        let v = load_image(&p, 16).unwrap();
        assert_eq!(v.len(), 3 * 16 * 16);
        assert!(v[..256].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(v[256..].iter().all(|&x| x.abs() < 1e-6));
        let err = load_image(&dir.path().join("missing.png"), 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.png"), "{err}");
        std::fs::write(dir.path().join("bad.png"), b"junk").unwrap();
        let err = load_image(&dir.path().join("bad.png"), 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.png"), "{err}");
    }

    #[test]
    fn batch_and_cache() {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        let ds = scan(&cfg(dir.path())).unwrap();
        let mut cache = ImageCache::new();
        let pairs: Vec<&Pair> = ds.train.iter().take(2).collect();
        let b = make_batch(&pairs, 8, &mut cache).unwrap();
        assert_eq!(b.reference.shape, vec![2, 3, 8, 8]);
        assert_eq!(b.target.shape, vec![2, 3, 8, 8]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.characters[0], pairs[0].character);
        let n = cache.len();
        assert!(n >= 2);
        let b2 = make_batch(&ds.train[..2], 8, &mut cache).unwrap();
        assert_eq!(cache.len(), n);
        assert_eq!(b.reference, b2.reference);
        let empty: [Pair; 0] = [];
        assert!(make_batch(&empty, 8, &mut cache).is_err());
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
        let c: BundleDatasetConfig =
            serde_json::from_str(r#"{"root": "data", "seed": 5}"#).unwrap();
        assert_eq!(c.image_size, 64);
        assert_eq!(c.min_images_per_char, 2);
        assert_eq!(c.min_image_side, 32);
        assert_eq!(c.seed, 5);
        assert_eq!(c.root, PathBuf::from("data"));
    }
}
