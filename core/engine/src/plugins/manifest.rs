//! `plugin.toml`: what a plugin is, without opening its library.

use std::path::{Path, PathBuf};

use likeness_abi::{AbiVersion, PluginDescriptor, PluginKind};
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
    /// The largest `plugin.toml` read (64 KiB).
    pub const MAX_BYTES: u64 = 64 << 10;

    /// Reads and validates a manifest. Errors name the file and the field. At most
    /// [`Manifest::MAX_BYTES`] are read: a manifest is a few lines, and discovery must not be
    /// made to read a huge file (or `/dev/zero` behind a symlink) into memory.
    pub fn read(path: &Path) -> Result<Manifest> {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        let mut bytes = Vec::new();
        f.take(Self::MAX_BYTES + 1).read_to_end(&mut bytes).map_err(|e| EngineError::io(path, e))?;
        if bytes.len() as u64 > Self::MAX_BYTES {
            return Err(EngineError::Manifest {
                path: path.to_path_buf(),
                message: format!("larger than {} KiB; a plugin.toml is a few lines", Self::MAX_BYTES >> 10),
            });
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| EngineError::Manifest { path: path.to_path_buf(), message: format!("not UTF-8 text: {e}") })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let bad = |msg: String| EngineError::Manifest { path: path.to_path_buf(), message: msg };
        let raw: RawFile =
            toml::from_str(text).map_err(|e| bad(e.message().to_string() + &span_hint(text, e.span())))?;
        let p = raw.plugin;
        let kind = match p.kind.as_str() {
            "model" => PluginKind::Model,
            "metric" => PluginKind::Metric,
            "loss" => PluginKind::Loss,
            other => return Err(bad(format!("`plugin.kind` is `{other}`; expected one of model, metric, loss"))),
        };
        let abi = parse_abi(&p.abi)
            .ok_or_else(|| bad(format!("`plugin.abi` is `{}`; expected MAJOR.MINOR such as \"1.0\"", p.abi)))?;
        if p.id.is_empty() || !p.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(bad(format!(
                "`plugin.id` `{}` must be non-empty and use only letters, digits, '-' and '_'",
                p.id
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        check_library_is_inside(&p.library, dir).map_err(bad)?;
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

/// The complete `plugin.toml` for a library, from its own descriptor (`host plugins manifest`):
/// the manifest repeats what the library knows so discovery need not open it, and writing it
/// from the library means an author never keeps the two in step by hand. `library` is the
/// value of `plugin.library` (relative to the manifest's folder, inside it; checked).
/// `[requires]` lists the runtimes the descriptor's build stamps name (`unknown` stamps are
/// left out: they can be compared with nothing).
pub fn render(d: &PluginDescriptor, library: &str) -> std::result::Result<String, String> {
    check_library_is_inside(library, Path::new("."))?;
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let line = |key: &str, value: String, comment: &str| {
        let kv = format!("{key} = {value}");
        if comment.is_empty() {
            kv + "\n"
        } else {
            format!("{kv:<30} # {comment}\n")
        }
    };
    let mut out = format!(
        "# plugin.toml of `{id}`: what `host` reads to find this plugin without opening its library.\n\
         # Written from the library's descriptor by `host plugins manifest {library} > plugin.toml`:\n\
         # write it again after each rebuild instead of editing it (the host checks these fields\n\
         # against the library when it opens it).\n[plugin]\n",
        id = d.id.as_str().replace(['\n', '\r'], " "),
    );
    out += &line("id", q(d.id.as_str()), "what configs name: model.plugin / metric.plugin / loss.plugin");
    out += &line("kind", q(d.kind.as_str()), "model | metric | loss");
    out += &line("version", q(d.version.as_str()), "the plugin's own version");
    out += &line("abi", q(&d.abi.to_string()), "plugin ABI major.minor the library was built for");
    out += &line("library", q(library), "relative to this file's folder (and inside it)");
    out += &line("summary", q(d.summary.as_str()), "");
    let stamps = [("libtorch", &d.build.libtorch), ("onnxruntime", &d.build.onnxruntime), ("cuda", &d.build.cuda)];
    let known: Vec<(&str, &str)> = stamps
        .iter()
        .filter_map(|(k, v)| v.as_ref().into_option().map(|v| (*k, v.as_str())).filter(|(_, v)| *v != "unknown"))
        .collect();
    out += "\n[requires]                     # runtimes the library was built against (one of each per process)\n";
    if known.is_empty() {
        out += "# none: the library links no libtorch, ONNX Runtime or CUDA\n";
    }
    for (k, v) in known {
        out += &line(k, q(v), "");
    }
    Ok(out)
}

/// `plugin.library` must name a file inside the manifest's own folder: a relative path with no
/// root and no `..` (checked here, lexically; symlinks that leave the folder are refused when
/// the library is opened, see `loader::contained_library`). A manifest must not be able to make
/// the host `dlopen` a system library or a file elsewhere on the disk.
fn check_library_is_inside(library: &str, dir: &Path) -> std::result::Result<(), String> {
    use std::path::Component;
    let shown = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let file_name = Path::new(library).file_name().map(|f| f.to_string_lossy().into_owned());
    let fix = |what: &str| {
        format!(
            "`plugin.library` is `{library}`, {what}; it must name a file inside the manifest's folder {}: copy the library there and set `library = \"{}\"`",
            shown.display(),
            file_name.as_deref().unwrap_or("lib<name>.so")
        )
    };
    if library.trim().is_empty() {
        return Err(fix("empty"));
    }
    for c in Path::new(library).components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return Err(fix("an absolute path")),
            Component::ParentDir => return Err(fix("a path that leaves the manifest's folder (`..`)")),
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    Ok(())
}

fn parse_abi(s: &str) -> Option<AbiVersion> {
    let (a, b) = s.split_once('.')?;
    Some(AbiVersion { major: a.trim().parse().ok()?, minor: b.trim().parse().ok()? })
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            // Bytes, not `str` slicing: a span that is not on a char boundary must not panic.
            let line = text.as_bytes()[..r.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1;
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
    fn library_must_stay_inside_the_manifest_folder() {
        let parse = |lib: &str| {
            Manifest::parse(
                &format!("[plugin]\nid='x'\nkind='loss'\nversion='0.1.0'\nabi='1.0'\nlibrary='{lib}'\n"),
                Path::new("/p/x/plugin.toml"),
            )
        };
        for (lib, why) in [
            ("/usr/lib/x86_64-linux-gnu/libm.so.6", "an absolute path"),
            ("../../../lib/libc.so.6", "leaves the manifest's folder"),
            ("sub/../../y.so", "leaves the manifest's folder"),
            ("..", "leaves the manifest's folder"),
            ("", "empty"),
        ] {
            let e = parse(lib).unwrap_err().to_string();
            assert!(e.starts_with("/p/x/plugin.toml: `plugin.library`") && e.contains(why), "{lib}: {e}");
            assert!(
                e.contains("inside the manifest's folder /p/x") && e.contains("copy the library there"),
                "{lib}: {e}"
            );
        }
        let e = parse("/usr/lib/libm.so.6").unwrap_err().to_string();
        assert!(e.contains("set `library = \"libm.so.6\"`"), "{e}");
        assert_eq!(parse("./lib/libx.so").unwrap().library, Path::new("/p/x/./lib/libx.so"));
        assert_eq!(parse("libx.so").unwrap().library, Path::new("/p/x/libx.so"));
    }

    fn descriptor(summary: &str, libtorch: Option<&str>) -> PluginDescriptor {
        use abi_stable::std_types::{ROption, RVec};
        PluginDescriptor {
            id: "my-model".into(),
            kind: PluginKind::Model,
            version: "0.3.1".into(),
            abi: AbiVersion { major: 1, minor: 1 },
            summary: summary.into(),
            capabilities: likeness_abi::Capabilities {
                differentiable: true,
                devices: RVec::new(),
                dtypes: RVec::new(),
            },
            config_schema: "{}".into(),
            build: likeness_abi::BuildStamps {
                rustc: "rustc 1.95.0".into(),
                libtorch: libtorch.map(|v| ROption::RSome(v.into())).unwrap_or(ROption::RNone),
                onnxruntime: ROption::RNone,
                cuda: ROption::RSome("unknown".into()),
            },
        }
    }

    /// What `render` writes parses back to the descriptor's fields, whatever the summary holds.
    #[test]
    fn rendered_manifest_parses_back_to_the_descriptor() {
        for summary in
            ["plain", "quotes \" and 'apostrophes', a \\ backslash", "two\nlines and # not a comment", "x̂0 → ✓"]
        {
            let d = descriptor(summary, Some("2.13.0+cu130"));
            let text = render(&d, "target/release/libmy_model.so").unwrap();
            let m = Manifest::parse(&text, Path::new("/p/m/plugin.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!((m.id.as_str(), m.kind, m.version.as_str()), ("my-model", PluginKind::Model, "0.3.1"), "{text}");
            assert_eq!((m.abi.major, m.abi.minor), (1, 1));
            assert_eq!(m.summary, summary, "{text}");
            assert_eq!(m.library, Path::new("/p/m/target/release/libmy_model.so"));
            assert_eq!(m.requires, Requires { libtorch: Some("2.13.0+cu130".into()), onnxruntime: None, cuda: None });
        }
        let text = render(&descriptor("s", None), "libx.so").unwrap();
        assert!(text.contains("# none: the library links no libtorch"), "{text}");
        assert_eq!(Manifest::parse(&text, Path::new("plugin.toml")).unwrap().requires, Requires::default());
        for bad in ["/abs/libx.so", "../libx.so", ""] {
            assert!(render(&descriptor("s", None), bad).is_err(), "{bad}");
        }
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
        let e = Manifest::parse(
            "[plugin]\nid='x'\nkind='loss'\nversion='0.1.0'\nabi='1.0'\nlibrary='l.so'\nlibary='z'\n",
            Path::new("m.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("libary"), "{e}");
    }
}
