//! Opening a plugin library: every check, in the order that gives the most readable message.
//!
//! 1. `dlopen` (the OS's message, with the path);
//! 2. the plain-C header symbol: missing → "not a likeness plugin"; ABI major must equal the
//!    host's and the plugin's minor must be ≤ the host's; the kind must match the manifest;
//! 3. the manifest's `[requires]` against runtimes this process already loaded (one libtorch
//!    and one ONNX Runtime per process);
//! 4. abi_stable's layout check of the root module (its report, summarised);
//! 5. the descriptor's id/kind/version and the header's ABI against the manifest: errors, except
//!    a different summary or an older manifest ABI minor (a plugin rebuilt against a newer
//!    SDK), which are warnings; each says the fix, `host plugins manifest LIB > plugin.toml`.
//!
//! Before any of it the library must lie inside the manifest's folder: `Manifest::parse`
//! refuses absolute paths and `..`, and [`contained_library`] resolves symlinks and refuses a
//! library that really lives elsewhere.
//!
//! Libraries are leaked on purpose: never unloaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use abi_stable::library::{lib_header_from_raw_library, LibHeader, RawLibrary, RootModule};
use likeness_abi::{
    AbiVersion, LossPluginModRef, MetricPluginModRef, ModelPluginModRef, PluginDescriptor, PluginHeader,
    PluginHeaderFn, PluginKind, ABI_MAJOR, ABI_MINOR, PLUGIN_HEADER_SYMBOL,
};

use super::manifest::Manifest;

/// Why a library could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{manifest}: `plugin.library` `{library}` resolves to {target}, outside the manifest's folder {dir}: copy the library into {dir} (a symlink may not point out of the plugin's folder)")]
    Outside { manifest: PathBuf, library: PathBuf, target: PathBuf, dir: PathBuf },
    #[error("{path} is not a likeness plugin: it does not export `{symbol}` (build it with likeness-sdk's export_*_plugin! macro)")]
    NotAPlugin { path: PathBuf, symbol: String },
    #[error("{path} was built for plugin ABI {plugin}, this host speaks ABI {host}: {hint}")]
    AbiMismatch { path: PathBuf, plugin: AbiVersion, host: AbiVersion, hint: String },
    #[error("{manifest} says kind = \"{manifest_kind}\" (`plugin.kind`), but its library {path} is a {library_kind} plugin: {fix}")]
    KindMismatch {
        manifest: PathBuf,
        path: PathBuf,
        manifest_kind: &'static str,
        library_kind: &'static str,
        fix: String,
    },
    #[error("{path}: {message}")]
    Requires { path: PathBuf, message: String },
    #[error("{path}: the plugin's ABI layout does not match this host's (it was built against a different likeness-abi); abi_stable's report, summarised:\n{summary}")]
    Layout { path: PathBuf, summary: String },
    #[error("{path}: {message}")]
    Descriptor { path: PathBuf, message: String },
}

/// An opened and checked library.
#[derive(Clone)]
pub struct LoadedLibrary {
    pub path: PathBuf,
    pub header: PluginHeader,
    pub descriptor: PluginDescriptor,
    pub(super) root: Root,
    /// Where the manifest disagrees with the library harmlessly (logged as warnings when the
    /// library is opened; see [`open_library`]).
    pub warnings: Vec<String>,
}

#[derive(Clone, Copy)]
pub(super) enum Root {
    Model(ModelPluginModRef),
    Metric(MetricPluginModRef),
    Loss(LossPluginModRef),
}

struct State {
    opened: HashMap<PathBuf, LoadedLibrary>,
    /// Runtime versions already in the process, with the plugin that brought each.
    libtorch: Option<(String, String)>,
    onnxruntime: Option<(String, String)>,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(State { opened: HashMap::new(), libtorch: None, onnxruntime: None }))
}

/// Host ABI.
pub const HOST_ABI: AbiVersion = AbiVersion { major: ABI_MAJOR, minor: ABI_MINOR };

