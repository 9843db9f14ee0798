//! One training (or evaluation) forward and its backward: per-sample draws from the step
//! context's seeds, x_t / target / x̂0 from [`crate::training`], the weighted internal loss, the
//! decoded pixels, and one backward of the loss plus the host's pixel gradients.

use likeness_diffusion::timesteps::TimestepSampler;
use likeness_diffusion::weighting::min_snr_weight;
use likeness_sdk::{ErrorCode, ForwardMode, Inputs, ModelOutput, PluginError, StepContext, TensorView, Texts};
use likeness_sdk_torch::tensor_to_managed;
use tch::{Kind, Tensor};

use super::error::{input, Result};
use super::inputs::{managed, owned, shape_of};
use super::{torch_rng, LoraModel};
use crate::backbone::{Backbone, Objective, Replay};
use crate::{lora, rng, training};

/// What `backward` needs from the last `forward_batch(Train)`.
pub(super) struct Pending<B> {
    loss: Tensor,
    pub(super) pixels: Option<Tensor>,
    n: i64,
    /// With `gradient_checkpointing`: the denoiser's replay after the backward into its output.
    replay: Option<Replay<B>>,
    /// PairEdit with `gradient_checkpointing`: one replay per pass, and whether the content
    /// LoRA is frozen while it recomputes (as it was while the pass ran).
    pass_replays: Vec<(Replay<B>, bool)>,
}

impl<B> Pending<B> {
    /// A forward whose only objective is its internal loss (PairEdit's passes).
    pub(super) fn internal(loss: Tensor, n: i64, pass_replays: Vec<(Replay<B>, bool)>) -> Self {
        Pending { loss, pixels: None, n, replay: None, pass_replays }
    }
}

/// Per-sample draws: the sampler's value u ∈ [0, 1) (DDPM: the integer timestep ⌊u·T⌋; flow: σ = u)
/// and the noise `[C·h·w]`.
struct Draws {
    t: Vec<f64>,
    noise: Vec<f64>,
}

/// Per-sample timesteps in the model's units, their `[B]` output values and loss weights.
struct Timesteps {
    model: Tensor,
    output: Vec<f32>,
    weights: Vec<f64>,
}

impl<B: Backbone> LoraModel<B> {
    /// Timestep, noise `[C·h·w]` per sample from the seeds, or the Eval defaults.
    /// `latent_hw`: the latents' height and width (`flux_shift`'s μ).
    fn draws(
        &self,
        seeds: &[u64],
        n: usize,
        latent_hw: (usize, usize),
        per_sample: usize,
        mode: ForwardMode,
    ) -> Result<Draws> {
        let c = &self.config.train;
        let lc = self.backbone.latent_space().channels as usize;
        let objective = self.backbone.objective();
        if seeds.len() == n {
            let mut d = Draws { t: Vec::new(), noise: Vec::new() };
            for &s in seeds {
                let sampling = c.sampling(latent_hw.0, latent_hw.1);
                let mut ts = TimestepSampler::new(sampling, c.min_timestep, c.max_timestep, rng::timestep_seed(s))?;
                let t = match objective {
                    Objective::Ddpm { .. } => {
                        let nt = objective.num_train_timesteps();
                        ((ts.sample() * nt as f64).floor() as usize).min(nt - 1) as f64
                    }
                    Objective::FlowMatching { .. } => ts.sample(),
                };
                let mut eps = rng::noise(s, per_sample);
                if c.noise_offset > 0.0 {
                    // sd-scripts: noise + offset·randn(B, C, 1, 1): one draw per channel.
                    let off = rng::offset(s, lc);
                    let hw = per_sample / lc;
                    for (k, e) in eps.iter_mut().enumerate() {
                        *e += c.noise_offset * off[k / hw];
                    }
                }
                d.t.push(t);
                d.noise.extend(eps);
            }
            Ok(d)
        } else if seeds.is_empty() && mode == ForwardMode::Eval {
            let eps = rng::noise(0, per_sample);
            // The middle of the training schedule (from the scheduler config, not a fixed 500).
            let t = objective.eval_timestep();
            Ok(Draws { t: vec![t; n], noise: eps.repeat(n) })
        } else {
            Err(input(format!(
                "forward_batch({mode:?}) needs one seed per sample in the step context (ctx.sample_seeds), got {} for a batch of {n}",
                seeds.len()
            )))
        }
    }

