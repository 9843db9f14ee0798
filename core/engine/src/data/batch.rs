//! Batching: the epoch order (musubi-tuner's bucket batches, deterministic in seed and epoch)
//! and the stacking of examples into model-ready tensors.

use std::collections::BTreeMap;

use likeness_abi::CpuTensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::image_cache::ImageCache;
use super::Example;
use crate::error::{EngineError, Result};

/// The order of `n` training examples in `epoch`: a permutation seeded by (`seed`, `epoch`), so a
/// resumed run sees exactly the order the interrupted one would have.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = epoch_rng(seed, epoch, b"epochord");
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

fn epoch_rng(seed: u64, epoch: u64, tag: &[u8; 8]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(tag);
    ChaCha8Rng::from_seed(key)
}

/// The batches of one epoch, as indices into `examples`, deterministic in (`seed`, `epoch`):
/// musubi-tuner's `BucketBatchManager` — examples grouped by bucket (and by their image and
/// text roles and every image's size, so a batch stacks: musubi keys batches by the target
/// bucket plus every control's shape), each group shuffled and cut into batches of at most
/// `batch_size`, then the order of all batches shuffled. Every batch holds one bucket only;
/// every example appears exactly once. With a single group (one bucket, one role set) the
/// batches are consecutive cuts of one shuffled order that does not depend on `batch_size`,
/// so `k` micro-batches of `b` (gradient accumulation) consume exactly the examples of one
/// batch of `k·b`.
pub fn epoch_batches(examples: &[Example], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    type Key<'a> = ((u32, u32), (Vec<&'a str>, Vec<&'a str>), Vec<(&'a str, (u32, u32))>);
    let mut groups: BTreeMap<Key<'_>, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        groups.entry((e.bucket, e.signature(), e.shapes())).or_default().push(i);
    }
    let mut rng = epoch_rng(seed, epoch, b"buckets\0");
    let mut batches = Vec::new();
    let several = groups.len() > 1;
    for (_, mut idx) in groups {
        idx.shuffle(&mut rng);
        batches.extend(idx.chunks(bs).map(|c| c.to_vec()));
    }
    if several {
        batches.shuffle(&mut rng);
    }
    batches
}

/// A batch ready for a model: each image role as an NCHW RGB `f32` tensor in [0, 1], each
/// text role as one string per sample, and the example ids.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<(String, CpuTensor<f32>)>,
    pub texts: Vec<(String, Vec<String>)>,
    pub ids: Vec<String>,
}

impl Batch {
    /// The tensor of image role `role`.
    pub fn image(&self, role: &str) -> Option<&CpuTensor<f32>> {
        self.images.iter().find(|(r, _)| r == role).map(|(_, t)| t)
    }

