//! Test fixture: a loss plugin whose `value_and_grad` panics.
//!
//! `create` works, so the host gets as far as calling the method; the SDK's guard must turn
//! the panic into a `PluginError { code: Panic }` whose message carries the payload
//! ("deliberate panic for the test"), and the host must report it instead of dying.

use likeness_sdk::{
    err, parse_config, DescriptorBuilder, Device, Inputs, LossOutput, LossPlugin, PluginDescriptor, PluginKind,
};

pub struct Panicking;

impl LossPlugin for Panicking {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new("testing-panicking", PluginKind::Loss, env!("CARGO_PKG_VERSION"))
            .summary("Test fixture: value_and_grad panics")
            .differentiable(true)
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        let v: likeness_sdk::serde_json::Value = parse_config("testing-panicking", config_json)?;
        match v.as_object() {
            Some(o) if o.is_empty() => Ok(Panicking),
            _ => Err(err::config("config of plugin `testing-panicking`: expected an empty object `{}`")),
        }
    }

    fn input_names(&self) -> Vec<String> {
        vec!["prediction".into(), "target".into()]
    }

    fn value_and_grad(&mut self, _inputs: Inputs<'_>, _want_grad: bool) -> likeness_sdk::Result<LossOutput> {
        panic!("deliberate panic for the test")
    }
}

likeness_sdk::export_loss_plugin!(Panicking);
