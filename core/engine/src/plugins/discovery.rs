//! Where plugins are looked for, and the registry of what was found (manifests only).

use std::path::{Path, PathBuf};

use likeness_abi::{Device, PluginKind};

use super::handles::{Loss, Metric, Model};
use super::loader::{open_library, LoadError};
use super::manifest::Manifest;
use crate::{EngineError, Result};

/// Why a directory is on the search path (printed by `host plugins list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchSource {
    Flag,
    EnvVar,
    UserDataDir,
    NextToExecutable,
}

impl SearchSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchSource::Flag => "--plugin-dir",
            SearchSource::EnvVar => "LIKENESS_PLUGIN_PATH",
            SearchSource::UserDataDir => "user data dir",
            SearchSource::NextToExecutable => "next to the executable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SearchDir {
    pub path: PathBuf,
    pub source: SearchSource,
}

/// The search order: `--plugin-dir` flags, `LIKENESS_PLUGIN_PATH` (':'-separated), the user
/// data dir (`$LIKENESS_DATA_HOME/plugins`, else the platform data dir, e.g.
/// `~/.local/share/likeness/plugins`), then `plugins/` next to the executable.
pub fn default_search_path(flag_dirs: &[PathBuf]) -> Vec<SearchDir> {
    let mut dirs: Vec<SearchDir> =
        flag_dirs.iter().map(|p| SearchDir { path: p.clone(), source: SearchSource::Flag }).collect();
    if let Some(v) = std::env::var_os("LIKENESS_PLUGIN_PATH") {
        for p in std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(SearchDir { path: p, source: SearchSource::EnvVar });
        }
    }
    let data = std::env::var_os("LIKENESS_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| directories::ProjectDirs::from("", "", "likeness").map(|d| d.data_dir().to_path_buf()));
    if let Some(d) = data {
        dirs.push(SearchDir { path: d.join("plugins"), source: SearchSource::UserDataDir });
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(SearchDir { path: exe_dir.join("plugins"), source: SearchSource::NextToExecutable });
    }
    dirs
}

/// A manifest found on the search path.
#[derive(Debug, Clone)]
pub struct Discovered {
    pub manifest: Manifest,
    pub source: SearchSource,
    /// Manifests with the same id later on the search path (not used).
    pub shadowed: Vec<PathBuf>,
}

/// Everything discovery found. Building it opens no library.
#[derive(Debug, Default)]
pub struct Registry {
    pub dirs: Vec<SearchDir>,
    pub plugins: Vec<Discovered>,
    /// Manifests that could not be read, with the reason.
    pub problems: Vec<(PathBuf, String)>,
}

impl Registry {
    /// Scans each directory for `plugin.toml` in it and in its immediate subdirectories.
    pub fn discover(dirs: Vec<SearchDir>) -> Registry {
        let mut reg = Registry { dirs: Vec::new(), plugins: Vec::new(), problems: Vec::new() };
        for dir in &dirs {
            let mut candidates = vec![dir.path.join("plugin.toml")];
            if let Ok(rd) = std::fs::read_dir(&dir.path) {
                let mut subs: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path().join("plugin.toml")).collect();
                subs.sort();
                candidates.extend(subs);
            }
            for path in candidates.into_iter().filter(|p| p.is_file()) {
                match Manifest::read(&path) {
                    Ok(m) => {
                        if let Some(existing) = reg.plugins.iter_mut().find(|d| d.manifest.id == m.id) {
                            existing.shadowed.push(path);
                        } else {
                            reg.plugins.push(Discovered { manifest: m, source: dir.source, shadowed: Vec::new() });
                        }
                    }
                    Err(e) => reg.problems.push((path, e.to_string())),
                }
            }
        }
        reg.dirs = dirs;
        reg
    }

    /// The plugin called `id` of `kind`; the error lists what exists and the closest id.
    pub fn find(&self, id: &str, kind: PluginKind) -> Result<&Discovered> {
        if let Some(d) = self.plugins.iter().find(|d| d.manifest.id == id) {
            if d.manifest.kind != kind {
                return Err(EngineError::Config(format!(
                    "plugin `{id}` is a {} plugin ({}), but a {} plugin is needed here",
                    d.manifest.kind.as_str(),
                    d.manifest.path.display(),
                    kind.as_str()
                )));
            }
            return Ok(d);
        }
        let same_kind: Vec<&str> =
            self.plugins.iter().filter(|d| d.manifest.kind == kind).map(|d| d.manifest.id.as_str()).collect();
        let closest = same_kind
            .iter()
            .map(|c| (strsim::jaro_winkler(id, c), *c))
            .filter(|(s, _)| *s > 0.7)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| format!(" Did you mean `{c}`?"))
            .unwrap_or_default();
        let searched: Vec<String> =
            self.dirs.iter().map(|d| format!("{} ({})", d.path.display(), d.source.as_str())).collect();
        Err(EngineError::Config(format!(
            "no {} plugin `{id}` found.{closest} Available {} plugins: {}. Searched: {}. Add a directory with --plugin-dir or LIKENESS_PLUGIN_PATH.",
            kind.as_str(),
            kind.as_str(),
            if same_kind.is_empty() { "none".to_string() } else { same_kind.join(", ") },
            searched.join(", ")
        )))
    }

    fn open(&self, id: &str, kind: PluginKind) -> Result<(&Discovered, super::loader::LoadedLibrary)> {
        let d = self.find(id, kind)?;
        let lib = open_library(&d.manifest)
            .map_err(|e| EngineError::Plugin { plugin: id.to_string(), message: e.to_string() })?;
        Ok((d, lib))
    }

    /// Opens a model's library without creating an instance (no weights are loaded): enough
    /// to ask what the model reads and produces.
    pub fn open_model_library(&self, id: &str) -> Result<super::handles::ModelLibrary> {
        let (_, lib) = self.open(id, PluginKind::Model)?;
        super::handles::ModelLibrary::new(&lib)
    }

    pub fn open_model(&self, id: &str, config_json: &str, device: Device, seed: u64) -> Result<Model> {
        let (_, lib) = self.open(id, PluginKind::Model)?;
        Model::create(&lib, config_json, device, seed)
    }

    pub fn open_metric(&self, id: &str, config_json: &str, device: Device, seed: u64) -> Result<Metric> {
        let (_, lib) = self.open(id, PluginKind::Metric)?;
        Metric::create(&lib, config_json, device, seed)
    }

    /// A metric's declared interface for `config_json`, without creating it.
    pub fn metric_interface(&self, id: &str, config_json: &str) -> Result<likeness_abi::MetricInterface> {
        let (_, lib) = self.open(id, PluginKind::Metric)?;
        super::handles::metric_interface(&lib, config_json)
    }

    pub fn open_loss(&self, id: &str, config_json: &str, device: Device, seed: u64) -> Result<Loss> {
        let (_, lib) = self.open(id, PluginKind::Loss)?;
        Loss::create(&lib, config_json, device, seed)
    }

    /// Opens a plugin's library and checks it without creating an instance.
    pub fn check(&self, d: &Discovered) -> std::result::Result<super::loader::LoadedLibrary, LoadError> {
        open_library(&d.manifest)
    }
}
