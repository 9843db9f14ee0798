//! Test fixture: a loss plugin built "for the next ABI generation".
//!
//! Its root module is a perfectly normal SDK loss module, but its plain-C header
//! (`likeness_plugin_header`) reports ABI major `ABI_MAJOR + 1`. The host reads the header
//! before abi_stable's layout check and must refuse the library with a readable message
//! ("built for ABI 2.0, this host speaks 1.0" or similar), never reaching the root module.
//! The manifest says `abi = "2.0"` too.

use likeness_sdk::abi::{AbiVersion, PluginHeader, ABI_MAJOR};
use likeness_sdk::{DescriptorBuilder, Device, Inputs, LossOutput, LossPlugin, PluginDescriptor, PluginKind};

/// The ABI this fixture pretends to be built for.
pub const FUTURE_ABI: AbiVersion = AbiVersion { major: ABI_MAJOR + 1, minor: 0 };

pub struct FromTheFuture;

impl LossPlugin for FromTheFuture {
    fn descriptor() -> PluginDescriptor {
        let mut d = DescriptorBuilder::new("testing-abi-mismatch", PluginKind::Loss, env!("CARGO_PKG_VERSION"))
            .summary("Test fixture: built for ABI 2.0")
            .differentiable(true)
            .build();
        d.abi = FUTURE_ABI;
        d
    }

    fn create(_config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        Ok(FromTheFuture)
    }

    fn input_names(&self) -> Vec<String> {
        vec!["prediction".into(), "target".into()]
    }

    fn value_and_grad(&mut self, _inputs: Inputs<'_>, _want_grad: bool) -> likeness_sdk::Result<LossOutput> {
        Ok(LossOutput { value: 0.0, terms: Vec::new(), grads: Vec::new() })
    }
}

likeness_sdk::__export_root_module!(
    likeness_sdk::abi::LossPluginModRef,
    likeness_sdk::plugin::loss_module::<FromTheFuture>
);

/// The header the host reads first: ABI major + 1, kind Loss.
#[no_mangle]
pub extern "C" fn likeness_plugin_header() -> PluginHeader {
    PluginHeader { abi: FUTURE_ABI, kind: PluginKind::Loss }
}
