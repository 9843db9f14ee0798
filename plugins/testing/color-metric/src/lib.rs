//! Test fixture `testing-color-metric`: a **differentiable** identity metric for engine tests.
//!
//! The "identity" of an image is its colour statistics (see [`color`]): a 6-d unit vector per
//! sample, valid unless the sample is all black. `embed(Train)` copies what `backward` needs
//! (the pixels as f64, the unit rows and their norms) — never the borrowed view — and
//! `backward` consumes it: a second `backward`, or one without a pending `embed(Train)`, is
//! `NoPendingForward`. `embed(Eval)` leaves a pending `Train` state untouched (the host may
//! embed the reference images in between).
//!
//! It also stands in for a text–image metric (CLIP) and for a metric with a declared
//! same-person threshold: `embed_texts` maps each text to a fixed 6-d vector drawn from a hash
//! of its bytes ([`text_vector`]; deterministic, no gradient), and the config
//! `{"same_person_threshold": x}` (optional, x in [−1, 1]) is what `interface` declares;
//! without it the metric declares none.

use likeness_sdk::{
    err, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, MetricInterface,
    MetricOutput, MetricPlugin, PluginDescriptor, PluginError, PluginKind, TensorView,
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
        threshold(config_json)?;
        Ok(ColorMetric { pending: None })
    }

    fn interface(config_json: &str) -> likeness_sdk::Result<MetricInterface> {
        Ok(MetricInterface {
            same_person_threshold: threshold(config_json)?.unwrap_or(-2.0),
            embeds_texts: true,
            subject: "colour statistics".into(),
        })
    }

    fn embed_texts(&mut self, texts: &[&str]) -> likeness_sdk::Result<likeness_sdk::abi::ManagedTensor> {
        let data: Vec<f32> = texts.iter().flat_map(|t| text_vector(t)).collect();
        Ok(CpuTensor::new(vec![texts.len() as i64, color::DIM as i64], data).into_managed())
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

/// The config's optional `same_person_threshold`; any other key is an error.
fn threshold(config_json: &str) -> likeness_sdk::Result<Option<f64>> {
    let v: likeness_sdk::serde_json::Value = likeness_sdk::parse_config(ID, config_json)?;
    let Some(o) = v.as_object() else {
        return Err(err::config(format!("config of plugin `{ID}`: expected a JSON object, got {v}")));
    };
    if let Some(k) = o.keys().find(|k| *k != "same_person_threshold") {
        return Err(err::config(format!(
            "config of plugin `{ID}`: unknown key `{k}` in {v} (the only key is `same_person_threshold`, a number in [-1, 1])"
        )));
    }
    match o.get("same_person_threshold") {
        None => Ok(None),
        Some(t) => match t.as_f64() {
            Some(x) if (-1.0..=1.0).contains(&x) => Ok(Some(x)),
            _ => Err(err::config(format!(
                "config of plugin `{ID}`: `same_person_threshold` must be a number in [-1, 1], got {t}"
            ))),
        },
    }
}

/// The fixture's text embedding: FNV-1a of the bytes seeds a splitmix64 stream, six values in
/// [−1, 1) (not normalised: the text term must not rely on unit text vectors).
pub fn text_vector(text: &str) -> [f32; color::DIM] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut out = [0f32; color::DIM];
    for o in out.iter_mut() {
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 24 high bits: exact in f32.
        *o = ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    }
    out
}

likeness_sdk::export_metric_plugin!(ColorMetric);

#[cfg(test)]
mod tests {
    use super::*;
    use color::{backward_f64, embed_f64, DIM};

    use likeness_sdk::testing::uniform;

    #[test]
    fn texts_and_threshold() {
        let (a, b) = (text_vector("a photo"), text_vector("a portrait"));
        assert_eq!(a, text_vector("a photo"), "deterministic");
        assert_ne!(a, b);
        assert!(a.iter().chain(&b).all(|v| (-1.0..1.0).contains(v)));
        assert_eq!(threshold("{}").unwrap(), None);
        assert_eq!(threshold(r#"{"same_person_threshold": 0.5}"#).unwrap(), Some(0.5));
        for bad in [r#"{"same_person_threshold": 2}"#, r#"{"x": 1}"#, "[1]"] {
            assert!(threshold(bad).is_err(), "{bad}");
        }
    }

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
