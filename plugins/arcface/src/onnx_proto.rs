//! A minimal, dependency-free reader of the ONNX protobuf wire format: just enough of
//! `ModelProto` to rebuild a recognizer network from its graph (nodes, initializers, inputs and
//! outputs, `Constant` tensors, opset).
//!
//! Field numbers are those of `onnx/onnx.proto` (IR version ≤ 10):
//! `ModelProto{ir_version=1, opset_import=8, graph=7}`,
//! `GraphProto{node=1, name=2, initializer=5, input=11, output=12}`,
//! `NodeProto{input=1, output=2, name=3, op_type=4, attribute=5, domain=7}`,
//! `AttributeProto{name=1, f=2, i=3, s=4, t=5, floats=7, ints=8, type=20}`,
//! `TensorProto{dims=1, data_type=2, float_data=4, int32_data=5, int64_data=7, name=8,
//! raw_data=9, double_data=10, external_data=13, data_location=14}`,
//! `ValueInfoProto{name=1, type=2}` → `TypeProto{tensor_type=1}` →
//! `Tensor{elem_type=1, shape=2}` → `TensorShapeProto{dim=1}` → `Dimension{dim_value=1,
//! dim_param=2}`. Unknown fields are skipped, as protobuf requires. Repeated scalars are
//! accepted packed and unpacked. Tensors stored as external data are refused with an error
//! that says so (InsightFace's recognizers are single files).
//!
//! Every error names the file and what was malformed.

use std::collections::BTreeMap;
use std::path::Path;

/// ONNX `TensorProto.DataType` values this reader decodes.
pub mod data_type {
    pub const FLOAT: i32 = 1;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const DOUBLE: i32 = 11;
}

/// The decoded values of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A `TensorProto` (initializer or `Constant` value), decoded to host values.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxTensor {
    pub name: String,
    pub dims: Vec<i64>,
    /// The ONNX `data_type` as stored (FLOAT and DOUBLE decode to `F32`; INT32/INT64 to `I64`).
    pub data_type: i32,
    pub data: TensorData,
}

impl OnnxTensor {
    /// The number of elements (0 with a negative dimension; `usize::MAX` when the product
    /// overflows, which `parse_tensor` never returns).
    pub fn numel(&self) -> usize {
        if self.dims.iter().any(|&d| d < 0) {
            return 0;
        }
        self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize)).unwrap_or(usize::MAX)
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Some(v),
            _ => None,
        }
    }
}

/// An `AttributeProto` value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(OnnxTensor),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    /// Kinds this reader does not decode (graphs, sparse tensors, lists of strings…): the
    /// `AttributeProto.type` value.
    Other(i32),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: BTreeMap<String, Attribute>,
}

