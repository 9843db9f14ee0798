//! The image cache: decoded, fitted images shared by every batch of a run.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::image_io::{self, Fit};
use super::scan::parallel_map;
use super::{DataSet, Example};
use crate::error::Result;

/// Decoded, fitted images keyed by (path, fit), so each image is decoded once per run (up to
/// a memory budget, default 2 GiB; the oldest entries are dropped beyond it).
#[derive(Debug, Clone)]
pub struct ImageCache {
    images: HashMap<(PathBuf, Fit), Arc<Vec<f32>>>,
    order: VecDeque<(PathBuf, Fit)>,
    bytes: usize,
    budget: usize,
    square_crop: bool,
}

impl Default for ImageCache {
    fn default() -> Self {
        ImageCache { images: HashMap::new(), order: VecDeque::new(), bytes: 0, budget: 2 << 30, square_crop: false }
    }
}

impl ImageCache {
    /// An empty cache fitting images with musubi-tuner's bucket resize.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache fitting images as `ds` asks (the historic square crop for `bundles`
    /// without bucketing).
    pub fn for_dataset(ds: &DataSet) -> Self {
        ImageCache { square_crop: ds.square_crop, ..Self::default() }
    }

    /// Sets the memory budget in bytes.
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self
    }

    /// The CHW image at `path` square-cropped and resized to `size` (the historic bundle
    /// loader), decoded on first use.
    pub fn get(&mut self, path: &Path, size: u32) -> Result<Arc<Vec<f32>>> {
        self.get_fit(path, Fit::SquareCrop(size))
    }

    /// The CHW image at `path` fitted to `bucket` by this cache's rule.
    pub fn get_bucket(&mut self, path: &Path, bucket: (u32, u32)) -> Result<Arc<Vec<f32>>> {
        self.get_fit(path, fit_for(self.square_crop, bucket))
    }

    /// The CHW image at `path` fitted by `fit`, decoded on first use.
    pub fn get_fit(&mut self, path: &Path, fit: Fit) -> Result<Arc<Vec<f32>>> {
        let key = (path.to_path_buf(), fit);
        if let Some(img) = self.images.get(&key) {
            return Ok(img.clone());
        }
        let img = Arc::new(image_io::load(path, fit)?);
        self.insert(key, img.clone());
        Ok(img)
    }

    fn insert(&mut self, key: (PathBuf, Fit), img: Arc<Vec<f32>>) {
        self.bytes += img.len() * 4;
        self.images.insert(key.clone(), img);
        self.order.push_back(key);
        while self.bytes > self.budget && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(v) = self.images.remove(&old) {
                    self.bytes -= v.len() * 4;
                }
            }
        }
    }

    /// Decodes the images of `examples` that are not cached yet, on all CPUs.
    pub fn prefetch(&mut self, examples: &[&Example]) -> Result<()> {
        let mut todo: Vec<(PathBuf, Fit)> = Vec::new();
        let mut seen = HashSet::new();
        for e in examples {
            for (role, p) in &e.images {
                let k = (p.clone(), fit_for(self.square_crop, e.size_of(role)));
                if !self.images.contains_key(&k) && seen.insert(k.clone()) {
                    todo.push(k);
                }
            }
        }
        for (k, r) in todo.iter().zip(parallel_map(&todo, |(p, f)| image_io::load(p, *f))) {
            self.insert(k.clone(), Arc::new(r?));
        }
        Ok(())
    }

    /// Number of cached images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Drops every cached image (frees memory).
    pub fn clear(&mut self) {
        self.images.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

pub(super) fn fit_for(square_crop: bool, (w, h): (u32, u32)) -> Fit {
    if square_crop && w == h {
        Fit::SquareCrop(w)
    } else {
        Fit::Bucket(w, h)
    }
}
