//! Storage types of the kernels and the CPU references.

use half::{bf16, f16};

/// The storage type of a kernel's tensors (arithmetic is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// The suffix of the kernels' entry points (`lora_rank_down_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Unit roundoff of the storage type (2⁻²⁴, 2⁻¹¹, 2⁻⁸): tolerances derive from it.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Dtype::F32 => f64::powi(2.0, -24),
            Dtype::F16 => f64::powi(2.0, -11),
            Dtype::Bf16 => f64::powi(2.0, -8),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// A storage element of the CPU references: converts to f32 exactly and from f32 with
/// round-to-nearest-even, as `__float2half_rn` / `__float2bfloat16_rn` on the GPU.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: Dtype;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
