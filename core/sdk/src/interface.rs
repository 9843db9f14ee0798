//! Building a [`ModelInterface`]: what a model reads and produces (ABI 1.1).

use abi_stable::std_types::{RString, RVec};
use likeness_abi::{EncodingDecl, InputKind, IoDecl, ModelInterface};

/// A builder for [`ModelInterface`].
///
/// ```
/// use likeness_sdk::interface::ModelSpec;
/// let i = ModelSpec::new()
///     .image("target", true, "the image to learn")
///     .text("caption", true, "what the image shows")
///     .output("pixels", "decoded x̂0, f32 NCHW in [0, 1]")
///     .output("timesteps", "noise level t in [0, 1] per sample")
///     .internal_loss(true)
///     .encoding("latents", "target", likeness_sdk::abi::InputKind::Image, &["pretrained"])
///     .build();
/// assert_eq!(i.images.len(), 1);
/// ```
#[derive(Debug, Clone)]
pub struct ModelSpec {
    i: ModelInterface,
}

fn decl(name: &str, required: bool, doc: &str) -> IoDecl {
    IoDecl { name: name.into(), required, doc: doc.into() }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelSpec {
    /// Nothing declared.
    pub fn new() -> Self {
        ModelSpec {
            i: ModelInterface {
                images: RVec::new(),
                texts: RVec::new(),
                outputs: RVec::new(),
                internal_loss: false,
                encodings: RVec::new(),
                param_groups: RVec::new(),
                adapter_formats: RVec::new(),
                can_sample: false,
            },
        }
    }

    /// The ABI 1.0 contract every 1.0 model has: `reference` (required) and `target` images in,
    /// `pixels` out.
    pub fn legacy() -> Self {
        ModelSpec::new()
            .image("reference", true, "identity reference image")
            .image("target", false, "the image the model should produce")
            .output("pixels", "generated image, f32 NCHW RGB in [0, 1]")
    }

    /// An image input. `name` is a role (`target`, `reference`, `control`) or a role pattern
    /// ending in `_*`: `control_*` takes `control` and every `control_<n>` (`control_1`,
    /// `control_2`, …; n a positive integer without leading zeros) that a batch has, each under
    /// its own name (`likeness_abi::ModelInterface` documents the rule). `required` for a
    /// pattern: at least one of its roles in every batch. An optional input is passed only
    /// when the batch has it — a batch never mixes examples with and without a role.
    pub fn image(mut self, name: &str, required: bool, doc: &str) -> Self {
        self.i.images.push(decl(name, required, doc));
        self
    }

    pub fn text(mut self, name: &str, required: bool, doc: &str) -> Self {
        self.i.texts.push(decl(name, required, doc));
        self
    }

    pub fn output(mut self, name: &str, doc: &str) -> Self {
        self.i.outputs.push(decl(name, true, doc));
        self
    }

    pub fn internal_loss(mut self, yes: bool) -> Self {
        self.i.internal_loss = yes;
        self
    }

    /// A cacheable encoding `name` of input `source`; `config_keys` are the model-config keys
    /// whose values change it. `source` may join several inputs with `+` (`caption+control_*`),
    /// `kind` being the first's; an output `x` with an `x_mask` is variable-length
    /// (`likeness_abi::EncodingDecl` documents both rules).
    pub fn encoding(mut self, name: &str, source: &str, kind: InputKind, config_keys: &[&str]) -> Self {
        self.i.encodings.push(EncodingDecl {
            name: name.into(),
            source: source.into(),
            source_kind: kind,
            config_keys: config_keys.iter().map(|k| RString::from(*k)).collect(),
        });
        self
    }

    pub fn param_group(mut self, name: &str) -> Self {
        self.i.param_groups.push(name.into());
        self
    }

    pub fn adapter_format(mut self, name: &str) -> Self {
        self.i.adapter_formats.push(name.into());
        self
    }

    pub fn can_sample(mut self, yes: bool) -> Self {
        self.i.can_sample = yes;
        self
    }

    pub fn build(self) -> ModelInterface {
        self.i
    }
}
