//! Checkpoint reading: a transformers CLIPModel `model.safetensors` (`text_model.*`,
//! `vision_model.*`, `text_projection.weight`, `visual_projection.weight`, `logit_scale`) or an
//! OpenAI / open_clip state dict in safetensors (`token_embedding.weight`,
//! `transformer.resblocks.N.*`, `visual.*`, `text_projection` = P with x @ P, …). Both are mapped
//! onto one table in transformers' names, so the towers have a single code path.
use crate::{ClipError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Which key layout a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Transformers,
    OpenClip,
}

/// Every tensor of a checkpoint in transformers' names, in `kind` on `device`, frozen.
pub struct Weights {
    pub path: PathBuf,
    pub layout: Layout,
    pub map: HashMap<String, Tensor>,
}

fn bad(path: &Path, what: String) -> ClipError {
    ClipError::BadWeights { path: path.to_path_buf(), what }
}

/// The residual-block part of a name, open_clip → transformers.
fn block(rest: &str, p: &str) -> Option<String> {
    const MAP: [(&str, &str); 5] = [
        ("attn.out_proj.", "self_attn.out_proj."),
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    MAP.iter().find_map(|(o, h)| rest.strip_prefix(o).map(|wb| format!("{p}.{h}{wb}")))
}

/// One open_clip tensor → transformers-named tensors (`None`: unknown key).
fn map_open_clip(k: &str, t: Tensor) -> Option<Vec<(String, Tensor)>> {
    let one = |name: &str, t: Tensor| Some(vec![(name.to_string(), t)]);
    match k {
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight", t),
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight", t),
        "ln_final.weight" => return one("text_model.final_layer_norm.weight", t),
        "ln_final.bias" => return one("text_model.final_layer_norm.bias", t),
        // open_clip multiplies x @ P; transformers' Linear stores P^T.
        "text_projection" => return one("text_projection.weight", t.tr().contiguous()),
        "visual.proj" => return one("visual_projection.weight", t.tr().contiguous()),
        "visual.conv1.weight" => return one("vision_model.embeddings.patch_embedding.weight", t),
        "visual.class_embedding" => return one("vision_model.embeddings.class_embedding", t),
        "visual.positional_embedding" => return one("vision_model.embeddings.position_embedding.weight", t),
        "visual.ln_pre.weight" => return one("vision_model.pre_layrnorm.weight", t),
        "visual.ln_pre.bias" => return one("vision_model.pre_layrnorm.bias", t),
        "visual.ln_post.weight" => return one("vision_model.post_layernorm.weight", t),
        "visual.ln_post.bias" => return one("vision_model.post_layernorm.bias", t),
        "logit_scale" => return one("logit_scale", t),
        // A buffer (the causal mask), recomputed here.
        "attn_mask" => return Some(vec![]),
        _ => {}
    }
    let (tower, rest) = if let Some(r) = k.strip_prefix("visual.transformer.resblocks.") {
        ("vision_model", r)
    } else if let Some(r) = k.strip_prefix("transformer.resblocks.") {
        ("text_model", r)
    } else {
        return None;
    };
    let (i, rest) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    let p = format!("{tower}.encoder.layers.{i}");
    if let Some(wb) = rest.strip_prefix("attn.in_proj_") {
        if wb != "weight" && wb != "bias" {
            return None;
        }
        // [q; k; v] stacked along dim 0, as nn.MultiheadAttention stores them.
        let parts = t.chunk(3, 0);
        return Some(
            parts
                .into_iter()
                .zip(["q", "k", "v"])
                .map(|(part, n)| (format!("{p}.self_attn.{n}_proj.{wb}"), part.contiguous()))
                .collect(),
        );
    }
    block(rest, &p).map(|name| vec![(name, t)])
}

/// Whether a transformers key belongs to CLIPModel (every other key is reported).
fn known_hf(k: &str) -> bool {
    k.starts_with("text_model.")
        || k.starts_with("vision_model.")
        || matches!(k, "text_projection.weight" | "visual_projection.weight" | "logit_scale")
}

impl Weights {
    pub fn read(path: &Path, kind: Kind, device: Device) -> Result<Self> {
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| ClipError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
        let hf = tensors.iter().any(|(k, _)| k.starts_with("text_model.") || k.starts_with("vision_model."));
        let oc = tensors.iter().any(|(k, _)| k.starts_with("visual.") || k.starts_with("transformer.resblocks."));
        let layout = match (hf, oc) {
            (true, false) => Layout::Transformers,
            (false, true) => Layout::OpenClip,
            (true, true) => {
                return Err(bad(
                    path,
                    "holds both transformers (`text_model.*`) and open_clip (`visual.*`) keys".into(),
                ))
            }
            (false, false) => {
                let some: Vec<&str> = tensors.iter().take(5).map(|(k, _)| k.as_str()).collect();
                return Err(bad(
                    path,
                    format!("no CLIP keys (neither `text_model.*`/`vision_model.*` nor `visual.*`/`transformer.resblocks.*`); first keys: {some:?}"),
                ));
            }
        };
        let mut map = HashMap::new();
        let mut unexpected = Vec::new();
        for (k, t) in tensors {
            // Frozen: the towers are a metric, never trained here; gradients flow to inputs only.
            let t = t.to_kind(kind).to_device(device).set_requires_grad(false);
            match layout {
                Layout::Transformers => {
                    if known_hf(&k) {
                        map.insert(k, t);
                    } else {
                        unexpected.push(k);
                    }
                }
                Layout::OpenClip => match map_open_clip(&k, t) {
                    Some(v) => map.extend(v),
                    None => unexpected.push(k),
                },
            }
        }
        if !unexpected.is_empty() {
            unexpected.sort();
            return Err(bad(
                path,
                format!("unexpected keys {unexpected:?} (not a plain CLIP checkpoint of the {layout:?} layout?)"),
            ));
        }
        Ok(Weights { path: path.to_path_buf(), layout, map })
    }

    /// Takes the named tensors, checking each one's shape; every missing or mis-shaped tensor
    /// is listed at once.
    pub fn take(&self, need: &[(String, Vec<i64>)], hint: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let (mut missing, mut wrong) = (Vec::new(), Vec::new());
        for (name, shape) in need {
            match self.map.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.size() != *shape => wrong.push(format!("{name}: {:?}, expected {shape:?}", t.size())),
                Some(t) => {
                    out.insert(name.clone(), t.shallow_clone());
                }
            }
        }
        if !missing.is_empty() || !wrong.is_empty() {
            let mut what = Vec::new();
            if !missing.is_empty() {
                what.push(format!("missing keys {missing:?}"));
            }
            if !wrong.is_empty() {
                what.push(format!("wrong shapes [{}]", wrong.join("; ")));
            }
            return Err(bad(&self.path, format!("{} ({hint})", what.join(", "))));
        }
        Ok(out)
    }
}

