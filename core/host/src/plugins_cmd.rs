//! `host plugins manifest` (a `plugin.toml` written from the library itself) and `host plugins
//! new` (a plugin crate outside this repository, from the templates in `core/host/templates/`).
//!
//! The manifest repeats what a library knows about itself so that discovery opens nothing;
//! writing it from the library means a plugin author never keeps two copies in step by hand.
//! A scaffolded crate takes its id from `ID` in `src/lib.rs` and its version and summary from
//! its `Cargo.toml` (`CARGO_PKG_VERSION`, `CARGO_PKG_DESCRIPTION`), and its `plugin.toml` is
//! rendered by the same code as `host plugins manifest`, so the two agree from the start.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use likeness_engine::abi::{AbiVersion, BuildStamps, Capabilities, PluginDescriptor, PluginKind, ABI_MAJOR, ABI_MINOR};
use likeness_engine::abi_stable::std_types::{ROption, RVec};
use likeness_engine::plugins::{read_library, render_manifest};
use likeness_engine::{EngineError, Result};

#[derive(Args)]
pub struct ManifestArgs {
    /// The plugin's shared library, e.g. target/release/libmy_plugin.so.
    #[arg(value_name = "LIB")]
    lib: PathBuf,
    /// The value written as `plugin.library` [default: LIB as given when it is a relative path
    /// without `..` (the manifest is written in the current folder), else LIB's file name (the
    /// manifest sits next to the library)].
    #[arg(long, value_name = "PATH")]
    library: Option<String>,
}

