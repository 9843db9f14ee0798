//! diffusers' `Attention` (AttnProcessor2_0: torch's scaled_dot_product_attention).

use crate::nn::{GroupNorm, Linear};
use crate::store::P;
use tch::Tensor;

pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: i64,
    pub upcast: bool,
}

impl Attention {
    /// `bias`: the q/k/v projections' bias (false in the UNet, true in the VAE); `to_out.0`
    /// always has one.
    pub fn new(p: &P, query_dim: i64, context_dim: i64, heads: i64, head_dim: i64, bias: bool, upcast: bool) -> Self {
        let inner = heads * head_dim;
        Attention {
            to_q: Linear::new(&p.sub("to_q"), query_dim, inner, bias),
            to_k: Linear::new(&p.sub("to_k"), context_dim, inner, bias),
            to_v: Linear::new(&p.sub("to_v"), context_dim, inner, bias),
            to_out: Linear::new(&p.sub("to_out").sub(0), inner, query_dim, true),
            heads,
            upcast,
        }
    }

    /// `x` [B, N, C], `context` [B, M, Cc] (None: self-attention).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let (b, n, _) = x.size3().unwrap();
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(ctx);
        let v = self.to_v.forward(ctx);
        let split = |t: Tensor| {
            let m = t.size()[1];
            t.view([b, m, self.heads, -1]).transpose(1, 2)
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let kind = q.kind();
        let (q, k, v) = if self.upcast {
            (q.to_kind(tch::Kind::Float), k.to_kind(tch::Kind::Float), v.to_kind(tch::Kind::Float))
        } else {
            (q, k, v)
        };
        let o = Tensor::scaled_dot_product_attention::<&Tensor>(&q, &k, &v, None, 0.0, false, None, false);
        let o = o.to_kind(kind).transpose(1, 2).reshape([b, n, -1]);
        self.to_out.forward(&o)
    }
}

/// The VAE mid-block attention: GroupNorm, one head over channels, residual.
pub struct SpatialAttention {
    pub group_norm: GroupNorm,
    pub attn: Attention,
}

impl SpatialAttention {
    pub fn new(p: &P, c: i64, groups: i64, eps: f64) -> Self {
        SpatialAttention {
            group_norm: GroupNorm::new(&p.sub("group_norm"), groups, c, eps),
            attn: Attention::new(p, c, c, 1, c, true, false),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().unwrap();
        let t = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let o = self.attn.forward(&t, None);
        o.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}
