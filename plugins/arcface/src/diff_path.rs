//! The `arcface` metric's differentiable path (`differentiable_backend = "tch"`):
//!
//! 1. the `[0, 1]` float pixels are rounded to the `u8` image insightface would read and the
//!    SCRFD detector (ONNX Runtime) finds the chosen face's 5 landmarks **without gradient**;
//! 2. the similarity matrices come from [`crate::align::estimate_norm`] (constants);
//! 3. the crops are sampled from the **float** pixels ×255 with [`crate::diff_align`]
//!    (`grid_sample`, bilinear, zero border), channels in RGB order — exactly the crops the ORT
//!    recognizer is fed (`Recognizer::features` writes the RGB crop's channels as they are);
//! 4. `(crop − mean) / std` with the recognizer's rule ([`crate::recognizer::normalisation_from_node_names`]:
//!    127.5 / 127.5, or 0 / 1 when the graph normalises itself with `Sub`/`Mul` nodes, which the
//!    interpreter then runs);
//! 5. [`crate::iresnet::OnnxNet`] built from the same recognizer file, L2 normalisation.
//!
//! [`DiffRecognizer::embed_faces`] keeps the tch graph; [`Pending::backward`] is the VJP from
//! `d_embeddings` to `d_pixels`. Rows without a face get a zero embedding and a zero gradient.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::align::Affine;
use crate::diff_align;
use crate::iresnet::{l2_normalize, OnnxNet};

/// The recognizer half of the differentiable path.
pub struct DiffRecognizer {
    pub net: OnnxNet,
    /// Side of the square crop (112 for ArcFace).
    pub input_size: usize,
    pub input_mean: f64,
    pub input_std: f64,
}

impl DiffRecognizer {
    /// Loads `path` (the recognizer ONNX file the ORT path runs) onto `device`, computing in
    /// `kind` (`Kind::Float` normally; `Kind::Double` for finite-difference checks).
    pub fn load(
        path: &Path,
        device: Device,
        kind: Kind,
        input_size: usize,
        mean: f32,
        std: f32,
    ) -> Result<DiffRecognizer, String> {
        let mut net = OnnxNet::load(path, device)?;
        if kind != Kind::Float {
            net = net.with_kind(kind);
        }
        if let Some([c, h, w]) = net.input_chw() {
            if c != 3 || h as usize != input_size || w as usize != input_size {
                return Err(format!(
                    "{}: graph input [{c}, {h}, {w}] is not [3, {input_size}, {input_size}]",
                    path.display()
                ));
            }
        }
        Ok(DiffRecognizer { net, input_size, input_mean: mean as f64, input_std: std as f64 })
    }

    pub fn kind(&self) -> Kind {
        self.net.kind()
    }

    /// The aligned, normalised network input `[N, 3, S, S]` for faces `(image index, matrix)` of
    /// `pixels` (`[B, 3, H, W]` in `[0, 1]`, may require grad).
    pub fn crops(&self, pixels: &Tensor, faces: &[(usize, Affine)]) -> Result<Tensor, String> {
        let s = self.input_size;
        let x = pixels.to_device(self.net.device()).to_kind(self.net.kind()) * 255.0;
        let crops = diff_align::align_faces(&x, faces, s, s)?;
        Ok((crops - self.input_mean) / self.input_std)
    }

    /// L2-normalised embeddings `[N, D]` of the faces (graph kept when `pixels` requires grad).
    pub fn embed_faces(&self, pixels: &Tensor, faces: &[(usize, Affine)]) -> Result<Tensor, String> {
        Ok(l2_normalize(&self.net.forward(&self.crops(pixels, faces)?)?))
    }
}

/// What `backward` needs from the last `embed(Train)`: the pixel leaf, the rows that had a
/// face, and their embeddings with the graph.
pub struct Pending {
    /// `[B, 3, H, W]` f32 leaf (a copy of the borrowed view) with `requires_grad`.
    pub pixels: Tensor,
    /// Batch rows that had a face, in the order of `emb`'s rows.
    pub rows: Vec<i64>,
    /// `[rows.len(), D]` embeddings (graph attached); `None` when no row had a face.
    pub emb: Option<Tensor>,
    /// `D` (the embeddings' width the caller saw).
    pub dim: i64,
}

impl Pending {
    pub fn batch(&self) -> i64 {
        self.pixels.size()[0]
    }

    /// `d_pixels` (`[B, 3, H, W]` f32 on the pixels' device) for `d_emb` (`[B, D]`, any float
    /// kind/device). Consumes the graph.
    pub fn backward(self, d_emb: &Tensor) -> Result<Tensor, String> {
        let expect = vec![self.batch(), self.dim];
        if d_emb.size() != expect {
            return Err(format!("`d_embeddings` must have the embeddings' shape {expect:?}, got {:?}", d_emb.size()));
        }
        let Some(emb) = self.emb else {
            return Ok(self.pixels.zeros_like().detach());
        };
        let kind = emb.kind();
        let idx = Tensor::from_slice(&self.rows).to_device(d_emb.device());
        let g = d_emb.index_select(0, &idx).to_device(emb.device()).to_kind(kind);
        let s = (&emb * g).sum(kind);
        let grads = Tensor::f_run_backward(&[&s], &[&self.pixels], false, false)
            .map_err(|e| format!("backward failed: {e}"))?;
        let dx = grads.into_iter().next().ok_or("backward returned no gradient")?;
        Ok(dx.to_kind(Kind::Float).contiguous())
    }
}
