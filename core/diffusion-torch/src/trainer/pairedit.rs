//! PairEdit's objective (seed 003; xudonmao/PairEdit `train_image.py`): a *content* LoRA
//! ([`Net::Content`]) and a *semantic* LoRA ([`Net::Main`]) on the same layers, trained from
//! source/target pairs with no caption (the prompt is PairEdit's empty string).
//!
//! Per sample, from its seed only ([`crate::rng`]): a t index uniform in `start_step..=end_step`
//! of the `num_inference_steps` FluxPipeline schedule (sigmas `linspace(1, 1/N, N)` shifted by μ
//! at the image's token count), one noise ε shared by source and target, and the VAE posterior
//! samples of both images (PairEdit samples the posterior, it does not take the mean). Then
//! (A = source, B = target, σ the drawn sigma, ns = `noise_scale`, η = `cfg_eta`):
//!
//! - `full` (PairEdit, `add_noise_scale`): x_t = z_A + σ·ns·ε;
//!   loss1 = ‖v(x_t; content) − ns·ε‖², loss2 = ‖v(x_t; content frozen + semantic) − (η·(z_A − z_B) + ns·ε)‖².
//!   The content weights are frozen for loss2 the way PairEdit freezes them (`requires_grad =
//!   False` while its graph is built), so one backward of loss1 + loss2 gives content ∇loss1 and
//!   semantic ∇loss2, PairEdit's two backward passes before one AdamW step.
//!
//! The four ablations' scripts are not public (notes: only their configs are); these are our
//! definitions, each the smallest change its seed line names:
//! - `wocontent` ("without content"): no content LoRA; loss2 alone with the base model in its place.
//! - `wocfg` ("without cfg"): η = 1 — the semantic LoRA regresses the target's own velocity
//!   (z_A − z_B + ns·ε) instead of the η-amplified difference; `cfg_eta` is not read.
//! - `fm` ("no noise schedule, flow-matching noising"): x_t = (1 − σ)·z_A + σ·ns·ε and the
//!   rectified-flow targets ns·ε − z_A (loss1) and ns·ε − z_A + η·(z_A − z_B) (loss2), as
//!   PairEdit's `add_noise_rect` / `train_image_real.py` do.
//! - `sliders` (Concept Sliders, image version): no content LoRA; the semantic LoRA at +1 on the
//!   noised target and at −1 on the noised source (same ε, same σ, PairEdit's noising), each
//!   regressing ns·ε.
//!
//! Files: the `pairedit` export writes PairEdit's key layout (`lora_unet_<path with _>.
//! lora_down.weight` / `.lora_up.weight` / `.alpha`, bf16 as PairEdit's `save_weights`), and
//! [`read_layout`] reads it back from safetensors or from PairEdit's own `torch.save` `.pt`
//! (through the SDK's weights-only pickle reader).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use likeness_sdk::{ForwardMode, Inputs, ModelOutput, StepContext};
use likeness_sdk_torch::{save_tensors, tensor_to_managed};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Kind, Tensor};

use super::error::{config as bad, file, input, Result};
use super::inputs::{owned, shape_of};
use super::LoraModel;
use crate::backbone::{Backbone, Replay, SampleScheduler};
use crate::nn::{LoraWeights, Net};
use crate::sampling::FlowSchedule;
use crate::store::Store;
use crate::{lora, rng};

/// `python_name`'s training variants (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Full,
    Wocontent,
    Wocfg,
    Fm,
    Sliders,
    /// `train_image_real.py`: one content LoRA on one real image (PairEdit's "inversion LoRA"),
    /// plain rectified flow — x_t = (1 − σ)·z + σ·ε, target ε − z; `target` only, no semantic LoRA.
    Real,
}

impl Variant {
    /// Whether the variant trains a content LoRA (and writes the `_0` file).
    pub fn has_content(self) -> bool {
        matches!(self, Variant::Full | Variant::Wocfg | Variant::Fm | Variant::Real)
    }

    /// Whether the variant trains the semantic LoRA (the main slot).
    pub fn has_semantic(self) -> bool {
        self != Variant::Real
    }

