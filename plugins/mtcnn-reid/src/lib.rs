//! `likeness-plugin-mtcnn-reid`: DRIP's face loss as a metric plugin.
//!
//! - [`osnet`]: torchreid's OSNet (osnet_x1_0, osnet_x0_25) in tch, loading torchreid checkpoints.
//! - [`plugin`]: the `mtcnn-reid` metric: MTCNN detection without gradient, a differentiable
//!   crop-and-resize (`grid_sample`) of the expanded face box to 256×128, OSNet, L2 normalisation.

pub mod osnet;
pub mod plugin;

/// Everything that can go wrong in this crate; converted to a `PluginError` at the boundary.
#[derive(Debug, thiserror::Error)]
pub enum ReidError {
    /// A checkpoint that cannot be read or does not match the architecture.
    #[error("OSNet checkpoint {file}: {msg}")]
    Checkpoint { file: String, msg: String },
    /// A bad config value: the field and how to fix it.
    #[error("plugin `mtcnn-reid`: config field `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// Bad input tensors.
    #[error("metric `mtcnn-reid`: {0}")]
    Input(String),
    #[error("metric `mtcnn-reid`: MTCNN: {0}")]
    Mtcnn(#[from] likeness_mtcnn::MtcnnError),
    #[error("metric `mtcnn-reid`: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<ReidError> for likeness_sdk::PluginError {
    fn from(e: ReidError) -> Self {
        use likeness_sdk::err;
        match &e {
            ReidError::Checkpoint { .. } => err::io(e.to_string()),
            ReidError::Config { .. } => err::config(e.to_string()),
            ReidError::Input(_) => err::input(e.to_string()),
            ReidError::Mtcnn(_) | ReidError::Torch(_) => err::internal(e.to_string()),
        }
    }
}

likeness_sdk::export_metric_plugin!(plugin::ReidMetric);