/// `host plugins manifest LIB`: opens the library, reads its descriptor, prints its
/// `plugin.toml` on stdout (`> plugin.toml`).
pub fn manifest(a: &ManifestArgs) -> Result<ExitCode> {
    let info = read_library(&a.lib)?;
    let library = a.library.clone().unwrap_or_else(|| library_field(&a.lib));
    let text = render_manifest(&info.descriptor, &library)
        .map_err(|e| EngineError::Config(format!("--library: {e} (pass --library with a path inside that folder)")))?;
    // A closed pipe ends the output quietly.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

/// `plugin.library` for a library named `lib` on the command line (see [`ManifestArgs`]).
fn library_field(lib: &Path) -> String {
    let normal: Option<Vec<String>> = lib
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    match normal {
        Some(parts) if !parts.is_empty() => parts.join("/"),
        _ => lib.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Model,
    Metric,
    Loss,
}

#[derive(Args)]
pub struct NewArgs {
    /// The plugin id, also the crate's name: a letter, then letters, digits, '-' and '_'.
    #[arg(value_name = "NAME")]
    name: String,
    /// What the plugin is.
    #[arg(long, value_enum)]
    kind: Kind,
    /// A libtorch model (likeness-sdk-torch + tch; building it needs libtorch: LIBTORCH, or
    /// LIBTORCH_USE_PYTORCH=1 with a python that has torch). Without it the plugin is pure Rust.
    #[arg(long)]
    torch: bool,
    /// The crate folder to create (must not exist or be empty) [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// The likeness-sdk crate to depend on (a folder; likeness-sdk-torch is its sibling
    /// `sdk-torch/`) [default: core/sdk of the likeness checkout this host was built from].
    #[arg(long, env = "LIKENESS_SDK", value_name = "DIR")]
    sdk: Option<PathBuf>,
}

/// What differs between the kinds.
struct Template {
    kind: PluginKind,
    lib_rs: &'static str,
    summary: &'static str,
    /// One sentence for the README.
    what: &'static str,
    /// Example commands for the README (`@DIR@` and `@NAME@` are filled in).
    usage: &'static str,
}

const SUFFIX: &str = "a starting point written by host plugins new";

fn template(kind: Kind, torch: bool) -> Template {
    match (kind, torch) {
        (Kind::Model, false) => Template {
            kind: PluginKind::Model,
            lib_rs: include_str!("../templates/model/src/lib.rs"),
            summary: "Colour-transform model (3x3 matrix + bias on the reference image, pure Rust)",
            what: "a colour transform of the reference image (twelve parameters, AdamW), pure Rust.",
            usage: MODEL_USAGE,
        },
        (Kind::Model, true) => Template {
            kind: PluginKind::Model,
            lib_rs: include_str!("../templates/torch-model/src/lib.rs"),
            summary: "Colour-transform model in libtorch (1x1 convolution of the reference image)",
            what: "a 1x1 convolution of the reference image in libtorch (autograd, the SDK's AdamW, CPU or CUDA).",
            usage: MODEL_USAGE,
        },
        (Kind::Metric, _) => Template {
            kind: PluginKind::Metric,
            lib_rs: include_str!("../templates/metric/src/lib.rs"),
            summary: "Colour-statistics embedding (6-d, differentiable, pure Rust)",
            what: "a differentiable 6-d colour-statistics embedding (a stand-in for a face embedding), pure Rust.",
            usage:
                "host --plugin-dir @DIR@ eval-faces --control-dir CONTROLS --generated-dir GENERATED --metric @NAME@\n\
                    host --plugin-dir @DIR@ train --config RUN.toml --metric @NAME@ --l_face 0.1",
        },
        (Kind::Loss, _) => Template {
            kind: PluginKind::Loss,
            lib_rs: include_str!("../templates/loss/src/lib.rs"),
            summary: "Charbonnier pixel loss mean(sqrt((p - t)^2 + eps^2)), pure Rust",
            what: "the Charbonnier pixel loss (a smooth L1) with an analytic gradient, pure Rust.",
            usage: "host --plugin-dir @DIR@ train --config RUN.toml --loss @NAME@ --set loss.config.eps=0.001",
        },
    }
}

const MODEL_USAGE: &str = "# DATA: a bundles folder, <root>/<bundle>/char_*/img_* (e.g. $LIKENESS_DATA/demo-bundles)\n\
                           host --plugin-dir @DIR@ train --plugin @NAME@ --data DATA --output runs/@NAME@ --steps 200 --lr 0.05 --set data.image_size=64";

const TORCH_NOTE: &str = "tch's build (torch-sys) needs libtorch: `LIBTORCH_USE_PYTORCH=1` takes the one of the
`python` on PATH that has torch installed (in a likeness checkout: `source scripts/common.sh`
first), or set `LIBTORCH=/path/to/libtorch`. `build.rs` bakes its folder into the plugin's
rpath, so `host` opens the plugin with no `LD_LIBRARY_PATH`.

";

/// `host plugins new NAME --kind K [--torch]`.
pub fn new(a: &NewArgs) -> Result<ExitCode> {
    check_name(&a.name)?;
    if a.torch && a.kind != Kind::Model {
        return Err(EngineError::Config(
            "--torch scaffolds a model; for a libtorch metric or loss start from the pure-Rust one and add likeness-sdk-torch, tch and torch-sys as in a --torch model's Cargo.toml and build.rs".into(),
        ));
    }
    let sdk = sdk_dir(a.sdk.as_deref())?;
    let sdk_torch = if a.torch { Some(sdk_torch_dir(&sdk)?) } else { None };
    let dir = absolute(a.output.clone().unwrap_or_else(|| PathBuf::from(&a.name)))?;
    if std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(EngineError::Config(format!(
            "{} exists and is not empty: choose another folder with --output DIR",
            dir.display()
        )));
    }
    let files = files(a, &sdk, sdk_torch.as_deref(), &dir)?;
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| EngineError::io(&path, e))?;
    }
    // The versions the SDK was built and tested with (cargo drops what the plugin does not use).
    let lock = sdk.ancestors().map(|d| d.join("Cargo.lock")).find(|p| p.is_file());
    if let Some(lock) = &lock {
        std::fs::copy(lock, dir.join("Cargo.lock")).map_err(|e| EngineError::io(lock, e))?;
    }
    let kind = template(a.kind, a.torch).kind.as_str();
    println!("wrote the {kind} plugin `{}` in {}:", a.name, dir.display());
    for rel in files.iter().map(|(r, _)| r.as_str()).chain(lock.as_ref().map(|_| "Cargo.lock")) {
        println!("  {rel}");
    }
    println!(
        "next:\n  cd {} && cargo build --release\n  host --plugin-dir {} plugins check",
        dir.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The crate's files (relative path, contents).
fn files(a: &NewArgs, sdk: &Path, sdk_torch: Option<&Path>, dir: &Path) -> Result<Vec<(String, String)>> {
    let t = template(a.kind, a.torch);
    let lib = format!("{}{}{}", std::env::consts::DLL_PREFIX, a.name.replace('-', "_"), std::env::consts::DLL_SUFFIX);
    let summary = format!("{}, {SUFFIX}", t.summary);
    let quoted = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let extra_deps = match sdk_torch {
        Some(st) => include_str!("../templates/torch-model/Cargo.toml.extra")
            .replace("@SDK_TORCH@", &quoted(&st.to_string_lossy())),
        None => String::new(),
    };
    let fill = |s: &str| {
        s.replace("@NAME@", &a.name)
            .replace("@KIND@", t.kind.as_str())
            .replace("@LIB@", &lib)
            .replace("@DIR@", &dir.to_string_lossy())
    };
    let cargo_toml = fill(include_str!("../templates/Cargo.toml.in"))
        .replace("@SUMMARY@", &quoted(&summary))
        .replace("@SDK@", &quoted(&sdk.to_string_lossy()))
        .replace("@EXTRA_DEPS@", &extra_deps);
    let readme = fill(
        &include_str!("../templates/README.md")
            .replace("@WHAT@", t.what)
            .replace("@USE@", t.usage)
            .replace("@TORCH_FLAG@", if a.torch { " --torch" } else { "" })
            .replace("@BUILD_ENV@", if a.torch { "LIBTORCH_USE_PYTORCH=1 " } else { "" })
            .replace("@TORCH_NOTE@", if a.torch { TORCH_NOTE } else { "" })
            .replace("@SDK_DIR@", &sdk.to_string_lossy()),
    );
    let manifest = render_manifest(&descriptor(&a.name, t.kind, &summary), &format!("target/release/{lib}"))
        .map_err(EngineError::Config)?;
    let mut files = vec![
        ("Cargo.toml".to_string(), cargo_toml),
        ("plugin.toml".to_string(), manifest),
        ("src/lib.rs".to_string(), fill(t.lib_rs)),
        ("README.md".to_string(), readme),
        (".gitignore".to_string(), include_str!("../templates/gitignore").to_string()),
    ];
    if let Some(st) = sdk_torch {
        let rpath = st.join("build_support/rpath.rs");
        let build = include_str!("../templates/torch-model/build.rs")
            .replace("@RPATH_RS@", &format!("{:?}", rpath.to_string_lossy()));
        files.push(("build.rs".to_string(), build));
    }
    Ok(files)
}

/// The descriptor the scaffolded library will return (what its `plugin.toml` is rendered
/// from). Only the fields a manifest holds matter; the libtorch stamp is known once it is
/// built (`host plugins manifest` then adds `[requires] libtorch`).
fn descriptor(id: &str, kind: PluginKind, summary: &str) -> PluginDescriptor {
    PluginDescriptor {
        id: id.into(),
        kind,
        version: "0.1.0".into(),
        abi: AbiVersion { major: ABI_MAJOR, minor: ABI_MINOR },
        summary: summary.into(),
        capabilities: Capabilities { differentiable: true, devices: RVec::new(), dtypes: RVec::new() },
        config_schema: "{}".into(),
        build: BuildStamps {
            rustc: "".into(),
            libtorch: ROption::RNone,
            onnxruntime: ROption::RNone,
            cuda: ROption::RNone,
        },
    }
}

/// A plugin id that is also a valid cargo package name.
fn check_name(name: &str) -> Result<()> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(EngineError::Config(format!(
            "plugin name `{name}`: use a letter, then letters, digits, '-' and '_' (it is the plugin id and the crate name), e.g. my-loss"
        )))
    }
}