impl Node {
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attributes.get(name) {
            Some(Attribute::Int(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attributes.get(name) {
            Some(Attribute::Float(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attributes.get(name) {
            Some(Attribute::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn attr_string(&self, name: &str) -> Option<String> {
        match self.attributes.get(name) {
            Some(Attribute::String(v)) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        }
    }

    /// A readable label for errors: `op_type` and name.
    pub fn label(&self) -> String {
        format!("{} node `{}`", self.op_type, self.name)
    }
}

/// A dimension of a graph input/output shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
    Unknown,
}

/// A `ValueInfoProto` (graph input or output).
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    /// `None` when the type carries no shape.
    pub shape: Option<Vec<Dim>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<OnnxTensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

impl Graph {
    /// Graph inputs that are not initializers (the real inputs; older exports list weights too).
    pub fn data_inputs(&self) -> Vec<&ValueInfo> {
        let init: std::collections::HashSet<&str> = self.initializers.iter().map(|t| t.name.as_str()).collect();
        self.inputs.iter().filter(|v| !init.contains(v.name.as_str())).collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    /// `(domain, version)` pairs; the default domain is `""`.
    pub opset_import: Vec<(String, i64)>,
    pub graph: Graph,
}

impl Model {
    /// The opset of the default (`""` / `ai.onnx`) domain.
    pub fn opset(&self) -> Option<i64> {
        self.opset_import.iter().find(|(d, _)| d.is_empty() || d == "ai.onnx").map(|(_, v)| *v)
    }
}

/// Reads and decodes an ONNX file.
pub fn load(path: &Path) -> Result<Model, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read the ONNX file: {e}", path.display()))?;
    parse_model(&bytes).map_err(|e| format!("{}: not a readable ONNX model: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Wire format

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A field value: varint, fixed 64-bit, length-delimited bytes or fixed 32-bit.
enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!(
                "field of {n} bytes at byte {} runs past the end of its message ({} bytes)",
                self.pos,
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next(&mut self) -> Result<Option<(u32, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        if field == 0 {
            return Err(format!("field number 0 at byte {}", self.pos));
        }
        let v = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            w => return Err(format!("unsupported wire type {w} (field {field}) at byte {}", self.pos)),
        };
        Ok(Some((field, v)))
    }
}

fn bytes<'a>(v: Value<'a>, what: &str) -> Result<&'a [u8], String> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(format!("{what}: expected a length-delimited field")),
    }
}

fn string(v: Value<'_>, what: &str) -> Result<String, String> {
    let b = bytes(v, what)?;
    String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
}

fn int(v: Value<'_>, what: &str) -> Result<i64, String> {
    match v {
        Value::Varint(x) => Ok(x as i64),
        _ => Err(format!("{what}: expected a varint")),
    }
}

fn float(v: Value<'_>, what: &str) -> Result<f32, String> {
    match v {
        Value::Fixed32(x) => Ok(f32::from_bits(x)),
        _ => Err(format!("{what}: expected a 32-bit float")),
    }
}

/// A repeated varint field, packed or not, appended to `out`.
fn push_ints(v: Value<'_>, out: &mut Vec<i64>, what: &str) -> Result<(), String> {
    match v {
        Value::Varint(x) => out.push(x as i64),
        Value::Bytes(b) => {
            let mut r = Reader::new(b);
            while r.pos < b.len() {
                out.push(r.varint().map_err(|e| format!("{what}: {e}"))? as i64);
            }
        }
        _ => return Err(format!("{what}: expected varints")),
    }
    Ok(())
}

/// A repeated float field, packed or not.
fn push_floats(v: Value<'_>, out: &mut Vec<f32>, what: &str) -> Result<(), String> {
    match v {
        Value::Fixed32(x) => out.push(f32::from_bits(x)),
        Value::Bytes(b) => {
            if b.len() % 4 != 0 {
                return Err(format!("{what}: packed floats of {} bytes (not a multiple of 4)", b.len()));
            }
            out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())));
        }
        _ => return Err(format!("{what}: expected 32-bit floats")),
    }
    Ok(())
}

/// A repeated double field, packed or not (decoded to f32).
fn push_doubles(v: Value<'_>, out: &mut Vec<f32>, what: &str) -> Result<(), String> {
    match v {
        Value::Fixed64(x) => out.push(f64::from_bits(x) as f32),
        Value::Bytes(b) => {
            if b.len() % 8 != 0 {
                return Err(format!("{what}: packed doubles of {} bytes (not a multiple of 8)", b.len()));
            }
            out.extend(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32));
        }
        _ => return Err(format!("{what}: expected 64-bit doubles")),
    }
    Ok(())
}

pub fn parse_model(buf: &[u8]) -> Result<Model, String> {
    let mut m = Model::default();
    let mut r = Reader::new(buf);
    let mut saw_graph = false;
    while let Some((f, v)) = r.next()? {
        match f {
            1 => m.ir_version = int(v, "ModelProto.ir_version")?,
            7 => {
                m.graph = parse_graph(bytes(v, "ModelProto.graph")?)?;
                saw_graph = true;
            }
            8 => {
                let mut rr = Reader::new(bytes(v, "ModelProto.opset_import")?);
                let (mut d, mut ver) = (String::new(), 0);
                while let Some((f, v)) = rr.next()? {
                    match f {
                        1 => d = string(v, "OperatorSetIdProto.domain")?,
                        2 => ver = int(v, "OperatorSetIdProto.version")?,
                        _ => {}
                    }
                }
                m.opset_import.push((d, ver));
            }
            _ => {}
        }
    }
    if !saw_graph {
        return Err("ModelProto has no graph (field 7)".into());
    }
    Ok(m)
}

pub fn parse_graph(buf: &[u8]) -> Result<Graph, String> {
    let mut g = Graph::default();
    let mut r = Reader::new(buf);
    while let Some((f, v)) = r.next()? {
        match f {
            1 => {
                let i = g.nodes.len();
                g.nodes.push(parse_node(bytes(v, "GraphProto.node")?).map_err(|e| format!("graph node #{i}: {e}"))?)
            }
            2 => g.name = string(v, "GraphProto.name")?,
            5 => {
                let i = g.initializers.len();
                g.initializers.push(
                    parse_tensor(bytes(v, "GraphProto.initializer")?).map_err(|e| format!("initializer #{i}: {e}"))?,
                )
            }
            11 => {
                g.inputs.push(parse_value_info(bytes(v, "GraphProto.input")?).map_err(|e| format!("graph input: {e}"))?)
            }
            12 => g
                .outputs
                .push(parse_value_info(bytes(v, "GraphProto.output")?).map_err(|e| format!("graph output: {e}"))?),
            _ => {}
        }
    }
    Ok(g)
}

pub fn parse_node(buf: &[u8]) -> Result<Node, String> {
    let mut n = Node::default();
    let mut r = Reader::new(buf);
    while let Some((f, v)) = r.next()? {
        match f {
            1 => n.inputs.push(string(v, "NodeProto.input")?),
            2 => n.outputs.push(string(v, "NodeProto.output")?),
            3 => n.name = string(v, "NodeProto.name")?,
            4 => n.op_type = string(v, "NodeProto.op_type")?,
            5 => {
                let (name, a) = parse_attribute(bytes(v, "NodeProto.attribute")?)
                    .map_err(|e| format!("{} node `{}`: attribute: {e}", n.op_type, n.name))?;
                n.attributes.insert(name, a);
            }
            7 => n.domain = string(v, "NodeProto.domain")?,
            _ => {}
        }
    }
    Ok(n)
}

fn parse_attribute(buf: &[u8]) -> Result<(String, Attribute), String> {
    let mut r = Reader::new(buf);
    let (mut name, mut ty) = (String::new(), 0i32);
    let (mut f_, mut i_, mut s_, mut t_) = (None, None, None, None);
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    while let Some((f, v)) = r.next()? {
        match f {
            1 => name = string(v, "AttributeProto.name")?,
            2 => f_ = Some(float(v, "AttributeProto.f")?),
            3 => i_ = Some(int(v, "AttributeProto.i")?),
            4 => s_ = Some(bytes(v, "AttributeProto.s")?.to_vec()),
            5 => t_ = Some(parse_tensor(bytes(v, "AttributeProto.t")?)?),
            7 => push_floats(v, &mut floats, "AttributeProto.floats")?,
            8 => push_ints(v, &mut ints, "AttributeProto.ints")?,
            20 => ty = int(v, "AttributeProto.type")? as i32,
            _ => {}
        }
    }
    // AttributeType: FLOAT=1 INT=2 STRING=3 TENSOR=4 GRAPH=5 FLOATS=6 INTS=7 STRINGS=8.
    let a = match ty {
        1 => Attribute::Float(f_.unwrap_or(0.0)),
        2 => Attribute::Int(i_.unwrap_or(0)),
        3 => Attribute::String(s_.unwrap_or_default()),
        4 => Attribute::Tensor(t_.ok_or_else(|| format!("`{name}` is a TENSOR attribute without a tensor"))?),
        6 => Attribute::Floats(floats),
        7 => Attribute::Ints(ints),
        // IR < 3 files may omit `type`: infer it from the field present.
        0 => {
            if let Some(t) = t_ {
                Attribute::Tensor(t)
            } else if let Some(x) = f_ {
                Attribute::Float(x)
            } else if let Some(x) = i_ {
                Attribute::Int(x)
            } else if let Some(s) = s_ {
                Attribute::String(s)
            } else if !ints.is_empty() {
                Attribute::Ints(ints)
            } else if !floats.is_empty() {
                Attribute::Floats(floats)
            } else {
                Attribute::Other(0)
            }
        }
        other => Attribute::Other(other),
    };
    Ok((name, a))
}

pub fn parse_tensor(buf: &[u8]) -> Result<OnnxTensor, String> {
    let mut r = Reader::new(buf);
    let (mut name, mut dt) = (String::new(), 0i32);
    let mut dims = Vec::new();
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    let mut raw: Option<&[u8]> = None;
    let (mut external, mut location) = (false, 0i64);
    while let Some((f, v)) = r.next()? {
        match f {
            1 => push_ints(v, &mut dims, "TensorProto.dims")?,
            2 => dt = int(v, "TensorProto.data_type")? as i32,
            4 => push_floats(v, &mut floats, "TensorProto.float_data")?,
            // int32_data (also carries f16/bool/int8… which we do not decode).
            5 => push_ints(v, &mut ints, "TensorProto.int32_data")?,
            7 => push_ints(v, &mut ints, "TensorProto.int64_data")?,
            8 => name = string(v, "TensorProto.name")?,
            9 => raw = Some(bytes(v, "TensorProto.raw_data")?),
            10 => push_doubles(v, &mut floats, "TensorProto.double_data")?,
            13 => external = true,
            14 => location = int(v, "TensorProto.data_location")?,
            _ => {}
        }
    }
    let label = if name.is_empty() { "tensor".to_string() } else { format!("tensor `{name}`") };
    if external || location == 1 {
        return Err(format!(
            "{label}: external data not supported (the weights live in a separate file; \
             re-save the model with onnx.save(model, path, save_as_external_data=False))"
        ));
    }
    if dims.iter().any(|&d| d < 0) {
        return Err(format!("{label}: negative dimension in {dims:?}"));
    }
    // The dims are untrusted: their product (and its size in bytes) must not overflow, and the
    // values must then be present in the message, so nothing is allocated from the dims alone.
    let Some(n) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?)) else {
        return Err(format!("{label}: dims {dims:?} hold more than 2^64 elements"));
    };
    let raw_len = |b: &[u8], w: usize, what: &str| match n.checked_mul(w) {
        Some(want) if want == b.len() => Ok(()),
        want => Err(format!(
            "{label}: raw_data has {} bytes, {what} {dims:?} needs {}",
            b.len(),
            want.map_or("more than 2^64".to_string(), |w| w.to_string())
        )),
    };
    let data = match dt {
        data_type::FLOAT => {
            let v = match raw {
                Some(b) => {
                    raw_len(b, 4, "FLOAT")?;
                    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
                }
                None => floats,
            };
            TensorData::F32(v)
        }
        data_type::DOUBLE => {
            let v = match raw {
                Some(b) => {
                    raw_len(b, 8, "DOUBLE")?;
                    b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
                }
                None => floats,
            };
            TensorData::F32(v)
        }
        data_type::INT64 | data_type::INT32 => {
            let w = if dt == data_type::INT64 { 8 } else { 4 };
            let v = match raw {
                Some(b) => {
                    raw_len(b, w, if w == 8 { "INT64" } else { "INT32" })?;
                    if w == 8 {
                        b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
                    } else {
                        b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
                    }
                }
                // int32_data holds varint-encoded (sign-extended) values.
                None => ints.into_iter().map(|x| if w == 4 { x as i32 as i64 } else { x }).collect(),
            };
            TensorData::I64(v)
        }
        other => return Err(format!("{label}: data_type {other} is not supported (FLOAT, DOUBLE, INT32, INT64 are)")),
    };
    let got = match &data {
        TensorData::F32(v) => v.len(),
        TensorData::I64(v) => v.len(),
    };
    if got != n {
        return Err(format!("{label}: {got} values for dims {dims:?} ({n} expected)"));
    }
    Ok(OnnxTensor { name, dims, data_type: dt, data })
}

