//! JSON-lines metrics log (`metrics.jsonl`): one JSON object per line, flushed as written so a
//! crash loses at most the line being written; a resumed run first drops the records logged
//! after its checkpoint so the log never holds two histories.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// An open JSONL metrics file, appended to one record per line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    writer: BufWriter<File>,
}

/// Whether `record` belongs to a history that ends at `last_step`: records without a numeric
/// `"step"` (run headers, notes) are kept.
fn keep_record(record: &serde_json::Value, last_step: u64) -> bool {
    match record.get("step") {
        Some(v) => {
            if let Some(s) = v.as_u64() {
                s <= last_step
            } else if let Some(f) = v.as_f64() {
                f <= last_step as f64
            } else {
                true
            }
        }
        None => true,
    }
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| EngineError::io(parent, format!("cannot create directory: {e}")))?;
        }
    }
    Ok(())
}

/// A sibling temp path for atomic rewrites (same directory, so rename is atomic).
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "metrics".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

impl MetricsLog {
    /// Starts a fresh log at `path` (truncating any existing file, creating parent directories).
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        create_parent(path)?;
        let file = File::create(path).map_err(|e| EngineError::io(path, format!("cannot create metrics log: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), writer: BufWriter::new(file) })
    }

    /// Reopens the log of a run resumed from `last_step`: keeps only records whose `"step"` is
    /// ≤ `last_step` (plus records without a step), rewrites the file atomically, then appends.
    /// Malformed lines (e.g. a line cut short by a crash) are dropped with a warning.
    /// A missing file is created.
    pub fn resume(path: impl AsRef<Path>, last_step: u64) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Self::create(path);
        }
        let file = File::open(path).map_err(|e| EngineError::io(path, format!("cannot open metrics log: {e}")))?;
        let mut kept = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| EngineError::io(path, format!("line {}: cannot read: {e}", i + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => {
                    if keep_record(&v, last_step) {
                        kept.push(line);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "dropping malformed metrics line {}: {e}", i + 1);
                }
            }
        }
        let tmp = temp_sibling(path);
        let write = || -> std::io::Result<()> {
            let mut w = BufWriter::new(File::create(&tmp)?);
            for line in &kept {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")?;
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(EngineError::io(path, format!("cannot rewrite metrics log for resume: {e}")));
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| EngineError::io(path, format!("cannot open metrics log for append: {e}")))?;
        Ok(MetricsLog { path: path.to_path_buf(), writer: BufWriter::new(file) })
    }

    /// Appends one record as a single line and flushes it.
    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        let line = serde_json::to_string(record)
            .map_err(|e| EngineError::io(&self.path, format!("cannot serialize record: {e}")))?;
        self.writer
            .write_all(line.as_bytes())
            .and_then(|_| self.writer.write_all(b"\n"))
            .and_then(|_| self.writer.flush())
            .map_err(|e| EngineError::io(&self.path, format!("cannot write metrics: {e}")))
    }

    /// The file this log writes to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every record of a JSONL file; a malformed line is an error naming its line number.
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<serde_json::Value>> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| EngineError::io(path, format!("cannot open metrics log: {e}")))?;
        let mut out = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| EngineError::io(path, format!("line {}: cannot read: {e}", i + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(&line)
                .map_err(|e| EngineError::io(path, format!("line {}: malformed JSON: {e}", i + 1)))?;
            out.push(v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn create_log_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        log.log(&json!({"step": 1, "loss": 0.5})).unwrap();
        log.log(&json!({"step": 2, "loss": 0.25, "note": "a\nb"})).unwrap();
        // Flushed: readable while still open.
        let recs = MetricsLog::read(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1]["note"], "a\nb");
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 2);
        drop(log);
        // create truncates.
        let _log = MetricsLog::create(&p).unwrap();
        assert!(MetricsLog::read(&p).unwrap().is_empty());
    }

    #[test]
    fn resume_drops_later_steps_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        {
            let mut log = MetricsLog::create(&p).unwrap();
            log.log(&json!({"event": "start"})).unwrap();
            for s in 1..=5 {
                log.log(&json!({"step": s, "loss": s as f64})).unwrap();
            }
        }
        // Simulate a crash mid-line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\": 6, \"lo").unwrap();
        drop(f);
        let mut log = MetricsLog::resume(&p, 3).unwrap();
        log.log(&json!({"step": 4, "loss": 40.0})).unwrap();
        let recs = MetricsLog::read(&p).unwrap();
        let steps: Vec<_> = recs.iter().filter_map(|r| r.get("step").and_then(|s| s.as_u64())).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert_eq!(recs[0]["event"], "start");
        assert_eq!(recs.last().unwrap()["loss"], 40.0);
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Missing file: resume creates it.
        let q = dir.path().join("new.jsonl");
        MetricsLog::resume(&q, 10).unwrap();
        assert!(q.exists());
    }

    #[test]
    fn read_reports_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        std::fs::write(&p, "{\"step\":1}\n\n{\"step\":2}\n{oops\n").unwrap();
        let err = MetricsLog::read(&p).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("m.jsonl"), "{err}");
        let err = MetricsLog::read(dir.path().join("none.jsonl")).unwrap_err().to_string();
        assert!(err.contains("none.jsonl"), "{err}");
    }
}
