//! The SCRFD detector on ONNX Runtime: [`crate::scrfd`]'s pre-processing and decoding around an
//! `ort` session, as `insightface/model_zoo/scrfd.py` (`SCRFD.detect`) runs it.

use std::path::{Path, PathBuf};

use likeness_sdk::{err, Result};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, ValueType};

use crate::scrfd::{self, Detection, FaceChoice, Layout};

/// Where a session runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Provider {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider (an error when the loaded ONNX Runtime lacks it).
    Cuda,
}

/// ONNX Runtime session options the pipeline sets (the rest are ONNX Runtime's defaults, which
/// insightface keeps too: graph optimisation level ALL, memory pattern on, sequential execution,
/// inter-op threads unused by a sequential graph).
/// `Default`: ONNX Runtime's thread count, spinning off, no cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Intra-op threads; 0 = ONNX Runtime's default (one per physical core).
    pub intra_threads: usize,
    /// Whether idle intra-op workers spin-wait for the next run (ONNX Runtime's default: yes;
    /// ours: no). The pipeline alternates two sessions (detector, recognizer), each owning a
    /// pool of one thread per core: the idle pool's spinning workers steal the cores the other
    /// pool is running on. Measured on 2 cores (scripts/bench.sh, 35 images): recognition
    /// 3.30 s with spinning, 1.80 s without; detection 0.31 s → 0.28 s.
    pub intra_spinning: bool,
    /// A folder for the optimised graphs: the first load writes `<stem>.<len>-<mtime>.opt.onnx`
    /// there (`optimized_model_filepath`), later loads read it with optimisation disabled,
    /// skipping the optimiser. The key is the source file's length and mtime; a cached graph
    /// optimised at level ALL may hold CPU-specific layouts, so the folder belongs to one machine.
    pub optimized_cache: Option<PathBuf>,
}

/// Where [`SessionOptions::optimized_cache`] keeps the optimised copy of `path`.
pub fn optimized_path(cache: &Path, path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| err::io(format!("reading {}: {e}", path.display())))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(cache.join(format!("{stem}.{}-{mtime}.opt.onnx", meta.len())))
}

/// An `ort` session for `path` on `provider` (ONNX Runtime is initialised on first use).
pub fn build_session(path: &Path, provider: Provider) -> Result<Session> {
    build_session_with(path, provider, &SessionOptions::default())
}

/// [`build_session`] with `opts`.
pub fn build_session_with(path: &Path, provider: Provider, opts: &SessionOptions) -> Result<Session> {
    likeness_sdk_onnx::init()?;
    let ctx = |e: &dyn std::fmt::Display| err::io(format!("loading {}: {e}", path.display()));
    let mut builder = Session::builder().map_err(|e| ctx(&e))?;
    if opts.intra_threads > 0 {
        builder = builder.with_intra_threads(opts.intra_threads).map_err(|e| ctx(&e))?;
    }
    if !opts.intra_spinning {
        builder = builder.with_intra_op_spinning(false).map_err(|e| ctx(&e))?;
    }
    if provider == Provider::Cuda {
        use ort::ep::ExecutionProvider;
        let cuda = ort::ep::CUDA::default();
        if !cuda.is_available().unwrap_or(false) {
            return Err(err::unsupported(format!(
                "the CUDA execution provider is not available in the loaded ONNX Runtime ({}): the project's \
                 onnxruntime=={} wheel is CPU-only; use device `cpu`, or point ORT_DYLIB_PATH at an \
                 onnxruntime-gpu build",
                likeness_sdk_onnx::loaded_library().map(|p| p.display().to_string()).unwrap_or_default(),
                likeness_sdk_onnx::ONNXRUNTIME_EXPECTED
            )));
        }
        builder = builder.with_execution_providers([cuda.build().error_on_failure()]).map_err(|e| {
            err::unsupported(format!("registering the CUDA execution provider for {}: {e}", path.display()))
        })?;
    }
    // The optimised graph is only cached for the CPU provider: a CUDA session's graph holds
    // nodes assigned to CUDA kernels.
    if let (Some(cache), Provider::Cpu) = (&opts.optimized_cache, provider) {
        let cached = optimized_path(cache, path)?;
        if cached.is_file() {
            let mut b = builder.with_optimization_level(GraphOptimizationLevel::Disable).map_err(|e| ctx(&e))?;
            return b.commit_from_file(&cached).map_err(|e| err::io(format!("loading {}: {e}", cached.display())));
        }
        std::fs::create_dir_all(cache)
            .map_err(|e| err::io(format!("creating the ONNX Runtime cache {}: {e}", cache.display())))?;
        // Written under a temporary name and renamed: a concurrent reader never sees half a file.
        let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
        builder = builder.with_optimized_model_path(&tmp).map_err(|e| ctx(&e))?;
        let session = builder.commit_from_file(path).map_err(|e| ctx(&e))?;
        std::fs::rename(&tmp, &cached)
            .map_err(|e| err::io(format!("caching the optimised graph as {}: {e}", cached.display())))?;
        return Ok(session);
    }
    builder.commit_from_file(path).map_err(|e| ctx(&e))
}

