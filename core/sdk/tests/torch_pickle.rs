//! `likeness_sdk::torch_pickle` against files real torch writes (tests/python/make_pickles.py):
//! names, dtypes, shapes and bytes equal `torch.load(f, weights_only=True)` exactly (the reader
//! copies bytes, it computes nothing, so there is no tolerance); malicious pickles are refused
//! without running; mutated checkpoints never panic nor allocate beyond a multiple of their size.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use likeness_sdk::fuzz::{self, largest_allocation};
use likeness_sdk::testing;
use likeness_sdk::torch_pickle::{self, DType, PickleError, PickledTensor};
use proptest::prelude::*;

likeness_sdk::fuzz_test_setup!();

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fixtures, generated once per test binary (torch's import takes seconds).
struct Fixtures {
    _dir: tempfile::TempDir,
    out: PathBuf,
    mtcnn: PathBuf,
}

fn fixtures(test: &str) -> Option<&'static Fixtures> {
    // The outcome is kept, failure included: a failing generator must not rerun for every case.
    static F: OnceLock<Result<Fixtures, String>> = OnceLock::new();
    let python = testing::python_or_skip(test)?;
    let mtcnn = testing::data_path_or_skip(test, "reference/facenet_pytorch-2.6.0/facenet_pytorch/data")?;
    let f = F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new(python)
            .arg(repo().join("tests/python/make_pickles.py"))
            .arg("--out")
            .arg(dir.path())
            .arg("--mtcnn")
            .arg(&mtcnn)
            .output()
            .unwrap();
        if !st.status.success() {
            return Err(format!("make_pickles.py failed:\n{}", String::from_utf8_lossy(&st.stderr)));
        }
        Ok(Fixtures { out: dir.path().to_path_buf(), _dir: dir, mtcnn })
    });
    Some(f.as_ref().unwrap_or_else(|e| panic!("{e}")))
}

fn dtype(d: safetensors::Dtype) -> DType {
    use safetensors::Dtype as S;
    match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// `got` holds exactly the tensors of `expected` (a safetensors file torch wrote).
fn assert_same(got: &[(String, PickledTensor)], expected: &Path) {
    let bytes = std::fs::read(expected).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let mut want = st.names();
    want.sort();
    assert_eq!(names, want, "{}", expected.display());
    for (name, t) in got {
        let e = st.tensor(name).unwrap();
        assert_eq!(t.dtype, dtype(e.dtype()), "{name}");
        assert_eq!(t.shape, e.shape(), "{name}");
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>() * t.dtype.size(), "{name}");
        assert!(t.data == e.data(), "{name}: bytes differ from torch.load");
    }
}

#[test]
fn mtcnn_weights_match_torch_load() {
    let Some(f) = fixtures("mtcnn_weights_match_torch_load") else { return };
    for n in ["pnet", "rnet", "onet"] {
        let path = f.mtcnn.join(format!("{n}.pt"));
        assert!(!std::fs::read(&path).unwrap().starts_with(b"PK"), "{n}.pt is expected in the legacy format");
        let got = torch_pickle::load(&path).unwrap();
        assert!(got.len() >= 10, "{n}: {} tensors", got.len());
        assert_same(&got, &f.out.join(format!("{n}.expected.safetensors")));
        // A plain state_dict: load_state_dict sees the same tensors.
        assert_eq!(torch_pickle::load_state_dict(&path).unwrap().len(), got.len());
    }
}

#[test]
fn torch_save_both_formats_match_torch_load() {
    let Some(f) = fixtures("torch_save_both_formats_match_torch_load") else { return };
    for fmt in ["zip", "legacy"] {
        for (name, ext) in [
            ("dtypes", "pt"),
            ("module", "pt"),
            ("torchreid", "pth.tar"),
            ("tiny", "pt"),
            ("proto3", "pt"),
            ("proto4", "pt"),
            ("proto5", "pt"),
        ] {
            let path = f.out.join(format!("{name}_{fmt}.{ext}"));
            assert_eq!(std::fs::read(&path).unwrap().starts_with(b"PK"), fmt == "zip", "{}", path.display());
            let got = torch_pickle::load(&path).unwrap();
            assert_same(&got, &f.out.join(format!("{name}_{fmt}.expected.safetensors")));
        }
        let dt = torch_pickle::load(&f.out.join(format!("dtypes_{fmt}.pt"))).unwrap();
        let get = |n: &str| &dt.iter().find(|(k, _)| k == n).unwrap().1;
        assert_eq!(get("transposed").shape, [6, 4]);
        assert_eq!(get("scalar").shape, Vec::<usize>::new());
        assert_eq!(get("empty").shape, [0, 4]);
        assert!(get("empty").data.is_empty());
        // The strided slice base[1:3, 2:5] of arange(24).reshape(4, 6).
        let slice: Vec<f32> = get("slice").data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(slice, [8.0, 9.0, 10.0, 14.0, 15.0, 16.0]);

        let path = f.out.join(format!("torchreid_{fmt}.pth.tar"));
        let all = torch_pickle::load(&path).unwrap();
        assert!(all.iter().any(|(n, _)| n == "state_dict.module.conv1.weight"));
        assert!(all.iter().any(|(n, _)| n.starts_with("optimizer.state.0.")), "momentum buffers");
        let sd = torch_pickle::load_state_dict(&path).unwrap();
        assert_same(&sd, &f.out.join("torchreid.state_dict.safetensors"));
    }
}

