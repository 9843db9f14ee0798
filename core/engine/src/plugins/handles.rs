//! Safe host-side wrappers around plugin instances: every call goes through the ABI, every
//! error comes back as an [`EngineError::Plugin`] naming the plugin.

use abi_stable::std_types::{RResult, RSlice, RStr};
use likeness_abi::CpuTensor;
use likeness_abi::{
    AbiVersion, Device, ForwardMode, GroupHyper, InstanceHandle, LossPluginModRef, ManagedTensor, MetricInterface,
    MetricPluginModRef, ModelInterface, ModelPluginModRef, NamedTexts, NamedView, OptimizerStep, ParameterInfo,
    PluginDescriptor, PluginError, SampleRequest, ScaledView, StepContext, StepReport, TensorView,
};

use super::loader::{LoadedLibrary, Root};
use crate::{EngineError, Result};

fn plugin_err(id: &str, e: PluginError) -> EngineError {
    EngineError::PluginCall { plugin: id.to_string(), code: e.code, message: e.message.into_string() }
}

/// The error for a 1.1 method that a plugin built for an older ABI does not have.
fn missing_method(id: &str, abi: AbiVersion, method: &str) -> EngineError {
    EngineError::Unsupported {
        plugin: id.to_string(),
        message: format!(
            "plugin {id} was built for ABI {abi}, which has no `{method}`; rebuild it against likeness-sdk {}",
            AbiVersion::CURRENT
        ),
    }
}

/// Host-side named texts: one batch of strings per name.
pub type TextBatch<'a> = (&'a str, &'a [String]);

/// Borrowed ABI views of `texts`; the `RStr`s point into the caller's strings.
struct TextViews<'a> {
    strs: Vec<Vec<RStr<'a>>>,
    names: Vec<&'a str>,
}

impl<'a> TextViews<'a> {
    fn new(texts: &[TextBatch<'a>]) -> Self {
        TextViews {
            strs: texts.iter().map(|(_, t)| t.iter().map(|s| RStr::from_str(s)).collect()).collect(),
            names: texts.iter().map(|(n, _)| *n).collect(),
        }
    }

    fn named(&self) -> Vec<NamedTexts<'_>> {
        self.names
            .iter()
            .zip(&self.strs)
            .map(|(n, s)| NamedTexts { name: RStr::from_str(n), texts: RSlice::from_slice(s) })
            .collect()
    }
}

