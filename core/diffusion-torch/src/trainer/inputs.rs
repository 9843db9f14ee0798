//! Inputs as tensors or as their cached encodings (`latents`, the backbone's text encodings),
//! `encode` (what the engine caches) and `sample` (the toolkit's denoising loop over the
//! backbone's denoiser, with the adapter scale).

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::{DeviceType, Inputs, SampleRequest, TensorView, Texts};
use likeness_sdk_torch::{tensor_to_managed, view_to_tensor};
use tch::{Kind, Tensor};

use super::error::{input, Result};
use super::LoraModel;
use crate::backbone::{role_index, role_matches, Backbone, SampleScheduler};
use crate::nn::Net;
use crate::{lora, rng, sampling};

pub(super) fn shape_of(v: &TensorView) -> Vec<i64> {
    // SAFETY: views handed to a plugin method are valid for the call.
    unsafe { v.shape() }.to_vec()
}

/// A borrowed view copied onto `device` as `kind` (the graph must not point into host memory
/// the host reuses after the call).
pub(super) fn owned(v: &TensorView, device: tch::Device, kind: Kind) -> Result<Tensor> {
    if v.device.device_type == DeviceType::Cuda && v.stream != 0 {
        tch::Cuda::synchronize(v.device.device_id as i64);
    }
    Ok(view_to_tensor(v)?.to_device(device).to_kind(kind).copy())
}

pub(super) fn managed(t: &Tensor) -> Result<ManagedTensor> {
    // A detached f32 copy: the host may write into what it receives.
    Ok(tensor_to_managed(t.detach().to_kind(Kind::Float).copy())?)
}

impl<B: Backbone> LoraModel<B> {
    /// Pixels per latent pixel: 2^(VAE blocks − 1).
    pub(super) fn vae_factor(&self) -> i64 {
        self.backbone.latent_space().factor
    }

    fn check_images(&self, what: &str, shape: &[i64]) -> Result<()> {
        let f = self.vae_factor();
        if shape.len() != 4 || shape[0] < 1 || shape[1] != 3 || shape[2] % f != 0 || shape[3] % f != 0 || shape[2] < f {
            return Err(input(format!(
                "`{what}` must be f32 [B, 3, H, W] in [0, 1] with H and W positive multiples of {f} (the VAE factor), got {shape:?}"
            )));
        }
        Ok(())
    }

    /// `latents` of images in [0, 1] `[B, 3, H, W]`: the VAE posterior's **mean**, scaled (sd-scripts
    /// caches the mean too; diffusers' train script samples), no graph.
    fn encode_images(&self, x01: &Tensor) -> Result<Tensor> {
        let vae = &self.backbone.vae()?.model;
        Ok(tch::no_grad(|| {
            let (mean, _logvar) = vae.encode(&(x01 * 2.0 - 1.0));
            // Contiguous: `mean` is a channel slice of the encoder's output, and a strided input
            // can make libtorch pick other conv kernels downstream (other rounding) than the
            // same values read back from the `latents` cache.
            vae.scale_latent(&mean).to_kind(self.compute).contiguous()
        }))
    }

    /// The identity tokens of the `face_embedding` / `body_embedding` inputs `[B, D]` when an
    /// identity injection is installed (with a graph into the injection's weights).
    pub(super) fn identity_tokens(&self, images: &Inputs<'_>, n: i64) -> Result<Option<Tensor>> {
        let Some(inj) = self.backbone.identity() else { return Ok(None) };
        let get = |name: &str| -> Result<Option<Tensor>> {
            let Some(v) = images.try_get(name) else { return Ok(None) };
            let s = shape_of(v);
            if s.len() != 2 || s[0] != n {
                return Err(input(format!("`{name}` must be [{n}, D] (one embedding per sample), got {s:?}")));
            }
            Ok(Some(owned(v, self.device, self.compute)?))
        };
        let face = get("face_embedding")?.ok_or_else(|| {
            input(format!(
                "the identity injection needs `face_embedding` [B, {}] (the engine embeds `reference` with the face metric), got: {}",
                inj.config.face_dim,
                images.names().join(", ")
            ))
        })?;
        Ok(Some(inj.tokens(&face, get("body_embedding")?.as_ref())?))
    }