/// Opens (once per process) and checks the library a manifest names.
///
/// The library is the truth about itself: a manifest that disagrees with it on id, kind,
/// version or ABI is an error, a different `summary` (or an older ABI minor, as left by a
/// rebuild against a newer SDK) a warning; each says the one-line fix
/// (`host plugins manifest LIB > plugin.toml`, see [`regenerate_hint`]).
pub fn open_library(m: &Manifest) -> Result<LoadedLibrary, LoadError> {
    let path = m.library.clone();
    let mut st = state().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = st.opened.get(&path) {
        return Ok(l.clone());
    }
    if !path.exists() {
        return Err(LoadError::Open {
            path: path.clone(),
            message: format!(
                "no such file (named by `plugin.library` in {}; build the plugin or fix the path)",
                m.path.display()
            ),
        });
    }
    // The manifest's requires are checked before dlopen: opening a second libtorch is what
    // must not happen.
    check_requires(&mut st, m, false)?;

    contained_library(m)?;
    let (header, descriptor, root) = open_at(&path, Some(m))?;
    let bad = |message: String| LoadError::Descriptor { path: path.clone(), message };
    let warnings = compare_with_manifest(m, &header, &descriptor).map_err(bad)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    check_build_stamps(m, &descriptor).map_err(bad)?;
    check_requires(&mut st, m, true)?;
    let lib = LoadedLibrary { path: path.clone(), header, descriptor, root, warnings };
    st.opened.insert(path, lib.clone());
    Ok(lib)
}

/// What a library says about itself, read without a manifest (`host plugins manifest`).
#[derive(Clone)]
pub struct LibraryInfo {
    pub path: PathBuf,
    pub header: PluginHeader,
    pub descriptor: PluginDescriptor,
}

/// Opens any library (no manifest, so no folder or `[requires]` check: meant for a process
/// that opens this one library) and runs every check that needs no manifest: the header, the
/// ABI, abi_stable's layout and the descriptor against the header.
pub fn read_library(path: &Path) -> Result<LibraryInfo, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Open {
            path: path.to_path_buf(),
            message: "no such file (build the plugin first: cargo build --release)".into(),
        });
    }
    // dlopen searches the library path for a name without a '/': open the file meant.
    let real = path.canonicalize().map_err(|e| LoadError::Open { path: path.to_path_buf(), message: e.to_string() })?;
    let (header, descriptor, _) = open_at(&real, None)?;
    Ok(LibraryInfo { path: path.to_path_buf(), header, descriptor })
}

/// dlopen, the header symbol (ABI; the kind against the manifest's, when there is one), the
/// layout check of the root module, the descriptor (which must agree with the header).
fn open_at(path: &Path, m: Option<&Manifest>) -> Result<(PluginHeader, PluginDescriptor, Root), LoadError> {
    let raw = RawLibrary::load_at(path)
        .map_err(|e| LoadError::Open { path: path.to_path_buf(), message: library_error(&e, path) })?;
    let raw: &'static RawLibrary = Box::leak(Box::new(raw));

    let sym = format!("{PLUGIN_HEADER_SYMBOL}\0");
    // SAFETY: the symbol's type is fixed forever (see `PluginHeaderFn`).
    let header_fn = unsafe { raw.get::<PluginHeaderFn>(sym.as_bytes()) }
        .map_err(|_| LoadError::NotAPlugin { path: path.to_path_buf(), symbol: PLUGIN_HEADER_SYMBOL.to_string() })?;
    let header = header_fn();
    check_abi(path, header.abi)?;
    if let Some(m) = m.filter(|m| header.kind != m.kind) {
        return Err(LoadError::KindMismatch {
            manifest: m.path.clone(),
            path: path.to_path_buf(),
            manifest_kind: m.kind.as_str(),
            library_kind: header.kind.as_str(),
            fix: regenerate_hint(m),
        });
    }

    // SAFETY: the library stays loaded forever (leaked above).
    let lib_header = unsafe { lib_header_from_raw_library(raw) }.map_err(|e| LoadError::NotAPlugin {
        path: path.to_path_buf(),
        symbol: format!("abi_stable root module ({})", library_error(&e, path)),
    })?;
    let root = init_root(lib_header, header, path)?;
    let descriptor = match root {
        Root::Model(r) => r.descriptor()(),
        Root::Metric(r) => r.descriptor()(),
        Root::Loss(r) => r.descriptor()(),
    };
    if descriptor.abi != header.abi || descriptor.kind != header.kind {
        return Err(LoadError::Descriptor {
            path: path.to_path_buf(),
            message: format!(
                "descriptor (kind {}, ABI {}) disagrees with the library header (kind {}, ABI {})",
                descriptor.kind.as_str(),
                descriptor.abi,
                header.kind.as_str(),
                header.abi
            ),
        });
    }
    Ok((header, descriptor, root))
}