fn outputs(v: abi_stable::std_types::RVec<likeness_abi::NamedTensor>) -> Outputs {
    Outputs(v.into_iter().map(|t| (t.name.into_string(), t.tensor)).collect())
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

    /// Output `name`, or an error naming the plugin and what it returned.
    pub fn require(&self, plugin: &str, name: &str) -> Result<&ManagedTensor> {
        self.get(name).ok_or_else(|| EngineError::Plugin {
            plugin: plugin.to_string(),
            message: format!(
                "returned no output `{name}` (it returned: {})",
                self.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Removes and returns output `name`.
    pub fn take(&mut self, name: &str) -> Option<ManagedTensor> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(i).1)
    }
}

/// An opened model library, before any instance exists: the host asks it what the model
/// reads and produces (no weights loaded), then creates the instance.
pub struct ModelLibrary {
    pub id: String,
    pub descriptor: PluginDescriptor,
    pub abi: AbiVersion,
    module: ModelPluginModRef,
}

impl ModelLibrary {
    pub(super) fn new(lib: &LoadedLibrary) -> Result<ModelLibrary> {
        let Root::Model(module) = lib.root else { return Err(wrong_kind(lib, "model")) };
        Ok(ModelLibrary {
            id: lib.descriptor.id.to_string(),
            descriptor: lib.descriptor.clone(),
            abi: lib.header.abi,
            module,
        })
    }

    /// What the model reads and produces with `config_json`. A 1.0 plugin has the 1.0
    /// contract: images `reference` and `target` in, `pixels` out.
    pub fn interface(&self, config_json: &str) -> Result<ModelInterface> {
        match self.module.interface() {
            Some(f) => lift(&self.id, f(RStr::from_str(config_json))),
            None => Ok(legacy_interface()),
        }
    }

    pub fn create(&self, config_json: &str, device: Device, seed: u64) -> Result<Model> {
        let handle = lift(&self.id, self.module.create()(RStr::from_str(config_json), device, seed))?;
        Ok(Model {
            id: self.id.clone(),
            descriptor: self.descriptor.clone(),
            abi: self.abi,
            module: self.module,
            handle,
        })
    }
}

/// The ABI 1.0 model contract.
pub fn legacy_interface() -> ModelInterface {
    use likeness_abi::IoDecl;
    let decl = |name: &str, required: bool, doc: &str| IoDecl { name: name.into(), required, doc: doc.into() };
    ModelInterface {
        images: vec![
            decl("reference", true, "identity reference image"),
            decl("target", false, "the image to produce"),
        ]
        .into(),
        texts: Default::default(),
        outputs: vec![decl("pixels", true, "generated image")].into(),
        internal_loss: false,
        encodings: Default::default(),
        param_groups: Default::default(),
        adapter_formats: Default::default(),
        can_sample: false,
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
    /// The ABI generation the plugin was built for (1.1 methods are absent on 1.0).
    pub abi: AbiVersion,
    module: ModelPluginModRef,
    handle: InstanceHandle,
}

impl Model {
    pub(super) fn create(lib: &LoadedLibrary, config_json: &str, device: Device, seed: u64) -> Result<Model> {
        ModelLibrary::new(lib)?.create(config_json, device, seed)
    }

    /// Forward with named images and texts and the step context. On a 1.0 plugin the texts
    /// and the context are not passed (its interface declares none).
    pub fn forward_batch(
        &mut self,
        images: &[(&str, TensorView)],
        texts: &[TextBatch<'_>],
        ctx: StepContext<'_>,
        mode: ForwardMode,
    ) -> Result<ModelResult> {
        let Some(f) = self.module.forward_batch() else { return self.forward(images, mode) };
        let views = named(images);
        let tv = TextViews::new(texts);
        let t = tv.named();
        let out = lift(&self.id, f(self.handle, RSlice::from_slice(&views), RSlice::from_slice(&t), ctx, mode))?;
        Ok(ModelResult { outputs: outputs(out.outputs), internal_loss: out.internal_loss.into_option() })
    }

    /// Backward with one scale per gradient, applied by the plugin where the gradients live.
    /// On a 1.0 plugin (CPU only) the host sums the scaled gradients itself.
    pub fn backward_scaled(&mut self, grads: &[(&str, TensorView, f64)], internal_loss_weight: f64) -> Result<()> {
        let views: Vec<ScaledView<'_>> =
            grads.iter().map(|(n, v, s)| ScaledView { name: RStr::from_str(n), view: *v, scale: *s }).collect();
        match self.module.backward_scaled() {
            Some(f) => lift(&self.id, f(self.handle, RSlice::from_slice(&views), internal_loss_weight)),
            None => {
                let summed = likeness_abi::cpu::sum_scaled(&views).map_err(|e| plugin_err(&self.id, e))?;
                let named: Vec<(&str, TensorView)> = summed.iter().map(|(n, t)| (n.as_str(), t.view())).collect();
                self.backward(&named, internal_loss_weight)
            }
        }
    }

    /// An optimizer step with per-group hyper-parameters (`groups` empty = one group).
    pub fn optimizer_step_groups(&mut self, step: OptimizerStep, groups: &[(String, f64, f64)]) -> Result<StepReport> {
        if groups.is_empty() {
            return self.optimizer_step(step);
        }
        let f = self
            .module
            .optimizer_step_groups()
            .ok_or_else(|| missing_method(&self.id, self.abi, "optimizer_step_groups"))?;
        let g: Vec<GroupHyper<'_>> = groups
            .iter()
            .map(|(n, lr, wd)| GroupHyper { name: RStr::from_str(n), lr: *lr, weight_decay: *wd })
            .collect();
        lift(&self.id, f(self.handle, step, RSlice::from_slice(&g)))
    }

    pub fn sample(&mut self, request: SampleRequest<'_>) -> Result<ManagedTensor> {
        let f = self.module.sample().ok_or_else(|| missing_method(&self.id, self.abi, "sample"))?;
        lift(&self.id, f(self.handle, request))
    }

    /// Writes the adapter into `dir` (which must exist); returns the files written.
    pub fn export_adapter(
        &mut self,
        dir: &std::path::Path,
        format: &str,
        metadata: &serde_json::Value,
    ) -> Result<Vec<std::path::PathBuf>> {
        let f = self.module.export_adapter().ok_or_else(|| missing_method(&self.id, self.abi, "export_adapter"))?;
        let d = dir.to_string_lossy();
        let meta = metadata.to_string();
        let files = lift(&self.id, f(self.handle, RStr::from_str(&d), RStr::from_str(format), RStr::from_str(&meta)))?;
        Ok(files.into_iter().map(|s| std::path::PathBuf::from(s.into_string())).collect())
    }

    pub fn encode(&mut self, name: &str, images: &[(&str, TensorView)], texts: &[TextBatch<'_>]) -> Result<Outputs> {
        let f = self.module.encode().ok_or_else(|| missing_method(&self.id, self.abi, "encode"))?;
        let views = named(images);
        let tv = TextViews::new(texts);
        let t = tv.named();
        Ok(outputs(lift(
            &self.id,
            f(self.handle, RStr::from_str(name), RSlice::from_slice(&views), RSlice::from_slice(&t)),
        )?))
    }

    pub fn parameters(&self) -> Result<ParameterInfo> {
        lift(&self.id, self.module.parameters()(self.handle))
    }

    /// Inputs are borrowed for the call only.
    pub fn forward(&mut self, inputs: &[(&str, TensorView)], mode: ForwardMode) -> Result<ModelResult> {
        let views = named(inputs);
        let out = lift(&self.id, self.module.forward()(self.handle, RSlice::from_slice(&views), mode))?;
        Ok(ModelResult { outputs: outputs(out.outputs), internal_loss: out.internal_loss.into_option() })
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

/// What a metric library declares for `config_json`, asked without creating an instance (no
/// weights load); a 1.0 metric declares no threshold and embeds no texts.
pub(super) fn metric_interface(lib: &LoadedLibrary, config_json: &str) -> Result<MetricInterface> {
    let Root::Metric(module) = lib.root else { return Err(wrong_kind(lib, "metric")) };
    let id = lib.descriptor.id.to_string();
    Ok(match module.interface() {
        Some(f) => lift(&id, f(RStr::from_str(config_json)))?,
        None => MetricInterface { same_person_threshold: -2.0, embeds_texts: false, subject: "face".into() },
    })
}

/// An identity-metric plugin instance.
pub struct Metric {
    pub id: String,
    pub descriptor: PluginDescriptor,
    pub abi: AbiVersion,
    /// How the metric's scores read (a 1.0 metric declares no threshold).
    pub interface: MetricInterface,
    module: MetricPluginModRef,
    handle: InstanceHandle,
}

impl Metric {
    pub(super) fn create(lib: &LoadedLibrary, config_json: &str, device: Device, seed: u64) -> Result<Metric> {
        let Root::Metric(module) = lib.root else { return Err(wrong_kind(lib, "metric")) };
        let id = lib.descriptor.id.to_string();
        let interface = metric_interface(lib, config_json)?;
        let handle = lift(&id, module.create()(RStr::from_str(config_json), device, seed))?;
        Ok(Metric { id, descriptor: lib.descriptor.clone(), abi: lib.header.abi, interface, module, handle })
    }

    /// The same-person threshold the metric declares, if any.
    pub fn same_person_threshold(&self) -> Option<f64> {
        (self.interface.same_person_threshold >= -1.0).then_some(self.interface.same_person_threshold)
    }

    pub fn embed_texts(&mut self, texts: &[String]) -> Result<ManagedTensor> {
        let f = self.module.embed_texts().ok_or_else(|| missing_method(&self.id, self.abi, "embed_texts"))?;
        let t: Vec<RStr<'_>> = texts.iter().map(|s| RStr::from_str(s)).collect();
        lift(&self.id, f(self.handle, RSlice::from_slice(&t)))
    }

    /// `backward(scale · d_embeddings)`, scaled by the plugin on its device (by the host for a
    /// 1.0 plugin, which is CPU only).
    pub fn backward_scaled(&mut self, d_embeddings: TensorView, scale: f64) -> Result<ManagedTensor> {
        match self.module.backward_scaled() {
            Some(f) => lift(&self.id, f(self.handle, d_embeddings, scale)),
            None => {
                let d = likeness_abi::cpu::scaled_copy(&d_embeddings, scale, "d_embeddings")
                    .map_err(|e| plugin_err(&self.id, e))?;
                self.backward(d.view())
            }
        }
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
        self.value_and_scaled_grad(inputs, want_grad, 1.0)
    }

    /// The loss and its gradients × `grad_scale` (scaled by the plugin where they live; by the
    /// host for a 1.0 plugin, which is CPU only).
    pub fn value_and_scaled_grad(
        &mut self,
        inputs: &[(&str, TensorView)],
        want_grad: bool,
        grad_scale: f64,
    ) -> Result<LossResult> {
        let views = named(inputs);
        let out = match self.module.value_and_scaled_grad() {
            Some(f) => lift(&self.id, f(self.handle, RSlice::from_slice(&views), want_grad, grad_scale))?,
            None => {
                let mut out =
                    lift(&self.id, self.module.value_and_grad()(self.handle, RSlice::from_slice(&views), want_grad))?;
                for g in out.grads.iter_mut() {
                    let t = std::mem::replace(&mut g.tensor, CpuTensor::<f32>::zeros(vec![0]).into_managed());
                    g.tensor = likeness_abi::cpu::scale_managed(t, grad_scale, g.name.as_str())
                        .map_err(|e| plugin_err(&self.id, e))?;
                }
                out
            }
        };
        if !out.value.is_finite() {
            return Err(EngineError::Plugin {
                plugin: self.id.clone(),
                message: format!("returned a non-finite loss ({})", out.value),
            });
        }
        Ok(LossResult {
            value: out.value,
            terms: out.terms.into_iter().map(|t| (t.name.into_string(), t.value)).collect(),
            grads: outputs(out.grads),
        })
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        self.module.destroy()(self.handle)
    }
}
