//! DTBack's `IdentityPreservingFlux` identity injection (seeds 000 and 001), PuLID-style: the
//! face identity (an ArcFace embedding) and the body identity (an OSNet person re-ID embedding)
//! are each resampled by a small perceiver into `num_face_latents` / `num_body_latents` tokens
//! of the denoiser's width, and added cross-attention layers let the image tokens of chosen
//! transformer blocks attend to them: `img ← img + id_weight · CA(LN(img), tokens)`.
//!
//! DTBack has no public code; these are our choices, each PuLID-Flux's where it has one:
//! - **Blocks**: after every `double_interval`-th double block (0, 2, 4, …) and every
//!   `single_interval`-th single block (0, 4, 8, …), PuLID-Flux's intervals 2 and 4: on
//!   FLUX.1 (19 + 38 blocks) 10 + 10 injection points, on the image tokens only (a single
//!   block's text part is left alone, as PuLID does).
//! - **Perceiver** (IP-Adapter's / PuLID's resampler, smaller): the embedding becomes
//!   `context_tokens` tokens of `width` (a Linear + LayerNorm), learned latent queries attend to
//!   [context; latents] for `depth` layers (attention + GELU MLP, pre-norm, residual), then a
//!   Linear to the denoiser's width + LayerNorm.
//! - **Cross-attention**: `ca_heads × ca_head_dim` inner width (1024 by default, PuLID-Flux's
//!   2048 halved: 12.6 M parameters per point on FLUX.1 instead of 20 M), its output projection
//!   zero-initialised, so an untrained injection leaves the base model's output unchanged.
//! - **Init**: Linear weights N(0, 0.02), biases 0, LayerNorms 1/0, latent queries N(0, 1)/√width
//!   (IP-Adapter's), from a ChaCha stream of the run seed (not libtorch's shared generator).
//!
//! The parameters live in their own [`Store`] in the trainer's compute kind (f32; f64 for
//! gradient checks); the blocks' activations are cast to it and the result cast back.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::attention::Attention;
use crate::error::{Error, Result};
use crate::nn::{LayerNorm, Linear};
use crate::rng::Normals;
use crate::store::{Mode, Store, P};

fn d_latents() -> usize {
    16
}
fn d_dim() -> i64 {
    512
}
fn d_width() -> i64 {
    256
}
fn d_depth() -> usize {
    2
}
fn d_heads() -> i64 {
    4
}
fn d_ctx() -> i64 {
    4
}
fn d_ca_heads() -> i64 {
    8
}
fn d_ca_head_dim() -> i64 {
    128
}
fn d_double() -> usize {
    2
}
fn d_single() -> usize {
    4
}
fn d_one() -> f64 {
    1.0
}

/// The `identity` config object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default = "d_latents")]
    pub num_face_latents: usize,
    /// 0 = no body stream (then no `body_embedding` input).
    #[serde(default = "d_latents")]
    pub num_body_latents: usize,
    /// Width of the face embedding (ArcFace: 512).
    #[serde(default = "d_dim")]
    pub face_dim: i64,
    /// Width of the body embedding (OSNet x1.0: 512).
    #[serde(default = "d_dim")]
    pub body_dim: i64,
    #[serde(default = "d_width")]
    pub width: i64,
    #[serde(default = "d_depth")]
    pub depth: usize,
    #[serde(default = "d_heads")]
    pub heads: i64,
    #[serde(default = "d_ctx")]
    pub context_tokens: i64,
    #[serde(default = "d_ca_heads")]
    pub ca_heads: i64,
    #[serde(default = "d_ca_head_dim")]
    pub ca_head_dim: i64,
    #[serde(default = "d_double")]
    pub double_interval: usize,
    #[serde(default = "d_single")]
    pub single_interval: usize,
    /// The injections' weight (PuLID's `id_weight`), training and sampling.
    #[serde(default = "d_one")]
    pub id_weight: f64,
    /// Also train LoRA on the denoiser (`lora_rank`, `lora_targets`); by default only the
    /// injection trains.
    #[serde(default)]
    pub train_lora: bool,
    /// The prompt of a sample without a `caption` (seed 000's bundles have none).
    #[serde(default = "d_prompt")]
    pub prompt: String,
}

