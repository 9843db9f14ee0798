//! Fuzzing the ONNX protobuf reader (`onnx_proto`): random bytes, mutations of a valid
//! (hand-encoded) model and huge declared lengths and dims. None may panic, and no allocation
//! may follow a length read from the file: the largest single allocation stays within a small
//! multiple of the input (measured by the allocation guard installed below).

use likeness_plugin_arcface::onnx_proto::encode::{field_bytes, field_f32, field_varint, key, varint};
use likeness_plugin_arcface::onnx_proto::{self, Attribute, Dim, TensorData};
use likeness_sdk::fuzz::{self, largest_allocation};
use proptest::prelude::*;

likeness_sdk::fuzz_test_setup!();

/// What decoding `len` bytes may allocate at once: decoded values (an f32 per 4 bytes, an
/// i64 per varint byte, strings) are a small multiple of the input.
fn bound(len: usize) -> usize {
    16 * len + 4096
}

fn tensor(name: &str, dims: &[u64], data_type: u64, data: &[u8], out: &mut Vec<u8>) {
    let mut packed = Vec::new();
    for &d in dims {
        varint(d, &mut packed);
    }
    field_bytes(1, &packed, out);
    field_varint(2, data_type, out);
    field_bytes(8, name.as_bytes(), out);
    field_bytes(9, data, out);
}

fn value_info(name: &str, dims: &[Result<u64, &str>]) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in dims {
        let mut dim = Vec::new();
        match d {
            Ok(v) => field_varint(1, *v, &mut dim),
            Err(p) => field_bytes(2, p.as_bytes(), &mut dim),
        }
        field_bytes(1, &dim, &mut shape);
    }
    let mut tt = Vec::new();
    field_varint(1, 1, &mut tt);
    field_bytes(2, &shape, &mut tt);
    let mut ty = Vec::new();
    field_bytes(1, &tt, &mut ty);
    let mut vi = Vec::new();
    field_bytes(1, name.as_bytes(), &mut vi);
    field_bytes(2, &ty, &mut vi);
    vi
}

/// A valid model: a Conv with int, ints, float and string attributes, a Constant with a
/// tensor attribute, FLOAT (raw and float_data) and INT64 initializers, typed input/output.
fn valid_model() -> Vec<u8> {
    let mut g = Vec::new();
    let mut conv = Vec::new();
    for i in ["x", "w", "b"] {
        field_bytes(1, i.as_bytes(), &mut conv);
    }
    field_bytes(2, b"y", &mut conv);
    field_bytes(3, b"conv0", &mut conv);
    field_bytes(4, b"Conv", &mut conv);
    let mut a = Vec::new();
    field_bytes(1, b"kernel_shape", &mut a);
    let mut ints = Vec::new();
    varint(3, &mut ints);
    varint(3, &mut ints);
    field_bytes(8, &ints, &mut a);
    field_varint(20, 7, &mut a);
    field_bytes(5, &a, &mut conv);
    let mut a = Vec::new();
    field_bytes(1, b"group", &mut a);
    field_varint(3, 1, &mut a);
    field_varint(20, 2, &mut a);
    field_bytes(5, &a, &mut conv);
    let mut a = Vec::new();
    field_bytes(1, b"alpha", &mut a);
    field_f32(2, 0.25, &mut a);
    field_bytes(5, &a, &mut conv);
    let mut a = Vec::new();
    field_bytes(1, b"auto_pad", &mut a);
    field_bytes(4, b"NOTSET", &mut a);
    field_varint(20, 3, &mut a);
    field_bytes(5, &a, &mut conv);
    field_bytes(1, &conv, &mut g);
    let mut c = Vec::new();
    field_bytes(2, b"k", &mut c);
    field_bytes(4, b"Constant", &mut c);
    let mut a = Vec::new();
    field_bytes(1, b"value", &mut a);
    let mut t = Vec::new();
    tensor("", &[2], 7, &[1, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255], &mut t);
    field_bytes(5, &t, &mut a);
    field_varint(20, 4, &mut a);
    field_bytes(5, &a, &mut c);
    field_bytes(1, &c, &mut g);
    field_bytes(2, b"fuzz-graph", &mut g);
    let w: Vec<u8> = (0..2 * 3 * 3 * 3).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
    let mut t = Vec::new();
    tensor("w", &[2, 3, 3, 3], 1, &w, &mut t);
    field_bytes(5, &t, &mut g);
    let mut t = Vec::new();
    field_varint(1, 2, &mut t);
    field_varint(2, 1, &mut t);
    field_f32(4, 0.5, &mut t);
    field_f32(4, -1.5, &mut t);
    field_bytes(8, b"b", &mut t);
    field_bytes(5, &t, &mut g);
    field_bytes(11, &value_info("x", &[Err("N"), Ok(3), Ok(8), Ok(8)]), &mut g);
    field_bytes(12, &value_info("y", &[Err("N"), Ok(2), Ok(6), Ok(6)]), &mut g);
    let mut m = Vec::new();
    field_varint(1, 8, &mut m);
    let mut op = Vec::new();
    field_varint(2, 13, &mut op);
    field_bytes(8, &op, &mut m);
    field_bytes(7, &g, &mut m);
    m
}

