//! musubi-tuner's training flags on `host train` (seed 004): `accelerate launch …
//! qwen_image_train_network.py` (or the face-loss fork's `…_face_loss.py`) becomes `host train
//! --plugin qwen-edit-lora` with every other flag as written.
//!
//! Each flag becomes config keys (the table in `host train --help` and in [`MusubiFlags::layers`]);
//! musubi-tuner's defaults that differ from likeness's apply when `--network_module` is given
//! (every musubi-tuner LoRA run names one), *below* every other layer, so a config file, the
//! environment, likeness's own flags and `--set` still win:
//!
//! | default | key | musubi-tuner |
//! |---|---|---|
//! | `timestep_sampling = "sigma"` | `model.config.timestep_sampling` | parser_common.py:436-455 |
//! | `lora_alpha = 1` | `model.config.lora_alpha` | `--network_alpha` default 1 (parser_common.py:553-558) |
//! | `lora_rank = 4` | `model.config.lora_rank` | `--network_dim` None → 4 (lora.py:415-416) |
//! | `lr = 2e-6`, constant schedule | `train.lr`, `train.schedule` | `--learning_rate`, `--lr_scheduler constant` |
//! | `steps = 1600` (without --max_train_epochs / --max_train_steps) | `train.steps` | `--max_train_steps` |
//! | `save_every = 0` (no step files without --save_every_n_steps) | `train.save_every` | |
//!
//! Options this machine or this trainer cannot honour say so and what runs instead (a warning
//! naming the flag); values no implementation here covers are errors naming the flag. The face
//! flags are the fork's (sumanthdonapati/musubi-tuner @ e10b0d5), which computes nothing with
//! them (its face loss is never called); here they are our design: `[metric]` = `arcface`, a
//! real identity loss through x̂0 with `--use_face_as_loss`, and the samples' face consistency
//! every `--face_eval_frequency` steps (`[eval]`).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// `host train --help`'s table of musubi-tuner's flags.
pub const HELP: &str = "\
musubi-tuner's command lines (seed 004): replace `accelerate launch … qwen_image_train_network.py`
(or `…_face_loss.py`) by `host train --plugin qwen-edit-lora` and keep every other flag.
  flag                          key                                   notes
  --dit                         model.config.pretrained               (= --pretrained)
  --vae / --text_encoder        model.config.vae / .text_encoder
  --edit / --edit_plus          model.config.model_version            edit / edit-2509; --model_version wins
  --sdpa                        -                                     what always runs; --flash_attn, --xformers,
                                                                      --flash3 run sdpa too (a warning); --sage_attn
                                                                      is refused for training, as by musubi-tuner
  --mixed_precision bf16|fp16|no model.config.precision               no = fp32; LoRA weights stay f32
  --gradient_checkpointing      model.config.gradient_checkpointing
  --timestep_sampling M         model.config.timestep_sampling        default sigma (t uniform on {1..1000}/1000,
                                                                      --discrete_flow_shift ignored, as musubi-tuner)
  --discrete_flow_shift S       model.config.discrete_flow_shift      for shift
  --weighting_scheme W          model.config.weighting_scheme         none, logit_normal, mode, cosmap, sigma_sqrt
  --optimizer_type adamw|adamw8bit  -                                 AdamW; adamw8bit runs as f32 AdamW (a warning)
  --learning_rate               train.lr                              default 2e-6 with --network_module
  --network_module M            -                                     must be the model's: networks.lora_qwen_image
                                                                      (qwen-edit-lora), networks.lora_flux (flux-lora),
                                                                      networks.lora (sd15-lora)
  --network_dim / --network_alpha  model.config.lora_rank / .lora_alpha  defaults 4 / 1 (scale alpha/rank)
  --max_train_epochs            train.epochs                          (without it and --max_train_steps: 1600 steps)
  --save_every_n_epochs N       train.save_every_epochs               <name>-<epoch:06d>.safetensors, not the last epoch
  --save_every_n_steps N        train.save_every                      <name>-step<N:08d>.safetensors
  --sample_prompts FILE         sample.prompt_file                    --w --h --s --d --l --g --n --fs --ci, # comments
  --sample_every_n_steps N      sample.every_steps
  --output_dir / --output_name  run.output / run.output_name
  --enable_face_loss            [metric] plugin = arcface             measured at validation and on the samples
  --use_face_as_loss            metric.weight = --face_loss_weight    (0.1); without: 0, measure only
  --face_model_name / --face_det_size / --face_device  metric.config.model_name / det_size / device
  --face_eval_frequency N       eval.every                            (100) eval/face_consistency_step<N>.json
  --face_distance_weighting W   metric.loss_config.mode               ours: linear or squared_above_0.3
musubi-tuner's defaults (rank 4, alpha 1, sigma sampling, lr 2e-6, constant schedule, no step
files) apply with --network_module, under every other layer (a config file, --set … win).";

