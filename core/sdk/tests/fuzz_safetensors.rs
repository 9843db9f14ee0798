//! Fuzzing the safetensors header reader (`likeness_sdk::st`): random bytes, mutations of valid
//! files and hand-made huge length fields. None may panic, and none may allocate from a
//! length read from the file: the largest single allocation stays within a small multiple of
//! the input (measured by the allocation guard installed below).

use std::collections::{BTreeMap, HashMap};

use likeness_sdk::fuzz::{self, largest_allocation};
use likeness_sdk::st::{self, StTensor};
use proptest::prelude::*;

likeness_sdk::fuzz_test_setup!();

/// What a parse of `len` input bytes may allocate at once: the JSON header's own structures
/// (strings, shape vectors, the tensor map) are a small multiple of its text.
fn bound(len: usize) -> usize {
    16 * len + 16 * 1024
}

/// A valid file: three tensors of different dtypes, metadata.
fn valid_file() -> Vec<u8> {
    use safetensors::{tensor::TensorView, Dtype};
    let a: Vec<u8> = (0..24u8).collect();
    let b: Vec<u8> = (0..6u8).collect();
    let c: Vec<u8> = vec![7; 16];
    let views = vec![
        ("a.weight".to_string(), TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
        ("b".to_string(), TensorView::new(Dtype::U8, vec![6], &b).unwrap()),
        ("c.bias".to_string(), TensorView::new(Dtype::I64, vec![2, 1], &c).unwrap()),
    ];
    let meta: HashMap<String, String> = [("ss_network_dim".to_string(), "4".to_string())].into();
    safetensors::serialize(views, &Some(meta)).unwrap()
}

/// Parses `bytes` as a whole file; the result must agree with the safetensors crate's own
/// reader on whether the file is valid.
fn check(bytes: &[u8]) {
    let (r, largest) = largest_allocation(|| st::parse_header(bytes, bytes.len() as u64));
    assert!(largest <= bound(bytes.len()), "parse_header of {} bytes allocated {largest} bytes at once", bytes.len());
    let Ok(h) = &r else {
        // The crate's own reader overflows `usize` on offsets near 2^64 (a panic in a debug
        // build, which is why `st` no longer calls it): compare only in release.
        if !cfg!(debug_assertions) {
            assert!(
                safetensors::SafeTensors::deserialize(bytes).is_err(),
                "the safetensors crate accepts what we refuse: {r:?}"
            );
        }
        return;
    };
    {
        let theirs = safetensors::SafeTensors::deserialize(bytes)
            .unwrap_or_else(|e| panic!("we accept a file the safetensors crate refuses ({e}): {h:?}"));
        assert_eq!(theirs.len(), h.tensors.len());
        let data = &bytes[h.data_start()..];
        for t in &h.tensors {
            let v = theirs.tensor(&t.name).unwrap();
            assert_eq!(v.data(), &data[t.data_offsets.0..t.data_offsets.1]);
            assert_eq!(v.shape(), &t.shape[..]);
        }
    }
}

/// A file whose 8-byte length is `n` and whose header text is `json`.
fn with_header(n: u64, json: &str, data: &[u8]) -> Vec<u8> {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.extend_from_slice(data);
    b
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check(&bytes);
    }

    #[test]
    fn random_bytes_behind_a_consistent_length(json in proptest::collection::vec(any::<u8>(), 0..300), data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&json);
        b.extend_from_slice(&data);
        check(&b);
    }

    #[test]
    fn mutations_of_a_valid_file(seed in any::<u64>()) {
        check(&fuzz::mutate(&valid_file(), seed));
    }

    #[test]
    fn json_headers_with_random_shapes_and_offsets(
        shape in proptest::collection::vec(prop_oneof![0usize..8, Just(usize::MAX), Just(1usize << 62), Just(1usize << 31)], 0..4),
        s in prop_oneof![0usize..64, Just(usize::MAX - 4)],
        e in prop_oneof![0usize..64, Just(usize::MAX), Just(1usize << 62)],
        dtype in prop_oneof![Just("F32"), Just("BF16"), Just("U8"), Just("I64"), Just("F64"), Just("X9")],
        data_len in 0usize..80,
    ) {
        let json = format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{s},{e}]}}}}"#);
        check(&with_header(json.len() as u64, &json, &vec![1u8; data_len]));
    }
}