fn check(bytes: &[u8]) {
    let (r, largest) = largest_allocation(|| onnx_proto::parse_model(bytes));
    assert!(largest <= bound(bytes.len()), "parse_model of {} bytes allocated {largest} bytes at once", bytes.len());
    if let Ok(m) = r {
        for t in &m.graph.initializers {
            let n = match &t.data {
                TensorData::F32(v) => v.len(),
                TensorData::I64(v) => v.len(),
            };
            assert_eq!(n, t.numel(), "{}", t.name);
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check(&bytes);
        let (_, largest) = largest_allocation(|| onnx_proto::parse_tensor(&bytes));
        prop_assert!(largest <= bound(bytes.len()));
    }

    #[test]
    fn mutations_of_a_valid_model(seed in any::<u64>()) {
        check(&fuzz::mutate(&valid_model(), seed));
    }

    #[test]
    fn tensors_with_random_dims(dims in proptest::collection::vec(prop_oneof![0u64..5, Just(1 << 62), Just(u64::MAX), Just(1 << 32)], 0..5), dt in prop_oneof![Just(1u64), Just(6), Just(7), Just(11), Just(3)], raw in 0usize..64) {
        let mut t = Vec::new();
        tensor("t", &dims, dt, &vec![0u8; raw], &mut t);
        let (r, largest) = largest_allocation(|| onnx_proto::parse_tensor(&t));
        prop_assert!(largest <= bound(t.len()));
        if let Ok(t) = r {
            prop_assert!(t.numel() <= raw);
        }
    }
}

#[test]
fn the_hand_encoded_model_is_valid() {
    let m = onnx_proto::parse_model(&valid_model()).unwrap();
    assert_eq!((m.ir_version, m.opset()), (8, Some(13)));
    let g = &m.graph;
    assert_eq!(g.name, "fuzz-graph");
    assert_eq!(g.nodes[0].attr_ints("kernel_shape"), Some(&[3i64, 3][..]));
    assert_eq!(g.nodes[0].attr_int("group"), Some(1));
    assert_eq!(g.nodes[0].attr_float("alpha"), Some(0.25));
    assert_eq!(g.nodes[0].attr_string("auto_pad").as_deref(), Some("NOTSET"));
    match g.nodes[1].attributes.get("value") {
        Some(Attribute::Tensor(t)) => assert_eq!(t.as_i64(), Some(&[1i64, -1][..])),
        other => panic!("{other:?}"),
    }
    assert_eq!(g.initializers[0].numel(), 54);
    assert_eq!(g.initializers[1].as_f32(), Some(&[0.5f32, -1.5][..]));
    assert_eq!(
        g.data_inputs()[0].shape.as_deref(),
        Some(&[Dim::Symbolic("N".into()), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)][..])
    );
    check(&valid_model());
}

/// Huge declared lengths (a 2^62-byte field, a varint length of u64::MAX) and a tensor of 2^62
/// elements: errors, with nothing of that size allocated.
#[test]
fn huge_lengths_and_dims_error_without_allocating() {
    for n in fuzz::HUGE {
        let mut b = Vec::new();
        key(7, 2, &mut b);
        varint(n, &mut b);
        b.extend_from_slice(&[0; 16]);
        let (r, largest) = largest_allocation(|| onnx_proto::parse_model(&b));
        assert!(r.unwrap_err().contains("runs past the end"));
        assert!(largest <= bound(b.len()), "{largest}");
    }
    // 2^62 FLOATs, 2^62 · 2^2 FLOATs (the product overflows), 2^62 INT64s whose byte size
    // overflows, with a few bytes of raw data.
    for (dims, dt, want) in [
        (vec![1u64 << 62], 1u64, "needs more than 2^64"),
        (vec![1 << 62, 4], 1, "more than 2^64 elements"),
        (vec![1 << 61], 7, "needs more than 2^64"),
        (vec![1 << 40], 1, "needs 4398046511104"),
    ] {
        let mut t = Vec::new();
        tensor("big", &dims, dt, &[0; 8], &mut t);
        let (r, largest) = largest_allocation(|| onnx_proto::parse_tensor(&t));
        let e = r.unwrap_err();
        assert!(e.contains("`big`") && e.contains(want), "{dims:?}: {e}");
        assert!(largest <= bound(t.len()), "{largest}");
    }
    // 2^62 elements declared, the values given as (absent) float_data: a count mismatch.
    let mut t = Vec::new();
    field_varint(1, 1 << 62, &mut t);
    field_varint(2, 1, &mut t);
    let (r, largest) = largest_allocation(|| onnx_proto::parse_tensor(&t));
    assert!(r.unwrap_err().contains("0 values"), "{t:?}");
    assert!(largest <= bound(t.len()));
}
