//! Pixel-format conversions shared by metric plugins.

/// `[0, 1]` float RGB planes (CHW, one image) → the interleaved `u8` RGB image a Python pipeline
/// (insightface, dlib) would have read from disk: `round(255·x)`, clamped.
pub fn chw_to_rgb_u8(planes: &[f32], h: usize, w: usize) -> Vec<u8> {
    let plane = h * w;
    let mut out = vec![0u8; plane * 3];
    for p in 0..plane {
        for c in 0..3 {
            out[p * 3 + c] = (planes[c * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn interleaves_rounds_and_clamps() {
        // 1×2 image: R plane [0, 1], G plane [0.5, 2], B plane [-1, 0.2]
        let planes = [0.0, 1.0, 0.5, 2.0, -1.0, 0.2];
        assert_eq!(super::chw_to_rgb_u8(&planes, 1, 2), vec![0, 128, 0, 255, 255, 51]);
    }
}
