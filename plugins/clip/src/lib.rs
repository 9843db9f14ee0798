//! `likeness-plugin-clip`: the `clip` metric (DRIP's text-alignment term `L_text`).
//!
//! The towers, tokenizer and preprocessing live in `core/clip` (crate `likeness-clip`); this
//! crate is the plugin around them ([`plugin`]): config, weights/tokenizer discovery, the
//! differentiable `embed` with `backward` through the ABI, and `embed_texts`.
//!
//! CLIP is **not an identity verifier**: its cosine measures image–text (or image–image) semantic
//! alignment, not whether two faces are the same person, so the metric declares no same-person
//! threshold (`interface` answers −2, "none") and `eval-faces` prints no verdict bands for it.

pub mod plugin;

/// Everything that can go wrong in this crate; converted to a `PluginError` at the boundary.
#[derive(Debug, thiserror::Error)]
pub enum ClipPluginError {
    /// A bad config value: the field and how to fix it.
    #[error("plugin `clip`: config field `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// Bad input tensors or texts.
    #[error("metric `clip`: {0}")]
    Input(String),
    /// A checkpoint, config file or vocab that cannot be used (the message names the file).
    #[error("metric `clip`: {0}")]
    Clip(#[from] likeness_clip::ClipError),
    #[error("metric `clip`: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<ClipPluginError> for likeness_sdk::PluginError {
    fn from(e: ClipPluginError) -> Self {
        use likeness_clip::ClipError as C;
        use likeness_sdk::err;
        match &e {
            ClipPluginError::Config { .. } => err::config(e.to_string()),
            ClipPluginError::Input(_) | ClipPluginError::Clip(C::Input(_)) => err::input(e.to_string()),
            ClipPluginError::Clip(C::BadConfig { .. } | C::UnknownPreset(_) | C::BadContextLength(_)) => {
                err::config(e.to_string())
            }
            ClipPluginError::Clip(_) => err::io(e.to_string()),
            ClipPluginError::Torch(_) => err::internal(e.to_string()),
        }
    }
}

likeness_sdk::export_metric_plugin!(plugin::ClipMetric);
