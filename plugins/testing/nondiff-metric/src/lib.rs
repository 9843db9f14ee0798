//! Test fixture `testing-nondiff-metric`: the colour-statistics embedding of
//! `testing-color-metric` (the same source file), but the descriptor says it is **not**
//! differentiable and `backward` is the SDK's default (`Unsupported`). The host may evaluate
//! with it and must refuse it as a training loss.

use likeness_sdk::{
    err, DataType, DescriptorBuilder, Device, DeviceType, ForwardMode, MetricOutput, MetricPlugin, PluginDescriptor,
    PluginKind, TensorView,
};

#[path = "../../color-metric/src/color.rs"]
pub mod color;

pub const ID: &str = "testing-nondiff-metric";

pub struct NondiffMetric;

impl MetricPlugin for NondiffMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("Test fixture: colour-statistics embedding, not differentiable")
            .differentiable(false)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        let v: likeness_sdk::serde_json::Value = likeness_sdk::parse_config(ID, config_json)?;
        match v.as_object() {
            Some(o) if o.is_empty() => Ok(NondiffMetric),
            _ => Err(err::config(format!("config of plugin `{ID}`: expected an empty object `{{}}`, got {v}"))),
        }
    }

    fn embed(&mut self, pixels: &TensorView, _mode: ForwardMode) -> likeness_sdk::Result<MetricOutput> {
        let (_, _, e) = color::embed_view(ID, pixels)?;
        Ok(color::outputs(&e))
    }
}

likeness_sdk::export_metric_plugin!(NondiffMetric);

#[cfg(test)]
mod tests {
    use super::*;
    use likeness_sdk::{CpuTensor, ErrorCode};

    #[test]
    fn embeds_but_has_no_backward() {
        use likeness_sdk::abi::MetricPluginModRef;
        use likeness_sdk::abi_stable::std_types::RStr;
        let m: MetricPluginModRef = likeness_sdk::plugin::metric_module::<NondiffMetric>();
        assert!(!m.descriptor()().capabilities.differentiable);
        let h = m.create()(RStr::from(""), Device::CPU, 0).unwrap();
        let mut data = vec![0.5f32; 2 * 3 * 4];
        data[12..].fill(0.0);
        let pixels = CpuTensor::new(vec![2, 3, 2, 2], data);
        let out = m.embed()(h, pixels.view(), ForwardMode::Train).unwrap();
        assert_eq!(CpuTensor::<u8>::from_managed(&out.valid, "v").unwrap().data, vec![1, 0]);
        let emb = CpuTensor::<f32>::from_managed(&out.embeddings, "e").unwrap();
        assert_eq!(emb.shape, vec![2, 6]);
        let g = CpuTensor::new(vec![2, 6], vec![0.1f32; 12]);
        assert_eq!(m.backward()(h, g.view()).unwrap_err().code, ErrorCode::Unsupported);
        m.destroy()(h);
    }
}
