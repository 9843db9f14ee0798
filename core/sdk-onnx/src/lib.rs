//! The ONNX Runtime half of the SDK: loading `libonnxruntime` at run time, DLPack-shaped views ↔
//! `ort` tensors, and `ort` outputs handed to the host without copying.
//!
//! ONNX Runtime is never linked at build time (`ort`'s `load-dynamic`): a plugin calls
//! [`init_from_env_or`] (or [`init`]) once before any other `ort` API. The library is
//! `libonnxruntime.so.1.32.0` from PyPI's `onnxruntime==1.32.0` wheel in the project venv
//! (`scripts/setup.sh` installs it), named by `ORT_DYLIB_PATH` or found by
//! [`find_onnxruntime_library`].
//!
//! One ONNX Runtime per process: the first successful initialisation wins for every plugin in
//! the process (see [`loaded_library`]).
//!
//! Borrowing rule (as for the tch adapters): [`view_as_ort`] aliases the caller's memory and is
//! valid only during the call that received the view; use [`view_to_ort`] (a copy) for anything
//! kept longer.

use std::ffi::c_void;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::cpu::Element;
use likeness_sdk::{err, CpuTensor, DataType, Device, DeviceType, Result, TensorView};
use ort::value::{
    DynTensor, DynTensorValueType, DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef, Value,
    ValueType, ValueTypeMarker,
};

/// The `ort` crate this SDK is built on.
pub const ORT_CRATE_VERSION: &str = "2.0.0-rc.12";

/// The ONNX Runtime C API version `ort` is compiled for (`api-24` = 1.24): the loaded library
/// must be at least this version (ort refuses older ones).
pub const ONNXRUNTIME_API: &str = "1.24";

/// The ONNX Runtime release the project pins (`onnxruntime==1.32.0` in scripts/requirements.txt).
pub const ONNXRUNTIME_EXPECTED: &str = "1.32.0";

/// The environment variable naming the ONNX Runtime shared library.
pub const ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

static LOADED: OnceLock<PathBuf> = OnceLock::new();
static LOADED_VERSION: OnceLock<Option<String>> = OnceLock::new();

/// Where ONNX Runtime is looked for: `$ORT_DYLIB_PATH` (when it names an existing file), then
/// `$LIKENESS_HOME/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`, then
/// the same under `~/.cache/likeness/venv`.
pub fn find_onnxruntime_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(ORT_DYLIB_PATH).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    likeness_sdk::venv::venv_candidates().into_iter().find_map(|venv| find_in_venv(&venv))
}

/// `<venv>/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*` (the highest
/// versioned name when several match).
fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    for site in likeness_sdk::venv::site_packages(venv)?.iter().rev() {
        let capi = site.join("onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("libonnxruntime.so"))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        // `libonnxruntime.so.1.32.0` sorts after `libonnxruntime.so`; prefer the versioned file.
        libs.sort_by_key(|p| (p.as_os_str().len(), p.clone()));
        if let Some(lib) = libs.pop() {
            return Some(lib);
        }
    }
    None
}

fn not_found_message(detail: &str) -> String {
    format!(
        "ONNX Runtime library not found: {detail}. Set {ORT_DYLIB_PATH} to libonnxruntime.so.{ONNXRUNTIME_EXPECTED}; \
         it is usually in the project venv at $LIKENESS_HOME/venv/lib/python3.11/site-packages/onnxruntime/capi/ \
         (default ~/.cache/likeness/venv/...), installed by scripts/setup.sh (onnxruntime=={ONNXRUNTIME_EXPECTED})"
    )
}

