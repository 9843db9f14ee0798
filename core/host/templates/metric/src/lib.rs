//! `@NAME@`: a likeness metric plugin, written by `host plugins new` as a starting point.
//!
//! A metric embeds images: `embed` takes `pixels` (f32 NCHW RGB in [0, 1]) and returns one
//! L2-normalised row per image plus a `valid` flag (1 where it found what it measures: a face,
//! for a face metric). `host eval-faces --metric @NAME@` scores pairs by the cosine of their
//! embeddings; in training (`[metric] plugin = "@NAME@"`, `weight > 0`) the host differentiates
//! the identity loss through `backward`.
//!
//! This one measures colour statistics, which is enough to see the plumbing work:
//! ```text
//! f = [mean R, mean G, mean B, mean R², mean G², mean B²] − 0.25       u = f / |f|
//! ```
//! An all-black image (or one with |f| ≈ 0) is "not found": valid 0, embedding zeros. Backward,
//! for g = dL/du on a valid row, P = H·W pixels:
//! ```text
//! dL/df = (g − u (u·g)) / |f|          dL/dx[c, p] = dL/df[c] / P + dL/df[3 + c] · 2 x[c, p] / P
//! ```
//! Replace [`embed_rows`] and [`backward_rows`] with your embedding; the test at the bottom
//! checks the gradient against finite differences.

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::serde_json::json;
use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode,
    MetricInterface, MetricOutput, MetricPlugin, PluginDescriptor, PluginError, PluginKind, Result, TensorView,
};
use serde::Deserialize;

/// The id configs name. `plugin.toml` repeats it: after changing it (or the version or the
/// description in Cargo.toml), rebuild and write the manifest again:
/// `host plugins manifest target/release/@LIB@ > plugin.toml`.
pub const ID: &str = "@NAME@";
/// Embedding size.
pub const DIM: usize = 6;

/// The config (`[metric.config]`, or `host eval-faces --metric-config JSON`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Cosine at or above which two images count as "the same" (none by default).
    same_person_threshold: Option<f64>,
}

/// What one embed computes, per row (f64).
struct Embedded {
    emb: Vec<f64>,
    norms: Vec<f64>,
    valid: Vec<u8>,
}

/// What `backward` needs from the last `embed(Train)`: a copy, never the borrowed view.
struct Pending {
    pixels: Vec<f64>,
    dims: [usize; 4],
    embedded: Embedded,
}

pub struct Metric {
    pending: Option<Pending>,
}

fn dims_of(shape: &[i64]) -> Result<[usize; 4]> {
    if shape.len() != 4 || shape[1] != 3 || shape.iter().any(|&d| d <= 0) {
        return Err(err::input(format!("metric `{ID}`: `pixels` must be [B, 3, H, W] with B, H, W ≥ 1, got {shape:?}")));
    }
    Ok([shape[0] as usize, 3, shape[2] as usize, shape[3] as usize])
}

/// The embedding of every image of `x` (`dims` = [B, 3, H, W]).
fn embed_rows(x: &[f64], dims: [usize; 4]) -> Embedded {
    let [b, c, h, w] = dims;
    let p = h * w;
    let mut e = Embedded { emb: vec![0.0; b * DIM], norms: vec![0.0; b], valid: vec![0; b] };
    for i in 0..b {
        let image = &x[i * c * p..(i + 1) * c * p];
        if image.iter().all(|&v| v == 0.0) {
            continue;
        }
        let mut f = [0.0; DIM];
        for ch in 0..3 {
            let plane = &image[ch * p..(ch + 1) * p];
            f[ch] = plane.iter().sum::<f64>() / p as f64 - 0.25;
            f[3 + ch] = plane.iter().map(|v| v * v).sum::<f64>() / p as f64 - 0.25;
        }
        let n = f.iter().map(|v| v * v).sum::<f64>().sqrt();
        if !n.is_finite() || n <= 1e-12 {
            continue;
        }
        e.norms[i] = n;
        e.valid[i] = 1;
        for k in 0..DIM {
            e.emb[i * DIM + k] = f[k] / n;
        }
    }
    e
}

/// dL/dx for g = dL/d(embeddings) `[B, 6]` (zero on rows that are not valid).
fn backward_rows(x: &[f64], dims: [usize; 4], e: &Embedded, g: &[f64]) -> Vec<f64> {
    let [b, c, h, w] = dims;
    let p = h * w;
    let mut dx = vec![0.0; x.len()];
    for i in (0..b).filter(|&i| e.valid[i] == 1) {
        let u = &e.emb[i * DIM..(i + 1) * DIM];
        let gi = &g[i * DIM..(i + 1) * DIM];
        let ug: f64 = u.iter().zip(gi).map(|(a, b)| a * b).sum();
        let df: Vec<f64> = (0..DIM).map(|k| (gi[k] - u[k] * ug) / e.norms[i]).collect();
        for ch in 0..3 {
            let base = i * c * p + ch * p;
            let (a, s) = (df[ch] / p as f64, 2.0 * df[3 + ch] / p as f64);
            for q in 0..p {
                dx[base + q] = a + s * x[base + q];
            }
        }
    }
    dx
}

