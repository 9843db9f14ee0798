//! `likeness-plugin-dlib-face`: dlib's face pipeline read from dlib's own model files.
//!
//! - [`dat`]: dlib's serialization primitives;
//! - [`shape_predictor`]: the 5-point landmark predictor (`shape_predictor_5_face_landmarks.dat`).
//! - [`resnet`]: the face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) in tch.

pub mod dat;
pub mod resnet;
pub mod shape_predictor;