/// The likeness-sdk folder: --sdk / LIKENESS_SDK, else this checkout's `core/sdk`.
fn sdk_dir(flag: Option<&Path>) -> Result<PathBuf> {
    let (dir, from) = match flag {
        Some(d) => (d.to_path_buf(), "--sdk / LIKENESS_SDK"),
        None => (Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"), "the checkout this host was built from"),
    };
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap_or_default();
    if !text.lines().any(|l| l.trim() == "name = \"likeness-sdk\"") {
        return Err(EngineError::Config(format!(
            "{} (from {from}) is not the likeness-sdk crate (no `name = \"likeness-sdk\"` in {}): pass its folder, core/sdk of a likeness checkout, with --sdk DIR or LIKENESS_SDK",
            dir.display(),
            manifest.display()
        )));
    }
    dir.canonicalize().map_err(|e| EngineError::io(&dir, e))
}

/// likeness-sdk-torch, the SDK's sibling `sdk-torch/`.
fn sdk_torch_dir(sdk: &Path) -> Result<PathBuf> {
    let dir = sdk.parent().unwrap_or(sdk).join("sdk-torch");
    let text = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    if !text.lines().any(|l| l.trim() == "name = \"likeness-sdk-torch\"")
        || !dir.join("build_support/rpath.rs").is_file()
    {
        return Err(EngineError::Config(format!(
            "--torch: {} is not likeness-sdk-torch (expected next to the SDK {}, with build_support/rpath.rs)",
            dir.display(),
            sdk.display()
        )));
    }
    Ok(dir)
}

fn absolute(p: PathBuf) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p);
    }
    let cwd = std::env::current_dir().map_err(|e| EngineError::io(".", e))?;
    Ok(cwd.join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(kind: Kind, torch: bool) -> NewArgs {
        NewArgs { name: "my-plugin".into(), kind, torch, output: None, sdk: None }
    }

    #[test]
    fn library_field_keeps_relative_paths_and_names_the_file_otherwise() {
        for (lib, want) in [
            ("target/release/libx.so", "target/release/libx.so"),
            ("./target/release/libx.so", "target/release/libx.so"),
            ("libx.so", "libx.so"),
            ("/abs/dir/libx.so", "libx.so"),
            ("../other/libx.so", "libx.so"),
        ] {
            assert_eq!(library_field(Path::new(lib)), want, "{lib}");
        }
    }

    #[test]
    fn names_must_be_ids_and_crate_names() {
        for ok in ["my-loss", "a", "Metric_2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "2loss", "-x", "my loss", "my.loss", "ü"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// Every kind fills every placeholder, and its `plugin.toml` says what its sources make the
    /// descriptor say: the id `ID`, the kind, `CARGO_PKG_VERSION` and `CARGO_PKG_DESCRIPTION`.
    #[test]
    fn every_template_is_filled_and_its_manifest_matches_its_sources() {
        let sdk = sdk_dir(None).unwrap();
        let sdk_torch = sdk_torch_dir(&sdk).unwrap();
        for (kind, torch) in [(Kind::Model, false), (Kind::Model, true), (Kind::Metric, false), (Kind::Loss, false)] {
            let a = args(kind, torch);
            let files = files(&a, &sdk, torch.then_some(sdk_torch.as_path()), Path::new("/tmp/p")).unwrap();
            let get = |name: &str| &files.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1;
            for (name, text) in &files {
                let left: Vec<&str> = text
                    .split('@')
                    .skip(1)
                    .step_by(2)
                    .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                    .collect();
                assert!(
                    left.is_empty(),
                    "{name} ({}) keeps placeholders {left:?}",
                    template(kind, torch).kind.as_str()
                );
            }
            let m =
                likeness_engine::plugins::Manifest::parse(get("plugin.toml"), Path::new("/tmp/p/plugin.toml")).unwrap();
            let t = template(kind, torch);
            assert_eq!((m.id.as_str(), m.kind, m.version.as_str()), ("my-plugin", t.kind, "0.1.0"));
            assert_eq!(m.library, Path::new("/tmp/p/target/release/libmy_plugin.so"));
            let cargo = get("Cargo.toml");
            assert!(cargo.contains("name = \"my-plugin\"\nversion = \"0.1.0\""), "{cargo}");
            assert!(cargo.contains(&format!("description = \"{}\"", m.summary)), "{cargo}");
            let lib = get("src/lib.rs");
            assert!(lib.contains("pub const ID: &str = \"my-plugin\";"), "{lib}");
            assert!(lib.contains("env!(\"CARGO_PKG_VERSION\")") && lib.contains("env!(\"CARGO_PKG_DESCRIPTION\")"));
            assert!(lib.contains(&format!("PluginKind::{}", capitalised(t.kind.as_str()))), "{lib}");
            assert_eq!(files.iter().any(|(n, _)| n == "build.rs"), torch);
            assert_eq!(cargo.contains("tch ="), torch, "{cargo}");
        }
    }

    fn capitalised(s: &str) -> String {
        let mut c = s.chars();
        c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
    }

    /// The torch template pins tch and torch-sys as the workspace does: two versions would be
    /// two libtorch wrappers (torch-sys `links = "tch"` allows one per build).
    #[test]
    fn torch_template_pins_the_workspace_versions() {
        let workspace = include_str!("../../../Cargo.toml");
        let extra = include_str!("../templates/torch-model/Cargo.toml.extra");
        for dep in ["tch", "torch-sys"] {
            let line = |text: &str| {
                text.lines()
                    .find(|l| l.starts_with(&format!("{dep} =")))
                    .map(|l| l.split('#').next().unwrap().trim().to_string())
            };
            assert_eq!(line(workspace), line(extra), "{dep}");
            assert!(line(extra).is_some(), "{dep}");
        }
    }
}