impl MetricPlugin for Metric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary(env!("CARGO_PKG_DESCRIPTION"))
            // True because `backward` is implemented: the metric can train an identity loss.
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {"same_person_threshold": {"type": "number", "minimum": -1, "maximum": 1}}
            }))
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> Result<Self> {
        Self::interface(config_json)?;
        Ok(Metric { pending: None })
    }

    /// How the scores read (asked before `create`): the threshold `eval-faces` reports against.
    fn interface(config_json: &str) -> Result<MetricInterface> {
        let c: Config = parse_config(ID, config_json)?;
        let threshold = match c.same_person_threshold {
            None => -2.0, // no verdict
            Some(t) if (-1.0..=1.0).contains(&t) => t,
            Some(t) => return Err(err::config(format!("config of plugin `{ID}`: `same_person_threshold` {t} is not in [-1, 1]"))),
        };
        Ok(MetricInterface { same_person_threshold: threshold, embeds_texts: false, subject: "colour statistics".into() })
    }

    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> Result<MetricOutput> {
        let t = CpuTensor::<f32>::from_view(pixels, "pixels")?;
        let dims = dims_of(&t.shape)?;
        let x: Vec<f64> = t.data.iter().map(|&v| v as f64).collect();
        let e = embed_rows(&x, dims);
        let b = dims[0] as i64;
        let out = MetricOutput {
            embeddings: CpuTensor::new(vec![b, DIM as i64], e.emb.iter().map(|&v| v as f32).collect()).into_managed(),
            valid: CpuTensor::new(vec![b], e.valid.clone()).into_managed(),
        };
        // Eval embeds (the reference images) may come between a Train embed and its backward.
        if mode == ForwardMode::Train {
            self.pending = Some(Pending { pixels: x, dims, embedded: e });
        }
        Ok(out)
    }

    fn backward(&mut self, d_embeddings: &TensorView) -> Result<ManagedTensor> {
        let p = self.pending.take().ok_or_else(|| {
            PluginError::new(ErrorCode::NoPendingForward, format!("metric `{ID}`: backward without a pending embed(Train)"))
        })?;
        let g = CpuTensor::<f32>::from_view(d_embeddings, "d_embeddings")?;
        let [b, c, h, w] = p.dims;
        if g.shape != [b as i64, DIM as i64] {
            return Err(err::input(format!("metric `{ID}`: `d_embeddings` must be [{b}, {DIM}], got {:?}", g.shape)));
        }
        let g: Vec<f64> = g.data.iter().map(|&v| v as f64).collect();
        let dx = backward_rows(&p.pixels, p.dims, &p.embedded, &g);
        let shape = vec![b as i64, c as i64, h as i64, w as i64];
        Ok(CpuTensor::new(shape, dx.into_iter().map(|v| v as f32).collect()).into_managed())
    }
}

likeness_sdk::export_metric_plugin!(Metric);

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences in f64 of L = Σ g · u: truncation ~h², rounding ~1e-16/h, both far
    /// below the 1e-7 · max|grad| allowed.
    #[test]
    fn backward_matches_finite_differences() {
        let dims = [2, 3, 3, 4];
        let x: Vec<f64> = (0..72).map(|i| ((i as f64) * 0.61).sin() * 0.45 + 0.5).collect();
        let g: Vec<f64> = (0..2 * DIM).map(|i| ((i as f64) * 1.3).cos()).collect();
        let loss = |x: &[f64]| -> f64 { embed_rows(x, dims).emb.iter().zip(&g).map(|(a, b)| a * b).sum() };
        let dx = backward_rows(&x, dims, &embed_rows(&x, dims), &g);
        let gmax = dx.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(gmax > 1e-3);
        for i in 0..x.len() {
            let h = 1e-6;
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!((fd - dx[i]).abs() <= 1e-7 * gmax, "pixel {i}: finite differences {fd}, analytic {}", dx[i]);
        }
    }

    #[test]
    fn black_is_not_found_and_rows_are_unit() {
        let mut x = vec![0.3; 2 * 3 * 4];
        x[12..].fill(0.0);
        let e = embed_rows(&x, [2, 3, 2, 2]);
        assert_eq!(e.valid, [1, 0]);
        let n: f64 = e.emb[..DIM].iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-12);
    }
}
