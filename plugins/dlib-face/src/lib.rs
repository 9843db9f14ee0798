//! `likeness-plugin-dlib-face`: dlib's face pipeline read from dlib's own model files.
//!
//! - [`dat`]: dlib's serialization primitives;
//! - [`shape_predictor`]: the 5-point landmark predictor (`shape_predictor_5_face_landmarks.dat`).
//! - [`chip`]: dlib's face alignment (`get_face_chip_details` + `extract_image_chip`).
//! - [`plugin`]: the `dlib` metric plugin (exported root module).
//! - [`resnet`]: the face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) in tch.

pub mod chip;
pub mod dat;
pub mod plugin;
pub mod resnet;
pub mod shape_predictor;

likeness_sdk::export_metric_plugin!(plugin::DlibMetric);
