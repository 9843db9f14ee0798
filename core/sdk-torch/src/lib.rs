//! The libtorch half of the SDK: DLPack-shaped views ↔ `tch::Tensor` without copying, owned
//! tensors handed to the host, safetensors ↔ tch, and the AdamW the model plugins run.
//!
//! tch has no DLPack import; a view is wrapped with `Tensor::from_blob`, which borrows. Such a
//! tensor must not outlive the call that received the view: use [`view_to_tensor`] (a copy)
//! for anything kept for backward.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::path::Path;

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::{DataType, Device, DeviceType, OptimizerStep, StepReport, TensorView};
use tch::{Kind, Tensor};

use likeness_sdk::st::{self, StTensor};
use likeness_sdk::{err, Result};

/// The libtorch version this SDK was compiled against (from torch-sys's build).
pub const LIBTORCH_VERSION: &str = match option_env!("LIKENESS_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "unknown",
};

pub fn to_tch_device(d: Device) -> Result<tch::Device> {
    match d.device_type {
        DeviceType::Cpu => Ok(tch::Device::Cpu),
        DeviceType::Cuda => {
            if tch::Cuda::is_available() {
                Ok(tch::Device::Cuda(d.device_id.max(0) as usize))
            } else {
                Err(err::unsupported(format!(
                    "device {d} requested but libtorch sees no CUDA device; use --device cpu"
                )))
            }
        }
    }
}

pub fn from_tch_device(d: tch::Device) -> Device {
    match d {
        tch::Device::Cuda(i) => Device::cuda(i as i32),
        _ => Device::CPU,
    }
}

pub fn kind_of(dt: DataType) -> Result<Kind> {
    Ok(match dt {
        DataType::F32 => Kind::Float,
        DataType::F16 => Kind::Half,
        DataType::BF16 => Kind::BFloat16,
        DataType::U8 => Kind::Uint8,
        DataType::I64 => Kind::Int64,
        other => return Err(err::input(format!("dtype {} is not supported", other.name()))),
    })
}

pub fn dtype_of(k: Kind) -> Result<DataType> {
    Ok(match k {
        Kind::Float => DataType::F32,
        Kind::Half => DataType::F16,
        Kind::BFloat16 => DataType::BF16,
        Kind::Uint8 => DataType::U8,
        Kind::Int64 => DataType::I64,
        other => return Err(err::input(format!("tch kind {other:?} has no ABI dtype"))),
    })
}

/// Wraps a view's memory as a tensor **without copying**.
///
/// # Safety
/// The returned tensor aliases borrowed memory: drop it (and every graph that saved it)
/// before the call that received `view` returns.
pub unsafe fn view_as_tensor(view: &TensorView) -> Result<Tensor> {
    let kind = kind_of(view.dtype)?;
    let device = to_tch_device(view.device)?;
    let shape = view.shape().to_vec();
    let strides = match view.strides() {
        Some(s) => s.to_vec(),
        None => {
            let mut s = vec![1i64; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                s[i] = s[i + 1] * shape[i + 1].max(1);
            }
            s
        }
    };
    Ok(Tensor::from_blob(view.data_ptr() as *const u8, &shape, &strides, kind, device))
}

/// Copies a view into a tensor the plugin owns (safe to keep for backward).
pub fn view_to_tensor(view: &TensorView) -> Result<Tensor> {
    // SAFETY: the borrowed alias is dropped at the end of this function, after the copy.
    let alias = unsafe { view_as_tensor(view)? };
    Ok(alias.copy())
}

struct TensorOwner {
    tensor: Tensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// Hands a tensor to the host without copying: the returned [`ManagedTensor`] keeps it alive
/// and its deleter drops it. The tensor is detached from any graph first.
pub fn tensor_to_managed(t: Tensor) -> Result<ManagedTensor> {
    let tensor = t.detach();
    let dtype = dtype_of(tensor.kind())?;
    let owner = Box::new(TensorOwner { shape: tensor.size(), strides: tensor.stride(), tensor });
    let view = TensorView {
        data: owner.tensor.data_ptr(),
        device: from_tch_device(owner.tensor.device()),
        ndim: owner.shape.len() as i32,
        dtype,
        shape: owner.shape.as_ptr(),
        strides: owner.strides.as_ptr(),
        byte_offset: 0,
        stream: 0,
    };
    Ok(ManagedTensor { view, manager_ctx: Box::into_raw(owner) as *mut c_void, deleter: Some(delete_owner) })
}

unsafe extern "C" fn delete_owner(ctx: *mut c_void) {
    likeness_sdk::guard::guarded_void("sdk-torch", "tch tensor deleter", || {
        // SAFETY: `ctx` is the `Box<TensorOwner>` leaked by `tensor_to_managed`.
        drop(unsafe { Box::from_raw(ctx as *mut TensorOwner) });
    });
}

/// A tensor as safetensors bytes (moved to CPU, made contiguous).
pub fn tensor_to_st(name: &str, t: &Tensor) -> Result<StTensor> {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let dtype = dtype_of(t.kind())?;
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.size()];
    t.copy_data_u8(&mut bytes, numel);
    Ok(StTensor { name: name.to_string(), dtype, shape: t.size().iter().map(|&d| d as usize).collect(), bytes })
}

