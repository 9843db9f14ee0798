//! safetensors in and out for LoRA files: reading through the `safetensors` crate (it validates
//! the header and offsets), writing with our own serializer because the crate's metadata is a
//! `HashMap` (random order) and the brief asks for deterministic bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::RawTensor;
use crate::{DiffusionError, Result};

/// Every tensor (in file order of names, sorted) and the `__metadata__` of one safetensors file.
pub(crate) struct StFile {
    pub tensors: BTreeMap<String, RawTensor>,
    pub metadata: BTreeMap<String, String>,
}

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> DiffusionError {
    DiffusionError::Io { path: path.to_path_buf(), source: e }
}

pub(crate) fn read_safetensors(path: &Path) -> Result<StFile> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| DiffusionError::LoraFile {
        file: path.to_path_buf(),
        why: format!("not a valid safetensors file ({e}); re-export it with safetensors' save_file"),
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| DiffusionError::LoraFile {
        file: path.to_path_buf(),
        why: format!("unreadable safetensors header ({e})"),
    })?;
    let metadata: BTreeMap<String, String> =
        header.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let tensors = st
        .iter()
        .map(|(name, v)| {
            (name.to_string(), RawTensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() })
        })
        .collect();
    Ok(StFile { tensors, metadata })
}

/// Reads only the tensor names and the metadata (no data copy) — for `detect`.
pub(crate) fn read_names(path: &Path) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let f = read_safetensors(path)?;
    Ok((f.tensors.into_keys().collect(), f.metadata))
}

pub(crate) fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BOOL => "BOOL",
        Dtype::U8 => "U8",
        Dtype::I8 => "I8",
        Dtype::F8_E5M2 => "F8_E5M2",
        Dtype::F8_E4M3 => "F8_E4M3",
        Dtype::I16 => "I16",
        Dtype::U16 => "U16",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::I32 => "I32",
        Dtype::U32 => "U32",
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        Dtype::I64 => "I64",
        Dtype::U64 => "U64",
        _ => "UNKNOWN",
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal half: value = man · 2⁻²⁴, exact in f32.
            let v = man as f32 * (1.0 / (1u32 << 24) as f32);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | (((exp - 15 + 127) as u32) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Round-to-nearest-even f32 → f16 (the rounding torch's `.half()` does).
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: shift the implicit-1 mantissa, round to nearest even.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1u32 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && (r & 1) == 1) {
        r += 1; // may carry into the exponent: that is the correct rounding up
    }
    sign | r as u16
}

fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((b >> 16) & 1);
    ((b + rounding) >> 16) as u16
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32 (F32 exact; F16/BF16 exact widening; F64 rounded once).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        Some(match self.dtype {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::BF16 => {
                d.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            _ => return None,
        })
    }

    /// A tensor of `dtype` from f32 values (F16/BF16 rounded to nearest even, as torch does).
    pub fn from_f32(dtype: Dtype, shape: Vec<usize>, v: &[f32]) -> Option<RawTensor> {
        let data: Vec<u8> = match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F64 => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
            Dtype::F16 => v.iter().flat_map(|x| f32_to_f16(*x).to_le_bytes()).collect(),
            Dtype::BF16 => v.iter().flat_map(|x| f32_to_bf16(*x).to_le_bytes()).collect(),
            _ => return None,
        };
        Some(RawTensor { dtype, shape, data })
    }

    /// The single value of a 0-d or one-element tensor (a kohya `.alpha`).
    pub fn scalar(&self) -> Option<f64> {
        if self.numel() != 1 {
            return None;
        }
        match self.dtype {
            Dtype::F64 => {
                let c = &self.data;
                Some(f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            }
            Dtype::I64 => Some(i64::from_le_bytes(self.data[..8].try_into().ok()?) as f64),
            Dtype::I32 => Some(i32::from_le_bytes(self.data[..4].try_into().ok()?) as f64),
            _ => self.to_f32().map(|v| v[0] as f64),
        }
    }
}

/// Writes `path` atomically (a temp file in the same folder, then rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}

/// The bytes of a safetensors file: header keys sorted (`__metadata__` first), tensors ordered
/// by descending element size then name — the order the reference serializer uses so that every
/// tensor stays aligned to its element size (the header is padded to 8 bytes) — so equal input
/// gives equal bytes.
pub(crate) fn safetensors_bytes(tensors: &BTreeMap<String, RawTensor>, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut order: Vec<(&String, &RawTensor)> = tensors.iter().collect();
    order.sort_by(|(an, a), (bn, b)| b.dtype.size().cmp(&a.dtype.size()).then_with(|| an.cmp(bn)));
    let mut offsets = BTreeMap::new();
    let mut off = 0usize;
    for (name, t) in &order {
        offsets.insert((*name).clone(), (off, off + t.data.len()));
        off += t.data.len();
    }
    let js = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut header = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":{");
        let items: Vec<String> = metadata.iter().map(|(k, v)| format!("{}:{}", js(k), js(v))).collect();
        header.push_str(&items.join(","));
        header.push('}');
        first = false;
    }
    for (name, t) in tensors {
        let (a, b) = offsets[name];
        if !first {
            header.push(',');
        }
        first = false;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{a},{b}]}}",
            js(name),
            dtype_name(t.dtype),
            shape.join(",")
        ));
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + off);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (_, t) in order {
        out.extend_from_slice(&t.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversions_round_to_nearest_even() {
        // Exact values survive; 1 + 2⁻¹¹ is the midpoint between 1 and the next half (1 + 2⁻¹⁰):
        // ties go to the even mantissa (1.0); a hair above goes up.
        for x in [0.0f32, 1.0, -2.5, 65504.0, 6.1035156e-5, 5.9604645e-8] {
            assert_eq!(f16_to_f32(f32_to_f16(x)), x, "{x}");
        }
        assert_eq!(f16_to_f32(f32_to_f16(1.0 + 1.0 / 2048.0)), 1.0);
        assert_eq!(f16_to_f32(f32_to_f16(1.0 + 1.0 / 2048.0 + 1e-7)), 1.0 + 1.0 / 1024.0);
        assert_eq!(f16_to_f32(f32_to_f16(1e6)), f32::INFINITY);
        let bf = f32::from_bits((f32_to_bf16(1.0 + 1.0 / 256.0) as u32) << 16);
        assert_eq!(bf, 1.0, "bf16 tie to even");
    }

    #[test]
    fn serialized_bytes_read_back_and_are_deterministic() {
        let mut t = BTreeMap::new();
        t.insert("b".to_string(), RawTensor::from_f32(Dtype::F16, vec![3], &[1.0, 2.0, 3.0]).unwrap());
        t.insert("a".to_string(), RawTensor::from_f32(Dtype::F32, vec![2, 1], &[4.0, 5.0]).unwrap());
        let mut m = BTreeMap::new();
        m.insert("z".to_string(), "\"quoted\"".to_string());
        m.insert("a".to_string(), "x".to_string());
        let bytes = safetensors_bytes(&t, &m);
        assert_eq!(bytes, safetensors_bytes(&t, &m));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), t["a"].data.as_slice());
        assert_eq!(st.tensor("b").unwrap().shape(), &[3]);
        let (n, h) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!((n + 8) % 8, 0);
        assert_eq!(h.metadata().as_ref().unwrap()["z"], "\"quoted\"");
    }
}