    /// The strings of text role `role`.
    pub fn text(&self, role: &str) -> Option<&[String]> {
        self.texts.iter().find(|(r, _)| r == role).map(|(_, t)| t.as_slice())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Loads (through `cache`) and stacks `examples`, which must share one bucket, the same
/// image and text roles and the same image sizes (as [`epoch_batches`] groups them). Each
/// role's tensor has that role's size ([`Example::size_of`]: the bucket, or a control's own).
pub fn make_batch(examples: &[&Example], cache: &mut ImageCache) -> Result<Batch> {
    let first =
        examples.first().ok_or_else(|| EngineError::Other("make_batch: no examples given (batch size 0)".into()))?;
    let sig = first.signature();
    for e in &examples[1..] {
        if e.bucket != first.bucket {
            return Err(EngineError::Other(format!(
                "make_batch: `{}` is in bucket {}x{} but `{}` in {}x{}: a batch holds one bucket (use epoch_batches)",
                first.id, first.bucket.0, first.bucket.1, e.id, e.bucket.0, e.bucket.1
            )));
        }
        if e.signature() != sig {
            return Err(EngineError::Other(format!(
                "make_batch: `{}` has roles {:?} but `{}` has {:?}: a batch needs the same roles",
                first.id,
                sig,
                e.id,
                e.signature()
            )));
        }
        if e.shapes() != first.shapes() {
            return Err(EngineError::Other(format!(
                "make_batch: `{}` has image sizes {:?} but `{}` has {:?}: a batch needs the same sizes (use epoch_batches)",
                first.id,
                first.shapes(),
                e.id,
                e.shapes()
            )));
        }
    }
    cache.prefetch(examples)?;
    let n = examples.len();
    let mut images = Vec::with_capacity(first.images.len());
    for (k, (role, _)) in first.images.iter().enumerate() {
        let (w, h) = first.size_of(role);
        let mut data = Vec::with_capacity(3 * w as usize * h as usize * n);
        for e in examples {
            let img = cache.get_bucket(&e.images[k].1, (w, h))?;
            data.extend_from_slice(&img);
        }
        images.push((role.clone(), CpuTensor::new(vec![n as i64, 3, h as i64, w as i64], data)));
    }
    let texts = first
        .texts
        .iter()
        .enumerate()
        .map(|(k, (role, _))| (role.clone(), examples.iter().map(|e| e.texts[k].1.clone()).collect()))
        .collect();
    Ok(Batch { images, texts, ids: examples.iter().map(|e| e.id.clone()).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{self, ex};

    #[test]
    fn epoch_batches_are_deterministic_single_bucket_and_complete() {
        let mut v = Vec::new();
        for i in 0..23 {
            let b = if i % 3 == 0 { (64, 32) } else { (32, 32) };
            let roles: &[&str] = if i % 5 == 0 {
                &["target", "reference", "control", "control_1"]
            } else {
                &["target", "reference", "control"]
            };
            v.push(ex(&format!("e{i:02}"), b, roles));
        }
        let a = epoch_batches(&v, 4, 7, 0);
        assert_eq!(a, epoch_batches(&v, 4, 7, 0));
        assert_ne!(a, epoch_batches(&v, 4, 7, 1));
        assert_ne!(a, epoch_batches(&v, 4, 8, 0));
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        for b in &a {
            assert!(!b.is_empty() && b.len() <= 4);
            assert!(
                b.iter().all(|&i| v[i].bucket == v[b[0]].bucket && v[i].signature() == v[b[0]].signature()),
                "{b:?}"
            );
        }
        assert!(epoch_batches(&[], 4, 1, 1).is_empty());
        assert_eq!(epoch_batches(&v[..3], 0, 1, 1).iter().map(|b| b.len()).sum::<usize>(), 3);
    }

    #[test]
    fn make_batch_stacks_roles_and_refuses_mixed_buckets() {
        let d = tempfile::tempdir().unwrap();
        let mut e = ex("a", (32, 16), &["target", "reference"]);
        let mut f = ex("b", (32, 16), &["target", "reference"]);
        for x in [&mut e, &mut f] {
            for (i, (_, p)) in x.images.iter_mut().enumerate() {
                *p = d.path().join(format!("{}-{i}.png", x.id));
                testutil::write_img(p, 40 + 10 * i as u32, 30, i as u8);
            }
        }
        let mut cache = ImageCache::new();
        let b = make_batch(&[&e, &f], &mut cache).unwrap();
        assert_eq!(b.ids, vec!["a", "b"]);
        assert_eq!(b.image("target").unwrap().shape, vec![2, 3, 16, 32]);
        assert_eq!(b.image("reference").unwrap().shape, vec![2, 3, 16, 32]);
        assert_eq!(b.text("caption").unwrap(), &["caption of a".to_string(), "caption of b".to_string()]);
        assert_eq!(cache.len(), 4);
        let b2 = make_batch(&[&e, &f], &mut cache).unwrap();
        assert_eq!(b.images, b2.images);
        let mut g = f.clone();
        g.bucket = (16, 16);
        let err = make_batch(&[&e, &g], &mut cache).unwrap_err().to_string();
        assert!(err.contains("one bucket"), "{err}");
        let mut h = f.clone();
        h.images.pop();
        assert!(make_batch(&[&e, &h], &mut cache).unwrap_err().to_string().contains("roles"));
        assert!(make_batch(&[], &mut cache).is_err());
        // The memory budget drops old entries.
        let mut small = ImageCache::new().with_budget(3 * 32 * 16 * 4);
        make_batch(&[&e], &mut small).unwrap();
        assert_eq!(small.len(), 1);
    }
}