    /// The draws' timesteps for the denoiser (DDPM: int64 t; flow: σ·T as f32), the `timesteps`
    /// output (t/T or σ) and the loss weights (min-SNR-γ for DDPM; weighting_scheme for flow matching).
    fn timesteps(&self, d: &Draws) -> Timesteps {
        let objective = self.backbone.objective();
        let nt = objective.num_train_timesteps() as f64;
        let gamma = self.config.train.min_snr_gamma;
        match objective {
            Objective::Ddpm { prediction, .. } => {
                let ti: Vec<usize> = d.t.iter().map(|&t| t as usize).collect();
                Timesteps {
                    model: Tensor::from_slice(&ti.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(self.device),
                    output: ti.iter().map(|&t| (t as f64 / nt) as f32).collect(),
                    weights: ti
                        .iter()
                        .map(|&t| {
                            let snr = objective.snr(t).expect("a DDPM objective");
                            gamma.map(|g| min_snr_weight(snr, g, *prediction)).unwrap_or(1.0)
                        })
                        .collect(),
                }
            }
            Objective::FlowMatching { .. } => Timesteps {
                model: Tensor::from_slice(&d.t.iter().map(|&s| (s * nt) as f32).collect::<Vec<_>>())
                    .to_device(self.device),
                output: d.t.iter().map(|&s| s as f32).collect(),
                // musubi-tuner's weighting_scheme (cosmap / sigma_sqrt; 1 otherwise).
                weights: d.t.iter().map(|&s| self.config.train.flow_loss_weight(s)).collect(),
            },
        }
    }

    /// x_t and the target from the clean latents, the noise and the draws.
    fn noised(&self, z0: &Tensor, eps: &Tensor, d: &Draws, t_model: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(match self.backbone.objective() {
            Objective::Ddpm { prediction, alphas_cumprod } => (
                training::add_noise(alphas_cumprod, z0, eps, t_model)?,
                training::ddpm_target(alphas_cumprod, z0, eps, t_model, *prediction)?,
            ),
            Objective::FlowMatching { .. } => {
                let sigma = self.sigma(d);
                (training::flow_add_noise(z0, eps, &sigma)?, training::flow_target(z0, eps)?)
            }
        })
    }

    fn sigma(&self, d: &Draws) -> Tensor {
        Tensor::from_slice(&d.t).to_kind(self.compute).to_device(self.device)
    }

    /// x̂0 from the prediction at x_t (differentiable in the prediction).
    fn x0_of(&self, x_t: &Tensor, out: &Tensor, d: &Draws, t_model: &Tensor) -> Result<Tensor> {
        Ok(match self.backbone.objective() {
            Objective::Ddpm { prediction, alphas_cumprod } => {
                let ab = training::alpha_bar(alphas_cumprod, t_model, x_t)?;
                training::predict_x0(x_t, out, &ab, *prediction)?
            }
            Objective::FlowMatching { .. } => training::flow_predict_x0(x_t, out, &self.sigma(d))?,
        })
    }

    pub(super) fn forward_impl(
        &mut self,
        images: Inputs<'_>,
        texts: Texts<'_>,
        ctx: &StepContext<'_>,
        mode: ForwardMode,
    ) -> Result<ModelOutput> {
        let train = mode == ForwardMode::Train;
        // LoRA dropout draws from libtorch's global generator: seed it from this batch's seeds
        // and hold the lock for the whole forward, so a resumed run drops the same units.
        let dropout = train && self.config.train.lora_dropout > 0.0;
        let batch_seed = ctx.sample_seeds.as_slice().iter().fold(0x5eed_u64, |a, &s| a.rotate_left(7) ^ s);
        let _rng = dropout.then(|| {
            let lock = torch_rng();
            tch::manual_seed((batch_seed >> 1) as i64);
            lock
        });
        // The denoiser reseeds before each of its segments, so the masks do not depend on
        // whether its activations are checkpointed (the recomputation draws what the forward drew).
        let reseed = dropout.then(|| (batch_seed.rotate_left(29) >> 1) as i64);
        for &c in B::COMPONENTS {
            if let Some(s) = self.backbone.store(c, false)? {
                lora::set_training(s, train);
            }
        }
        if self.pairedit().is_some() {
            return self.pairedit_forward(images, ctx, mode, reseed);
        }
        let z0 = self.latents_of(&images)?;
        let [n, lc, h, w]: [i64; 4] = z0.size().try_into().expect("4-d latents");
        if let Some(r) = images.try_get("reference") {
            let s = shape_of(r);
            if s.len() != 4 || s[0] != n || s[1] != 3 {
                return Err(input(format!("`reference` must be [{n}, 3, H, W], got {s:?}")));
            }
        }
        let mut cond = self.context_of(&images, &texts, n, train && self.trains_text())?;
        if let Some(tokens) = self.identity_tokens(&images, n)? {
            cond.push(tokens);
        }
        let d =
            self.draws(ctx.sample_seeds.as_slice(), n as usize, (h as usize, w as usize), (lc * h * w) as usize, mode)?;
        let ts = self.timesteps(&d);
        let eps = Tensor::from_slice(&d.noise).to_kind(self.compute).to_device(self.device).view([n, lc, h, w]);
        let (x_t, target) = self.noised(&z0, &eps, &d, &ts.model)?;
        let w_t = Tensor::from_slice(&ts.weights).to_kind(self.compute).to_device(self.device);
        let checkpoint = train && self.config.train.gradient_checkpointing;
        let mut replay = None;
        let mut run = || -> Result<(Tensor, Option<Tensor>)> {
            let out = if checkpoint {
                let (out, r) = self.backbone.denoise_checkpointed(&x_t, &ts.model, &cond, reseed)?;
                replay = Some(r);
                out
            } else {
                self.backbone.denoise(&x_t, &ts.model, &cond, reseed)?
            };
            let out = out.to_kind(self.compute);
            let mse = (&out - &target).square().mean_dim([1i64, 2, 3].as_slice(), false, self.compute);
            let loss = (mse * &w_t).mean(self.compute);
            let pixels = if self.config.train.decode_pixels {
                Some(self.decode_latents(&self.x0_of(&x_t, &out, &d, &ts.model)?)?)
            } else {
                None
            };
            Ok((loss, pixels))
        };
        let (loss, pixels) = if train { run()? } else { tch::no_grad(run)? };
        let ws: Vec<f32> = ts.weights.iter().map(|&w| w as f32).collect();
        let mut outputs = Vec::new();
        if let Some(p) = &pixels {
            outputs.push(("pixels".to_string(), managed(p)?));
        }
        outputs.push(("timesteps".into(), tensor_to_managed(Tensor::from_slice(&ts.output))?));
        outputs.push(("timestep_weights".into(), tensor_to_managed(Tensor::from_slice(&ws))?));
        let value = loss.to_kind(Kind::Double).double_value(&[]);
        if train {
            self.pending = Some(Pending { loss, pixels, n, replay, pass_replays: Vec::new() });
        }
        Ok(ModelOutput { outputs, internal_loss: Some(value) })
    }

    /// The sum of the pixel gradients, each times its scale, checked against the pending forward.
    fn pixel_gradient(&self, pending: &Pending<B>, grads: &[(&str, &TensorView, f64)]) -> Result<Option<Tensor>> {
        let mut g_pixels: Option<Tensor> = None;
        for (name, view, scale) in grads {
            let s = shape_of(view);
            match *name {
                // Drawn or fixed per sample, not functions of the parameters: zero contribution.
                "timesteps" | "timestep_weights" => {
                    if s != [pending.n] {
                        return Err(input(format!("gradient of `{name}` has shape {s:?}, expected [{}]", pending.n)));
                    }
                }
                "pixels" => {
                    let Some(p) = &pending.pixels else {
                        return Err(input("a gradient for `pixels` was given, but decode_pixels = false: this config outputs no pixels"));
                    };
                    if s != p.size() {
                        return Err(input(format!("gradient of `pixels` has shape {s:?}, expected {:?}", p.size())));
                    }
                    let g = owned(view, self.device, self.compute)? * *scale;
                    g_pixels = Some(match g_pixels {
                        Some(acc) => acc + g,
                        None => g,
                    });
                }
                other => {
                    return Err(input(format!(
                        "has no output `{other}` to take a gradient for (outputs: pixels, timesteps, timestep_weights)"
                    )))
                }
            }
        }
        Ok(g_pixels)
    }

    pub(super) fn backward_impl(
        &mut self,
        grads: &[(&str, &TensorView, f64)],
        weight: f64,
    ) -> likeness_sdk::Result<()> {
        let pending = self.pending.take().ok_or_else(|| {
            PluginError::new(
                ErrorCode::NoPendingForward,
                format!(
                    "model `{}`: backward without a pending forward_batch(Train) (each allows one backward)",
                    B::ID
                ),
            )
        })?;
        let g_pixels = self.pixel_gradient(&pending, grads).map_err(|e| e.plugin(B::ID))?;
        let mut objective: Option<Tensor> = (weight != 0.0).then(|| &pending.loss * weight);
        if let (Some(g), Some(p)) = (g_pixels, &pending.pixels) {
            let term = (p * g).sum(self.compute);
            objective = Some(match objective {
                Some(o) => o + term,
                None => term,
            });
        }
        if let Some(o) = objective {
            // One backward through the shared graph: the diffusion loss and the pixel
            // gradients accumulate into the LoRA weights together.
            o.backward();
            if !pending.pass_replays.is_empty() {
                let _rng = (self.config.train.lora_dropout > 0.0).then(torch_rng);
                self.replay_passes(pending.pass_replays);
            }
            if let Some(replay) = pending.replay {
                // The recomputation reseeds dropout from the forward's seeds: hold the
                // generator as the forward did.
                let _rng = (self.config.train.lora_dropout > 0.0).then(torch_rng);
                replay(&self.backbone);
            }
        }
        Ok(())
    }
}
