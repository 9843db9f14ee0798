//! safetensors files with metadata, shared by every plugin that saves weights.
//!
//! Saving writes to `<path>.tmp` and renames, so a reader never sees half a file.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

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
            DataType::BF16 => {
                b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            DataType::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => {
                return Err(err::input(format!("tensor `{}` has dtype {}, expected a float", self.name, other.name())))
            }
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

/// 64-bit floats (DLPack code 2, 64 bits): saved and loaded too.
const F64: DataType = DataType { code: 2, bits: 64, lanes: 1 };

fn to_st_dtype(d: DataType) -> crate::Result<Dtype> {
    Ok(match d {
        DataType::F32 => Dtype::F32,
        DataType::F16 => Dtype::F16,
        DataType::BF16 => Dtype::BF16,
        DataType::U8 => Dtype::U8,
        DataType::I64 => Dtype::I64,
        F64 => Dtype::F64,
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
        Dtype::F64 => F64,
        other => {
            return Err(err::input(format!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display())))
        }
    })
}

/// Writes `tensors` and string `metadata` to `path` atomically (the bytes of [`serialize`]).
pub fn save(path: &Path, tensors: &[StTensor], metadata: &BTreeMap<String, String>) -> crate::Result<()> {
    let bytes = serialize(tensors, metadata).map_err(|e| err::input(format!("{}: {}", path.display(), e.message)))?;
    write_atomic(path, &bytes)
}

/// The bytes of a safetensors file holding `tensors` and `metadata`, the same on every run: the
/// header's keys are sorted, and the tensors' data follow in the safetensors crate's order
/// (larger dtypes first, then by name). (The safetensors crate writes its metadata from a `HashMap`, whose order
/// differs from process to process, so a resumed run's files would not be byte-equal to an
/// uninterrupted run's.) The header is padded with spaces to a multiple of 8 bytes, as the
/// safetensors crate pads it, so that the data is aligned.
pub fn serialize(tensors: &[StTensor], metadata: &BTreeMap<String, String>) -> crate::Result<Vec<u8>> {
    // The safetensors crate's order: larger dtypes first (so that, after the 8-byte aligned
    // header, every tensor's data is aligned to its element size), then by name.
    let mut order: Vec<(Dtype, &StTensor)> =
        tensors.iter().map(|t| Ok((to_st_dtype(t.dtype)?, t))).collect::<crate::Result<_>>()?;
    order.sort_by(|(da, a), (db, b)| db.cmp(da).then_with(|| a.name.cmp(&b.name)));
    let mut names: Vec<&str> = order.iter().map(|(_, t)| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(err::input(format!("tensor name `{}` is used twice", w[0])));
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m = metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".to_string(), serde_json::Value::Object(m));
    }
    let mut offset = 0usize;
    for &(dtype, t) in &order {
        if t.name == "__metadata__" {
            return Err(err::input("`__metadata__` is reserved and cannot name a tensor"));
        }
        let want = t.shape.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d));
        if want != Some(t.bytes.len()) {
            return Err(err::input(format!(
                "tensor `{}` of shape {:?} and dtype {} has {} bytes, expected {}",
                t.name,
                t.shape,
                t.dtype.name(),
                t.bytes.len(),
                want.map_or("more than 2^64".to_string(), |w| w.to_string())
            )));
        }
        let end = offset + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| err::internal(format!("safetensors header: {e}")))?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, t) in order {
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

/// The largest JSON header accepted (the safetensors crate's own limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the data section (after the 8-byte length and the JSON header).
    pub data_offsets: (usize, usize),
}

/// A safetensors header, checked against the length of its file.
#[derive(Debug, Clone, PartialEq)]
pub struct StHeader {
    /// Length of the JSON header; the data section starts at `8 + header_len`.
    pub header_len: usize,
    /// Sorted by `data_offsets`.
    pub tensors: Vec<StTensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

impl StHeader {
    /// Where the data section starts in the file.
    pub fn data_start(&self) -> usize {
        8 + self.header_len
    }
}

/// Parses and checks the header of a safetensors file of `file_len` bytes whose first bytes are
/// `prefix` (at least the 8-byte length and the JSON header; the whole file will do). Every
/// length in the file is untrusted: each is checked against `file_len` with overflow-checked
/// arithmetic before it is used, and nothing is allocated from it. The tensors must tile the
/// data section exactly (contiguous, each `numel × dtype size` bytes, ending at the end of the
/// file), so a truncated or padded file is refused.
pub fn parse_header(prefix: &[u8], file_len: u64) -> std::result::Result<StHeader, String> {
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(if file_len < 8 {
            format!("the file has {file_len} bytes, too few for the 8-byte header length")
        } else {
            format!("only {} bytes were read, too few for the 8-byte header length", prefix.len())
        });
    };
    let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    let data_len = file_len.checked_sub(8).and_then(|rest| rest.checked_sub(n));
    let Some(data_len) = data_len else {
        return Err(format!("the header claims {n} bytes but the file has {file_len} bytes (truncated?)"));
    };
    if n > MAX_HEADER_LEN {
        return Err(format!("the header claims {n} bytes, more than the {MAX_HEADER_LEN} allowed"));
    }
    let n = n as usize;
    let Some(json) = prefix.get(8..8 + n) else {
        return Err(format!("the header claims {n} bytes but only {} were read", prefix.len() - 8));
    };
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(json).map_err(|e| format!("the JSON header does not parse: {e}"))?;
    let mut tensors: Vec<StTensorInfo> = meta
        .tensors()
        .into_iter()
        .map(|(name, i)| StTensorInfo { name, dtype: i.dtype, shape: i.shape.clone(), data_offsets: i.data_offsets })
        .collect();
    tensors.sort_by(|a, b| a.data_offsets.cmp(&b.data_offsets).then_with(|| a.name.cmp(&b.name)));
    let mut end = 0usize;
    for t in &tensors {
        let (s, e) = t.data_offsets;
        if s != end || e < s {
            return Err(format!(
                "tensor `{}` has data_offsets [{s}, {e}], expected it to start at {end} (tensors must be contiguous)",
                t.name
            ));
        }
        let nbytes = t.shape.iter().try_fold(t.dtype.size(), |acc, &d| acc.checked_mul(d));
        if nbytes != Some(e - s) {
            return Err(format!(
                "tensor `{}` of dtype {:?} and shape {:?} needs {} bytes but its data_offsets span {}",
                t.name,
                t.dtype,
                t.shape,
                nbytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                e - s
            ));
        }
        end = e;
    }
    if end as u64 != data_len {
        return Err(format!(
            "the tensors cover {end} bytes but the file holds {data_len} bytes after the header ({})",
            if (end as u64) > data_len { "truncated" } else { "trailing bytes" }
        ));
    }
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok(StHeader { header_len: n, tensors, metadata })
}

