//! Building a [`PluginDescriptor`] with honest build stamps.

use abi_stable::std_types::{ROption, RString, RVec};
use likeness_abi::{AbiVersion, BuildStamps, Capabilities, DataType, DeviceType, PluginDescriptor, PluginKind};

pub struct DescriptorBuilder {
    d: PluginDescriptor,
}

impl DescriptorBuilder {
    /// `version` is the plugin's own version; pass `env!("CARGO_PKG_VERSION")`.
    pub fn new(id: &str, kind: PluginKind, version: &str) -> Self {
        DescriptorBuilder {
            d: PluginDescriptor {
                id: id.into(),
                kind,
                version: version.into(),
                abi: AbiVersion::CURRENT,
                summary: RString::new(),
                capabilities: Capabilities {
                    differentiable: false,
                    devices: RVec::from(vec![DeviceType::Cpu]),
                    dtypes: RVec::from(vec![DataType::F32]),
                },
                config_schema: r#"{"type":"object","additionalProperties":false}"#.into(),
                build: BuildStamps {
                    rustc: env!("LIKENESS_RUSTC_VERSION").into(),
                    libtorch: ROption::RNone,
                    onnxruntime: ROption::RNone,
                    cuda: ROption::RNone,
                },
            },
        }
    }

    pub fn summary(mut self, s: &str) -> Self {
        self.d.summary = s.into();
        self
    }

    pub fn differentiable(mut self, yes: bool) -> Self {
        self.d.capabilities.differentiable = yes;
        self
    }

    pub fn devices(mut self, devices: &[DeviceType]) -> Self {
        self.d.capabilities.devices = devices.to_vec().into();
        self
    }

    pub fn dtypes(mut self, dtypes: &[DataType]) -> Self {
        self.d.capabilities.dtypes = dtypes.to_vec().into();
        self
    }

    /// JSON Schema of the config object.
    pub fn config_schema(mut self, schema: serde_json::Value) -> Self {
        self.d.config_schema = schema.to_string().into();
        self
    }

    /// Stamp the libtorch the plugin was built against (`likeness_sdk_torch::LIBTORCH_VERSION`).
    pub fn libtorch(mut self, version: &str) -> Self {
        self.d.build.libtorch = ROption::RSome(version.into());
        self
    }

    pub fn onnxruntime(mut self, version: &str) -> Self {
        self.d.build.onnxruntime = ROption::RSome(version.into());
        self
    }

    pub fn cuda(mut self, version: &str) -> Self {
        self.d.build.cuda = ROption::RSome(version.into());
        self
    }

    pub fn build(self) -> PluginDescriptor {
        self.d
    }
}