    /// Scaled latents → pixels in [0, 1] (not clamped), differentiable.
    pub(super) fn decode_latents(&self, z: &Tensor) -> Result<Tensor> {
        let vae = &self.backbone.vae()?.model;
        let x = vae.decode(&vae.unscale_latent(z));
        Ok((x.to_kind(self.compute) + 1.0) / 2.0)
    }

    /// Scaled latents `[B, C, h, w]`: the `latents` input if given, else the encoded `target`.
    pub(super) fn latents_of(&self, images: &Inputs<'_>) -> Result<Tensor> {
        let lc = self.backbone.latent_space().channels;
        if let Some(v) = images.try_get("latents") {
            let s = shape_of(v);
            if s.len() != 4 || s[0] < 1 || s[1] != lc || s[2] < 1 || s[3] < 1 {
                return Err(input(format!("`latents` must be [B, {lc}, h, w] (the `latents` encoding), got {s:?}")));
            }
            return owned(v, self.device, self.compute);
        }
        let v = images.try_get("target").ok_or_else(|| {
            input(format!("needs image `target` or its encoding `latents` (got: {})", images.names().join(", ")))
        })?;
        self.check_images("target", &shape_of(v))?;
        let x = owned(v, self.device, self.compute)?;
        self.encode_images(&x)
    }

    /// The conditioning, one tensor per text encoding: the encodings if given (frozen text
    /// encoders only), else the encoded `caption`.
    pub(super) fn context_of(&self, images: &Inputs<'_>, texts: &Texts<'_>, n: i64, grad: bool) -> Result<Vec<Tensor>> {
        if let Some(cond) = self.conditioned(images, texts, n, grad)? {
            return Ok(cond);
        }
        let encodings = B::TEXT_ENCODINGS;
        if encodings.iter().any(|e| images.try_get(e.name).is_some()) {
            return encodings
                .iter()
                .zip(self.backbone.text_shapes())
                .map(|(e, per)| self.cached_text(images, e.name, n, &per))
                .collect();
        }
        let names: Vec<&str> = encodings.iter().map(|e| e.name).collect();
        if texts.try_get("caption").is_none() {
            if let Some(ic) = &self.config.train.identity {
                // DTBack's data (seed 000's bundles) has no captions: its fixed prompt.
                let prompts: Vec<&str> = vec![ic.prompt.as_str(); n as usize];
                return self.embed(&prompts, grad);
            }
        }
        let caps = texts.try_get("caption").ok_or_else(|| {
            input(format!(
                "needs text `caption` or its encoding `{}` (got texts: {}; images: {})",
                names.join("`, `"),
                texts.names().join(", "),
                images.names().join(", ")
            ))
        })?;
        if caps.len() as i64 != n {
            return Err(input(format!("{} captions for a batch of {n}", caps.len())));
        }
        self.embed(&caps, grad)
    }

