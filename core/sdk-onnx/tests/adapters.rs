//! Adapter tests against the real ONNX Runtime (`libonnxruntime.so.1.32.0` from the project
//! venv). They need `ORT_DYLIB_PATH` or the venv that scripts/setup.sh creates; without it
//! they print `skipped: <test> needs ONNX Runtime …` under a plain `cargo test` and fail when
//! `CI` is set (`likeness_sdk::testing`). The oracle test also needs `LIKENESS_PYTHON` (the
//! venv's python, with `onnx` and `onnxruntime`):
//!
//! ```text
//! LIKENESS_PYTHON=~/.cache/likeness/venv/bin/python \
//! ORT_DYLIB_PATH=~/.cache/likeness/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0 \
//!   cargo test --release -p likeness-sdk-onnx
//! ```

use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::serde_json::{self, Value as Json};
use likeness_sdk::{CpuTensor, DataType, Device, ErrorCode, TensorView};
use likeness_sdk_onnx::*;
use ort::session::Session;

/// Tolerance against onnxruntime-python on the same model, input and library: both run the
/// same MLAS kernel on the same CPU (threads split a GEMM over rows and columns, never over the
/// 5-term dot product), so the outputs agree exactly on every CPU (measured 0). The bound
/// would even admit another order of the 6 terms (x·w and b, N(0, 1) data: Σ|terms| ≈ 4 for a
/// typical row): √6·u·‖terms‖₂ ≈ 3e-7 (probabilistic; the worst case γ₆·Σ|terms| is 1.4e-6).
const ORACLE_MAX_ABS_ERR: f64 = 1e-6;

/// ONNX Runtime loaded and initialised, or `None` after `skipped: <test> needs ONNX Runtime …`
/// (a panic when `CI` is set). A library that is found but fails to initialise is a failure.
fn ort_or_skip(test: &str) -> Option<()> {
    if find_onnxruntime_library().is_none() {
        return likeness_sdk::testing::skip(
            test,
            &format!(
                "ONNX Runtime (ORT_DYLIB_PATH naming libonnxruntime.so.{ONNXRUNTIME_EXPECTED}, or the venv of \
                 scripts/setup.sh with onnxruntime=={ONNXRUNTIME_EXPECTED})"
            ),
        );
    }
    if let Err(e) = init_from_env_or(None) {
        panic!("initialising ONNX Runtime failed (run scripts/setup.sh?): {e:?}");
    }
    Some(())
}

fn round_trip(view: &TensorView) -> CpuTensor<f32> {
    let t = view_to_ort(view).expect("view_to_ort");
    let data_ptr = t.data_ptr() as *mut c_void;
    let m: ManagedTensor = ort_to_managed(t).expect("ort_to_managed");
    assert_eq!(m.view.data, data_ptr, "ort_to_managed must not copy");
    assert_eq!(m.view.dtype, DataType::F32);
    CpuTensor::<f32>::from_managed(&m, "round trip").expect("from_managed")
}

#[test]
fn round_trip_contiguous() {
    let Some(()) = ort_or_skip("round_trip_contiguous") else { return };
    let t = CpuTensor::new(vec![2, 3, 4], (0..24).map(|x| x as f32 * 0.5 - 3.0).collect());
    assert_eq!(round_trip(&t.view()), t);
}

