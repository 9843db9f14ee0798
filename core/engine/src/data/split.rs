//! Splits: the deterministic train / val / test cut by the run seed, and repeats.

use std::collections::HashMap;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::bucket::BucketSelector;
use super::scan::Scan;
use super::{DataSet, Example, Source};
use crate::config::DataConfig;

/// Whether the layout holds out validation/test examples under `data.split`.
pub(crate) fn uses_fractions(cfg: &DataConfig, layout_default: bool) -> bool {
    match cfg.split.as_str() {
        "fractions" => true,
        "none" => false,
        _ => layout_default,
    }
}

/// Builds a [`DataSet`] from examples: split by `seed` (when `split`), training examples
/// repeated by `repeats` (id → count, absent = 1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble(
    layout: &str,
    root: PathBuf,
    cfg: &DataConfig,
    seed: u64,
    split: bool,
    examples: Vec<Example>,
    scan: Scan<'_>,
    buckets: BucketSelector,
    square_crop: bool,
    sources: Vec<Source>,
    repeats: &HashMap<String, usize>,
) -> DataSet {
    let (vf, tf) = if split { (cfg.val_fraction, cfg.test_fraction) } else { (0.0, 0.0) };
    let (mut train, val, test) = split_examples(examples, vf, tf, seed);
    if repeats.values().any(|&r| r != 1) {
        let mut out = Vec::with_capacity(train.len());
        for e in train {
            let n = repeats.get(&e.id).copied().unwrap_or(1);
            for k in 1..n {
                let mut r = e.clone();
                r.id = format!("{}#{}", e.id, k + 1);
                out.push(r);
            }
            if n > 0 {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        train = out;
    }
    DataSet {
        layout: layout.into(),
        root,
        train,
        val,
        test,
        problems: scan.problems,
        buckets,
        square_crop,
        batch_size: None,
        sources,
        image_sizes: scan.sizes,
        seed,
        split: if split { "fractions".into() } else { "none".into() },
    }
}

/// `(n_test, n_val)` of `n` items: rounded fractions, at least one validation item when
/// `n ≥ 3` and `val_fraction > 0`, at least one training item whenever there is any.
pub fn split_counts(n: usize, val_fraction: f64, test_fraction: f64) -> (usize, usize) {
    let mut n_test = (n as f64 * test_fraction).round() as usize;
    let mut n_val = (n as f64 * val_fraction).round() as usize;
    if n >= 3 && n_val == 0 && val_fraction > 0.0 {
        n_val = 1;
    }
    while n > 0 && n_test + n_val >= n {
        if n_test > 0 && (n_test >= n_val || n_val <= 1) {
            n_test -= 1;
        } else if n_val > 0 {
            n_val -= 1;
        } else {
            break;
        }
    }
    (n_test, n_val)
}

/// Sorts `examples` by id, shuffles them by `seed` and cuts (train, val, test)
/// ([`split_counts`]).
pub fn split_examples(
    mut examples: Vec<Example>,
    val_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>, Vec<Example>) {
    examples.sort_by(|a, b| a.id.cmp(&b.id));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    let (n_test, n_val) = split_counts(examples.len(), val_fraction, test_fraction);
    let train = examples.split_off(n_test + n_val);
    let val = examples.split_off(n_test);
    (train, val, examples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::ex;

    #[test]
    fn split_examples_is_deterministic_and_order_free() {
        let v: Vec<Example> = (0..20).map(|i| ex(&format!("x{i}"), (8, 8), &["target"])).collect();
        let mut r = v.clone();
        r.reverse();
        let a = split_examples(v.clone(), 0.15, 0.15, 3);
        assert_eq!(a, split_examples(r, 0.15, 0.15, 3));
        assert_eq!((a.0.len(), a.1.len(), a.2.len()), (14, 3, 3));
        assert_ne!(a, split_examples(v.clone(), 0.15, 0.15, 4));
        let none = split_examples(v, 0.0, 0.0, 3);
        assert_eq!(none.0.len(), 20);
        assert_eq!(split_counts(3, 0.15, 0.15), (0, 1));
        assert_eq!(split_counts(1, 0.15, 0.15), (0, 0));
        assert_eq!(split_counts(5, 0.0, 0.0), (0, 0));
    }
}