    /// The batch's [`Backbone::CONDITION_IMAGES`]: (role, f32 `[n, 3, H, W]` in [0, 1] on the
    /// device), in declaration order and by index within a pattern.
    pub(super) fn condition_images(&self, images: &Inputs<'_>, n: i64) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for d in B::CONDITION_IMAGES {
            let mut roles: Vec<&str> = images.names().into_iter().filter(|r| role_matches(d.name, r)).collect();
            roles.sort_by_key(|r| role_index(r));
            if d.required && roles.is_empty() {
                return Err(input(format!("needs image `{}` ({}), got: {}", d.name, d.doc, images.names().join(", "))));
            }
            for r in roles {
                let v = images.try_get(r).expect("listed by names()");
                let s = shape_of(v);
                self.check_images(r, &s)?;
                if s[0] != n {
                    return Err(input(format!("`{r}` has {} images for a batch of {n}", s[0])));
                }
                out.push((r.to_string(), owned(v, self.device, Kind::Float)?));
            }
        }
        Ok(out)
    }

    /// The conditioning through [`Backbone::condition`] when the backbone declares condition
    /// images, else `None`. Each of the backbone's [`Backbone::CONDITION_ENCODINGS`] is computed
    /// when the batch has an input it reads, else taken from its cached outputs (the engine
    /// passes those in place of all of its sources).
    fn conditioned(&self, images: &Inputs<'_>, texts: &Texts<'_>, n: i64, grad: bool) -> Result<Option<Vec<Tensor>>> {
        if B::CONDITION_IMAGES.is_empty() {
            return Ok(None);
        }
        let controls = self.condition_images(images, n)?;
        let captions = || -> Result<Vec<&str>> {
            let caps = texts.try_get("caption").ok_or_else(|| {
                input(format!(
                    "needs text `caption`{} (got texts: {}; images: {})",
                    match B::CONDITION_ENCODINGS.iter().find(|e| e.reads_caption()) {
                        Some(e) => format!(" or its encoding `{}`", e.outputs.join("`, `")),
                        None => String::new(),
                    },
                    texts.names().join(", "),
                    images.names().join(", ")
                ))
            })?;
            if caps.len() as i64 != n {
                return Err(input(format!("{} captions for a batch of {n}", caps.len())));
            }
            Ok(caps)
        };
        if B::CONDITION_ENCODINGS.is_empty() {
            let cond = self.backbone.condition(&captions()?, &controls, grad)?;
            return Ok(Some(self.compute_kind(cond)));
        }
        let mut parts: Vec<(String, Tensor)> = Vec::new();
        for e in B::CONDITION_ENCODINGS {
            let read = e.images_read(&controls);
            let caption_given = e.reads_caption() && texts.try_get("caption").is_some();
            if caption_given || !read.is_empty() {
                let caps = if e.reads_caption() { captions()? } else { Vec::new() };
                parts.extend(tch::no_grad(|| self.backbone.encode_condition(e.name, &caps, &read))?);
                continue;
            }
            if e.reads_caption() && !images.names().iter().any(|name| e.produces(name)) {
                captions()?; // the error naming what is missing
            }
            for name in images.names().into_iter().filter(|name| e.produces(name)) {
                let v = images.try_get(name).expect("listed by names()");
                if shape_of(v).first() != Some(&n) {
                    return Err(input(format!("`{name}` has shape {:?} for a batch of {n}", shape_of(v))));
                }
                parts.push((name.to_string(), owned(v, self.device, Kind::Float)?));
            }
        }
        let cond = self.backbone.assemble_condition(&parts)?;
        Ok(Some(self.compute_kind(cond)))
    }

    /// Floating tensors in the compute kind (masks and ids as they are).
    fn compute_kind(&self, ts: Vec<Tensor>) -> Vec<Tensor> {
        ts.into_iter().map(|t| if t.is_floating_point() { t.to_kind(self.compute) } else { t }).collect()
    }

    /// One cached text encoding `[n, …per]`.
    fn cached_text(&self, images: &Inputs<'_>, name: &str, n: i64, per: &[i64]) -> Result<Tensor> {
        let v = images.try_get(name).ok_or_else(|| input(format!("needs its text encoding `{name}` too")))?;
        if self.trains_text() {
            return Err(input(format!(
                "`{name}` were given but the text encoder has LoRA (train_text_encoder): pass `caption` (the engine must not cache texts for this config)"
            )));
        }
        let want: Vec<i64> = [vec![n], per.to_vec()].concat();
        let s = shape_of(v);
        if s != want {
            return Err(input(format!("`{name}` must be {want:?} (the `{name}` encoding), got {s:?}")));
        }
        owned(v, self.device, self.compute)
    }

    /// The backbone's text encodings of `texts`, in the compute kind.
    fn embed(&self, texts: &[&str], grad: bool) -> Result<Vec<Tensor>> {
        Ok(self.backbone.encode_texts(texts, grad)?.into_iter().map(|t| t.to_kind(self.compute)).collect())
    }

    pub(super) fn encode_impl(
        &mut self,
        name: &str,
        images: Inputs<'_>,
        texts: Texts<'_>,
    ) -> Result<Vec<(String, ManagedTensor)>> {
        let text_names: Vec<&str> = B::TEXT_ENCODINGS.iter().map(|e| e.name).collect();
        if name == "latents" {
            let v = images.get("target")?;
            self.check_images("target", &shape_of(v))?;
            let x = owned(v, self.device, self.compute)?;
            return Ok(vec![("latents".into(), managed(&self.encode_images(&x)?)?)]);
        }
        if let Some(e) = B::CONDITION_ENCODINGS.iter().find(|e| e.name == name && !self.trains_text()) {
            let caps: Vec<&str> = if e.reads_caption() { texts.get("caption")? } else { Vec::new() };
            let n = match (caps.len(), images.names().first()) {
                (0, Some(r)) => shape_of(images.get(r)?)[0],
                (c, _) => c as i64,
            };
            let read = e.images_read(&self.condition_images(&images, n)?);
            let outs = tch::no_grad(|| self.backbone.encode_condition(name, &caps, &read))?;
            return outs.iter().map(|(k, t)| Ok((k.clone(), managed(t)?))).collect();
        }
        if text_names.contains(&name) && !self.trains_text() {
            let caps = texts.get("caption")?;
            // One call encodes every text encoding; the engine asks by name.
            let all = self.embed(&caps, false)?;
            let out = text_names.iter().zip(all).find(|(n, _)| **n == name).map(|(_, t)| t).expect("listed");
            return Ok(vec![(name.to_string(), managed(&out)?)]);
        }
        Err(input(format!(
            "declares no encoding `{name}` (it has: {})",
            if self.trains_text() {
                "latents; texts are not cached while the text encoder trains".to_string()
            } else {
                ["latents"]
                    .iter()
                    .chain(&text_names)
                    .copied()
                    .chain(B::CONDITION_ENCODINGS.iter().map(|e| e.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )))
    }

    pub(super) fn sample_impl(&mut self, r: &SampleRequest<'_>) -> Result<ManagedTensor> {
        let fixed = self.config.train.identity.as_ref().map(|i| i.prompt.as_str());
        // DTBack: an empty prompt (an example without a caption) is identity.prompt, as in training.
        let prompts: Vec<&str> = r
            .prompts
            .as_slice()
            .iter()
            .map(|s| match (s.as_str(), fixed) {
                ("", Some(p)) => p,
                (s, _) => s,
            })
            .collect();
        let n = prompts.len();
        if n == 0 {
            return Err(input("sample needs at least one prompt"));
        }
        let negatives: Vec<&str> = r.negative_prompts.as_slice().iter().map(|s| s.as_str()).collect();
        if !negatives.is_empty() && negatives.len() != n {
            return Err(input(format!("{} negative prompts for {n} prompts", negatives.len())));
        }
        let set = self.backbone.sampling();
        let res = set.resolution;
        let (width, height) = (if r.width == 0 { res } else { r.width }, if r.height == 0 { res } else { r.height });
        let f = self.vae_factor() as u32;
        if width % f != 0 || height % f != 0 {
            return Err(input(format!("sample size {width}×{height} must be a multiple of {f} (the VAE factor)")));
        }
        let steps = if r.steps == 0 { set.steps } else { r.steps } as usize;
        let guidance = self.backbone.guidance(if r.guidance <= 0.0 { set.guidance } else { r.guidance });
        if !r.adapter_scale.is_finite() {
            return Err(input(format!("adapter_scale must be finite, got {}", r.adapter_scale)));
        }
        let lc = self.backbone.latent_space().channels;
        let (h, w) = ((height / f) as i64, (width / f) as i64);
        let per = (lc * h * w) as usize;
        let mut noise = Vec::with_capacity(n * per);
        for i in 0..n {
            noise.extend(rng::noise(r.seed.wrapping_add(i as u64), per));
        }
        let uncond_texts: Vec<&str> = if negatives.is_empty() { vec![""; n] } else { negatives };
        // Every store the adapters live in (loading the text encoders: sampling encodes prompts).
        let mut stores = Vec::new();
        for &c in B::COMPONENTS {
            stores.extend(self.backbone.store(c, true)?);
        }
        for s in &stores {
            lora::set_adapter_scale(s, r.adapter_scale);
            lora::set_training(s, false);
        }
        let sample_images = Inputs::new(r.images);
        let result = (|| -> Result<Tensor> {
            // Edit models: the request's control images condition the prompt and, as
            // QwenImageEditPlusPipeline encodes it, the negative prompt too.
            let controls = if B::CONDITION_IMAGES.is_empty() {
                Vec::new()
            } else {
                self.condition_images(&sample_images, n as i64)?
            };
            let encode = |texts: &[&str]| -> Result<Vec<Tensor>> {
                if B::CONDITION_IMAGES.is_empty() {
                    return self.embed(texts, false);
                }
                Ok(self.compute_kind(tch::no_grad(|| self.backbone.condition(texts, &controls, false))?))
            };
            let mut cond = encode(&prompts)?;
            let mut uncond = if guidance.needs_negative() { Some(encode(&uncond_texts)?) } else { None };
            // DTBack: the identity tokens condition both branches (the identity is not what
            // classifier-free guidance contrasts).
            if let Some(tokens) = tch::no_grad(|| self.identity_tokens(&sample_images, n as i64))? {
                if let Some(u) = uncond.as_mut() {
                    u.push(tokens.shallow_clone());
                }
                cond.push(tokens);
            }
            let x = Tensor::from_slice(&noise).to_kind(self.compute).to_device(self.device).view([n as i64, lc, h, w]);
            // The toolkit's loop (checked against diffusers' pipelines); no graph.
            let z = tch::no_grad(|| -> Result<Tensor> {
                let b = &self.backbone;
                let mut guided = sampling::guided_model(
                    |x: &Tensor, t: &Tensor, g: Option<&Tensor>, c: &[Tensor]| b.denoise_guided(x, t, g, c, None),
                    &cond,
                    uncond.as_deref(),
                    guidance,
                )?;
                // `sample_adapter_skip = k`: PairEdit's `skip_slider_timestep_till` — the adapter
                // is applied at steps i > k only (0-based; the base model before).
                let skip = self.config.train.sample_adapter_skip;
                let edit = self.config.train.sample_edit_cfg;
                let scales = |main: f64, content: f64| {
                    for st in &stores {
                        lora::set_adapter_scale_at(st, main, Net::Main);
                        lora::set_adapter_scale_at(st, content, Net::Content);
                    }
                };
                let mut step = 0usize;
                let model = |x: &Tensor, t: f64| -> crate::Result<Tensor> {
                    let on = skip.is_none_or(|k| step > k);
                    step += 1;
                    match edit {
                        // PairEdit's generate_real_image: two forwards where the edit is on.
                        Some(g) if on && r.adapter_scale > 0.0 => {
                            scales(r.adapter_scale, 0.0);
                            let v_s = guided(x, t)?;
                            scales(0.0, 1.0);
                            let v_c = guided(x, t)?;
                            Ok(&v_c + (v_s - &v_c) * g)
                        }
                        Some(_) => {
                            scales(0.0, 1.0);
                            guided(x, t)
                        }
                        None => {
                            if skip.is_some() {
                                scales(if on { r.adapter_scale } else { 0.0 }, 1.0);
                            }
                            guided(x, t)
                        }
                    }
                };
                Ok(match set.scheduler {
                    SampleScheduler::FlowMatch(fc) => {
                        sampling::run(&sampling::FlowSchedule::new(fc, steps, b.image_seq_len(h, w))?, &x, model)?
                    }
                    SampleScheduler::Ddpm { sampler, config } => {
                        sampling::run(&sampling::Schedule::new(sampler, config, steps)?, &x, model)?
                    }
                })
            })?;
            Ok(tch::no_grad(|| self.decode_latents(&z))?.clamp(0.0, 1.0))
        })();
        for s in &stores {
            lora::set_adapter_scale_at(s, 1.0, Net::Main);
            lora::set_adapter_scale_at(s, 1.0, Net::Content);
        }
        managed(&result?)
    }
}
