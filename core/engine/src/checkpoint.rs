//! Checkpoints: `checkpoints/step-NNNNNNNN/` directories holding what the model plugin saved
//! (its weights and optimizer state, usually `*.safetensors`) and the engine's `state.json`.
//!
//! - **Writing** is atomic: everything goes into `.<name>.tmp`, every file is fsynced, then the
//!   directory is renamed into place. `state.json` lists every file the plugin wrote with its
//!   size, so a checkpoint that lost or truncated a file is recognised later.
//! - **Complete** means: `state.json` parses, every file it lists is there with its size, and
//!   every `*.safetensors` has a valid header whose tensors exactly fill the file.
//! - **Resuming** ([`latest_checkpoint`]) takes the newest complete checkpoint. A newer one that
//!   is not complete (a corrupt or truncated `state.json`, a missing or damaged weights file)
//!   is skipped with a warning naming it, why, and the checkpoint used instead; nothing is
//!   deleted.
//! - **Pruning** ([`prune_checkpoints`]) deletes only complete checkpoints older than the
//!   newest `keep` complete ones: an incomplete checkpoint is never deleted (it is evidence,
//!   and counting it would let pruning delete the only checkpoint that can be resumed from),
//!   and the newest complete one, the one a resume starts from, is always kept.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{EngineError, Result};

/// Written next to the weights of every checkpoint (`state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub epoch: u64,
    pub model_plugin: String,
    pub best_val_loss: Option<f64>,
    pub first_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    #[serde(default)]
    pub first_identity_similarity: Option<f64>,
    #[serde(default)]
    pub last_identity_similarity: Option<f64>,
    /// When the run first began, in Unix milliseconds: the adapters' `ss_training_started_at`
    /// and `modelspec.date`. Carried through every checkpoint so that a resumed run keeps its
    /// original date. Integer milliseconds rather than f64 seconds because a JSON integer reads
    /// back exactly, so a resumed run writes the very same metadata string. `None` in
    /// checkpoints written before it existed (the trainer then uses the time of the resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_started_at_ms: Option<u64>,
    /// Every file the model plugin wrote into the checkpoint (path relative to it, `/`
    /// separated) with its size in bytes; filled in by [`write_checkpoint`]. Empty in
    /// checkpoints written before it existed (then only their `*.safetensors` are checked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, u64>,
}

/// The name of the engine's own file in a checkpoint directory.
pub const STATE_FILE: &str = "state.json";

/// Why a checkpoint directory cannot be resumed from.
#[derive(Debug, Clone, PartialEq)]
pub enum Incomplete {
    /// `state.json` is absent.
    NoState { path: PathBuf },
    /// A file could not be read (permissions, I/O error).
    Unreadable { path: PathBuf, message: String },
    /// `state.json` is there but does not parse (truncated, overwritten, wrong fields).
    CorruptState { path: PathBuf, message: String },
    /// A file that `state.json` lists is gone.
    MissingFile { path: PathBuf, size: u64 },
    /// A file that `state.json` lists has another size.
    WrongSize { path: PathBuf, expected: u64, found: u64 },
    /// A `*.safetensors` file whose header does not parse or does not match its length.
    BadSafetensors { path: PathBuf, message: String },
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incomplete::NoState { path } => write!(f, "{} is missing", path.display()),
            Incomplete::Unreadable { path, message } => {
                write!(f, "cannot read {}: {message}", path.display())
            }
            Incomplete::CorruptState { path, message } => {
                write!(f, "corrupt checkpoint state {}: {message}", path.display())
            }
            Incomplete::MissingFile { path, size } => {
                write!(f, "{} is missing (state.json lists it with {size} bytes)", path.display())
            }
            Incomplete::WrongSize { path, expected, found } => {
                write!(f, "{} has {found} bytes, state.json says {expected} (truncated or overwritten)", path.display())
            }
            Incomplete::BadSafetensors { path, message } => {
                write!(f, "{} is not a complete safetensors file: {message}", path.display())
            }
        }
    }
}