/// Reads and checks the header of a safetensors file without reading its tensors (the file's
/// length comes from the open file; at most `8 + header_len` bytes are read, and the header
/// length is bounded by the file's length before anything is allocated).
pub fn read_header(path: &Path) -> crate::Result<StHeader> {
    use std::io::Read;
    let bad = |m: String| err::io(format!("{} is not a safetensors file: {m}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| err::io(format!("cannot read {}: {e}", path.display())))?;
    let file_len = f.metadata().map_err(|e| err::io(format!("cannot read {}: {e}", path.display())))?.len();
    let mut prefix = Vec::new();
    (&mut f).take(8).read_to_end(&mut prefix).map_err(|e| bad(e.to_string()))?;
    if prefix.len() == 8 {
        let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        // Bounded by the file (a bigger claim is refused by parse_header before any use).
        let want = n.min(file_len.saturating_sub(8)).min(MAX_HEADER_LEN);
        (&mut f).take(want).read_to_end(&mut prefix).map_err(|e| bad(e.to_string()))?;
    }
    parse_header(&prefix, file_len).map_err(bad)
}

/// Reads every tensor and the metadata of a safetensors file.
pub fn load(path: &Path) -> crate::Result<(Vec<StTensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| err::io(format!("cannot read {}: {e}", path.display())))?;
    let header = parse_header(&bytes, bytes.len() as u64)
        .map_err(|e| err::io(format!("{} is not a safetensors file: {e}", path.display())))?;
    let data = &bytes[header.data_start()..];
    let mut out = Vec::with_capacity(header.tensors.len());
    for t in header.tensors {
        let (s, e) = t.data_offsets;
        out.push(StTensor {
            dtype: from_st_dtype(t.dtype, &t.name, path)?,
            shape: t.shape,
            bytes: data[s..e].to_vec(),
            name: t.name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, header.metadata))
}

/// Writes `bytes` to `path` through `<path>.tmp` + fsync + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut f = std::fs::File::create(&tmp).map_err(|e| err::io(format!("cannot create {}: {e}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| err::io(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| err::io(format!("cannot rename {} to {}: {e}", tmp.display(), path.display())))
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

    /// Many metadata keys (a HashMap's order would differ between processes and runs) and
    /// tensors given in any order: the same bytes, readable by the safetensors crate.
    #[test]
    fn serialization_is_deterministic_and_standard() {
        let meta: BTreeMap<String, String> = (0..20).map(|i| (format!("key{i}"), format!("v{i}"))).collect();
        let a = StTensor::from_f32("z.weight", &[3], &[1.0, 2.0, 3.0]);
        let b = StTensor {
            name: "a.step".into(),
            dtype: DataType::I64,
            shape: vec![1],
            bytes: 7i64.to_le_bytes().to_vec(),
        };
        let c = StTensor {
            name: "m.f64".into(),
            dtype: F64,
            shape: vec![2],
            bytes: [0.5f64, -1.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let x = serialize(&[a.clone(), b.clone(), c.clone()], &meta).unwrap();
        let y = serialize(&[c.clone(), a.clone(), b.clone()], &meta).unwrap();
        assert_eq!(x, y);
        assert_eq!(u64::from_le_bytes(x[..8].try_into().unwrap()) % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&x).unwrap();
        assert_eq!(st.tensor("z.weight").unwrap().data(), &a.bytes[..]);
        assert_eq!(st.tensor("m.f64").unwrap().dtype(), Dtype::F64);
        let (_, m) = safetensors::SafeTensors::read_metadata(&x).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap().len(), 20);
        let h = parse_header(&x, x.len() as u64).unwrap();
        assert_eq!(h.metadata, meta);
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.step", "m.f64", "z.weight"], "I64 and F64 (8 bytes) before F32");
        // Bad input.
        let short = StTensor { bytes: vec![0; 11], ..a.clone() };
        assert!(serialize(&[short], &meta).unwrap_err().message.contains("has 11 bytes, expected 12"));
        assert!(serialize(&[a.clone(), a], &BTreeMap::new()).unwrap_err().message.contains("twice"));
    }

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }
}
