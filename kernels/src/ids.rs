//! Every kernel by name: which `kernels/cu` source it lives in and its entry point.

use crate::Dtype;

/// One NVRTC program: a `kernels/cu/*.cu` file with `prelude.cuh` in front of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Lora,
    Embed,
    Adamw,
}

const PRELUDE: &str = include_str!("../cu/prelude.cuh");

impl Source {
    pub const ALL: [Source; 3] = [Source::Lora, Source::Embed, Source::Adamw];

    /// The file under `kernels/cu/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Source::Lora => "lora.cu",
            Source::Embed => "embed.cu",
            Source::Adamw => "adamw.cu",
        }
    }

    /// The program text NVRTC compiles: the prelude, the launch geometry the host side sizes
    /// its grids with (each module's `CU_DEFINES`, the one place those numbers live), then the
    /// file. A `#line` directive keeps compiler messages pointing at the file's own line numbers.
    pub fn text(self) -> String {
        let (body, defines) = match self {
            Source::Lora => (include_str!("../cu/lora.cu"), crate::lora::CU_DEFINES),
            Source::Embed => (include_str!("../cu/embed.cu"), crate::embed::CU_DEFINES),
            Source::Adamw => (include_str!("../cu/adamw.cu"), crate::adamw::CU_DEFINES),
        };
        let defines: String = defines.iter().map(|(name, value)| format!("#define {name} {value}\n")).collect();
        format!("{PRELUDE}\n{defines}#line 1 \"{}\"\n{body}", self.file_name())
    }

    /// Every kernel of this source.
    pub fn kernels(self) -> Vec<KernelId> {
        KernelId::all().into_iter().filter(|k| k.source() == self).collect()
    }
}

/// A kernel: the entry point of one instantiation (storage dtype) in one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// `out[n,j] = s·Σ_k dropout(in)[n,k]·w[j,k]` (LoRA h = x'·Aᵀ, g = s·dy·B).
    LoraRankDown(Dtype),
    /// `out = base + mask·s·h·wᵀ` (LoRA y epilogue, dx_lora).
    LoraRankUp(Dtype),
    /// Split partial sums of `Xᵀ·H` over rows (LoRA dA, dB).
    LoraRankReduce(Dtype),
    /// Sums the splits in order and writes the gradient (float).
    LoraRankFinish,
    /// Row L2 normalisation.
    EmbL2Normalize(Dtype),
    /// N×M dot products of normalised rows.
    EmbCosineMatrix,
    /// Top-k per row (larger first, ties by smaller index, NaN largest).
    EmbTopkRows,
    /// mean(1 − cos(a_i, b_i)) and its gradient wrt a.
    EmbIdentityLoss(Dtype),
    /// Multi-tensor AdamW step; the dtype is the gradients'.
    AdamwMultiTensor(Dtype),
}

impl KernelId {
    /// Every kernel, every instantiation.
    pub fn all() -> Vec<KernelId> {
        let mut out = Vec::new();
        for d in Dtype::ALL {
            out.extend([
                KernelId::LoraRankDown(d),
                KernelId::LoraRankUp(d),
                KernelId::LoraRankReduce(d),
                KernelId::EmbL2Normalize(d),
                KernelId::EmbIdentityLoss(d),
                KernelId::AdamwMultiTensor(d),
            ]);
        }
        out.extend([KernelId::LoraRankFinish, KernelId::EmbCosineMatrix, KernelId::EmbTopkRows]);
        out
    }

    pub fn source(self) -> Source {
        use KernelId::*;
        match self {
            LoraRankDown(_) | LoraRankUp(_) | LoraRankReduce(_) | LoraRankFinish => Source::Lora,
            EmbL2Normalize(_) | EmbCosineMatrix | EmbTopkRows | EmbIdentityLoss(_) => Source::Embed,
            AdamwMultiTensor(_) => Source::Adamw,
        }
    }

    /// The `extern "C"` entry point in the source.
    pub fn entry(self) -> String {
        use KernelId::*;
        let (stem, d) = match self {
            LoraRankDown(d) => ("lora_rank_down", Some(d)),
            LoraRankUp(d) => ("lora_rank_up", Some(d)),
            LoraRankReduce(d) => ("lora_rank_reduce", Some(d)),
            LoraRankFinish => ("lora_rank_finish", None),
            EmbL2Normalize(d) => ("emb_l2_normalize", Some(d)),
            EmbCosineMatrix => ("emb_cosine_matrix_f32", None),
            EmbTopkRows => ("emb_topk_rows_f32", None),
            EmbIdentityLoss(d) => ("emb_identity_loss", Some(d)),
            AdamwMultiTensor(d) => ("adamw_multi_tensor", Some(d)),
        };
        match d {
            Some(d) => format!("{stem}_{}", d.suffix()),
            None => stem.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18: the launch geometry lives in Rust only. Each `CU_DEFINES` name is used by its
    /// `.cu` file, defined once in the program text (in front of the file), and never `#define`d
    /// by the file itself (a second, drifting copy).
    #[test]
    fn issue_18_launch_geometry_is_defined_once_from_rust() {
        for source in Source::ALL {
            let (body, defines) = match source {
                Source::Lora => (include_str!("../cu/lora.cu"), crate::lora::CU_DEFINES),
                Source::Embed => (include_str!("../cu/embed.cu"), crate::embed::CU_DEFINES),
                Source::Adamw => (include_str!("../cu/adamw.cu"), crate::adamw::CU_DEFINES),
            };
            let text = source.text();
            for (name, value) in defines {
                let file = source.file_name();
                let uses = body.lines().filter(|l| !l.trim_start().starts_with("//") && l.contains(name)).count();
                assert!(uses > 0, "{file} does not use {name}");
                assert!(!body.contains(&format!("#define {name} ")), "{file} defines {name} itself");
                assert_eq!(text.matches(&format!("#define {name} {value}\n")).count(), 1, "{file}: {name}");
            }
        }
    }

    /// Entry names are unique (the NVRTC test checks each against the PTX's `.entry` list).
    #[test]
    fn entries_are_unique() {
        let mut names: Vec<String> = KernelId::all().into_iter().map(KernelId::entry).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        assert_eq!(KernelId::LoraRankDown(Dtype::Bf16).entry(), "lora_rank_down_bf16");
    }
}