    /// Whether the variant reads a source image (`control`).
    pub fn reads_source(self) -> bool {
        self != Variant::Real
    }
}

fn d_variant() -> Variant {
    Variant::Full
}
fn d_eta() -> f64 {
    4.0
}
fn d_one() -> f64 {
    1.0
}
fn d_end() -> usize {
    27
}
fn d_steps() -> usize {
    28
}

/// The `pairedit` config object (PairEdit's `train_image.py` flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairEditConfig {
    #[serde(default = "d_variant")]
    pub variant: Variant,
    #[serde(default = "d_eta")]
    pub cfg_eta: f64,
    #[serde(default = "d_one")]
    pub noise_scale: f64,
    #[serde(default)]
    pub start_step: usize,
    #[serde(default = "d_end")]
    pub end_step: usize,
    #[serde(default = "d_steps")]
    pub num_inference_steps: usize,
    /// The embedded guidance of both forwards (PairEdit: `guidance_scale`, 3.5); default: the
    /// backbone's training guidance (flux-lora's `guidance_scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// The prompt of every forward (PairEdit: the empty string).
    #[serde(default)]
    pub prompt: String,
}

impl PairEditConfig {
    pub fn validate(&self) -> Result<()> {
        let n = self.num_inference_steps;
        if n == 0 {
            return Err(bad("pairedit.num_inference_steps", "must be ≥ 1 (PairEdit: 28)"));
        }
        if self.start_step > self.end_step || self.end_step >= n {
            return Err(bad(
                "pairedit.start_step/end_step",
                format!(
                    "need 0 ≤ start_step ≤ end_step < num_inference_steps = {n} (inclusive indices into the schedule, 0 = σ 1), got {} / {}",
                    self.start_step, self.end_step
                ),
            ));
        }
        if !(self.noise_scale.is_finite() && self.noise_scale > 0.0) {
            return Err(bad("pairedit.noise_scale", format!("must be > 0 (PairEdit: 1), got {}", self.noise_scale)));
        }
        if !self.cfg_eta.is_finite() {
            return Err(bad(
                "pairedit.cfg_eta",
                format!("must be a finite number (PairEdit: 4), got {}", self.cfg_eta),
            ));
        }
        if let Some(g) = self.guidance_scale {
            if !(g.is_finite() && g >= 0.0) {
                return Err(bad("pairedit.guidance_scale", format!("must be ≥ 0 (PairEdit: 3.5), got {g}")));
            }
        }
        Ok(())
    }
}

/// The schema of the `pairedit` object.
pub fn property() -> Value {
    serde_json::json!({"type": "object", "additionalProperties": false,
    "description": "train PairEdit's content + semantic LoRA pair from `target` and `control` (= source) images instead of the plain diffusion objective (seed 003); docs/pairedit.md",
    "properties": {
        "variant": {"enum": ["full", "wocontent", "wocfg", "fm", "sliders", "real"], "default": "full",
            "description": "PairEdit's train_image (full), an ablation (python_name train_image_<variant>), or `real`: train_image_real's content LoRA on one real image (`target` only)"},
        "cfg_eta": {"type": "number", "default": 4.0, "description": "η of the semantic loss's target η·(z_source − z_target) + ns·ε"},
        "noise_scale": {"type": "number", "exclusiveMinimum": 0, "default": 1.0, "description": "ns: the noise is ns·ε"},
        "start_step": {"type": "integer", "minimum": 0, "default": 0, "description": "first schedule index t is drawn from (0 = σ 1)"},
        "end_step": {"type": "integer", "minimum": 0, "default": 27, "description": "last schedule index t is drawn from (inclusive)"},
        "num_inference_steps": {"type": "integer", "minimum": 1, "default": 28, "description": "length of the schedule t is drawn from"},
        "guidance_scale": {"type": "number", "minimum": 0, "description": "embedded guidance of the training forwards (default: the backbone's guidance_scale)"},
        "prompt": {"type": "string", "default": "", "description": "the prompt of every training forward (PairEdit: empty)"}
    }})
}

