//! Safe host-side wrappers around plugin instances: every call goes through the ABI, every
//! error comes back as an [`EngineError::Plugin`] naming the plugin.

use abi_stable::std_types::{RResult, RSlice, RStr};
use likeness_abi::{
    Device, ForwardMode, InstanceHandle, LossPluginModRef, ManagedTensor, MetricPluginModRef, ModelPluginModRef, NamedView,
    OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, StepReport, TensorView,
};
use likeness_abi::CpuTensor;

use super::loader::{LoadedLibrary, Root};
use crate::{EngineError, Result};

fn plugin_err(id: &str, e: PluginError) -> EngineError {
    EngineError::Plugin { plugin: id.to_string(), message: format!("{} [{:?}]", e.message, e.code) }
}

fn lift<T>(id: &str, r: RResult<T, PluginError>) -> Result<T> {
    r.into_result().map_err(|e| plugin_err(id, e))
}

fn named<'a>(inputs: &'a [(&'a str, TensorView)]) -> Vec<NamedView<'a>> {
    inputs.iter().map(|(n, v)| NamedView { name: RStr::from_str(n), view: *v }).collect()
}

fn wrong_kind(lib: &LoadedLibrary, wanted: &str) -> EngineError {
    EngineError::Plugin {
        plugin: lib.descriptor.id.to_string(),
        message: format!("is a {} plugin, not a {wanted} plugin", lib.header.kind.as_str()),
    }
}

/// Named owned outputs.
pub struct Outputs(pub Vec<(String, ManagedTensor)>);

impl Outputs {
    pub fn get(&self, name: &str) -> Option<&ManagedTensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Copies output `name` to a CPU f32 tensor; the error names the plugin and what exists.
    pub fn cpu(&self, plugin: &str, name: &str) -> Result<CpuTensor<f32>> {
        let t = self.get(name).ok_or_else(|| EngineError::Plugin {
            plugin: plugin.to_string(),
            message: format!(
                "returned no output `{name}` (it returned: {})",
                self.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })?;
        CpuTensor::from_managed(t, name).map_err(|e| plugin_err(plugin, e))
    }
}

/// What `Model::forward` returns.
pub struct ModelResult {
    pub outputs: Outputs,
    pub internal_loss: Option<f64>,
}

/// A model plugin instance.
pub struct Model {
    pub id: String,
    pub descriptor: PluginDescriptor,
    module: ModelPluginModRef,
    handle: InstanceHandle,
}

impl Model {
    pub(super) fn create(lib: &LoadedLibrary, config_json: &str, device: Device, seed: u64) -> Result<Model> {
        let Root::Model(module) = lib.root else { return Err(wrong_kind(lib, "model")) };
        let id = lib.descriptor.id.to_string();
        let handle = lift(&id, module.create()(RStr::from_str(config_json), device, seed))?;
        Ok(Model { id, descriptor: lib.descriptor.clone(), module, handle })
    }

    pub fn parameters(&self) -> Result<ParameterInfo> {
        lift(&self.id, self.module.parameters()(self.handle))
    }

    /// Inputs are borrowed for the call only.
    pub fn forward(&mut self, inputs: &[(&str, TensorView)], mode: ForwardMode) -> Result<ModelResult> {
        let views = named(inputs);
        let out = lift(&self.id, self.module.forward()(self.handle, RSlice::from_slice(&views), mode))?;
        Ok(ModelResult {
            outputs: Outputs(out.outputs.into_iter().map(|t| (t.name.into_string(), t.tensor)).collect()),
            internal_loss: out.internal_loss.into_option(),
        })
    }

    pub fn backward(&mut self, grads: &[(&str, TensorView)], internal_loss_weight: f64) -> Result<()> {
        let views = named(grads);
        lift(&self.id, self.module.backward()(self.handle, RSlice::from_slice(&views), internal_loss_weight))
    }

    pub fn optimizer_step(&mut self, step: OptimizerStep) -> Result<StepReport> {
        lift(&self.id, self.module.optimizer_step()(self.handle, step))
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        lift(&self.id, self.module.zero_grad()(self.handle))
    }

    pub fn save_state(&mut self, dir: &std::path::Path, with_optimizer: bool) -> Result<()> {
        let d = dir.to_string_lossy();
        lift(&self.id, self.module.save_state()(self.handle, RStr::from_str(&d), with_optimizer))
    }

    pub fn load_state(&mut self, dir: &std::path::Path) -> Result<()> {
        let d = dir.to_string_lossy();
        lift(&self.id, self.module.load_state()(self.handle, RStr::from_str(&d)))
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        self.module.destroy()(self.handle)
    }
}

/// What `Metric::embed` returns.
pub struct MetricResult {
    pub embeddings: ManagedTensor,
    pub valid: ManagedTensor,
}

/// An identity-metric plugin instance.
pub struct Metric {
    pub id: String,
    pub descriptor: PluginDescriptor,
    module: MetricPluginModRef,
    handle: InstanceHandle,
}

impl Metric {
    pub(super) fn create(lib: &LoadedLibrary, config_json: &str, device: Device, seed: u64) -> Result<Metric> {
        let Root::Metric(module) = lib.root else { return Err(wrong_kind(lib, "metric")) };
        let id = lib.descriptor.id.to_string();
        let handle = lift(&id, module.create()(RStr::from_str(config_json), device, seed))?;
        Ok(Metric { id, descriptor: lib.descriptor.clone(), module, handle })
    }

    pub fn embed(&mut self, pixels: TensorView, mode: ForwardMode) -> Result<MetricResult> {
        let e = lift(&self.id, self.module.embed()(self.handle, pixels, mode))?;
        Ok(MetricResult { embeddings: e.embeddings, valid: e.valid })
    }

    pub fn backward(&mut self, d_embeddings: TensorView) -> Result<ManagedTensor> {
        lift(&self.id, self.module.backward()(self.handle, d_embeddings))
    }
}

impl Drop for Metric {
    fn drop(&mut self) {
        self.module.destroy()(self.handle)
    }
}

/// What `Loss::value_and_grad` returns.
pub struct LossResult {
    pub value: f64,
    pub terms: Vec<(String, f64)>,
    pub grads: Outputs,
}

/// A loss plugin instance.
pub struct Loss {
    pub id: String,
    pub descriptor: PluginDescriptor,
    module: LossPluginModRef,
    handle: InstanceHandle,
}

impl Loss {
    pub(super) fn create(lib: &LoadedLibrary, config_json: &str, device: Device, seed: u64) -> Result<Loss> {
        let Root::Loss(module) = lib.root else { return Err(wrong_kind(lib, "loss")) };
        let id = lib.descriptor.id.to_string();
        let handle = lift(&id, module.create()(RStr::from_str(config_json), device, seed))?;
        Ok(Loss { id, descriptor: lib.descriptor.clone(), module, handle })
    }

    pub fn input_names(&self) -> Vec<String> {
        self.module.input_names()(self.handle).into_iter().map(|s| s.into_string()).collect()
    }

    pub fn value_and_grad(&mut self, inputs: &[(&str, TensorView)], want_grad: bool) -> Result<LossResult> {
        let views = named(inputs);
        let out = lift(&self.id, self.module.value_and_grad()(self.handle, RSlice::from_slice(&views), want_grad))?;
        if !out.value.is_finite() {
            return Err(EngineError::Plugin { plugin: self.id.clone(), message: format!("returned a non-finite loss ({})", out.value) });
        }
        Ok(LossResult {
            value: out.value,
            terms: out.terms.into_iter().map(|t| (t.name.into_string(), t.value)).collect(),
            grads: Outputs(out.grads.into_iter().map(|t| (t.name.into_string(), t.tensor)).collect()),
        })
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        self.module.destroy()(self.handle)
    }
}
