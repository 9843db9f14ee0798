//! `plugin.toml`: what a plugin is, without opening its library.

use std::path::{Path, PathBuf};

use likeness_abi::{AbiVersion, PluginKind};
use serde::Deserialize;

use crate::{EngineError, Result};

/// A parsed `plugin.toml`.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub id: String,
    pub kind: PluginKind,
    pub version: String,
    pub abi: AbiVersion,
    /// Absolute path of the library (resolved against the manifest's directory).
    pub library: PathBuf,
    pub summary: String,
    pub requires: Requires,
    /// Where the manifest was read from.
    pub path: PathBuf,
}

/// Versions of heavy runtimes the library needs (`[requires]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Requires {
    pub libtorch: Option<String>,
    pub onnxruntime: Option<String>,
    pub cuda: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    plugin: RawPlugin,
    #[serde(default)]
    requires: Requires,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    id: String,
    kind: String,
    version: String,
    abi: String,
    library: String,
    #[serde(default)]
    summary: String,
}

impl Manifest {
    /// Reads and validates a manifest. Errors name the file and the field.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let bad = |msg: String| EngineError::Manifest { path: path.to_path_buf(), message: msg };
        let raw: RawFile = toml::from_str(text).map_err(|e| bad(e.message().to_string() + &span_hint(text, e.span())))?;
        let p = raw.plugin;
        let kind = match p.kind.as_str() {
            "model" => PluginKind::Model,
            "metric" => PluginKind::Metric,
            "loss" => PluginKind::Loss,
            other => return Err(bad(format!("`plugin.kind` is `{other}`; expected one of model, metric, loss"))),
        };
        let abi = parse_abi(&p.abi).ok_or_else(|| bad(format!("`plugin.abi` is `{}`; expected MAJOR.MINOR such as \"1.0\"", p.abi)))?;
        if p.id.is_empty() || !p.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(bad(format!("`plugin.id` `{}` must be non-empty and use only letters, digits, '-' and '_'", p.id)));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        Ok(Manifest {
            id: p.id,
            kind,
            version: p.version,
            abi,
            library: dir.join(p.library),
            summary: p.summary,
            requires: raw.requires,
            path: path.to_path_buf(),
        })
    }
}

fn parse_abi(s: &str) -> Option<AbiVersion> {
    let (a, b) = s.split_once('.')?;
    Some(AbiVersion { major: a.trim().parse().ok()?, minor: b.trim().parse().ok()? })
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_library_next_to_manifest() {
        let m = Manifest::parse(
            "[plugin]\nid='pixel'\nkind='loss'\nversion='0.1.0'\nabi='1.0'\nlibrary='libx.so'\n[requires]\nlibtorch='2.13.0'\n",
            Path::new("/p/pixel/plugin.toml"),
        )
        .unwrap();
        assert_eq!(m.library, Path::new("/p/pixel/libx.so"));
        assert_eq!(m.kind, PluginKind::Loss);
        assert_eq!(m.requires.libtorch.as_deref(), Some("2.13.0"));
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = Manifest::parse(
            "[plugin]\nid='x'\nkind='lose'\nversion='0.1.0'\nabi='1.0'\nlibrary='l.so'\n",
            Path::new("/p/x/plugin.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/p/x/plugin.toml") && e.contains("plugin.kind") && e.contains("lose"), "{e}");
        let e = Manifest::parse("[plugin]\nid='x'\nkind='loss'\nversion='0.1.0'\nabi='1.0'\nlibrary='l.so'\nlibary='z'\n", Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("libary"), "{e}");
    }
}
