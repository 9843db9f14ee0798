//! DRIP's layout (seed 002): `<root>/person_*/{ref_face.jpg, orig.jpg, prompt.txt}`, one
//! example per person folder: `orig.jpg` is the `target`, `ref_face.jpg` the `reference`,
//! `prompt.txt` (trimmed) the `caption`. `ref_face` and `orig` may have any image extension
//! (`.jpg` preferred, then `.jpeg`, `.png`, …).
//!
//! Every subfolder of the root is a candidate (DRIP's inference folders are `sample_*`, so
//! the `person_` prefix is not required); one holding none of the three files is a warning.
//! A folder missing one of them is left out and reported: DRIP reads all three and would stop.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::image_io;
use super::{roles, DataSet, Example, Scan, Source};
use crate::config::DataConfig;
use crate::error::{EngineError, Result};

/// What [`open`] expects, quoted in error messages.
pub const EXPECTED_LAYOUT: &str =
    "expected <root>/person_<id>/{ref_face.jpg, orig.jpg, prompt.txt} (DRIP): the reference face, \
     the target image and its prompt in each person folder";

/// The image `<dir>/<stem>.<ext>` with the first existing extension of [`image_io::IMAGE_EXTENSIONS`]
/// (any case); also finds a dangling link of that name.
pub fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    let mut found: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let ok = p.file_stem().is_some_and(|s| s == stem);
            let ext = p.extension()?.to_str()?.to_ascii_lowercase();
            let rank = image_io::IMAGE_EXTENSIONS.iter().position(|x| *x == ext)?;
            ok.then_some((rank, p))
        })
        .collect();
    found.sort();
    found.into_iter().next().map(|(_, p)| p)
}

/// One person folder's files.
struct Person {
    dir: PathBuf,
    id: String,
    reference: PathBuf,
    orig: PathBuf,
    prompt: PathBuf,
}

/// The files of person folder `dir`; `None` when it is not one (a warning) or lacks one of
/// DRIP's three files (an error). Other images in it are a warning.
fn person(scan: &mut Scan<'_>, dir: &Path) -> Option<Person> {
    let l = scan.list(dir).unwrap_or_default();
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let reference = find_file(dir, "ref_face");
    let orig = find_file(dir, "orig");
    let prompt = dir.join("prompt.txt");
    let has_prompt = prompt.is_file();
    if reference.is_none() && orig.is_none() && !has_prompt && !l.broken.iter().any(|(p, _)| p.ends_with("prompt.txt"))
    {
        scan.warn(dir, format!("ignored: no ref_face.jpg, orig.jpg or prompt.txt in {}", name(dir)));
        return None;
    }
    for f in &l.files {
        let n = name(f);
        let known = Some(f) == reference.as_ref() || Some(f) == orig.as_ref() || n == "prompt.txt";
        if !known && image_io::is_image_path(f) {
            scan.warn(f, "ignored: DRIP uses only ref_face.jpg, orig.jpg and prompt.txt");
        }
    }
    let mut missing = Vec::new();
    if reference.is_none() {
        missing.push("ref_face.jpg");
    }
    if orig.is_none() {
        missing.push("orig.jpg");
    }
    if !has_prompt {
        missing.push("prompt.txt");
    }
    if !missing.is_empty() {
        scan.error(dir, format!("person left out: missing {} ({EXPECTED_LAYOUT})", missing.join(", ")));
        return None;
    }
    let (reference, orig) = (reference.unwrap_or_default(), orig.unwrap_or_default());
    Some(Person { dir: dir.to_path_buf(), id: name(dir), reference, orig, prompt })
}

/// Opens a DRIP dataset (see the module docs).
pub fn open(cfg: &DataConfig, seed: u64) -> Result<DataSet> {
    let root = cfg.root.clone();
    if !root.is_dir() {
        let what = if root.exists() { "is not a directory" } else { "does not exist" };
        return Err(EngineError::Dataset { root, message: format!("the dataset root {what}; {EXPECTED_LAYOUT}") });
    }
    let sel = super::selector_for(cfg)?;
    let mut scan = Scan::new(cfg);
    let listing = scan.list(&root).unwrap_or_default();
    let people: Vec<Person> = listing.dirs.iter().filter_map(|dir| person(&mut scan, dir)).collect();
    let candidates: Vec<PathBuf> = people.iter().flat_map(|p| [p.reference.clone(), p.orig.clone()]).collect();
    scan.prefetch(&candidates);
    let mut examples = Vec::new();
    for Person { dir, id, reference, orig, prompt } in people {
        let r = scan.image(&reference);
        let o = scan.image(&orig);
        let text = scan.read_text(&prompt);
        let (Some(_), Some(osize), Some(text)) = (r, o, text) else {
            scan.error(&dir, "person left out: see the problems of its files");
            continue;
        };
        if text.is_empty() {
            scan.warn(&prompt, "empty prompt (kept: the caption is empty)");
        }
        let Some(bucket) = scan.bucket(&sel, &orig, osize) else {
            continue;
        };
        examples.push(Example {
            id,
            images: vec![(roles::TARGET.into(), orig), (roles::REFERENCE.into(), reference)],
            texts: vec![(roles::CAPTION.into(), text)],
            bucket,
            sizes: Default::default(),
        });
    }
    if listing.dirs.is_empty() {
        scan.error(&root, format!("no person folders; {EXPECTED_LAYOUT}"));
    }
    let sources = vec![Source {
        name: "drip".into(),
        path: root.clone(),
        examples: examples.len(),
        settings: BTreeMap::from([("person_folders".to_string(), serde_json::json!(listing.dirs.len()))]),
    }];
    let split = super::uses_fractions(cfg, true);
    Ok(super::assemble("drip", root, cfg, seed, split, examples, scan, sel, false, sources, &HashMap::new()))
}

