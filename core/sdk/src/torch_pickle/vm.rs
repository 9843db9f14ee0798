//! The pickle VM: protocols 0–5, the opcodes `torch.save` writes, and no code execution.
//! `GLOBAL`/`STACK_GLOBAL` resolve only the allowlist of [`allowlisted`]; `REDUCE`/`NEWOBJ`
//! apply those callables in Rust ([`Vm::call`]); persistent ids become storage references.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use super::{DType, PickleError};

/// Nesting deeper than this is refused (the name walk recurses, and so does dropping values).
pub(super) const MAX_DEPTH: u32 = 200;

pub(super) struct Container<T> {
    pub(super) items: RefCell<T>,
    pub(super) depth: Cell<u32>,
}

pub(super) type Shared<T> = Rc<Container<T>>;

pub(super) fn shared<T>(items: T) -> Value
where
    Value: From<Shared<T>>,
{
    Value::from(Rc::new(Container { items: RefCell::new(items), depth: Cell::new(1) }))
}

/// Allowlisted globals: the callables are applied by [`Vm::call`], the others are arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    Storage(DType),
    Dtype(DType),
    TensorClass,
    Size,
    Set,
    Encode,
}

pub(super) fn allowlisted(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => Global::Storage(DType::U8),
        ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => Global::TensorClass,
        ("torch", "Size") => Global::Size,
        // Protocol 2 spells `builtins` the Python 2 way (`fix_imports`); only the containers.
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::Set,
        // How protocol 2 pickles `bytes`: `_codecs.encode(text, "latin1")`.
        ("_codecs", "encode") => Global::Encode,
        ("torch", n) => DType::from_storage(n).map(Global::Storage).or(DType::from_torch(n).map(Global::Dtype))?,
        _ => return None,
    })
}

/// A storage named by a persistent id: `nbytes` are declared by the pickle and checked against
/// the data; a legacy view starts `offset` bytes into its root storage.
#[derive(Debug)]
pub(super) struct StorageRef {
    pub(super) dtype: DType,
    pub(super) key: String,
    pub(super) offset: usize,
    pub(super) nbytes: usize,
}

#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

#[derive(Clone)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (two's-complement little-endian): only compared.
    BigInt(Rc<[u8]>),
    /// A float: never needed (no weight is a Python float), so its value is not kept.
    Float,
    Str(Rc<str>),
    /// Bytes: never hold weights in a checkpoint (storages live outside the pickle).
    Bytes,
    List(Shared<Vec<Value>>),
    /// Items and nesting depth (kept: recomputing it would walk shared subtrees repeatedly).
    Tuple(Rc<[Value]>, u32),
    Dict(Shared<Vec<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

pub(super) fn tuple(items: Vec<Value>) -> Value {
    let d = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    Value::Tuple(items.into(), d)
}

impl From<Shared<Vec<Value>>> for Value {
    fn from(c: Shared<Vec<Value>>) -> Value {
        Value::List(c)
    }
}
impl From<Shared<Vec<(Value, Value)>>> for Value {
    fn from(c: Shared<Vec<(Value, Value)>>) -> Value {
        Value::Dict(c)
    }
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::List(c) => c.depth.get(),
            Value::Dict(c) => c.depth.get(),
            Value::Tuple(_, d) => *d,
            _ => 0,
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::List(_) => "list",
            Value::Tuple(..) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Which container the pickle came from: the persistent ids differ.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Layout {
    Zip,
    Legacy,
}

pub(super) struct Vm<'a> {
    pub(super) path: &'a Path,
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) layout: Layout,
    pub(super) stack: Vec<Value>,
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u32, Value>,
    /// Element size of every storage a persistent id named (the legacy data needs it).
    pub(super) element_sizes: HashMap<String, usize>,
}

impl<'a> Vm<'a> {
    pub(super) fn new(path: &'a Path, data: &'a [u8], pos: usize, layout: Layout) -> Self {
        Vm {
            path,
            data,
            pos,
            layout,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            element_sizes: HashMap::new(),
        }
    }

    fn err(&self, what: impl std::fmt::Display) -> PickleError {
        PickleError::Format { path: self.path.into(), what: format!("pickle at byte {}: {what}", self.pos) }
    }

