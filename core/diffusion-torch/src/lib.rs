//! SD1.5's `UNet2DConditionModel` and `AutoencoderKL` in tch, numerically diffusers 0.42.1, with one
//! module tree whose parameter names are diffusers' state-dict names; loading from a diffusers
//! folder (sharded or not) or the original single-file (LDM) checkpoint; LoRA/LoCon injection by
//! module-name patterns.
//!
//! Construction goes through a [`store::Store`]: in `Alloc` mode it allocates each parameter, in
//! `Plan` mode it hands out zero-stride expanded views of one scalar, so the real SD1.5 tree
//! (860 M parameters) can be built and its name→shape table checked without allocating GBs
//! (tch 0.26 has no meta device).

pub mod attention;
pub mod config;
pub mod error;
pub mod ldm;
pub mod load;
pub mod lora;
pub mod nn;
pub mod sampling;
pub mod store;
pub mod unet;
pub mod vae;

pub use config::{UNetConfig, VaeConfig};
pub use error::{Error, Result};
pub use lora::{LoraConfig, LoraInit};
pub use store::{Mode, Store};
pub use unet::UNet2DConditionModel;
pub use vae::AutoencoderKL;
