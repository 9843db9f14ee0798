//! The ArcFace recognizer on ONNX Runtime, as `insightface/model_zoo/arcface_onnx.py`
//! (`ArcFaceONNX`) runs it: input size from the graph, normalisation read from the graph's first
//! nodes, embeddings L2-normalised here (the reference leaves that to the caller).

use std::path::Path;

use likeness_sdk::{err, Result};
use ort::session::Session;
use ort::value::Tensor;

use crate::detector::{build_session_with, shape_of, Provider, SessionOptions};

/// Node names of the first `n` nodes of an ONNX model (`ModelProto.graph.node[..n].name`),
/// read straight from the protobuf wire format.
pub fn first_node_names(model: &[u8], n: usize) -> std::result::Result<Vec<String>, String> {
    let graph = fields(model)?.into_iter().find(|f| f.0 == 7).ok_or("the ONNX file has no graph")?.1;
    let mut names = Vec::new();
    for (num, node) in fields(graph)? {
        if num != 1 {
            continue;
        }
        if names.len() == n {
            break;
        }
        let name = fields(node)?.into_iter().find(|f| f.0 == 3).map(|f| String::from_utf8_lossy(f.1).into_owned());
        names.push(name.unwrap_or_default());
    }
    Ok(names)
}

/// The length-delimited fields `(number, bytes)` of a protobuf message (other wire types skipped).
fn fields(mut b: &[u8]) -> std::result::Result<Vec<(u64, &[u8])>, String> {
    fn varint(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated protobuf varint")?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("bad protobuf varint".into())
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let len = varint(&mut b)? as usize;
                if len > b.len() {
                    return Err("truncated protobuf field".into());
                }
                out.push((key >> 3, &b[..len]));
                len
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        };
        if skip > b.len() {
            return Err("truncated protobuf field".into());
        }
        b = &b[skip..];
    }
    Ok(out)
}

/// `ArcFaceONNX.__init__`'s rule: a `Sub`/`_minus` and a `Mul`/`_mul` node among the first 8
/// (MXNet-converted models normalise in the graph) → mean 0, std 1; otherwise 127.5 / 127.5.
pub fn normalisation_from_node_names(names: &[String]) -> (f32, f32) {
    let sub = names.iter().any(|n| n.starts_with("Sub") || n.starts_with("_minus"));
    let mul = names.iter().any(|n| n.starts_with("Mul") || n.starts_with("_mul"));
    if sub && mul {
        (0.0, 1.0)
    } else {
        (127.5, 127.5)
    }
}

/// An ArcFace recognizer session.
pub struct Recognizer {
    session: Session,
    input_name: String,
    /// Side of the square aligned crop (`input_size[0]` of the reference).
    pub input_size: usize,
    pub input_mean: f32,
    pub input_std: f32,
    /// Embedding dimension (the output's last axis; 0 when dynamic).
    pub dim: usize,
}

impl Recognizer {
    pub fn load(path: &Path, provider: Provider) -> Result<Recognizer> {
        Self::load_with(path, provider, &SessionOptions::default())
    }

    /// [`Self::load`] with session options.
    pub fn load_with(path: &Path, provider: Provider, opts: &SessionOptions) -> Result<Recognizer> {
        let bytes = std::fs::read(path).map_err(|e| err::io(format!("reading {}: {e}", path.display())))?;
        let names = first_node_names(&bytes, 8).map_err(|e| err::input(format!("{}: {e}", path.display())))?;
        drop(bytes);
        let (input_mean, input_std) = normalisation_from_node_names(&names);
        let session = build_session_with(path, provider, opts)?;
        let input = session
            .inputs()
            .first()
            .ok_or_else(|| err::input(format!("{}: the graph has no input", path.display())))?;
        let ishape = shape_of(input.dtype());
        if ishape.len() != 4 || ishape[2] <= 0 || ishape[2] != ishape[3] {
            return Err(err::input(format!(
                "{}: recognizer input shape {ishape:?} is not [N, 3, S, S] with a fixed S",
                path.display()
            )));
        }
        let input_name = input.name().to_string();
        if session.outputs().len() != 1 {
            return Err(err::input(format!(
                "{}: a recognizer has one output, this graph has {}",
                path.display(),
                session.outputs().len()
            )));
        }
        let oshape = shape_of(session.outputs()[0].dtype());
        let dim = oshape.last().copied().filter(|&d| d > 0).unwrap_or(0) as usize;
        Ok(Recognizer { session, input_name, input_size: ishape[3] as usize, input_mean, input_std, dim })
    }

