//! Loss plugin `identity`: how far a generated image's identity embedding is from its
//! reference, with the analytic gradient for the generated embedding. Pure Rust, CPU, computed
//! in f64 internally.
//!
//! # Inputs
//! * `embedding` `[B, D]` f32 — the generated image's identity embedding (gradients are
//!   returned for it only);
//! * `reference_embedding` `[B, D]` f32 — the reference face's embedding;
//! * optional `valid`, `reference_valid` `[B]` u8 — 1 where the metric found a face;
//! * optional `weight` `[B]` f32 ≥ 0 — multiplies each row's contribution and gradient (the
//!   trainer's identity weighting by noise level); the mean stays over the valid rows.
//!
//! A row is **valid** when both flags are non-zero and both embeddings have a non-zero norm.
//! Invalid rows contribute zero loss and zero gradient; they are counted (`invalid_pairs`).
//! Embeddings need not be normalised: with `e`, `r` one row of each,
//! ```text
//! cos = e·r / (|e| |r|),   d = 1 − cos,   ∂cos/∂e = r / (|e||r|) − cos · e / |e|²
//! ```
//!
//! # Modes (`mode` in the config), each a mean over the `n` valid rows
//! * `cosine` (default): `loss = mean d`.
//! * `seed004`: the weighting of seed 004's "Custom Face Loss" (`torch.where(d > threshold,
//!   d², d)`): `loss = mean w`, `w = d²` where `d > distance_threshold` (default 0.3), else `d`.
//!   Like the original, `w` jumps at the threshold (0.3 → 0.09); the gradient is that of the
//!   branch taken.
//! * `triplet`: the negative of valid row `k` is the reference embedding of the next valid row
//!   (cyclically); `loss = mean max(0, d_pos − d_neg + margin)` (`margin` default 0.2), with
//!   the gradient of ReLU taken as 0 at 0 (as torch's `relu`). With fewer than 2 valid rows
//!   there is no negative and the loss is 0.
//!
//! No valid row gives value 0 and a zero gradient — never NaN.
//!
//! # Terms
//! `similarity` (mean cos over valid rows, 0 if none), `valid_pairs`, `invalid_pairs`.

use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, Inputs, LossOutput, LossPlugin,
    PluginDescriptor, PluginKind,
};
use serde::Deserialize;

/// Plugin id users type.
pub const ID: &str = "identity";
/// Names of the inputs, in order; gradients are returned for the first only. The last two are
/// optional.
pub const INPUT_NAMES: [&str; 5] = ["embedding", "reference_embedding", "valid", "reference_valid", "weight"];
/// Default `distance_threshold` of mode `seed004` (seed 004: "if similarity < 0.7").
pub const DEFAULT_DISTANCE_THRESHOLD: f64 = 0.3;
/// Default `margin` of mode `triplet`.
pub const DEFAULT_MARGIN: f64 = 0.2;

/// How per-row distances become the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// mean (1 − cos).
    #[default]
    Cosine,
    /// mean of d² where d > threshold, else d (seed 004's `compute_weighted_loss`).
    Seed004,
    /// mean max(0, d_pos − d_neg + margin), negatives from the next valid row.
    Triplet,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cosine => "cosine",
            Mode::Seed004 => "seed004",
            Mode::Triplet => "triplet",
        }
    }
}

/// The config as written by users (`{"mode": "seed004", "distance_threshold": 0.3}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    mode: Mode,
    distance_threshold: Option<f64>,
    margin: Option<f64>,
}

/// The resolved config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub mode: Mode,
    /// Used by [`Mode::Seed004`] only.
    pub distance_threshold: f64,
    /// Used by [`Mode::Triplet`] only.
    pub margin: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { mode: Mode::Cosine, distance_threshold: DEFAULT_DISTANCE_THRESHOLD, margin: DEFAULT_MARGIN }
    }
}

impl Config {
    pub fn cosine() -> Self {
        Config::default()
    }

    pub fn seed004(distance_threshold: f64) -> Self {
        Config { mode: Mode::Seed004, distance_threshold, ..Config::default() }
    }

    pub fn triplet(margin: f64) -> Self {
        Config { mode: Mode::Triplet, margin, ..Config::default() }
    }