/// Loads ONNX Runtime and commits `ort`'s environment. The library is, in order: `$ORT_DYLIB_PATH`
/// (an error if set to a missing file), `path_hint`, then [`find_onnxruntime_library`].
///
/// Call it before any other `ort` API (otherwise `ort` loads `$ORT_DYLIB_PATH` itself and
/// panics if that fails). Calling it again is a no-op: the first library loaded in a process
/// stays (see [`loaded_library`]).
pub fn init_from_env_or(path_hint: Option<&Path>) -> Result<()> {
    if LOADED.get().is_some() {
        return Ok(());
    }
    let path = match std::env::var_os(ORT_DYLIB_PATH).filter(|p| !p.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(err::io(not_found_message(&format!("{ORT_DYLIB_PATH}={} is not a file", p.display()))));
            }
            p
        }
        None => match path_hint {
            Some(h) if h.is_file() => h.to_path_buf(),
            Some(h) => {
                return Err(err::io(not_found_message(&format!(
                    "{ORT_DYLIB_PATH} is unset and the given path {} is not a file",
                    h.display()
                ))))
            }
            None => find_onnxruntime_library().ok_or_else(|| {
                err::io(not_found_message(&format!("{ORT_DYLIB_PATH} is unset and no project venv holds it")))
            })?,
        },
    };
    let builder = ort::init_from(&path).map_err(|e| {
        err::io(format!(
            "loading ONNX Runtime from {}: {e} (ort {ORT_CRATE_VERSION} needs ONNX Runtime >= {ONNXRUNTIME_API}; \
             the project pins onnxruntime=={ONNXRUNTIME_EXPECTED}, see scripts/requirements.txt)",
            path.display()
        ))
    })?;
    builder.with_name("likeness").commit();
    let _ = LOADED_VERSION.set(library_version(&path));
    let _ = LOADED.set(path);
    Ok(())
}

/// `OrtGetApiBase()->GetVersionString()` of the library at `path` (already loaded by ort, so
/// this only takes another reference to the same handle).
fn library_version(path: &Path) -> Option<String> {
    type GetApiBase = unsafe extern "system" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: the same library ort has just loaded and validated; the version string is a
    // static C string inside it, copied before the handle is released.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let get: libloading::Symbol<GetApiBase> = lib.get(b"OrtGetApiBase\0").ok()?;
        let base = get();
        if base.is_null() {
            return None;
        }
        let s = ((*base).GetVersionString)();
        if s.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
    }
}

/// [`init_from_env_or`] without a hint.
pub fn init() -> Result<()> {
    init_from_env_or(None)
}

/// The ONNX Runtime library this process loaded through [`init_from_env_or`], if any.
pub fn loaded_library() -> Option<&'static Path> {
    LOADED.get().map(PathBuf::as_path)
}

/// The version of the loaded ONNX Runtime (e.g. `"1.32.0"`), for
/// `DescriptorBuilder::onnxruntime(..)`. Asked from the library (`GetVersionString`), else read
/// from its build info (`git-branch=rel-X.Y.Z`) or file name (`libonnxruntime.so.X.Y.Z`);
/// `None` before [`init_from_env_or`] succeeded or when none of them says.
pub fn onnxruntime_version() -> Option<String> {
    let path = LOADED.get()?;
    if let Some(Some(v)) = LOADED_VERSION.get() {
        return Some(v.clone());
    }
    let info = ort::info();
    if let Some(v) = version_from_build_info(info) {
        return Some(v);
    }
    let name = path.file_name()?.to_string_lossy().into_owned();
    let v = name.strip_prefix("libonnxruntime.so.")?;
    (!v.is_empty()).then(|| v.to_string())
}

/// The build stamp for descriptors: the loaded version, else the pinned one.
pub fn onnxruntime_build_stamp() -> String {
    onnxruntime_version().unwrap_or_else(|| ONNXRUNTIME_EXPECTED.to_string())
}

fn version_from_build_info(info: &str) -> Option<String> {
    let rest = &info[info.find("git-branch=rel-")? + "git-branch=rel-".len()..];
    let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    (v.split('.').count() >= 2 && !v.ends_with('.')).then_some(v)
}