/// Checks a checkpoint directory and returns its state when it is complete.
pub fn check_checkpoint(dir: &Path) -> std::result::Result<CheckpointState, Incomplete> {
    let state_path = dir.join(STATE_FILE);
    let text = match std::fs::read(&state_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Incomplete::NoState { path: state_path }),
        Err(e) => return Err(Incomplete::Unreadable { path: state_path, message: e.to_string() }),
    };
    let state: CheckpointState = serde_json::from_slice(&text)
        .map_err(|e| Incomplete::CorruptState { path: state_path.clone(), message: e.to_string() })?;
    for (rel, &size) in &state.files {
        let path = dir.join(rel);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == size => {}
            Ok(m) => return Err(Incomplete::WrongSize { path, expected: size, found: m.len() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Incomplete::MissingFile { path, size }),
            Err(e) => return Err(Incomplete::Unreadable { path, message: e.to_string() }),
        }
    }
    for path in files_under(dir).map_err(|(path, e)| Incomplete::Unreadable { path, message: e.to_string() })? {
        if path.extension().is_some_and(|e| e == "safetensors") {
            check_safetensors(&path).map_err(|message| Incomplete::BadSafetensors { path: path.clone(), message })?;
        }
    }
    Ok(state)
}

/// Reads a safetensors file's header (never its tensors) and checks that the header parses and
/// that its tensors, contiguous and each `numel × dtype size` bytes, end exactly at the end of
/// the file. The header length is bounded by the file's length before it is read.
pub fn check_safetensors(path: &Path) -> std::result::Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format!("{len} bytes, too short for the header length"))?;
    let n = u64::from_le_bytes(n);
    let Some(data_len) = len.checked_sub(8).and_then(|l| l.checked_sub(n)).filter(|_| n <= 100_000_000) else {
        return Err(format!("the header claims {n} bytes but the file has {len} (truncated?)"));
    };
    let mut header = Vec::new();
    f.take(n).read_to_end(&mut header).map_err(|e| e.to_string())?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| format!("the header does not parse: {e}"))?;
    let mut spans: Vec<(usize, usize, usize)> = meta
        .tensors()
        .values()
        .map(|t| {
            (
                t.data_offsets.0,
                t.data_offsets.1,
                t.shape.iter().try_fold(t.dtype.size(), |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX),
            )
        })
        .collect();
    spans.sort();
    let mut end = 0usize;
    for (s, e, nbytes) in spans {
        if s != end || e < s || e - s != nbytes {
            return Err(format!("a tensor spans bytes [{s}, {e}) of the data, expected {nbytes} bytes from {end}"));
        }
        end = e;
    }
    if end as u64 != data_len {
        return Err(format!("the tensors need {end} bytes of data, the file holds {data_len}"));
    }
    Ok(())
}

/// Every regular file below `dir` (recursively), sorted.
fn files_under(dir: &Path) -> std::result::Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| (d.clone(), e))? {
            let e = e.map_err(|e| (d.clone(), e))?;
            let t = e.file_type().map_err(|err| (e.path(), err))?;
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `step-NNNNNNNN` directories of `dir`, oldest first (other names are ignored: temporary
/// `.step-….tmp` directories and set-aside `step-….unreadable` ones).
fn step_dirs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut steps: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()?, e.path())))
        .collect();
    steps.sort();
    steps
}

/// The newest complete checkpoint of the run in `out` (`out/checkpoints/step-N/`), or `None`
/// when there is none at all. A newer checkpoint that is not complete is skipped with a warning
/// that names it, says why, and names the one used instead; it is left in place. When
/// checkpoints exist but none is complete, the error lists each one and why (a corrupt
/// `state.json` reads "corrupt checkpoint state …: <serde's message>").
pub fn latest_checkpoint(out: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    let dir = out.join("checkpoints");
    let steps = step_dirs(&dir);
    let mut skipped: Vec<(PathBuf, Incomplete)> = Vec::new();
    for (_, p) in steps.into_iter().rev() {
        match check_checkpoint(&p) {
            Ok(state) => {
                for (bad, why) in &skipped {
                    warn!(
                        "checkpoint {} cannot be resumed from: {why}; the previous complete checkpoint {} (step {}) is used instead. {} is left as it is",
                        bad.display(),
                        p.display(),
                        state.step,
                        bad.display()
                    );
                }
                return Ok(Some((p, state)));
            }
            Err(why) => skipped.push((p, why)),
        }
    }
    if skipped.is_empty() {
        return Ok(None);
    }
    let reasons: Vec<String> = skipped.iter().map(|(_, why)| why.to_string()).collect();
    Err(EngineError::Other(format!(
        "--resume: no complete checkpoint in {}: {}. Nothing was deleted; move the damaged checkpoints away to start from scratch",
        dir.display(),
        reasons.join("; ")
    )))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::io(path, e)
}