#[test]
fn valid_file_parses_and_loads() {
    let bytes = valid_file();
    let h = st::parse_header(&bytes, bytes.len() as u64).unwrap();
    let mut names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(h.tensors.windows(2).all(|w| w[0].data_offsets.1 == w[1].data_offsets.0), "sorted by offset: {h:?}");
    names.sort();
    assert_eq!(names, ["a.weight", "b", "c.bias"]);
    assert_eq!(h.metadata, BTreeMap::from([("ss_network_dim".to_string(), "4".to_string())]));
    let dir = tempfile_dir("valid");
    let p = dir.join("w.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(st::read_header(&p).unwrap(), h);
    let (tensors, meta) = st::load(&p).unwrap();
    assert_eq!(meta, h.metadata);
    assert_eq!(
        tensors[0],
        StTensor {
            name: "a.weight".into(),
            dtype: likeness_sdk::DataType::F32,
            shape: vec![2, 3],
            bytes: (0..24).collect()
        }
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A header length of 2^62 (and other huge values) in a file of a few bytes: an error that says
/// so, with no allocation of that size (the header length is bounded by the file's length
/// before anything is read or allocated).
#[test]
fn huge_header_length_errors_without_allocating() {
    let json = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    for n in fuzz::HUGE {
        let b = with_header(n, json, &[0; 4]);
        let (r, largest) = largest_allocation(|| st::parse_header(&b, b.len() as u64));
        let e = r.unwrap_err();
        assert!(e.contains(&n.to_string()) && e.contains("truncated"), "{e}");
        assert!(largest <= bound(b.len()), "{largest}");
    }
    // The same through a file: read_header reads at most the file.
    let dir = tempfile_dir("huge");
    let p = dir.join("huge.safetensors");
    std::fs::write(&p, with_header(1 << 62, json, &[0; 4])).unwrap();
    let (r, largest) = largest_allocation(|| st::read_header(&p));
    let e = r.unwrap_err().message.to_string();
    assert!(e.contains("huge.safetensors") && e.contains("not a safetensors file"), "{e}");
    assert!(largest <= bound(100), "read_header allocated {largest} bytes at once");
    let (r, largest) = largest_allocation(|| st::load(&p));
    assert!(r.is_err());
    assert!(largest <= bound(100), "load allocated {largest} bytes at once");
    std::fs::remove_dir_all(dir).unwrap();
}

/// 2^62 elements declared by the shape, offsets that overflow, a truncated data section.
#[test]
fn huge_tensor_sizes_and_truncation_are_errors() {
    let cases = [
        (
            r#"{"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]}}"#,
            4,
            "needs more than 2^64 bytes",
        ),
        (
            r#"{"t":{"dtype":"U8","shape":[4611686018427387904],"data_offsets":[0,4611686018427387904]}}"#,
            4,
            "truncated",
        ),
        (r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,18446744073709551615]}}"#, 4, "span"),
        (
            r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[18446744073709551611,18446744073709551615]}}"#,
            4,
            "contiguous",
        ),
        (r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4, "truncated"),
        (r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 9, "trailing bytes"),
    ];
    for (json, data, want) in cases {
        let b = with_header(json.len() as u64, json, &vec![0; data]);
        let (r, largest) = largest_allocation(|| st::parse_header(&b, b.len() as u64));
        let e = r.unwrap_err();
        assert!(e.contains(want), "{json}: {e}");
        assert!(largest <= bound(b.len()), "{json}: {largest}");
        assert!(safetensors::SafeTensors::deserialize(&b).is_err(), "{json}");
    }
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("likeness-fuzz-st-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_guard_sees_a_large_allocation() {
    let (v, largest) = largest_allocation(|| vec![0u8; 1 << 20]);
    assert_eq!(v.len(), 1 << 20);
    assert!(largest >= 1 << 20, "{largest}");
}