#[test]
fn malicious_pickles_are_refused_without_running() {
    let Some(f) = fixtures("malicious_pickles_are_refused_without_running") else { return };
    // The payloads are live: plain pickle ran them in the generator.
    assert!(f.out.join("proof/pwned_system").exists() && f.out.join("proof/pwned_eval").exists());
    for (file, global) in [
        ("evil_system.pkl", "posix.system"),
        ("evil_system_legacy.pt", "posix.system"),
        ("evil_system_zip.pt", "posix.system"),
        ("evil_eval.pkl", "builtins.eval"),
    ] {
        let path = f.out.join(file);
        for r in [torch_pickle::load(&path), torch_pickle::load_state_dict(&path)] {
            let e = r.expect_err(file);
            assert!(matches!(&e, PickleError::ForbiddenGlobal { global: g, .. } if g == global), "{file}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()) && msg.contains(&format!("`{global}`")), "{msg}");
            assert!(msg.contains("state_dict") && msg.contains("safetensors"), "{msg}");
        }
    }
    assert!(!f.out.join("pwned_system").exists() && !f.out.join("pwned_eval").exists(), "a payload ran");
}

#[test]
fn wrong_storage_size_names_the_tensor() {
    let Some(f) = fixtures("wrong_storage_size_names_the_tensor") else { return };
    // tiny_zip.pt with the entry of storage `0` (tensor `w`, 6 f32) shortened by one element.
    let path = f.out.join("short_storage_zip.pt");
    let e = torch_pickle::load(&path).expect_err("short storage");
    let msg = e.to_string();
    assert!(matches!(e, PickleError::Tensor { ref tensor, .. } if tensor == "w"), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("20 bytes") && msg.contains("24"), "{msg}");
}

#[test]
fn shared_references_are_bounded() {
    let Some(f) = fixtures("shared_references_are_bounded") else { return };
    for fmt in ["zip", "legacy"] {
        let path = f.out.join(format!("bomb_{fmt}.pt"));
        let e = torch_pickle::load(&path).expect_err("2^40 names of one tensor");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("repeat"), "{msg}");
    }
}

/// The largest single allocation a parse of `len` bytes may make: the file's own bytes (the
/// tensors copied out of it are at most that), plus the VM's stack/memo vectors, one value
/// (32 bytes) per opcode byte at most, doubled by `Vec` growth.
fn bound(len: usize) -> usize {
    64 * len + 16 * 1024
}

fn fuzz_one(path: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let (r, largest) = largest_allocation(|| {
        let a = torch_pickle::load_bytes(path, bytes);
        let b = torch_pickle::load_state_dict_bytes(path, bytes);
        (a.map(|v| v.len()), b.map(|v| v.len()))
    });
    prop_assert!(largest <= bound(bytes.len()), "{} bytes allocated {largest} at once", bytes.len());
    if let Err(e) = &r.0 {
        prop_assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(400))]
    #[test]
    fn fuzz_mutated_checkpoints(seed in any::<u64>()) {
        let Some(f) = fixtures("fuzz_mutated_checkpoints") else { return Ok(()) };
        for name in ["tiny_zip.pt", "tiny_legacy.pt"] {
            let path = f.out.join(name);
            let valid = std::fs::read(&path).unwrap();
            fuzz_one(&path, &fuzz::mutate(&valid, seed))?;
        }
    }

    #[test]
    fn fuzz_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzz_one(Path::new("random.pt"), &bytes)?;
        let mut zip = b"PK\x03\x04".to_vec();
        zip.extend_from_slice(&bytes);
        fuzz_one(Path::new("random.pt"), &zip)?;
    }
}