    /// Parses and validates the plugin's config JSON (empty = all defaults). A key that the
    /// chosen mode does not use is rejected, so that a typo'd mode cannot silently ignore it.
    pub fn from_json(json: &str) -> likeness_sdk::Result<Self> {
        let raw: RawConfig = parse_config(ID, json)?;
        let mode = raw.mode;
        if raw.distance_threshold.is_some() && mode != Mode::Seed004 {
            return Err(err::config(format!(
                "config of plugin `{ID}`: `distance_threshold` only applies to \"mode\": \"seed004\" (mode is \"{}\")",
                mode.as_str()
            )));
        }
        if raw.margin.is_some() && mode != Mode::Triplet {
            return Err(err::config(format!(
                "config of plugin `{ID}`: `margin` only applies to \"mode\": \"triplet\" (mode is \"{}\")",
                mode.as_str()
            )));
        }
        let cfg = Config {
            mode,
            distance_threshold: raw.distance_threshold.unwrap_or(DEFAULT_DISTANCE_THRESHOLD),
            margin: raw.margin.unwrap_or(DEFAULT_MARGIN),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// `distance_threshold` must be finite in [0, 2] (the range of 1 − cos); `margin` finite ≥ 0.
    pub fn validate(&self) -> likeness_sdk::Result<()> {
        let t = self.distance_threshold;
        if !t.is_finite() || !(0.0..=2.0).contains(&t) {
            return Err(err::config(format!(
                "config of plugin `{ID}`: `distance_threshold` must be a number in [0, 2] (a cosine distance), got {t}"
            )));
        }
        let m = self.margin;
        if !m.is_finite() || m < 0.0 {
            return Err(err::config(format!("config of plugin `{ID}`: `margin` must be a finite number ≥ 0, got {m}")));
        }
        Ok(())
    }
}

/// JSON Schema (draft 2020-12) of the config.
pub fn config_schema() -> serde_json::Value {
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "identity loss",
        "description": "Identity-embedding loss over rows where both faces were found. cosine: mean(1 − cos); \
                        seed004: mean(d² if d > distance_threshold else d), d = 1 − cos; \
                        triplet: mean max(0, d_pos − d_neg + margin), negative = next valid row's reference",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "mode": {
                "enum": ["cosine", "seed004", "triplet"],
                "default": "cosine",
                "description": "how per-row cosine distances become the loss",
            },
            "distance_threshold": {
                "type": "number",
                "minimum": 0,
                "maximum": 2,
                "default": DEFAULT_DISTANCE_THRESHOLD,
                "description": "seed004 only: distances above it are squared",
            },
            "margin": {
                "type": "number",
                "minimum": 0,
                "default": DEFAULT_MARGIN,
                "description": "triplet only: required gap between negative and positive distance",
            },
        },
    })
}

/// What [`compute`] returns.
#[derive(Debug, Clone)]
pub struct Computed {
    pub value: f64,
    /// `similarity`, `valid_pairs`, `invalid_pairs`.
    pub terms: Vec<(String, f64)>,
    /// dL/d(embedding) `[B, D]` f32; `Some` iff `want_grad`.
    pub grad: Option<CpuTensor>,
}

/// The loss value, its logged terms and dL/d(embedding).
///
/// `embedding` and `reference` must be f32 `[B, D]` of the same shape (D ≥ 1); `valid` and
/// `reference_valid`, when given, must have `B` entries. Errors name the offending input.
pub fn compute(
    cfg: &Config,
    embedding: &CpuTensor,
    reference: &CpuTensor,
    valid: Option<&[u8]>,
    reference_valid: Option<&[u8]>,
    want_grad: bool,
) -> likeness_sdk::Result<Computed> {
    compute_weighted(cfg, embedding, reference, valid, reference_valid, None, want_grad)
}

