//! Fuzzing dlib's `.dat` reader (`dat::Reader`) and the shape predictor built on it: random
//! bytes, random sequences of reads, mutations of a valid (hand-encoded) shape predictor and
//! huge declared lengths. None may panic, and no allocation may follow a length read from the
//! file: the largest single allocation stays within a small multiple of the input (measured by
//! the allocation guard installed below).

use likeness_plugin_dlib_face::dat::{Reader, MAX_PREALLOC_BYTES};
use likeness_plugin_dlib_face::shape_predictor::{Rect, RgbImage, ShapePredictor};
use likeness_sdk::fuzz::{self, largest_allocation};
use proptest::prelude::*;

likeness_sdk::fuzz_test_setup!();

/// What reading `len` bytes may allocate at once: the decoded values (a `Vec<f64>` per 2 input
/// bytes at most, strings) are a small multiple of the input; a declared length pre-allocates
/// at most `MAX_PREALLOC_BYTES`.
fn bound(len: usize) -> usize {
    64 * len + MAX_PREALLOC_BYTES
}

// dlib's encoding, for hand-made inputs.
fn unsigned(v: u64, out: &mut Vec<u8>) {
    let n = (8 - v.leading_zeros() as usize / 8).max(1);
    out.push(n as u8);
    out.extend_from_slice(&v.to_le_bytes()[..n]);
}
fn signed(v: i64, out: &mut Vec<u8>) {
    let m = v.unsigned_abs();
    let n = (8 - m.leading_zeros() as usize / 8).max(1);
    out.push(n as u8 | if v < 0 { 0x80 } else { 0 });
    out.extend_from_slice(&m.to_le_bytes()[..n]);
}
/// `float_details`: mantissa · 2^exponent (exact for the values used here).
fn float(x: f32, out: &mut Vec<u8>) {
    signed((x as f64 * 1048576.0) as i64, out);
    signed(-20, out);
}
fn col(v: &[f32], out: &mut Vec<u8>) {
    signed(-(v.len() as i64), out);
    signed(-1, out);
    for &x in v {
        float(x, out);
    }
}

/// A valid 5-point shape predictor: one cascade of two depth-1 trees over two features.
fn valid_predictor() -> Vec<u8> {
    let mut b = Vec::new();
    signed(1, &mut b); // version
    let shape: Vec<f32> = (0..10).map(|i| 0.1 * i as f32).collect();
    col(&shape, &mut b);
    unsigned(1, &mut b); // cascades
    unsigned(2, &mut b); // trees
    for t in 0..2 {
        unsigned(1, &mut b); // splits
        unsigned(0, &mut b);
        unsigned(1, &mut b);
        float(0.5 * t as f32, &mut b);
        unsigned(2, &mut b); // leaves
        for l in 0..2 {
            col(&[0.01 * (l + t) as f32; 10], &mut b);
        }
    }
    unsigned(1, &mut b);
    unsigned(2, &mut b);
    unsigned(0, &mut b);
    unsigned(4, &mut b); // anchors
    unsigned(1, &mut b);
    unsigned(2, &mut b);
    for d in [0.25f32, -0.5, 0.125, 1.0] {
        float(d, &mut b); // deltas
    }
    b
}

/// Parses a shape predictor and, when it parses, runs it on a small image: a predictor that
/// passed validation must not panic either.
fn check_predictor(bytes: &[u8]) {
    let (r, largest) = largest_allocation(|| ShapePredictor::from_bytes(bytes));
    assert!(largest <= bound(bytes.len()), "from_bytes of {} bytes allocated {largest} bytes at once", bytes.len());
    if let Ok(sp) = r {
        let data: Vec<u8> = (0..8 * 8 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let img = RgbImage { width: 8, height: 8, data: &data };
        let pts = sp.predict(&img, Rect { left: 1, top: 1, right: 6, bottom: 6 });
        assert_eq!(pts.len(), sp.num_parts());
    }
}

/// One of the reader's primitives, by number; false on an error (which ends the sequence).
fn read_op(r: &mut Reader, op: u8) -> bool {
    match op % 12 {
        0 => r.byte().is_ok(),
        1 => r.bytes((op / 12) as usize).is_ok(),
        2 => r.i32().is_ok(),
        3 => r.i64().is_ok(),
        4 => r.u64().is_ok(),
        5 => r.f32().is_ok(),
        6 => r.f64().is_ok(),
        7 => r.bool().is_ok(),
        8 => r.string().is_ok(),
        9 => r.vec(|r| r.f32()).is_ok(),
        10 => r.matrix(|r| r.f64()).is_ok(),
        _ => r.vec(|r| r.vec(|r| Ok((r.u64()?, r.f32()?, [0u64; 4])))).is_ok(),
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn random_reads_of_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400), ops in proptest::collection::vec(any::<u8>(), 1..24)) {
        let ((), largest) = largest_allocation(|| {
            let mut r = Reader::new(&bytes);
            for &op in &ops {
                let before = r.pos;
                if !read_op(&mut r, op) {
                    break;
                }
                assert!(r.pos >= before && r.pos <= bytes.len());
            }
        });
        prop_assert!(largest <= bound(bytes.len()), "{largest}");
    }

    #[test]
    fn shape_predictor_from_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_predictor(&bytes);
    }

    #[test]
    fn shape_predictor_mutations(seed in any::<u64>()) {
        check_predictor(&fuzz::mutate(&valid_predictor(), seed));
    }
}

