//! Parameter store: records every parameter under its diffusers name, and every Linear/Conv2d
//! under its module path (the LoRA injection targets).

use crate::nn::LoraSlot;
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
    pub slot: LoraSlot,
}

pub struct Store {
    pub mode: Mode,
    pub kind: Kind,
    pub device: Device,
    params: RefCell<Vec<(String, Tensor)>>,
    targets: RefCell<Vec<Target>>,
}

impl Store {
    pub fn new(mode: Mode, kind: Kind, device: Device) -> Self {
        Store { mode, kind, device, params: RefCell::new(Vec::new()), targets: RefCell::new(Vec::new()) }
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
        let t = match self.mode {
            // Zeros, not uninitialised memory: a weight the loader does not fill is reported as
            // missing anyway, but a stray read must not see garbage.
            Mode::Alloc => Tensor::zeros(shape, (self.kind, self.device)),
            // One element expanded with stride 0: the right size() for any shape at no cost.
            Mode::Plan => {
                Tensor::zeros([1], (self.kind, Device::Cpu)).reshape(vec![1; shape.len()]).expand(shape, false)
            }
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

    pub fn add_target(&self, t: Target) {
        self.store.targets.borrow_mut().push(t);
    }

    pub fn store(&self) -> &'a Store {
        self.store
    }
}
