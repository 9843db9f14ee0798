//! The Qwen-Image-Edit-2509 pipeline: transformer, VAE, Qwen2.5-VL text + vision encoder with
//! its processor's tokenizer, and the flow-matching scheduler settings — from a diffusers
//! QwenImageEditPlusPipeline folder, or from musubi-tuner's three files (`--dit`, `--vae`,
//! `--text_encoder`).
//!
//! The transformer loads at creation; the VAE's and the text encoder's weights on first use (a
//! run on a warm latent cache never needs the VAE; the 8.3 B-parameter Qwen2.5-VL is needed
//! for every caption with control images, which are not cacheable by one source).

use std::path::{Path, PathBuf};

use likeness_diffusion_torch::qwen_image::{self, QwenImageConfig, QwenImageTransformer2DModel};
use likeness_diffusion_torch::qwen_vae::{self, QwenVaeConfig};
use likeness_diffusion_torch::qwen_vl::QwenVlEncoder;
use likeness_diffusion_torch::sampling::FlowMatchConfig;
use likeness_diffusion_torch::trainer::{bad_config as bad, file, Result};
use likeness_diffusion_torch::{load, Lazy, Mode, Objective, Store, Vae};
use tch::{Device, Kind};

use crate::config::QwenEditLoraConfig;

/// The text encoder with its store (loaded on first use).
pub struct TextEncoder {
    pub store: Store,
    pub model: QwenVlEncoder,
}

/// The networks: the transformer loaded, the VAE and the text encoder on first use.
pub struct Pipeline {
    pub transformer_store: Store,
    pub transformer: QwenImageTransformer2DModel,
    pub vae: Lazy<Vae>,
    pub vae_config: QwenVaeConfig,
    pub text: Lazy<TextEncoder>,
    /// Parameters of the VAE (counted from its planned store at creation).
    pub vae_parameters: i64,
    pub scheduler: FlowMatchConfig,
    pub objective: Objective,
}

/// Where each component is: the pipeline folder's subfolders unless the config names them.
struct Paths {
    transformer: PathBuf,
    vae: PathBuf,
    text_encoder: PathBuf,
    tokenizer: PathBuf,
    scheduler: PathBuf,
}

