//! Model ids such as `runwayml/stable-diffusion-v1-5` resolved offline from the local Hugging
//! Face hub cache, the way `huggingface_hub.snapshot_download(id, revision=…,
//! local_files_only=True)` (and so diffusers' `from_pretrained(id, local_files_only=True)`)
//! resolves them. Nothing here touches the network: an id that is not cached is an error that
//! lists every place looked and the command that fills the cache on a machine with access.
//!
//! The layout read (huggingface_hub's):
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!   refs/<revision>               the commit hash a branch or tag points at (`main` by default)
//!   snapshots/<commit>/<files>    symlinks into ../blobs/ (plain files on systems without symlinks)
//!   blobs/<hash>                  the file contents
//!   trees/<commit>.json           (huggingface_hub ≥ 2) the commit's file listing, when known
//! ```
//!
//! The cache folder is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE` (its legacy name), else
//! `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, with
//! `~` and `$VAR` expanded as Python's `expanduser` / `expandvars` do. An empty variable counts
//! as unset (huggingface_hub would take it as the current directory).
//!
//! Beyond huggingface_hub: `org/name/sub/folder` and `org/name/file.safetensors` name a folder
//! or a file inside the snapshot, and the resolved folder or file is checked for symlinks whose
//! blob is gone, so a half-copied cache fails here, naming the file, rather than inside a loader.
//!
//! A value that is an existing path is a path (diffusers' rule), so a local folder named like an
//! id wins; [`resolve`] is the one call a host or plugin needs.

use std::path::{Path, PathBuf};

pub mod testing;

/// The revision used when none is given (huggingface_hub's default branch).
pub const DEFAULT_REVISION: &str = "main";

/// What resolving a `pretrained` value gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pretrained {
    /// An existing path, or a value that does not look like a model id (left to its consumer,
    /// which reports a missing path in its own words).
    Path(PathBuf),
    /// A model id found in the cache.
    Cached(Resolved),
}

impl Pretrained {
    /// The path to use.
    pub fn path(&self) -> &Path {
        match self {
            Pretrained::Path(p) => p,
            Pretrained::Cached(r) => &r.path,
        }
    }
}

/// A model id resolved in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The id and optional path inside the repository, as given.
    pub model: ModelRef,
    /// The revision asked for (a branch, a tag or a commit hash).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// `<cache>/models--<org>--<name>/snapshots/<commit>` (what `snapshot_download` returns).
    pub snapshot: PathBuf,
    /// `snapshot`, or `snapshot/<path inside the repository>`: the folder or file to load.
    pub path: PathBuf,
}

/// A hub model id (`org/name`, or a bare `name`) and an optional path inside the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub repo_id: String,
    /// `sub/folder` or `file.safetensors` ('/'-separated), when the value named one.
    pub subpath: Option<String>,
}

impl ModelRef {
    /// `org/name[/path…]` when `value` has that shape: huggingface_hub's repo-id rules for the
    /// first two segments (ASCII letters, digits, `-`, `_`, `.`; not starting or ending with
    /// `-` or `.`; no `--` or `..`; at most 96 characters; not ending in `.git`), plain segments
    /// after them. Anything else — an absolute or `./`-relative path, a single word, a Windows
    /// path — is `None`: not an id.
    pub fn parse(value: &str) -> Option<ModelRef> {
        if value.starts_with(['/', '.', '~']) || value.contains(['\\', ':']) {
            return None;
        }
        let mut parts = value.trim_end_matches('/').split('/');
        let (org, name) = (parts.next()?, parts.next()?);
        let repo_id = format!("{org}/{name}");
        if !repo_part_ok(org) || !repo_part_ok(name) || repo_id.len() > 96 || name.ends_with(".git") {
            return None;
        }
        let rest: Vec<&str> = parts.collect();
        if rest.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return None;
        }
        Some(ModelRef { repo_id, subpath: (!rest.is_empty()).then(|| rest.join("/")) })
    }

    /// `models--<org>--<name>` (huggingface_hub's `repo_folder_name` for a model).
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo_id.replace('/', "--"))
    }

    /// The one command that fills the cache with this model on a machine with hub access.
    pub fn download_command(&self, revision: &str) -> String {
        let rev = if revision == DEFAULT_REVISION { String::new() } else { format!(" --revision {revision}") };
        format!("huggingface-cli download {}{rev}", self.repo_id)
    }
}

fn repo_part_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("--")
        && !s.contains("..")
}