/// The root module, layout-checked against the modules of the library's own ABI minor.
fn init_root(lib_header: &'static LibHeader, header: PluginHeader, path: &Path) -> Result<Root, LoadError> {
    Ok(match header.kind {
        PluginKind::Model if header.abi.minor == 0 => {
            Root::Model(init_older::<likeness_abi::v1_0::ModelPluginModRef, ModelPluginModRef>(lib_header, path)?)
        }
        PluginKind::Metric if header.abi.minor == 0 => {
            Root::Metric(init_older::<likeness_abi::v1_0::MetricPluginModRef, MetricPluginModRef>(lib_header, path)?)
        }
        PluginKind::Loss if header.abi.minor == 0 => {
            Root::Loss(init_older::<likeness_abi::v1_0::LossPluginModRef, LossPluginModRef>(lib_header, path)?)
        }
        PluginKind::Model => Root::Model(init::<ModelPluginModRef>(lib_header, path)?),
        PluginKind::Metric => Root::Metric(init::<MetricPluginModRef>(lib_header, path)?),
        PluginKind::Loss => Root::Loss(init::<LossPluginModRef>(lib_header, path)?),
    })
}

/// The one-line fix for a manifest that disagrees with its library: write it from the
/// library. `--library` is added when the manifest names its library by a path other than
/// its bare file name (`host plugins manifest` writes the file name for an absolute path).
pub fn regenerate_hint(m: &Manifest) -> String {
    let dir = m.path.parent().unwrap_or(Path::new(""));
    let relative = m.library.strip_prefix(dir).ok().filter(|r| r.components().count() > 1);
    let library = relative.map(|r| format!(" --library {}", shell_word(&r.to_string_lossy()))).unwrap_or_default();
    format!(
        "write the manifest from the library: host plugins manifest {}{library} > {}",
        shell_word(&m.library.to_string_lossy()),
        shell_word(&m.path.to_string_lossy())
    )
}

/// `s` as one shell word: as is when it is made of safe characters, else single-quoted.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// What the manifest says (and `plugins list` shows without opening anything) against what
/// the library is. Errors: id, version, ABI major, or a manifest ABI minor newer than the
/// library's (the library in place is older than its manifest: not the build the manifest
/// describes). Warnings (returned): the summary, and a manifest ABI minor older than the
/// library's (a plugin rebuilt against a newer SDK; the header check has already accepted
/// the library's ABI). The kind was compared with the header in [`open_at`].
fn compare_with_manifest(m: &Manifest, header: &PluginHeader, d: &PluginDescriptor) -> Result<Vec<String>, String> {
    let fix = regenerate_hint(m);
    let manifest = m.path.display();
    for (field, library, claimed, extra) in [
        ("id", d.id.as_str(), m.id.as_str(), ""),
        ("version", d.version.as_str(), m.version.as_str(), " (or, if the manifest is right, rebuild the library)"),
    ] {
        if library.trim() != claimed.trim() {
            return Err(format!(
                "the library's descriptor says {field} `{library}` but {manifest} says `{claimed}` (`plugin.{field}`): {fix}{extra}"
            ));
        }
    }
    let (lib_abi, claimed) = (header.abi, m.abi);
    if claimed.major != lib_abi.major || claimed.minor > lib_abi.minor {
        let why = if claimed.major == lib_abi.major {
            " the library in place is older than its manifest says; copy the new build next to the manifest, or"
        } else {
            ""
        };
        return Err(format!(
            "the library was built for ABI {lib_abi} but {manifest} says abi = \"{claimed}\" (`plugin.abi`):{why} {fix}"
        ));
    }
    let mut warnings = Vec::new();
    if claimed.minor < lib_abi.minor {
        warnings.push(format!(
            "{manifest} says abi = \"{claimed}\" but its library was built for ABI {lib_abi} (rebuilt against a newer likeness-sdk); this host speaks ABI {HOST_ABI} and loads it. Update the manifest: {fix}"
        ));
    }
    if d.summary.trim() != m.summary.trim() {
        warnings.push(format!(
            "{manifest}: `plugin.summary` \"{}\" differs from the library's descriptor \"{}\" (`host plugins list` shows the manifest's). Update the manifest: {fix}",
            m.summary.trim(),
            d.summary.trim()
        ));
    }
    Ok(warnings)
}