/// [`compute`] with an optional weight per row (input `weight`, `[B]` f32, e.g. (1 − t)² of
/// the sample's noise level).
pub fn compute_weighted(
    cfg: &Config,
    embedding: &CpuTensor,
    reference: &CpuTensor,
    valid: Option<&[u8]>,
    reference_valid: Option<&[u8]>,
    weights: Option<&[f32]>,
    want_grad: bool,
) -> likeness_sdk::Result<Computed> {
    cfg.validate()?;
    let (b, d) = check_shapes(&embedding.shape, &reference.shape)?;
    if let Some(w) = weights {
        if w.len() != b || w.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(err::input(format!(
                "loss `{ID}`: input `weight` must be [{b}] finite numbers ≥ 0 (one per row of `embedding` {:?}), got {w:?}",
                embedding.shape
            )));
        }
    }
    let weights: Option<Vec<f64>> = weights.map(|w| w.iter().map(|&x| x as f64).collect());
    for (name, flags) in [("valid", valid), ("reference_valid", reference_valid)] {
        if let Some(f) = flags {
            if f.len() != b {
                return Err(err::input(format!(
                    "loss `{ID}`: input `{name}` must have shape [{b}] (one flag per row of `embedding` {:?}), got {} entries",
                    embedding.shape,
                    f.len()
                )));
            }
        }
    }
    let flags: Vec<bool> =
        (0..b).map(|i| valid.is_none_or(|v| v[i] != 0) && reference_valid.is_none_or(|v| v[i] != 0)).collect();
    // Non-finite numbers in a row that counts would poison the mean: refuse them by name.
    for (name, t) in [("embedding", embedding), ("reference_embedding", reference)] {
        for (i, _) in flags.iter().enumerate().filter(|(_, f)| **f) {
            if let Some(j) = t.data[i * d..(i + 1) * d].iter().position(|v| !v.is_finite()) {
                return Err(err::input(format!(
                    "loss `{ID}`: input `{name}` has a non-finite value ({}) at row {i}, column {j} of a valid row",
                    t.data[i * d + j]
                )));
            }
        }
    }
    let e: Vec<f64> = embedding.data.iter().map(|&v| v as f64).collect();
    let r: Vec<f64> = reference.data.iter().map(|&v| v as f64).collect();
    let out = compute_f64_weighted(cfg, [b, d], &e, &r, &flags, weights.as_deref(), want_grad);
    let grad = out.grad.map(|g| CpuTensor::new(embedding.shape.clone(), g.into_iter().map(|v| v as f32).collect()));
    Ok(Computed { value: out.value, terms: out.terms, grad })
}

/// Shape checks with messages that name the inputs; returns `(B, D)`.
pub fn check_shapes(embedding: &[i64], reference: &[i64]) -> likeness_sdk::Result<(usize, usize)> {
    for (name, shape) in [("embedding", embedding), ("reference_embedding", reference)] {
        if shape.len() != 2 {
            return Err(err::input(format!("loss `{ID}`: input `{name}` must be 2-D [B, D], got shape {shape:?}")));
        }
        if shape[1] <= 0 || shape[0] < 0 {
            return Err(err::input(format!(
                "loss `{ID}`: input `{name}` must have an embedding size D ≥ 1, got shape {shape:?}"
            )));
        }
    }
    if embedding != reference {
        return Err(err::input(format!(
            "loss `{ID}`: inputs `embedding` {embedding:?} and `reference_embedding` {reference:?} must have the same shape"
        )));
    }
    Ok((embedding[0] as usize, embedding[1] as usize))
}

/// Result of [`compute_f64`].
#[derive(Debug, Clone)]
pub struct F64Output {
    pub value: f64,
    pub terms: Vec<(String, f64)>,
    pub grad: Option<Vec<f64>>,
}

/// One row pair's cosine and (when asked) ∂cos/∂e.
fn cosine_row(e: &[f64], r: &[f64], want_grad: bool) -> (f64, Option<Vec<f64>>) {
    let ee: f64 = e.iter().map(|v| v * v).sum();
    let rr: f64 = r.iter().map(|v| v * v).sum();
    let er: f64 = e.iter().zip(r).map(|(a, b)| a * b).sum();
    let (ne, nr) = (ee.sqrt(), rr.sqrt());
    let cos = er / (ne * nr);
    let grad = want_grad.then(|| {
        let a = 1.0 / (ne * nr);
        let c = cos / ee;
        e.iter().zip(r).map(|(ei, ri)| a * ri - c * ei).collect()
    });
    (cos, grad)
}

/// The whole computation in f64 on row-major `[B, D]` buffers. `flags[i]` says whether the
/// metric found both faces of row `i`; rows with a zero-norm embedding are invalid too.
pub fn compute_f64(cfg: &Config, dims: [usize; 2], e: &[f64], r: &[f64], flags: &[bool], want_grad: bool) -> F64Output {
    compute_f64_weighted(cfg, dims, e, r, flags, None, want_grad)
}

