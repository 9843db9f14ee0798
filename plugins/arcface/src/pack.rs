//! InsightFace model packs: which detector and recognizer ONNX files a pack name means, and
//! where they are looked for.
//!
//! A pack is a folder `<root>/<name>/` as `insightface.app.FaceAnalysis(name=...)` downloads it
//! to `~/.insightface/models/<name>/`. The roots searched, in order: the config's `model_root`,
//! `$INSIGHTFACE_HOME/models`, `~/.insightface/models`. Explicit `detector` / `recognizer`
//! paths override the pack's files one by one.

use std::path::{Path, PathBuf};

/// The packs this plugin knows: `(name, detector file, recognizer file)`.
pub const PACKS: &[(&str, &str, &str)] = &[
    ("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"),
    ("buffalo_s", "det_500m.onnx", "w600k_mbf.onnx"),
    ("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
];

/// The pack insightface's `FaceAnalysis` uses by default.
pub const DEFAULT_PACK: &str = "buffalo_l";

/// The files one pack resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackFiles {
    pub detector: PathBuf,
    pub recognizer: PathBuf,
}

/// The detector and recognizer file names of a known pack.
pub fn pack_files(name: &str) -> Option<(&'static str, &'static str)> {
    PACKS.iter().find(|p| p.0 == name).map(|p| (p.1, p.2))
}

/// The model roots searched, in order: `model_root` (when given), `$INSIGHTFACE_HOME/models`,
/// `~/.insightface/models`.
pub fn search_roots(model_root: Option<&Path>) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(r) = model_root {
        roots.push(r.to_path_buf());
    }
    if let Some(h) = std::env::var_os("INSIGHTFACE_HOME").filter(|h| !h.is_empty()) {
        roots.push(PathBuf::from(h).join("models"));
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        roots.push(PathBuf::from(h).join(".insightface/models"));
    }
    roots
}

fn where_to_get(name: &str) -> String {
    format!(
        "InsightFace distributes the `{name}` pack through its model zoo \
         (https://github.com/deepinsight/insightface/tree/master/model_zoo; \
         `python -c \"import insightface; insightface.app.FaceAnalysis(name='{name}')\"` downloads and unpacks it \
         into ~/.insightface/models/{name}/); put the folder under one of the roots above, set `model_root`, \
         or name the files with the `detector` / `recognizer` config keys"
    )
}

/// Resolves a pack (and explicit overrides) to existing files, or an error that names the
/// missing file, every place it looked, and where the pack comes from.
pub fn resolve(
    name: &str,
    model_root: Option<&Path>,
    detector: Option<&Path>,
    recognizer: Option<&Path>,
) -> Result<PackFiles, String> {
    let explicit = |p: &Path, what: &str| -> Result<PathBuf, String> {
        if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("the {what} ONNX file given in the config (`{what}`: {}) does not exist", p.display()))
        }
    };
    let det = detector.map(|p| explicit(p, "detector")).transpose()?;
    let rec = recognizer.map(|p| explicit(p, "recognizer")).transpose()?;
    if let (Some(detector), Some(recognizer)) = (&det, &rec) {
        return Ok(PackFiles { detector: detector.clone(), recognizer: recognizer.clone() });
    }
    let Some((det_file, rec_file)) = pack_files(name) else {
        let known: Vec<&str> = PACKS.iter().map(|p| p.0).collect();
        return Err(format!(
            "unknown model pack `{name}` (known: {}); or give explicit `detector` and `recognizer` paths",
            known.join(", ")
        ));
    };
    let roots = search_roots(model_root);
    let find = |file: &str, what: &str| -> Result<PathBuf, String> {
        for r in &roots {
            let p = r.join(name).join(file);
            if p.is_file() {
                return Ok(p);
            }
        }
        let looked: Vec<String> = roots.iter().map(|r| format!("  {}", r.join(name).join(file).display())).collect();
        Err(format!(
            "model pack `{name}`: the {what} `{file}` was not found; looked in (config `model_root`, \
             $INSIGHTFACE_HOME/models, ~/.insightface/models):\n{}\n{}",
            if looked.is_empty() { "  (no root: set `model_root`)".to_string() } else { looked.join("\n") },
            where_to_get(name)
        ))
    };
    let detector = match det {
        Some(d) => d,
        None => find(det_file, "detector")?,
    };
    let recognizer = match rec {
        Some(r) => r,
        None => find(rec_file, "recognizer")?,
    };
    Ok(PackFiles { detector, recognizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_error_names_file_dirs_and_source() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("buffalo_l")).unwrap();
        std::fs::write(dir.path().join("buffalo_l/det_10g.onnx"), b"x").unwrap();
        let e = resolve("buffalo_l", Some(dir.path()), None, None).unwrap_err();
        assert!(e.contains("w600k_r50.onnx"), "{e}");
        assert!(e.contains(&dir.path().join("buffalo_l/w600k_r50.onnx").display().to_string()), "{e}");
        assert!(e.contains(".insightface/models") && e.contains("FaceAnalysis(name='buffalo_l')"), "{e}");
        std::fs::write(dir.path().join("buffalo_l/w600k_r50.onnx"), b"x").unwrap();
        let p = resolve("buffalo_l", Some(dir.path()), None, None).unwrap();
        assert_eq!(p.detector, dir.path().join("buffalo_l/det_10g.onnx"));
        let e = resolve("buffalo_xl", Some(dir.path()), None, None).unwrap_err();
        assert!(e.contains("antelopev2"), "{e}");
        let e = resolve("buffalo_l", None, Some(&dir.path().join("nope.onnx")), None).unwrap_err();
        assert!(e.contains("nope.onnx") && e.contains("detector"), "{e}");
        assert_eq!(pack_files("antelopev2"), Some(("scrfd_10g_bnkps.onnx", "glintr100.onnx")));
    }
}