fn check_abi(path: &std::path::Path, plugin: AbiVersion) -> Result<(), LoadError> {
    let mismatch = |hint: &str| LoadError::AbiMismatch {
        path: path.to_path_buf(),
        plugin,
        host: HOST_ABI,
        hint: hint.to_string(),
    };
    if plugin.major != HOST_ABI.major {
        return Err(mismatch(if plugin.major > HOST_ABI.major {
            "the plugin is newer than this host: upgrade likeness"
        } else {
            "the plugin is older than this host: rebuild it against the current likeness-sdk"
        }));
    }
    if plugin.minor > HOST_ABI.minor {
        return Err(mismatch("the plugin needs a newer host (its ABI minor is higher): upgrade likeness"));
    }
    Ok(())
}

/// A plugin built for an older ABI minor: its layout is checked against the frozen modules of
/// that minor (`Old`), then it is read through the current module type (`M`), whose appended
/// fields read as absent (the library's prefix metadata marks them inaccessible).
fn init_older<Old: RootModule, M: RootModule>(h: &'static LibHeader, path: &std::path::Path) -> Result<M, LoadError> {
    let layout = |e: abi_stable::library::LibraryError| LoadError::Layout {
        path: path.to_path_buf(),
        summary: summarise_layout_report(&e.to_string()),
    };
    h.ensure_layout::<Old>().map_err(layout)?;
    // SAFETY: `M` is `Old` with fields appended (prefix types), and the layout of `Old` was checked.
    unsafe { h.init_root_module_with_unchecked_layout::<M>() }.map_err(layout)
}

fn init<M: RootModule>(h: &'static LibHeader, path: &std::path::Path) -> Result<M, LoadError> {
    h.init_root_module::<M>()
        .map_err(|e| LoadError::Layout { path: path.to_path_buf(), summary: summarise_layout_report(&e.to_string()) })
}

/// abi_stable's layout reports run to hundreds of lines; users need the first differences.
/// The report prints both full layouts first and its findings last, as `Error:<what>` blocks
/// (`Error:mismatched package`, `Expected:`, an indented value, `Found:`, a value): those
/// blocks are shown, each `Label:` joined to its value line.
pub fn summarise_layout_report(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    let mut errors: Vec<String> = Vec::new();
    let mut in_error = false;
    for raw in report.lines() {
        let t = raw.trim();
        if t.starts_with("Error") {
            in_error = true;
            errors.push(t.to_string());
        } else if t.is_empty() {
            in_error = false;
        } else if in_error {
            match errors.last_mut() {
                Some(prev) if prev.ends_with(':') && !prev.starts_with("Error") => {
                    prev.push(' ');
                    prev.push_str(t);
                }
                _ => errors.push(t.to_string()),
            }
        }
    }
    let keep: Vec<String> = if !errors.is_empty() {
        errors.into_iter().take(6).collect()
    } else {
        let matching: Vec<String> = lines
            .iter()
            .filter(|l| {
                let t = l.trim_start();
                t.contains("mismatch") || t.contains("expected") || t.contains("found") || t.contains("different")
            })
            .take(6)
            .map(|l| l.trim().to_string())
            .collect();
        if matching.is_empty() {
            lines.iter().take(6).map(|l| l.trim().to_string()).collect()
        } else {
            matching
        }
    };
    let mut s: String = keep.iter().map(|l| format!("  {l}\n")).collect();
    if lines.len() > keep.len() {
        s.push_str(&format!(
            "  … ({} more lines; rebuild the plugin against this host's likeness-sdk)",
            lines.len() - keep.len()
        ));
    }
    s
}

