//! `AutoencoderKL` (diffusers 0.42.1 `autoencoder_kl.py`, `vae.py` Encoder/Decoder).

use crate::attention::SpatialAttention;
use crate::config::VaeConfig;
use crate::nn::{Conv2d, GroupNorm};
use crate::store::{Store, P};
use crate::unet::ResnetBlock2D;
use tch::Tensor;

/// The VAE's resnets, norms and attention use eps 1e-6 (diffusers' Encoder/Decoder).
const EPS: f64 = 1e-6;

struct Mid {
    resnets: Vec<ResnetBlock2D>,
    attn: SpatialAttention,
}

impl Mid {
    fn new(p: &P, c: i64, g: i64) -> Self {
        Mid {
            resnets: (0..2).map(|j| ResnetBlock2D::new(&p.sub("resnets").sub(j), c, c, None, g, EPS)).collect(),
            attn: SpatialAttention::new(&p.sub("attentions.0"), c, g, EPS),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.resnets[0].forward(x, None);
        let h = self.attn.forward(&h);
        self.resnets[1].forward(&h, None)
    }
}

struct Block {
    resnets: Vec<ResnetBlock2D>,
    sampler: Option<Conv2d>,
}

pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Block>,
    mid: Mid,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    up: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Encoder {
    fn new(p: &P, c: &VaeConfig) -> Self {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let n = ch.len();
        let mut down = Vec::new();
        let mut out = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let inp = out;
            out = block_ch;
            let bp = p.sub("down_blocks").sub(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(&bp.sub("resnets").sub(j), if j == 0 { inp } else { out }, out, None, g, EPS)
                })
                .collect();
            // Downsample2D(padding=0): the (0,1,0,1) pad is applied in forward.
            let sampler = (i + 1 < n).then(|| Conv2d::new(&bp.sub("downsamplers.0.conv"), out, out, 3, 2, 0));
            down.push(Block { resnets, sampler });
        }
        let last = ch[n - 1];
        Encoder {
            conv_in: Conv2d::new(&p.sub("conv_in"), c.in_channels, ch[0], 3, 1, 1),
            down,
            mid: Mid::new(&p.sub("mid_block"), last, g),
            conv_norm_out: GroupNorm::new(&p.sub("conv_norm_out"), g, last, EPS),
            conv_out: Conv2d::new(&p.sub("conv_out"), last, 2 * c.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for b in &self.down {
            for r in &b.resnets {
                h = r.forward(&h, None);
            }
            if let Some(s) = &b.sampler {
                h = s.forward(&h.constant_pad_nd([0, 1, 0, 1]));
            }
        }
        let h = self.mid.forward(&h);
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

impl Decoder {
    fn new(p: &P, c: &VaeConfig) -> Self {
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let n = rev.len();
        let mut up = Vec::new();
        let mut out = rev[0];
        for (i, &block_ch) in rev.iter().enumerate() {
            let prev = out;
            out = block_ch;
            let bp = p.sub("up_blocks").sub(i);
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(&bp.sub("resnets").sub(j), if j == 0 { prev } else { out }, out, None, g, EPS)
                })
                .collect();
            let sampler = (i + 1 < n).then(|| Conv2d::new(&bp.sub("upsamplers.0.conv"), out, out, 3, 1, 1));
            up.push(Block { resnets, sampler });
        }
        let first = c.block_out_channels[0];
        Decoder {
            conv_in: Conv2d::new(&p.sub("conv_in"), c.latent_channels, rev[0], 3, 1, 1),
            mid: Mid::new(&p.sub("mid_block"), rev[0], g),
            up,
            conv_norm_out: GroupNorm::new(&p.sub("conv_norm_out"), g, first, EPS),
            conv_out: Conv2d::new(&p.sub("conv_out"), first, c.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid.forward(&self.conv_in.forward(z));
        for b in &self.up {
            for r in &b.resnets {
                h = r.forward(&h, None);
            }
            if let Some(s) = &b.sampler {
                let (_, _, hh, ww) = h.size4().unwrap();
                h = s.forward(&h.upsample_nearest2d([2 * hh, 2 * ww], None, None));
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

impl AutoencoderKL {
    pub fn new(store: &Store, config: &VaeConfig) -> Self {
        let p = store.root();
        let l2 = 2 * config.latent_channels;
        let l = config.latent_channels;
        AutoencoderKL {
            config: config.clone(),
            encoder: Encoder::new(&p.sub("encoder"), config),
            decoder: Decoder::new(&p.sub("decoder"), config),
            quant_conv: config.use_quant_conv.then(|| Conv2d::new(&p.sub("quant_conv"), l2, l2, 1, 1, 0)),
            post_quant_conv: config.use_post_quant_conv.then(|| Conv2d::new(&p.sub("post_quant_conv"), l, l, 1, 1, 0)),
        }
    }

    /// image [B, 3, H, W] in [-1, 1] → the latent distribution's (mean, logvar), unscaled;
    /// logvar clamped to [-30, 20] as DiagonalGaussianDistribution does.
    pub fn encode(&self, image: &Tensor) -> (Tensor, Tensor) {
        let x = image.to_kind(self.encoder.conv_in.weight.kind());
        let h = self.encoder.forward(&x);
        let m = match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => h,
        };
        let parts = m.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// A sample `mean + exp(logvar / 2) · noise` (noise ~ N(0, 1), the caller's, for determinism).
    pub fn sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Tensor {
        mean + (logvar * 0.5).exp() * noise
    }

    /// Unscaled latent z [B, latent, h, w] → image [B, 3, 8h, 8w]; differentiable in z.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let z = z.to_kind(self.decoder.conv_in.weight.kind());
        match &self.post_quant_conv {
            Some(q) => self.decoder.forward(&q.forward(&z)),
            None => self.decoder.forward(&z),
        }
    }

    /// The latent the denoiser sees: `(z − shift_factor) · scaling_factor` (SD1.5: no shift,
    /// 0.18215; Flux: 0.1159 and 0.3611; from config.json).
    pub fn scale_latent(&self, z: &Tensor) -> Tensor {
        match self.config.shift_factor {
            Some(s) => (z - s) * self.config.scaling_factor,
            None => z * self.config.scaling_factor,
        }
    }

    pub fn unscale_latent(&self, z: &Tensor) -> Tensor {
        match self.config.shift_factor {
            Some(s) => z / self.config.scaling_factor + s,
            None => z / self.config.scaling_factor,
        }
    }
}
