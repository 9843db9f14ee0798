//! The CUDA side: probing for a driver, one context's loaded modules, and the launch helper.
//!
//! cudarc's `CudaContext::new` **panics** when `libcuda.so.1` cannot be loaded (its dynamic
//! loader has no error path), so [`Kernels::new`] probes for the library first and returns
//! [`Error::NoDriver`] instead. Kernels are compiled at first use of their source (NVRTC, for
//! the device's compute capability) through the [`PtxCache`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig};
use cudarc::nvrtc::Ptx;

use crate::{Error, KernelId, PtxCache, Result, Source};

/// A raw device address (`CUdeviceptr`), as a tensor view's `data + byte_offset` on CUDA.
pub type DevicePtr = sys::CUdeviceptr;

/// Whether the CUDA driver library can be loaded (it says nothing about a usable GPU).
pub fn cuda_driver_present() -> bool {
    // SAFETY: dlopen of libcuda runs its initialisers only; nothing is called.
    unsafe { sys::is_culib_present() }
}

/// Wraps the stream of an ABI tensor view (`TensorView::stream`, a `cudaStream_t`; 0 is the
/// legacy default stream) for the launch functions, without taking ownership.
///
/// # Safety
/// `stream` is 0 or a live stream of `ctx`, and outlives the returned handle's use.
pub unsafe fn stream_from_abi(ctx: &Arc<CudaContext>, stream: usize) -> Arc<CudaStream> {
    ctx.wrap_borrowed_stream(stream as sys::CUstream)
}

/// The kernels of one device: its context, capability and the modules loaded so far.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    sm: u32,
    cache: PtxCache,
    modules: Mutex<HashMap<Source, Arc<CudaModule>>>,
}

impl Kernels {
    /// Device `ordinal`'s primary context (the one libtorch uses, so its tensors' pointers are
    /// valid here), with the default PTX cache (`$LIKENESS_HOME/ptx-cache`).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !cuda_driver_present() {
            return Err(Error::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::driver(format!("context of device {ordinal}"), e))?;
        let dir = PtxCache::default_dir().unwrap_or_else(|| std::env::temp_dir().join("likeness-ptx-cache"));
        Self::with_context(ctx, PtxCache::new(dir))
    }

    /// Kernels on an existing context, caching PTX in `cache`.
    pub fn with_context(ctx: Arc<CudaContext>, cache: PtxCache) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(|e| Error::driver("compute capability", e))?;
        let sm = (major * 10 + minor) as u32;
        Ok(Kernels { ctx, sm, cache, modules: Mutex::new(HashMap::new()) })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compute capability as `major·10 + minor` (90 on an H100).
    pub fn sm(&self) -> u32 {
        self.sm
    }

    /// Compiles (or reads from the cache) and loads every source now, instead of at first use.
    pub fn load_all(&self) -> Result<()> {
        Source::ALL.iter().try_for_each(|&s| self.module(s).map(|_| ()))
    }

    fn module(&self, source: Source) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&source) {
            return Ok(m.clone());
        }
        let ptx = self.cache.get(source, self.sm)?;
        let m = self
            .ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| Error::driver(format!("loading kernels/cu/{} for sm_{}", source.file_name(), self.sm), e))?;
        modules.insert(source, m.clone());
        Ok(m)
    }

    /// The loaded function of `id`.
    pub fn function(&self, id: KernelId) -> Result<CudaFunction> {
        self.module(id.source())?
            .load_function(&id.entry())
            .map_err(|e| Error::driver(format!("cuModuleGetFunction({})", id.entry()), e))
    }
}

/// Launches a built argument list, naming the kernel in the error.
///
/// # Safety
/// The arguments match the kernel's parameters and every pointer among them is valid for it.
pub(crate) unsafe fn launch(mut args: LaunchArgs<'_>, cfg: LaunchConfig, kernel: &str) -> Result<()> {
    args.launch(cfg).map(|_| ()).map_err(|e| Error::driver(format!("launch of {kernel}"), e))
}