/// One denoiser forward of a PairEdit step: its input, the two adapters' multipliers, whether
/// the content weights are frozen for it, and its regression target.
struct Pass {
    x_t: Tensor,
    content: f64,
    semantic: f64,
    freeze_content: bool,
    target: Tensor,
}

/// The passes of `variant` for latents `[B, C, h, w]` and per-sample σ `[B, 1, 1, 1]`.
fn passes(c: &PairEditConfig, z_a: &Tensor, z_b: &Tensor, eps: &Tensor, sigma: &Tensor) -> Vec<Pass> {
    let noise = eps * c.noise_scale;
    let ve = || z_a + sigma * &noise;
    let pass = |x_t: Tensor, content, semantic, freeze_content, target: Tensor| Pass {
        x_t,
        content,
        semantic,
        freeze_content,
        target,
    };
    match c.variant {
        Variant::Full => vec![
            pass(ve(), 1.0, 0.0, false, noise.shallow_clone()),
            pass(ve(), 1.0, 1.0, true, (z_a - z_b) * c.cfg_eta + &noise),
        ],
        Variant::Wocfg => {
            vec![pass(ve(), 1.0, 0.0, false, noise.shallow_clone()), pass(ve(), 1.0, 1.0, true, z_a - z_b + &noise)]
        }
        Variant::Wocontent => vec![pass(ve(), 0.0, 1.0, false, (z_a - z_b) * c.cfg_eta + &noise)],
        Variant::Fm => {
            let x_t = || z_a * (1.0 - sigma) + sigma * &noise;
            let v = &noise - z_a;
            vec![
                pass(x_t(), 1.0, 0.0, false, v.shallow_clone()),
                pass(x_t(), 1.0, 1.0, true, v + (z_a - z_b) * c.cfg_eta),
            ]
        }
        Variant::Real => {
            // `train_image_real.py`'s `add_noise_rect`: ns is not applied (it passes none).
            vec![pass(z_b * (1.0 - sigma) + sigma * eps, 1.0, 0.0, false, eps - z_b)]
        }
        Variant::Sliders => vec![
            pass(z_b + sigma * &noise, 0.0, 1.0, false, noise.shallow_clone()),
            pass(ve(), 0.0, -1.0, false, noise.shallow_clone()),
        ],
    }
}

/// What one PairEdit forward computed: the summed loss (with its graph) and each pass's loss;
/// with checkpointing, each pass's replay and whether it froze the content LoRA.
pub struct PairEditLosses<B> {
    pub total: Tensor,
    pub per_pass: Vec<f64>,
    pub replays: Vec<(Replay<B>, bool)>,
}

impl<B: Backbone> LoraModel<B> {
    pub(super) fn pairedit(&self) -> Option<&PairEditConfig> {
        self.config.train.pairedit.as_ref()
    }

    /// The shifted σ of schedule index `idx` for latents `h`×`w` (FluxPipeline's schedule, as
    /// PairEdit's `retrieve_timesteps(sigmas=linspace(1, 1/N, N), mu)`).
    pub fn pairedit_sigma(&self, idx: usize, h: i64, w: i64) -> Result<f64> {
        let c = self.pairedit().ok_or_else(|| input("pairedit_sigma: this config has no `pairedit` object"))?;
        let SampleScheduler::FlowMatch(fc) = self.backbone.sampling().scheduler else {
            return Err(bad("pairedit", "PairEdit needs a flow-matching backbone (Flux); this one samples with DDPM"));
        };
        let s = FlowSchedule::new(fc, c.num_inference_steps, self.backbone.image_seq_len(h, w))?;
        Ok(s.sigmas[idx])
    }

    /// The conditioning of PairEdit's prompt, `n` times (encoded once per model: the text
    /// encoders are frozen and the prompt fixed).
    fn pairedit_context(&self, n: i64) -> Result<Vec<Tensor>> {
        let enc = match self.pairedit_prompt.get() {
            Some(e) => e,
            None => {
                let prompt = self.pairedit().map(|c| c.prompt.as_str()).unwrap_or("");
                let e = self.backbone.encode_texts(&[prompt], false)?;
                self.pairedit_prompt.get_or_init(|| e)
            }
        };
        Ok(enc.iter().map(|t| t.expand([[n].as_slice(), &t.size()[1..]].concat(), false).contiguous()).collect())
    }