/// A tensor's values as a flat `Vec<f32>` in row-major order, whatever its kind (cast to f32),
/// device (copied to the CPU), layout (a strided view is made contiguous) and autograd state
/// (detached first, so the cast and copy record no graph). This is the one readback every
/// plugin uses for embeddings, gradients and pixels it hands back as a [`CpuTensor`].
///
/// `what` names the tensor for the error message, with its owner, e.g. "metric `clip`:
/// embeddings". Each libtorch call is the fallible `f_` variant: a failure (an undefined tensor,
/// a kind with no f32 cast, a device that cannot be read) is an `Internal` error naming `what`,
/// the tensor's kind, shape and device, not a panic across the plugin boundary.
///
/// [`CpuTensor`]: likeness_sdk::CpuTensor
pub fn tensor_to_vec_f32(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    if !t.defined() {
        return Err(err::internal(format!("{what}: the tensor is undefined (it was never computed), nothing to read")));
    }
    let fail = |e: tch::TchError| {
        err::internal(format!(
            "{what}: reading the {:?} tensor of shape {:?} on {:?} back as f32 failed: {e}",
            t.kind(),
            t.size(),
            t.device()
        ))
    };
    let cpu = t.f_detach().and_then(|d| d.f_to_kind(Kind::Float)).and_then(|d| d.f_to_device(tch::Device::Cpu));
    let cpu = cpu.and_then(|d| d.f_contiguous()).map_err(fail)?;
    let numel = cpu.numel();
    let mut out = vec![0f32; numel];
    cpu.f_copy_data(&mut out, numel).map_err(fail)?;
    Ok(out)
}

/// safetensors bytes as a tensor on `device`.
pub fn st_to_tensor(t: &StTensor, device: tch::Device) -> Result<Tensor> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_data_size(&t.bytes, &shape, kind_of(t.dtype)?).to_device(device))
}

/// Saves named tensors (`save` is atomic).
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let st = tensors.iter().map(|(n, t)| tensor_to_st(n, t)).collect::<Result<Vec<_>>>()?;
    st::save(path, &st, metadata)
}

/// Copies the values stored in `path` into existing tensors, by name. Every tensor must be
/// present with the same shape: a mismatch names the file, the tensor and both shapes.
pub fn load_into(path: &Path, targets: &[(String, Tensor)]) -> Result<BTreeMap<String, String>> {
    let (stored, meta) = st::load(path)?;
    let by_name: BTreeMap<&str, &StTensor> = stored.iter().map(|t| (t.name.as_str(), t)).collect();
    let _guard = tch::no_grad_guard();
    for (name, target) in targets {
        let src = by_name.get(name.as_str()).ok_or_else(|| {
            err::input(format!(
                "{}: tensor `{name}` is missing (the file holds {} tensors)",
                path.display(),
                stored.len()
            ))
        })?;
        let shape: Vec<i64> = src.shape.iter().map(|&d| d as i64).collect();
        if shape != target.size() {
            return Err(err::input(format!(
                "{}: tensor `{name}` has shape {:?}, the model expects {:?}",
                path.display(),
                shape,
                target.size()
            )));
        }
        let value = st_to_tensor(src, target.device())?.to_kind(target.kind());
        let mut target = target.shallow_clone();
        target.copy_(&value);
    }
    Ok(meta)
}

