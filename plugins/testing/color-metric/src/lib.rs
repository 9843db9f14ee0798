//! Test fixture `testing-color-metric`: a **differentiable** identity metric for engine tests.
//!
//! The "identity" of an image is its colour statistics (see [`color`]): a 6-d unit vector per
//! sample, valid unless the sample is all black. `embed(Train)` copies what `backward` needs
//! (the pixels as f64, the unit rows and their norms) — never the borrowed view — and
//! `backward` consumes it: a second `backward`, or one without a pending `embed(Train)`, is
//! `NoPendingForward`. `embed(Eval)` leaves a pending `Train` state untouched (the host may
//! embed the reference images in between).

use likeness_sdk::{
    err, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, MetricOutput,
    MetricPlugin, PluginDescriptor, PluginError, PluginKind, TensorView,
};

pub mod color;

pub const ID: &str = "testing-color-metric";

/// What `backward` needs from the last `embed(Train)`.
struct Pending {
    pixels: Vec<f64>,
    dims: [usize; 4],
    embedded: color::Embedded,
}

pub struct ColorMetric {
    pending: Option<Pending>,
}

impl MetricPlugin for ColorMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("Test fixture: differentiable 6-d colour-statistics embedding")
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        let v: likeness_sdk::serde_json::Value = likeness_sdk::parse_config(ID, config_json)?;
        match v.as_object() {
            Some(o) if o.is_empty() => Ok(ColorMetric { pending: None }),
            _ => Err(err::config(format!("config of plugin `{ID}`: expected an empty object `{{}}`, got {v}"))),
        }
    }

    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> likeness_sdk::Result<MetricOutput> {
        let (x, dims, e) = color::embed_view(ID, pixels)?;
        let out = color::outputs(&e);
        if mode == ForwardMode::Train {
            self.pending = Some(Pending { pixels: x, dims, embedded: e });
        }
        Ok(out)
    }

    fn backward(&mut self, d_embeddings: &TensorView) -> likeness_sdk::Result<likeness_sdk::abi::ManagedTensor> {
        let Some(p) = self.pending.as_ref() else {
            return Err(PluginError::new(
                ErrorCode::NoPendingForward,
                format!("metric `{ID}`: backward without a pending embed(Train) (or called twice)"),
            ));
        };
        let g = CpuTensor::<f32>::from_view(d_embeddings, "d_embeddings")?;
        let [b, c, h, w] = p.dims;
        let expect = vec![b as i64, color::DIM as i64];
        if g.shape != expect {
            return Err(err::input(format!(
                "metric `{ID}`: `d_embeddings` must have the embeddings' shape {expect:?}, got {:?}",
                g.shape
            )));
        }
        let p = self.pending.take().expect("checked above");
        let gd: Vec<f64> = g.data.iter().map(|&v| v as f64).collect();
        let dx = color::backward_f64(&p.pixels, p.dims, &p.embedded, &gd);
        Ok(CpuTensor::new(vec![b as i64, c as i64, h as i64, w as i64], dx.into_iter().map(|v| v as f32).collect())
            .into_managed())
    }
}

likeness_sdk::export_metric_plugin!(ColorMetric);

#[cfg(test)]
mod tests {
    use super::*;
    use color::{backward_f64, embed_f64, DIM};

    use likeness_sdk::testing::uniform;