    /// The losses of one PairEdit step on source latents `z_a`, target latents `z_b`, noise `eps`
    /// (all `[B, C, h, w]`, scaled latents) at schedule indices `idx` (one per sample), with the
    /// graph into the LoRA weights. Public for the oracle test against PairEdit's own code path.
    pub fn pairedit_losses(
        &self,
        z_a: &Tensor,
        z_b: &Tensor,
        eps: &Tensor,
        idx: &[usize],
        reseed: Option<i64>,
    ) -> Result<PairEditLosses<B>> {
        self.pairedit_passes(z_a, z_b, eps, idx, reseed, false)
    }

    /// [`Self::pairedit_losses`], with gradient checkpointing when `checkpoint`.
    fn pairedit_passes(
        &self,
        z_a: &Tensor,
        z_b: &Tensor,
        eps: &Tensor,
        idx: &[usize],
        reseed: Option<i64>,
        checkpoint: bool,
    ) -> Result<PairEditLosses<B>> {
        let c = self.pairedit().ok_or_else(|| input("pairedit_losses: this config has no `pairedit` object"))?.clone();
        let [n, _, h, w]: [i64; 4] = z_a.size().try_into().map_err(|_| input("latents must be 4-d"))?;
        if idx.len() != n as usize {
            return Err(input(format!("{} schedule indices for a batch of {n}", idx.len())));
        }
        let sig: Vec<f64> = idx.iter().map(|&i| self.pairedit_sigma(i, h, w)).collect::<Result<_>>()?;
        let sigma = Tensor::from_slice(&sig).to_kind(self.compute).to_device(self.device).view([n, 1, 1, 1]);
        let nt = self.backbone.objective().num_train_timesteps() as f64;
        let t_model =
            Tensor::from_slice(&sig.iter().map(|s| (s * nt) as f32).collect::<Vec<_>>()).to_device(self.device);
        let guidance = c.guidance_scale.map(|g| Tensor::full([n], g, (Kind::Float, self.device)));
        let cond = self.pairedit_context(n)?;
        let store = self.backbone.store(B::COMPONENTS[0], false)?.ok_or_else(|| input("the denoiser is not loaded"))?;
        let content = lora::parameters_at(store, Net::Content);
        let mut total: Option<Tensor> = None;
        let mut per_pass = Vec::new();
        let mut replays = Vec::new();
        let result = (|| -> Result<()> {
            for p in passes(&c, z_a, z_b, eps, &sigma) {
                lora::set_adapter_scale_at(store, p.content, Net::Content);
                lora::set_adapter_scale_at(store, p.semantic, Net::Main);
                // PairEdit's freeze: the content weights are constants of this pass's graph.
                for (_, t) in &content {
                    let _ = t.set_requires_grad(!p.freeze_content);
                }
                let out = if checkpoint {
                    let (out, replay) = self.backbone.denoise_checkpointed_guided(
                        &p.x_t,
                        &t_model,
                        guidance.as_ref(),
                        &cond,
                        reseed,
                    )?;
                    replays.push((replay, p.freeze_content));
                    out
                } else {
                    match &guidance {
                        Some(g) => self.backbone.denoise_guided(&p.x_t, &t_model, Some(g), &cond, reseed)?,
                        None => self.backbone.denoise(&p.x_t, &t_model, &cond, reseed)?,
                    }
                };
                let mse = (out.to_kind(self.compute) - &p.target).square().mean(self.compute);
                per_pass.push(mse.to_kind(Kind::Double).double_value(&[]));
                total = Some(match total.take() {
                    Some(t) => t + mse,
                    None => mse,
                });
            }
            Ok(())
        })();
        for (_, t) in &content {
            let _ = t.set_requires_grad(true);
        }
        lora::set_adapter_scale_at(store, 1.0, Net::Content);
        lora::set_adapter_scale_at(store, 1.0, Net::Main);
        result?;
        Ok(PairEditLosses { total: total.expect("every variant has a pass"), per_pass, replays })
    }

