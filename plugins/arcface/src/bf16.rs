//! The recognizer in bf16 on the CPU: the same ONNX file run by the libtorch interpreter
//! ([`crate::iresnet::OnnxNet`]) with every float weight and activation in bfloat16, in
//! channels-last layout, so that oneDNN picks its AVX512_BF16 / AMX kernels (bf16 products,
//! f32 accumulation inside each convolution). Measured on IResNet-50 (2 cores, batch 32): ORT
//! f32 2.25 s, this path 1.16 s.
//!
//! Only where the CPU has bf16 units ([`cpu_has_bf16`]): elsewhere oneDNN emulates bf16 and
//! is slower than f32, so `precision = "auto"` falls back to ONNX Runtime f32 and an explicit
//! `"bf16"` is a config error. bf16 keeps 8 bits of mantissa (unit roundoff 2⁻⁸ ≈ 3.9e-3), so
//! embeddings differ from the f32 ones by ~1e-4 in cosine: fp32 stays the default (the
//! insightface parity tests are f32 against f32).

use likeness_sdk::{err, Result};
use tch::{Device, Kind, Tensor};

use crate::iresnet::OnnxNet;
use crate::recognizer::{blob_from_crops, l2_normalise};

/// Whether this CPU has native bf16 dot products (AVX512_BF16; AMX-BF16 CPUs have it too).
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Faces per libtorch forward: bounds the activations (IResNet-50's first stage is 64×112×112
/// bf16 = 1.6 MB per face and layer) while keeping the GEMMs large.
const CHUNK: usize = 64;

/// An ArcFace recognizer running in bf16 through libtorch.
pub struct Bf16Recognizer {
    net: OnnxNet,
    pub input_size: usize,
    pub input_mean: f32,
    pub input_std: f32,
}

impl Bf16Recognizer {
    /// Loads `path` (the recognizer the ORT path runs) with `input_size`, `mean`, `std` from
    /// [`crate::recognizer::Recognizer`], so both paths see the same input blob.
    pub fn load(path: &std::path::Path, input_size: usize, mean: f32, std: f32) -> Result<Bf16Recognizer> {
        let net = OnnxNet::load(path, Device::Cpu)
            .map_err(|e| err::input(format!("precision \"bf16\": loading the recognizer in libtorch: {e}")))?
            .with_kind(Kind::BFloat16)
            .channels_last();
        if let Some([c, h, w]) = net.input_chw() {
            if c != 3 || h as usize != input_size || w as usize != input_size {
                return Err(err::input(format!(
                    "{}: graph input [{c}, {h}, {w}] is not [3, {input_size}, {input_size}]",
                    path.display()
                )));
            }
        }
        Ok(Bf16Recognizer { net, input_size, input_mean: mean, input_std: std })
    }

    /// Raw embeddings (f32) of aligned interleaved RGB `u8` crops: the f32 blob of
    /// [`crate::recognizer::Recognizer::features`], rounded to bf16 once, all crops batched.
    pub fn features(&self, crops: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
        let s = self.input_size;
        let mut out = Vec::with_capacity(crops.len());
        for chunk in crops.chunks(CHUNK) {
            let blob = blob_from_crops(chunk, s, self.input_mean, self.input_std)?;
            let x = Tensor::from_slice(&blob).reshape([chunk.len() as i64, 3, s as i64, s as i64]);
            let y =
                tch::no_grad(|| self.net.forward(&x)).map_err(|e| err::internal(format!("bf16 recognizer: {e}")))?;
            let d = y.size().last().copied().unwrap_or(0) as usize;
            let v = likeness_sdk_torch::tensor_to_vec_f32(&y, "bf16 recognizer output")?;
            if d == 0 || v.len() != d * chunk.len() {
                return Err(err::internal(format!(
                    "bf16 recognizer output has {} values for {} faces",
                    v.len(),
                    chunk.len()
                )));
            }
            out.extend(v.chunks_exact(d).map(|c| c.to_vec()));
        }
        Ok(out)
    }

    /// [`Self::features`], each row L2-normalised (in f64, as the ORT path).
    pub fn embed(&self, crops: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
        let mut f = self.features(crops)?;
        for row in &mut f {
            l2_normalise(row);
        }
        Ok(f)
    }
}