fn d_prompt() -> String {
    "a photo of a person".into()
}

impl IdentityConfig {
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("identity.{k}"), m));
        if self.num_face_latents == 0 {
            return bad("num_face_latents", "must be ≥ 1 (seed 000: 16)".into());
        }
        for (k, v) in [
            ("face_dim", self.face_dim),
            ("body_dim", self.body_dim),
            ("width", self.width),
            ("heads", self.heads),
            ("context_tokens", self.context_tokens),
            ("ca_heads", self.ca_heads),
            ("ca_head_dim", self.ca_head_dim),
        ] {
            if v < 1 {
                return bad(k, format!("must be ≥ 1, got {v}"));
            }
        }
        if self.width % self.heads != 0 {
            return bad("heads", format!("must divide width = {}, got {}", self.width, self.heads));
        }
        if self.double_interval == 0 || self.single_interval == 0 {
            return bad("double_interval/single_interval", "must be ≥ 1 (PuLID-Flux: 2 and 4)".into());
        }
        if !self.id_weight.is_finite() {
            return bad("id_weight", format!("must be a finite number, got {}", self.id_weight));
        }
        Ok(())
    }

    /// The JSON Schema of the object.
    pub fn property() -> serde_json::Value {
        serde_json::json!({"type": "object", "additionalProperties": false,
        "description": "DTBack's IdentityPreservingFlux: face/body identity embeddings (inputs `face_embedding`, `body_embedding`) resampled into tokens and injected by added cross-attention (docs/dtback.md); only the injection trains unless train_lora",
        "properties": {
            "num_face_latents": {"type": "integer", "minimum": 1, "default": 16},
            "num_body_latents": {"type": "integer", "minimum": 0, "default": 16, "description": "0 = no body stream"},
            "face_dim": {"type": "integer", "default": 512, "description": "face embedding width (ArcFace 512)"},
            "body_dim": {"type": "integer", "default": 512, "description": "body embedding width (OSNet 512)"},
            "width": {"type": "integer", "default": 256, "description": "perceiver width"},
            "depth": {"type": "integer", "default": 2, "description": "perceiver layers"},
            "heads": {"type": "integer", "default": 4, "description": "perceiver heads"},
            "context_tokens": {"type": "integer", "default": 4, "description": "tokens an embedding is projected to"},
            "ca_heads": {"type": "integer", "default": 8, "description": "cross-attention heads"},
            "ca_head_dim": {"type": "integer", "default": 128, "description": "cross-attention head width"},
            "double_interval": {"type": "integer", "minimum": 1, "default": 2, "description": "inject after double blocks 0, k, 2k, …"},
            "single_interval": {"type": "integer", "minimum": 1, "default": 4, "description": "inject after single blocks 0, k, 2k, …"},
            "id_weight": {"type": "number", "default": 1.0, "description": "weight of the injections"},
            "train_lora": {"type": "boolean", "default": false, "description": "also train LoRA on the denoiser"},
            "prompt": {"type": "string", "default": "a photo of a person", "description": "the prompt of a sample without a `caption` (seed 000's bundles have none)"}
        }})
    }
}

