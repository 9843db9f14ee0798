//! CLIP text tower in the transformers `CLIPModel` key layout (`text_model.*`,
//! `text_projection.weight`) and the OpenAI/open_clip layout (`token_embedding.weight`,
//! `transformer.resblocks.N.attn.in_proj_weight`, `text_projection` = W^T …), mapped onto one
//! internal (transformers-named) weight table.
use crate::{ClipError, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// What the tower's shapes and activation come from (config.json's `text_config`).
#[derive(Clone, Debug)]
pub struct TextConfig {
    pub layers: usize,
    pub heads: usize,
    pub eps: f64,
    /// `quick_gelu` (OpenAI CLIP) or `gelu`.
    pub quick_gelu: bool,
}

/// Every tensor of a safetensors file, as f64 (the towers here compute in f64).
fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| ClipError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
    Ok(tensors.into_iter().map(|(k, t)| (k, t.to_kind(Kind::Double))).collect())
}

pub struct TextTower {
    cfg: TextConfig,
    w: HashMap<String, Tensor>,
}

/// `last_hidden_state` (after the final LN), `penultimate` (the hidden state entering the last
/// block, what SD2-style pipelines take) and the projected EOT-pooled embedding.
pub struct TextOutput {
    pub last_hidden_state: Tensor,
    pub penultimate: Tensor,
    pub text_embeds: Tensor,
}

