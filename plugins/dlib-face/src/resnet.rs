//! dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`, the `anet_type`
//! of dlib's tools/python/src/face_recognition.cpp) read from dlib's file and run in libtorch.
//!
//! dlib serializes a network depth-first (dlib/dnn/core.h: each `add_layer` writes its
//! subnetwork before its own details; `add_tag_layer`/`add_skip_layer` write only a version),
//! so the layers' details appear in the file in forward order, after the loss layer's. Each
//! details record starts with its version string (`con_4`, `affine_`, `relu_`, `max_pool_2`,
//! `avg_pool_2`, `add_prev_`, `fc_2`, `input_rgb_image_sized`), which we locate in order and
//! parse per dlib/dnn/layers.h and input.h; tensors are `int 2, 4×int64 dims, raw LE f32`.
//!
//! The forward pass interprets that sequence as the residual network of face_recognition.cpp:
//! stem `con 7×7/2 → affine → relu → max_pool 3×3/2`, then residual blocks
//! `con → affine → relu → con → affine [→ avg_pool 2×2/2 of the block input] → add_prev → relu`
//! where `add_prev` adds tensors of different sizes over their overlap with zeros elsewhere
//! (dlib's `tt::add`), then `avg_pool` over everything and `fc` (no bias) to 128.

use crate::dat::{self, Reader};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub enum Layer {
    Con { weight: Tensor, bias: Tensor, stride: i64, padding: [i64; 2] },
    Affine { gamma: Tensor, beta: Tensor },
    Relu,
    MaxPool { k: [i64; 2], stride: [i64; 2], padding: [i64; 2] },
    AvgPool { k: [i64; 2], stride: [i64; 2], padding: [i64; 2] },
    AddPrev,
    Fc { weight: Tensor },
}

pub struct FaceNet {
    pub avg_rgb: [f32; 3],
    pub layers: Vec<Layer>,
}

const NAMES: &[&str] =
    &["input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2"];

