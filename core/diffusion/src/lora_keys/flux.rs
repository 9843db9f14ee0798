//! Flux.1 module names: the LoRA-targetable Linear layers of diffusers' `FluxTransformer2DModel`
//! (the canonical names), the Black Forest Labs (BFL) names that kohya / sd-scripts,
//! musubi-tuner, ai-toolkit and ComfyUI use (`double_blocks.<i>.img_attn.qkv`, …), and the
//! split / merge of BFL's fused layers.
//!
//! The map is the one of diffusers' `_convert_kohya_flux_lora_to_diffusers` and sd-scripts'
//! `networks/convert_flux_lora.py`:
//! - `double_blocks.<i>.{img,txt}_attn.qkv` is one Linear whose output rows are `[q; k; v]`
//!   (3·d rows, d = the attention width = the row count of `to_q`): it splits into
//!   `attn.to_q/k/v` (img) or `attn.add_q/k/v_proj` (txt) by equal thirds;
//! - `single_blocks.<i>.linear1` is `[q; k; v; mlp]`: 3·d + mlp rows, where d is the hidden size
//!   (the layer's input width, i.e. `down`'s second dimension) and mlp = rows − 3d (= 4d in
//!   every Flux.1: mlp_ratio 4; diffusers hard-codes 3072, 3072, 3072, 12288);
//! - `final_layer.adaLN_modulation.1` is `norm_out.linear` with its two output halves swapped
//!   (BFL: shift, scale; diffusers: scale, shift), diffusers' `swap_scale_shift`.
//!
//! Which direction is exact: splitting copies `down` to every part and slices `up`'s rows, so
//! each part's ΔW rows are bit-for-bit the fused ΔW rows (alpha and rank unchanged). Merging
//! concatenates the downs (rank Σrⱼ) under a block-diagonal `up` — also exact, the off-diagonal
//! blocks are zeros — with alpha rescaled to keep alpha / rank (alpha·R/r); only parts with
//! *different* alpha / r need folding a factor into their `up`, one rounding in the weights'
//! dtype. A split recognises such a block-diagonal `up` and gives back the parts with their own
//! ranks (diffusers' "sparse" case, generalised to unequal ranks).

use super::sd15::LayerKind;
use super::{dotted_with, Component, LoraModule, RawTensor};

/// Flux.1's MLP width over its hidden size: the row count of a `proj_mlp` that a merge must
/// fill with zeros when a LoRA has `to_q/k/v` but no `proj_mlp` in a single block.
pub const MLP_RATIO: usize = 4;

fn idx(s: &str) -> Option<(usize, &str)> {
    let (i, r) = s.split_once('.')?;
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) || (i.len() > 1 && i.starts_with('0')) {
        return None;
    }
    Some((i.parse().ok()?, r))
}