/// The reason inside one of abi_stable's `LibraryError`s, on one line. Its `Display` starts
/// with a newline (so its first line is empty) and puts the cause on a later line; for a failed
/// `dlopen` the cause is libloading's error, i.e. `dlerror()`'s text, which repeats the path.
fn library_error(e: &abi_stable::library::LibraryError, path: &Path) -> String {
    use abi_stable::library::LibraryError;
    let text = match e {
        LibraryError::OpenError { err, .. } => err.to_string(),
        other => other.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "),
    };
    let text = text.trim();
    let p = path.display().to_string();
    let text = text.strip_prefix(&p).and_then(|t| t.strip_prefix(':')).map(str::trim).unwrap_or(text);
    if text.is_empty() {
        "the system gave no reason".to_string()
    } else {
        text.to_string()
    }
}

/// The library a manifest names, after resolving symlinks: it must still be a file inside the
/// manifest's folder (also resolved, so a plugin folder that is itself a symlink is fine).
pub fn contained_library(m: &Manifest) -> Result<PathBuf, LoadError> {
    let dir = match m.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let open_err = |message: String| LoadError::Open { path: m.library.clone(), message };
    let real_dir = dir
        .canonicalize()
        .map_err(|e| open_err(format!("cannot resolve the manifest's folder {}: {e}", dir.display())))?;
    let real = m.library.canonicalize().map_err(|e| {
        open_err(format!("{e} (named by `plugin.library` in {}; build the plugin or fix the path)", m.path.display()))
    })?;
    if !real.starts_with(&real_dir) || real == real_dir {
        return Err(LoadError::Outside {
            manifest: m.path.clone(),
            library: m.library.clone(),
            target: real,
            dir: real_dir,
        });
    }
    if !real.is_file() {
        return Err(open_err(format!("not a file (named by `plugin.library` in {})", m.path.display())));
    }
    Ok(real)
}

fn base_version(v: &str) -> &str {
    v.split('+').next().unwrap_or(v).trim()
}

fn check_build_stamps(m: &Manifest, d: &PluginDescriptor) -> Result<(), String> {
    let pairs = [
        ("libtorch", m.requires.libtorch.as_deref(), d.build.libtorch.as_ref().map(|s| s.as_str()).into_option()),
        (
            "onnxruntime",
            m.requires.onnxruntime.as_deref(),
            d.build.onnxruntime.as_ref().map(|s| s.as_str()).into_option(),
        ),
    ];
    for (name, wanted, built) in pairs {
        if let (Some(w), Some(b)) = (wanted, built) {
            if b != "unknown" && base_version(w) != base_version(b) {
                return Err(format!(
                    "{} declares requires.{name} = \"{w}\" but the library was built against {name} {b}",
                    m.path.display()
                ));
            }
        }
    }
    Ok(())
}