fn tensor(r: &mut Reader) -> dat::Result<(Vec<i64>, Vec<f32>)> {
    let v = r.i32()?;
    if v != 2 {
        return r.err(format!("unexpected resizable_tensor version {v}"));
    }
    let dims: Vec<i64> = (0..4).map(|_| r.i64()).collect::<dat::Result<_>>()?;
    // A damaged file must give an error, never an overflow or a huge read.
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
        .and_then(|n| n.checked_mul(4));
    let Some(bytes) = n else {
        return r.err(format!("resizable_tensor has impossible dimensions {dims:?}"));
    };
    let b = r.bytes(bytes)?;
    Ok((dims, b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}

/// Finds the next length-prefixed layer name at or after `from`: (name, offset after it).
fn next_name(buf: &[u8], from: usize) -> Option<(&'static str, usize)> {
    let mut i = from;
    while i + 2 < buf.len() {
        if buf[i] == 1 {
            let n = buf[i + 1] as usize;
            for name in NAMES {
                if name.len() == n && buf.get(i + 2..i + 2 + n) == Some(name.as_bytes()) {
                    return Some((name, i + 2 + n));
                }
            }
        }
        i += 1;
    }
    None
}

impl FaceNet {
    pub fn from_bytes(buf: &[u8]) -> dat::Result<Self> {
        let mut pos = 0;
        let mut avg_rgb = None;
        let mut layers = Vec::new();
        while let Some((name, at)) = next_name(buf, pos) {
            let mut r = Reader::new(buf);
            r.pos = at;
            match name {
                "input_rgb_image_sized" => avg_rgb = Some([r.f32()?, r.f32()?, r.f32()?]),
                "con_4" => {
                    let (_, p) = tensor(&mut r)?;
                    let nf = r.i64()?;
                    let (nr, nc) = (r.i64()?, r.i64()?);
                    let (sy, sx) = (r.i64()?, r.i64()?);
                    let (py, px) = (r.i64()?, r.i64()?);
                    if sy != sx {
                        return r.err("anisotropic stride");
                    }
                    let per_input = nf.checked_mul(nr).and_then(|x| x.checked_mul(nc)).filter(|&x| x > 0);
                    let nw = p.len() as i64 - nf;
                    let Some(per_input) = per_input.filter(|&d| nf > 0 && nw > 0 && nw % d == 0) else {
                        return r.err(format!(
                            "con: {} parameters do not fit {nf} filters of {nr}×{nc} plus a bias",
                            p.len()
                        ));
                    };
                    let k = nw / per_input;
                    let weight = Tensor::from_slice(&p[..nw as usize]).reshape([nf, k, nr, nc]);
                    let bias = Tensor::from_slice(&p[nw as usize..]);
                    layers.push(Layer::Con { weight, bias, stride: sy, padding: [py, px] });
                }
                "affine_" => {
                    let (_, p) = tensor(&mut r)?;
                    if p.is_empty() || p.len() % 2 != 0 {
                        return r.err(format!("affine: {} parameters are not gamma and beta of one size", p.len()));
                    }
                    let k = p.len() / 2;
                    layers.push(Layer::Affine {
                        gamma: Tensor::from_slice(&p[..k]).reshape([1, k as i64, 1, 1]),
                        beta: Tensor::from_slice(&p[k..]).reshape([1, k as i64, 1, 1]),
                    });
                }
                "relu_" => layers.push(Layer::Relu),
                "add_prev_" => layers.push(Layer::AddPrev),
                "max_pool_2" | "avg_pool_2" => {
                    let k = [r.i64()?, r.i64()?];
                    let stride = [r.i64()?, r.i64()?];
                    let padding = [r.i64()?, r.i64()?];
                    layers.push(if name == "max_pool_2" {
                        Layer::MaxPool { k, stride, padding }
                    } else {
                        Layer::AvgPool { k, stride, padding }
                    });
                }
                "fc_2" => {
                    let nout = r.i64()?;
                    let nin = r.i64()?;
                    let (_, p) = tensor(&mut r)?;
                    if nin <= 0 || nout <= 0 || nin.checked_mul(nout) != Some(p.len() as i64) {
                        return r.err(format!("fc: {} params for {nin}×{nout} (with a bias?)", p.len()));
                    }
                    layers.push(Layer::Fc { weight: Tensor::from_slice(&p).reshape([nin, nout]) });
                }
                _ => unreachable!(),
            }
            pos = r.pos;
        }
        let Some(avg_rgb) = avg_rgb else {
            return Err(dat::DatError { offset: 0, msg: "no input_rgb_image_sized layer".into() });
        };
        Ok(FaceNet { avg_rgb, layers })
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let b = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_bytes(&b).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The same network with its weights on `device` (forward runs where its input is).
    pub fn to_device(self, device: tch::Device) -> Self {
        let layers = self
            .layers
            .into_iter()
            .map(|l| match l {
                Layer::Con { weight, bias, stride, padding } => {
                    Layer::Con { weight: weight.to_device(device), bias: bias.to_device(device), stride, padding }
                }
                Layer::Affine { gamma, beta } => {
                    Layer::Affine { gamma: gamma.to_device(device), beta: beta.to_device(device) }
                }
                Layer::Fc { weight } => Layer::Fc { weight: weight.to_device(device) },
                other => other,
            })
            .collect();
        FaceNet { avg_rgb: self.avg_rgb, layers }
    }

    /// dlib's input layer: `(pixel − avg) / 256` per channel, from 8-bit RGB HWC chips
    /// (N×H×W×3, values 0..255 as float) to N×3×H×W.
    pub fn normalize(&self, chips_hwc: &Tensor) -> Tensor {
        let avg = Tensor::from_slice(&self.avg_rgb).to_device(chips_hwc.device()).reshape([1, 3, 1, 1]);
        (chips_hwc.permute([0, 3, 1, 2]).to_kind(Kind::Float) - avg) / 256.0
    }

    /// Descriptors (N×128) of normalised N×3×150×150 input.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dev = x.device();
        let mut x = x.shallow_clone();
        let mut block_in: Option<Tensor> = None;
        let mut shortcut: Option<Tensor> = None;
        let mut stem_done = false;
        for l in &self.layers {
            match l {
                Layer::Con { weight, bias, stride, padding } => {
                    if stem_done && block_in.is_none() {
                        block_in = Some(x.shallow_clone());
                    }
                    x = x.conv2d(&weight.to_device(dev), Some(&bias.to_device(dev)), [*stride; 2], *padding, [1, 1], 1);
                }
                Layer::Affine { gamma, beta } => x = &x * gamma.to_device(dev) + beta.to_device(dev),
                Layer::Relu => x = x.relu(),
                Layer::MaxPool { k, stride, padding } => {
                    x = x.max_pool2d(*k, *stride, *padding, [1, 1], false);
                    stem_done = true;
                }
                Layer::AvgPool { k, stride, padding } => {
                    if k[0] == 0 {
                        x = x.mean_dim(&[2i64, 3][..], false, Kind::Float);
                    } else {
                        let inp = block_in.as_ref().expect("avg_pool outside a residual block");
                        shortcut = Some(inp.avg_pool2d(*k, *stride, *padding, false, true, None::<i64>));
                    }
                }
                Layer::AddPrev => {
                    let inp = block_in.take().expect("add_prev outside a residual block");
                    let s = shortcut.take().unwrap_or(inp);
                    x = add_padded(&x, &s);
                }
                Layer::Fc { weight } => x = x.flatten(1, -1).matmul(&weight.to_device(dev)),
            }
        }
        x
    }
}

/// dlib's `tt::add(out, a, b)` for tensors of different sizes: the output has the larger of
/// each dimension and each input contributes where it is defined (zero elsewhere).
pub fn add_padded(a: &Tensor, b: &Tensor) -> Tensor {
    let (sa, sb) = (a.size(), b.size());
    if sa == sb {
        return a + b;
    }
    let pad = |t: &Tensor, s: &[i64], m: &[i64]| t.constant_pad_nd([0, m[3] - s[3], 0, m[2] - s[2], 0, m[1] - s[1]]);
    let m: Vec<i64> = sa.iter().zip(&sb).map(|(x, y)| *x.max(y)).collect();
    pad(a, &sa, &m) + pad(b, &sb, &m)
}
