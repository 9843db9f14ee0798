//! Test support: a folder stored into a hub cache with huggingface_hub's real layout (blobs,
//! relative symlinks in `snapshots/<commit>/`, `refs/<revision>`), so tests of every consumer
//! can build a cache without the network.

use std::path::{Path, PathBuf};

use crate::ModelRef;

/// Stores every file under `src` as model `repo_id` at `commit` in the hub cache `cache`, and
/// points `refs/<revision>` at it. Blobs are named by a content hash (huggingface_hub names them
/// by git's sha1 or the LFS sha256; only the symlinks read the names). Returns the snapshot
/// folder. Unix only (huggingface_hub, too, copies files where symlinks are unavailable).
pub fn store_snapshot(
    cache: &Path,
    repo_id: &str,
    revision: &str,
    commit: &str,
    src: &Path,
) -> std::io::Result<PathBuf> {
    let model = ModelRef::parse(repo_id)
        .filter(|m| m.subpath.is_none())
        .ok_or_else(|| std::io::Error::other(format!("`{repo_id}` is not an org/name model id")))?;
    let repo = cache.join(model.folder_name());
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs"))?;
    for rel in files_under(src, Path::new(""))? {
        let bytes = std::fs::read(src.join(&rel))?;
        let blob = content_name(&bytes);
        std::fs::write(repo.join("blobs").join(&blob), &bytes)?;
        let link = snapshot.join(&rel);
        std::fs::create_dir_all(link.parent().expect("a file has a parent"))?;
        // snapshots/<commit>/<rel> → ../../(../ per sub-folder)blobs/<hash>, as huggingface_hub's
        // relative symlinks.
        let up = "../".repeat(rel.components().count() + 1);
        symlink(Path::new(&format!("{up}blobs/{blob}")), &link)?;
    }
    let r = repo.join("refs").join(revision);
    std::fs::create_dir_all(r.parent().expect("refs/<revision> has a parent"))?;
    std::fs::write(r, commit)?;
    Ok(snapshot)
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::fs::copy(link.parent().unwrap_or(link).join(target), link).map(|_| ())
}

/// Files below `dir` as paths relative to it, sorted.
fn files_under(root: &Path, rel: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            out.extend(files_under(root, &r)?);
        } else {
            out.push(r);
        }
    }
    Ok(out)
}

/// A 64-hex content name (FNV-1a, four lanes): unique enough for test caches.
fn content_name(bytes: &[u8]) -> String {
    (0..4u64)
        .map(|lane| {
            let mut h = 0xcbf2_9ce4_8422_2325u64 ^ lane.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for b in bytes {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
            format!("{h:016x}")
        })
        .collect()
}