/// [`compute_f64`] with a weight per row: row `i`'s contribution (and its gradient) is
/// multiplied by `weights[i]`; the mean is still over the `n` valid rows, so weights of 1 give
/// [`compute_f64`] exactly. (The gradient of row `i` depends on row `i`'s contribution only —
/// a triplet negative is another row's *reference* — so weighting rows weights their
/// gradients.)
pub fn compute_f64_weighted(
    cfg: &Config,
    dims: [usize; 2],
    e: &[f64],
    r: &[f64],
    flags: &[bool],
    weights: Option<&[f64]>,
    want_grad: bool,
) -> F64Output {
    let [b, d] = dims;
    let weight = |i: usize| weights.map_or(1.0, |w| w[i]);
    assert_eq!(e.len(), b * d);
    assert_eq!(r.len(), b * d);
    assert_eq!(flags.len(), b);
    let row = |i: usize| i * d..(i + 1) * d;
    let nonzero = |x: &[f64], i: usize| x[row(i)].iter().any(|&v| v != 0.0);
    let rows: Vec<usize> = (0..b).filter(|&i| flags[i] && nonzero(e, i) && nonzero(r, i)).collect();
    let n = rows.len();
    let mut grad = want_grad.then(|| vec![0.0f64; b * d]);

    let mut sim_sum = 0.0;
    let mut value = 0.0;
    if n > 0 {
        let inv_n = 1.0 / n as f64;
        for (k, &i) in rows.iter().enumerate() {
            let ei = &e[row(i)];
            let (cos, g_cos) = cosine_row(ei, &r[row(i)], want_grad);
            sim_sum += cos;
            let dist = 1.0 - cos;
            // (loss contribution, dL/dcos_pos, optional extra gradient from the negative)
            let (contrib, dcos, neg_grad) = match cfg.mode {
                Mode::Cosine => (dist, -1.0, None),
                Mode::Seed004 => {
                    if dist > cfg.distance_threshold {
                        (dist * dist, -2.0 * dist, None)
                    } else {
                        (dist, -1.0, None)
                    }
                }
                Mode::Triplet => {
                    if n < 2 {
                        (0.0, 0.0, None)
                    } else {
                        let j = rows[(k + 1) % n];
                        let (cos_neg, g_neg) = cosine_row(ei, &r[row(j)], want_grad);
                        // d_pos − d_neg + margin = cos_neg − cos + margin
                        let h = cos_neg - cos + cfg.margin;
                        if h > 0.0 {
                            (h, -1.0, g_neg)
                        } else {
                            (0.0, 0.0, None)
                        }
                    }
                }
            };
            let w = weight(i);
            value += w * contrib;
            if let (Some(g), Some(gc)) = (grad.as_mut(), g_cos) {
                let out = &mut g[i * d..(i + 1) * d];
                for (o, v) in out.iter_mut().zip(&gc) {
                    *o += w * inv_n * dcos * v;
                }
                if let Some(gn) = neg_grad {
                    // ∂h/∂cos_neg = +1
                    for (o, v) in out.iter_mut().zip(&gn) {
                        *o += w * inv_n * v;
                    }
                }
            }
        }
        value *= inv_n;
        sim_sum *= inv_n;
    }
    let terms = vec![
        ("similarity".to_string(), sim_sum),
        ("valid_pairs".to_string(), n as f64),
        ("invalid_pairs".to_string(), (b - n) as f64),
    ];
    F64Output { value, terms, grad }
}

// ---------------------------------------------------------------------------------------------
// The plugin

/// The `identity` loss plugin.
pub struct IdentityLoss {
    cfg: Config,
}

