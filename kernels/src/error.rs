//! The crate's error type: every message says what failed and how to fix it.

use std::path::PathBuf;

/// Errors of compiling, caching, loading and launching kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libnvrtc could not be loaded under any name cudarc tries nor from the project venv.
    #[error(
        "libnvrtc (CUDA 13's runtime compiler) was not found: searched the loader path for \
         {names} and {searched}. Fix: run scripts/setup.sh (the torch venv ships \
         nvidia/cu13/lib/libnvrtc.so.13), or set LIKENESS_NVRTC to the libnvrtc.so.13 file, or \
         add its folder to LD_LIBRARY_PATH"
    )]
    NvrtcNotFound { names: String, searched: String },

    /// The CUDA headers NVRTC needs (cuda_bf16.h, cuda_fp16.h) were not found.
    #[error(
        "the CUDA headers (cuda_bf16.h, cuda_fp16.h) were not found in {searched}. Fix: set \
         LIKENESS_CUDA_INCLUDE to a folder holding them (the torch venv's \
         site-packages/nvidia/cu13/include, or $CUDA_HOME/include)"
    )]
    HeadersNotFound { searched: String },

    /// NVRTC rejected a source: the log holds the compiler's messages.
    #[error("NVRTC failed to compile kernels/cu/{source_file} for {arch}: {log}")]
    Compile { source_file: String, arch: String, log: String },

    /// An NVRTC call other than the compilation itself failed.
    #[error("NVRTC {call} failed for kernels/cu/{source_file}: {detail}")]
    Nvrtc { call: &'static str, source_file: String, detail: String },

    /// No CUDA driver (libcuda.so.1) on this machine.
    #[error(
        "no CUDA driver: libcuda.so.1 could not be loaded (this machine has no NVIDIA driver, \
         or it is not on the loader path); the CPU references in likeness_kernels work without one"
    )]
    NoDriver,

    /// A CUDA driver call failed.
    #[error("CUDA {call} failed: {detail}")]
    Driver { call: String, detail: String },

    /// The PTX cache could not be read or written.
    #[error("PTX cache {}: {detail}", path.display())]
    Cache { path: PathBuf, detail: String },

    /// Arguments a kernel cannot take (shape, rank, dtype, sizes).
    #[error("{kernel}: {detail}")]
    InvalidArgument { kernel: &'static str, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn driver(call: impl Into<String>, e: cudarc::driver::DriverError) -> Self {
        Error::Driver { call: call.into(), detail: e.to_string() }
    }

    pub(crate) fn invalid(kernel: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument { kernel, detail: detail.into() }
    }
}
