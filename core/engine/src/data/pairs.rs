//! PairEdit's layout (seed 003): `<datasets_folder>/<attr>/{source,target}/<name>`, a source
//! and a target image paired by file stem (the extension may differ), several attributes at
//! once: `data.attributes` (PairEdit's `datasets:` list) names them, empty = every folder that
//! has a `source/` or `target/` subfolder (`data.source_folder` / `data.target_folder`,
//! PairEdit's `source_folder` / `target_folder`).
//!
//! Roles: the target image is `target`, the source image both `reference` and `control`;
//! texts `caption` (the file `<stem><caption_extension>` beside the target, else beside the
//! source, trimmed; without one, the attribute name — PairEdit itself trains with an empty
//! prompt) and `attribute` (the folder name). Example ids are `<attr>/<stem>`.
//!
//! PairEdit pairs the two sorted folder listings by position, so a missing file shifts every
//! later pair; here pairing is by stem and an unpaired file is reported and left out.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::bucket::BucketSelector;
use super::image_io;
use super::{roles, DataSet, Example, Scan, Source};
use crate::config::DataConfig;
use crate::error::{EngineError, Result};

/// What [`open`] expects, quoted in error messages.
pub const EXPECTED_LAYOUT: &str =
    "expected <datasets_folder>/<attribute>/{source,target}/<name>.{jpg,png,…} (PairEdit): \
     source and target images paired by file name, e.g. datasets/age/source/7000.jpg and datasets/age/target/7000.jpg";

/// Opens a PairEdit dataset (see the module docs).
pub fn open(cfg: &DataConfig, seed: u64) -> Result<DataSet> {
    let root = cfg.root.clone();
    if !root.is_dir() {
        let what = if root.exists() { "is not a directory" } else { "does not exist" };
        return Err(EngineError::Dataset { root, message: format!("the datasets folder {what}; {EXPECTED_LAYOUT}") });
    }
    let sel = super::selector_for(cfg)?;
    let mut scan = Scan::new(cfg);
    let attributes = attribute_folders(&mut scan, &root);
    let mut pairs: Vec<FilePair> = Vec::new();
    let mut sources = Vec::new();
    for (attr, dir) in &attributes {
        let start = pairs.len();
        if let Some((n_src, n_tgt)) = attribute_pairs(&mut scan, attr, dir, &mut pairs) {
            sources.push(Source {
                name: attr.clone(),
                path: dir.clone(),
                examples: pairs.len() - start,
                settings: BTreeMap::from([
                    ("source_images".to_string(), serde_json::json!(n_src)),
                    ("target_images".to_string(), serde_json::json!(n_tgt)),
                ]),
            });
        }
    }
    if attributes.is_empty() {
        scan.error(&root, format!("no attribute folders; {EXPECTED_LAYOUT}"));
    }
    let all: Vec<PathBuf> = pairs.iter().flat_map(|p| [p.source.clone(), p.target.clone()]).collect();
    scan.prefetch(&all);
    let mut examples = Vec::new();
    let mut kept: HashMap<String, usize> = HashMap::new();
    for p in pairs {
        if let Some(e) = pair_example(&mut scan, &sel, p) {
            *kept.entry(e.text(roles::ATTRIBUTE).unwrap_or_default().to_string()).or_insert(0) += 1;
            examples.push(e);
        }
    }
    for src in &mut sources {
        src.examples = kept.get(&src.name).copied().unwrap_or(0);
    }
    let split = super::uses_fractions(cfg, true);
    Ok(super::assemble("pairs", root, cfg, seed, split, examples, scan, sel, false, sources, &HashMap::new()))
}

/// A source image, its target of the same stem and its caption file, if any.
struct FilePair {
    attr: String,
    stem: String,
    source: PathBuf,
    target: PathBuf,
    caption: Option<PathBuf>,
}

/// `(attribute, folder)`: `data.attributes`, else every folder of `root` holding a source or
/// target folder (others are a warning).
fn attribute_folders(scan: &mut Scan<'_>, root: &Path) -> Vec<(String, PathBuf)> {
    let cfg = scan.cfg;
    if !cfg.attributes.is_empty() {
        return cfg.attributes.iter().map(|a| (a.clone(), root.join(a))).collect();
    }
    let (sf, tf) = (cfg.source_folder.as_str(), cfg.target_folder.as_str());
    let l = scan.list(root).unwrap_or_default();
    let mut v = Vec::new();
    for d in l.dirs {
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if d.join(sf).is_dir() || d.join(tf).is_dir() {
            v.push((name, d));
        } else {
            scan.warn(&d, format!("ignored: no {sf}/ or {tf}/ folder"));
        }
    }
    v
}