struct PerceiverLayer {
    norm_latents: LayerNorm,
    norm_context: LayerNorm,
    attn: Attention,
    norm_ff: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

/// An embedding `[B, D]` → `[B, N, dim]` tokens.
struct Resampler {
    proj_in: Linear,
    norm_in: LayerNorm,
    latents: Tensor,
    layers: Vec<PerceiverLayer>,
    proj_out: Linear,
    norm_out: LayerNorm,
    context_tokens: i64,
    width: i64,
}

impl Resampler {
    fn new(p: &P, c: &IdentityConfig, input: i64, n: usize, dim: i64) -> Self {
        let w = c.width;
        let layers = (0..c.depth)
            .map(|i| {
                let l = p.sub("layers").sub(i);
                PerceiverLayer {
                    norm_latents: LayerNorm::new(&l.sub("norm_latents"), w, 1e-5),
                    norm_context: LayerNorm::new(&l.sub("norm_context"), w, 1e-5),
                    attn: Attention::new(&l.sub("attn"), w, w, c.heads, w / c.heads, false, false),
                    norm_ff: LayerNorm::new(&l.sub("norm_ff"), w, 1e-5),
                    ff_in: Linear::new(&l.sub("ff_in"), w, 4 * w, true),
                    ff_out: Linear::new(&l.sub("ff_out"), 4 * w, w, true),
                }
            })
            .collect();
        Resampler {
            proj_in: Linear::new(&p.sub("proj_in"), input, c.context_tokens * w, true),
            norm_in: LayerNorm::new(&p.sub("norm_in"), w, 1e-5),
            latents: p.param("latents", &[n as i64, w]),
            layers,
            proj_out: Linear::new(&p.sub("proj_out"), w, dim, true),
            norm_out: LayerNorm::new(&p.sub("norm_out"), dim, 1e-5),
            context_tokens: c.context_tokens,
            width: w,
        }
    }

    fn forward(&self, e: &Tensor) -> Tensor {
        let b = e.size()[0];
        let ctx = self.norm_in.forward(&self.proj_in.forward(e).view([b, self.context_tokens, self.width]));
        let mut lat = self.latents.unsqueeze(0).expand([b, -1, -1], false);
        for l in &self.layers {
            let q = l.norm_latents.forward(&lat);
            let kv = Tensor::cat(&[l.norm_context.forward(&ctx), q.shallow_clone()], 1);
            lat = &lat + l.attn.forward(&q, Some(&kv));
            lat = &lat + l.ff_out.forward(&l.ff_in.forward(&l.norm_ff.forward(&lat)).gelu("none"));
        }
        self.norm_out.forward(&self.proj_out.forward(&lat))
    }
}

/// One added cross-attention: image tokens query the identity tokens.
pub struct CrossAttention {
    norm: LayerNorm,
    attn: Attention,
}

impl CrossAttention {
    fn new(p: &P, c: &IdentityConfig, dim: i64) -> Self {
        CrossAttention {
            norm: LayerNorm::new(&p.sub("norm"), dim, 1e-6),
            attn: Attention::new(&p.sub("attn"), dim, dim, c.ca_heads, c.ca_head_dim, false, false),
        }
    }
}

/// The injection modules of one denoiser (see the module docs).
pub struct IdentityInjection {
    pub config: IdentityConfig,
    pub store: Store,
    face: Resampler,
    body: Option<Resampler>,
    double: Vec<(usize, CrossAttention)>,
    single: Vec<(usize, CrossAttention)>,
}

impl IdentityInjection {
    /// The modules for a denoiser of width `dim` with `n_double` + `n_single` blocks, in `kind`
    /// on `device`, initialised from `seed` (see the module docs).
    pub fn new(
        c: &IdentityConfig,
        dim: i64,
        n_double: usize,
        n_single: usize,
        kind: Kind,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        c.validate().map_err(|(field, msg)| Error::Config { path: "identity".into(), field, msg })?;
        let store = Store::new(Mode::Alloc, kind, device);
        let p = store.root();
        let face = Resampler::new(&p.sub("face"), c, c.face_dim, c.num_face_latents, dim);
        let body =
            (c.num_body_latents > 0).then(|| Resampler::new(&p.sub("body"), c, c.body_dim, c.num_body_latents, dim));
        let double = (0..n_double)
            .step_by(c.double_interval)
            .map(|i| (i, CrossAttention::new(&p.sub("double").sub(i), c, dim)))
            .collect();
        let single = (0..n_single)
            .step_by(c.single_interval)
            .map(|i| (i, CrossAttention::new(&p.sub("single").sub(i), c, dim)))
            .collect();
        let inj = IdentityInjection { config: c.clone(), store, face, body, double, single };
        inj.initialise(seed);
        Ok(inj)
    }