/// AdamW with decoupled weight decay, numerically as `torch.optim.AdamW` (foreach=False):
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)`, after clipping the global gradient
/// norm like `torch.nn.utils.clip_grad_norm_`.
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    /// `params` must be leaf tensors with `requires_grad`.
    pub fn new(params: Vec<(String, Tensor)>) -> Self {
        let exp_avg = params.iter().map(|(_, p)| p.zeros_like().detach()).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| p.zeros_like().detach()).collect();
        AdamW { params, exp_avg, exp_avg_sq }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Global L2 norm of the current gradients.
    pub fn grad_norm(&self) -> f64 {
        let _guard = tch::no_grad_guard();
        let mut total = 0f64;
        for (_, p) in &self.params {
            let g = p.grad();
            if g.defined() {
                total += g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
            }
        }
        total.sqrt()
    }

    pub fn step(&mut self, s: &OptimizerStep) -> Result<StepReport> {
        if s.step == 0 {
            return Err(err::input("optimizer step numbers start at 1"));
        }
        let _guard = tch::no_grad_guard();
        let norm = self.grad_norm();
        if !norm.is_finite() {
            return Err(err::internal(format!("gradient norm is {norm}: the loss diverged (lower the learning rate)")));
        }
        let clip = if s.max_grad_norm > 0.0 { (s.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
        let bc1 = 1.0 - s.beta1.powi(s.step as i32);
        let bc2 = 1.0 - s.beta2.powi(s.step as i32);
        let step_size = s.lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for (i, (_, p)) in self.params.iter_mut().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let g = if clip < 1.0 { &g * clip } else { g };
            let _ = p.g_mul_scalar_(1.0 - s.lr * s.weight_decay);
            let m = &mut self.exp_avg[i];
            let _ = m.g_mul_scalar_(s.beta1);
            let _ = m.g_add_(&(&g * (1.0 - s.beta1)));
            let v = &mut self.exp_avg_sq[i];
            let _ = v.g_mul_scalar_(s.beta2);
            let _ = v.g_add_(&(g.square() * (1.0 - s.beta2)));
            let denom = v.sqrt() / bc2_sqrt + s.eps;
            let _ = p.g_sub_(&(&*m / &denom * step_size));
        }
        Ok(StepReport { grad_norm: norm })
    }

    /// Optimizer state as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.exp_avg[i].shallow_clone()));
            out.push((format!("exp_avg_sq.{name}"), self.exp_avg_sq[i].shallow_clone()));
        }
        out
    }
}

/// Every tensor of a `torch.save` file (`.pt`, `.pth`, `.pth.tar`), read without running its
/// pickle (weights-only: [`likeness_sdk::torch_pickle::load`], dotted names), as CPU tensors.
/// A file that is not a plain checkpoint is an `InvalidInput` error naming the file (and the
/// forbidden `module.name`); one that cannot be read is an `Io` error.
pub fn load_torch_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>> {
    use likeness_sdk::torch_pickle::{self, DType, PickleError};
    let tensors = torch_pickle::load(path).map_err(|e| match e {
        PickleError::Io { .. } => err::io(e.to_string()),
        e => err::input(e.to_string()),
    })?;
    let kind = |d: DType| match d {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    };
    Ok(tensors
        .into_iter()
        .map(|(name, t)| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            (name, Tensor::from_data_size(&t.data, &shape, kind(t.dtype)))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that f32, bf16 (8 significant bits) and f64 all hold exactly, so every readback
    /// below is compared with `==`: a cast or copy that reorders, truncates or misreads an
    /// element shows as an exact mismatch, not as a tolerance question.
    fn exact_values(n: i64) -> Vec<f32> {
        (0..n).map(|i| (i - n / 2) as f32 * 0.25).collect()
    }

    #[test]
    fn reads_a_non_contiguous_view_in_row_major_order() {
        let v = exact_values(6);
        let t = Tensor::from_slice(&v).reshape([2, 3]);
        // The transpose is a strided view of `t` ([3, 2], strides [1, 3]): its row-major order
        // is t's column-major order, which a raw copy of the storage would get wrong.
        let tt = t.transpose(0, 1);
        assert!(!tt.is_contiguous());
        let want = vec![v[0], v[3], v[1], v[4], v[2], v[5]];
        assert_eq!(tensor_to_vec_f32(&tt, "test: transpose").unwrap(), want);
        // A narrowed slice has a storage offset: only its own elements come back.
        assert_eq!(tensor_to_vec_f32(&t.narrow(1, 1, 2), "test: narrow").unwrap(), vec![v[1], v[2], v[4], v[5]]);
    }

    #[test]
    fn casts_bf16_f16_f64_and_reads_graph_tensors() {
        let v = exact_values(8);
        let base = Tensor::from_slice(&v);
        for kind in [Kind::BFloat16, Kind::Half, Kind::Double] {
            let t = base.to_kind(kind);
            assert_eq!(tensor_to_vec_f32(&t, "test: cast").unwrap(), v, "{kind:?}");
        }
        // An f64 value between two f32s rounds to nearest, as a cast does: 1 + 2⁻³⁰ → 1.
        let fine = Tensor::from_slice(&[1.0f64 + 2f64.powi(-30), -3.0]);
        assert_eq!(tensor_to_vec_f32(&fine, "test: f64 rounding").unwrap(), vec![1.0, -3.0]);
        // A tensor in an autograd graph (what a Train embed reads back) is read as a value.
        let leaf = base.to_kind(Kind::Float).set_requires_grad(true);
        let y = &leaf * 2.0;
        assert_eq!(tensor_to_vec_f32(&y, "test: graph").unwrap(), v.iter().map(|x| x * 2.0).collect::<Vec<_>>());
    }

    #[test]
    fn empty_and_scalar_tensors() {
        let empty = Tensor::zeros([0, 4], (Kind::BFloat16, tch::Device::Cpu));
        assert_eq!(tensor_to_vec_f32(&empty, "test: empty").unwrap(), Vec::<f32>::new());
        let scalar = Tensor::from(2.5f64);
        assert_eq!(tensor_to_vec_f32(&scalar, "test: scalar").unwrap(), vec![2.5]);
    }

    #[test]
    fn a_failure_names_what_was_read() {
        let e = tensor_to_vec_f32(&Tensor::new(), "metric `x`: embeddings").unwrap_err();
        assert!(e.message.contains("metric `x`: embeddings") && e.message.contains("undefined"), "{e}");
    }
}
