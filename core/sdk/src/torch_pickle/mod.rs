//! A restricted reader of `torch.save` files (`.pt`, `.pth`, `.pth.tar`) that never runs code:
//! `torch.load(f, weights_only=True)` semantics in pure Rust, so that any plugin can read a
//! published checkpoint without libtorch and without trusting the file.
//!
//! Two containers: the zip archive of torch >= 1.6 (`<archive>/data.pkl` + one STORED entry per
//! storage, `<archive>/data/<key>`) and the legacy stream (magic-number, protocol and sys-info
//! pickles, the object pickle, the storage-key list, then each storage as a u64 element count
//! and its bytes). The object pickle runs on a small pickle VM whose only callables are the
//! allowlisted torch rebuild functions and plain containers, applied in Rust; any other
//! `GLOBAL` is refused before anything could be called. Every length read from the file is
//! checked against the bytes that remain, so allocations stay bounded by the input's size.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

mod vm;
mod zip;

use vm::{Layout, TensorRef, Value, Vm, MAX_DEPTH};

/// Element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// `torch.<name>Storage` (the typed storages' pickle names).
    fn from_storage(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    /// `torch.<name>` dtype objects, with their aliases.
    fn from_torch(name: &str) -> Option<DType> {
        Some(match name {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }
}

/// One tensor, materialised: contiguous row-major little-endian bytes after applying the
/// storage offset and strides.
#[derive(Debug, Clone)]
pub struct PickledTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Why a checkpoint could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("{}: cannot read the checkpoint: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: the pickle references `{global}`, which a weights-only load refuses (it could run code); \
         this reader accepts only tensors and plain containers: re-save the file as a plain state_dict \
         (torch.save(model.state_dict(), f)) or as safetensors",
        path.display()
    )]
    ForbiddenGlobal { path: PathBuf, global: String },
    #[error("{}: not a readable torch.save file: {what} (re-save it with torch.save or as safetensors)", path.display())]
    Format { path: PathBuf, what: String },
    #[error("{}: tensor `{tensor}`: {what}", path.display())]
    Tensor { path: PathBuf, tensor: String, what: String },
}

/// The file's bytes behind each storage key.
type Storages = HashMap<String, Range<usize>>;

fn fmt_err(path: &Path, what: impl Into<String>) -> PickleError {
    PickleError::Format { path: path.into(), what: what.into() }
}

fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    Some(b.get(at..at.checked_add(n)?)?.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
}

/// Reads a `torch.save()` file and returns every tensor reachable in its object, named by the
/// dotted path of dict keys and list/tuple indices (`state_dict.conv1.weight`; a bare tensor is
/// named `""`).
pub fn load(path: &Path) -> Result<Vec<(String, PickledTensor)>, PickleError> {
    let bytes = std::fs::read(path).map_err(|source| PickleError::Io { path: path.into(), source })?;
    load_bytes(path, &bytes)
}

/// [`load`] of bytes already in memory; `path` only names them in errors.
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<(String, PickledTensor)>, PickleError> {
    let (root, storages) = read(path, bytes)?;
    let mut out = Vec::new();
    walk(path, &root, &mut String::new(), 0, &mut Budget::new(bytes.len()), &storages, bytes, &mut out)?;
    Ok(out)
}

/// The object pickle's value and where each storage's bytes lie.
fn read(path: &Path, bytes: &[u8]) -> Result<(Value, Storages), PickleError> {
    Ok(if bytes.starts_with(b"PK\x03\x04") {
        let entries = zip::zip_entries(path, bytes)?;
        let pkl = entries
            .iter()
            .find(|(n, _)| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| fmt_err(path, "zip archive without `<archive>/data.pkl`"))?;
        let prefix = pkl.0.trim_end_matches("data.pkl").to_string();
        if let Some((_, r)) = entries.iter().find(|(n, _)| *n == format!("{prefix}byteorder")) {
            if &bytes[r.clone()] != b"little" {
                return Err(fmt_err(path, "a big-endian checkpoint (`byteorder` is not `little`)"));
            }
        }
        let range = pkl.1.clone();
        let root = Vm::new(path, &bytes[..range.end], range.start, Layout::Zip).run()?;
        let dir = format!("{prefix}data/");
        let storages =
            entries.into_iter().filter_map(|(n, r)| n.strip_prefix(&dir).map(|k| (k.to_string(), r))).collect();
        (root, storages)
    } else {
        legacy(path, bytes)?
    })
}