/// ABI dtype → ONNX element type.
pub fn element_type_of(dt: DataType) -> Result<TensorElementType> {
    Ok(match dt {
        DataType::F32 => TensorElementType::Float32,
        DataType::F16 => TensorElementType::Float16,
        DataType::BF16 => TensorElementType::Bfloat16,
        DataType::U8 => TensorElementType::Uint8,
        DataType::I64 => TensorElementType::Int64,
        other => return Err(err::input(format!("dtype {} is not supported", other.name()))),
    })
}

/// ONNX element type → ABI dtype.
pub fn dtype_of(t: TensorElementType) -> Result<DataType> {
    Ok(match t {
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Bfloat16 => DataType::BF16,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Int64 => DataType::I64,
        other => return Err(err::input(format!("ONNX element type {other:?} has no ABI dtype"))),
    })
}

fn check_cpu(view: &TensorView, what: &str) -> Result<()> {
    match view.device.device_type {
        DeviceType::Cpu => Ok(()),
        DeviceType::Cuda => Err(err::unsupported(format!(
            "{what}: the view is on {}; the ONNX Runtime adapters handle cpu tensors only for now (use --device cpu)",
            view.device
        ))),
    }
}

fn check_dtype<T: Element>(view: &TensorView, what: &str) -> Result<()> {
    if view.dtype != T::DTYPE {
        return Err(err::input(format!(
            "{what}: the view has dtype {}, expected {}",
            view.dtype.name(),
            T::DTYPE.name()
        )));
    }
    Ok(())
}

/// Copies a view (any strides) into an `ort` tensor the plugin owns.
pub fn view_to_ort(view: &TensorView) -> Result<Tensor<f32>> {
    view_to_ort_typed::<f32>(view)
}

/// [`view_to_ort`] for `f32`, `i64` or `u8` views.
pub fn view_to_ort_typed<T: Element + PrimitiveTensorElementType + Debug>(view: &TensorView) -> Result<Tensor<T>> {
    check_cpu(view, "view_to_ort")?;
    check_dtype::<T>(view, "view_to_ort")?;
    let t = CpuTensor::<T>::from_view(view, "view_to_ort")?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d.max(0) as usize).collect();
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), t.data)
        .map_err(|e| err::internal(format!("view_to_ort: {e}")))?;
    Tensor::from_array(array).map_err(|e| err::internal(format!("view_to_ort: creating the ort tensor: {e}")))
}

/// Wraps a compact row-major CPU view as an `ort` tensor **without copying**.
///
/// # Safety
/// The returned tensor aliases the caller's memory, which is valid only during the call that
/// received `view`: run the session and drop the tensor (and any value borrowing it) before
/// that call returns. The view must describe valid memory (`data`, `shape`, `strides`).
/// ONNX Runtime only reads session inputs, so the memory is not written.
pub unsafe fn view_as_ort(view: &TensorView) -> Result<TensorRef<'_, f32>> {
    view_as_ort_typed::<f32>(view)
}

/// [`view_as_ort`] for `f32`, `i64` or `u8` views.
///
/// # Safety
/// As for [`view_as_ort`].
pub unsafe fn view_as_ort_typed<T: Element + PrimitiveTensorElementType + Debug>(
    view: &TensorView,
) -> Result<TensorRef<'_, T>> {
    check_cpu(view, "view_as_ort")?;
    check_dtype::<T>(view, "view_as_ort")?;
    if !view.is_contiguous() {
        return Err(err::input(format!(
            "view_as_ort: the view (shape {:?}, strides {:?}) is not compact row-major; use view_to_ort, which copies",
            view.shape(),
            view.strides()
        )));
    }
    let shape: Vec<usize> = view.shape().iter().map(|&d| d.max(0) as usize).collect();
    let ptr = view.data_ptr() as *const T;
    let ptr = if view.numel() == 0 || ptr.is_null() {
        if view.numel() != 0 {
            return Err(err::input("view_as_ort: the view's data pointer is null"));
        }
        NonNull::<T>::dangling().as_ptr() as *const T
    } else {
        ptr
    };
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(err::input(format!(
            "view_as_ort: the view's data pointer {ptr:p} is not aligned for {}",
            T::DTYPE.name()
        )));
    }
    // SAFETY: the caller guarantees `numel` elements at `ptr` for the call's duration; the
    // array is compact row-major as checked above.
    let array = ndarray::ArrayViewD::<'_, T>::from_shape_ptr(ndarray::IxDyn(&shape), ptr);
    TensorRef::from_array_view(array).map_err(|e| err::internal(format!("view_as_ort: creating the ort tensor: {e}")))
}

