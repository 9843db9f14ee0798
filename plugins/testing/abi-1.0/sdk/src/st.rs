//! safetensors files with metadata, shared by every plugin that saves weights.
//!
//! Saving writes to `<path>.tmp` and renames, so a reader never sees half a file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{tensor::TensorView as StView, Dtype, SafeTensors};

use crate::{err, DataType};

/// One tensor as raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StTensor {
    pub fn from_f32(name: &str, shape: &[usize], data: &[f32]) -> Self {
        StTensor {
            name: name.to_string(),
            dtype: DataType::F32,
            shape: shape.to_vec(),
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// The data as f32 (f32, f16 and bf16 files are accepted).
    pub fn to_f32(&self) -> crate::Result<Vec<f32>> {
        let b = &self.bytes;
        Ok(match self.dtype {
            DataType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DataType::BF16 => b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
            DataType::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => return Err(err::input(format!("tensor `{}` has dtype {}, expected a float", self.name, other.name()))),
        })
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

fn to_st_dtype(d: DataType) -> crate::Result<Dtype> {
    Ok(match d {
        DataType::F32 => Dtype::F32,
        DataType::F16 => Dtype::F16,
        DataType::BF16 => Dtype::BF16,
        DataType::U8 => Dtype::U8,
        DataType::I64 => Dtype::I64,
        other => return Err(err::input(format!("dtype {} cannot be saved", other.name()))),
    })
}

fn from_st_dtype(d: Dtype, name: &str, path: &Path) -> crate::Result<DataType> {
    Ok(match d {
        Dtype::F32 => DataType::F32,
        Dtype::F16 => DataType::F16,
        Dtype::BF16 => DataType::BF16,
        Dtype::U8 => DataType::U8,
        Dtype::I64 => DataType::I64,
        other => return Err(err::input(format!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display()))),
    })
}

/// Writes `tensors` and string `metadata` to `path` atomically.
pub fn save(path: &Path, tensors: &[StTensor], metadata: &BTreeMap<String, String>) -> crate::Result<()> {
    let views = tensors
        .iter()
        .map(|t| {
            let v = StView::new(to_st_dtype(t.dtype)?, t.shape.clone(), &t.bytes)
                .map_err(|e| err::input(format!("tensor `{}`: {e}", t.name)))?;
            Ok((t.name.clone(), v))
        })
        .collect::<crate::Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    let bytes = safetensors::serialize(views, &meta).map_err(|e| err::io(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Reads every tensor and the metadata of a safetensors file.
pub fn load(path: &Path) -> crate::Result<(Vec<StTensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| err::io(format!("cannot read {}: {e}", path.display())))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| err::io(format!("{} is not a safetensors file: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| err::io(format!("{} is not a safetensors file: {e}", path.display())))?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in names {
        let v = st.tensor(&name).map_err(|e| err::io(format!("{}: {e}", path.display())))?;
        out.push(StTensor {
            dtype: from_st_dtype(v.dtype(), &name, path)?,
            shape: v.shape().to_vec(),
            bytes: v.data().to_vec(),
            name,
        });
    }
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok((out, metadata))
}

/// Writes `bytes` to `path` through `<path>.tmp` + fsync + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| err::io(format!("cannot create {}: {e}", tmp.display())))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| err::io(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| err::io(format!("cannot rename {} to {}: {e}", tmp.display(), path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata() {
        let dir = std::env::temp_dir().join(format!("likeness-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("w.safetensors");
        let t = StTensor::from_f32("a.weight", &[2, 2], &[1.0, -2.0, 3.5, 0.0]);
        let mut meta = BTreeMap::new();
        meta.insert("ss_network_dim".to_string(), "4".to_string());
        save(&p, std::slice::from_ref(&t), &meta).unwrap();
        let (back, m) = load(&p).unwrap();
        assert_eq!(back, vec![t]);
        assert_eq!(m, meta);
        assert!(!p.with_extension("safetensors.tmp").exists());
    }

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }
}