/// The images of `d` by stem.
fn by_stem(scan: &mut Scan<'_>, d: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut m: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    if let Some(l) = scan.list(d) {
        for p in l.images() {
            m.entry(image_io::stem(p)).or_default().push(p.clone());
        }
    }
    m
}

/// Pairs the source and target images of attribute folder `dir` by stem into `pairs`; returns
/// the numbers of source and target images, or `None` (reported) when the folder or one of its
/// two subfolders is missing.
fn attribute_pairs(scan: &mut Scan<'_>, attr: &str, dir: &Path, pairs: &mut Vec<FilePair>) -> Option<(usize, usize)> {
    let cfg = scan.cfg;
    let (sf, tf) = (cfg.source_folder.as_str(), cfg.target_folder.as_str());
    let (sdir, tdir) = (dir.join(sf), dir.join(tf));
    if !dir.is_dir() {
        scan.error(dir, format!("attribute `{attr}` left out: the folder does not exist ({EXPECTED_LAYOUT})"));
        return None;
    }
    let missing: Vec<String> =
        [(&sdir, sf), (&tdir, tf)].into_iter().filter(|(d, _)| !d.is_dir()).map(|(_, n)| format!("{n}/")).collect();
    if !missing.is_empty() {
        scan.error(dir, format!("attribute `{attr}` left out: no {} folder", missing.join(" or ")));
        return None;
    }
    let (src, tgt) = (by_stem(scan, &sdir), by_stem(scan, &tdir));
    for (stem, s) in &src {
        // `data.stems` (PairEdit's `image_ids`) keeps only the named images.
        if !cfg.stems.is_empty() && !cfg.stems.contains(stem) {
            continue;
        }
        let Some(t) = tgt.get(stem) else {
            for p in s {
                scan.error(p, format!("no {tf} image with the same name in {}: left out", tdir.display()));
            }
            continue;
        };
        if s.len() > 1 || t.len() > 1 {
            for p in s.iter().chain(t) {
                scan.error(p, format!("ambiguous: several images named `{stem}.*` in one folder; left out"));
            }
            continue;
        }
        let ext = &cfg.caption_extension;
        let caption =
            [tdir.join(format!("{stem}{ext}")), sdir.join(format!("{stem}{ext}"))].into_iter().find(|p| p.is_file());
        pairs.push(FilePair {
            attr: attr.to_string(),
            stem: stem.clone(),
            source: s[0].clone(),
            target: t[0].clone(),
            caption,
        });
    }
    for want in cfg.stems.iter().filter(|w| !src.contains_key(*w)) {
        scan.error(&sdir, format!("no image named `{want}.*` here (data.stems, PairEdit's image_ids)"));
    }
    for (stem, t) in &tgt {
        if !src.contains_key(stem) {
            for p in t {
                scan.error(p, format!("no {sf} image with the same name in {}: left out", sdir.display()));
            }
        }
    }
    Some((src.values().map(Vec::len).sum(), tgt.values().map(Vec::len).sum()))
}