/// The names and shapes of one pre-LN residual block (transformers names).
pub(crate) fn block_shapes(prefix: &str, width: i64, mlp: i64) -> Vec<(String, Vec<i64>)> {
    let mut v = Vec::new();
    for p in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"] {
        v.push((format!("{prefix}.{p}.weight"), vec![width, width]));
        v.push((format!("{prefix}.{p}.bias"), vec![width]));
    }
    for p in ["layer_norm1", "layer_norm2"] {
        v.push((format!("{prefix}.{p}.weight"), vec![width]));
        v.push((format!("{prefix}.{p}.bias"), vec![width]));
    }
    v.push((format!("{prefix}.mlp.fc1.weight"), vec![mlp, width]));
    v.push((format!("{prefix}.mlp.fc1.bias"), vec![mlp]));
    v.push((format!("{prefix}.mlp.fc2.weight"), vec![width, mlp]));
    v.push((format!("{prefix}.mlp.fc2.bias"), vec![width]));
    v
}

/// The shared pre-LN residual block of both towers (transformers' CLIPEncoderLayer,
/// open_clip's ResidualAttentionBlock): x + attn(ln1 x), then x + mlp(ln2 x).
pub(crate) struct Block<'a> {
    pub w: &'a HashMap<String, Tensor>,
    pub heads: i64,
    pub eps: f64,
    pub quick_gelu: bool,
}

impl Block<'_> {
    fn lin(&self, x: &Tensor, name: &str) -> Tensor {
        x.linear(&self.w[&format!("{name}.weight")], self.w.get(&format!("{name}.bias")))
    }

    pub fn ln(&self, x: &Tensor, name: &str) -> Tensor {
        let d = *x.size().last().expect("rank >= 1");
        x.layer_norm(
            [d],
            Some(&self.w[&format!("{name}.weight")]),
            Some(&self.w[&format!("{name}.bias")]),
            self.eps,
            false,
        )
    }

    /// `x` [B, L, D]; `mask` an additive [L, L] mask (causal for text) or none (image).
    pub fn forward(&self, x: &Tensor, p: &str, mask: Option<&Tensor>) -> Tensor {
        let (b, l, d) = x.size3().expect("[B, L, D]");
        let (h, hd) = (self.heads, d / self.heads);
        let y = self.ln(x, &format!("{p}.layer_norm1"));
        let split = |t: Tensor| t.view([b, l, h, hd]).transpose(1, 2);
        let q = split(self.lin(&y, &format!("{p}.self_attn.q_proj"))) * (hd as f64).powf(-0.5);
        let k = split(self.lin(&y, &format!("{p}.self_attn.k_proj")));
        let v = split(self.lin(&y, &format!("{p}.self_attn.v_proj")));
        let s = q.matmul(&k.transpose(2, 3));
        let s = match mask {
            Some(m) => s + m,
            None => s,
        };
        let a = s.softmax(-1, s.kind()).matmul(&v).transpose(1, 2).contiguous().view([b, l, d]);
        // Not `+=`: that is in place in tch, and callers keep earlier hidden states.
        let x = x + self.lin(&a, &format!("{p}.self_attn.out_proj"));
        let y = self.lin(&self.ln(&x, &format!("{p}.layer_norm2")), &format!("{p}.mlp.fc1"));
        let y = if self.quick_gelu { &y * (&y * 1.702).sigmoid() } else { y.gelu("none") };
        &x + self.lin(&y, &format!("{p}.mlp.fc2"))
    }
}