    /// After the backward into the passes' outputs: each pass's replay, the content LoRA frozen
    /// for it as it was in the forward (and the adapters' multipliers as they were).
    pub(super) fn replay_passes(&self, replays: Vec<(Replay<B>, bool)>) {
        let Some(c) = self.pairedit().cloned() else { return };
        let Ok(Some(store)) = self.backbone.store(B::COMPONENTS[0], false) else { return };
        let content = lora::parameters_at(store, Net::Content);
        // The passes' multipliers, in the order they ran (the replays run in any order: each
        // recomputes its own pass).
        let dummy = Tensor::zeros([1], (self.compute, self.device));
        let shapes = passes(&c, &dummy, &dummy, &dummy, &dummy);
        for ((replay, freeze), p) in replays.into_iter().zip(shapes) {
            lora::set_adapter_scale_at(store, p.content, Net::Content);
            lora::set_adapter_scale_at(store, p.semantic, Net::Main);
            for (_, t) in &content {
                let _ = t.set_requires_grad(!freeze);
            }
            replay(&self.backbone);
        }
        for (_, t) in &content {
            let _ = t.set_requires_grad(true);
        }
        lora::set_adapter_scale_at(store, 1.0, Net::Content);
        lora::set_adapter_scale_at(store, 1.0, Net::Main);
    }

    /// Scaled latents of image input `name` (`[B, 3, H, W]` in [0, 1]) from a VAE posterior
    /// *sample* (PairEdit's `latent_dist.sample()`), its noise from the sample seeds.
    fn pairedit_latents(&self, images: &Inputs<'_>, name: &str, seeds: &[u64], which: u64) -> Result<Tensor> {
        let v = images.try_get(name).ok_or_else(|| {
            input(format!(
                "PairEdit needs images `target` and `control` (the source; the `pairs` layout gives both), got: {}",
                images.names().join(", ")
            ))
        })?;
        let s = shape_of(v);
        let x = owned(v, self.device, self.compute)?;
        let vae = &self.backbone.vae()?.model;
        tch::no_grad(|| -> Result<Tensor> {
            let (mean, logvar) = vae.encode(&(x * 2.0 - 1.0));
            let per = mean.numel() / s[0] as usize;
            let mut noise = Vec::with_capacity(mean.numel());
            for &seed in seeds {
                noise.extend(rng::posterior(seed, which, per));
            }
            let noise = Tensor::from_slice(&noise).to_kind(mean.kind()).to_device(self.device).view_as(&mean);
            let z = crate::vae::AutoencoderKL::sample(&mean, &logvar, &noise);
            Ok(vae.scale_latent(&z).to_kind(self.compute).contiguous())
        })
    }