/// Shape of a session input/output (`-1` for dynamic dimensions).
pub(crate) fn shape_of(t: &ValueType) -> Vec<i64> {
    match t {
        ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
        _ => Vec::new(),
    }
}

/// An SCRFD detector session.
pub struct Detector {
    session: Session,
    input_name: String,
    pub layout: Layout,
    /// `(width, height)` of the network input: the graph's when fixed, else `det_size`.
    pub input_size: (usize, usize),
    pub det_thresh: f32,
    pub nms_thresh: f32,
}

impl Detector {
    /// Loads `path`. As `SCRFD._init_vars` + `prepare(input_size=(det_size, det_size))`: a graph
    /// with a fixed input size keeps it (insightface warns and ignores `det_size`).
    pub fn load(path: &Path, provider: Provider, det_size: usize, det_thresh: f32) -> Result<Detector> {
        Self::load_with(path, provider, det_size, det_thresh, &SessionOptions::default())
    }

    /// [`Self::load`] with session options.
    pub fn load_with(
        path: &Path,
        provider: Provider,
        det_size: usize,
        det_thresh: f32,
        opts: &SessionOptions,
    ) -> Result<Detector> {
        let session = build_session_with(path, provider, opts)?;
        let input = session
            .inputs()
            .first()
            .ok_or_else(|| err::input(format!("{}: the graph has no input", path.display())))?;
        let input_name = input.name().to_string();
        let ishape = shape_of(input.dtype());
        let outputs = session.outputs();
        let batched = outputs.first().map(|o| shape_of(o.dtype()).len() == 3).unwrap_or(false);
        let layout = Layout::from_output_count(outputs.len(), batched)
            .map_err(|e| err::input(format!("{}: {e}", path.display())))?;
        let input_size = if ishape.len() == 4 && ishape[2] > 0 && ishape[3] > 0 {
            (ishape[3] as usize, ishape[2] as usize)
        } else {
            (det_size, det_size)
        };
        Ok(Detector { session, input_name, layout, input_size, det_thresh, nms_thresh: scrfd::DEFAULT_NMS_THRESH })
    }

    /// The raw outputs for a `[1, 3, H, W]` blob, each flattened.
    pub fn run_blob(&mut self, blob: Vec<f32>, w: usize, h: usize) -> Result<Vec<Vec<f32>>> {
        let arr = ndarray::Array4::from_shape_vec((1, 3, h, w), blob)
            .map_err(|e| err::internal(format!("detector blob: {e}")))?;
        let t = Tensor::from_array(arr).map_err(|e| err::internal(format!("detector blob: {e}")))?;
        let outs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => t])
            .map_err(|e| err::internal(format!("running the detector: {e}")))?;
        let mut v = Vec::with_capacity(outs.len());
        for i in 0..outs.len() {
            let (_, data) =
                outs[i].try_extract_tensor::<f32>().map_err(|e| err::internal(format!("detector output {i}: {e}")))?;
            v.push(data.to_vec());
        }
        Ok(v)
    }

    /// `SCRFD.detect(img, max_num, metric)` on an interleaved RGB `u8` image.
    pub fn detect(
        &mut self,
        rgb: &[u8],
        w: usize,
        h: usize,
        max_num: usize,
        choice: FaceChoice,
    ) -> Result<Vec<Detection>> {
        let (iw, ih) = self.input_size;
        let (blob, det_scale) = scrfd::preprocess_rgb(rgb, w, h, iw, ih);
        let outs = self.run_blob(blob, iw, ih)?;
        let refs: Vec<&[f32]> = outs.iter().map(|o| o.as_slice()).collect();
        scrfd::detect_from_outputs(
            &self.layout,
            &refs,
            iw,
            ih,
            det_scale,
            self.det_thresh,
            self.nms_thresh,
            w,
            h,
            max_num,
            choice,
        )
        .map_err(err::internal)
    }
}