/// Where the hub cache is, and every candidate in huggingface_hub's order (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRoot {
    /// The hub cache folder, holding `models--<org>--<name>/`.
    pub dir: PathBuf,
    /// Each candidate folder with the setting it comes from; the first is `dir`.
    pub candidates: Vec<(PathBuf, String)>,
}

impl CacheRoot {
    /// From the process environment.
    pub fn from_env() -> CacheRoot {
        CacheRoot::from_vars(|k| std::env::var(k).ok())
    }

    /// From any variable lookup (tests pass a map; no process environment is changed).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> CacheRoot {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let home = var("HOME");
        let expand = |s: &str| expand_user(&expand_vars(s, &var), home.as_deref());
        let mut candidates = Vec::new();
        for (k, what) in [("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", " (the legacy name of HF_HUB_CACHE)")] {
            if let Some(v) = var(k) {
                candidates.push((expand(&v), format!("{k}={v}{what}")));
            }
        }
        if let Some(v) = var("HF_HOME") {
            candidates.push((expand(&v).join("hub"), format!("HF_HOME={v} (+ /hub)")));
        }
        if let Some(v) = var("XDG_CACHE_HOME") {
            candidates.push((
                expand(&format!("{v}/huggingface")).join("hub"),
                format!("XDG_CACHE_HOME={v} (+ /huggingface/hub)"),
            ));
        }
        candidates.push((expand("~/.cache/huggingface/hub"), "the default, ~/.cache/huggingface/hub".into()));
        candidates.dedup_by(|a, b| a.0 == b.0);
        CacheRoot { dir: candidates[0].0.clone(), candidates }
    }

    /// A cache at `dir` (tests; a caller with its own cache setting).
    pub fn at(dir: impl Into<PathBuf>) -> CacheRoot {
        let dir = dir.into();
        CacheRoot { candidates: vec![(dir.clone(), "given".into())], dir }
    }

    /// How [`CacheRoot::dir`] was chosen.
    pub fn chosen_by(&self) -> &str {
        &self.candidates[0].1
    }
}

/// Python's `os.path.expanduser` for a leading `~` or `~/` (other users' `~name` stay as is).
fn expand_user(s: &str, home: Option<&str>) -> PathBuf {
    match (s.strip_prefix('~'), home) {
        (Some(rest), Some(h)) if rest.is_empty() || rest.starts_with('/') => PathBuf::from(format!("{h}{rest}")),
        _ => PathBuf::from(s),
    }
}

/// Python's `os.path.expandvars`: `$NAME` and `${NAME}` replaced where NAME is set; anything
/// else is left as written.
fn expand_vars(s: &str, var: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(b) => match b.find('}') {
                Some(j) => (&b[..j], j + 2),
                None => ("", 0),
            },
            None => {
                let n = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..n], n)
            }
        };
        match (len > 0 && !name.is_empty()).then(|| var(name)).flatten() {
            Some(v) => out.push_str(&v),
            None => out.push_str(&rest[i..i + 1 + len]),
        }
        rest = &rest[i + 1 + len..];
    }
    out.push_str(rest);
    out
}