    /// `forward_batch` under a `pairedit` config: the variant's passes on the pair, no pixels.
    pub(super) fn pairedit_forward(
        &mut self,
        images: Inputs<'_>,
        ctx: &StepContext<'_>,
        mode: ForwardMode,
        reseed: Option<i64>,
    ) -> Result<ModelOutput> {
        let c = self.pairedit().expect("called under a pairedit config").clone();
        let target = images.try_get("target").map(shape_of).unwrap_or_default();
        let n = target.first().copied().unwrap_or(0);
        let seeds: Vec<u64> = match ctx.sample_seeds.as_slice() {
            s if s.len() == n as usize && n > 0 => s.to_vec(),
            [] if mode == ForwardMode::Eval => vec![0; n.max(0) as usize],
            s => {
                return Err(input(format!(
                    "forward_batch({mode:?}) needs one seed per sample in the step context, got {} for a batch of {n}",
                    s.len()
                )))
            }
        };
        let z_b = self.pairedit_latents(&images, "target", &seeds, 1)?;
        // `real` reads no source: its one pass uses the target (the real image) alone.
        let z_a = if c.variant.reads_source() {
            self.pairedit_latents(&images, "control", &seeds, 0)?
        } else {
            z_b.shallow_clone()
        };
        if z_a.size() != z_b.size() {
            return Err(input(format!(
                "`control` (source) and `target` must have the same size, got latents {:?} and {:?}",
                z_a.size(),
                z_b.size()
            )));
        }
        let per = (z_a.numel() / n as usize).max(1);
        let eps: Vec<f64> = seeds.iter().flat_map(|&s| rng::noise(s, per)).collect();
        let eps = Tensor::from_slice(&eps).to_kind(self.compute).to_device(self.device).view_as(&z_a);
        let idx: Vec<usize> = seeds.iter().map(|&s| rng::index(s, c.start_step, c.end_step)).collect();
        let [_, _, h, w]: [i64; 4] = z_a.size().try_into().expect("4-d");
        let sig: Vec<f32> =
            idx.iter().map(|&i| self.pairedit_sigma(i, h, w).map(|s| s as f32)).collect::<Result<_>>()?;
        let train = mode == ForwardMode::Train;
        let checkpoint = train && self.config.train.gradient_checkpointing;
        let losses = if train {
            self.pairedit_passes(&z_a, &z_b, &eps, &idx, reseed, checkpoint)?
        } else {
            tch::no_grad(|| self.pairedit_passes(&z_a, &z_b, &eps, &idx, None, false))?
        };
        let value = losses.total.to_kind(Kind::Double).double_value(&[]);
        let outputs = vec![
            ("timesteps".to_string(), tensor_to_managed(Tensor::from_slice(&sig))?),
            ("timestep_weights".to_string(), tensor_to_managed(Tensor::from_slice(&vec![1f32; n as usize]))?),
        ];
        if train {
            self.pending = Some(super::step::Pending::internal(losses.total, n, losses.replays));
        }
        Ok(ModelOutput { outputs, internal_loss: Some(value) })
    }
}

/// PairEdit's module name of a diffusers module path (`lora_unet_` + the path, dots → `_`).
pub fn module_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}

/// (path, down, up, alpha) of every module of one slot.
fn slot_weights(store: &Store, net: Net) -> Vec<(String, Tensor, Tensor, f64)> {
    let mut v = Vec::new();
    for t in store.targets() {
        if let Some(l) = &*t.slot_of(net).lock().unwrap() {
            let r = l.down.size()[0] as f64;
            v.push((t.path.clone(), l.down.shallow_clone(), l.up.shallow_clone(), l.alpha_over_r * r));
        }
    }
    v
}

/// Writes one slot's adapter in PairEdit's layout (bf16, as its `save_weights`).
fn write_slot(store: &Store, net: Net, path: &Path) -> Result<Option<PathBuf>> {
    let mods = slot_weights(store, net);
    if mods.is_empty() {
        return Ok(None);
    }
    let mut tensors = Vec::new();
    for (p, down, up, alpha) in mods {
        let name = module_name(&p);
        let bf = |t: &Tensor| t.detach().to_device(tch::Device::Cpu).to_kind(Kind::BFloat16).contiguous();
        tensors.push((format!("{name}.lora_down.weight"), bf(&down)));
        tensors.push((format!("{name}.lora_up.weight"), bf(&up)));
        tensors.push((format!("{name}.alpha"), Tensor::from(alpha).to_kind(Kind::BFloat16)));
    }
    save_tensors(path, &tensors, &BTreeMap::new())?;
    Ok(Some(path.to_path_buf()))
}

/// The `pairedit` adapter format: `semantic.safetensors` (the main slot) and, when the content
/// slot has modules, `content.safetensors` (PairEdit's `_0` file).
pub fn export(store: &Store, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    files.extend(write_slot(store, Net::Main, &dir.join("semantic.safetensors"))?);
    files.extend(write_slot(store, Net::Content, &dir.join("content.safetensors"))?);
    if files.is_empty() {
        return Err(input("the model has no LoRA modules to export"));
    }
    Ok(files)
}