impl IdentityLoss {
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

fn flags(inputs: &Inputs<'_>, name: &str) -> likeness_sdk::Result<Option<Vec<u8>>> {
    match inputs.try_get(name) {
        None => Ok(None),
        Some(v) => {
            let t = CpuTensor::<u8>::from_view(v, name)?;
            if t.shape.len() != 1 {
                return Err(err::input(format!(
                    "loss `{ID}`: input `{name}` must be 1-D [B] u8, got shape {:?}",
                    t.shape
                )));
            }
            Ok(Some(t.data))
        }
    }
}

impl LossPlugin for IdentityLoss {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Loss, env!("CARGO_PKG_VERSION"))
            .summary("Identity-embedding losses: 1 − cosine, seed-004 weighted distance, triplet")
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .config_schema(config_schema())
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        Ok(IdentityLoss { cfg: Config::from_json(config_json)? })
    }

    fn input_names(&self) -> Vec<String> {
        INPUT_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn value_and_grad(&mut self, inputs: Inputs<'_>, want_grad: bool) -> likeness_sdk::Result<LossOutput> {
        let e = CpuTensor::<f32>::from_view(inputs.get("embedding")?, "embedding")?;
        let r = CpuTensor::<f32>::from_view(inputs.get("reference_embedding")?, "reference_embedding")?;
        let v = flags(&inputs, "valid")?;
        let rv = flags(&inputs, "reference_valid")?;
        let w = match inputs.try_get("weight") {
            None => None,
            Some(v) => Some(CpuTensor::<f32>::from_view(v, "weight")?.data),
        };
        let out = compute_weighted(&self.cfg, &e, &r, v.as_deref(), rv.as_deref(), w.as_deref(), want_grad)?;
        let grads = out.grad.map(|g| vec![("embedding".to_string(), g.into_managed())]).unwrap_or_default();
        Ok(LossOutput { value: out.value, terms: out.terms, grads })
    }
}