#[cfg(test)]
mod tests {
    use crate::data::testutil::{self, write_img};
    use crate::data::{open, Severity};

    #[cfg(unix)]
    #[test]
    fn drip_examples_and_bad_input() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (i, p) in ["person_001", "person_002", "person_003", "person_004"].iter().enumerate() {
            write_img(&r.join(p).join("ref_face.jpg"), 48, 48, i as u8);
            write_img(&r.join(p).join("orig.jpg"), 96, 64, i as u8);
            std::fs::write(r.join(p).join("prompt.txt"), format!("  a photo of person {i}\n")).unwrap();
        }
        // PNG reference is accepted.
        std::fs::remove_file(r.join("person_004/ref_face.jpg")).unwrap();
        write_img(&r.join("person_004/ref_face.png"), 48, 48, 4);
        // Missing prompt, truncated JPEG, tiny reference, dangling orig, empty prompt.
        write_img(&r.join("person_005/ref_face.jpg"), 48, 48, 5);
        write_img(&r.join("person_005/orig.jpg"), 48, 48, 5);
        write_img(&r.join("person_006/ref_face.jpg"), 48, 48, 6);
        testutil::write_truncated_jpeg(&r.join("person_006/orig.jpg"), 64, 64);
        std::fs::write(r.join("person_006/prompt.txt"), "x").unwrap();
        write_img(&r.join("person_007/ref_face.jpg"), 8, 8, 7);
        write_img(&r.join("person_007/orig.jpg"), 48, 48, 7);
        std::fs::write(r.join("person_007/prompt.txt"), "x").unwrap();
        write_img(&r.join("person_008/ref_face.jpg"), 48, 48, 8);
        testutil::dangling_link(&r.join("person_008/orig.jpg"));
        std::fs::write(r.join("person_008/prompt.txt"), "x").unwrap();
        std::fs::write(r.join("person_003/prompt.txt"), "   ").unwrap();
        std::fs::create_dir_all(r.join("notes")).unwrap();
        write_img(&r.join("person_001/extra.png"), 48, 48, 1);

        let ds = open(&testutil::cfg(r, "drip"), 3).unwrap();
        let mut ids: Vec<&str> = ds.all().map(|e| e.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, vec!["person_001", "person_002", "person_003", "person_004"]);
        let find = |f: &str, s: Severity| {
            ds.problems
                .iter()
                .find(|p| p.path.ends_with(f) && p.severity == s)
                .unwrap_or_else(|| panic!("{f}: {:#?}", ds.problems))
                .message
                .clone()
        };
        assert!(find("person_005", Severity::Error).contains("missing prompt.txt"));
        assert!(find("person_006/orig.jpg", Severity::Error).contains("truncated JPEG"));
        assert!(find("person_007/ref_face.jpg", Severity::Error).contains("too small"));
        assert!(find("person_008/orig.jpg", Severity::Error).contains("dangling"));
        assert!(find("person_003/prompt.txt", Severity::Warning).contains("empty prompt"));
        assert!(find("notes", Severity::Warning).contains("ignored"));
        assert!(find("person_001/extra.png", Severity::Warning).contains("ignored"));
        let e = ds.all().find(|e| e.id == "person_001").unwrap();
        assert!(e.image("target").unwrap().ends_with("orig.jpg"));
        assert!(e.image("reference").unwrap().ends_with("ref_face.jpg"));
        assert_eq!(e.text("caption"), Some("a photo of person 0"));
        assert!(ds.all().find(|e| e.id == "person_004").unwrap().image("reference").unwrap().ends_with("ref_face.png"));
        assert_eq!(e.bucket, (64, 64));
        assert_eq!(ds.len(), 4);
        assert_eq!((ds.train.len(), ds.val.len(), ds.test.len()), (2, 1, 1));
        // The split is deterministic in the seed.
        let again = open(&testutil::cfg(r, "drip"), 3).unwrap();
        assert_eq!(again.train, ds.train);
        // Bucketing on: the target decides (96x64 → 80x48 at resolution 64).
        let mut c = testutil::cfg(r, "drip");
        c.enable_bucket = true;
        let ds = open(&c, 3).unwrap();
        assert!(ds.all().all(|e| e.bucket == (80, 48)));
    }

    #[test]
    fn nothing_usable_is_an_error_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        write_img(&d.path().join("person_001/orig.jpg"), 48, 48, 1);
        let e = open(&testutil::cfg(d.path(), "drip"), 0).unwrap_err().to_string();
        assert!(e.contains("no usable example") && e.contains("ref_face.jpg") && e.contains("person_001"), "{e}");
    }
}