    /// `get_feat` on aligned interleaved RGB `u8` crops (`input_size²·3` each): one batch,
    /// `cv2.dnn.blobFromImages(crops, 1/std, size, mean, swapRB=True)` (the reference's BGR crops
    /// become RGB), raw network outputs (not normalised).
    pub fn features(&mut self, crops: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.input_size;
        let blob = blob_from_crops(crops, s, self.input_mean, self.input_std)?;
        let arr =
            ndarray::Array4::from_shape_vec((crops.len(), 3, s, s), blob).map_err(|e| err::internal(e.to_string()))?;
        let t = Tensor::from_array(arr).map_err(|e| err::internal(format!("recognizer blob: {e}")))?;
        let outs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => t])
            .map_err(|e| err::internal(format!("running the recognizer: {e}")))?;
        let (_, data) =
            outs[0].try_extract_tensor::<f32>().map_err(|e| err::internal(format!("recognizer output: {e}")))?;
        let d = data.len() / crops.len();
        Ok(data.chunks_exact(d).map(|c| c.to_vec()).collect())
    }

    /// [`Self::features`], each row L2-normalised.
    pub fn embed(&mut self, crops: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
        let mut f = self.features(crops)?;
        for row in &mut f {
            l2_normalise(row);
        }
        Ok(f)
    }
}

/// `cv2.dnn.blobFromImages(crops, 1/std, (s, s), mean, swapRB=True)` on interleaved RGB `u8`
/// crops: `[N, 3, s, s]` f32, `(x − mean) / std` (the reference's BGR crops become RGB).
pub fn blob_from_crops(crops: &[Vec<u8>], s: usize, mean: f32, std: f32) -> Result<Vec<f32>> {
    let plane = s * s;
    let mut blob = vec![0f32; crops.len() * 3 * plane];
    let scale = 1.0 / std;
    for (i, c) in crops.iter().enumerate() {
        if c.len() != plane * 3 {
            return Err(err::internal(format!("crop {i} has {} bytes, expected {}", c.len(), plane * 3)));
        }
        let dst = &mut blob[i * 3 * plane..(i + 1) * 3 * plane];
        for p in 0..plane {
            for ch in 0..3 {
                dst[ch * plane + p] = (c[p * 3 + ch] as f32 - mean) * scale;
            }
        }
    }
    Ok(blob)
}

/// Divides by the L2 norm (computed in f64); an all-zero row stays zero.
pub fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if n > 0.0 {
        for x in v.iter_mut() {
            *x = (*x as f64 / n) as f32;
        }
    }
}

/// Cosine similarity of two vectors (f64 accumulation).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(num: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((num << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn node_names_and_normalisation_rule() {
        let node = |name: &str| {
            let mut n = len_field(1, b"in"); // input
            n.extend(len_field(3, name.as_bytes()));
            n.extend(len_field(4, b"Conv")); // op_type
            len_field(1, &n)
        };
        let mut graph = node("_minus0");
        graph.extend(node("_mul1"));
        graph.extend(node("conv0"));
        let mut model = vec![0x08, 0x07]; // ir_version = 7 (a varint field)
        model.extend(len_field(7, &graph));
        let names = first_node_names(&model, 8).unwrap();
        assert_eq!(names, vec!["_minus0", "_mul1", "conv0"]);
        assert_eq!(normalisation_from_node_names(&names), (0.0, 1.0));
        assert_eq!(normalisation_from_node_names(&names[1..]), (127.5, 127.5));
        assert_eq!(normalisation_from_node_names(&["/conv1/Conv".to_string()]), (127.5, 127.5));
        assert_eq!(first_node_names(&model, 2).unwrap().len(), 2);
    }
}
