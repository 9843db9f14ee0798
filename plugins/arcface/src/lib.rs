//! The `arcface` identity metric: InsightFace 0.7.3's pipeline, reimplemented to match it.
//!
//! - [`scrfd`]: SCRFD detector pre-processing (letterbox at top-left, `(x − 127.5)/128`, RGB)
//!   and output decoding (6/9/10/15-output layouts, anchor centres, distance decoding,
//!   score threshold, +1-area NMS, face choice) exactly as `insightface/model_zoo/scrfd.py`.
//! - [`align`]: the 5-point ArcFace template, the Umeyama similarity fit of
//!   `skimage.transform.SimilarityTransform.estimate` (as `face_align.estimate_norm` calls it),
//!   and the 112×112 warp of `face_align.norm_crop` (`cv2.warpAffine`, bilinear, zero border),
//!   plus a plain-float CHW warp and the `grid_sample` matrix for the differentiable path.
//!
//! The plugin export (ONNX Runtime sessions, recognizer) lands on top of these modules.

pub mod align;
pub mod scrfd;
