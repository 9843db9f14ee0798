//! What a run will compute, decided and checked before any weight is loaded: which loss terms
//! are active, which inputs the model gets, which encodings are cached, which adapter formats
//! are written. Every mismatch between the model's declared interface, the dataset and the
//! configured losses is an error here, naming what is missing and how to fix it.

use std::collections::BTreeSet;

use likeness_abi::{EncodingDecl, InputKind, IoDecl, MetricInterface, ModelInterface};
use likeness_diffusion::lora_meta::{iso_datetime, py_float};
use serde_json::{json, Value};

use crate::config::{Config, IdentityWeighting};
use crate::data::DataSet;
use crate::{EngineError, Result};

/// The identity term.
#[derive(Debug, Clone)]
pub struct IdentityTerm {
    pub weight: f64,
    pub weighting: IdentityWeighting,
    pub t_max: f64,
    /// The model output the metric embeds (`pixels`).
    pub output: String,
}

impl IdentityTerm {
    /// The model output the weighting reads (`timesteps` or `timestep_weights`), if any.
    pub fn weighting_output(&self) -> Option<&'static str> {
        match self.weighting {
            IdentityWeighting::None => None,
            IdentityWeighting::OneMinusTSquared | IdentityWeighting::TMax => Some("timesteps"),
            IdentityWeighting::Timestep => Some("timestep_weights"),
        }
    }

    /// The weight of a sample whose weighting output (see [`Self::weighting_output`]) is `v`:
    /// its noise level t in [0, 1] (0 = clean), or for `timestep` the model's own per-sample
    /// weight of its diffusion loss, used as it is.
    pub fn sample_weight(&self, v: f32) -> f32 {
        let t = v;
        match self.weighting {
            IdentityWeighting::None => 1.0,
            IdentityWeighting::Timestep => v,
            IdentityWeighting::OneMinusTSquared => (1.0 - t).powi(2),
            IdentityWeighting::TMax => {
                if t as f64 <= self.t_max {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// The text-alignment term: `w_text · mean over valid rows of (1 − cos(e_i, t_i))`, e_i the
/// `[text]` metric's embedding of the model output, t_i its embedding of the sample's text
/// `prompt`. Not weighted by `metric.identity_weighting`: that weighting says how much a noisy
/// x̂0 tells about a *face*; DRIP's text term is unweighted, and a blur's colour/layout still
/// carries the prompt's content, so each row weighs 1.
#[derive(Debug, Clone)]
pub struct TextTerm {
    pub weight: f64,
    /// The text role embedded (`caption`).
    pub prompt: String,
    /// The model output the metric embeds (`pixels`).
    pub output: String,
}

/// The plan of a run (see the module docs).
#[derive(Debug, Clone)]
pub struct Plan {
    /// `w_model`, when the model has its own loss and the weight is > 0.
    pub model_weight: Option<f64>,
    /// `w_content`, when the content loss is active.
    pub content: Option<f64>,
    pub identity: Option<IdentityTerm>,
    pub text: Option<TextTerm>,
    /// Image roles passed to the model (declared by it and present in the data).
    pub images: Vec<String>,
    /// Text roles passed to the model.
    pub texts: Vec<String>,
    /// Encodings computed once and cached, passed in place of their source.
    pub encodings: Vec<EncodingDecl>,
    pub param_groups: Vec<String>,
    pub adapter_formats: Vec<String>,
    pub can_sample: bool,
    /// Whether the model outputs `timesteps`.
    pub has_timesteps: bool,
    /// Decisions worth a log line.
    pub notes: Vec<String>,
}

fn names(v: &[IoDecl]) -> Vec<&str> {
    v.iter().map(|d| d.name.as_str()).collect()
}

fn list(v: &BTreeSet<String>) -> String {
    if v.is_empty() {
        "nothing".into()
    } else {
        v.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

impl Plan {
    /// `text_interface`: what the `[text]` metric declares (asked before anything is created),
    /// when a `[text]` section is active.
    pub fn new(
        cfg: &Config,
        model_id: &str,
        i: &ModelInterface,
        ds: &DataSet,
        text_interface: Option<&MetricInterface>,
    ) -> Result<Plan> {
        let image_roles = ds.image_roles();
        let text_roles = ds.text_roles();
        let outputs = names(&i.outputs);
        let data_desc = format!("the `{}` dataset at {}", ds.layout, ds.root.display());
        let mut problems: Vec<String> = Vec::new();
        let mut notes = Vec::new();

        // Inputs the model declares, against what the data has.
        let mut images = Vec::new();
        for d in i.images.iter() {
            if image_roles.contains(d.name.as_str()) {
                images.push(d.name.to_string());
            } else if d.required {
                problems.push(format!(
                    "model `{model_id}` needs image `{}` ({}), but {data_desc} provides images: {}",
                    d.name,
                    d.doc,
                    list(&image_roles)
                ));
            }
        }
        let mut texts = Vec::new();
        for d in i.texts.iter() {
            if text_roles.contains(d.name.as_str()) {
                texts.push(d.name.to_string());
            } else if d.required {
                problems.push(format!(
                    "model `{model_id}` needs text `{}` ({}), but {data_desc} provides texts: {} (captions come from prompt.txt in `drip`, caption files in `musubi` and `pairs`)",
                    d.name,
                    d.doc,
                    list(&text_roles)
                ));
            }
        }

        // The terms.
        let model_weight = (i.internal_loss && cfg.model.loss_weight > 0.0).then_some(cfg.model.loss_weight);
        if !i.internal_loss && cfg.model.loss_weight != 1.0 {
            notes.push(format!(
                "model.loss_weight = {} has no effect: model `{model_id}` has no loss of its own",
                cfg.model.loss_weight
            ));
        }
        let content_wanted = cfg.loss.weight > 0.0 && cfg.loss.plugin != "none" && (cfg.loss_given || !i.internal_loss);
        if !content_wanted && i.internal_loss && !cfg.loss_given {
            notes.push(format!(
                "no content loss: model `{model_id}` trains on its own loss (add a [loss] section to add one)"
            ));
        }
        let content = if content_wanted {
            if !outputs.contains(&"pixels") {
                problems.push(format!(
                    "the content loss `{}` compares the model's `pixels` with the data's `target`, but model `{model_id}` outputs only: {} (set loss.weight = 0 or loss.plugin = \"none\")",
                    cfg.loss.plugin,
                    outputs.join(", ")
                ));
            }
            if !image_roles.contains("target") {
                problems.push(format!(
                    "the content loss needs image `target`, but {data_desc} provides images: {}",
                    list(&image_roles)
                ));
            }
            Some(cfg.loss.weight)
        } else {
            None
        };
        let identity = match &cfg.metric {
            Some(m) => {
                if !outputs.contains(&m.output.as_str()) {
                    problems.push(format!(
                        "metric `{}` embeds the model output `{}` (metric.output), but model `{model_id}` outputs only: {}",
                        m.plugin,
                        m.output,
                        outputs.join(", ")
                    ));
                }
                if !image_roles.contains("reference") {
                    problems.push(format!(
                        "metric `{}` compares generated images with image `reference`, but {data_desc} provides images: {}",
                        m.plugin,
                        list(&image_roles)
                    ));
                }
                match m.identity_weighting {
                    IdentityWeighting::OneMinusTSquared | IdentityWeighting::TMax
                        if !outputs.contains(&"timesteps") =>
                    {
                        problems.push(format!(
                            "metric.identity_weighting = {:?} weights each sample by its noise level, but model `{model_id}` does not output `timesteps` (it outputs: {}); use identity_weighting = \"none\"",
                            m.identity_weighting,
                            outputs.join(", ")
                        ))
                    }
                    IdentityWeighting::Timestep if !outputs.contains(&"timestep_weights") => problems.push(format!(
                        "metric.identity_weighting = \"timestep\" weights each sample's identity term as the model weights its diffusion loss, but model `{model_id}` does not output `timestep_weights` (it outputs: {}); use identity_weighting = \"one_minus_t_squared\" (needs `timesteps`) or \"none\"",
                        outputs.join(", ")
                    )),
                    _ => {}
                }
                if !(0.0..=1.0).contains(&m.t_max) {
                    problems.push(format!("metric.t_max = {} must be in [0, 1]", m.t_max));
                }
                (m.weight > 0.0).then(|| IdentityTerm {
                    weight: m.weight,
                    weighting: m.identity_weighting,
                    t_max: m.t_max,
                    output: m.output.clone(),
                })
            }
            None => None,
        };
        let text = match cfg.text.as_ref().filter(|t| t.weight != 0.0) {
            Some(t) => {
                if t.weight < 0.0 || !t.weight.is_finite() {
                    problems.push(format!("text.weight = {} must be ≥ 0 (0 turns the text term off)", t.weight));
                }
                match text_interface {
                    Some(ti) if !ti.embeds_texts => problems.push(format!(
                        "text.plugin = `{}` does not embed texts (its MetricInterface says embeds_texts = false); use a metric that does, e.g. text.plugin = \"clip\"",
                        t.plugin
                    )),
                    Some(_) => {}
                    None => problems.push(format!(
                        "text.plugin = `{}`: its interface was not asked (engine bug: Plan::new needs it)",
                        t.plugin
                    )),
                }
                if !text_roles.contains(t.prompt.as_str()) {
                    problems.push(format!(
                        "the text term aligns images with text `{}` (text.prompt), but {data_desc} provides texts: {} (captions come from prompt.txt in `drip`, caption files in `musubi` and `pairs`; or remove [text])",
                        t.prompt,
                        list(&text_roles)
                    ));
                }
                if !outputs.contains(&t.output.as_str()) {
                    problems.push(format!(
                        "the text term embeds the model output `{}` (text.output), but model `{model_id}` outputs only: {}",
                        t.output,
                        outputs.join(", ")
                    ));
                }
                Some(TextTerm { weight: t.weight, prompt: t.prompt.clone(), output: t.output.clone() })
            }
            None => None,
        };
        if model_weight.is_none() && content.is_none() && identity.is_none() && text.is_none() {
            problems.push(format!(
                "nothing to train: model `{model_id}` has {} loss of its own{}, no content loss is active (loss.weight = {}), no identity loss (metric.weight > 0) and no text loss (text.weight > 0)",
                if i.internal_loss { "a" } else { "no" },
                if i.internal_loss { format!(" but model.loss_weight = {}", cfg.model.loss_weight) } else { String::new() },
                cfg.loss.weight
            ));
        }

        // Parameter groups.
        let param_groups: Vec<String> = i.param_groups.iter().map(|g| g.to_string()).collect();
        for g in cfg.train.param_groups.keys() {
            if !param_groups.contains(g) {
                problems.push(format!(
                    "train.param_groups.{g}: model `{model_id}` has no parameter group `{g}` (its groups: {})",
                    if param_groups.is_empty() { "one, unnamed".to_string() } else { param_groups.join(", ") }
                ));
            }
        }

        // Adapter formats.
        let declared: Vec<String> = i.adapter_formats.iter().map(|f| f.to_string()).collect();
        let adapter_formats = if cfg.adapter.formats.is_empty() {
            ["kohya", "diffusers", "peft"]
                .iter()
                .filter(|f| declared.iter().any(|d| d == *f))
                .map(|f| f.to_string())
                .collect()
        } else {
            for f in &cfg.adapter.formats {
                if !declared.contains(f) {
                    problems.push(format!(
                        "adapter.formats: model `{model_id}` cannot write `{f}` (it writes: {})",
                        if declared.is_empty() { "no adapters".to_string() } else { declared.join(", ") }
                    ));
                }
            }
            cfg.adapter.formats.clone()
        };

        // Encodings whose source the model reads.
        let encodings: Vec<EncodingDecl> = i
            .encodings
            .iter()
            .filter(|e| match e.source_kind {
                InputKind::Image => images.iter().any(|r| r == e.source.as_str()),
                InputKind::Text => texts.iter().any(|r| r == e.source.as_str()),
            })
            .cloned()
            .collect();
        if cfg.eval.every > 0 && cfg.metric.is_none() {
            problems.push("eval.every > 0 evaluates the samples' face consistency, which needs a [metric] (e.g. --metric arcface)".into());
        }
        if !problems.is_empty() {
            return Err(EngineError::Config(format!(
                "this run cannot start (checked before loading any weights):\n  - {}",
                problems.join("\n  - ")
            )));
        }
        Ok(Plan {
            model_weight,
            content,
            identity,
            text,
            images,
            texts,
            encodings,
            param_groups,
            adapter_formats,
            can_sample: i.can_sample,
            has_timesteps: outputs.contains(&"timesteps"),
            notes,
        })
    }

    /// The active terms, for the run record.
    pub fn term_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.model_weight.is_some() {
            v.push("model");
        }
        if self.content.is_some() {
            v.push("content");
        }
        if self.identity.is_some() {
            v.push("identity");
        }
        if self.text.is_some() {
            v.push("text");
        }
        v
    }

    /// `(group, lr, weight_decay)` for this step: a group's `lr` follows the schedule as
    /// `train.lr` does (scaled by group.lr / train.lr).
    pub fn group_hypers(&self, cfg: &Config, lr: f64, base_lr: f64) -> Vec<(String, f64, f64)> {
        cfg.train
            .param_groups
            .iter()
            .map(|(name, g)| {
                let scale = g.lr.map(|l| l / base_lr).unwrap_or(1.0);
                (name.clone(), lr * scale, g.weight_decay.unwrap_or(cfg.train.weight_decay))
            })
            .collect()
    }

    /// Metadata stored in every adapter file: kohya's `ss_*` and `modelspec.*` keys (all
    /// values strings, as safetensors metadata must be). `started_at_ms` is when the run first
    /// began (Unix milliseconds, kept across resumes): `ss_training_started_at` is sd-scripts'
    /// `str(time.time())` of it (Python's float spelling, `1733112345.123`), `modelspec.date`
    /// the ISO date of its whole seconds, both spelled by [`likeness_diffusion::lora_meta`] as a
    /// model plugin's own kohya metadata spells them, so the two agree.
    pub fn adapter_metadata(&self, cfg: &Config, ds: &DataSet, step: u64, epoch: u64, started_at_ms: u64) -> Value {
        let base = cfg.model.config.get("pretrained").and_then(|v| v.as_str()).unwrap_or("").to_string();
        // ms / 1000 is one correctly rounded division: the nearest f64 to the decimal
        // `<s>.<ms>`, whose shortest round-trip spelling is that decimal again.
        let started_s = started_at_ms as f64 / 1000.0;
        json!({
            "ss_training_comment": "trained with likeness",
            "ss_training_started_at": py_float(started_s),
            "modelspec.date": iso_datetime(started_at_ms / 1000),
            "ss_base_model_version": cfg.model.plugin,
            "ss_sd_model_name": base,
            "ss_output_name": cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into()),
            "ss_steps": step.to_string(),
            "ss_epoch": epoch.to_string(),
            "ss_learning_rate": cfg.train.lr.to_string(),
            "ss_batch_size_per_device": cfg.train.batch_size.to_string(),
            "ss_gradient_accumulation_steps": cfg.train.grad_accum.to_string(),
            "ss_lr_scheduler": format!("{:?}", cfg.train.schedule).to_lowercase(),
            "ss_seed": cfg.run.seed.to_string(),
            "ss_num_train_images": ds.train.len().to_string(),
            "ss_dataset_layout": ds.layout.clone(),
            "likeness_loss_terms": self.term_names().join(","),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": format!("{}/lora", cfg.model.plugin),
            "modelspec.implementation": "likeness",
            "modelspec.title": cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(weighting: IdentityWeighting) -> IdentityTerm {
        IdentityTerm { weight: 1.0, weighting, t_max: 0.5, output: "pixels".into() }
    }

    #[test]
    fn identity_weightings_read_their_output() {
        assert_eq!(term(IdentityWeighting::None).weighting_output(), None);
        assert_eq!(term(IdentityWeighting::OneMinusTSquared).weighting_output(), Some("timesteps"));
        assert_eq!(term(IdentityWeighting::TMax).weighting_output(), Some("timesteps"));
        assert_eq!(term(IdentityWeighting::Timestep).weighting_output(), Some("timestep_weights"));
        // `timestep` passes the model's own weight through unchanged (min-SNR-γ's min(SNR, γ)/SNR
        // is already the per-sample weight); the others map t.
        let ts = term(IdentityWeighting::Timestep);
        for w in [0.0f32, 0.125, 1.0, 3.5] {
            assert_eq!(ts.sample_weight(w), w);
        }
        assert_eq!(term(IdentityWeighting::OneMinusTSquared).sample_weight(0.25), 0.5625);
        assert_eq!(term(IdentityWeighting::TMax).sample_weight(0.5), 1.0);
        assert_eq!(term(IdentityWeighting::TMax).sample_weight(0.75), 0.0);
        assert_eq!(term(IdentityWeighting::None).sample_weight(0.9), 1.0);
    }
}