const DOUBLE: &[(&str, &[&str])] = &[
    ("img_attn.qkv", &["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("img_attn.proj", &["attn.to_out.0"]),
    ("img_mlp.0", &["ff.net.0.proj"]),
    ("img_mlp.2", &["ff.net.2"]),
    ("img_mod.lin", &["norm1.linear"]),
    ("txt_attn.qkv", &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("txt_attn.proj", &["attn.to_add_out"]),
    ("txt_mlp.0", &["ff_context.net.0.proj"]),
    ("txt_mlp.2", &["ff_context.net.2"]),
    ("txt_mod.lin", &["norm1_context.linear"]),
];

const SINGLE: &[(&str, &[&str])] = &[
    ("linear1", &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ("linear2", &["proj_out"]),
    ("modulation.lin", &["norm.linear"]),
];

const GLOBAL: &[(&str, &str)] = &[
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
];

/// The layer kind of a LoRA-targetable `FluxTransformer2DModel` module (diffusers path): every
/// Linear (all of Flux's targetable layers are Linear); `None` for norms and unknown names.
pub fn transformer_module(path: &str) -> Option<LayerKind> {
    if GLOBAL.iter().any(|(_, d)| *d == path) {
        return Some(LayerKind::Linear);
    }
    let (table, r) = if let Some(r) = path.strip_prefix("transformer_blocks.") {
        (DOUBLE, r)
    } else {
        (SINGLE, path.strip_prefix("single_transformer_blocks.")?)
    };
    let (_, leaf) = idx(r)?;
    table.iter().any(|(_, parts)| parts.contains(&leaf)).then_some(LayerKind::Linear)
}

/// The layer kind of a LoRA-targetable T5 encoder module (Flux's `text_encoder_2`,
/// `T5EncoderModel`: `encoder.block.<i>.layer.0.SelfAttention.{q,k,v,o}`,
/// `encoder.block.<i>.layer.1.DenseReluDense.{wi_0,wi_1,wo}`).
pub fn t5_module(path: &str) -> Option<LayerKind> {
    let (_, r) = idx(path.strip_prefix("encoder.block.")?)?;
    match r {
        "layer.0.SelfAttention.q"
        | "layer.0.SelfAttention.k"
        | "layer.0.SelfAttention.v"
        | "layer.0.SelfAttention.o"
        | "layer.1.DenseReluDense.wi_0"
        | "layer.1.DenseReluDense.wi_1"
        | "layer.1.DenseReluDense.wo" => Some(LayerKind::Linear),
        _ => None,
    }
}

/// One BFL module and the diffusers modules it stands for (one, or the fused parts in row order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BflModule {
    /// BFL path, e.g. `double_blocks.3.img_attn.qkv`.
    pub bfl: String,
    /// Diffusers paths in the order of the fused rows.
    pub parts: Vec<String>,
    /// `final_layer.adaLN_modulation.1`: the two output halves are swapped (shift/scale order).
    pub swap_halves: bool,
}

/// The diffusers modules of a BFL module path, `None` for anything not LoRA-targetable.
pub fn from_bfl(bfl: &str) -> Option<BflModule> {
    if let Some((_, d)) = GLOBAL.iter().find(|(b, _)| *b == bfl) {
        return Some(BflModule {
            bfl: bfl.to_string(),
            parts: vec![d.to_string()],
            swap_halves: bfl == "final_layer.adaLN_modulation.1",
        });
    }
    let (table, block, r) = if let Some(r) = bfl.strip_prefix("double_blocks.") {
        (DOUBLE, "transformer_blocks", r)
    } else {
        (SINGLE, "single_transformer_blocks", bfl.strip_prefix("single_blocks.")?)
    };
    let (i, leaf) = idx(r)?;
    let (_, parts) = table.iter().find(|(b, _)| *b == leaf)?;
    Some(BflModule {
        bfl: bfl.to_string(),
        parts: parts.iter().map(|p| format!("{block}.{i}.{p}")).collect(),
        swap_halves: false,
    })
}

/// The BFL module a diffusers module belongs to, and its index among the module's parts.
pub fn to_bfl(path: &str) -> Option<(BflModule, usize)> {
    transformer_module(path)?;
    if let Some((b, _)) = GLOBAL.iter().find(|(_, d)| *d == path) {
        return Some((from_bfl(b)?, 0));
    }
    let (table, bfl_block, r) = if let Some(r) = path.strip_prefix("transformer_blocks.") {
        (DOUBLE, "double_blocks", r)
    } else {
        (SINGLE, "single_blocks", path.strip_prefix("single_transformer_blocks.")?)
    };
    let (i, leaf) = idx(r)?;
    let (b, parts) = table.iter().find(|(_, parts)| parts.contains(&leaf))?;
    let at = parts.iter().position(|p| *p == leaf)?;
    Some((from_bfl(&format!("{bfl_block}.{i}.{b}"))?, at))
}

/// Multi-word names of BFL Flux, diffusers' Flux and T5, for turning kohya keys back into
/// dotted paths. Longest first where one is a prefix of another.
const COMPOUNDS: &[&str] = &[
    "single_transformer_blocks",
    "transformer_blocks",
    "double_blocks",
    "single_blocks",
    "img_attn",
    "txt_attn",
    "img_mlp",
    "txt_mlp",
    "img_mod",
    "txt_mod",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "in_layer",
    "out_layer",
    "final_layer",
    "adaLN_modulation",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff_context",
    "norm1_context",
    "proj_mlp",
    "proj_out",
    "norm_out",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "timestep_embedder",
    "guidance_embedder",
    "text_embedder",
    "linear_1",
    "linear_2",
    "wi_0",
    "wi_1",
];

/// `double_blocks_0_img_attn_qkv` → `double_blocks.0.img_attn.qkv` (also diffusers' Flux names
/// and T5's, `encoder_block_0_layer_1_DenseReluDense_wi_0`); the caller validates the result.
pub fn dotted(underscored: &str) -> String {
    dotted_with(underscored, COMPOUNDS)
}

/// The kohya module name of a BFL path (`.` → `_`, as sd-scripts' `lora_name` is built).
pub fn underscored(bfl: &str) -> String {
    bfl.replace('.', "_")
}

/// Row slices `[start, end)` of a fused up tensor with `rows` rows for `b`'s parts, `None`
/// when the rows cannot be the module's (qkv: a multiple of 3; linear1: more than 3·in rows).
pub fn part_rows(b: &BflModule, rows: usize, in_dim: usize) -> Option<Vec<(usize, usize)>> {
    let sizes: Vec<usize> = match b.parts.len() {
        1 => vec![rows],
        3 if rows.is_multiple_of(3) => vec![rows / 3; 3],
        4 if rows > 3 * in_dim => vec![in_dim, in_dim, in_dim, rows - 3 * in_dim],
        _ => return None,
    };
    let mut at = 0;
    Some(
        sizes
            .iter()
            .map(|s| {
                at += s;
                (at - s, at)
            })
            .collect(),
    )
}

/// Values as f64 (exact for every float dtype we read).
fn values(t: &RawTensor) -> Vec<f64> {
    if t.dtype == safetensors::Dtype::F64 {
        return t.data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    }
    t.to_f32().unwrap_or_default().into_iter().map(f64::from).collect()
}

/// Rows `[a, b)` and columns `cols` of a 2-D tensor, copied byte for byte (exact in any dtype).
fn select(t: &RawTensor, rows: (usize, usize), cols: &[usize]) -> RawTensor {
    let (n_cols, es) = (t.shape[1], t.dtype.size());
    let mut data = Vec::with_capacity((rows.1 - rows.0) * cols.len() * es);
    for r in rows.0..rows.1 {
        for &c in cols {
            let at = (r * n_cols + c) * es;
            data.extend_from_slice(&t.data[at..at + es]);
        }
    }
    RawTensor { dtype: t.dtype, shape: vec![rows.1 - rows.0, cols.len()], data }
}

/// The owner part of every column of a fused `up` when it is block-diagonal over `rows` (each
/// column non-zero in exactly one part's rows); `None` when some column feeds several parts,
/// or `up` is all zeros (an untrained LoRA: keep every part).
fn column_owners(up: &RawTensor, rows: &[(usize, usize)]) -> Option<Vec<Option<usize>>> {
    let v = values(up);
    let r = up.shape[1];
    let mut owners = vec![None; r];
    for (c, owner) in owners.iter_mut().enumerate() {
        for (j, &(a, b)) in rows.iter().enumerate() {
            if (a..b).any(|row| v[row * r + c] != 0.0) {
                if owner.is_some() {
                    return None;
                }
                *owner = Some(j);
            }
        }
    }
    owners.iter().any(Option::is_some).then_some(owners)
}

/// Splits a module read under its BFL name into its diffusers modules (see the module doc).
/// `m.path` is the BFL path; the shapes were checked as a Linear LoRA by the reader. `Err`
/// holds the reason the rows do not fit.
pub fn split(m: LoraModule, b: &BflModule) -> Result<Vec<LoraModule>, String> {
    let (rows, r, in_dim) = (m.up.shape[0], m.up.shape[1], m.down.shape[1]);
    let all: Vec<usize> = (0..r).collect();
    if b.parts.len() == 1 {
        let mut up = m.up.clone();
        if b.swap_halves {
            if rows % 2 != 0 {
                return Err(format!("`{}` needs an even row count to swap shift/scale, got {rows}", b.bfl));
            }
            let half = select(&m.up, (rows / 2, rows), &all);
            let first = select(&m.up, (0, rows / 2), &all);
            up.data = [half.data, first.data].concat();
        }
        return Ok(vec![LoraModule { path: b.parts[0].clone(), up, ..m }]);
    }
    let slices = part_rows(b, rows, in_dim).ok_or_else(|| match b.parts.len() {
        3 => format!("`{}` is fused q, k, v: its up has {rows} rows, not a multiple of 3", b.bfl),
        _ => format!(
            "`{}` is fused q, k, v, mlp: its up has {rows} rows, not more than 3 × the input width {in_dim}",
            b.bfl
        ),
    })?;
    let scale = m.alpha / r as f64;
    let mut out = Vec::new();
    match column_owners(&m.up, &slices) {
        Some(owners) => {
            // Block-diagonal: each part keeps only its own rank columns (exact; parts with no
            // columns have ΔW = 0 and are left out), alpha rescaled to keep alpha / rank.
            for (j, (p, &rows)) in b.parts.iter().zip(&slices).enumerate() {
                let cols: Vec<usize> = (0..r).filter(|&c| owners[c] == Some(j)).collect();
                if cols.is_empty() {
                    continue;
                }
                let down_t = select_rows(&m.down, &cols);
                let up = select(&m.up, rows, &cols);
                out.push(LoraModule {
                    component: m.component,
                    path: p.clone(),
                    alpha: scale * cols.len() as f64,
                    down: down_t,
                    up,
                });
            }
        }
        None => {
            for (p, &rows) in b.parts.iter().zip(&slices) {
                out.push(LoraModule {
                    component: m.component,
                    path: p.clone(),
                    down: m.down.clone(),
                    up: select(&m.up, rows, &all),
                    alpha: m.alpha,
                });
            }
        }
    }
    Ok(out)
}

/// Rows `rows` of `down` (`[r, in]`), i.e. the rank components kept.
fn select_rows(down: &RawTensor, rows: &[usize]) -> RawTensor {
    let (n, es) = (down.shape[1], down.dtype.size());
    let mut data = Vec::with_capacity(rows.len() * n * es);
    for &r in rows {
        data.extend_from_slice(&down.data[r * n * es..(r + 1) * n * es]);
    }
    RawTensor { dtype: down.dtype, shape: vec![rows.len(), n], data }
}

/// `t · f` in t's dtype (F64 in f64; others through f32, one rounding).
fn scaled(t: &RawTensor, f: f64) -> RawTensor {
    if f == 1.0 {
        return t.clone();
    }
    if t.dtype == safetensors::Dtype::F64 {
        let data = values(t).iter().flat_map(|x| (x * f).to_le_bytes()).collect();
        return RawTensor { dtype: t.dtype, shape: t.shape.clone(), data };
    }
    let v: Vec<f32> = t.to_f32().unwrap_or_default().iter().map(|x| (*x as f64 * f) as f32).collect();
    RawTensor::from_f32(t.dtype, t.shape.clone(), &v).expect("a float dtype")
}

/// Merges the diffusers modules of one BFL module (`parts[j]` for `b.parts[j]`, `None` where
/// the LoRA has no such module: zero rows) into the BFL module: downs concatenated, `up`
/// block-diagonal (sd-scripts' `convert_to_sd_scripts_cat`), alpha = (alpha / r)·R when every
/// part has the same alpha / r, else each part's scale folded into its `up` and alpha = R.
pub fn merge(parts: &[Option<&LoraModule>], b: &BflModule) -> Result<LoraModule, String> {
    let present: Vec<&LoraModule> = parts.iter().flatten().copied().collect();
    let first = *present.first().ok_or_else(|| format!("`{}`: no parts to merge", b.bfl))?;
    if b.parts.len() == 1 {
        let mut m = split(first.clone(), b)?.remove(0); // the swap is its own inverse
        m.path = b.bfl.clone();
        if b.bfl.starts_with("final_layer.") {
            // diffusers' kohya converter takes final_layer's tensors without their alpha
            // (`assign_remaining_weights`, "TODO: alphas"): fold alpha / r into up and write
            // alpha = r, so every loader applies the same ΔW.
            m.up = scaled(&m.up, m.alpha / m.rank() as f64);
            m.alpha = m.rank() as f64;
        }
        return Ok(m);
    }
    let in_dim = first.down.shape[1];
    for m in &present {
        if m.down.shape.len() != 2 || m.down.shape[1] != in_dim || m.down.dtype != first.down.dtype {
            return Err(format!(
                "`{}` and `{}` share the fused layer `{}` but their downs differ in shape or dtype ({:?} {:?} vs {:?} {:?})",
                first.path, m.path, b.bfl, first.down.shape, first.down.dtype, m.down.shape, m.down.dtype
            ));
        }
        if m.up.dtype != first.up.dtype {
            return Err(format!("`{}` and `{}` (fused as `{}`) have different dtypes", first.path, m.path, b.bfl));
        }
    }
    // Rows of a missing part: q/k/v are as wide as a present q/k/v part (or the input), mlp is
    // MLP_RATIO × the hidden size.
    let qkv_rows = parts.iter().take(3).flatten().map(|m| m.up.shape[0]).next().unwrap_or(in_dim);
    let rows: Vec<usize> = parts
        .iter()
        .enumerate()
        .map(|(j, p)| p.map(|m| m.up.shape[0]).unwrap_or(if j < 3 { qkv_rows } else { MLP_RATIO * in_dim }))
        .collect();
    let ranks: Vec<usize> = parts.iter().map(|p| p.map(|m| m.rank()).unwrap_or(0)).collect();
    let (total_rows, total_r): (usize, usize) = (rows.iter().sum(), ranks.iter().sum());
    let s0 = first.alpha / first.rank() as f64;
    let same = present.iter().all(|m| m.alpha / m.rank() as f64 == s0);
    let es = first.up.dtype.size();
    let mut up = vec![0u8; total_rows * total_r * es];
    let mut down = Vec::new();
    let (mut row0, mut col0) = (0, 0);
    for (j, p) in parts.iter().enumerate() {
        if let Some(m) = p {
            let u = if same { m.up.clone() } else { scaled(&m.up, m.alpha / m.rank() as f64) };
            let r = m.rank();
            for row in 0..rows[j] {
                let dst = ((row0 + row) * total_r + col0) * es;
                up[dst..dst + r * es].copy_from_slice(&u.data[row * r * es..(row + 1) * r * es]);
            }
            down.extend_from_slice(&m.down.data);
        }
        row0 += rows[j];
        col0 += ranks[j];
    }
    Ok(LoraModule {
        component: Component::Transformer,
        path: b.bfl.clone(),
        down: RawTensor { dtype: first.down.dtype, shape: vec![total_r, in_dim], data: down },
        up: RawTensor { dtype: first.up.dtype, shape: vec![total_rows, total_r], data: up },
        alpha: if same { s0 * total_r as f64 } else { total_r as f64 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfl_names_map_both_ways() {
        let b = from_bfl("double_blocks.3.txt_attn.qkv").unwrap();
        assert_eq!(
            b.parts,
            [
                "transformer_blocks.3.attn.add_q_proj",
                "transformer_blocks.3.attn.add_k_proj",
                "transformer_blocks.3.attn.add_v_proj"
            ]
        );
        assert_eq!(to_bfl("transformer_blocks.3.attn.add_k_proj").unwrap(), (b, 1));
        let (b, at) = to_bfl("single_transformer_blocks.37.proj_mlp").unwrap();
        assert_eq!((b.bfl.as_str(), at), ("single_blocks.37.linear1", 3));
        assert_eq!(to_bfl("proj_out").unwrap().0.bfl, "final_layer.linear");
        assert_eq!(to_bfl("single_transformer_blocks.0.proj_out").unwrap().0.bfl, "single_blocks.0.linear2");
        assert!(from_bfl("final_layer.adaLN_modulation.1").unwrap().swap_halves);
        assert_eq!(from_bfl("double_blocks.01.img_attn.qkv"), None);
        assert_eq!(transformer_module("transformer_blocks.0.attn.norm_q"), None);
        assert_eq!(dotted("double_blocks_0_img_mod_lin"), "double_blocks.0.img_mod.lin");
        assert_eq!(dotted("final_layer_adaLN_modulation_1"), "final_layer.adaLN_modulation.1");
        assert_eq!(dotted("guidance_in_out_layer"), "guidance_in.out_layer");
        assert_eq!(
            dotted("encoder_block_2_layer_1_DenseReluDense_wi_0"),
            "encoder.block.2.layer.1.DenseReluDense.wi_0"
        );
        assert_eq!(t5_module("encoder.block.2.layer.1.DenseReluDense.wi_0"), Some(LayerKind::Linear));
    }
}