    /// The init of the module docs, in construction order from one ChaCha stream.
    fn initialise(&self, seed: u64) {
        let mut normals = Normals::new(seed, 0x6964_656e_7469_7479);
        let width = self.config.width as f64;
        tch::no_grad(|| {
            for (name, mut t) in self.store.named_parameters() {
                let leaf = name.rsplit('.').nth(1).unwrap_or("");
                let value = if name.ends_with("latents") {
                    let v: Vec<f64> = normals.take(t.numel()).iter().map(|x| x / width.sqrt()).collect();
                    Some(v)
                } else if leaf.starts_with("norm") {
                    let _ = t.fill_(if name.ends_with(".weight") { 1.0 } else { 0.0 });
                    None
                } else if name.ends_with(".bias")
                    || (name.contains(".attn.to_out.") && !name.starts_with("face") && !name.starts_with("body"))
                {
                    // The cross-attention output starts at zero: no change to the base model.
                    let _ = t.zero_();
                    None
                } else {
                    Some(normals.take(t.numel()).iter().map(|x| x * 0.02).collect())
                };
                if let Some(v) = value {
                    let src = Tensor::from_slice(&v).to_kind(t.kind()).to_device(t.device()).view_as(&t);
                    t.copy_(&src);
                }
            }
        });
        for (_, t) in self.store.named_parameters() {
            let _ = t.set_requires_grad(true);
        }
    }

    /// Every parameter by name (`face.layers.0.attn.to_q.weight`, `double.0.attn.to_out.0.bias`, …).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.store.named_parameters()
    }

    /// The identity tokens `[B, Nf + Nb, dim]` of face embeddings `[B, face_dim]` and body
    /// embeddings `[B, body_dim]` (required when the config has a body stream).
    pub fn tokens(&self, face: &Tensor, body: Option<&Tensor>) -> Result<Tensor> {
        let c = &self.config;
        let check = |what: &str, t: &Tensor, d: i64| {
            let s = t.size();
            if s.len() != 2 || s[1] != d {
                return Err(Error::Config {
                    path: "identity".into(),
                    field: what.into(),
                    msg: format!("must be [B, {d}], got {s:?}"),
                });
            }
            Ok(())
        };
        check("face_embedding", face, c.face_dim)?;
        let kind = self.store.kind;
        let f = self.face.forward(&face.to_kind(kind));
        match (&self.body, body) {
            (Some(r), Some(b)) => {
                check("body_embedding", b, c.body_dim)?;
                if b.size()[0] != face.size()[0] {
                    return Err(Error::Config {
                        path: "identity".into(),
                        field: "body_embedding".into(),
                        msg: format!("batch {} differs from face_embedding's {}", b.size()[0], face.size()[0]),
                    });
                }
                Ok(Tensor::cat(&[f, r.forward(&b.to_kind(kind))], 1))
            }
            (Some(_), None) => Err(Error::Config {
                path: "identity".into(),
                field: "body_embedding".into(),
                msg: "num_body_latents > 0 needs a body embedding per sample (set num_body_latents = 0 for face only)"
                    .into(),
            }),
            (None, _) => Ok(f),
        }
    }

    /// Whether an injection follows double block `i` / single block `i`.
    pub fn after_double(&self, i: usize) -> bool {
        self.double.iter().any(|(k, _)| *k == i)
    }

    pub fn after_single(&self, i: usize) -> bool {
        self.single.iter().any(|(k, _)| *k == i)
    }

    fn point(&self, double: bool, i: usize) -> &CrossAttention {
        let list = if double { &self.double } else { &self.single };
        &list.iter().find(|(k, _)| *k == i).expect("an injection point").1
    }

    /// `img + id_weight · CA(LN(img), tokens)` after double (`double`) or single block `i`;
    /// `img` `[B, N, dim]` in the denoiser's kind, computed in the injection's kind.
    pub fn inject(&self, double: bool, i: usize, img: &Tensor, tokens: &Tensor) -> Tensor {
        let ca = self.point(double, i);
        let kind = self.store.kind;
        let x = img.to_kind(kind);
        let d = ca.attn.forward(&ca.norm.forward(&x), Some(&tokens.to_kind(kind)));
        img + (d * self.config.id_weight).to_kind(img.kind())
    }
}