#[test]
fn the_hand_encoded_predictor_is_valid() {
    let sp = ShapePredictor::from_bytes(&valid_predictor()).unwrap();
    assert_eq!((sp.num_parts(), sp.forests.len(), sp.forests[0].len()), (5, 1, 2));
    assert_eq!(sp.deltas[0], vec![[0.25, -0.5], [0.125, 1.0]]);
    check_predictor(&valid_predictor());
}

/// Huge declared lengths: 2^62-element vectors and strings, 2^31 × 2^31 and i64::MIN-sized
/// matrices. Each is an error, and nothing of that size is allocated.
#[test]
fn huge_declared_lengths_error_without_allocating() {
    for n in fuzz::HUGE {
        let mut b = Vec::new();
        unsigned(n, &mut b);
        b.extend_from_slice(&[1, 0, 1, 0]);
        let (r, largest) = largest_allocation(|| Reader::new(&b).vec(|r| r.byte()));
        let e = r.unwrap_err().to_string();
        assert!(e.contains(&n.to_string()) && e.contains("exceeds"), "{e}");
        assert!(largest <= bound(b.len()), "{largest}");
        let (r, largest) = largest_allocation(|| Reader::new(&b).string());
        assert!(r.is_err() && largest <= bound(b.len()), "{r:?} {largest}");
    }
    for (nr, nc) in
        [(1i64 << 31, 1i64 << 31), (-(1 << 31), -(1 << 31)), (i64::MIN, -1), (-1, i64::MIN), (-2, 3), (1 << 62, 0)]
    {
        let mut b = Vec::new();
        signed(nr, &mut b);
        signed(nc, &mut b);
        b.extend_from_slice(&[1, 1, 1, 1]);
        let (r, largest) = largest_allocation(|| Reader::new(&b).matrix(|r| r.byte()));
        match r {
            // 2^62 × 0 is an empty matrix: fine, as long as it allocated nothing.
            Ok((_, _, v)) => assert!(nr == 1 << 62 && v.is_empty(), "{nr}x{nc}"),
            Err(e) => assert!(e.to_string().contains("bad matrix size"), "{nr}x{nc}: {e}"),
        }
        assert!(largest <= bound(b.len()), "{nr}x{nc}: {largest}");
    }
}

/// A declared length that fits the data left but whose elements are much larger than a byte:
/// the pre-allocation is bounded, not `length × element size` (24× the input here).
#[test]
fn plausible_length_of_large_elements_is_not_preallocated() {
    let mut b = Vec::new();
    unsigned(999_990, &mut b);
    b.resize(1_000_000, 0);
    let (r, largest) = largest_allocation(|| Reader::new(&b).vec(|r| r.vec(|r| r.u64())));
    assert!(r.is_err());
    assert!(largest <= MAX_PREALLOC_BYTES, "{largest} bytes for a 1 MB input");
    let (r, largest) = largest_allocation(|| ShapePredictor::from_bytes(&b));
    assert!(r.is_err() && largest <= MAX_PREALLOC_BYTES, "{largest}");
}

/// A length-prefixed layer name as dlib writes it in the face ResNet's `.dat`.
fn layer_name(name: &str, out: &mut Vec<u8>) {
    out.push(1);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// A `resizable_tensor` (version 2, four dims, raw little-endian f32).
fn resizable_tensor(dims: [i64; 4], out: &mut Vec<u8>) {
    signed(2, out);
    for d in dims {
        signed(d, out);
    }
    let n: i64 = dims.iter().product();
    for i in 0..n {
        out.extend_from_slice(&(0.01 * i as f32).to_le_bytes());
    }
}

/// A valid, tiny face ResNet: input layer, one 2-filter 1×1 convolution over 3 channels (6
/// weights + 2 biases), an affine of 2 channels, a relu, and a 2→3 fully connected layer.
fn valid_facenet() -> Vec<u8> {
    let mut b = Vec::new();
    layer_name("input_rgb_image_sized", &mut b);
    for v in [122.0, 117.0, 104.0] {
        float(v, &mut b);
    }
    layer_name("con_4", &mut b);
    resizable_tensor([8, 1, 1, 1], &mut b);
    for v in [2, 1, 1, 1, 1, 0, 0] {
        signed(v, &mut b); // filters, rows, cols, stride y, stride x, padding y, padding x
    }
    layer_name("affine_", &mut b);
    resizable_tensor([4, 1, 1, 1], &mut b);
    layer_name("relu_", &mut b);
    layer_name("fc_2", &mut b);
    signed(3, &mut b); // outputs
    signed(2, &mut b); // inputs
    resizable_tensor([6, 1, 1, 1], &mut b);
    b
}

#[test]
fn issue_6_the_hand_encoded_facenet_is_valid() {
    let net = likeness_plugin_dlib_face::resnet::FaceNet::from_bytes(&valid_facenet()).unwrap();
    assert_eq!(net.layers.len(), 4);
}

proptest! {
    // Each case builds a few small libtorch tensors: fewer cases than the pure parsers.
    #![proptest_config(config(400))]

    /// Damaged face-ResNet files (dimension products that overflow, zero filters, parameter
    /// counts that do not fit the declared shapes) are errors, never panics.
    #[test]
    fn issue_6_facenet_mutations_error_without_panicking(seed in any::<u64>()) {
        let bytes = fuzz::mutate(&valid_facenet(), seed);
        let _ = likeness_plugin_dlib_face::resnet::FaceNet::from_bytes(&bytes);
    }
}