struct OrtOwner {
    /// Keeps ONNX Runtime's buffer alive; moving the box does not move the buffer.
    _value: DynTensor,
    shape: Vec<i64>,
}

/// Hands an `ort` tensor (a session output, a [`Tensor`]) to the host **without copying**: the
/// returned [`ManagedTensor`] points at ONNX Runtime's buffer and its deleter drops the value.
/// f32, f16, bf16, i64 and u8 tensors in CPU-accessible memory; anything else is an error.
pub fn ort_to_managed<Type: ValueTypeMarker + ?Sized>(value: Value<Type>) -> Result<ManagedTensor> {
    let value: DynValue = value.into_dyn();
    let (ty, shape) = match value.dtype() {
        ValueType::Tensor { ty, shape, .. } => (*ty, shape.to_vec()),
        other => return Err(err::input(format!("ort_to_managed: expected a tensor, got {other:?}"))),
    };
    let dtype = dtype_of(ty)?;
    let tensor: DynTensor =
        value.downcast::<DynTensorValueType>().map_err(|e| err::internal(format!("ort_to_managed: {e}")))?;
    if !tensor.memory_info().is_cpu_accessible() {
        return Err(err::unsupported(format!(
            "ort_to_managed: the tensor lives on {:?}; only CPU tensors are handled for now",
            tensor.memory_info().allocation_device()
        )));
    }
    let numel: i64 = shape.iter().product();
    let data = tensor.data_ptr() as *mut c_void;
    let data = if data.is_null() {
        if numel != 0 {
            return Err(err::internal("ort_to_managed: ONNX Runtime returned a null data pointer"));
        }
        // A valid, aligned, never-dereferenced address for an empty tensor.
        NonNull::<u64>::dangling().as_ptr() as *mut c_void
    } else {
        data
    };
    let owner = Box::new(OrtOwner { _value: tensor, shape });
    let view = TensorView {
        data,
        device: Device::CPU,
        ndim: owner.shape.len() as i32,
        dtype,
        shape: owner.shape.as_ptr(),
        strides: std::ptr::null(),
        byte_offset: 0,
        stream: 0,
    };
    Ok(ManagedTensor { view, manager_ctx: Box::into_raw(owner) as *mut c_void, deleter: Some(delete_owner) })
}

unsafe extern "C" fn delete_owner(ctx: *mut c_void) {
    likeness_sdk::guard::guarded_void("sdk-onnx", "ort tensor deleter", || {
        // SAFETY: `ctx` is the `Box<OrtOwner>` leaked by `ort_to_managed`.
        drop(unsafe { Box::from_raw(ctx as *mut OrtOwner) });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_constant_matches_ort() {
        assert_eq!(ONNXRUNTIME_API, format!("1.{}", ort::MINOR_VERSION));
    }

    #[test]
    fn build_info_version_is_parsed() {
        assert_eq!(
            version_from_build_info("ORT Build Info: git-branch=rel-1.32.0, git-commit-id=abc, build type=Release")
                .as_deref(),
            Some("1.32.0")
        );
        assert_eq!(version_from_build_info("ORT Build Info: git-branch=main"), None);
    }
}