fn paths(c: &QwenEditLoraConfig) -> Paths {
    let given = PathBuf::from(&c.pretrained);
    // The pipeline root: `config`, else `pretrained` when it is a pipeline folder, else the
    // folder above a `transformer/` folder (musubi's --dit may name one).
    let root = match &c.config {
        Some(r) => PathBuf::from(r),
        None if given.join("transformer").is_dir() => given.clone(),
        None => given.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let transformer = if given.join("transformer").is_dir() { given.join("transformer") } else { given };
    let tokenizer = c.tokenizer.as_ref().map(PathBuf::from).unwrap_or_else(|| {
        let p = root.join("processor");
        if p.is_dir() {
            p
        } else {
            root.join("tokenizer")
        }
    });
    Paths {
        transformer,
        vae: c.vae.as_ref().map(PathBuf::from).unwrap_or_else(|| root.join("vae")),
        text_encoder: c.text_encoder.as_ref().map(PathBuf::from).unwrap_or_else(|| root.join("text_encoder")),
        tokenizer,
        scheduler: root.join("scheduler").join("scheduler_config.json"),
    }
}

/// Qwen-Image-Edit-2509's `scheduler_config.json` (used when the folder has none, e.g. with
/// musubi-tuner's three files): dynamic exponential shift over 256…8192 tokens, μ 0.5…0.9,
/// the last σ stretched to 0.02.
pub fn edit_2509_scheduler() -> FlowMatchConfig {
    FlowMatchConfig {
        num_train_timesteps: 1000,
        shift: 1.0,
        use_dynamic_shifting: true,
        base_shift: 0.5,
        max_shift: 0.9,
        base_image_seq_len: 256.0,
        max_image_seq_len: 8192.0,
        shift_terminal: Some(0.02),
    }
}

impl Pipeline {
    pub fn load(c: &QwenEditLoraConfig, kind: Kind, device: Device) -> Result<Pipeline> {
        let p = paths(c);
        let (transformer_store, transformer) = load_transformer(&p.transformer, kind, device)?;
        // Header-only check of the VAE now (a broken file fails at creation); weights on first use.
        // A folder, or one file in diffusers' or ComfyUI's (Wan-2.1) names, as musubi-tuner's --vae.
        let (vs, v) = qwen_vae::qwen_vae_from_path(&p.vae, kind, device, Mode::Plan)
            .map_err(|e| bad("vae", format!("{}: {e}", p.vae.display())))?;
        let vae_config = v.config.clone();
        check_widths(c, &transformer.config, &vae_config)?;
        let vae_dir = p.vae.clone();
        let vae = Lazy::new(move || {
            let (store, model) = qwen_vae::qwen_vae_from_path(&vae_dir, kind, device, Mode::Alloc)?;
            Ok(Vae::new(store, model))
        });
        for (field, path) in [("text_encoder", &p.text_encoder), ("tokenizer", &p.tokenizer)] {
            if !path.exists() {
                return Err(bad(
                    field,
                    format!(
                        "{} does not exist: set `{field}` (musubi-tuner's --{field}) or give a pipeline folder that has it",
                        path.display()
                    ),
                ));
            }
        }
        let (te, tok) = (p.text_encoder.clone(), p.tokenizer.clone());
        let text = Lazy::new(move || {
            let (store, model) = QwenVlEncoder::load(&te, &tok, kind, device)?;
            Ok(TextEncoder { store, model })
        });
        let scheduler =
            if p.scheduler.exists() { FlowMatchConfig::from_file(&p.scheduler)? } else { edit_2509_scheduler() };
        Ok(Pipeline {
            objective: Objective::FlowMatching { num_train_timesteps: scheduler.num_train_timesteps },
            scheduler,
            text,
            vae_parameters: vs.parameter_count(),
            vae,
            vae_config,
            transformer_store,
            transformer,
        })
    }
}

/// A diffusers `transformer/` folder, or one `.safetensors` file (ComfyUI's / musubi-tuner's
/// `--dit`: diffusers names, optionally under `model.diffusion_model.`) with the folder's
/// `config.json` beside it or the real 2509 config.
fn load_transformer(path: &Path, kind: Kind, device: Device) -> Result<(Store, QwenImageTransformer2DModel)> {
    if path.is_dir() {
        return Ok(qwen_image::qwen_image_from_diffusers(path, kind, device, Mode::Alloc)?);
    }
    let cfg_path = path.with_file_name("config.json");
    let cfg = if cfg_path.exists() {
        QwenImageConfig::from_file(&cfg_path)?
    } else {
        QwenImageConfig::from_value(path, serde_json::json!({}))?
    };
    let store = Store::new(Mode::Alloc, kind, device);
    let model = QwenImageTransformer2DModel::new(&store, &cfg);
    let weights = load::read_st(path)?
        .into_iter()
        .map(|(name, t)| {
            let bare = name.strip_prefix("model.diffusion_model.").or(name.strip_prefix("diffusion_model."));
            (bare.map(str::to_string).unwrap_or(name), t)
        })
        .collect();
    load::apply(&store, weights, &path.display().to_string(), "QwenImageTransformer2DModel")?;
    Ok((store, model))
}

/// The components must fit each other: the VAE's latent channels × 4 are the transformer's
/// input (2×2 packing) and its output.
fn check_widths(c: &QwenEditLoraConfig, t: &QwenImageConfig, vae: &QwenVaeConfig) -> Result<()> {
    for (what, got, want) in [("vae z_dim × 4", vae.z_dim * 4, t.in_channels), ("vae z_dim", vae.z_dim, t.out_channels)]
    {
        if got != want {
            return Err(file(
                &c.pretrained,
                format!("{what} = {got} does not fit the transformer's config ({want}): the components do not belong together"),
            ));
        }
    }
    Ok(())
}
