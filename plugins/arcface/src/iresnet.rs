//! The recognizer network (arcface_torch's IResNet-50/100 and any `[a, b, c, d]` layout, or any
//! other export made of the same operators) rebuilt in libtorch **from the ONNX file itself**:
//! a small interpreter that walks the graph's nodes in order and runs each with tch, the
//! initializers (and `Constant` nodes) held as tch tensors that never require gradients.
//! Gradients flow to the input image only, so the VJP to pixels is plain tch autograd.
//!
//! Operators: `Conv` (2-D, explicit or `VALID` pads, groups, dilations), `BatchNormalization`
//! (inference; arcface_torch exports fold the BN that follows a conv into the conv, the BN that
//! leads each IBasicBlock and the final `bn2`/`features` stay as nodes — both forms run),
//! `PRelu`, `Relu`, `LeakyRelu`, `Sigmoid`, `Add`/`Sub`/`Mul`/`Div` (numpy broadcasting; the
//! `Sub`/`Mul` input normalisation some recognizers carry), `Flatten`, `Reshape`, `Gemm`,
//! `MatMul`, `Transpose`, `Identity`, `Dropout` (inference), `Constant`. Anything else is an
//! error at load time that names the file, the node and its operator.
//!
//! [`OnnxNet::forward`] returns the raw embedding (`[B, 512]` for ArcFace recognizers); L2
//! normalisation is the caller's ([`l2_normalize`]).

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::onnx_proto::{self, Attribute, Model, Node, OnnxTensor, TensorData};

/// The operators [`OnnxNet`] runs.
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "PRelu",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Flatten",
    "Reshape",
    "Gemm",
    "MatMul",
    "Transpose",
    "Identity",
    "Dropout",
    "Constant",
];

/// A recognizer graph ready to run in libtorch.
pub struct OnnxNet {
    source: String,
    nodes: Vec<Node>,
    consts: HashMap<String, Tensor>,
    input_name: String,
    output_name: String,
    /// `[C, H, W]` of the graph input when the file fixes them.
    input_chw: Option<[i64; 3]>,
    device: Device,
    /// The float kind the graph runs in (f32 as ONNX stores it; f64 for finite-difference checks).
    kind: Kind,
    /// Inputs and 4-D weights in NHWC strides (see [`OnnxNet::channels_last`]).
    channels_last: bool,
}

/// The same logical NCHW tensor with NHWC strides (libtorch's `channels_last` memory format,
/// which tch does not expose): permute to NHWC, make that contiguous, permute the view back.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    if t.dim() == 4 {
        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        t.shallow_clone()
    }
}

fn tch_err(source: &str, n: &Node, e: impl std::fmt::Display) -> String {
    format!("{source}: {}: {e}", n.label())
}

/// An ONNX tensor as a tch tensor on `device` (FLOAT → f32, INT → i64).
pub fn onnx_to_tensor(t: &OnnxTensor, device: Device) -> Tensor {
    let x = match &t.data {
        TensorData::F32(v) => Tensor::from_slice(v),
        TensorData::I64(v) => Tensor::from_slice(v),
    };
    x.reshape(t.dims.as_slice()).to_device(device)
}

/// `x / max(‖x‖₂, 1e-12)` per row, as `torch.nn.functional.normalize` (differentiable).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    x / n
}