/// Everything that can go wrong; each message names what was looked at and the fix.
#[derive(Debug, thiserror::Error)]
pub enum HfCacheError {
    #[error(
        "`{value}` is not an existing path, and model `{repo_id}` is not in the local Hugging Face cache \
         (models are never downloaded). Looked at:\n{looked}\n{fill}"
    )]
    NotCached { value: String, repo_id: String, looked: String, fill: String },
    /// `hint`: the refs and snapshots that are cached, and the fix.
    #[error(
        "model `{repo_id}` is in the Hugging Face cache, but not its revision `{revision}`: {ref_file} does not \
         exist {hint}"
    )]
    MissingRef { repo_id: String, revision: String, ref_file: PathBuf, hint: String },
    /// `hint`: the snapshots that are cached, and the fix.
    #[error(
        "model `{repo_id}` revision `{revision}` is commit {commit}, but its snapshot {snapshot} is not in the \
         Hugging Face cache {hint}"
    )]
    MissingSnapshot { repo_id: String, revision: String, commit: String, snapshot: PathBuf, hint: String },
    /// `hint`: how many more links are broken, and the fix.
    #[error(
        "model `{repo_id}` (commit {commit}) is only partly in the Hugging Face cache: {file} is a symlink to \
         {target}, which does not exist{hint}"
    )]
    BrokenSymlink { repo_id: String, commit: String, file: PathBuf, target: PathBuf, hint: String },
    /// `missing`: the first files the snapshot lacks; `hint`: the fix.
    #[error(
        "model `{repo_id}` (commit {commit}) is only partly in the Hugging Face cache: {trees} lists files that \
         the snapshot lacks: {missing}. {hint}"
    )]
    Incomplete { repo_id: String, commit: String, trees: PathBuf, missing: String, hint: String },
    #[error(
        "model `{repo_id}` (commit {commit}) is in the Hugging Face cache, but it has no `{subpath}`: {path} \
         does not exist (the snapshot holds: {entries})"
    )]
    MissingSubpath { repo_id: String, commit: String, subpath: String, path: PathBuf, entries: String },
    #[error("revision `{revision}` of `{repo_id}` is not a branch, tag or commit name (it may not contain `..` or start with `/`)")]
    BadRevision { repo_id: String, revision: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// Resolves a `pretrained` value with the process environment's cache (see the crate docs):
/// an existing path as that path, an `org/name[/path]` id through the cache, anything else
/// unchanged. `revision`: `None` = `main`.
pub fn resolve(value: &str, revision: Option<&str>) -> Result<Pretrained, HfCacheError> {
    resolve_with(value, revision, &CacheRoot::from_env())
}

/// [`resolve`] against a given cache.
pub fn resolve_with(value: &str, revision: Option<&str>, root: &CacheRoot) -> Result<Pretrained, HfCacheError> {
    let as_path = Path::new(value);
    // symlink_metadata: a dangling symlink the user named is theirs to report, not an id.
    if as_path.symlink_metadata().is_ok() {
        return Ok(Pretrained::Path(as_path.to_path_buf()));
    }
    let Some(model) = ModelRef::parse(value) else {
        return Ok(Pretrained::Path(as_path.to_path_buf()));
    };
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    let repo_dir = root.dir.join(model.folder_name());
    if !repo_dir.is_dir() {
        return Err(not_cached(value, &model, revision, root));
    }
    resolve_in_repo(model, revision, &repo_dir).map(Pretrained::Cached)
}

/// The id's folder is there: revision → commit → snapshot → sub-path, then the file checks.
fn resolve_in_repo(model: ModelRef, revision: &str, repo_dir: &Path) -> Result<Resolved, HfCacheError> {
    let command = model.download_command(revision);
    let commit = commit_of(&model, revision, repo_dir)?;
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        let hint = format!("(cached snapshots: {}). Fill it: {command}", listing(&repo_dir.join("snapshots")));
        return Err(HfCacheError::MissingSnapshot {
            repo_id: model.repo_id.clone(),
            revision: revision.into(),
            commit,
            snapshot,
            hint,
        });
    }
    let path = match &model.subpath {
        Some(sub) => snapshot.join(sub),
        None => snapshot.clone(),
    };
    if path.symlink_metadata().is_err() {
        return Err(HfCacheError::MissingSubpath {
            repo_id: model.repo_id.clone(),
            commit,
            subpath: model.subpath.clone().unwrap_or_default(),
            path,
            entries: listing(&snapshot),
        });
    }
    check_complete(&model, &commit, repo_dir, &snapshot, &command)?;
    check_links(&model, &commit, repo_dir, &path, &command)?;
    Ok(Resolved { model, revision: revision.into(), commit, snapshot, path })
}

/// huggingface_hub's rule: a 40-hex revision is the commit itself; otherwise `refs/<revision>`
/// holds it.
fn commit_of(model: &ModelRef, revision: &str, repo_dir: &Path) -> Result<String, HfCacheError> {
    if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Ok(revision.to_string());
    }
    if revision.is_empty() || revision.starts_with('/') || revision.split('/').any(|p| p == ".." || p.is_empty()) {
        return Err(HfCacheError::BadRevision { repo_id: model.repo_id.clone(), revision: revision.into() });
    }
    let ref_file = repo_dir.join("refs").join(revision);
    match std::fs::read_to_string(&ref_file) {
        // huggingface_hub writes the hash without a newline; one added by hand is tolerated.
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(HfCacheError::MissingRef {
            repo_id: model.repo_id.clone(),
            revision: revision.into(),
            ref_file,
            hint: format!(
                "(cached refs: {}; cached snapshots: {}). Pass --revision (model.config.revision) with one of \
                 those, or fill the cache: {}",
                listing(&repo_dir.join("refs")),
                listing(&repo_dir.join("snapshots")),
                model.download_command(revision)
            ),
        }),
        Err(e) => Err(HfCacheError::Io { path: ref_file, message: e.to_string() }),
    }
}

