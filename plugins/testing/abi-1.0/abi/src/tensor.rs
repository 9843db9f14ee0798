//! DLPack-shaped tensor views.
//!
//! [`TensorView`] has the fields of DLPack's `DLTensor` (data pointer, device, ndim, dtype,
//! shape, strides, byte offset) plus the CUDA stream the producer used, so converting to and
//! from DLPack, `torch.utils.dlpack` or an ONNX Runtime value is a re-labelling, never a copy.

use std::ffi::c_void;

use abi_stable::{
    std_types::{RStr, RString},
    StableAbi,
};

/// DLPack's `DLDeviceType` subset we use.
#[repr(i32)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    Cpu = 1,
    Cuda = 2,
}

/// DLPack's `DLDevice`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    pub device_type: DeviceType,
    pub device_id: i32,
}

impl Device {
    pub const CPU: Device = Device { device_type: DeviceType::Cpu, device_id: 0 };
    pub const fn cuda(id: i32) -> Device {
        Device { device_type: DeviceType::Cuda, device_id: id }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.device_type {
            DeviceType::Cpu => write!(f, "cpu"),
            DeviceType::Cuda => write!(f, "cuda:{}", self.device_id),
        }
    }
}

/// DLPack's `DLDataType` (`code`, `bits`, `lanes`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataType {
    /// 0 = int, 1 = uint, 2 = float, 4 = bfloat (DLPack's `DLDataTypeCode`).
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

impl DataType {
    pub const F32: DataType = DataType { code: 2, bits: 32, lanes: 1 };
    pub const F16: DataType = DataType { code: 2, bits: 16, lanes: 1 };
    pub const BF16: DataType = DataType { code: 4, bits: 16, lanes: 1 };
    pub const U8: DataType = DataType { code: 1, bits: 8, lanes: 1 };
    pub const I64: DataType = DataType { code: 0, bits: 64, lanes: 1 };

    /// Bytes per element.
    pub fn size(self) -> usize {
        (self.bits as usize * self.lanes as usize).div_ceil(8)
    }

    pub fn name(self) -> &'static str {
        match self {
            DataType::F32 => "f32",
            DataType::F16 => "f16",
            DataType::BF16 => "bf16",
            DataType::U8 => "u8",
            DataType::I64 => "i64",
            _ => "unsupported",
        }
    }
}

/// A **borrowed** tensor: DLPack's `DLTensor` plus the producer's stream.
///
/// Who owns what: the memory behind `data`, `shape` and `strides` belongs to the caller and is
/// valid only for the duration of the call it is passed to. The callee must copy anything it
/// wants to keep. Nobody frees anything through a view.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct TensorView {
    pub data: *mut c_void,
    pub device: Device,
    pub ndim: i32,
    pub dtype: DataType,
    /// `ndim` sizes.
    pub shape: *const i64,
    /// `ndim` strides in elements, or null for compact row-major (as in DLPack).
    pub strides: *const i64,
    pub byte_offset: u64,
    /// `cudaStream_t` the producer enqueued its writes on (0 = legacy default stream / CPU).
    /// A consumer on another stream must wait on it before reading.
    pub stream: usize,
}

// SAFETY: a view is a plain description of memory; the rules above say who may touch it when.
unsafe impl Send for TensorView {}
unsafe impl Sync for TensorView {}

impl TensorView {
    /// The shape as a slice.
    ///
    /// # Safety
    /// `shape` must point to `ndim` valid `i64`s (true for every view built by the SDK or the
    /// engine while the call it was passed to is running).
    pub unsafe fn shape(&self) -> &[i64] {
        if self.ndim == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.shape, self.ndim as usize)
    }

    /// The strides, or `None` for compact row-major.
    ///
    /// # Safety
    /// As for [`TensorView::shape`].
    pub unsafe fn strides(&self) -> Option<&[i64]> {
        if self.strides.is_null() || self.ndim == 0 {
            return None;
        }
        Some(std::slice::from_raw_parts(self.strides, self.ndim as usize))
    }

    /// Number of elements.
    ///
    /// # Safety
    /// As for [`TensorView::shape`].
    pub unsafe fn numel(&self) -> usize {
        self.shape().iter().map(|&d| d.max(0) as usize).product()
    }

    /// Whether the view is compact row-major (strides null or equal to the packed ones).
    ///
    /// # Safety
    /// As for [`TensorView::shape`].
    pub unsafe fn is_contiguous(&self) -> bool {
        match self.strides() {
            None => true,
            Some(st) => {
                let mut expect = 1i64;
                for (d, s) in self.shape().iter().zip(st).rev() {
                    if *d != 1 && *s != expect {
                        return false;
                    }
                    expect *= *d;
                }
                true
            }
        }
    }

    /// First element's address.
    pub fn data_ptr(&self) -> *mut u8 {
        // `byte_offset` is part of DLPack so that views into sub-allocations stay expressible.
        unsafe { (self.data as *mut u8).add(self.byte_offset as usize) }
    }
}

/// A borrowed tensor with a name (`"reference"`, `"target"`, `"pixels"` …).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct NamedView<'a> {
    pub name: RStr<'a>,
    pub view: TensorView,
}

/// An **owned** tensor: DLPack's `DLManagedTensor`.
///
/// Who owns what: the holder owns it. `view.shape`/`view.strides`/`view.data` stay valid until
/// it is dropped; dropping calls `deleter(manager_ctx)` exactly once, which runs in the
/// producer's library (never unloaded) and must not panic (the SDK guards it).
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct ManagedTensor {
    pub view: TensorView,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(manager_ctx: *mut c_void)>,
}

// SAFETY: the producer guarantees the buffer and its deleter may be used from any thread.
unsafe impl Send for ManagedTensor {}

impl Drop for ManagedTensor {
    fn drop(&mut self) {
        if let Some(deleter) = self.deleter.take() {
            // SAFETY: `manager_ctx` came from the producer together with `deleter`.
            unsafe { deleter(self.manager_ctx) }
        }
    }
}

/// An owned tensor with a name.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct NamedTensor {
    pub name: RString,
    pub tensor: ManagedTensor,
}