likeness_sdk::export_loss_plugin!(IdentityLoss);

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic normal-ish numbers (sum of uniforms, SplitMix64).
    fn noise(seed: u64, n: usize) -> Vec<f64> {
        likeness_sdk::testing::uniform(seed, 4 * n).chunks(4).map(|c| c.iter().sum::<f64>() - 2.0).collect()
    }

    /// References that are noisy copies of the embeddings, with a per-row noise level so that
    /// distances spread over roughly [0.02, 1].
    fn pair(seed: u64, b: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let e = noise(seed, b * d);
        let z = noise(seed + 1, b * d);
        let r = (0..b * d)
            .map(|k| {
                let level = 0.15 + 0.6 * (k / d) as f64;
                e[k] + level * z[k]
            })
            .collect();
        (e, r)
    }

    fn fd_check(cfg: Config, b: usize, d: usize, flags: &[bool], seed: u64) -> F64Output {
        let (e, r) = pair(seed, b, d);
        let out = compute_f64(&cfg, [b, d], &e, &r, flags, true);
        let grad = out.grad.clone().unwrap();
        let eps = 1e-6;
        let gmax = grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let mut worst = 0.0f64;
        for i in 0..b * d {
            let mut ep = e.clone();
            ep[i] += eps;
            let up = compute_f64(&cfg, [b, d], &ep, &r, flags, false).value;
            ep[i] -= 2.0 * eps;
            let down = compute_f64(&cfg, [b, d], &ep, &r, flags, false).value;
            let fd = (up - down) / (2.0 * eps);
            worst = worst.max((fd - grad[i]).abs());
        }
        eprintln!("{cfg:?} B={b} D={d}: value {} max |fd − analytic| = {worst:e}, max |grad| = {gmax:e}", out.value);
        assert!(gmax > 1e-3, "{cfg:?}: the gradient is (almost) zero, the check proves nothing");
        // Central differences in f64 (pure scalar Rust: the same bits on every CPU, since Rust
        // neither reassociates nor contracts floating-point operations): rounding ≈ u64·|L|/eps
        // ≈ 1e-16 · O(1) / 1e-6 = 1e-10, truncation ≈ eps²·|L⁽³⁾|/6 ≈ 1e-12; measured ≤ 1.3e-10.
        // 1e-7 · max|grad| (≥ 1e-10, the gradient being ≥ 1e-3).
        assert!(worst <= 1e-7 * gmax, "{cfg:?}: max |fd − analytic| = {worst:e} (max |grad| {gmax:e})");
        for (i, f) in flags.iter().enumerate() {
            if !f {
                assert!(grad[i * d..(i + 1) * d].iter().all(|&g| g == 0.0), "invalid row {i} has a gradient");
            }
        }
        out
    }

    fn distances(b: usize, d: usize, seed: u64) -> Vec<f64> {
        let (e, r) = pair(seed, b, d);
        (0..b).map(|i| 1.0 - cosine_row(&e[i * d..(i + 1) * d], &r[i * d..(i + 1) * d], false).0).collect()
    }

    #[test]
    fn gradient_cosine_matches_finite_differences() {
        fd_check(Config::cosine(), 4, 7, &[true, false, true, true], 1);
    }

    #[test]
    fn gradient_seed004_matches_finite_differences_on_both_branches() {
        let cfg = Config::seed004(0.3);
        let flags = [true, true, true, false, true];
        let dist = distances(5, 6, 2);
        // The data must exercise both branches, away from the jump (1e-3 ≫ the FD step 1e-6
        // times |∂d/∂e| ≲ 10: no finite-difference step crosses the threshold).
        assert!(dist.iter().any(|&x| x < 0.29) && dist.iter().any(|&x| x > 0.31), "{dist:?}");
        assert!(dist.iter().all(|&x| (x - 0.3).abs() > 1e-3), "{dist:?}");
        fd_check(cfg, 5, 6, &flags, 2);
    }

    #[test]
    fn gradient_triplet_matches_finite_differences() {
        // A large margin keeps every hinge active; a small one leaves some at 0.
        fd_check(Config::triplet(2.5), 4, 5, &[true, true, false, true], 3);
        let out = fd_check(Config::triplet(0.2), 5, 5, &[true, true, true, true, true], 4);
        assert!(out.value >= 0.0);
    }

    #[test]
    fn seed004_weighting_matches_the_seed() {
        // One valid row each, with a known distance: e = (1, 0), r = (cos θ, sin θ).
        for (cos, expect) in [(0.9f64, 0.1f64), (0.5, 0.25), (0.75, 0.25), (0.2, 0.64)] {
            let e = [1.0, 0.0];
            let r = [cos, (1.0 - cos * cos).sqrt()];
            let v = compute_f64(&Config::seed004(0.3), [1, 2], &e, &r, &[true], false).value;
            // d = 0.25 and 0.1 stay linear; d = 0.5 and 0.8 are squared. f64 of O(1) values
            // through a handful of operations: a few ulps (1e-16) — 1e-12 is a safe exact check.
            assert!((v - expect).abs() < 1e-12, "cos {cos}: {v} vs {expect}");
        }
    }

    #[test]
    fn triplet_with_one_valid_row_is_zero_and_hinge_is_relu() {
        let (e, r) = pair(5, 3, 4);
        let out = compute_f64(&Config::triplet(0.5), [3, 4], &e, &r, &[false, true, false], true);
        assert_eq!(out.value, 0.0);
        assert!(out.grad.unwrap().iter().all(|&g| g == 0.0));
        assert_eq!(out.terms[1], ("valid_pairs".to_string(), 1.0));
        // Identical references and a zero margin: d_pos = 0 ≤ d_neg, every hinge is inactive.
        let (e, _) = pair(6, 3, 4);
        let out = compute_f64(&Config::triplet(0.0), [3, 4], &e, &e, &[true; 3], true);
        assert_eq!(out.value, 0.0);
        assert!((out.terms[0].1 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn nan_safety() {
        // All rows invalid: value 0, zero gradient, similarity 0.
        let e = CpuTensor::new(vec![3, 4], vec![0.5f32; 12]);
        let r = CpuTensor::new(vec![3, 4], vec![0.25f32; 12]);
        for cfg in [Config::cosine(), Config::seed004(0.3), Config::triplet(0.2)] {
            let out = compute(&cfg, &e, &r, Some(&[0, 0, 0]), None, true).unwrap();
            assert_eq!(out.value, 0.0);
            assert!(out.grad.unwrap().data.iter().all(|&g| g == 0.0));
            let terms: Vec<(&str, f64)> = out.terms.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            assert_eq!(terms, [("similarity", 0.0), ("valid_pairs", 0.0), ("invalid_pairs", 3.0)]);
            let out = compute(&cfg, &e, &r, None, Some(&[0, 0, 0]), false).unwrap();
            assert_eq!(out.value, 0.0);
            assert!(out.grad.is_none());
        }
        // Zero rows (the metric's "no face" rows are zeros) are invalid even when flagged valid;
        // non-finite values in an invalid row are ignored.
        let mut ed = vec![0.5f32; 12];
        ed[4..8].fill(0.0);
        let mut rd = vec![0.25f32; 12];
        rd[8] = 0.0;
        rd[9..12].fill(0.0);
        ed[0] = f32::NAN;
        let e = CpuTensor::new(vec![3, 4], ed);
        let r = CpuTensor::new(vec![3, 4], rd);
        for cfg in [Config::cosine(), Config::seed004(0.3), Config::triplet(0.2)] {
            let out = compute(&cfg, &e, &r, Some(&[0, 1, 1]), Some(&[1, 1, 1]), true).unwrap();
            assert_eq!(out.value, 0.0, "{cfg:?}");
            assert!(out.grad.unwrap().data.iter().all(|&g| g == 0.0));
            assert_eq!(out.terms[1].1, 0.0);
            assert_eq!(out.terms[2].1, 3.0);
        }
        // An empty batch.
        let empty = CpuTensor::new(vec![0, 4], vec![]);
        let out = compute(&Config::cosine(), &empty, &empty, None, None, true).unwrap();
        assert_eq!(out.value, 0.0);
        assert_eq!(out.grad.unwrap().shape, vec![0, 4]);
        // A NaN in a valid row is refused by name.
        let mut bad = vec![0.5f32; 8];
        bad[5] = f32::INFINITY;
        let bad = CpuTensor::new(vec![2, 4], bad);
        let ok = CpuTensor::new(vec![2, 4], vec![0.5f32; 8]);
        let e = compute(&Config::cosine(), &ok, &bad, None, None, false).unwrap_err();
        assert!(e.message.contains("`reference_embedding`") && e.message.contains("row 1, column 1"), "{}", e.message);
    }

    #[test]
    fn unnormalised_embeddings_give_scale_free_loss() {
        let (e, r) = pair(7, 3, 5);
        let flags = [true; 3];
        let a = compute_f64(&Config::cosine(), [3, 5], &e, &r, &flags, false);
        let e2: Vec<f64> = e.iter().map(|v| v * 7.5).collect();
        let b = compute_f64(&Config::cosine(), [3, 5], &e2, &r, &flags, false);
        // Scale-free up to f64 rounding of the norms (a few ulps of O(1) values).
        assert!((a.value - b.value).abs() < 1e-12);
        assert!((a.terms[0].1 - (1.0 - a.value)).abs() < 1e-12);
    }

    #[test]
    fn shape_errors_name_the_inputs() {
        let e = CpuTensor::new(vec![2, 4], vec![0.5f32; 8]);
        let r3 = CpuTensor::new(vec![2, 3], vec![0.5f32; 6]);
        let m = compute(&Config::cosine(), &e, &r3, None, None, false).unwrap_err().message;
        assert!(m.contains("`embedding` [2, 4]") && m.contains("`reference_embedding` [2, 3]"), "{m}");
        let flat = CpuTensor::new(vec![8], vec![0.5f32; 8]);
        let m = compute(&Config::cosine(), &flat, &e, None, None, false).unwrap_err().message;
        assert!(m.contains("`embedding` must be 2-D"), "{m}");
        let m = compute(&Config::cosine(), &e, &flat, None, None, false).unwrap_err().message;
        assert!(m.contains("`reference_embedding` must be 2-D"), "{m}");
        let m = compute(&Config::cosine(), &e, &e, Some(&[1, 1, 1]), None, false).unwrap_err().message;
        assert!(m.contains("`valid` must have shape [2]"), "{m}");
        let m = compute(&Config::cosine(), &e, &e, None, Some(&[1]), false).unwrap_err().message;
        assert!(m.contains("`reference_valid` must have shape [2]"), "{m}");
        let nod = CpuTensor::new(vec![2, 0], vec![]);
        let m = compute(&Config::cosine(), &nod, &nod, None, None, false).unwrap_err().message;
        assert!(m.contains("D ≥ 1"), "{m}");
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(IdentityLoss::create("", Device::CPU, 0).unwrap().cfg, Config::default());
        let c = IdentityLoss::create(r#"{"mode": "seed004"}"#, Device::CPU, 0).unwrap().cfg;
        assert_eq!(c, Config::seed004(0.3));
        let c = IdentityLoss::create(r#"{"mode": "triplet", "margin": 0.5}"#, Device::CPU, 0).unwrap().cfg;
        assert_eq!(c, Config::triplet(0.5));
        let bad = |json: &str, needle: &str| {
            let e = IdentityLoss::create(json, Device::CPU, 0).err().unwrap();
            assert_eq!(e.code, likeness_sdk::ErrorCode::InvalidConfig);
            assert!(e.message.contains(needle) && e.message.contains("identity"), "{json}: {}", e.message);
        };
        bad(r#"{"mode": "l2"}"#, "l2");
        bad(r#"{"treshold": 0.3}"#, "treshold");
        bad(r#"{"margin": 0.3}"#, "only applies to \"mode\": \"triplet\"");
        bad(r#"{"mode": "triplet", "distance_threshold": 0.3}"#, "only applies to \"mode\": \"seed004\"");
        bad(r#"{"mode": "triplet", "margin": -1}"#, "`margin`");
        bad(r#"{"mode": "seed004", "distance_threshold": 3}"#, "`distance_threshold`");
    }

    #[test]
    fn descriptor_has_schema_and_is_differentiable() {
        let d = IdentityLoss::descriptor();
        assert_eq!(d.id.as_str(), "identity");
        assert_eq!(d.kind, PluginKind::Loss);
        assert!(d.capabilities.differentiable);
        let schema: serde_json::Value = serde_json::from_str(d.config_schema.as_str()).unwrap();
        assert_eq!(schema["properties"]["mode"]["default"], "cosine");
        assert_eq!(schema["properties"]["distance_threshold"]["default"], 0.3);
        assert_eq!(schema["additionalProperties"], false);
    }

    #[test]
    fn through_the_abi_shims() {
        use likeness_sdk::abi::{LossPluginModRef, NamedView};
        use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
        let m: LossPluginModRef = likeness_sdk::plugin::loss_module::<IdentityLoss>();
        let h = m.create()(RStr::from(r#"{"mode": "seed004"}"#), Device::CPU, 0).unwrap();
        let names: Vec<String> = m.input_names()(h).into_iter().map(|s| s.into_string()).collect();
        assert_eq!(names, INPUT_NAMES);
        let e = CpuTensor::new(vec![2, 2], vec![1.0f32, 0.0, 0.0, 1.0]);
        let r = CpuTensor::new(vec![2, 2], vec![0.0f32, 1.0, 0.0, 2.0]);
        let v = CpuTensor::new(vec![2], vec![1u8, 1]);
        let rv = CpuTensor::new(vec![2], vec![1u8, 0]);
        let views = [
            NamedView { name: RStr::from("embedding"), view: e.view() },
            NamedView { name: RStr::from("reference_embedding"), view: r.view() },
            NamedView { name: RStr::from("valid"), view: v.view() },
            NamedView { name: RStr::from("reference_valid"), view: rv.view() },
        ];
        let out = m.value_and_grad()(h, RSlice::from_slice(&views), true).unwrap();
        // Row 0: cos 0, d = 1 > 0.3 → w = 1; row 1 is invalid. (f64 of exact f32 inputs: ulps.)
        assert!((out.value - 1.0).abs() < 1e-12, "{}", out.value);
        assert_eq!(out.grads.len(), 1);
        assert_eq!(out.grads[0].name.as_str(), "embedding");
        let g = CpuTensor::<f32>::from_managed(&out.grads[0].tensor, "grad").unwrap();
        // dw/de = 2d · (−∂cos/∂e) = 2 · −(r/|e||r| − 0) = (0, −2) on row 0.
        assert_eq!(g.data, vec![0.0, -2.0, 0.0, 0.0]);
        let terms: Vec<(String, f64)> = out.terms.iter().map(|t| (t.name.to_string(), t.value)).collect();
        assert_eq!(terms[1], ("valid_pairs".to_string(), 1.0));
        // Without the optional flags both rows count.
        let out = m.value_and_grad()(h, RSlice::from_slice(&views[..2]), false).unwrap();
        assert!(out.grads.is_empty());
        assert_eq!(out.terms[2].value, 0.0);
        let missing = m.value_and_grad()(h, RSlice::from_slice(&views[1..]), false).unwrap_err();
        assert!(missing.message.contains("missing input `embedding`"), "{}", missing.message);
        let wrong = [
            NamedView { name: RStr::from("embedding"), view: e.view() },
            NamedView { name: RStr::from("reference_embedding"), view: r.view() },
            NamedView { name: RStr::from("valid"), view: e.view() },
        ];
        let m2 = m.value_and_grad()(h, RSlice::from_slice(&wrong), false).unwrap_err();
        assert!(m2.message.contains("`valid` has dtype f32, expected u8"), "{}", m2.message);
        m.destroy()(h);
    }
}