/// The example of one pair; `None` (reported) when a file is unusable or it has no bucket.
fn pair_example(scan: &mut Scan<'_>, sel: &BucketSelector, p: FilePair) -> Option<Example> {
    let FilePair { attr, stem, source: s, target: t, caption } = p;
    let ss = scan.image(&s);
    let ts = scan.image(&t);
    let text = match &caption {
        Some(c) => scan.read_text(c),
        None => Some(attr.clone()),
    };
    let (Some(_), Some(tsize), Some(text)) = (ss, ts, text) else {
        scan.error(&t, format!("pair `{attr}/{stem}` left out: see the problems of its files"));
        return None;
    };
    let bucket = scan.bucket(sel, &t, tsize)?;
    Some(Example {
        id: format!("{attr}/{stem}"),
        images: vec![(roles::TARGET.into(), t), (roles::REFERENCE.into(), s.clone()), (roles::CONTROL.into(), s)],
        texts: vec![(roles::CAPTION.into(), text), (roles::ATTRIBUTE.into(), attr)],
        bucket,
        sizes: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use crate::data::testutil::{self, write_img};
    use crate::data::{inspect, open, Severity};

    #[cfg(unix)]
    #[test]
    fn pairs_by_stem_over_several_attributes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for a in ["age", "smile"] {
            for n in ["7000", "7001", "7002"] {
                write_img(&r.join(format!("{a}/source/{n}.jpg")), 64, 64, 1);
                write_img(&r.join(format!("{a}/target/{n}.png")), 64, 96, 2);
            }
        }
        std::fs::write(r.join("smile/target/7001.txt"), "a smiling face\n").unwrap();
        // Orphans, a duplicate stem, a truncated target, a dangling source, a tiny source.
        write_img(&r.join("age/source/8000.jpg"), 64, 64, 3);
        write_img(&r.join("age/target/9000.jpg"), 64, 64, 3);
        write_img(&r.join("smile/source/7003.jpg"), 64, 64, 4);
        write_img(&r.join("smile/source/7003.png"), 64, 64, 4);
        write_img(&r.join("smile/target/7003.jpg"), 64, 64, 4);
        write_img(&r.join("glasses/source/1.jpg"), 64, 64, 5);
        testutil::write_truncated_jpeg(&r.join("glasses/target/1.jpg"), 64, 64);
        testutil::dangling_link(&r.join("glasses/source/2.jpg"));
        write_img(&r.join("glasses/target/2.jpg"), 64, 64, 5);
        write_img(&r.join("glasses/source/3.jpg"), 16, 16, 5);
        write_img(&r.join("glasses/target/3.jpg"), 64, 64, 5);
        std::fs::create_dir_all(r.join("prompts")).unwrap();

        let ds = open(&testutil::cfg(r, "pairs"), 5).unwrap();
        let mut ids: Vec<&str> = ds.all().map(|e| e.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, vec!["age/7000", "age/7001", "age/7002", "smile/7000", "smile/7001", "smile/7002"]);
        let e = ds.all().find(|e| e.id == "smile/7001").unwrap();
        assert_eq!(e.text("caption"), Some("a smiling face"));
        assert_eq!(e.text("attribute"), Some("smile"));
        assert!(e.image("target").unwrap().ends_with("smile/target/7001.png"));
        assert_eq!(e.image("reference"), e.image("control"));
        assert!(e.image("reference").unwrap().ends_with("smile/source/7001.jpg"));
        assert_eq!(ds.all().find(|e| e.id == "age/7000").unwrap().text("caption"), Some("age"));
        let err = |f: &str| {
            ds.problems
                .iter()
                .find(|p| p.path.ends_with(f) && p.severity == Severity::Error)
                .unwrap_or_else(|| panic!("{f}: {:#?}", ds.problems))
                .message
                .clone()
        };
        assert!(err("age/source/8000.jpg").contains("no target image"));
        assert!(err("age/target/9000.jpg").contains("no source image"));
        assert!(err("smile/source/7003.png").contains("ambiguous"));
        assert!(err("glasses/target/1.jpg").contains("truncated JPEG"));
        assert!(err("glasses/source/2.jpg").contains("dangling"));
        assert!(err("glasses/source/3.jpg").contains("too small"));
        assert!(ds.problems.iter().any(|p| p.path.ends_with("prompts") && p.severity == Severity::Warning));
        assert_eq!(
            ds.sources.iter().map(|s| (s.name.as_str(), s.examples)).collect::<Vec<_>>(),
            vec![("age", 3), ("glasses", 0), ("smile", 3)]
        );

        // Only the listed attributes; a missing one is an error.
        let mut c = testutil::cfg(r, "pairs");
        c.attributes = vec!["smile".into(), "beard".into()];
        c.enable_bucket = true;
        let ds = inspect(&c, 5).unwrap();
        assert_eq!(ds.len(), 3);
        assert!(ds.all().all(|e| e.id.starts_with("smile/") && e.bucket == (48, 80)));
        assert!(ds.problems.iter().any(|p| p.path.ends_with("beard") && p.message.contains("does not exist")));
    }
}