impl TextTower {
    /// Reads `text_model.*` and `text_projection.weight` from a transformers safetensors file.
    pub fn from_hf_safetensors(path: &Path, cfg: TextConfig) -> Result<Self> {
        let w: HashMap<String, Tensor> = read(path)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("text_model.") || k == "text_projection.weight")
            .collect();
        Self::checked(path, cfg, w)
    }

    /// Reads the text half of an OpenAI / open_clip state dict (safetensors). Keys of the text
    /// tower that the map does not know are reported by name.
    pub fn from_open_clip_safetensors(path: &Path, cfg: TextConfig) -> Result<Self> {
        let mut w = HashMap::new();
        let mut unexpected = Vec::new();
        for (k, t) in read(path)? {
            let hf = match k.as_str() {
                "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".to_string(),
                "positional_embedding" => "text_model.embeddings.position_embedding.weight".into(),
                "ln_final.weight" => "text_model.final_layer_norm.weight".into(),
                "ln_final.bias" => "text_model.final_layer_norm.bias".into(),
                // open_clip multiplies x @ P; transformers' Linear stores P^T.
                "text_projection" => {
                    w.insert("text_projection.weight".to_string(), t.tr().contiguous());
                    continue;
                }
                _ => match k.strip_prefix("transformer.resblocks.").and_then(|r| r.split_once('.')) {
                    Some((i, rest)) => {
                        let p = format!("text_model.encoder.layers.{i}");
                        if let Some(wb) = rest.strip_prefix("attn.in_proj_") {
                            // [q; k; v] stacked along dim 0, as nn.MultiheadAttention stores them.
                            for (j, part) in t.chunk(3, 0).into_iter().enumerate() {
                                w.insert(format!("{p}.self_attn.{}_proj.{wb}", ["q", "k", "v"][j]), part);
                            }
                            continue;
                        }
                        let map = [
                            ("attn.out_proj.", "self_attn.out_proj."),
                            ("ln_1.", "layer_norm1."),
                            ("ln_2.", "layer_norm2."),
                            ("mlp.c_fc.", "mlp.fc1."),
                            ("mlp.c_proj.", "mlp.fc2."),
                        ];
                        match map.iter().find_map(|(o, h)| rest.strip_prefix(o).map(|wb| format!("{p}.{h}{wb}"))) {
                            Some(name) => name,
                            None => {
                                unexpected.push(k);
                                continue;
                            }
                        }
                    }
                    // The image tower, logit_scale, attn_mask buffers: not the text tower's.
                    None => continue,
                },
            };
            w.insert(hf, t);
        }
        if !unexpected.is_empty() {
            return Err(ClipError::BadWeights {
                path: path.to_path_buf(),
                what: format!("unexpected text-tower keys {unexpected:?} (not an OpenAI/open_clip CLIP state dict?)"),
            });
        }
        Self::checked(path, cfg, w)
    }

    fn checked(path: &Path, cfg: TextConfig, w: HashMap<String, Tensor>) -> Result<Self> {
        let mut missing = Vec::new();
        let mut need = vec![
            "text_model.embeddings.token_embedding.weight".to_string(),
            "text_model.embeddings.position_embedding.weight".into(),
            "text_model.final_layer_norm.weight".into(),
            "text_model.final_layer_norm.bias".into(),
            "text_projection.weight".into(),
        ];
        for i in 0..cfg.layers {
            for p in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "layer_norm1",
                "layer_norm2",
                "mlp.fc1",
                "mlp.fc2",
            ] {
                need.push(format!("text_model.encoder.layers.{i}.{p}.weight"));
                need.push(format!("text_model.encoder.layers.{i}.{p}.bias"));
            }
        }
        for k in &need {
            if !w.contains_key(k) {
                missing.push(k.clone());
            }
        }
        if !missing.is_empty() {
            return Err(ClipError::BadWeights {
                path: path.to_path_buf(),
                what: format!("missing keys {missing:?} (wrong `layers` in the config, or not a CLIPModel file)"),
            });
        }
        Ok(Self { cfg, w })
    }

    fn lin(&self, x: &Tensor, name: &str) -> Tensor {
        x.linear(&self.w[&format!("{name}.weight")], self.w.get(&format!("{name}.bias")))
    }

    fn ln(&self, x: &Tensor, name: &str) -> Tensor {
        let d = x.size()[2];
        x.layer_norm(
            [d],
            Some(&self.w[&format!("{name}.weight")]),
            Some(&self.w[&format!("{name}.bias")]),
            self.cfg.eps,
            false,
        )
    }

    /// `ids`: [B, L] i64, `eot`: the pooled position per row. Computed in f64.
    pub fn forward(&self, ids: &Tensor, eot: &[usize]) -> TextOutput {
        let (b, l) = ids.size2().expect("[B, L] ids");
        let emb = &self.w["text_model.embeddings.token_embedding.weight"];
        let pos = &self.w["text_model.embeddings.position_embedding.weight"];
        let mut x = emb.index_select(0, &ids.view([-1])).view([b, l, -1]) + pos.narrow(0, 0, l).unsqueeze(0);
        let d = x.size()[2];
        let h = self.cfg.heads as i64;
        let hd = d / h;
        // Causal: position i attends to j <= i (-inf strictly above the diagonal, 0 elsewhere).
        let mask = Tensor::full([l, l], f64::NEG_INFINITY, (Kind::Double, x.device())).triu(1);
        let mut penultimate = x.shallow_clone();
        for i in 0..self.cfg.layers {
            if i + 1 == self.cfg.layers {
                penultimate = x.shallow_clone();
            }
            let p = format!("text_model.encoder.layers.{i}");
            let y = self.ln(&x, &format!("{p}.layer_norm1"));
            let split = |t: Tensor| t.view([b, l, h, hd]).transpose(1, 2);
            let q = split(self.lin(&y, &format!("{p}.self_attn.q_proj"))) * (hd as f64).powf(-0.5);
            let k = split(self.lin(&y, &format!("{p}.self_attn.k_proj")));
            let v = split(self.lin(&y, &format!("{p}.self_attn.v_proj")));
            let a = (q.matmul(&k.transpose(2, 3)) + &mask).softmax(-1, Kind::Double).matmul(&v);
            let a = a.transpose(1, 2).contiguous().view([b, l, d]);
            // Not `+=`: that is in place in tch and `penultimate` shares x's storage.
            x = &x + self.lin(&a, &format!("{p}.self_attn.out_proj"));
            let y = self.lin(&self.ln(&x, &format!("{p}.layer_norm2")), &format!("{p}.mlp.fc1"));
            let y = if self.cfg.quick_gelu { &y * (&y * 1.702).sigmoid() } else { y.gelu("none") };
            x = &x + self.lin(&y, &format!("{p}.mlp.fc2"));
        }
        let last = self.ln(&x, "text_model.final_layer_norm");
        let rows = Tensor::from_slice(&(0..b).collect::<Vec<i64>>());
        let cols = Tensor::from_slice(&eot.iter().map(|&e| e as i64).collect::<Vec<_>>());
        let pooled = last.index(&[Some(rows), Some(cols)]);
        let text_embeds = pooled.linear::<Tensor>(&self.w["text_projection.weight"], None);
        TextOutput { last_hidden_state: last, penultimate, text_embeds }
    }
}