    /// `n` bytes, refusing a declared length beyond the end of the input (never allocates).
    fn take(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(format!("a length of {n} bytes but only {left} remain")));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, PickleError> {
        let b = self.take(n as u64)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("a text argument without newline"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err("a text argument that is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: u64) -> Result<Value, PickleError> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| self.err("a string that is not UTF-8"))?;
        Ok(Value::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or_else(|| self.err("pop from an empty stack"))
    }

    fn top(&self) -> Result<&Value, PickleError> {
        self.stack.last().ok_or_else(|| self.err("empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let m = self.marks.pop().ok_or_else(|| self.err("no MARK"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if v.depth() > MAX_DEPTH {
            return Err(self.err(format!("containers nested deeper than {MAX_DEPTH}")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn memo_get(&self, i: u64) -> Result<Value, PickleError> {
        u32::try_from(i)
            .ok()
            .and_then(|i| self.memo.get(&i))
            .cloned()
            .ok_or_else(|| self.err(format!("memo {i} unset")))
    }

    fn memo_put(&mut self, i: u64) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        let i = u32::try_from(i).map_err(|_| self.err("memo index beyond u32"))?;
        self.memo.insert(i, v);
        Ok(())
    }

    /// Appends `items` to the list or set on the stack top.
    fn extend(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let d = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        match self.top()? {
            Value::List(c) => {
                c.items.borrow_mut().extend(items);
                c.depth.set(c.depth.get().max(d));
            }
            v => return Err(self.err(format!("APPEND to a {}", v.kind()))),
        }
        if d > MAX_DEPTH {
            return Err(self.err(format!("containers nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let d = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        match self.top()? {
            Value::Dict(c) => {
                let mut it = items.into_iter();
                let mut m = c.items.borrow_mut();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    m.push((k, v));
                }
                c.depth.set(c.depth.get().max(d));
            }
            v => return Err(self.err(format!("SETITEM on a {}", v.kind()))),
        }
        if d > MAX_DEPTH {
            return Err(self.err(format!("containers nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> Result<Value, PickleError> {
        allowlisted(module, name)
            .map(Value::Global)
            .ok_or_else(|| PickleError::ForbiddenGlobal { path: self.path.into(), global: format!("{module}.{name}") })
    }

    /// Runs the pickle from `self.pos` to its STOP; returns the object.
    pub(super) fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.take(1)?[0];
            match op {
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                0x80 => {
                    let p = self.take(1)?[0];
                    if p > 5 {
                        return Err(self.err(format!("pickle protocol {p} (0–5 are known)")));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint; the opcodes follow inline.
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => drop(self.pop()?),
                b'1' => drop(self.pop_mark()?),
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.uint(4)? as u32 as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.uint(1)? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.uint(2)? as i64;
                    self.push(Value::Int(v))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.uint(1)? } else { self.uint(4)? };
                    let b = self.take(n)?;
                    let v = if n <= 8 {
                        let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
                        let mut w = [if neg { 0xff } else { 0 }; 8];
                        w[..b.len()].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(w))
                    } else {
                        Value::BigInt(b.into())
                    };
                    self.push(v)?
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let v = match l {
                        "01" if op == b'I' => Value::Bool(true),
                        "00" if op == b'I' => Value::Bool(false),
                        _ => Value::Int(l.trim_end_matches('L').parse().map_err(|_| self.err(format!("int `{l}`")))?),
                    };
                    self.push(v)?
                }
                b'F' => {
                    let l = self.line()?;
                    l.parse::<f64>().map_err(|_| self.err(format!("float `{l}`")))?;
                    self.push(Value::Float)?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float)?
                }
                0x8c => {
                    let n = self.uint(1)?;
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'X' | 0x8d => {
                    let n = if op == b'X' { self.uint(4)? } else { self.uint(8)? };
                    let v = self.text(n)?;
                    self.push(v)?
                }
                b'V' | b'S' => {
                    // Protocol 0 text: raw-unicode-escape / a quoted repr; torch never writes
                    // escapes in the names it pickles, so they are kept as written.
                    let l = self.line()?;
                    let l = if op == b'S' { l.trim_matches(|c| c == '\'' || c == '"') } else { l };
                    self.push(Value::Str(l.into()))?
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'U' | b'C' => self.uint(1)?,
                        b'T' | b'B' => self.uint(4)?,
                        _ => self.uint(8)?,
                    };
                    self.take(n)?;
                    self.push(Value::Bytes)?
                }
                b'}' => self.push(shared(Vec::<(Value, Value)>::new()))?,
                b']' | 0x8f => self.push(shared(Vec::<Value>::new()))?,
                b')' => self.push(tuple(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(shared(Vec::<(Value, Value)>::new()))?;
                    self.set_items(items)?
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(shared(Vec::<Value>::new()))?;
                    self.extend(items)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("TUPLE of an empty stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(tuple(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend(vec![v])?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'p' => {
                    let l = self.line()?;
                    let i = l.parse().map_err(|_| self.err(format!("PUT index `{l}`")))?;
                    self.memo_put(i)?
                }
                b'q' => {
                    let i = self.uint(1)?;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.uint(4)?;
                    self.memo_put(i)?
                }
                0x94 => self.memo_put(self.memo.len() as u64)?,
                b'g' => {
                    let l = self.line()?;
                    let i = l.parse().map_err(|_| self.err(format!("GET index `{l}`")))?;
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.uint(1)? } else { self.uint(4)? };
                    let v = self.memo_get(i)?;
                    self.push(v)?
                }
                b'c' | b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    if op == b'i' {
                        return Err(self.err(format!("INST of `{module}.{name}` (not written by torch.save)")));
                    }
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL of non-strings"));
                    };
                    let g = self.global(m, n)?;
                    self.push(g)?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD sets attributes (an OrderedDict's `_metadata`, a parameter's
                    // Python state): they hold no weights and are dropped.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        v => return Err(self.err(format!("BUILD of a {}", v.kind()))),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)?
                }
                b'P' => return Err(self.err("a text persistent id (not written by torch.save)")),
                _ => return Err(self.err(format!("opcode 0x{op:02x} is not supported (torch.save never writes it)"))),
            }
        }
    }

    /// REDUCE / NEWOBJ of an allowlisted callable.
    fn call(&self, f: Value, args: Value) -> Result<Value, PickleError> {
        let Value::Tuple(a, _) = &args else { return Err(self.err(format!("call with {} arguments", args.kind()))) };
        let Value::Global(g) = f else { return Err(self.err(format!("call of a {}", f.kind()))) };
        let int = |v: &Value| match v {
            Value::Int(i) => usize::try_from(*i).map_err(|_| self.err(format!("negative size {i}"))),
            v => Err(self.err(format!("a {} where a size was expected", v.kind()))),
        };
        let ints = |v: &Value| match v {
            Value::Tuple(t, _) => t.iter().map(int).collect::<Result<Vec<_>, _>>(),
            v => Err(self.err(format!("a {} where a shape was expected", v.kind()))),
        };
        match (g, &a[..]) {
            (Global::OrderedDict, []) => Ok(shared(Vec::<(Value, Value)>::new())),
            (Global::Set, []) => Ok(shared(Vec::<Value>::new())),
            (Global::Set, [Value::List(l)]) => Ok(shared(l.items.borrow().clone())),
            (Global::Size, [t @ Value::Tuple(..)]) => Ok(t.clone()),
            (Global::Encode, [Value::Str(s), Value::Str(enc)]) if matches!(&**enc, "latin1" | "latin-1") => {
                if s.chars().any(|c| c as u32 > 0xff) {
                    return Err(self.err("_codecs.encode of non-latin-1 text"));
                }
                Ok(Value::Bytes)
            }
            (Global::RebuildTensorV2, [Value::Storage(s), off, size, stride, _, _, ..])
            | (Global::RebuildTensor, [Value::Storage(s), off, size, stride]) => {
                let (shape, stride) = (ints(size)?, ints(stride)?);
                if shape.len() != stride.len() {
                    return Err(self.err(format!("a tensor of shape {shape:?} with strides {stride:?}")));
                }
                Ok(Value::Tensor(Rc::new(TensorRef { storage: s.clone(), offset: int(off)?, shape, stride })))
            }
            (Global::RebuildParameter, [t @ Value::Tensor(_), _, _])
            | (Global::RebuildParameterWithState, [t @ Value::Tensor(_), _, _, _]) => Ok(t.clone()),
            (Global::RebuildFromTypeV2, [f, Value::Global(Global::TensorClass), inner, _]) => {
                self.call(f.clone(), inner.clone())
            }
            (g, a) => Err(self.err(format!(
                "call of {g:?} with ({}) is not what torch.save writes",
                a.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The storage a persistent id names: zip `('storage', type, key, location, numel)`, legacy
    /// `('storage', type, root_key, location, numel, view)` with `view = (key, offset, numel)`.
    fn persistent(&mut self, pid: Value) -> Result<Value, PickleError> {
        let Value::Tuple(t, _) = &pid else { return Err(self.err("a persistent id that is not a tuple")) };
        let (ty, key, numel, view) = match (&t[..], self.layout) {
            ([Value::Str(tag), ty, Value::Str(key), _, Value::Int(n)], Layout::Zip) if &**tag == "storage" => {
                (ty, key, *n, &Value::None)
            }
            ([Value::Str(tag), ty, Value::Str(key), _, Value::Int(n), view], Layout::Legacy) if &**tag == "storage" => {
                (ty, key, *n, view)
            }
            _ => return Err(self.err("a persistent id that is not ('storage', type, key, location, numel)")),
        };
        let dtype = match ty {
            Value::Global(Global::Storage(d) | Global::Dtype(d)) => *d,
            v => return Err(self.err(format!("a storage type that is a {}", v.kind()))),
        };
        let bytes = |n: i64| {
            usize::try_from(n).ok().and_then(|n| n.checked_mul(dtype.size())).ok_or_else(|| self.err("storage size"))
        };
        let (offset, nbytes) = match view {
            Value::None => (0, bytes(numel)?),
            Value::Tuple(v, _) => match &v[..] {
                [_, Value::Int(off), Value::Int(n)] => (bytes(*off)?, bytes(*n)?),
                _ => return Err(self.err("a storage view that is not (key, offset, size)")),
            },
            v => return Err(self.err(format!("a storage view that is a {}", v.kind()))),
        };
        self.element_sizes.insert(key.to_string(), dtype.size());
        Ok(Value::Storage(Rc::new(StorageRef { dtype, key: key.to_string(), offset, nbytes })))
    }
}