/// The legacy stream: magic, protocol version, sys info, object, storage keys, storages.
fn legacy(path: &Path, b: &[u8]) -> Result<(Value, Storages), PickleError> {
    // 0x1950a86a20f9469cfc6c as LONG1 writes it (little-endian two's complement).
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let mut vm = Vm::new(path, b, 0, Layout::Legacy);
    match vm.run() {
        Ok(Value::BigInt(m)) if *m == MAGIC => {}
        // A bare pickle with a payload: say what it would have run.
        Err(e @ PickleError::ForbiddenGlobal { .. }) => return Err(e),
        _ => return Err(fmt_err(path, "neither a zip archive nor a legacy torch.save stream (no magic number)")),
    }
    // Each pickle of the stream has its own stack and memo.
    let next = |vm: &mut Vm| {
        vm.stack.clear();
        vm.marks.clear();
        vm.memo.clear();
        vm.run()
    };
    if !matches!(next(&mut vm)?, Value::Int(1001)) {
        return Err(fmt_err(path, "legacy protocol version is not 1001"));
    }
    if let Value::Dict(d) = next(&mut vm)? {
        let items = d.items.borrow();
        let big =
            items.iter().any(|(k, v)| matches!((k, v), (Value::Str(k), Value::Bool(false)) if &**k == "little_endian"));
        if big {
            return Err(fmt_err(path, "a big-endian checkpoint (sys_info little_endian = False)"));
        }
    }
    let root = next(&mut vm)?;
    // Element sizes of the root storages, from the persistent ids the object referenced.
    let sizes = std::mem::take(&mut vm.element_sizes);
    let Value::List(keys) = next(&mut vm)? else { return Err(fmt_err(path, "legacy storage-key list missing")) };
    let mut at = vm.pos;
    let mut storages = Storages::new();
    for k in keys.items.borrow().iter() {
        let Value::Str(k) = k else { return Err(fmt_err(path, "a legacy storage key that is not a string")) };
        let el = *sizes.get(&**k).ok_or_else(|| fmt_err(path, format!("legacy storage `{k}` is never referenced")))?;
        let n = le(b, at, 8).ok_or_else(|| fmt_err(path, format!("legacy storage `{k}`: truncated size")))?;
        let end = usize::try_from(n).ok().and_then(|n| n.checked_mul(el)).and_then(|n| n.checked_add(at + 8));
        let end = end.filter(|&e| e <= b.len());
        let end = end.ok_or_else(|| fmt_err(path, format!("legacy storage `{k}`: {n} elements run past the end")))?;
        storages.insert(k.to_string(), at + 8..end);
        at = end;
    }
    Ok((root, storages))
}

/// What the name walk may still do. A pickle can reference one container or tensor many times
/// over (memo gets cost two bytes), so a few bytes could name a tensor exponentially often or
/// copy one storage far beyond the file's size: both are capped.
struct Budget {
    visits: usize,
    bytes: usize,
}

impl Budget {
    /// One visit per input byte, and tensor data of 4× the file (tied weights and views of one
    /// storage repeat bytes, a few times at most).
    fn new(len: usize) -> Self {
        Budget { visits: len + 64, bytes: 4 * len + (1 << 20) }
    }
}