fn parse_value_info(buf: &[u8]) -> Result<ValueInfo, String> {
    let mut r = Reader::new(buf);
    let mut vi = ValueInfo { name: String::new(), elem_type: 0, shape: None };
    while let Some((f, v)) = r.next()? {
        match f {
            1 => vi.name = string(v, "ValueInfoProto.name")?,
            2 => {
                // TypeProto.tensor_type = 1
                let mut tr = Reader::new(bytes(v, "ValueInfoProto.type")?);
                while let Some((f, v)) = tr.next()? {
                    if f != 1 {
                        continue;
                    }
                    let mut rr = Reader::new(bytes(v, "TypeProto.tensor_type")?);
                    while let Some((f, v)) = rr.next()? {
                        match f {
                            1 => vi.elem_type = int(v, "TypeProto.Tensor.elem_type")? as i32,
                            2 => {
                                let mut dims = Vec::new();
                                let mut sr = Reader::new(bytes(v, "TypeProto.Tensor.shape")?);
                                while let Some((f, v)) = sr.next()? {
                                    if f != 1 {
                                        continue;
                                    }
                                    let mut d = Dim::Unknown;
                                    let mut dr = Reader::new(bytes(v, "TensorShapeProto.dim")?);
                                    while let Some((f, v)) = dr.next()? {
                                        match f {
                                            1 => d = Dim::Fixed(int(v, "Dimension.dim_value")?),
                                            2 => d = Dim::Symbolic(string(v, "Dimension.dim_param")?),
                                            _ => {}
                                        }
                                    }
                                    dims.push(d);
                                }
                                vi.shape = Some(dims);
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(vi)
}

/// A tiny protobuf encoder, for hand-made messages in tests (the unit tests below and the
/// fuzz test's valid model).
pub mod encode {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    /// A field key: field number `f`, wire type `w`.
    pub fn key(f: u32, w: u32, out: &mut Vec<u8>) {
        varint(((f << 3) | w) as u64, out);
    }
    pub fn field_bytes(f: u32, b: &[u8], out: &mut Vec<u8>) {
        key(f, 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    pub fn field_varint(f: u32, v: u64, out: &mut Vec<u8>) {
        key(f, 0, out);
        varint(v, out);
    }
    pub fn field_f32(f: u32, x: f32, out: &mut Vec<u8>) {
        key(f, 5, out);
        out.extend_from_slice(&x.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;

    #[test]
    fn unpacked_dims_float_data_and_packed_ints() {
        // TensorProto: dims unpacked [2, 1], FLOAT, float_data unpacked 1.5, -2.0.
        let mut t = Vec::new();
        field_varint(1, 2, &mut t);
        field_varint(1, 1, &mut t);
        field_varint(2, 1, &mut t);
        for x in [1.5f32, -2.0] {
            key(4, 5, &mut t);
            t.extend_from_slice(&x.to_le_bytes());
        }
        field_bytes(8, b"w", &mut t);
        let got = parse_tensor(&t).unwrap();
        assert_eq!(got.dims, vec![2, 1]);
        assert_eq!(got.as_f32().unwrap(), &[1.5, -2.0]);

        // INT64 with packed int64_data, including a negative value (10-byte varint).
        let mut t = Vec::new();
        let mut packed = Vec::new();
        varint(3, &mut packed);
        field_bytes(1, &packed, &mut t);
        field_varint(2, 7, &mut t);
        let mut vals = Vec::new();
        for v in [1i64, -1, 512] {
            varint(v as u64, &mut vals);
        }
        field_bytes(7, &vals, &mut t);
        assert_eq!(parse_tensor(&t).unwrap().as_i64().unwrap(), &[1, -1, 512]);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        // Wrong value count.
        let mut t = Vec::new();
        field_varint(1, 3, &mut t);
        field_varint(2, 1, &mut t);
        field_bytes(9, &[0u8; 8], &mut t);
        field_bytes(8, b"bad", &mut t);
        let e = parse_tensor(&t).unwrap_err();
        assert!(e.contains("`bad`") && e.contains("raw_data"), "{e}");
        // External data.
        let mut t = Vec::new();
        field_bytes(8, b"ext", &mut t);
        field_varint(2, 1, &mut t);
        field_varint(14, 1, &mut t);
        let e = parse_tensor(&t).unwrap_err();
        assert!(e.contains("external data not supported"), "{e}");
        // Truncation.
        let e = parse_model(&[0x3a, 0x10, 0x01]).unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
        // No graph.
        assert!(parse_model(&[0x08, 0x07]).unwrap_err().contains("no graph"));
    }
}
