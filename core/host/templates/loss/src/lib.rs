//! `@NAME@`: a likeness loss plugin, written by `host plugins new` as a starting point.
//!
//! As the content loss (`loss.plugin = "@NAME@"`), the host calls it with the model's
//! `prediction` (its `pixels`) and the example's `target` image: f32 NCHW RGB in [0, 1], the
//! same shape. It returns the value and dL/d`prediction`, which the host chains into the model.
//!
//! This one is the Charbonnier loss (a smooth L1), with `eps` from the config:
//! ```text
//! L = mean(sqrt((p − t)² + eps²))        dL/dp = (p − t) / sqrt((p − t)² + eps²) / N
//! ```
//! Replace [`charbonnier`] with your loss; the test at the bottom checks the gradient against
//! finite differences.

use likeness_sdk::serde_json::json;
use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, Inputs, LossOutput, LossPlugin,
    PluginDescriptor, PluginKind, Result,
};
use serde::Deserialize;

/// The id configs name. `plugin.toml` repeats it: after changing it (or the version or the
/// description in Cargo.toml), rebuild and write the manifest again:
/// `host plugins manifest target/release/@LIB@ > plugin.toml`.
pub const ID: &str = "@NAME@";

/// The config (`[loss.config]` in a run config); unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_eps")]
    eps: f64,
}

fn default_eps() -> f64 {
    1e-3
}

pub struct Loss {
    eps: f64,
}

/// The value and, with `want_grad`, dL/dp, in f64.
pub fn charbonnier(p: &[f32], t: &[f32], eps: f64, want_grad: bool) -> (f64, Vec<f32>) {
    let n = p.len().max(1) as f64;
    let mut sum = 0.0;
    let mut grad = Vec::with_capacity(if want_grad { p.len() } else { 0 });
    for (&a, &b) in p.iter().zip(t) {
        let d = a as f64 - b as f64;
        let r = (d * d + eps * eps).sqrt();
        sum += r;
        if want_grad {
            grad.push((d / r / n) as f32);
        }
    }
    (sum / n, grad)
}

impl LossPlugin for Loss {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Loss, env!("CARGO_PKG_VERSION"))
            .summary(env!("CARGO_PKG_DESCRIPTION"))
            // A training loss must return its gradient (the host refuses one that does not).
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {"eps": {"type": "number", "exclusiveMinimum": 0, "default": 0.001}}
            }))
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> Result<Self> {
        let c: Config = parse_config(ID, config_json)?;
        if !(c.eps.is_finite() && c.eps > 0.0) {
            return Err(err::config(format!("config of plugin `{ID}`: `eps` must be a number > 0, got {}", c.eps)));
        }
        Ok(Loss { eps: c.eps })
    }

    fn input_names(&self) -> Vec<String> {
        vec!["prediction".into(), "target".into()]
    }

    fn value_and_grad(&mut self, inputs: Inputs<'_>, want_grad: bool) -> Result<LossOutput> {
        // The views are borrowed for this call: `from_view` copies them.
        let p = CpuTensor::<f32>::from_view(inputs.get("prediction")?, "prediction")?;
        let t = CpuTensor::<f32>::from_view(inputs.get("target")?, "target")?;
        if p.shape != t.shape {
            return Err(err::input(format!(
                "loss `{ID}`: `prediction` {:?} and `target` {:?} differ in shape",
                p.shape, t.shape
            )));
        }
        let (value, grad) = charbonnier(&p.data, &t.data, self.eps, want_grad);
        let grads = if want_grad { vec![("prediction".to_string(), CpuTensor::new(p.shape, grad).into_managed())] } else { vec![] };
        // `terms` appear in metrics.jsonl under `terms.<name>`.
        Ok(LossOutput { value, terms: vec![(ID.to_string(), value)], grads })
    }
}

likeness_sdk::export_loss_plugin!(Loss);

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of the f64 loss: truncation ~h² · |L'''| and rounding ~1e-16/h,
    /// both far below the 1e-6 allowed (the analytic gradient is rounded to f32: ~1e-8 here).
    #[test]
    fn gradient_matches_finite_differences() {
        let p: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin() * 0.5 + 0.5).collect();
        let t: Vec<f32> = (0..12).map(|i| (i as f32 * 0.11).cos() * 0.5 + 0.5).collect();
        let eps = 0.05;
        let (_, g) = charbonnier(&p, &t, eps, true);
        let loss = |p: &[f64]| -> f64 {
            p.iter().zip(&t).map(|(a, b)| ((a - *b as f64).powi(2) + eps * eps).sqrt()).sum::<f64>() / p.len() as f64
        };
        let base: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        for i in 0..p.len() {
            let h = 1e-6;
            let (mut up, mut down) = (base.clone(), base.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!((fd - g[i] as f64).abs() < 1e-6, "element {i}: finite differences {fd}, analytic {}", g[i]);
        }
    }

    #[test]
    fn config_is_checked() {
        assert!(Loss::create("{}", Device::CPU, 0).is_ok());
        assert!(Loss::create(r#"{"eps": 0}"#, Device::CPU, 0).is_err());
        assert!(Loss::create(r#"{"epsilon": 1}"#, Device::CPU, 0).is_err());
    }
}
