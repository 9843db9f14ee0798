//! Preprocessing on real photos ($LIKENESS_DATA/photos) against the reference, both paths:
//! - `pil_exact` vs open_clip's eval `preprocess` (Pillow BICUBIC resize, CenterCrop, ToTensor,
//!   Normalize): the resized-and-cropped u8 image must be identical in one of the two pass
//!   orders (integer arithmetic on both sides, the f64 coefficient computation done in the same
//!   order). Pillow 13 picks the order by a rule we do not reproduce (PassOrder::pillow is
//!   Pillow 9–12's); which order it took, and what our automatic choice then deviates by, is
//!   printed. With the matching order, the normalised floats
//!   then come from the same two IEEE f32 operations ((v/255 − mean)/std), so they are equal; the
//!   bound allows one rounding (1 ulp at |x| ≤ 2.7 is 2.4e-7) should a reference reorder them.
//! - `resize_crop_normalize` vs torchvision v2 `resize(antialias=True)` + `center_crop` +
//!   normalise on the same float tensor: both call libtorch's `_upsample_bicubic2d_aa`; a
//!   different kernel would differ by f32 rounding of ≤ 4·⌈scale⌉+1 ≈ 40 taps per pass on values
//!   ≤ 1.1 (two passes: ≲ 80·2⁻²⁴ ≈ 5e-6), divided by std ≈ 0.26 → 2e-5 in normalised units.
//!
//! The deviation of the tensor path from Pillow (u8 rounding after each pass, clamping) is
//! measured and printed, not bounded: it is the price of differentiability.
use likeness_clip::preprocess::{
    crop_offset, pil_exact, pil_exact_ordered, pil_resize_bicubic_ordered, resize_crop_normalize, resized_hw, PassOrder,
};
use likeness_sdk::testing;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Portrait and landscape downscales, the one photo where Pillow 13 runs the vertical pass
/// first (biden), an RGBA PNG and an upscale (112×112 → 224).
pub const PHOTOS: [&str; 5] = [
    "photos/face_recognition/obama.jpg",
    "photos/face_recognition/biden.jpg",
    "photos/face_recognition/32bit.png",
    "photos/insightface/t1.jpg",
    "photos/insightface/Tom_Hanks_54745.png",
];

fn f32s(p: &Path) -> Vec<f32> {
    std::fs::read(p).unwrap().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn both_paths_match_the_reference_on_real_photos() {
    let test = "both_paths_match_the_reference_on_real_photos";
    let Some(python) = testing::python_or_skip(test) else { return };
    let mut paths = Vec::new();
    for p in PHOTOS {
        let Some(path) = testing::data_path_or_skip(test, p) else { return };
        paths.push(path);
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(&python)
        .arg(repo().join("tests/python/clip_oracle.py"))
        .arg("--out")
        .arg(dir.path())
        .arg("--photos")
        .args(&paths)
        .output()
        .unwrap();
    assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("photos.json")).unwrap()).unwrap();
    let s = 224;
    for (k, m) in meta["photos"].as_array().unwrap().iter().enumerate() {
        let (w, h) = (m["w"].as_u64().unwrap() as usize, m["h"].as_u64().unwrap() as usize);
        let rgb = std::fs::read(dir.path().join(format!("{k}.rgb"))).unwrap();
        // (a) Pillow parity.
        let (nh, nw) = resized_hw(h, w, s);
        let (top, left) = (crop_offset(nh, s), crop_offset(nw, s));
        let want = std::fs::read(dir.path().join(format!("{k}.crop224.rgb"))).unwrap();
        let differing = |order| {
            let r = pil_resize_bicubic_ordered(&rgb, h, w, nh, nw, order);
            let crop: Vec<u8> = (0..s)
                .flat_map(|y| r[((y + top) * nw + left) * 3..((y + top) * nw + left + s) * 3].iter().copied())
                .collect();
            assert_eq!(crop.len(), want.len());
            crop.iter().zip(&want).filter(|(a, b)| a != b).count()
        };
        let (dh, dv) = (differing(PassOrder::HorizontalFirst), differing(PassOrder::VerticalFirst));
        let order = if dh == 0 { PassOrder::HorizontalFirst } else { PassOrder::VerticalFirst };
        let pil = f32s(&dir.path().join(format!("{k}.pil224.f32")));
        let dmax = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let d_pil = dmax(&pil_exact_ordered(&rgb, h, w, s, order), &pil);
        let d_auto = dmax(&pil_exact(&rgb, h, w, s), &pil);
        // (b) torchvision tensor parity, and the tensor path's distance from Pillow.
        let x = likeness_clip::preprocess::rgb_u8_to_tensor(&rgb, h, w);
        let t = Vec::<f32>::try_from(resize_crop_normalize(&x, s).flatten(0, -1)).unwrap();
        let tv = f32s(&dir.path().join(format!("{k}.tv224.f32")));
        let d_tv = t.iter().zip(&tv).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let dev: Vec<f32> = t.iter().zip(&pil).map(|(a, b)| (a - b).abs()).collect();
        let dev_max = dev.iter().copied().fold(0f32, f32::max);
        let dev_mean = dev.iter().sum::<f32>() / dev.len() as f32;
        eprintln!(
            "{} {w}x{h}: u8 values differing from Pillow: horizontal-first {dh}, vertical-first {dv} of {}; with \
             the matching order floats max|d| {d_pil:e}; automatic order max|d| {d_auto:e}; tensor path vs \
             torchvision max|d| {d_tv:e}; tensor path vs Pillow (normalised units) max {dev_max:.4} mean {dev_mean:.5}",
            m["path"].as_str().unwrap(),
            want.len()
        );
        assert!(dh == 0 || dv == 0, "neither pass order reproduces Pillow: {dh} / {dv} values differ");
        assert!(d_pil <= 2.4e-7, "pil_exact floats: {d_pil:e}");
        assert!(d_tv <= 2e-5, "tensor path vs torchvision: {d_tv:e}");
    }
    // The differentiable path really is differentiable.
    let x = Tensor::rand([1, 3, 40, 50], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let y = resize_crop_normalize(&x, 24).sum(tch::Kind::Float);
    let g = Tensor::run_backward(&[&y], &[&x], false, false);
    assert!(g[0].abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
}