/// Collects the tensors under `v` as `name.key…`.
#[allow(clippy::too_many_arguments)]
fn walk(
    path: &Path,
    v: &Value,
    name: &mut String,
    depth: u32,
    budget: &mut Budget,
    storages: &Storages,
    bytes: &[u8],
    out: &mut Vec<(String, PickledTensor)>,
) -> Result<(), PickleError> {
    if depth > MAX_DEPTH || budget.visits == 0 {
        return Err(fmt_err(
            path,
            format!("the object nests deeper than {MAX_DEPTH} or repeats itself beyond its size"),
        ));
    }
    budget.visits -= 1;
    let mut child = |key: &str, v: &Value, out: &mut Vec<_>, budget: &mut Budget| {
        let len = name.len();
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(key);
        let r = walk(path, v, name, depth + 1, budget, storages, bytes, out);
        name.truncate(len);
        r
    };
    match v {
        Value::Tensor(t) => {
            let tensor = materialise(t, storages, bytes).map_err(|what| PickleError::Tensor {
                path: path.into(),
                tensor: name.clone(),
                what,
            })?;
            budget.bytes = budget.bytes.checked_sub(tensor.data.len()).ok_or_else(|| {
                fmt_err(path, format!("tensor `{name}`: the tensors repeat their storages beyond 4x the file's size"))
            })?;
            out.push((name.clone(), tensor));
        }
        Value::Dict(d) => {
            for (k, x) in d.items.borrow().iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    Value::Bool(b) => b.to_string(),
                    // A key we cannot spell holds no state_dict entry; tensors under it are
                    // still reported, under `?`.
                    _ => "?".to_string(),
                };
                child(&key, x, out, budget)?;
            }
        }
        Value::List(l) => {
            for (i, x) in l.items.borrow().iter().enumerate() {
                child(&i.to_string(), x, out, budget)?;
            }
        }
        Value::Tuple(t, _) => {
            for (i, x) in t.iter().enumerate() {
                child(&i.to_string(), x, out, budget)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Copies a tensor's elements out of its storage in row-major order.
fn materialise(t: &TensorRef, storages: &Storages, bytes: &[u8]) -> Result<PickledTensor, String> {
    let s = &t.storage;
    let el = s.dtype.size();
    let range = storages.get(&s.key).ok_or_else(|| format!("storage `{}` is missing from the file", s.key))?;
    let whole = &bytes[range.clone()];
    let data = whole
        .get(s.offset..)
        .and_then(|d| d.get(..s.nbytes))
        .ok_or_else(|| format!("storage `{}` holds {} bytes, the pickle declares {}", s.key, whole.len(), s.nbytes))?;
    if s.offset == 0 && data.len() != whole.len() {
        return Err(format!("storage `{}` holds {} bytes, the pickle declares {}", s.key, whole.len(), s.nbytes));
    }
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let mut out = Vec::new();
    if numel > 0 {
        // The last element read, and the bytes copied, must both stay inside the storage: an
        // expanded (stride-0) tensor larger than its storage is refused rather than blown up.
        let last =
            t.shape.iter().zip(&t.stride).try_fold(t.offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
        let fits = last.and_then(|l| l.checked_add(1)?.checked_mul(el)).is_some_and(|e| e <= data.len());
        if !fits || numel * el > data.len() {
            return Err(format!(
                "shape {:?} strides {:?} offset {} reach past its storage `{}` of {} bytes",
                t.shape,
                t.stride,
                t.offset,
                s.key,
                data.len()
            ));
        }
        out.reserve_exact(numel * el);
        let mut row_major = 1;
        let contiguous = t.shape.iter().zip(&t.stride).rev().all(|(&d, &s)| {
            let ok = d == 1 || s == row_major;
            row_major *= d;
            ok
        });
        if contiguous {
            out.extend_from_slice(&data[t.offset * el..(t.offset + numel) * el]);
            return Ok(PickledTensor { dtype: s.dtype, shape: t.shape.clone(), data: out });
        }
        let mut idx = vec![0usize; t.shape.len()];
        let mut off = t.offset;
        for _ in 0..numel {
            out.extend_from_slice(&data[off * el..(off + 1) * el]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                off += t.stride[d];
                if idx[d] < t.shape[d] {
                    break;
                }
                off -= t.stride[d] * t.shape[d];
                idx[d] = 0;
            }
        }
    }
    Ok(PickledTensor { dtype: s.dtype, shape: t.shape.clone(), data: out })
}

/// The model weights in a checkpoint: the tensors of its `state_dict` (or else `model`) dict
/// with that prefix stripped when it has one, else the top-level tensors; a leading `module.`
/// (DataParallel) is stripped from every name.
pub fn load_state_dict(path: &Path) -> Result<Vec<(String, PickledTensor)>, PickleError> {
    let bytes = std::fs::read(path).map_err(|source| PickleError::Io { path: path.into(), source })?;
    load_state_dict_bytes(path, &bytes)
}

/// [`load_state_dict`] of bytes already in memory; `path` only names them in errors.
pub fn load_state_dict_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<(String, PickledTensor)>, PickleError> {
    let (root, storages) = read(path, bytes)?;
    let mut out = Vec::new();
    let budget = &mut Budget::new(bytes.len());
    let Value::Dict(d) = &root else {
        return Err(fmt_err(path, format!("the checkpoint is a {}, not a dict of weights", root.kind())));
    };
    {
        let items = d.items.borrow();
        let named = |key: &str| {
            items.iter().find_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Dict(_)) if &**k == key => Some(v),
                _ => None,
            })
        };
        if let Some(sub) = named("state_dict").or_else(|| named("model")) {
            walk(path, sub, &mut String::new(), 0, budget, &storages, bytes, &mut out)?;
        } else {
            for (k, v) in items.iter() {
                if let (Value::Str(k), Value::Tensor(_)) = (k, v) {
                    walk(path, v, &mut k.to_string(), 1, budget, &storages, bytes, &mut out)?;
                }
            }
        }
    }
    for (n, _) in &mut out {
        if let Some(rest) = n.strip_prefix("module.") {
            *n = rest.to_string();
        }
    }
    Ok(out)
}