/// One libtorch (and one ONNX Runtime) per process: the first plugin that needs one decides
/// the version; a plugin that needs another version is refused before its library is opened.
fn check_requires(st: &mut State, m: &Manifest, commit: bool) -> Result<(), LoadError> {
    for (name, wanted, slot) in [
        ("libtorch", &m.requires.libtorch, &mut st.libtorch),
        ("onnxruntime", &m.requires.onnxruntime, &mut st.onnxruntime),
    ] {
        let Some(w) = wanted else { continue };
        match slot {
            Some((have, by)) if base_version(have) != base_version(w) => {
                return Err(LoadError::Requires {
                    path: m.library.clone(),
                    message: format!(
                        "needs {name} {w}, but plugin `{by}` already loaded {name} {have} into this process (one {name} per process: rebuild one of them against the other's version)"
                    ),
                })
            }
            Some(_) => {}
            None if commit => *slot = Some((w.clone(), m.id.clone())),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_rules() {
        let p = std::path::Path::new("x.so");
        assert!(check_abi(p, HOST_ABI).is_ok());
        let e = check_abi(p, AbiVersion { major: HOST_ABI.major + 1, minor: 0 }).unwrap_err().to_string();
        assert!(e.contains(&format!("ABI {}.0", HOST_ABI.major + 1)) && e.contains(&format!("ABI {HOST_ABI}")), "{e}");
        assert!(check_abi(p, AbiVersion { major: HOST_ABI.major, minor: HOST_ABI.minor + 1 }).is_err());
    }

    fn manifest_in(dir: &Path, library: &str) -> Manifest {
        let text = format!("[plugin]\nid='x'\nkind='loss'\nversion='0.1.0'\nabi='1.0'\nlibrary='{library}'\n");
        Manifest::parse(&text, &dir.join("plugin.toml")).unwrap()
    }

    fn descriptor(id: &str, version: &str, abi: AbiVersion, summary: &str) -> PluginDescriptor {
        use abi_stable::std_types::{ROption, RVec};
        PluginDescriptor {
            id: id.into(),
            kind: PluginKind::Loss,
            version: version.into(),
            abi,
            summary: summary.into(),
            capabilities: likeness_abi::Capabilities {
                differentiable: true,
                devices: RVec::new(),
                dtypes: RVec::new(),
            },
            config_schema: "{}".into(),
            build: likeness_abi::BuildStamps {
                rustc: "".into(),
                libtorch: ROption::RNone,
                onnxruntime: ROption::RNone,
                cuda: ROption::RNone,
            },
        }
    }

    /// The library is the truth: id, version, another ABI major or a manifest ABI newer than
    /// the library are errors; a summary or an older manifest ABI minor are warnings. Each
    /// says the one-line fix.
    #[test]
    fn manifest_differences_are_errors_or_warnings_with_the_fix() {
        let m = Manifest::parse(
            "[plugin]\nid='x'\nkind='loss'\nversion='0.1.0'\nabi='1.0'\nlibrary='target/release/libx.so'\nsummary='old words'\n",
            Path::new("/p/my plugin/plugin.toml"),
        )
        .unwrap();
        let fix = "host plugins manifest '/p/my plugin/target/release/libx.so' --library target/release/libx.so > '/p/my plugin/plugin.toml'";
        assert!(regenerate_hint(&m).ends_with(fix), "{}", regenerate_hint(&m));
        let v = |major, minor| AbiVersion { major, minor };
        let header = |abi| PluginHeader { abi, kind: PluginKind::Loss };
        let same = compare_with_manifest(&m, &header(v(1, 0)), &descriptor("x", "0.1.0", v(1, 0), "old words"));
        assert_eq!(same.unwrap(), Vec::<String>::new());
        let w = compare_with_manifest(&m, &header(v(1, 1)), &descriptor("x", "0.1.0", v(1, 1), "new words")).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("abi = \"1.0\" but its library was built for ABI 1.1") && w[0].ends_with(fix),
            "{}",
            w[0]
        );
        assert!(
            w[1].contains("\"old words\" differs from the library's descriptor \"new words\"") && w[1].ends_with(fix)
        );
        for (d, h, want) in [
            (
                descriptor("y", "0.1.0", v(1, 0), "old words"),
                v(1, 0),
                "says id `y` but /p/my plugin/plugin.toml says `x`",
            ),
            (descriptor("x", "0.2.0", v(1, 0), "old words"), v(1, 0), "says version `0.2.0`"),
            (descriptor("x", "0.1.0", v(2, 0), "old words"), v(2, 0), "built for ABI 2.0 but"),
        ] {
            let e = compare_with_manifest(&m, &header(h), &d).unwrap_err();
            assert!(e.contains(want) && e.contains(fix), "{e}");
        }
        let newer = Manifest { abi: v(1, 1), ..m.clone() };
        let e = compare_with_manifest(&newer, &header(v(1, 0)), &descriptor("x", "0.1.0", v(1, 0), "old words"));
        let e = e.unwrap_err();
        assert!(e.contains("older than its manifest says") && e.contains("host plugins manifest"), "{e}");
        // A library next to its manifest needs no --library.
        let flat = Manifest { library: PathBuf::from("/p/x/libx.so"), path: PathBuf::from("/p/x/plugin.toml"), ..m };
        assert!(regenerate_hint(&flat).ends_with("host plugins manifest /p/x/libx.so > /p/x/plugin.toml"));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_may_not_lead_out_of_the_plugin_folder() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside.so");
        std::fs::write(&outside, b"x").unwrap();
        let dir = tmp.path().join("plugin");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("real.so"), b"x").unwrap();
        symlink(&outside, dir.join("abs.so")).unwrap();
        symlink("../outside.so", dir.join("rel.so")).unwrap();
        symlink(tmp.path(), dir.join("sub/out")).unwrap();
        symlink("real.so", dir.join("alias.so")).unwrap();
        symlink(tmp.path().join("missing.so"), dir.join("dangling.so")).unwrap();
        for lib in ["abs.so", "rel.so", "sub/out/outside.so"] {
            let m = manifest_in(&dir, lib);
            let e = contained_library(&m).map(|p| p.display().to_string());
            match e {
                Err(e @ LoadError::Outside { .. }) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("plugin.toml") && e.contains("outside.so") && e.contains("copy the library into"),
                        "{lib}: {e}"
                    );
                }
                other => panic!("{lib}: {other:?}"),
            }
        }
        // Inside is fine, through symlinks too: a symlinked alias, a folder that is a symlink.
        assert_eq!(
            contained_library(&manifest_in(&dir, "alias.so")).unwrap(),
            dir.join("real.so").canonicalize().unwrap()
        );
        let linked_dir = tmp.path().join("linked");
        symlink(&dir, &linked_dir).unwrap();
        assert!(contained_library(&manifest_in(&linked_dir, "real.so")).is_ok());
        let e = contained_library(&manifest_in(&dir, "dangling.so")).unwrap_err().to_string();
        assert!(e.contains("dangling.so") && e.contains("No such file"), "{e}");
        let e = contained_library(&manifest_in(&dir, "sub")).unwrap_err().to_string();
        assert!(e.contains("not a file"), "{e}");
    }

    #[test]
    fn dlopen_failure_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = tmp.path().join("libtext.so");
        std::fs::write(&lib, "#!/bin/sh\necho not a library\n").unwrap();
        let e = RawLibrary::load_at(&lib).err().expect("a text file does not dlopen");
        let why = library_error(&e, &lib);
        assert!(!why.is_empty() && !why.starts_with(lib.to_str().unwrap()), "{why:?}");
        assert!(why.contains("ELF") || why.contains("too short"), "dlerror's text: {why:?}");
    }

    #[test]
    fn layout_summary_is_short() {
        let report: String = (0..200).map(|i| format!("line {i}\n")).collect::<String>() + "Error: field mismatch\n";
        let s = summarise_layout_report(&report);
        assert!(s.lines().count() <= 8, "{s}");
        assert!(s.contains("field mismatch"));
    }

    #[test]
    fn layout_summary_shows_abi_stables_findings_not_the_layout_dumps() {
        let mut report =
            String::from("Compared <this>:\n    --- Type Layout ---\n    package:'likeness-abi' version:'0.1.0'\n");
        report += &"Layout of expected type:\n    field_name:x\n".repeat(50);
        report += "\n\nError:mismatched package\nExpected:\n    likeness-abi\nFound:\n    other-crate\n\n\n";
        let s = summarise_layout_report(&report);
        assert!(s.contains("Error:mismatched package\n  Expected: likeness-abi\n  Found: other-crate\n"), "{s}");
        assert!(!s.contains("Layout of expected type"), "{s}");
        assert!(s.lines().count() <= 8, "{s}");
    }
}