/// A musubi-tuner flag whose value has no implementation here, or that contradicts the model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MusubiFlagError {
    #[error("--{flag} {value}: {why}")]
    Unsupported { flag: &'static str, value: String, why: String },
    #[error(
        "--network_module {module} is the LoRA network of `{module_plugin}`, but the model plugin is `{plugin}`: {fix}"
    )]
    NetworkModule { module: String, module_plugin: String, plugin: String, fix: String },
}

/// musubi-tuner's network modules and the model plugin each one trains.
pub const NETWORK_MODULES: &[(&str, &str)] = &[
    ("networks.lora_qwen_image", "qwen-edit-lora"),
    ("networks.lora_flux", "flux-lora"),
    ("networks.lora", "sd15-lora"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelVersion {
    #[value(name = "original")]
    Original,
    #[value(name = "layered")]
    Layered,
    #[value(name = "edit")]
    Edit,
    #[value(name = "edit-2509")]
    Edit2509,
    #[value(name = "edit-2511")]
    Edit2511,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

/// musubi-tuner's `--timestep_sampling` choices (parser_common.py:436-455).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum TimestepSampling {
    Sigma,
    Uniform,
    Sigmoid,
    Shift,
    FluxShift,
    Flux2Shift,
    Ideogram4Shift,
    QwenShift,
    Krea2Shift,
    Logsnr,
    QinglongFlux,
    QinglongQwen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum WeightingScheme {
    None,
    LogitNormal,
    Mode,
    Cosmap,
    SigmaSqrt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum FaceModel {
    BuffaloL,
    BuffaloS,
    Antelopev2,
}

/// How the identity loss turns a face distance d = 1 − cos into the loss (ours; not a flag of
/// the fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum FaceDistanceWeighting {
    /// mean d: the fork's `compute_face_loss` formula `(1 − similarity).mean()`.
    Linear,
    /// The guide's `CustomFaceLoss`: d² where d > 0.3, else d (note: for 0.3 < d < 1 that is
    /// *smaller* than d, so it penalises low similarity less, the opposite of its comment).
    #[value(name = "squared_above_0.3")]
    SquaredAbove0_3,
}

/// musubi-tuner's flags (see the module docs). `host train --help` shows them under their own heading.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "musubi-tuner's flags (seed 004: qwen_image_train_network.py as written)")]
pub struct MusubiFlags {
    /// VAE weights (`model.config.vae`; musubi-tuner loads it to decode samples).
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// Qwen2.5-VL weights (`model.config.text_encoder`).
    #[arg(long = "text_encoder", visible_alias = "text-encoder", value_name = "PATH")]
    pub text_encoder: Option<PathBuf>,
    /// Qwen-Image-Edit (`model.config.model_version = "edit"`).
    #[arg(long)]
    pub edit: bool,
    /// Qwen-Image-Edit-2509 (`model.config.model_version = "edit-2509"`).
    #[arg(long = "edit_plus", visible_alias = "edit-plus")]
    pub edit_plus: bool,
    /// `model.config.model_version`; wins over --edit / --edit_plus, as in musubi-tuner.
    #[arg(long = "model_version", visible_alias = "model-version", value_enum, value_name = "VERSION")]
    pub model_version: Option<ModelVersion>,
    /// Attention by torch's scaled_dot_product_attention: what likeness always runs (no key).
    #[arg(long)]
    pub sdpa: bool,
    /// FlashAttention 2: not in this build; runs sdpa (libtorch's fused kernels) instead, with a warning.
    #[arg(long = "flash_attn", visible_alias = "flash-attn")]
    pub flash_attn: bool,
    /// xformers: not in this build; runs sdpa instead, with a warning.
    #[arg(long)]
    pub xformers: bool,
    /// FlashAttention 3: not in this build; runs sdpa instead, with a warning.
    #[arg(long)]
    pub flash3: bool,
    /// SageAttention: refused for training, as musubi-tuner refuses it (use --sdpa).
    #[arg(long = "sage_attn", visible_alias = "sage-attn")]
    pub sage_attn: bool,
    /// Base-weight precision (`model.config.precision`: bf16, fp16, `no` = fp32; LoRA weights
    /// stay f32, as musubi-tuner keeps them).
    #[arg(long = "mixed_precision", visible_alias = "mixed-precision", value_enum, value_name = "P")]
    pub mixed_precision: Option<MixedPrecision>,
    /// Recompute the DiT's activations in backward (`model.config.gradient_checkpointing = true`).
    #[arg(long = "gradient_checkpointing", visible_alias = "gradient-checkpointing")]
    pub gradient_checkpointing: bool,
    /// `model.config.timestep_sampling` [musubi-tuner's default: sigma]. Implemented: sigma,
    /// uniform, sigmoid, shift, flux_shift, qwen_shift; the others are refused.
    #[arg(long = "timestep_sampling", visible_alias = "timestep-sampling", value_enum, value_name = "METHOD")]
    pub timestep_sampling: Option<TimestepSampling>,
    /// s of `shift` (`model.config.discrete_flow_shift`, default 1; no effect with sigma, as in musubi-tuner).
    #[arg(long = "discrete_flow_shift", visible_alias = "discrete-flow-shift", value_name = "S")]
    pub discrete_flow_shift: Option<f64>,
    /// `model.config.sigmoid_scale` (sigmoid / shift / *_shift; default 1).
    #[arg(long = "sigmoid_scale", value_name = "F")]
    pub sigmoid_scale: Option<f64>,
    /// `model.config.logit_mean` (logit_normal; default 0).
    #[arg(long = "logit_mean", value_name = "F", allow_hyphen_values = true)]
    pub logit_mean: Option<f64>,
    /// `model.config.logit_std` (logit_normal; default 1).
    #[arg(long = "logit_std", value_name = "F")]
    pub logit_std: Option<f64>,
    /// `model.config.mode_scale` (mode; default 1.29).
    #[arg(long = "mode_scale", value_name = "F")]
    pub mode_scale: Option<f64>,
    /// `model.config.min_timestep` (of 1000; default 0).
    #[arg(long = "min_timestep", value_name = "T")]
    pub min_timestep: Option<f64>,
    /// `model.config.max_timestep` (of 1000; default 1000).
    #[arg(long = "max_timestep", value_name = "T")]
    pub max_timestep: Option<f64>,
    /// `model.config.weighting_scheme` [default none]: logit_normal / mode set sigma sampling's
    /// density; cosmap / sigma_sqrt weight the loss.
    #[arg(long = "weighting_scheme", visible_alias = "weighting-scheme", value_enum, value_name = "SCHEME")]
    pub weighting_scheme: Option<WeightingScheme>,
    /// adamw (torch's AdamW: betas 0.9/0.999, eps 1e-8, weight decay 0.01 = `train.*`'s defaults)
    /// or adamw8bit (bitsandbytes is not available here: AdamW with f32 moments, with a warning).
    #[arg(long = "optimizer_type", visible_alias = "optimizer-type", value_name = "NAME")]
    pub optimizer_type: Option<String>,
    /// musubi-tuner's LoRA network; must be the model plugin's: networks.lora_qwen_image
    /// (qwen-edit-lora), networks.lora_flux (flux-lora), networks.lora (sd15-lora). Turns on
    /// musubi-tuner's defaults (see `host train --help`'s table).
    #[arg(long = "network_module", visible_alias = "network-module", value_name = "MODULE")]
    pub network_module: Option<String>,
    /// LoRA rank (`model.config.lora_rank`; musubi-tuner's default 4).
    #[arg(long = "network_dim", visible_alias = "network-dim", value_name = "R")]
    pub network_dim: Option<u32>,
    /// LoRA alpha (`model.config.lora_alpha`; musubi-tuner's default 1, so scale 1/rank; 0 = rank).
    #[arg(long = "network_alpha", visible_alias = "network-alpha", value_name = "A")]
    pub network_alpha: Option<f64>,
    /// Adapter files `<output_name>-<epoch:06d>.*` after every N-th epoch but the last
    /// (`train.save_every_epochs`).
    #[arg(long = "save_every_n_epochs", visible_alias = "save-every-n-epochs", value_name = "N")]
    pub save_every_n_epochs: Option<u64>,
    /// musubi-tuner's sample prompt file, .txt / .toml / .json with --w --h --s --d --l --g --n
    /// --fs --ci (`sample.prompt_file`).
    #[arg(long = "sample_prompts", visible_alias = "sample-prompts", value_name = "FILE")]
    pub sample_prompts: Option<PathBuf>,
    /// Face consistency with ArcFace (`[metric] plugin = "arcface"`, measured at validation and
    /// on the samples every --face_eval_frequency steps).
    #[arg(long = "enable_face_loss", visible_alias = "enable-face-loss")]
    pub enable_face_loss: bool,
    /// Train with the identity loss (`metric.weight = --face_loss_weight`, back-propagated through
    /// x̂0); without it the weight is 0 (measure only).
    #[arg(long = "use_face_as_loss", visible_alias = "use-face-as-loss")]
    pub use_face_as_loss: bool,
    /// Identity-loss weight with --use_face_as_loss [default 0.1].
    #[arg(long = "face_loss_weight", visible_alias = "face-loss-weight", value_name = "W")]
    pub face_loss_weight: Option<f64>,
    /// InsightFace pack (`metric.config.model_name`) [default buffalo_l].
    #[arg(long = "face_model_name", visible_alias = "face-model-name", value_enum, value_name = "PACK")]
    pub face_model_name: Option<FaceModel>,
    /// cpu or cuda (`metric.config.device`) [the fork's default cuda; here: the run's --device when not given].
    #[arg(long = "face_device", visible_alias = "face-device", value_name = "DEVICE")]
    pub face_device: Option<String>,
    /// Face-detection size, a multiple of 32 (`metric.config.det_size`) [default 640].
    #[arg(long = "face_det_size", visible_alias = "face-det-size", value_name = "N")]
    pub face_det_size: Option<u32>,
    /// Face consistency of the samples every N steps (`eval.every`; samples are written at those steps) [default 100].
    #[arg(long = "face_eval_frequency", visible_alias = "face-eval-frequency", value_name = "N")]
    pub face_eval_frequency: Option<u64>,
    /// Ours, not the fork's: linear (mean 1 − cos, the fork's formula) or squared_above_0.3
    /// (the guide's CustomFaceLoss; `metric.loss_config.mode = "seed004"`) [default linear].
    #[arg(long = "face_distance_weighting", visible_alias = "face-distance-weighting", value_enum, value_name = "W")]
    pub face_distance_weighting: Option<FaceDistanceWeighting>,
}

/// What the flags become: `--set`-style entries (over the file and the environment, under any
/// explicit `--set`), musubi-tuner's defaults (under every layer), and the warnings to log.
#[derive(Debug, Default, PartialEq)]
pub struct MusubiLayers {
    pub set: Vec<String>,
    pub defaults: Vec<String>,
    pub warnings: Vec<String>,
}

/// A string as a TOML basic string (the `--set` value syntax).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn path(p: &std::path::Path) -> String {
    quoted(&p.to_string_lossy())
}

impl MusubiFlags {
    /// Whether musubi-tuner's defaults apply: every musubi-tuner LoRA run names its network.
    pub fn musubi_run(&self) -> bool {
        self.network_module.is_some()
    }

    /// The config entries of the flags; `steps_given`: --max_train_epochs or --max_train_steps
    /// was given (musubi-tuner's 1600-step default then does not apply).
    pub fn layers(&self, steps_given: bool) -> Result<MusubiLayers, MusubiFlagError> {
        let mut l = MusubiLayers::default();
        self.model_keys(&mut l)?;
        self.sampling_keys(&mut l)?;
        self.optimizer(&mut l)?;
        self.attention(&mut l)?;
        self.face_keys(&mut l);
        if let Some(n) = self.save_every_n_epochs {
            l.set.push(format!("train.save_every_epochs={n}"));
        }
        if let Some(p) = &self.sample_prompts {
            l.set.push(format!("sample.prompt_file={}", path(p)));
        }
        if self.musubi_run() {
            l.defaults.extend(
                ["model.config.timestep_sampling=\"sigma\"", "model.config.lora_rank=4", "model.config.lora_alpha=1.0"]
                    .map(String::from),
            );
            l.defaults.extend(["train.lr=2e-6", "train.schedule=\"constant\"", "train.save_every=0"].map(String::from));
            if !steps_given {
                l.defaults.push("train.steps=1600".into());
            }
            // musubi-tuner's networks.lora_qwen_image / lora_flux put a LoRA on every Linear of
            // the blocks: the backbones' `musubi` preset (qwen-edit-lora: 840 modules).
            if matches!(self.network_module.as_deref(), Some("networks.lora_qwen_image" | "networks.lora_flux")) {
                l.defaults.push("model.config.lora_targets=[\"musubi\"]".into());
            }
        }
        Ok(l)
    }

    /// Weights, model version, precision, LoRA shape.
    fn model_keys(&self, l: &mut MusubiLayers) -> Result<(), MusubiFlagError> {
        if let Some(p) = &self.vae {
            l.set.push(format!("model.config.vae={}", path(p)));
        }
        if let Some(p) = &self.text_encoder {
            l.set.push(format!("model.config.text_encoder={}", path(p)));
        }
        let version = match (self.model_version, self.edit_plus, self.edit) {
            (Some(v), _, _) => Some(v.to_possible_value().expect("not skipped").get_name().to_string()),
            (None, true, _) => Some("edit-2509".to_string()),
            (None, false, true) => Some("edit".to_string()),
            _ => None,
        };
        if let Some(v) = version {
            l.set.push(format!("model.config.model_version={}", quoted(&v)));
        }
        if let Some(p) = self.mixed_precision {
            let p = match p {
                MixedPrecision::Bf16 => "bf16",
                MixedPrecision::Fp16 => "fp16",
                MixedPrecision::No => "fp32",
            };
            l.set.push(format!("model.config.precision=\"{p}\""));
        }
        if self.gradient_checkpointing {
            l.set.push("model.config.gradient_checkpointing=true".into());
        }
        if let Some(r) = self.network_dim {
            if r == 0 {
                return Err(unsupported("network_dim", "0", "the LoRA rank must be at least 1"));
            }
            l.set.push(format!("model.config.lora_rank={r}"));
        }
        match self.network_alpha {
            // musubi-tuner: alpha None or 0 means alpha = dim (lora.py:93).
            Some(0.0) => l.set.push(format!("model.config.lora_alpha={:?}", self.network_dim.unwrap_or(4) as f64)),
            Some(a) if a.is_finite() && a > 0.0 => l.set.push(format!("model.config.lora_alpha={a:?}")),
            Some(a) => return Err(unsupported("network_alpha", &a.to_string(), "must be a number ≥ 0")),
            None => {}
        }
        Ok(())
    }

    /// Timestep sampling and loss weighting.
    fn sampling_keys(&self, l: &mut MusubiLayers) -> Result<(), MusubiFlagError> {
        use TimestepSampling as T;
        if let Some(t) = self.timestep_sampling {
            let name = t.to_possible_value().expect("not skipped").get_name().to_string();
            if !matches!(t, T::Sigma | T::Uniform | T::Sigmoid | T::Shift | T::FluxShift | T::QwenShift) {
                return Err(unsupported(
                    "timestep_sampling",
                    &name,
                    "is one of musubi-tuner's samplers not implemented in likeness; use sigma (musubi-tuner's default), uniform, sigmoid, shift, flux_shift or qwen_shift",
                ));
            }
            l.set.push(format!("model.config.timestep_sampling={}", quoted(&name)));
        }
        if let Some(w) = self.weighting_scheme {
            let name = w.to_possible_value().expect("not skipped").get_name().to_string();
            l.set.push(format!("model.config.weighting_scheme={}", quoted(&name)));
        }
        for (key, v) in [
            ("discrete_flow_shift", self.discrete_flow_shift),
            ("sigmoid_scale", self.sigmoid_scale),
            ("logit_mean", self.logit_mean),
            ("logit_std", self.logit_std),
            ("mode_scale", self.mode_scale),
            ("min_timestep", self.min_timestep),
            ("max_timestep", self.max_timestep),
        ] {
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(unsupported(key, &v.to_string(), "must be a finite number"));
                }
                l.set.push(format!("model.config.{key}={v:?}"));
            }
        }
        Ok(())
    }

    /// `--optimizer_type`, lower-cased as musubi-tuner does; empty = AdamW.
    fn optimizer(&self, l: &mut MusubiLayers) -> Result<(), MusubiFlagError> {
        let Some(o) = &self.optimizer_type else { return Ok(()) };
        match o.to_ascii_lowercase().as_str() {
            "" | "adamw" => {}
            "adamw8bit" => l.warnings.push(
                "--optimizer_type adamw8bit: bitsandbytes' 8-bit AdamW is not available in likeness (no bitsandbytes, on any device): \
                 training uses AdamW with f32 moments and the same hyper-parameters (betas 0.9/0.999, eps 1e-8, weight decay 0.01), \
                 about 6 more bytes of optimizer state per LoRA parameter"
                    .into(),
            ),
            other => {
                return Err(unsupported(
                    "optimizer_type",
                    other,
                    "likeness trains with AdamW only: use adamw (or adamw8bit, which runs as AdamW)",
                ))
            }
        }
        Ok(())
    }

    /// The attention flags: sdpa is what runs; the others fall back to it (SageAttention is
    /// refused for training, as musubi-tuner refuses it).
    fn attention(&self, l: &mut MusubiLayers) -> Result<(), MusubiFlagError> {
        if self.sage_attn {
            return Err(unsupported(
                "sage_attn",
                "",
                "SageAttention cannot train (musubi-tuner refuses it too, trainer_base.py:1400): use --sdpa",
            ));
        }
        for (flag, on) in [("flash_attn", self.flash_attn), ("xformers", self.xformers), ("flash3", self.flash3)] {
            if on {
                l.warnings.push(format!(
                    "--{flag}: not in this build; attention runs as --sdpa (libtorch's scaled_dot_product_attention, its fused kernels where the device has them)"
                ));
            }
        }
        Ok(())
    }

    /// The face flags: `[metric]` arcface, its weight and `[eval]`'s cadence.
    fn face_keys(&self, l: &mut MusubiLayers) {
        let given: Vec<&str> = [
            ("use_face_as_loss", self.use_face_as_loss),
            ("face_loss_weight", self.face_loss_weight.is_some()),
            ("face_model_name", self.face_model_name.is_some()),
            ("face_device", self.face_device.is_some()),
            ("face_det_size", self.face_det_size.is_some()),
            ("face_eval_frequency", self.face_eval_frequency.is_some()),
            ("face_distance_weighting", self.face_distance_weighting.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect();
        if !self.enable_face_loss {
            if !given.is_empty() {
                l.warnings.push(format!(
                    "--{} without --enable_face_loss: no effect (as in the fork, which builds its face loss only with --enable_face_loss)",
                    given.join(", --")
                ));
            }
            return;
        }
        // A --metric of likeness's own wins over the default.
        l.defaults.push("metric.plugin=\"arcface\"".into());
        let pack = self.face_model_name.unwrap_or(FaceModel::BuffaloL);
        let pack = pack.to_possible_value().expect("not skipped").get_name().to_string();
        l.set.push(format!("metric.config.model_name={}", quoted(&pack)));
        l.set.push(format!("metric.config.det_size={}", self.face_det_size.unwrap_or(640)));
        if let Some(d) = &self.face_device {
            l.set.push(format!("metric.config.device={}", quoted(&d.to_ascii_lowercase())));
        }
        let weight = if self.use_face_as_loss { self.face_loss_weight.unwrap_or(0.1) } else { 0.0 };
        if !self.use_face_as_loss && self.face_loss_weight.is_some() {
            l.warnings.push("--face_loss_weight without --use_face_as_loss: the face similarity is measured only (metric.weight = 0)".into());
        }
        l.set.push(format!("metric.weight={weight:?}"));
        l.set.push(format!("eval.every={}", self.face_eval_frequency.unwrap_or(100)));
        if self.face_distance_weighting == Some(FaceDistanceWeighting::SquaredAbove0_3) {
            l.set.push("metric.loss_config.mode=\"seed004\"".into());
        }
    }

    /// `--network_module` against the model plugin (from any layer); `None` = not known yet
    /// (the config's extraction then names the missing `model.plugin`).
    pub fn check_network_module(&self, plugin: Option<&str>) -> Result<(), MusubiFlagError> {
        let (Some(module), Some(plugin)) = (self.network_module.as_deref(), plugin) else { return Ok(()) };
        let wanted = NETWORK_MODULES.iter().find(|(_, p)| *p == plugin).map(|(m, _)| *m);
        if wanted == Some(module) {
            return Ok(());
        }
        let fix = match wanted {
            Some(m) => format!("use --network_module {m}"),
            None => format!(
                "`{plugin}` has no musubi-tuner network module (those are {}); drop --network_module",
                NETWORK_MODULES.iter().map(|(m, p)| format!("{m} ↔ {p}")).collect::<Vec<_>>().join(", ")
            ),
        };
        match NETWORK_MODULES.iter().find(|(m, _)| *m == module) {
            Some((_, module_plugin)) => Err(MusubiFlagError::NetworkModule {
                module: module.to_string(),
                module_plugin: module_plugin.to_string(),
                plugin: plugin.to_string(),
                fix,
            }),
            None => Err(unsupported(
                "network_module",
                module,
                &format!("is not a network module likeness knows; model plugin `{plugin}`: {fix}"),
            )),
        }
    }
}

fn unsupported(flag: &'static str, value: &str, why: &str) -> MusubiFlagError {
    MusubiFlagError::Unsupported { flag, value: value.to_string(), why: why.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;
    use serde_json::json;

    /// Seed 004's first command (Option 1), after `accelerate launch --num_cpu_threads_per_process
    /// 1 --mixed_precision bf16 src/musubi_tuner/qwen_image_train_network.py`, verbatim.
    const SEED_004_METRICS_ONLY: &str = "--dit path/to/qwen_image_edit_2509_bf16.safetensors \
        --vae path/to/vae_model \
        --text_encoder path/to/qwen_2.5_vl_7b.safetensors \
        --dataset_config path/to/dataset.toml \
        --edit_plus \
        --sdpa --mixed_precision bf16 \
        --timestep_sampling shift --discrete_flow_shift 2.2 \
        --weighting_scheme none \
        --optimizer_type adamw8bit --learning_rate 5e-5 \
        --gradient_checkpointing \
        --network_module networks.lora_qwen_image \
        --network_dim 16 \
        --max_train_epochs 16 --save_every_n_epochs 1 \
        --sample_prompts sample_prompts.txt \
        --sample_every_n_steps 500 \
        --output_dir path/to/output --output_name face_lora";

    /// Seed 004's second command (Option 2, `…_face_loss.py`), verbatim.
    const SEED_004_FACE_LOSS: &str = "--dit path/to/qwen_image_edit_2509_bf16.safetensors \
        --vae path/to/vae_model \
        --text_encoder path/to/qwen_2.5_vl_7b.safetensors \
        --dataset_config path/to/dataset.toml \
        --edit_plus \
        --enable_face_loss \
        --use_face_as_loss \
        --face_loss_weight 0.1 \
        --face_model_name buffalo_l \
        --face_eval_frequency 100 \
        --sdpa --mixed_precision bf16 \
        --timestep_sampling shift --discrete_flow_shift 2.2 \
        --optimizer_type adamw8bit --learning_rate 5e-5 \
        --gradient_checkpointing \
        --network_module networks.lora_qwen_image \
        --network_dim 16 \
        --max_train_epochs 16 --save_every_n_epochs 1 \
        --output_dir path/to/output --output_name face_lora";

    fn cli(flags: &str) -> Result<Cli, clap::Error> {
        let args = ["host", "train", "--plugin", "qwen-edit-lora"].into_iter().map(String::from);
        Cli::try_parse_from(args.chain(flags.split_whitespace().map(String::from)))
    }

    fn config_args(flags: &str) -> crate::ConfigArgs {
        match cli(flags).unwrap_or_else(|e| panic!("{e}")).command {
            Command::Train(a) => a.cfg,
            _ => unreachable!("a train command"),
        }
    }

    fn config(flags: &str) -> likeness_engine::Result<likeness_engine::config::Config> {
        config_args(flags).layered()?.extract()
    }

    /// The model.config both commands share.
    fn model_config() -> serde_json::Value {
        json!({
            "pretrained": "path/to/qwen_image_edit_2509_bf16.safetensors",
            "vae": "path/to/vae_model",
            "text_encoder": "path/to/qwen_2.5_vl_7b.safetensors",
            "model_version": "edit-2509",
            "precision": "bf16",
            "timestep_sampling": "shift",
            "discrete_flow_shift": 2.2,
            "gradient_checkpointing": true,
            "lora_rank": 16,
            "lora_alpha": 1.0,
            "lora_targets": ["musubi"],
        })
    }

    fn check_common(c: &likeness_engine::config::Config) {
        assert_eq!(c.model.plugin, "qwen-edit-lora");
        assert_eq!(c.data.layout, "musubi");
        assert_eq!(c.data.dataset_config, Some(PathBuf::from("path/to/dataset.toml")));
        assert_eq!(c.run.output, PathBuf::from("path/to/output"));
        assert_eq!(c.run.output_name.as_deref(), Some("face_lora"));
        assert_eq!((c.train.lr, c.train.epochs, c.train.steps), (5e-5, 16, 0));
        assert_eq!(c.train.save_every_epochs, 1);
        // musubi-tuner's constant schedule and no step files without --save_every_n_steps.
        assert_eq!((c.train.schedule, c.train.save_every), (likeness_engine::config::Schedule::Constant, 0));
    }

    #[test]
    fn seed_004_metrics_only_command_parses_into_its_config() {
        let c = config(SEED_004_METRICS_ONLY).unwrap();
        check_common(&c);
        let mut want = model_config();
        want["weighting_scheme"] = json!("none");
        assert_eq!(serde_json::Value::Object(c.model.config.clone()), want);
        assert_eq!(c.sample.prompt_file, Some(PathBuf::from("sample_prompts.txt")));
        assert_eq!(c.sample.every_steps, 500);
        assert!(c.metric.is_none() && c.eval.every == 0);
        // adamw8bit runs as AdamW and says so, naming the flag.
        let l = config_args(SEED_004_METRICS_ONLY).musubi.layers(true).unwrap();
        assert!(l.warnings.iter().any(|w| w.starts_with("--optimizer_type adamw8bit") && w.contains("AdamW")), "{l:?}");
    }

    #[test]
    fn seed_004_face_loss_command_parses_into_its_config() {
        let c = config(SEED_004_FACE_LOSS).unwrap();
        check_common(&c);
        assert_eq!(serde_json::Value::Object(c.model.config.clone()), model_config());
        let m = c.metric.expect("--enable_face_loss configures [metric]");
        assert_eq!(m.plugin, "arcface");
        assert_eq!(serde_json::Value::Object(m.config), json!({"model_name": "buffalo_l", "det_size": 640}));
        assert_eq!(m.weight, 0.1);
        assert_eq!(m.loss, "identity");
        assert!(m.loss_config.is_empty());
        assert_eq!(c.eval.every, 100);
        assert_eq!(c.sample.prompt_file, None);
    }

    #[test]
    fn face_flags_without_use_face_as_loss_measure_only_and_select_the_guides_weighting() {
        let c = config("--dataset_config d.toml --enable_face_loss --face_det_size 1024 --face_device CUDA --face_model_name antelopev2 --face_distance_weighting squared_above_0.3").unwrap();
        let m = c.metric.unwrap();
        assert_eq!(m.weight, 0.0);
        assert_eq!(
            serde_json::Value::Object(m.config),
            json!({"model_name": "antelopev2", "det_size": 1024, "device": "cuda"})
        );
        assert_eq!(serde_json::Value::Object(m.loss_config), json!({"mode": "seed004"}));
        assert_eq!(c.eval.every, 100);
        // Without --enable_face_loss the face flags do nothing, and a warning says so.
        let a = config_args("--dataset_config d.toml --use_face_as_loss --face_loss_weight 0.3");
        let l = a.musubi.layers(false).unwrap();
        assert!(
            l.set.is_empty()
                && l.warnings[0].contains("--use_face_as_loss, --face_loss_weight without --enable_face_loss"),
            "{l:?}"
        );
        assert!(a.layered().unwrap().extract().unwrap().metric.is_none());
    }

    #[test]
    fn musubi_defaults_apply_with_network_module_and_lose_to_every_layer() {
        let d = tempfile::tempdir().unwrap();
        let c = config("--dataset_config d.toml --network_module networks.lora_qwen_image").unwrap();
        let mc = serde_json::Value::Object(c.model.config.clone());
        assert_eq!(
            mc,
            json!({"timestep_sampling": "sigma", "lora_rank": 4, "lora_alpha": 1.0, "lora_targets": ["musubi"]})
        );
        assert_eq!((c.train.lr, c.train.steps), (2e-6, 1600));
        // A config file, likeness's flags and --set win over musubi-tuner's defaults.
        let file = d.path().join("c.toml");
        std::fs::write(&file, "[model.config]\nlora_alpha = 8.0\n[train]\nschedule = 'cosine'\n").unwrap();
        let flags = format!(
            "--config {} --dataset_config d.toml --network_module networks.lora_qwen_image --max_train_steps 10 --set model.config.timestep_sampling=\"uniform\"",
            file.display()
        );
        let c = config(&flags).unwrap();
        assert_eq!(c.model.config["lora_alpha"], json!(8.0));
        assert_eq!(c.model.config["timestep_sampling"], json!("uniform"));
        assert_eq!((c.train.schedule, c.train.steps), (likeness_engine::config::Schedule::Cosine, 10));
        // musubi-tuner's alpha 0 = rank; --edit without --edit_plus; --model_version wins.
        let c =
            config("--dataset_config d.toml --network_dim 8 --network_alpha 0 --edit --mixed_precision no").unwrap();
        assert_eq!(c.model.config["lora_alpha"], json!(8.0));
        assert_eq!(c.model.config["model_version"], json!("edit"));
        assert_eq!(c.model.config["precision"], json!("fp32"));
        let c = config("--dataset_config d.toml --edit_plus --model_version edit-2511").unwrap();
        assert_eq!(c.model.config["model_version"], json!("edit-2511"));
    }

    #[test]
    fn unsupported_values_are_errors_naming_the_flag() {
        for (flags, want) in [
            (
                "--timestep_sampling logsnr",
                "--timestep_sampling logsnr: is one of musubi-tuner's samplers not implemented",
            ),
            ("--optimizer_type Lion", "--optimizer_type lion: likeness trains with AdamW only"),
            ("--sage_attn", "--sage_attn : SageAttention cannot train"),
            ("--network_dim 0", "--network_dim 0: the LoRA rank must be at least 1"),
        ] {
            let e = config(&format!("--dataset_config d.toml {flags}")).unwrap_err().to_string();
            assert!(e.contains(want), "{flags}: {e}");
        }
        // Values outside musubi-tuner's own choices: clap's error names the flag.
        for (flags, flag) in [
            ("--mixed_precision fp8", "--mixed_precision"),
            ("--weighting_scheme snr", "--weighting_scheme"),
            ("--face_model_name buffalo_m", "--face_model_name"),
            ("--timestep_sampling sigmaa", "--timestep_sampling"),
        ] {
            let e = cli(flags).err().expect("an error").to_string();
            assert!(e.contains(flag) && e.contains("invalid value"), "{flags}: {e}");
        }
    }

    #[test]
    fn network_module_must_be_the_model_plugins() {
        let e = config("--dataset_config d.toml --network_module networks.lora_flux").unwrap_err().to_string();
        assert!(
            e.contains("networks.lora_flux is the LoRA network of `flux-lora`, but the model plugin is `qwen-edit-lora`: use --network_module networks.lora_qwen_image"),
            "{e}"
        );
        let e = config("--dataset_config d.toml --network_module networks.lora_wan").unwrap_err().to_string();
        assert!(
            e.contains("--network_module networks.lora_wan: is not a network module")
                && e.contains("networks.lora_qwen_image"),
            "{e}"
        );
        let f = MusubiFlags { network_module: Some("networks.lora".into()), ..Default::default() };
        assert_eq!(f.check_network_module(Some("sd15-lora")), Ok(()));
        assert!(f
            .check_network_module(Some("testing-flow"))
            .unwrap_err()
            .to_string()
            .contains("drop --network_module"));
        // The attention fallbacks are warnings naming their flag.
        let f = MusubiFlags { xformers: true, flash_attn: true, ..Default::default() };
        let w = f.layers(false).unwrap().warnings;
        assert!(
            w.iter().any(|w| w.starts_with("--xformers")) && w.iter().any(|w| w.starts_with("--flash_attn")),
            "{w:?}"
        );
    }
}
