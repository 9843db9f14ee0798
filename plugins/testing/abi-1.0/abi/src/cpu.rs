//! A plain CPU tensor (`Vec<T>` + shape): the reference owner behind [`TensorView`] and
//! [`ManagedTensor`].
//!
//! It lives in the ABI crate (not the SDK) because the host needs it too, and the host must
//! not depend on the SDK: cargo unifies features across a workspace, so an SDK built with
//! `torch` for one plugin would drag libtorch into the host binary.

use std::ffi::c_void;

use crate::{DataType, Device, DeviceType, ErrorCode, ManagedTensor, PluginError, TensorView};

fn input_error(msg: String) -> PluginError {
    PluginError::new(ErrorCode::InvalidInput, msg)
}

/// Element types a [`CpuTensor`] can hold.
pub trait Element: Copy + Default + Send + 'static {
    const DTYPE: DataType;
}
impl Element for f32 {
    const DTYPE: DataType = DataType::F32;
}
impl Element for u8 {
    const DTYPE: DataType = DataType::U8;
}
impl Element for i64 {
    const DTYPE: DataType = DataType::I64;
}

/// Row-major CPU tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor<T = f32> {
    pub shape: Vec<i64>,
    pub data: Vec<T>,
}

impl<T: Element> CpuTensor<T> {
    pub fn new(shape: Vec<i64>, data: Vec<T>) -> Self {
        let n: i64 = shape.iter().product();
        assert_eq!(n as usize, data.len(), "CpuTensor: shape {shape:?} does not match {} elements", data.len());
        CpuTensor { shape, data }
    }

    pub fn zeros(shape: Vec<i64>) -> Self {
        let n: i64 = shape.iter().product();
        CpuTensor { shape, data: vec![T::default(); n as usize] }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// A borrowed view of this tensor (valid while `self` is alive and unmoved).
    pub fn view(&self) -> TensorView {
        TensorView {
            data: self.data.as_ptr() as *mut c_void,
            device: Device::CPU,
            ndim: self.shape.len() as i32,
            dtype: T::DTYPE,
            shape: self.shape.as_ptr(),
            strides: std::ptr::null(),
            byte_offset: 0,
            stream: 0,
        }
    }

    /// Copies a view into an owned tensor, honouring strides. Errors name `what` (the input's
    /// name) when the dtype or device is wrong.
    pub fn from_view(view: &TensorView, what: &str) -> Result<Self, PluginError> {
        if view.device.device_type != DeviceType::Cpu {
            return Err(input_error(format!("`{what}` is on {}, expected cpu", view.device)));
        }
        if view.dtype != T::DTYPE {
            return Err(input_error(format!(
                "`{what}` has dtype {}, expected {}",
                view.dtype.name(),
                T::DTYPE.name()
            )));
        }
        // SAFETY: the view is valid for the duration of the call that handed it to us.
        unsafe {
            let shape = view.shape().to_vec();
            let n = view.numel();
            let base = view.data_ptr() as *const T;
            let data = if view.is_contiguous() {
                std::slice::from_raw_parts(base, n).to_vec()
            } else {
                let strides = view.strides().unwrap().to_vec();
                let mut out = Vec::with_capacity(n);
                let mut idx = vec![0i64; shape.len()];
                for _ in 0..n {
                    let off: i64 = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
                    out.push(*base.offset(off as isize));
                    for d in (0..shape.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < shape[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
                out
            };
            Ok(CpuTensor { shape, data })
        }
    }

    /// Moves the tensor behind an owned [`ManagedTensor`] whose deleter frees it.
    pub fn into_managed(self) -> ManagedTensor {
        let boxed = Box::new(self);
        let view = boxed.view();
        ManagedTensor {
            view,
            manager_ctx: Box::into_raw(boxed) as *mut c_void,
            deleter: Some(delete_cpu_tensor::<T>),
        }
    }

    /// Copies an owned tensor (from another plugin, say).
    pub fn from_managed(t: &ManagedTensor, what: &str) -> Result<Self, PluginError> {
        Self::from_view(&t.view, what)
    }
}

unsafe extern "C" fn delete_cpu_tensor<T: Element>(ctx: *mut c_void) {
    // A deleter must never unwind into its caller (it may be the other side of the ABI).
    let r = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the `Box<CpuTensor<T>>` leaked by `into_managed`.
        drop(unsafe { Box::from_raw(ctx as *mut CpuTensor<T>) });
    });
    if r.is_err() {
        eprintln!("likeness-abi: CpuTensor deleter panicked (ignored)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_view_is_gathered_in_logical_order() {
        // A 2x3 tensor viewed transposed (3x2, strides [1, 3]).
        let data: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let shape = [3i64, 2];
        let strides = [1i64, 3];
        let view = TensorView {
            data: data.as_ptr() as *mut c_void,
            device: Device::CPU,
            ndim: 2,
            dtype: DataType::F32,
            shape: shape.as_ptr(),
            strides: strides.as_ptr(),
            byte_offset: 0,
            stream: 0,
        };
        let t = CpuTensor::<f32>::from_view(&view, "x").unwrap();
        assert_eq!(t.data, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn managed_round_trip_and_dtype_error() {
        let t = CpuTensor::new(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]);
        let m = t.clone().into_managed();
        assert_eq!(CpuTensor::<f32>::from_managed(&m, "m").unwrap(), t);
        let e = CpuTensor::<u8>::from_managed(&m, "m").unwrap_err();
        assert!(e.message.contains("`m` has dtype f32, expected u8"), "{}", e.message);
    }
}