/// `trees/<commit>.json` (huggingface_hub ≥ 2 writes it when it downloads): every file it lists
/// (under the sub-path, when one was named) must be in the snapshot — huggingface_hub's
/// `_raise_if_incomplete_snapshot`. No listing, or one in an unknown format: nothing to check.
fn check_complete(m: &ModelRef, commit: &str, repo_dir: &Path, snapshot: &Path, cmd: &str) -> Result<(), HfCacheError> {
    let trees = repo_dir.join("trees").join(format!("{commit}.json"));
    let Ok(text) = std::fs::read_to_string(&trees) else { return Ok(()) };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return Ok(()) };
    let (Some(1), Some(files)) = (v["format_version"].as_u64(), v["files"].as_object()) else { return Ok(()) };
    let prefix = m.subpath.as_ref().map(|s| format!("{s}/"));
    let missing: Vec<&str> = files
        .keys()
        .map(String::as_str)
        .filter(|f| prefix.as_ref().is_none_or(|p| f.starts_with(p.as_str()) || Some(*f) == m.subpath.as_deref()))
        .filter(|f| !snapshot.join(f).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut list = missing.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if missing.len() > 5 {
        list.push_str(&format!(" … ({} more)", missing.len() - 5));
    }
    Err(HfCacheError::Incomplete {
        repo_id: m.repo_id.clone(),
        commit: commit.into(),
        trees,
        missing: list,
        hint: format!("Finish the download: {cmd}"),
    })
}

/// Every symlink under `path` (or `path` itself) must reach its blob.
fn check_links(m: &ModelRef, commit: &str, repo_dir: &Path, path: &Path, cmd: &str) -> Result<(), HfCacheError> {
    let mut broken = Vec::new();
    broken_links(path, 0, &mut broken);
    let Some((file, target)) = broken.first().cloned() else { return Ok(()) };
    let more = if broken.len() > 1 { format!(" (and {} more broken links)", broken.len() - 1) } else { String::new() };
    let hint = format!(
        "{more}. The blobs/ folder was not copied with the snapshot, or was pruned. Copy the whole {} folder with \
         its symlinks (cp -a, rsync -a), or fill it again: {cmd}",
        repo_dir.display()
    );
    Err(HfCacheError::BrokenSymlink { repo_id: m.repo_id.clone(), commit: commit.into(), file, target, hint })
}

/// Depth-limited walk (snapshots are shallow; the limit stops a symlinked loop).
fn broken_links(p: &Path, depth: usize, out: &mut Vec<(PathBuf, PathBuf)>) {
    let Ok(meta) = p.symlink_metadata() else { return };
    if meta.file_type().is_symlink() && p.metadata().is_err() {
        let target = std::fs::read_link(p).map(|t| p.parent().unwrap_or(p).join(t)).unwrap_or_default();
        out.push((p.to_path_buf(), target));
        return;
    }
    if depth < 16 && p.is_dir() {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            broken_links(&e, depth + 1, out);
        }
    }
}

/// The names in `dir`, sorted, for messages ("none" when empty or absent).
fn listing(dir: &Path) -> String {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The not-cached message: the value as a local path, the cache folder chosen (and why), the
/// other candidate caches (with a hint where one of them holds the model), and the fix.
fn not_cached(value: &str, model: &ModelRef, revision: &str, root: &CacheRoot) -> HfCacheError {
    let cwd = std::env::current_dir().map(|d| d.join(value)).unwrap_or_else(|_| PathBuf::from(value));
    let folder = model.folder_name();
    let mut looked = vec![format!("  - {} (as a local path): does not exist", cwd.display())];
    looked.push(format!(
        "  - {}: does not exist (the hub cache, from {})",
        root.dir.join(&folder).display(),
        root.chosen_by()
    ));
    let mut hint = String::new();
    for (dir, from) in root.candidates.iter().skip(1) {
        let here = dir.join(&folder).is_dir();
        looked.push(format!(
            "  - {}: {} (not used: {from} is overridden by {})",
            dir.join(&folder).display(),
            if here { "holds it" } else { "does not exist" },
            root.chosen_by()
        ));
        if here && hint.is_empty() {
            hint = format!("\nThat other cache holds it: set HF_HUB_CACHE={} to use it.", dir.display());
        }
    }
    let fill = format!(
        "Fill the cache on a machine with hub access:\n  {}\n(`hf download {}` with huggingface_hub ≥ 1.0), then copy {} \
         with its symlinks to {} (or point HF_HOME / HF_HUB_CACHE at the copy). Or pass a local folder instead.{hint}",
        model.download_command(revision),
        model.repo_id,
        folder,
        root.dir.display()
    );
    HfCacheError::NotCached { value: value.into(), repo_id: model.repo_id.clone(), looked: looked.join("\n"), fill }
}

#[cfg(test)]
mod tests;
