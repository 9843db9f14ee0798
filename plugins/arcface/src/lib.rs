//! The `arcface` identity metric: InsightFace 0.7.3's pipeline, reimplemented to match it.
//!
//! - [`scrfd`]: SCRFD detector pre-processing (letterbox at top-left, `(x − 127.5)/128`, RGB)
//!   and output decoding (6/9/10/15-output layouts, anchor centres, distance decoding,
//!   score threshold, +1-area NMS, face choice) exactly as `insightface/model_zoo/scrfd.py`.
//! - [`align`]: the 5-point ArcFace template, the Umeyama similarity fit of
//!   `skimage.transform.SimilarityTransform.estimate` (as `face_align.estimate_norm` calls it),
//!   and the 112×112 warp of `face_align.norm_crop` (`cv2.warpAffine`, bilinear, zero border),
//!   plus a plain-float CHW warp and the `grid_sample` matrix for the differentiable path.
//! - [`pack`]: model packs (`buffalo_l`, `buffalo_s`, `antelopev2`) and where they are found.
//! - [`detector`]: the SCRFD graph on ONNX Runtime (CPU; CUDA provider when asked and present).
//! - [`recognizer`]: the ArcFace graph on ONNX Runtime (`ArcFaceONNX`'s normalisation rule).
//! - [`bf16`]: the same recognizer in bf16 through libtorch, where the CPU has bf16 units.
//! - [`plugin`]: the [`plugin::Pipeline`] (`FaceAnalysis.get`) and the exported metric.

pub mod align;
pub mod bf16;
pub mod detector;
pub mod pack;
pub mod plugin;
pub mod recognizer;
pub mod scrfd;

// The differentiable path: the recognizer rebuilt in libtorch from the ONNX file, and the
// alignment warp as grid_sample.
pub mod diff_align;
pub mod diff_path;
pub mod iresnet;
pub mod onnx_proto;

likeness_sdk::export_metric_plugin!(plugin::ArcFaceMetric);