#[test]
fn round_trip_strided_transposed_view() {
    let Some(()) = ort_or_skip("round_trip_strided_transposed_view") else { return };
    // A 2x3 tensor viewed transposed: 3x2 with strides [1, 3].
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
    let expected = CpuTensor::new(vec![3, 2], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert_eq!(round_trip(&view), expected);
    // The zero-copy path refuses a strided view instead of reading it in the wrong order.
    let e = unsafe { view_as_ort(&view) }.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(e.message.contains("not compact row-major"), "{}", e.message);
}

#[test]
fn view_as_ort_is_zero_copy() {
    let Some(()) = ort_or_skip("view_as_ort_is_zero_copy") else { return };
    let t = CpuTensor::new(vec![2, 3], vec![1.0f32, -2.0, 3.5, 4.0, 0.0, -6.25]);
    let view = t.view();
    let r = unsafe { view_as_ort(&view) }.expect("view_as_ort");
    assert_eq!(r.data_ptr() as *const f32, t.data.as_ptr(), "view_as_ort must alias the view's memory");
    let (shape, data) = r.extract_tensor();
    assert_eq!(&**shape, &[2i64, 3]);
    assert_eq!(data, &t.data[..]);
}

#[test]
fn i64_and_u8_round_trip() {
    let Some(()) = ort_or_skip("i64_and_u8_round_trip") else { return };
    let a = CpuTensor::<i64>::new(vec![2, 2], vec![i64::MIN, -1, 0, i64::MAX]);
    let m = ort_to_managed(view_to_ort_typed::<i64>(&a.view()).unwrap()).unwrap();
    assert_eq!(m.view.dtype, DataType::I64);
    assert_eq!(CpuTensor::<i64>::from_managed(&m, "a").unwrap(), a);
    let b = CpuTensor::<u8>::new(vec![4], vec![0, 1, 128, 255]);
    let m = ort_to_managed(view_to_ort_typed::<u8>(&b.view()).unwrap()).unwrap();
    assert_eq!(m.view.dtype, DataType::U8);
    assert_eq!(CpuTensor::<u8>::from_managed(&m, "b").unwrap(), b);
}

#[test]
fn wrong_dtype_and_cuda_views_are_refused() {
    let Some(()) = ort_or_skip("wrong_dtype_and_cuda_views_are_refused") else { return };
    let t = CpuTensor::<u8>::new(vec![2], vec![1, 2]);
    let e = view_to_ort(&t.view()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(e.message.contains("dtype u8, expected f32"), "{}", e.message);

    let f = CpuTensor::new(vec![2], vec![1.0f32, 2.0]);
    let mut cuda = f.view();
    cuda.device = Device::cuda(0);
    let e = view_to_ort(&cuda).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
    assert!(e.message.contains("cuda:0"), "{}", e.message);
    let e = unsafe { view_as_ort(&cuda) }.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
}

#[test]
fn runtime_version_stamp() {
    let Some(()) = ort_or_skip("runtime_version_stamp") else { return };
    assert!(loaded_library().is_some());
    assert_eq!(onnxruntime_version().as_deref(), Some(ONNXRUNTIME_EXPECTED), "ort::info() = {}", ort::info());
    assert_eq!(onnxruntime_build_stamp(), ONNXRUNTIME_EXPECTED);
}

fn f32_list(j: &Json, key: &str) -> Vec<f32> {
    j[key]
        .as_array()
        .unwrap_or_else(|| panic!("oracle.json: `{key}` missing"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn i64_list(j: &Json, key: &str) -> Vec<i64> {
    j[key]
        .as_array()
        .unwrap_or_else(|| panic!("oracle.json: `{key}` missing"))
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn matches_onnxruntime_python() {
    let Some(()) = ort_or_skip("matches_onnxruntime_python") else { return };
    // The project venv's python, with onnx and onnxruntime.
    let Some(python) = likeness_sdk::testing::python_or_skip("matches_onnxruntime_python") else { return };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/onnx_adapter_oracle.py");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg("--out")
        .arg(dir.path())
        .args(["--seed", "1234", "--batch", "7"])
        .output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", python));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let oracle: Json = serde_json::from_slice(&std::fs::read(dir.path().join("oracle.json")).unwrap()).unwrap();

    let x = CpuTensor::new(i64_list(&oracle, "x_shape"), f32_list(&oracle, "x"));
    let y_expected = CpuTensor::new(i64_list(&oracle, "y_shape"), f32_list(&oracle, "y"));

    let mut session = Session::builder()
        .and_then(|b| Ok(b.with_intra_threads(1)?))
        .and_then(|mut b| b.commit_from_file(dir.path().join("model.onnx")))
        .unwrap_or_else(|e| panic!("loading model.onnx: {e}"));
    let view = x.view();
    // SAFETY: `x` outlives the borrowed tensor, which is dropped with `outputs` in this scope.
    let input = unsafe { view_as_ort(&view) }.expect("view_as_ort");
    let mut outputs = session.run(ort::inputs!["X" => input]).unwrap_or_else(|e| panic!("session.run: {e}"));
    let y = outputs.remove("Y").expect("output Y");
    drop(outputs);
    let managed = ort_to_managed(y).expect("ort_to_managed");
    drop(session); // the output value keeps what it needs alive
    let y_rust = CpuTensor::<f32>::from_managed(&managed, "Y").unwrap();

    assert_eq!(y_rust.shape, y_expected.shape);
    let max_abs_err =
        y_rust.data.iter().zip(&y_expected.data).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0f64, f64::max);
    eprintln!(
        "onnx oracle: Y {:?}, max abs err vs onnxruntime-python {} (onnx {}) = {max_abs_err:e} (tolerance {ORACLE_MAX_ABS_ERR:e})",
        y_rust.shape, oracle["onnxruntime"], oracle["onnx"]
    );
    assert!(max_abs_err <= ORACLE_MAX_ABS_ERR, "max abs err {max_abs_err:e} > {ORACLE_MAX_ABS_ERR:e}");
    // Relu actually clipped something, so the comparison exercises the whole graph.
    assert!(y_expected.data.contains(&0.0) && y_expected.data.iter().any(|&v| v > 0.0));
}
