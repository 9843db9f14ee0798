//! fp8 storage in the loader (src/load.rs) against torch 2.13 (tests/python/fp8_oracle.py): all
//! 256 codes of `float8_e4m3fn` and `float8_e5m2` decode bit for bit as torch decodes them (NaN
//! codes compared as NaN), and a ComfyUI-style fp8-scaled file loads as torch computes
//! `w.to(float32) * scale_weight` — bitwise, because both sides are one f32 rounding of the same
//! exact product (every fp8 value is exact in f32) — into an fp32 and a bf16 store.

mod common;

use common::PyOracle as Oracle;
use likeness_diffusion_torch::load;
use likeness_diffusion_torch::store::{Mode, Store};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

fn oracle(test: &str) -> Option<&'static Oracle> {
    static O: OnceLock<Option<Oracle>> = OnceLock::new();
    O.get_or_init(|| Oracle::run("fp8_oracle.py", test)).as_ref()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).contiguous().view([-1]);
    Vec::<f32>::try_from(&t).unwrap()
}

/// Bitwise, except that any NaN matches any NaN (torch does not promise one NaN payload).
fn same_bits(ours: &[f32], want: &[f32], what: &str) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(want).enumerate() {
        let ok = if b.is_nan() { a.is_nan() } else { a.to_bits() == b.to_bits() };
        assert!(ok, "{what}[{i}]: ours {a:e} ({:#010x}), torch {b:e} ({:#010x})", a.to_bits(), b.to_bits());
    }
}

#[test]
fn every_fp8_code_decodes_as_torch() {
    let Some(o) = oracle("every_fp8_code_decodes_as_torch") else { return };
    let file = o.path("codes.safetensors");
    // The dtype strings the reference writer puts in the header.
    let header = std::fs::read(&file).unwrap();
    let header = String::from_utf8_lossy(&header[..200.min(header.len())]);
    assert!(header.contains(r#""dtype":"F8_E4M3""#) && header.contains(r#""dtype":"F8_E5M2""#), "{header}");
    let tensors = load::read_st(&file).unwrap();
    for (name, kind, nans, infs) in [("e4m3", Kind::Float8e4m3fn, 2, 0), ("e5m2", Kind::Float8e5m2, 6, 2)] {
        let (_, s) = tensors.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(s.kind(), kind, "{name}");
        let t = s.load().unwrap();
        assert_eq!(t.kind(), Kind::Float, "{name}: fp8 is decoded to f32");
        let (ours, want) = (f32s(&t), o.values(name));
        same_bits(&ours, &want, name);
        // The codes span the format (the comparison covered NaN, ±inf, subnormals and ±0).
        assert_eq!(want.iter().filter(|x| x.is_nan()).count(), nans, "{name}: NaN codes");
        assert_eq!(want.iter().filter(|x| x.is_infinite()).count(), infs, "{name}: infinite codes");
        assert!(want.iter().any(|x| x.to_bits() == 0x8000_0000), "{name}: -0");
    }
}

#[test]
fn scaled_fp8_file_loads_as_torch_computes() {
    let Some(o) = oracle("scaled_fp8_file_loads_as_torch_computes") else { return };
    let file = o.path("scaled.safetensors");
    let tensors = load::read_st(&file).unwrap();
    let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    // The scales are folded in; scale_input and the scaled_fp8 marker are not weights.
    assert_eq!(names, ["lin.bias", "lin.weight", "lin2.weight", "raw.weight"]);
    let get = |n: &str| &tensors.iter().find(|(m, _)| m == n).unwrap().1;
    assert_eq!(get("lin.weight").scale(), Some(0.012_345_679));
    assert_eq!(get("raw.weight").scale(), None);
    for n in ["lin.weight", "lin2.weight", "raw.weight", "lin.bias"] {
        same_bits(&f32s(&get(n).load().unwrap()), &o.values(n), n);
    }
    // A fused [3·4, 8] fp8 weight read as q, k, v: each its row range of torch's product.
    let lin = o.tensor("lin.weight");
    for i in 0..3 {
        let part = get("lin.weight").rows(4 * i, 4).unwrap();
        assert_eq!(part.size(), vec![4, 8]);
        same_bits(&f32s(&part.load().unwrap()), &f32s(&lin.narrow(0, 4 * i, 4)), &format!("lin.weight rows {i}"));
    }
    // Into a model's store, fp32 and bf16 (the bf16 store holds torch's product rounded once).
    for (kind, lin_want) in [(Kind::Float, "lin.weight"), (Kind::BFloat16, "lin.weight.bf16")] {
        let store = Store::new(Mode::Alloc, kind, Device::Cpu);
        let r = store.root();
        let params = [
            ("lin.weight", r.sub("lin").param("weight", &[12, 8]), lin_want),
            ("lin.bias", r.sub("lin").param("bias", &[12]), "lin.bias"),
            ("lin2.weight", r.sub("lin2").param("weight", &[6, 8]), "lin2.weight"),
            ("raw.weight", r.sub("raw").param("weight", &[5, 8]), "raw.weight"),
        ];
        load::apply(&store, load::read_st(&file).unwrap(), "scaled.safetensors", "fp8 test").unwrap();
        for (n, p, want) in &params {
            assert_eq!(p.kind(), kind);
            let want = o.tensor(want).to_kind(kind).to_kind(Kind::Float);
            same_bits(&f32s(p), &f32s(&want), &format!("{n} in a {kind:?} store"));
        }
    }
}