/// Writes the checkpoint directory `dir` atomically: `save` writes the model's files into a
/// temporary sibling directory (`.<name>.tmp`), `state.json` is added with the list of those
/// files and their sizes, every file is fsynced, and the directory is renamed into place. An
/// existing complete `dir` is replaced; an existing incomplete one is not deleted but set aside
/// as `<name>.unreadable` (with a warning). On an error the temporary directory is removed and
/// `dir` is untouched.
pub fn write_checkpoint(save: impl FnOnce(&Path) -> Result<()>, dir: &Path, state: &CheckpointState) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .ok_or_else(|| EngineError::Other(format!("checkpoint directory {} has no name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let fill = || -> Result<()> {
        save(&tmp)?;
        let mut state = state.clone();
        state.files.clear();
        for f in files_under(&tmp).map_err(|(p, e)| EngineError::io(p, e))? {
            let rel = f
                .strip_prefix(&tmp)
                .expect("below tmp")
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if rel == STATE_FILE {
                continue;
            }
            let file = std::fs::File::open(&f).map_err(io(&f))?;
            file.sync_all().map_err(io(&f))?;
            state.files.insert(rel, file.metadata().map_err(io(&f))?.len());
        }
        let json =
            serde_json::to_vec_pretty(&state).map_err(|e| EngineError::Other(format!("checkpoint state: {e}")))?;
        crate::write_atomic(&tmp.join(STATE_FILE), &json)?;
        sync_dir(&tmp);
        Ok(())
    };
    if let Err(e) = fill() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let aside = match check_checkpoint(dir) {
            Ok(_) => parent.join(format!(".{name}.old")),
            Err(why) => {
                let aside = free_name(parent, &format!("{name}.unreadable"));
                warn!(
                    "checkpoint {} is replaced but was not complete ({why}): it is kept as {}",
                    dir.display(),
                    aside.display()
                );
                aside
            }
        };
        let _ = std::fs::remove_dir_all(parent.join(format!(".{name}.old")));
        std::fs::rename(dir, &aside).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        if aside.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".old")) {
            let _ = std::fs::remove_dir_all(&aside);
        }
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    sync_dir(parent);
    Ok(())
}

/// `base`, or `base-2`, `base-3` … whichever does not exist yet in `parent`.
fn free_name(parent: &Path, base: &str) -> PathBuf {
    let mut p = parent.join(base);
    let mut i = 2;
    while p.exists() {
        p = parent.join(format!("{base}-{i}"));
        i += 1;
    }
    p
}

