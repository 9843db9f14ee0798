//! The shared scanning context of the layouts: problems, image probes (each file probed once,
//! in parallel), sizes and buckets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::bucket::BucketSelector;
use super::image_io::{self, ImageInfo, ImageProblem};
use super::{Problem, Severity};
use crate::config::DataConfig;

/// Problems, image checks (each file probed once, in parallel) and sizes, for one scan.
pub(crate) struct Scan<'a> {
    pub cfg: &'a DataConfig,
    pub problems: Vec<Problem>,
    pub sizes: BTreeMap<PathBuf, (u32, u32)>,
    probed: HashMap<PathBuf, std::result::Result<ImageInfo, ImageProblem>>,
    reported: HashSet<PathBuf>,
}

impl<'a> Scan<'a> {
    pub fn new(cfg: &'a DataConfig) -> Self {
        Scan { cfg, problems: Vec::new(), sizes: BTreeMap::new(), probed: HashMap::new(), reported: HashSet::new() }
    }

    pub fn error(&mut self, path: impl Into<PathBuf>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into(), severity: Severity::Error });
    }

    pub fn warn(&mut self, path: impl Into<PathBuf>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into(), severity: Severity::Warning });
    }

    /// Lists `dir`, reporting its dangling links and unreadable entries (errors); `None`
    /// (reported) when the folder cannot be listed.
    pub fn list(&mut self, dir: &Path) -> Option<image_io::Listing> {
        match image_io::list_dir(dir) {
            Ok(l) => {
                for (p, m) in &l.broken {
                    if self.reported.insert(p.clone()) {
                        self.error(p, m.clone());
                    }
                }
                Some(l)
            }
            Err(e) => {
                self.error(dir, format!("cannot list: {e}"));
                None
            }
        }
    }

    /// Probes `paths` not probed yet, on all CPUs.
    pub fn prefetch<'p>(&mut self, paths: impl IntoIterator<Item = &'p PathBuf>) {
        let todo: Vec<PathBuf> = paths
            .into_iter()
            .filter(|p| !self.probed.contains_key(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let verify = self.cfg.verify_decode;
        for (p, r) in todo.iter().zip(parallel_map(&todo, |p| image_io::probe(p, verify))) {
            self.probed.insert(p.clone(), r);
        }
    }

    /// The size of a usable image; `None` (reported once) when it cannot be read or decoded
    /// or its shorter side is below `min_image_side`.
    pub fn image(&mut self, path: &Path) -> Option<(u32, u32)> {
        if !self.probed.contains_key(path) {
            let r = image_io::probe(path, self.cfg.verify_decode);
            self.probed.insert(path.to_path_buf(), r);
        }
        let msg = match &self.probed[path] {
            Ok(i) if i.width.min(i.height) < self.cfg.min_image_side => format!(
                "too small: {}x{}, the shorter side must be at least {} (data.min_image_side)",
                i.width, i.height, self.cfg.min_image_side
            ),
            Ok(i) => {
                let s = (i.width, i.height);
                self.sizes.insert(path.to_path_buf(), s);
                return Some(s);
            }
            Err(e) => e.to_string(),
        };
        if self.reported.insert(path.to_path_buf()) {
            self.error(path, msg);
        }
        None
    }

    /// The bucket of an image of `size`; `None` (reported) when `bucket_no_upscale` rounds it
    /// to zero.
    pub fn bucket(&mut self, sel: &BucketSelector, path: &Path, size: (u32, u32)) -> Option<(u32, u32)> {
        let b = sel.select(size);
        if b.0 == 0 || b.1 == 0 {
            self.error(
                path,
                format!(
                    "{}x{} is smaller than one bucket step ({}) with bucket_no_upscale: its bucket would be {}x{}",
                    size.0, size.1, sel.reso_steps, b.0, b.1
                ),
            );
            return None;
        }
        Some(b)
    }

    /// A UTF-8 text file, trimmed; `None` (reported as an error) when unreadable.
    pub fn read_text(&mut self, path: &Path) -> Option<String> {
        match std::fs::read(path) {
            Ok(b) => match String::from_utf8(b) {
                Ok(s) => Some(s.trim().to_string()),
                Err(e) => {
                    self.error(path, format!("not UTF-8 text: {e}"));
                    None
                }
            },
            Err(e) => {
                self.error(path, format!("cannot read: {e}"));
                None
            }
        }
    }
}

/// `f` over `items` on up to one thread per CPU, results in order.
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(items.len()).max(1);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_iter().map(|r| r.expect("every item mapped")).collect()
}