    #[test]
    fn embedding_is_unit_and_black_is_invalid() {
        let dims = [3, 3, 4, 5];
        let mut x = uniform(1, 3 * 60);
        x[60..120].fill(0.0); // sample 1 all black
        let e = embed_f64(&x, dims);
        assert_eq!(e.valid, vec![1, 0, 1]);
        for i in [0, 2] {
            let n: f64 = e.emb[i * DIM..(i + 1) * DIM].iter().map(|v| v * v).sum();
            // A 6-d vector normalised in f64: a few ulps.
            assert!((n - 1.0).abs() < 1e-12);
        }
        assert!(e.emb[DIM..2 * DIM].iter().all(|&v| v == 0.0));
        // A mid-grey sample has mean 0.5 and mean square 0.25: f = [.25,.25,.25,0,0,0].
        let g = embed_f64(&[0.5; 3 * 4], [1, 3, 2, 2]);
        let s = 1.0 / 3f64.sqrt();
        for (a, b) in g.emb.iter().zip([s, s, s, 0.0, 0.0, 0.0]) {
            assert!((a - b).abs() < 1e-12, "{:?}", g.emb);
        }
        // 25 % white per channel: f = 0, no direction → invalid.
        let q = embed_f64(&[1.0, 0.0, 0.0, 0.0].repeat(3), [1, 3, 2, 2]);
        assert_eq!(q.valid, vec![0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let dims = [3, 3, 3, 4];
        let n = 3 * 36;
        let mut x = uniform(2, n);
        x[36..72].fill(0.0); // an invalid row: zero gradient
        let g = uniform(3, 3 * DIM).into_iter().map(|v| v - 0.5).collect::<Vec<_>>();
        let loss = |x: &[f64]| -> f64 {
            let e = embed_f64(x, dims);
            e.emb.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let e = embed_f64(&x, dims);
        let dx = backward_f64(&x, dims, &e, &g);
        let eps = 1e-6;
        let mut worst = 0.0f64;
        let gmax = dx.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for i in (0..n).filter(|i| !(36..72).contains(i)) {
            let mut xp = x.clone();
            xp[i] += eps;
            let up = loss(&xp);
            xp[i] -= 2.0 * eps;
            let down = loss(&xp);
            worst = worst.max(((up - down) / (2.0 * eps) - dx[i]).abs());
        }
        eprintln!("color metric backward: max |fd − analytic| = {worst:e}, max |grad| = {gmax:e}");
        assert!(gmax > 1e-3);
        // f64 central differences, scalar Rust (the same on every CPU): rounding ≈ 1e-16/1e-6,
        // truncation ≈ 1e-12 — both ≪ 1e-7 · max|grad|.
        assert!(worst <= 1e-7 * gmax, "{worst:e} vs {gmax:e}");
        assert!(dx[36..72].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn through_the_abi_shims_train_copies_and_backward_consumes() {
        use likeness_sdk::abi::MetricPluginModRef;
        use likeness_sdk::abi_stable::std_types::RStr;
        let m: MetricPluginModRef = likeness_sdk::plugin::metric_module::<ColorMetric>();
        assert!(m.descriptor()().capabilities.differentiable);
        let h = m.create()(RStr::from("{}"), Device::CPU, 0).unwrap();
        let g = CpuTensor::new(vec![2, 6], vec![0.1f32; 12]);
        let e = m.backward()(h, g.view()).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoPendingForward);

        let data: Vec<f32> = uniform(4, 2 * 3 * 9).into_iter().map(|v| v as f32).collect();
        let mut pixels = CpuTensor::new(vec![2, 3, 3, 3], data.clone());
        let out = m.embed()(h, pixels.view(), ForwardMode::Train).unwrap();
        let emb = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
        let valid = CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap();
        assert_eq!(emb.shape, vec![2, 6]);
        assert_eq!(valid.data, vec![1, 1]);
        // An Eval embed in between (the reference images) does not disturb the pending state.
        let black = CpuTensor::new(vec![1, 3, 2, 2], vec![0.0f32; 12]);
        let ref_out = m.embed()(h, black.view(), ForwardMode::Eval).unwrap();
        assert_eq!(CpuTensor::<u8>::from_managed(&ref_out.valid, "v").unwrap().data, vec![0]);
        // The host overwrites its buffer before backward: the plugin kept a copy.
        pixels.data.fill(0.0);
        let wrong = CpuTensor::new(vec![2, 5], vec![0.1f32; 10]);
        let e = m.backward()(h, wrong.view()).unwrap_err();
        assert!(e.message.contains("[2, 6]") && e.message.contains("[2, 5]"), "{}", e.message);
        let dx = m.backward()(h, g.view()).unwrap();
        let dx = CpuTensor::<f32>::from_managed(&dx, "dx").unwrap();
        assert_eq!(dx.shape, vec![2, 3, 3, 3]);
        let x64: Vec<f64> = data.iter().map(|&v| v as f64).collect();
        let e64 = embed_f64(&x64, [2, 3, 3, 3]);
        let expect = backward_f64(&x64, [2, 3, 3, 3], &e64, &[0.1f32 as f64; 12]);
        // The ABI returns the f64 gradient rounded to f32: |d_pixels| ≲ 1 here, so ≤ 6e-8.
        for (a, b) in dx.data.iter().zip(&expect) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(dx.data.iter().any(|&v| v != 0.0));
        // Consumed.
        assert_eq!(m.backward()(h, g.view()).unwrap_err().code, ErrorCode::NoPendingForward);
        // Shape errors name the input.
        let gray = CpuTensor::new(vec![1, 1, 2, 2], vec![0.5f32; 4]);
        let e = m.embed()(h, gray.view(), ForwardMode::Eval).unwrap_err();
        assert!(e.message.contains("`pixels`") && e.message.contains("[1, 1, 2, 2]"), "{}", e.message);
        m.destroy()(h);
    }
}