impl OnnxNet {
    /// Loads `path` (an ONNX recognizer) onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<OnnxNet, String> {
        let model = onnx_proto::load(path)?;
        Self::from_model(&model, &path.display().to_string(), device)
    }

    /// Builds from a decoded model; `source` names it in errors (usually the file path).
    pub fn from_model(model: &Model, source: &str, device: Device) -> Result<OnnxNet, String> {
        let g = &model.graph;
        let _guard = tch::no_grad_guard();
        let mut consts = HashMap::new();
        for t in &g.initializers {
            consts.insert(t.name.clone(), onnx_to_tensor(t, device));
        }
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            if !n.domain.is_empty() && n.domain != "ai.onnx" {
                return Err(format!("{source}: {} is in domain `{}`, which is not supported", n.label(), n.domain));
            }
            if !SUPPORTED_OPS.contains(&n.op_type.as_str()) {
                return Err(format!(
                    "{source}: {} uses operator `{}`, which the libtorch recognizer does not implement (it runs {})",
                    n.label(),
                    n.op_type,
                    SUPPORTED_OPS.join(", ")
                ));
            }
            if n.op_type == "Constant" {
                let t = match n.attributes.get("value") {
                    Some(Attribute::Tensor(t)) => onnx_to_tensor(t, device),
                    Some(Attribute::Float(f)) => {
                        Tensor::from_slice(&[*f]).reshape([0i64; 0].as_slice()).to_device(device)
                    }
                    Some(Attribute::Int(i)) => {
                        Tensor::from_slice(&[*i]).reshape([0i64; 0].as_slice()).to_device(device)
                    }
                    Some(Attribute::Floats(v)) => Tensor::from_slice(v).to_device(device),
                    Some(Attribute::Ints(v)) => Tensor::from_slice(v).to_device(device),
                    _ => return Err(format!("{source}: {} has no `value` tensor this reader decodes", n.label())),
                };
                let out = n.outputs.first().ok_or_else(|| format!("{source}: {} has no output", n.label()))?;
                consts.insert(out.clone(), t);
                continue;
            }
            nodes.push(n.clone());
        }
        let inputs = g.data_inputs();
        let [input] = inputs.as_slice() else {
            return Err(format!(
                "{source}: the graph has {} inputs besides its weights ({}); a recognizer has one image input",
                inputs.len(),
                inputs.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            ));
        };
        let output = g.outputs.first().ok_or_else(|| format!("{source}: the graph declares no output"))?;
        let input_chw = input.shape.as_ref().and_then(|s| match s.as_slice() {
            [_, onnx_proto::Dim::Fixed(c), onnx_proto::Dim::Fixed(h), onnx_proto::Dim::Fixed(w)] => Some([*c, *h, *w]),
            _ => None,
        });
        Ok(OnnxNet {
            source: source.to_string(),
            nodes,
            consts,
            input_name: input.name.clone(),
            output_name: output.name.clone(),
            input_chw,
            device,
            kind: Kind::Float,
            channels_last: false,
        })
    }

    /// The same net computing in `kind` (e.g. `Kind::Double` for finite-difference checks):
    /// float constants are converted, integer ones (shapes) kept.
    pub fn with_kind(mut self, kind: Kind) -> OnnxNet {
        for t in self.consts.values_mut() {
            if t.is_floating_point() {
                *t = t.to_kind(kind);
            }
        }
        self.kind = kind;
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The same net with its 4-D float weights and its input in channels-last (NHWC) strides:
    /// oneDNN's bf16 convolutions run NHWC natively (NCHW inputs are reordered at every layer).
    /// Values are unchanged; only the memory layout (and so the kernels chosen) differs.
    pub fn channels_last(mut self) -> OnnxNet {
        for t in self.consts.values_mut() {
            if t.is_floating_point() && t.dim() == 4 {
                *t = to_channels_last(t);
            }
        }
        self.channels_last = true;
        self
    }

    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    pub fn output_name(&self) -> &str {
        &self.output_name
    }

    /// `[C, H, W]` of the input when the file fixes them (`[3, 112, 112]` for ArcFace).
    pub fn input_chw(&self) -> Option<[i64; 3]> {
        self.input_chw
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `(nodes, nodes with a float weight input)`: how many times a bf16 run rounds (each
    /// node's output, each weight tensor), for error bounds.
    pub fn rounding_counts(&self) -> (usize, usize) {
        let weighted = self
            .nodes
            .iter()
            .filter(|n| n.inputs.iter().skip(1).any(|i| self.consts.get(i).is_some_and(|t| t.is_floating_point())))
            .count();
        (self.nodes.len(), weighted)
    }

    /// The operators the graph runs, in order of first use (for reports).
    pub fn ops(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for n in &self.nodes {
            if !v.contains(&n.op_type) {
                v.push(n.op_type.clone());
            }
        }
        v
    }

    /// Runs the graph on `x` (`[B, C, H, W]`, converted to f32 on the net's device; autograd
    /// follows `x` if it requires grad). Returns the raw (un-normalised) embedding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        if let Some([c, h, w]) = self.input_chw {
            let s = x.size();
            if s.len() != 4 || s[1] != c || s[2] != h || s[3] != w {
                return Err(format!("{}: input has shape {s:?}, the graph expects [B, {c}, {h}, {w}]", self.source));
            }
        }
        let mut vals: HashMap<&str, Tensor> = HashMap::new();
        let x = x.to_device(self.device).to_kind(self.kind);
        let x = if self.channels_last { to_channels_last(&x) } else { x };
        vals.insert(self.input_name.as_str(), x);
        for n in &self.nodes {
            let y = self.run_node(n, &vals)?;
            let out = n.outputs.first().ok_or_else(|| format!("{}: {} has no output", self.source, n.label()))?;
            vals.insert(out.as_str(), y);
        }
        vals.remove(self.output_name.as_str())
            .ok_or_else(|| format!("{}: no node produces the graph output `{}`", self.source, self.output_name))
    }

    /// Multiply-accumulates of one forward pass on `x` (`[B, C, H, W]`): `Conv` = output
    /// elements × (input channels / groups) × kernel area, `Gemm`/`MatMul` = M·N·K; element-wise
    /// nodes are not counted (memory-bound, a few % of the convolutions' work). Runs the graph
    /// once to learn every node's shapes.
    pub fn macs(&self, x: &Tensor) -> Result<u64, String> {
        let _guard = tch::no_grad_guard();
        let mut vals: HashMap<&str, Tensor> = HashMap::new();
        vals.insert(self.input_name.as_str(), x.to_device(self.device).to_kind(self.kind));
        let mut total = 0u64;
        for n in &self.nodes {
            let y = self.run_node(n, &vals)?;
            total += match n.op_type.as_str() {
                "Conv" => {
                    let w = self.get(&vals, n, 1)?.size();
                    y.numel() as u64 * (w[1] * w[2] * w[3]) as u64
                }
                "Gemm" | "MatMul" => {
                    let k = *self.get(&vals, n, 0)?.size().last().unwrap_or(&0);
                    y.numel() as u64 * k as u64
                }
                _ => 0,
            };
            let out = n.outputs.first().ok_or_else(|| format!("{}: {} has no output", self.source, n.label()))?;
            vals.insert(out.as_str(), y);
        }
        Ok(total)
    }

    /// L2-normalised embeddings (`[B, D]`).
    pub fn embed(&self, x: &Tensor) -> Result<Tensor, String> {
        Ok(l2_normalize(&self.forward(x)?))
    }

    /// The VJP of the raw embedding w.r.t. the input: returns `(embedding, ∂⟨emb, cotangent⟩/∂x)`.
    pub fn vjp(&self, x: &Tensor, cotangent: &Tensor) -> Result<(Tensor, Tensor), String> {
        let xg = x.detach().to_device(self.device).to_kind(self.kind).set_requires_grad(true);
        let y = self.forward(&xg)?;
        let s = (&y * cotangent.to_device(y.device()).to_kind(self.kind)).sum(self.kind);
        let g = Tensor::f_run_backward(&[&s], &[&xg], false, false)
            .map_err(|e| format!("{}: backward failed: {e}", self.source))?;
        Ok((y.detach(), g.into_iter().next().unwrap()))
    }

    fn get<'a>(&'a self, vals: &'a HashMap<&str, Tensor>, n: &Node, i: usize) -> Result<&'a Tensor, String> {
        let name = n
            .inputs
            .get(i)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{}: {} lacks input #{i}", self.source, n.label()))?;
        vals.get(name.as_str()).or_else(|| self.consts.get(name)).ok_or_else(|| {
            format!("{}: {} reads `{name}`, which no earlier node or initializer defines", self.source, n.label())
        })
    }

    fn opt<'a>(&'a self, vals: &'a HashMap<&str, Tensor>, n: &Node, i: usize) -> Result<Option<&'a Tensor>, String> {
        match n.inputs.get(i) {
            Some(s) if !s.is_empty() => self.get(vals, n, i).map(Some),
            _ => Ok(None),
        }
    }

    /// An input that must be a constant (initializer or `Constant`), as i64 values.
    fn const_ints(&self, n: &Node, i: usize) -> Result<Vec<i64>, String> {
        let name = n.inputs.get(i).ok_or_else(|| format!("{}: {} lacks input #{i}", self.source, n.label()))?;
        let t = self.consts.get(name).ok_or_else(|| {
            format!(
                "{}: {} needs `{name}` to be a constant (computed shapes are not supported)",
                self.source,
                n.label()
            )
        })?;
        let t = t.to_device(Device::Cpu).to_kind(Kind::Int64).flatten(0, -1);
        Vec::<i64>::try_from(&t).map_err(|e| tch_err(&self.source, n, e))
    }

    fn run_node(&self, n: &Node, vals: &HashMap<&str, Tensor>) -> Result<Tensor, String> {
        let src = &self.source;
        let e = |m: String| format!("{src}: {}: {m}", n.label());
        let x = self.get(vals, n, 0)?;
        let y = match n.op_type.as_str() {
            "Identity" | "Dropout" => x.shallow_clone(),
            "Conv" => {
                let w = self.get(vals, n, 1)?;
                let b = self.opt(vals, n, 2)?;
                if w.dim() != 4 {
                    return Err(e(format!("only 2-D convolutions are supported (weight {:?})", w.size())));
                }
                let strides = n.attr_ints("strides").map(|v| v.to_vec()).unwrap_or(vec![1, 1]);
                let dil = n.attr_ints("dilations").map(|v| v.to_vec()).unwrap_or(vec![1, 1]);
                let group = n.attr_int("group").unwrap_or(1);
                let auto_pad = n.attr_string("auto_pad").unwrap_or_default();
                let pads = match auto_pad.as_str() {
                    "" | "NOTSET" => n.attr_ints("pads").map(|v| v.to_vec()).unwrap_or(vec![0, 0, 0, 0]),
                    "VALID" => vec![0, 0, 0, 0],
                    other => return Err(e(format!("auto_pad={other} is not supported"))),
                };
                if pads.len() != 4 || strides.len() != 2 || dil.len() != 2 {
                    return Err(e(format!("pads {pads:?} / strides {strides:?} / dilations {dil:?} are not 2-D")));
                }
                // ONNX pads: [top, left, bottom, right].
                let (input, pad) = if pads[0] == pads[2] && pads[1] == pads[3] {
                    (x.shallow_clone(), [pads[0], pads[1]])
                } else {
                    (
                        x.f_constant_pad_nd([pads[1], pads[3], pads[0], pads[2]].as_slice())
                            .map_err(|m| e(m.to_string()))?,
                        [0, 0],
                    )
                };
                input
                    .f_conv2d(w, b, strides.as_slice(), pad.as_slice(), dil.as_slice(), group)
                    .map_err(|m| e(m.to_string()))?
            }
            "BatchNormalization" => {
                if n.attr_int("training_mode").unwrap_or(0) != 0 {
                    return Err(e("training_mode=1 is not supported".into()));
                }
                let (s, b, m, v) =
                    (self.get(vals, n, 1)?, self.get(vals, n, 2)?, self.get(vals, n, 3)?, self.get(vals, n, 4)?);
                let eps = n.attr_float("epsilon").unwrap_or(1e-5) as f64;
                x.f_batch_norm(Some(s), Some(b), Some(m), Some(v), false, 0.0, eps, true)
                    .map_err(|m| e(m.to_string()))?
            }
            "PRelu" => {
                let mut slope = self.get(vals, n, 1)?.shallow_clone();
                // A per-channel slope stored flat ([C]) on an NCHW input: numpy broadcasting would
                // align it with W; every exporter that writes it means channels.
                if x.dim() == 4 && slope.dim() == 1 && slope.size()[0] == x.size()[1] && slope.size()[0] != x.size()[3]
                {
                    slope = slope.reshape([-1, 1, 1]);
                }
                x.clamp_min(0.0) + slope * x.clamp_max(0.0)
            }
            "Relu" => x.relu(),
            "Sigmoid" => x.sigmoid(),
            "LeakyRelu" => {
                let a = n.attr_float("alpha").unwrap_or(0.01) as f64;
                x.clamp_min(0.0) + x.clamp_max(0.0) * a
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let b = self.get(vals, n, 1)?;
                let r = match n.op_type.as_str() {
                    "Add" => x.f_add(b),
                    "Sub" => x.f_sub(b),
                    "Mul" => x.f_mul(b),
                    _ => x.f_div(b),
                };
                r.map_err(|m| e(m.to_string()))?
            }
            "Flatten" => {
                let s = x.size();
                let mut axis = n.attr_int("axis").unwrap_or(1);
                if axis < 0 {
                    axis += s.len() as i64;
                }
                let a = axis.clamp(0, s.len() as i64) as usize;
                let outer: i64 = s[..a].iter().product();
                let inner: i64 = s[a..].iter().product();
                x.reshape([outer, inner])
            }
            "Reshape" => {
                let mut shape = self.const_ints(n, 1)?;
                let s = x.size();
                if n.attr_int("allowzero").unwrap_or(0) == 0 {
                    let asked = shape.clone();
                    for (i, d) in shape.iter_mut().enumerate() {
                        if *d == 0 {
                            *d = *s.get(i).ok_or_else(|| {
                                e(format!("shape {asked:?} copies a dimension the input {s:?} lacks"))
                            })?;
                        }
                    }
                }
                x.f_reshape(shape.as_slice()).map_err(|m| e(m.to_string()))?
            }
            "Transpose" => {
                let perm: Vec<i64> = match n.attr_ints("perm") {
                    Some(p) => p.to_vec(),
                    None => (0..x.dim() as i64).rev().collect(),
                };
                x.f_permute(perm.as_slice()).map_err(|m| e(m.to_string()))?
            }
            "MatMul" => x.f_matmul(self.get(vals, n, 1)?).map_err(|m| e(m.to_string()))?,
            "Gemm" => {
                let b = self.get(vals, n, 1)?;
                let c = self.opt(vals, n, 2)?;
                let alpha = n.attr_float("alpha").unwrap_or(1.0) as f64;
                let beta = n.attr_float("beta").unwrap_or(1.0) as f64;
                let a = if n.attr_int("transA").unwrap_or(0) != 0 { x.tr() } else { x.shallow_clone() };
                let b = if n.attr_int("transB").unwrap_or(0) != 0 { b.tr() } else { b.shallow_clone() };
                let mut y = a.f_matmul(&b).map_err(|m| e(m.to_string()))?;
                if alpha != 1.0 {
                    y *= alpha;
                }
                if let Some(c) = c {
                    y = if beta == 1.0 { y + c } else { y + c * beta };
                }
                y
            }
            other => return Err(e(format!("operator `{other}` is not implemented"))),
        };
        Ok(y)
    }
}

/// Cosine similarity per row of two `[B, D]` tensors (differentiable).
pub fn cosine_rows(a: &Tensor, b: &Tensor) -> Tensor {
    (l2_normalize(a) * l2_normalize(b)).sum_dim_intlist([1i64].as_slice(), false, a.kind())
}
