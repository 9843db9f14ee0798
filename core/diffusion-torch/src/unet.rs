//! `UNet2DConditionModel` (diffusers 0.42.1, `unet_2d_condition.py` and the blocks it uses).

use crate::attention::Attention;
use crate::checkpoint::{self, Program, Segments, Step, Tape};
use crate::config::UNetConfig;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::store::{Store, P};
use tch::Tensor;

/// diffusers' `ResnetBlock2D` (also the VAE's, with `temb_channels = None`).
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(p: &P, inp: i64, out: i64, temb: Option<i64>, groups: i64, eps: f64) -> Self {
        ResnetBlock2D {
            norm1: GroupNorm::new(&p.sub("norm1"), groups, inp, eps),
            conv1: Conv2d::new(&p.sub("conv1"), inp, out, 3, 1, 1),
            time_emb_proj: temb.map(|t| Linear::new(&p.sub("time_emb_proj"), t, out, true)),
            norm2: GroupNorm::new(&p.sub("norm2"), groups, out, eps),
            conv2: Conv2d::new(&p.sub("conv2"), out, out, 3, 1, 1),
            conv_shortcut: (inp != out).then(|| Conv2d::new(&p.sub("conv_shortcut"), inp, out, 1, 1, 0)),
        }
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&t.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        // Dropout is 0 in SD1.5's configs; the block is evaluated deterministically.
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    fn new(p: &P, dim: i64, heads: i64, head_dim: i64, cross: i64, upcast: bool) -> Self {
        let inner = 4 * dim;
        BasicTransformerBlock {
            norm1: LayerNorm::new(&p.sub("norm1"), dim, 1e-5),
            attn1: Attention::new(&p.sub("attn1"), dim, dim, heads, head_dim, false, upcast),
            norm2: LayerNorm::new(&p.sub("norm2"), dim, 1e-5),
            attn2: Attention::new(&p.sub("attn2"), dim, cross, heads, head_dim, false, upcast),
            norm3: LayerNorm::new(&p.sub("norm3"), dim, 1e-5),
            ff_proj: Linear::new(&p.sub("ff.net.0.proj"), dim, inner * 2, true),
            ff_out: Linear::new(&p.sub("ff.net.2"), inner, dim, true),
        }
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(ctx)) + x;
        let h = self.ff_proj.forward(&self.norm3.forward(&x));
        let parts = h.chunk(2, -1);
        // GEGLU: exact (erf) GELU on the gate, as torch.nn.functional.gelu's default.
        let g = &parts[0] * parts[1].gelu("none");
        self.ff_out.forward(&g) + x
    }
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` with continuous input (one transformer block per layer).
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(p: &P, c: i64, heads: i64, cross: i64, groups: i64, linear: bool, upcast: bool) -> Self {
        let proj = |name: &str| {
            if linear {
                Proj::Linear(Linear::new(&p.sub(name), c, c, true))
            } else {
                Proj::Conv(Conv2d::new(&p.sub(name), c, c, 1, 1, 0))
            }
        };
        let norm = GroupNorm::new(&p.sub("norm"), groups, c, 1e-6);
        let proj_in = proj("proj_in");
        let blocks =
            vec![BasicTransformerBlock::new(&p.sub("transformer_blocks").sub(0), c, heads, c / heads, cross, upcast)];
        let proj_out = proj("proj_out");
        Transformer2D { norm, proj_in, blocks, proj_out }
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().unwrap();
        let n = self.norm.forward(x);
        let to_seq = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_seq(conv.forward(&n)),
            Proj::Linear(l) => l.forward(&to_seq(n)),
        };
        for blk in &self.blocks {
            t = blk.forward(&t, ctx);
        }
        let from_seq = |t: Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous();
        let o = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&from_seq(t)),
            Proj::Linear(l) => from_seq(l.forward(&t)),
        };
        o + x
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Transformer2D,
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the module tree under `store.root()` (diffusers names, no prefix).
    pub fn new(store: &Store, config: &UNetConfig) -> Self {
        let c = config;
        let p = store.root();
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let (g, eps, lin, up_att) = (c.norm_num_groups, c.norm_eps, c.use_linear_projection, c.upcast_attention);
        let conv_in = Conv2d::new(&p.sub("conv_in"), c.in_channels, ch[0], 3, 1, 1);
        let time_1 = Linear::new(&p.sub("time_embedding.linear_1"), ch[0], temb, true);
        let time_2 = Linear::new(&p.sub("time_embedding.linear_2"), temb, temb, true);
        let mut down = Vec::new();
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            let bp = p.sub("down_blocks").sub(i);
            let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                let r_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::new(&bp.sub("resnets").sub(j), r_in, out_ch, Some(temb), g, eps));
                if cross {
                    let ap = bp.sub("attentions").sub(j);
                    attentions.push(Transformer2D::new(&ap, out_ch, c.heads(i), c.cross_attention_dim, g, lin, up_att));
                }
            }
            let downsampler = (i + 1 < n)
                .then(|| Conv2d::new(&bp.sub("downsamplers.0.conv"), out_ch, out_ch, 3, 2, c.downsample_padding));
            down.push(DownBlock { resnets, attentions, downsampler });
        }
        let mp = p.sub("mid_block");
        let last = ch[n - 1];
        let mid = MidBlock {
            resnets: (0..2)
                .map(|j| ResnetBlock2D::new(&mp.sub("resnets").sub(j), last, last, Some(temb), g, eps))
                .collect(),
            attention: Transformer2D::new(
                &mp.sub("attentions.0"),
                last,
                c.heads(n - 1),
                c.cross_attention_dim,
                g,
                lin,
                up_att,
            ),
        };
        // Mid block resnets are declared in diffusers as resnets.0, attentions.0, resnets.1; the
        // state-dict order differs from ours but names and shapes are what matters.
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let bp = p.sub("up_blocks").sub(i);
            let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
            let layers = c.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let r_in = if j == 0 { prev } else { out_ch };
                resnets.push(ResnetBlock2D::new(&bp.sub("resnets").sub(j), r_in + skip, out_ch, Some(temb), g, eps));
                if cross {
                    let ap = bp.sub("attentions").sub(j);
                    let heads = c.heads(n - 1 - i);
                    attentions.push(Transformer2D::new(&ap, out_ch, heads, c.cross_attention_dim, g, lin, up_att));
                }
            }
            let upsampler = (i + 1 < n).then(|| Conv2d::new(&bp.sub("upsamplers.0.conv"), out_ch, out_ch, 3, 1, 1));
            up.push(UpBlock { resnets, attentions, upsampler });
        }
        let conv_norm_out = GroupNorm::new(&p.sub("conv_norm_out"), g, ch[0], eps);
        let conv_out = Conv2d::new(&p.sub("conv_out"), ch[0], c.out_channels, 3, 1, 1);
        UNet2DConditionModel { config: c.clone(), conv_in, time_1, time_2, down, mid, up, conv_norm_out, conv_out }
    }

    /// diffusers' `get_timestep_embedding` (fp32, as diffusers computes it before casting).
    pub fn timestep_embedding(&self, t: &Tensor) -> Tensor {
        let c = &self.config;
        crate::nn::sinusoidal_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift as f64)
    }

    /// `sample` [B, C, h, w], `timestep` [B] (or a scalar tensor), `encoder_hidden_states`
    /// [B, 77, cross_attention_dim] → the noise prediction [B, out_channels, h, w].
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        self.forward_reseeded(sample, timestep, encoder_hidden_states, None)
    }

    /// [`forward`](Self::forward), with libtorch's global generator seeded to `reseed + k` before
    /// segment `k` when `reseed` is given. LoRA dropout draws from that generator; seeding per
    /// segment is what lets [`forward_checkpointed`](Self::forward_checkpointed)'s recomputation
    /// draw the same masks as its forward, and makes this plain forward draw the same masks as
    /// the checkpointed one. The caller holds whatever lock guards the global generator.
    pub fn forward_reseeded(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        reseed: Option<i64>,
    ) -> Tensor {
        checkpoint::forward(self, self.segment_inputs(sample, timestep, encoder_hidden_states), reseed)
    }

    /// Gradient checkpointing (diffusers' `enable_gradient_checkpointing`, at its granularity:
    /// each resnet, each transformer, each resampler). The forward runs without a graph and
    /// keeps only the activations between segments; the returned output is a leaf that
    /// requires grad. Whatever is computed from it (the loss, x̂0, a VAE decode) is
    /// back-propagated as usual; then [`UNetTape::backward`] recomputes the segments in reverse,
    /// one at a time with a graph, and pushes the output's gradient through each of them into
    /// the LoRA weights — and into `encoder_hidden_states`' own graph (text-encoder LoRA) when
    /// it requires grad.
    ///
    /// Why by hand: tch 0.26 exposes neither `torch.utils.checkpoint`, a custom autograd
    /// Function nor a tensor hook, so the recomputation cannot run inside autograd's backward.
    /// The UNet's skip connections make it a DAG, not a chain: a down block's output is read by
    /// the next down block and by an up block, so its gradient is the sum over both readers,
    /// complete once every later segment has been processed (reverse program order).
    ///
    /// Dropout: pass `reseed` when LoRA dropout is on (see
    /// [`forward_reseeded`](Self::forward_reseeded)); the recomputation reseeds identically.
    pub fn forward_checkpointed(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        reseed: Option<i64>,
    ) -> (Tensor, UNetTape) {
        checkpoint::forward_checkpointed(self, self.segment_inputs(sample, timestep, encoder_hidden_states), reseed)
    }

    /// The segment program's fixed inputs (slots 0–2), in the weights' kind: the sample, the
    /// sinusoidal timestep embedding and the cross-attention context (with its graph).
    fn segment_inputs(&self, sample: &Tensor, timestep: &Tensor, ehs: &Tensor) -> Vec<Tensor> {
        let b = sample.size()[0];
        let wk = self.conv_in.weight.kind();
        let t = if timestep.dim() == 0 { timestep.expand([b], false) } else { timestep.shallow_clone() };
        let temb = self.timestep_embedding(&t).to_kind(wk);
        vec![sample.to_kind(wk), temb, ehs.to_kind(wk)]
    }
}

impl Segments for UNet2DConditionModel {
    type Segment = Segment;

    /// The forward as a list of segments over numbered activation slots (0 = sample, 1 = the
    /// sinusoidal timestep embedding, 2 = the context; step `k` writes slot `3 + k`).
    fn program(&self) -> Vec<Step<Segment>> {
        let mut program = Program::new(SLOT_FIRST_STEP);
        let mut push =
            |segment: Segment, inputs: Vec<usize>, shape_of: Option<usize>| program.push(segment, inputs, shape_of);
        let temb = push(Segment::Time, vec![SLOT_TEMB_IN], None);
        let mut h = push(Segment::ConvIn, vec![SLOT_SAMPLE], None);
        let mut skips = vec![h];
        for (i, blk) in self.down.iter().enumerate() {
            for j in 0..blk.resnets.len() {
                h = push(Segment::DownResnet(i, j), vec![h, temb], None);
                if j < blk.attentions.len() {
                    h = push(Segment::DownAttention(i, j), vec![h, SLOT_CTX], None);
                }
                skips.push(h);
            }
            if blk.downsampler.is_some() {
                h = push(Segment::Downsample(i), vec![h], None);
                skips.push(h);
            }
        }
        h = push(Segment::MidResnet(0), vec![h, temb], None);
        h = push(Segment::MidAttention, vec![h, SLOT_CTX], None);
        h = push(Segment::MidResnet(1), vec![h, temb], None);
        for (i, blk) in self.up.iter().enumerate() {
            for j in 0..blk.resnets.len() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = push(Segment::UpResnet(i, j), vec![h, skip, temb], None);
                if j < blk.attentions.len() {
                    h = push(Segment::UpAttention(i, j), vec![h, SLOT_CTX], None);
                }
            }
            if blk.upsampler.is_some() {
                let next = *skips.last().expect("a skip after each upsampler");
                h = push(Segment::Upsample(i), vec![h], Some(next));
            }
        }
        push(Segment::Out, vec![h], None);
        program.steps()
    }

    /// Exact for the time MLP and conv_in (the only segments that usually have no LoRA),
    /// conservatively true for the rest.
    fn segment_may_train(&self, segment: Segment) -> bool {
        let has = |s: &crate::nn::LoraSlots| {
            [&s.main, &s.content].iter().any(|slot| slot.lock().map(|l| l.is_some()).unwrap_or(true))
        };
        match segment {
            Segment::Time => has(&self.time_1.lora) || has(&self.time_2.lora),
            Segment::ConvIn => has(&self.conv_in.lora),
            _ => true,
        }
    }

    fn run_segment(&self, segment: Segment, x: &[Tensor], shape: Option<Vec<i64>>) -> Tensor {
        match segment {
            Segment::Time => self.time_2.forward(&self.time_1.forward(&x[0]).silu()),
            Segment::ConvIn => self.conv_in.forward(&x[0]),
            Segment::DownResnet(i, j) => self.down[i].resnets[j].forward(&x[0], Some(&x[1])),
            Segment::DownAttention(i, j) => self.down[i].attentions[j].forward(&x[0], &x[1]),
            Segment::Downsample(i) => self.down[i].downsampler.as_ref().expect("a downsampler").forward(&x[0]),
            Segment::MidResnet(j) => self.mid.resnets[j].forward(&x[0], Some(&x[1])),
            Segment::MidAttention => self.mid.attention.forward(&x[0], &x[1]),
            Segment::UpResnet(i, j) => self.up[i].resnets[j].forward(&Tensor::cat(&[&x[0], &x[1]], 1), Some(&x[2])),
            Segment::UpAttention(i, j) => self.up[i].attentions[j].forward(&x[0], &x[1]),
            Segment::Upsample(i) => {
                // Nearest 2× — to the next skip's size, which is what diffusers'
                // `forward_upsample_size` does for odd sizes and equals 2× otherwise.
                let s = shape.expect("an upsample step names its target's slot");
                let (h, w) = (s[2], s[3]);
                let up = self.up[i].upsampler.as_ref().expect("an upsampler");
                up.forward(&x[0].upsample_nearest2d([h, w], None, None))
            }
            Segment::Out => self.conv_out.forward(&self.conv_norm_out.forward(&x[0]).silu()),
        }
    }
}

const SLOT_SAMPLE: usize = 0;
const SLOT_TEMB_IN: usize = 1;
const SLOT_CTX: usize = 2;
const SLOT_FIRST_STEP: usize = 3;

/// One unit of the forward between two kept activations (the checkpointing granularity).
#[derive(Clone, Copy, Debug)]
pub enum Segment {
    /// The time-embedding MLP: [sinusoid] → temb.
    Time,
    ConvIn,
    /// [h, temb]
    DownResnet(usize, usize),
    /// [h, context]
    DownAttention(usize, usize),
    Downsample(usize),
    MidResnet(usize),
    MidAttention,
    /// [h, skip, temb]
    UpResnet(usize, usize),
    UpAttention(usize, usize),
    Upsample(usize),
    Out,
}

/// What [`UNet2DConditionModel::forward_checkpointed`] keeps for its backward (the toolkit's
/// generic [`Tape`]: `tape.backward(&unet)`).
pub type UNetTape = Tape;
