//! The SCRFD detector on ONNX Runtime: [`crate::scrfd`]'s pre-processing and decoding around an
//! `ort` session, as `insightface/model_zoo/scrfd.py` (`SCRFD.detect`) runs it.

use std::path::Path;

use likeness_sdk::{err, Result};
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

/// An `ort` session for `path` on `provider` (ONNX Runtime is initialised on first use).
pub fn build_session(path: &Path, provider: Provider) -> Result<Session> {
    likeness_sdk_onnx::init()?;
    let ctx = |e: &dyn std::fmt::Display| err::io(format!("loading {}: {e}", path.display()));
    let mut builder = Session::builder().map_err(|e| ctx(&e))?;
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
        let session = build_session(path, provider)?;
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