/// The tensors of a `.pt` (weights-only pickle) or `.safetensors` file, on the CPU.
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let is_pt = path.extension().is_some_and(|e| e == "pt" || e == "pth" || e == "ckpt" || e == "bin");
    if is_pt {
        return Ok(likeness_sdk_torch::load_torch_checkpoint(path)?);
    }
    let (tensors, _) = likeness_sdk::st::load(path)?;
    tensors.iter().map(|t| Ok((t.name.clone(), likeness_sdk_torch::st_to_tensor(t, tch::Device::Cpu)?))).collect()
}

/// One module of a PairEdit-layout file, resolved to a layer of the store.
pub struct LayoutModule {
    /// The layer's diffusers path.
    pub path: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

/// A module's tensors as they are read, before the checks.
#[derive(Default)]
struct Partial {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// A file in PairEdit's layout, as modules resolved against `store`'s
/// Linear layers; `None` when it is not in that layout (then the other readers apply): every
/// key must be `lora_unet_<x>.{lora_down.weight, lora_up.weight, alpha}` with `<x>` a Linear
/// of `store` and the file a `.pt`, or a safetensors file with no other key.
pub fn read_layout(path: &Path, store: &Store) -> Result<Option<Vec<LayoutModule>>> {
    if path.is_dir() || !path.exists() {
        return Ok(None);
    }
    let by_name: BTreeMap<String, (String, Vec<i64>)> =
        store.targets().into_iter().map(|t| (module_name(&t.path), (t.path.clone(), t.weight_shape.clone()))).collect();
    let tensors = match read_tensors(path) {
        Ok(t) => t,
        Err(_) if path.extension().is_none_or(|e| e != "pt") => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut mods: BTreeMap<String, Partial> = BTreeMap::new();
    for (k, t) in tensors {
        let Some((m, what)) = k.split_once('.') else { return Ok(None) };
        if by_name.get(m).is_none_or(|(_, s)| s.len() != 2) {
            return Ok(None);
        }
        let e = mods.entry(m.to_string()).or_default();
        match what {
            "lora_down.weight" => e.down = Some(t),
            "lora_up.weight" => e.up = Some(t),
            "alpha" => e.alpha = Some(t.to_kind(Kind::Double).double_value(&[])),
            _ => return Ok(None),
        }
    }
    if mods.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (m, Partial { down, up, alpha }) in mods {
        let (p, shape) = &by_name[&m];
        let (Some(down), Some(up)) = (down, up) else {
            return Err(file(path.display(), format!("module `{m}` lacks its lora_down or lora_up weight")));
        };
        let r = down.size()[0];
        if down.size() != [r, shape[1]] || up.size() != [shape[0], r] {
            return Err(file(
                path.display(),
                format!(
                    "module `{m}`: lora_down {:?} / lora_up {:?} do not fit the layer's weight {shape:?}",
                    down.size(),
                    up.size()
                ),
            ));
        }
        // PairEdit: `alpha = rank if alpha is None or 0`.
        let alpha = alpha.filter(|a| *a != 0.0).unwrap_or(r as f64);
        out.push(LayoutModule { path: p.clone(), down, up, alpha });
    }
    Ok(Some(out))
}

/// Injects a PairEdit-layout file into slot `net` (the weights trainable, f32 or `kind`).
pub fn inject_layout(mods: Vec<LayoutModule>, store: &Store, net: Net, kind: Kind, dropout: f64) -> Result<()> {
    let targets = store.targets();
    for LayoutModule { path, down, up, alpha } in mods {
        let t = targets.iter().find(|t| t.path == path).expect("resolved against this store");
        let r = down.size()[0] as f64;
        *t.slot_of(net).lock().unwrap() = Some(LoraWeights {
            down: down.to_kind(kind).to_device(store.device).set_requires_grad(true),
            up: up.to_kind(kind).to_device(store.device).set_requires_grad(true),
            alpha_over_r: alpha / r,
            adapter_scale: 1.0,
            dropout,
            training: false,
        });
    }
    Ok(())
}