/// Makes a rename inside `dir` durable (best effort: not every platform can open a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Deletes the complete checkpoints of `dir` (`step-N` directories) older than its newest
/// `keep` (at least 1) complete ones. Incomplete checkpoints are never deleted and do not
/// count towards `keep`, so the newest complete checkpoint (the one `--resume` would use, and
/// possibly the only one that can be resumed from) always stays.
pub fn prune_checkpoints(dir: &Path, keep: usize) {
    let complete: Vec<PathBuf> =
        step_dirs(dir).into_iter().map(|(_, p)| p).filter(|p| check_checkpoint(p).is_ok()).collect();
    let excess = complete.len().saturating_sub(keep.max(1));
    for p in complete.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_dir_all(&p) {
            warn!("could not delete old checkpoint {}: {e}", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            step,
            epoch: step / 10,
            model_plugin: "m".into(),
            best_val_loss: Some(0.5),
            ..Default::default()
        }
    }

    /// A safetensors file with one F32 tensor of `n` values.
    fn safetensors_bytes(n: usize) -> Vec<u8> {
        let json = format!(r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#, 4 * n);
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, 4 * n));
        b
    }

    /// What a model plugin writes: model + optimizer safetensors.
    fn save(d: &Path) -> Result<()> {
        std::fs::write(d.join("model.safetensors"), safetensors_bytes(6)).unwrap();
        std::fs::write(d.join("optimizer.safetensors"), safetensors_bytes(12)).unwrap();
        Ok(())
    }

    fn run_with(steps: &[u64]) -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        for &s in steps {
            write_checkpoint(save, &out.path().join(format!("checkpoints/step-{s:08}")), &state(s)).unwrap();
        }
        out
    }

    fn ck(out: &tempfile::TempDir, step: u64) -> PathBuf {
        out.path().join(format!("checkpoints/step-{step:08}"))
    }

    #[test]
    fn written_checkpoints_are_complete_and_list_their_files() {
        let out = run_with(&[10, 20]);
        let (p, st) = latest_checkpoint(out.path()).unwrap().unwrap();
        assert_eq!(p, ck(&out, 20));
        assert_eq!((st.step, st.epoch, st.best_val_loss), (20, 2, Some(0.5)));
        assert_eq!(st.files.keys().collect::<Vec<_>>(), ["model.safetensors", "optimizer.safetensors"]);
        assert_eq!(st.files["model.safetensors"], safetensors_bytes(6).len() as u64);
        let names: Vec<String> = std::fs::read_dir(out.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
        assert_eq!(latest_checkpoint(tempfile::tempdir().unwrap().path()).unwrap(), None);
    }

    /// Old checkpoints (no `files` in state.json) still resume; an unknown future field is
    /// fine too.
    #[test]
    fn state_without_file_list_is_accepted() {
        let out = run_with(&[5]);
        let p = ck(&out, 5);
        std::fs::write(
            p.join(STATE_FILE),
            r#"{"step":5,"epoch":0,"model_plugin":"m","best_val_loss":null,"first_val_loss":null,"last_val_loss":null}"#,
        )
        .unwrap();
        let st = check_checkpoint(&p).unwrap();
        assert_eq!(st.step, 5);
        assert_eq!(st.training_started_at_ms, None, "an old checkpoint has no start time");
    }

    /// The run's start time goes through state.json unchanged (a resumed run keeps its date),
    /// and a state without one writes no such key (so an old reader is not offered a new field
    /// it would carry as null).
    #[test]
    fn the_start_time_round_trips_through_state_json() {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("checkpoints/step-00000007");
        let started = 1_733_112_345_123u64;
        let st = CheckpointState { training_started_at_ms: Some(started), ..state(7) };
        write_checkpoint(save, &dir, &st).unwrap();
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\"training_started_at_ms\": 1733112345123"), "{text}");
        assert_eq!(check_checkpoint(&dir).unwrap().training_started_at_ms, Some(started));
        write_checkpoint(save, &dir, &state(7)).unwrap();
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(!text.contains("training_started_at"), "{text}");
    }

    /// Every way the newest checkpoint can be damaged: resume falls back to the previous
    /// complete one, and neither is deleted.
    #[test]
    fn damaged_newest_falls_back_to_the_previous_complete_one() {
        type Damage = fn(&Path);
        let damages: [(&str, Damage, &str); 7] = [
            (
                "truncated state.json",
                |p| std::fs::write(p.join(STATE_FILE), b"{\"step\": 30, \"epo").unwrap(),
                "corrupt checkpoint state",
            ),
            (
                "garbage state.json",
                |p| std::fs::write(p.join(STATE_FILE), b"\x00\x01not json").unwrap(),
                "corrupt checkpoint state",
            ),
            ("no state.json", |p| std::fs::remove_file(p.join(STATE_FILE)).unwrap(), "state.json is missing"),
            (
                "missing weights",
                |p| std::fs::remove_file(p.join("optimizer.safetensors")).unwrap(),
                "optimizer.safetensors is missing",
            ),
            (
                "truncated weights",
                |p| {
                    let f = std::fs::OpenOptions::new().write(true).open(p.join("model.safetensors")).unwrap();
                    f.set_len(30).unwrap();
                },
                "model.safetensors has 30 bytes",
            ),
            (
                "corrupt header, same size",
                |p| {
                    let mut b = std::fs::read(p.join("model.safetensors")).unwrap();
                    b[12] = b'#';
                    std::fs::write(p.join("model.safetensors"), b).unwrap();
                },
                "not a complete safetensors file",
            ),
            (
                "unlisted safetensors with a huge header length",
                |p| std::fs::write(p.join("extra.safetensors"), (1u64 << 62).to_le_bytes()).unwrap(),
                "extra.safetensors is not a complete safetensors file",
            ),
        ];
        for (what, damage, why) in damages {
            let out = run_with(&[10, 20, 30]);
            damage(&ck(&out, 30));
            let err = check_checkpoint(&ck(&out, 30)).unwrap_err().to_string();
            assert!(err.contains(why), "{what}: {err}");
            let (p, st) = latest_checkpoint(out.path()).unwrap().unwrap();
            assert_eq!((p, st.step), (ck(&out, 20), 20), "{what}");
            assert!(
                ck(&out, 30).is_dir() && ck(&out, 20).is_dir() && ck(&out, 10).is_dir(),
                "{what}: nothing is deleted"
            );
        }
    }

    #[test]
    fn corrupt_only_checkpoint_is_reported_as_corrupt_not_as_io() {
        let out = run_with(&[10]);
        std::fs::write(ck(&out, 10).join(STATE_FILE), b"{\"step\": 1").unwrap();
        let e = latest_checkpoint(out.path()).unwrap_err();
        assert!(!matches!(e, EngineError::Io { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("corrupt checkpoint state") && e.contains("state.json") && e.contains("EOF"), "{e}");
        assert!(e.contains("no complete checkpoint") && e.contains("Nothing was deleted"), "{e}");
        assert!(ck(&out, 10).join(STATE_FILE).is_file());
    }

    #[test]
    fn pruning_keeps_the_newest_complete_and_never_deletes_incomplete_ones() {
        let out = run_with(&[10, 20, 30, 40]);
        let dir = out.path().join("checkpoints");
        prune_checkpoints(&dir, 2);
        let left: Vec<u64> = step_dirs(&dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, [30, 40]);

        // The two newest are corrupt: the naive "keep the newest 2 directories" would delete
        // the only complete one (30), the one a resume starts from.
        write_checkpoint(save, &ck(&out, 50), &state(50)).unwrap();
        write_checkpoint(save, &ck(&out, 60), &state(60)).unwrap();
        std::fs::write(ck(&out, 50).join(STATE_FILE), b"").unwrap();
        std::fs::remove_file(ck(&out, 60).join("model.safetensors")).unwrap();
        prune_checkpoints(&dir, 1);
        let left: Vec<u64> = step_dirs(&dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, [40, 50, 60]);
        assert_eq!(latest_checkpoint(out.path()).unwrap().unwrap().1.step, 40);
        prune_checkpoints(&dir, 0);
        assert_eq!(step_dirs(&dir).len(), 3, "keep = 0 keeps one complete checkpoint");
    }

    #[test]
    fn rewriting_replaces_a_complete_checkpoint_and_sets_an_incomplete_one_aside() {
        let out = run_with(&[10]);
        let mut st = state(10);
        st.best_val_loss = Some(0.25);
        write_checkpoint(save, &ck(&out, 10), &st).unwrap();
        assert_eq!(check_checkpoint(&ck(&out, 10)).unwrap().best_val_loss, Some(0.25));

        std::fs::write(ck(&out, 10).join(STATE_FILE), b"{").unwrap();
        write_checkpoint(save, &ck(&out, 10), &state(10)).unwrap();
        assert!(check_checkpoint(&ck(&out, 10)).is_ok());
        let aside = out.path().join("checkpoints/step-00000010.unreadable");
        assert_eq!(std::fs::read(aside.join(STATE_FILE)).unwrap(), b"{", "the damaged checkpoint is kept");
        let names: Vec<String> = std::fs::read_dir(out.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".old") || n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_failed_save_leaves_no_trace_and_the_old_checkpoint_untouched() {
        let out = run_with(&[10]);
        let before = std::fs::read(ck(&out, 10).join(STATE_FILE)).unwrap();
        let e =
            write_checkpoint(|_| Err(EngineError::Other("disk full".into())), &ck(&out, 10), &state(99)).unwrap_err();
        assert!(e.to_string().contains("disk full"));
        assert_eq!(std::fs::read(ck(&out, 10).join(STATE_FILE)).unwrap(), before);
        assert!(!out.path().join("checkpoints/.step-00000010.tmp").exists());
    }

    #[test]
    fn safetensors_check_bounds_lengths_by_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        std::fs::write(&p, safetensors_bytes(3)).unwrap();
        check_safetensors(&p).unwrap();
        let mut b = safetensors_bytes(3);
        b.push(0);
        std::fs::write(&p, &b).unwrap();
        assert!(check_safetensors(&p).unwrap_err().contains("the file holds"));
        let mut b = safetensors_bytes(3);
        b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        assert!(check_safetensors(&p).unwrap_err().contains("truncated"));
        std::fs::write(&p, b"abc").unwrap();
        assert!(check_safetensors(&p).unwrap_err().contains("too short"));
    }
}
