//! Parameter store: records every parameter under its diffusers name, and every Linear/Conv2d
//! under its module path (the LoRA injection targets).

use crate::nn::{LoraSlot, Net};
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Allocate every parameter (zeros; the loader fills them).
    Alloc,
    /// Shape only: zero-stride views of one element, no memory per parameter.
    Plan,
}

/// A Linear or Conv2d layer as seen by LoRA injection.
#[derive(Clone)]
pub struct Target {
    pub path: String,
    /// `[out, in]` for a Linear, `[out, in, kh, kw]` for a Conv2d.
    pub weight_shape: Vec<i64>,
    pub stride: i64,
    pub padding: i64,
    /// The main adapter ([`Net::Main`]).
    pub slot: LoraSlot,
    /// The second adapter ([`Net::Content`], PairEdit's content LoRA).
    pub content: LoraSlot,
}

impl Target {
    pub fn slot_of(&self, net: Net) -> &LoraSlot {
        match net {
            Net::Main => &self.slot,
            Net::Content => &self.content,
        }
    }
}

pub struct Store {
    pub mode: Mode,
    pub kind: Kind,
    pub device: Device,
    params: RefCell<Vec<(String, Tensor)>>,
    targets: RefCell<Vec<Target>>,
    /// Module-path prefixes whose Linear weights are stored in fp8 (e4m3fn) with a per-tensor
    /// scale (musubi-tuner's `--fp8_base`): 1 byte per weight instead of 2, dequantised to the
    /// store's kind in each forward.
    fp8_prefixes: Vec<String>,
    /// The per-tensor scales of those weights, by parameter name (`w ≈ fp8 · scale`).
    scales: RefCell<Vec<(String, Tensor)>>,
}

/// The largest finite float8_e4m3fn value: a weight's scale maps its max |w| onto it.
pub const FP8_E4M3_MAX: f64 = 448.0;

impl Store {
    pub fn new(mode: Mode, kind: Kind, device: Device) -> Self {
        Store {
            mode,
            kind,
            device,
            params: RefCell::new(Vec::new()),
            targets: RefCell::new(Vec::new()),
            fp8_prefixes: Vec::new(),
            scales: RefCell::new(Vec::new()),
        }
    }

    /// Stores the Linear weights under these module-path prefixes in fp8 (call before building
    /// the network). `kind` stays the compute dtype of everything else and of the dequantised
    /// weights.
    pub fn with_fp8_linears(mut self, prefixes: &[&str]) -> Self {
        self.fp8_prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        self
    }

    fn fp8_linear(&self, path: &str) -> bool {
        self.fp8_prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }

    /// The scale of an fp8-stored parameter (None for any other).
    pub fn fp8_scale(&self, name: &str) -> Option<Tensor> {
        self.scales.borrow().iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone())
    }

    pub fn root(&self) -> P<'_> {
        P { store: self, prefix: String::new() }
    }

    /// Every parameter with its diffusers state-dict name, in construction order.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.borrow().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// name → shape without touching data (what the layout test compares with the manifests).
    pub fn shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.params.borrow().iter().map(|(n, t)| (n.clone(), t.size())).collect()
    }

    /// The number of parameters, by shape (also of a planned store).
    pub fn parameter_count(&self) -> i64 {
        self.params.borrow().iter().map(|(_, t)| t.size().iter().product::<i64>()).sum()
    }

    pub fn targets(&self) -> Vec<Target> {
        self.targets.borrow().clone()
    }

    fn param(&self, name: String, shape: &[i64]) -> Tensor {
        self.param_of_kind(name, shape, self.kind)
    }

    fn param_of_kind(&self, name: String, shape: &[i64], kind: Kind) -> Tensor {
        let t = match self.mode {
            // Zeros, not uninitialised memory: a weight the loader does not fill is reported as
            // missing anyway, but a stray read must not see garbage.
            Mode::Alloc => Tensor::zeros(shape, (kind, self.device)),
            // One element expanded with stride 0: the right size() for any shape at no cost.
            Mode::Plan => Tensor::zeros([1], (kind, Device::Cpu)).reshape(vec![1; shape.len()]).expand(shape, false),
        };
        self.params.borrow_mut().push((name, t.shallow_clone()));
        t
    }
}

/// A path in the module tree: `p.sub("down_blocks").sub(0)` names `down_blocks.0.…`.
#[derive(Clone)]
pub struct P<'a> {
    store: &'a Store,
    prefix: String,
}

impl<'a> P<'a> {
    pub fn sub(&self, name: impl std::fmt::Display) -> P<'a> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        P { store: self.store, prefix }
    }

    pub fn path(&self) -> &str {
        &self.prefix
    }

    pub fn param(&self, name: &str, shape: &[i64]) -> Tensor {
        self.store.param(self.sub(name).prefix, shape)
    }

    /// A Linear's `weight`: fp8 with its scale when the store keeps this module in fp8
    /// ([`Store::with_fp8_linears`]), else as [`param`](Self::param).
    pub fn linear_weight(&self, shape: &[i64]) -> (Tensor, Option<Tensor>) {
        if !self.store.fp8_linear(&self.prefix) {
            return (self.param("weight", shape), None);
        }
        let name = self.sub("weight").prefix;
        let w = self.store.param_of_kind(name.clone(), shape, Kind::Float8e4m3fn);
        let scale = Tensor::ones([], (Kind::Float, self.store.device));
        self.store.scales.borrow_mut().push((name, scale.shallow_clone()));
        (w, Some(scale))
    }

    pub fn add_target(&self, t: Target) {
        self.store.targets.borrow_mut().push(t);
    }

    pub fn store(&self) -> &'a Store {
        self.store
    }
}
