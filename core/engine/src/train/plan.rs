//! What a run will compute, decided and checked before any weight is loaded: which loss terms
//! are active, which inputs the model gets, which encodings are cached, which adapter formats
//! are written. Every mismatch between the model's declared interface, the dataset and the
//! configured losses is an error here, naming what is missing and how to fix it.

use std::collections::BTreeSet;

use likeness_abi::{CpuTensor, EncodingDecl, InputKind, IoDecl, MetricInterface, ModelInterface};
use likeness_diffusion::lora_meta::{iso_datetime, py_float};
use serde_json::{json, Value};

use crate::config::{Config, IdentityWeighting};
use crate::data::{roles, Batch, DataSet};
use crate::{EngineError, Result};

/// The identity term's settings (the term itself is [`super::terms::IdentityTerm`]).
#[derive(Debug, Clone)]
pub struct IdentityPlan {
    pub weight: f64,
    pub weighting: IdentityWeighting,
    pub t_max: f64,
    /// The model output the metric embeds (`pixels`).
    pub output: String,
}

impl IdentityPlan {
    /// The model output the weighting reads (`timesteps` or `timestep_weights`), if any.
    pub fn weighting_output(&self) -> Option<&'static str> {
        match self.weighting {
            IdentityWeighting::None => None,
            IdentityWeighting::OneMinusTSquared | IdentityWeighting::TMax => Some("timesteps"),
            IdentityWeighting::TimestepWeights => Some("timestep_weights"),
        }
    }

    /// The weight of a sample whose weighting output (see [`Self::weighting_output`]) is `v`:
    /// its noise level t in [0, 1] (0 = clean), or for `timestep` the model's own per-sample
    /// weight of its diffusion loss, used as it is.
    pub fn sample_weight(&self, v: f32) -> f32 {
        let t = v;
        match self.weighting {
            IdentityWeighting::None => 1.0,
            IdentityWeighting::TimestepWeights => v,
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

/// The text-alignment term's settings (`[text]`; the term itself is
/// [`super::terms::TextAlignmentTerm`]): `w_text · mean over valid rows of (1 − cos(e_i, t_i))`,
/// e_i the `[text]` metric's embedding of the model output, t_i its embedding of the sample's
/// text `prompt`. Not weighted by `metric.identity_weighting`: that weighting says how much a
/// noisy x̂0 tells about a *face*; DRIP's text term is unweighted, and a blur's colour/layout
/// still carries the prompt's content, so each row weighs 1.
#[derive(Debug, Clone)]
pub struct TextAlignmentPlan {
    pub weight: f64,
    /// The text role embedded (`caption`).
    pub prompt: String,
    /// The model output the metric embeds (`pixels`).
    pub output: String,
}

/// One image input of the model and the dataset roles it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInput {
    /// As declared: a role (`target`) or a role pattern (`control_*`, [`roles::pattern_stem`]).
    pub name: String,
    /// Every batch must have it (a pattern: at least one of its roles).
    pub required: bool,
    /// The roles of the dataset it takes (some example has each), in the order passed.
    pub roles: Vec<String>,
}

/// A cacheable encoding of the model and its sources: `decl.source` split at `+`, each with the
/// kind the model declares it with (issue 17: Qwen2.5-VL encodes `caption+control_*`).
#[derive(Debug, Clone)]
pub struct PlannedEncoding {
    pub decl: EncodingDecl,
    /// (input name or role pattern, kind), in declaration order.
    pub sources: Vec<(String, InputKind)>,
}

impl PlannedEncoding {
    /// Whether the batch input `name` (an image role or a text) is one of the sources.
    pub fn reads(&self, kind: InputKind, name: &str) -> bool {
        self.sources.iter().any(|(s, k)| *k == kind && !roles::matching(s, [name]).is_empty())
    }

    /// One plain source (`target`, `caption`): the cache's first key format.
    pub fn is_single_plain_source(&self) -> bool {
        matches!(self.sources.as_slice(), [(s, _)] if roles::pattern_stem(s).is_none())
    }

    /// The batch's inputs this encoding reads, in source order: images under their roles (a
    /// pattern as each of its roles the batch has) and texts.
    #[allow(clippy::type_complexity)]
    pub fn inputs_of<'b>(
        &self,
        batch: &'b Batch,
    ) -> Result<(Vec<(&'b str, &'b CpuTensor<f32>)>, Vec<(&'b str, &'b [String])>)> {
        let (mut images, mut texts) = (Vec::new(), Vec::new());
        for (s, kind) in &self.sources {
            match kind {
                InputKind::Image => {
                    for (role, img) in &batch.images {
                        if !roles::matching(s, [role.as_str()]).is_empty() {
                            images.push((role.as_str(), img));
                        }
                    }
                    images.sort_by_key(|(r, _)| {
                        self.sources.iter().position(|(s, _)| !roles::matching(s, [*r]).is_empty())
                    });
                }
                InputKind::Text => {
                    let (name, t) = batch.texts.iter().find(|(n, _)| n == s).ok_or_else(|| {
                        EngineError::Other(format!(
                            "batch of {} has no text `{s}`, which encoding `{}` reads",
                            batch.ids.join(", "),
                            self.decl.name
                        ))
                    })?;
                    texts.push((name.as_str(), t.as_slice()));
                }
            }
        }
        Ok((images, texts))
    }

    /// Whether the batch has any input this encoding reads (an optional source it lacks has
    /// nothing to encode).
    pub fn reads_any_of(&self, batch: &Batch) -> bool {
        batch.images.iter().any(|(r, _)| self.reads(InputKind::Image, r))
            || batch.texts.iter().any(|(n, _)| self.reads(InputKind::Text, n))
    }
}

/// The plan of a run (see the module docs).
#[derive(Debug, Clone)]
pub struct Plan {
    /// `w_model`, when the model has its own loss and the weight is > 0.
    pub model_weight: Option<f64>,
    /// `w_content`, when the content loss is active.
    pub content_weight: Option<f64>,
    /// The identity term, when it trains (metric.weight > 0).
    pub identity: Option<IdentityPlan>,
    /// The body identity term (`[body]`, DTBack's body_weight), when it trains.
    pub body: Option<IdentityPlan>,
    /// Model inputs computed by a metric: (input, the image role it embeds), as
    /// `model.conditioning` configures them.
    pub conditioning: Vec<(String, String)>,
    /// The text-alignment term (`[text]` with text.weight > 0).
    pub text_alignment: Option<TextAlignmentPlan>,
    /// The model's image inputs that the data provides (a pattern expanded to its roles).
    /// Each batch passes the roles it has ([`Plan::batch_image_roles`]).
    pub image_inputs: Vec<ImageInput>,
    /// Text roles passed to the model (its text *inputs*; not the text-alignment term).
    pub text_inputs: Vec<String>,
    /// Encodings computed once and cached, passed in place of their sources.
    pub encodings: Vec<PlannedEncoding>,
    pub param_groups: Vec<String>,
    pub adapter_formats: Vec<String>,
    pub can_sample: bool,
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

/// What [`Plan::new`] checks against: the model's declared interface and the dataset's roles.
/// Each check adds its mismatches to `problems` (reported all at once) and its decisions to
/// `notes`.
struct Checks<'a> {
    cfg: &'a Config,
    model_id: &'a str,
    i: &'a ModelInterface,
    outputs: Vec<&'a str>,
    image_roles: BTreeSet<String>,
    text_roles: BTreeSet<String>,
    /// "the `<layout>` dataset at <root>", for messages.
    data_desc: String,
    problems: Vec<String>,
    notes: Vec<String>,
}

/// Where captions come from, for messages about a missing text role.
const CAPTIONS_FROM: &str = "captions come from prompt.txt in `drip`, caption files in `musubi` and `pairs`";

impl Checks<'_> {
    /// The declared inputs present in the data (a pattern: the roles it matches); a required
    /// one that is absent is a problem.
    fn inputs(&mut self) -> (Vec<ImageInput>, Vec<String>) {
        let (model_id, data_desc) = (self.model_id, &self.data_desc);
        let mut images = Vec::new();
        for d in self.i.images.iter() {
            if self.cfg.model.conditioning.contains_key(d.name.as_str()) {
                // A metric's embedding (Checks::conditioning), not a dataset image.
                continue;
            }
            let name = d.name.as_str();
            let matched: Vec<String> = roles::matching(name, self.image_roles.iter().map(String::as_str))
                .into_iter()
                .map(String::from)
                .collect();
            let pattern = roles::pattern_stem(name);
            if matched.is_empty() {
                if d.required {
                    let what = match pattern {
                        Some(stem) => format!("images matching `{name}` (`{stem}`, `{stem}_1`, `{stem}_2`, …)"),
                        None => format!("image `{name}`"),
                    };
                    self.problems.push(format!(
                        "model `{model_id}` needs {what} ({}), but {data_desc} provides images: {}",
                        d.doc,
                        list(&self.image_roles)
                    ));
                }
                continue;
            }
            if pattern.is_some() {
                self.notes.push(format!(
                    "model input `{name}` takes the roles {} (each batch passes those its examples have)",
                    matched.join(", ")
                ));
            }
            images.push(ImageInput { name: name.to_string(), required: d.required, roles: matched });
        }
        let mut texts = Vec::new();
        for d in self.i.texts.iter() {
            if self.text_roles.contains(d.name.as_str()) {
                texts.push(d.name.to_string());
            } else if d.required {
                self.problems.push(format!(
                    "model `{model_id}` needs text `{}` ({}), but {data_desc} provides texts: {} ({CAPTIONS_FROM})",
                    d.name,
                    d.doc,
                    list(&self.text_roles)
                ));
            }
        }
        (images, texts)
    }

    /// `model.conditioning`: each entry must be an image input the model declares, and its
    /// source image a role of the data; a required input the model declares is either data or
    /// conditioning (checked by [`Self::inputs`]).
    /// The encodings to cache: each source declared as an input of the model, every text source
    /// and at least one source provided by the data (an optional image a batch lacks is not
    /// part of that batch's entries).
    fn encodings(&mut self, image_inputs: &[ImageInput], text_inputs: &[String]) -> Vec<PlannedEncoding> {
        let mut out = Vec::new();
        for e in self.i.encodings.iter() {
            let mut sources = Vec::new();
            for s in e.source.split('+') {
                if self.i.texts.iter().any(|d| d.name == s) {
                    sources.push((s.to_string(), InputKind::Text));
                } else if self.i.images.iter().any(|d| d.name == s) {
                    sources.push((s.to_string(), InputKind::Image));
                } else {
                    self.notes.push(format!(
                        "encoding `{}` of `{}` is not cached: `{s}` is not an input the model declares",
                        e.name, e.source
                    ));
                    sources.clear();
                    break;
                }
            }
            // Texts are all-or-nothing per run (every example has them); images may be optional.
            let has = |s: &String, kind: &InputKind| match kind {
                InputKind::Image => image_inputs.iter().any(|i| i.name == *s && !i.roles.is_empty()),
                InputKind::Text => text_inputs.iter().any(|r| r == s),
            };
            let texts_provided = sources.iter().filter(|(_, k)| *k == InputKind::Text).all(|(s, k)| has(s, k));
            if texts_provided && sources.iter().any(|(s, k)| has(s, k)) {
                out.push(PlannedEncoding { decl: e.clone(), sources });
            }
        }
        out
    }

    fn conditioning(&mut self) -> Vec<(String, String)> {
        let (cfg, model_id) = (self.cfg, self.model_id);
        let mut out = Vec::new();
        for (input, c) in &cfg.model.conditioning {
            if !self.i.images.iter().any(|d| d.name.as_str() == input) {
                self.problems.push(format!(
                    "model.conditioning.{input}: model `{model_id}` has no input `{input}` (its image inputs: {})",
                    names(&self.i.images).join(", ")
                ));
            }
            if !self.image_roles.contains(c.image.as_str()) {
                self.problems.push(format!(
                    "model.conditioning.{input} embeds image `{}` with `{}`, but {} provides images: {}",
                    c.image,
                    c.plugin,
                    self.data_desc,
                    list(&self.image_roles)
                ));
            }
            out.push((input.clone(), c.image.clone()));
        }
        out
    }

    /// `w_model`, when the model's own loss trains.
    fn model_weight(&mut self) -> Option<f64> {
        let (cfg, i, model_id) = (self.cfg, self.i, self.model_id);
        if !i.internal_loss && cfg.model.loss_weight != 1.0 {
            self.notes.push(format!(
                "model.loss_weight = {} has no effect: model `{model_id}` has no loss of its own",
                cfg.model.loss_weight
            ));
        }
        (i.internal_loss && cfg.model.loss_weight > 0.0).then_some(cfg.model.loss_weight)
    }

    /// `w_content`, when the content loss is active.
    fn content_weight(&mut self) -> Option<f64> {
        let (cfg, i, model_id) = (self.cfg, self.i, self.model_id);
        let wanted = cfg.loss.weight > 0.0 && cfg.loss.plugin != "none" && (cfg.loss_given || !i.internal_loss);
        if !wanted && i.internal_loss && !cfg.loss_given {
            self.notes.push(format!(
                "no content loss: model `{model_id}` trains on its own loss (add a [loss] section to add one)"
            ));
        }
        if !wanted {
            return None;
        }
        if !self.outputs.contains(&"pixels") {
            self.problems.push(format!(
                "the content loss `{}` compares the model's `pixels` with the data's `target`, but model `{model_id}` outputs only: {} (set loss.weight = 0 or loss.plugin = \"none\")",
                cfg.loss.plugin,
                self.outputs.join(", ")
            ));
        }
        if !self.image_roles.contains("target") {
            self.problems.push(format!(
                "the content loss needs image `target`, but {} provides images: {}",
                self.data_desc,
                list(&self.image_roles)
            ));
        }
        Some(cfg.loss.weight)
    }

    /// The identity term (checked whenever a `[metric]` is configured: it is measured at every
    /// validation even when it does not train).
    fn identity(&mut self) -> Option<IdentityPlan> {
        let m = self.cfg.metric.as_ref()?;
        self.identity_of(m, "metric")
    }

    /// The body identity term (`[body]`): the identity term's checks with a re-ID metric.
    fn body(&mut self) -> Option<IdentityPlan> {
        let m = self.cfg.body.as_ref()?;
        self.identity_of(m, "body")
    }

    /// The checks of an identity term configured by section `key` (`metric` or `body`).
    fn identity_of(&mut self, m: &crate::config::MetricSection, key: &str) -> Option<IdentityPlan> {
        let model_id = self.model_id;
        let outputs = self.outputs.join(", ");
        if !self.outputs.contains(&m.output.as_str()) {
            self.problems.push(format!(
                "{key} `{}` embeds the model output `{}` ({key}.output), but model `{model_id}` outputs only: {outputs}",
                m.plugin, m.output
            ));
        }
        if !self.image_roles.contains("reference") {
            self.problems.push(format!(
                "{key} `{}` compares generated images with image `reference`, but {} provides images: {}",
                m.plugin,
                self.data_desc,
                list(&self.image_roles)
            ));
        }
        match m.identity_weighting {
            IdentityWeighting::OneMinusTSquared | IdentityWeighting::TMax if !self.outputs.contains(&"timesteps") => {
                self.problems.push(format!(
                    "{key}.identity_weighting = {:?} weights each sample by its noise level, but model `{model_id}` does not output `timesteps` (it outputs: {outputs}); use identity_weighting = \"none\"",
                    m.identity_weighting
                ))
            }
            IdentityWeighting::TimestepWeights if !self.outputs.contains(&"timestep_weights") => self.problems.push(format!(
                "{key}.identity_weighting = \"timestep\" weights each sample's identity term as the model weights its diffusion loss, but model `{model_id}` does not output `timestep_weights` (it outputs: {outputs}); use identity_weighting = \"one_minus_t_squared\" (needs `timesteps`) or \"none\""
            )),
            _ => {}
        }
        if !(0.0..=1.0).contains(&m.t_max) {
            self.problems.push(format!("{key}.t_max = {} must be in [0, 1]", m.t_max));
        }
        (m.weight > 0.0).then(|| IdentityPlan {
            weight: m.weight,
            weighting: m.identity_weighting,
            t_max: m.t_max,
            output: m.output.clone(),
        })
    }

    /// The text-alignment term, when `[text]` is active.
    fn text_alignment(&mut self, text_interface: Option<&MetricInterface>) -> Option<TextAlignmentPlan> {
        let (t, model_id) = (self.cfg.text.as_ref().filter(|t| t.weight != 0.0)?, self.model_id);
        if t.weight < 0.0 || !t.weight.is_finite() {
            self.problems.push(format!("text.weight = {} must be ≥ 0 (0 turns the text term off)", t.weight));
        }
        match text_interface {
            Some(ti) if !ti.embeds_texts => self.problems.push(format!(
                "text.plugin = `{}` does not embed texts (its MetricInterface says embeds_texts = false); use a metric that does, e.g. text.plugin = \"clip\"",
                t.plugin
            )),
            Some(_) => {}
            None => self.problems.push(format!(
                "text.plugin = `{}`: its interface was not asked (engine bug: Plan::new needs it)",
                t.plugin
            )),
        }
        if !self.text_roles.contains(t.prompt.as_str()) {
            self.problems.push(format!(
                "the text term aligns images with text `{}` (text.prompt), but {} provides texts: {} ({CAPTIONS_FROM}; or remove [text])",
                t.prompt,
                self.data_desc,
                list(&self.text_roles)
            ));
        }
        if !self.outputs.contains(&t.output.as_str()) {
            self.problems.push(format!(
                "the text term embeds the model output `{}` (text.output), but model `{model_id}` outputs only: {}",
                t.output,
                self.outputs.join(", ")
            ));
        }
        Some(TextAlignmentPlan { weight: t.weight, prompt: t.prompt.clone(), output: t.output.clone() })
    }

    /// The model's parameter groups; a `train.param_groups` entry naming another is a problem.
    fn param_groups(&mut self) -> Vec<String> {
        let groups: Vec<String> = self.i.param_groups.iter().map(|g| g.to_string()).collect();
        for g in self.cfg.train.param_groups.keys() {
            if !groups.contains(g) {
                self.problems.push(format!(
                    "train.param_groups.{g}: model `{}` has no parameter group `{g}` (its groups: {})",
                    self.model_id,
                    if groups.is_empty() { "one, unnamed".to_string() } else { groups.join(", ") }
                ));
            }
        }
        groups
    }

    /// The adapter formats written: `adapter.formats`, else kohya / diffusers / peft as declared.
    fn adapter_formats(&mut self) -> Vec<String> {
        let declared: Vec<String> = self.i.adapter_formats.iter().map(|f| f.to_string()).collect();
        if self.cfg.adapter.formats.is_empty() {
            return ["kohya", "diffusers", "peft"]
                .iter()
                .filter(|f| declared.iter().any(|d| d == *f))
                .map(|f| f.to_string())
                .collect();
        }
        for f in &self.cfg.adapter.formats {
            if !declared.contains(f) {
                self.problems.push(format!(
                    "adapter.formats: model `{}` cannot write `{f}` (it writes: {})",
                    self.model_id,
                    if declared.is_empty() { "no adapters".to_string() } else { declared.join(", ") }
                ));
            }
        }
        self.cfg.adapter.formats.clone()
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
        let mut c = Checks {
            cfg,
            model_id,
            i,
            outputs: names(&i.outputs),
            image_roles: ds.image_roles(),
            text_roles: ds.text_roles(),
            data_desc: format!("the `{}` dataset at {}", ds.layout, ds.root.display()),
            problems: Vec::new(),
            notes: Vec::new(),
        };
        let (image_inputs, text_inputs) = c.inputs();
        let model_weight = c.model_weight();
        let content_weight = c.content_weight();
        let identity = c.identity();
        let body = c.body();
        let conditioning = c.conditioning();
        let text_alignment = c.text_alignment(text_interface);
        if model_weight.is_none()
            && content_weight.is_none()
            && identity.is_none()
            && body.is_none()
            && text_alignment.is_none()
        {
            c.problems.push(format!(
                "nothing to train: model `{model_id}` has {} loss of its own{}, no content loss is active (loss.weight = {}), no identity loss (metric.weight > 0) and no text loss (text.weight > 0)",
                if i.internal_loss { "a" } else { "no" },
                if i.internal_loss { format!(" but model.loss_weight = {}", cfg.model.loss_weight) } else { String::new() },
                cfg.loss.weight
            ));
        }
        let param_groups = c.param_groups();
        let adapter_formats = c.adapter_formats();
        let encodings = c.encodings(&image_inputs, &text_inputs);
        if cfg.eval.every > 0 && cfg.metric.is_none() {
            c.problems.push("eval.every > 0 evaluates the samples' face consistency, which needs a [metric] (e.g. --metric arcface)".into());
        }
        if !c.problems.is_empty() {
            return Err(EngineError::Config(format!(
                "this run cannot start (checked before loading any weights):\n  - {}",
                c.problems.join("\n  - ")
            )));
        }
        Ok(Plan {
            model_weight,
            content_weight,
            identity,
            body,
            conditioning,
            text_alignment,
            image_inputs,
            text_inputs,
            encodings,
            param_groups,
            adapter_formats,
            can_sample: i.can_sample,
            notes: c.notes,
        })
    }

    /// The image roles passed to the model for `batch`: every input's roles that the batch
    /// holds, in the plan's order, each once. Optional inputs (and a pattern's roles) are
    /// passed when the batch has them and skipped when it does not — a batch holds one role
    /// signature (`data::epoch_batches`), so that is the per-sample presence too. A required
    /// input the batch lacks is an error naming its examples.
    pub fn batch_image_roles(&self, batch: &Batch) -> Result<Vec<String>> {
        self.image_roles_in(batch, true)
    }

    /// [`Self::batch_image_roles`] without the required check: what sampling passes to
    /// `sample`, which needs no `target` (the image it generates).
    pub fn present_image_roles(&self, batch: &Batch) -> Vec<String> {
        self.image_roles_in(batch, false).unwrap_or_default()
    }

    fn image_roles_in(&self, batch: &Batch, strict: bool) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for input in &self.image_inputs {
            let have = roles::matching(&input.name, batch.images.iter().map(|(r, _)| r.as_str()));
            if have.is_empty() && input.required && strict {
                return Err(EngineError::Other(format!(
                    "batch of {} has no image {}, which the model requires: every example of a run must have its model's required images",
                    batch.ids.join(", "),
                    match roles::pattern_stem(&input.name) {
                        Some(_) => format!("matching `{}` (the data has {})", input.name, input.roles.join(", ")),
                        None => format!("`{}`", input.name),
                    }
                )));
            }
            for r in have {
                if !out.iter().any(|o| o == r) {
                    out.push(r.to_string());
                }
            }
        }
        Ok(out)
    }

    /// The active terms, for the run record.
    pub fn term_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.model_weight.is_some() {
            v.push("model");
        }
        if self.content_weight.is_some() {
            v.push("content");
        }
        if self.identity.is_some() {
            v.push("identity");
        }
        if self.body.is_some() {
            v.push("body");
        }
        if self.text_alignment.is_some() {
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

    fn term(weighting: IdentityWeighting) -> IdentityPlan {
        IdentityPlan { weight: 1.0, weighting, t_max: 0.5, output: "pixels".into() }
    }

    #[test]
    fn identity_weightings_read_their_output() {
        assert_eq!(term(IdentityWeighting::None).weighting_output(), None);
        assert_eq!(term(IdentityWeighting::OneMinusTSquared).weighting_output(), Some("timesteps"));
        assert_eq!(term(IdentityWeighting::TMax).weighting_output(), Some("timesteps"));
        assert_eq!(term(IdentityWeighting::TimestepWeights).weighting_output(), Some("timestep_weights"));
        // `timestep` passes the model's own weight through unchanged (min-SNR-γ's min(SNR, γ)/SNR
        // is already the per-sample weight); the others map t.
        let ts = term(IdentityWeighting::TimestepWeights);
        for w in [0.0f32, 0.125, 1.0, 3.5] {
            assert_eq!(ts.sample_weight(w), w);
        }
        assert_eq!(term(IdentityWeighting::OneMinusTSquared).sample_weight(0.25), 0.5625);
        assert_eq!(term(IdentityWeighting::TMax).sample_weight(0.5), 1.0);
        assert_eq!(term(IdentityWeighting::TMax).sample_weight(0.75), 0.0);
        assert_eq!(term(IdentityWeighting::None).sample_weight(0.9), 1.0);
    }

    /// A model interface with these image inputs (name, required), `caption` and its own loss.
    fn interface(images: &[(&str, bool)]) -> ModelInterface {
        let decl = |n: &str, required: bool| IoDecl { name: n.into(), required, doc: "test".into() };
        ModelInterface {
            images: images.iter().map(|(n, r)| decl(n, *r)).collect(),
            texts: vec![decl("caption", true)].into(),
            outputs: vec![decl("pixels", true)].into(),
            internal_loss: true,
            encodings: Default::default(),
            param_groups: Default::default(),
            adapter_formats: Default::default(),
            can_sample: false,
        }
    }

    /// Issue 17's dataset: a musubi dataset.toml whose image `one` has one control and `two`
    /// two (`two_0.png`, `two_1.png`), batch size 1; and a config training on it.
    fn two_control_counts(dir: &std::path::Path) -> (Config, DataSet) {
        let (img, ctl) = (dir.join("img"), dir.join("ctl"));
        crate::data::testutil::write_img(&img.join("one.png"), 64, 64, 1);
        crate::data::testutil::write_img(&img.join("two.png"), 64, 64, 2);
        std::fs::write(img.join("one.txt"), "one").unwrap();
        std::fs::write(img.join("two.txt"), "two").unwrap();
        crate::data::testutil::write_img(&ctl.join("one.png"), 64, 64, 3);
        crate::data::testutil::write_img(&ctl.join("two_0.png"), 64, 64, 4);
        crate::data::testutil::write_img(&ctl.join("two_1.png"), 64, 64, 5);
        let toml = dir.join("dataset.toml");
        std::fs::write(
            &toml,
            format!(
                "[general]\nresolution = 64\nbatch_size = 1\n[[datasets]]\nimage_directory = '{}'\ncontrol_directory = '{}'\n",
                img.display(),
                ctl.display()
            ),
        )
        .unwrap();
        let run = dir.join("run.toml");
        std::fs::write(
            &run,
            format!("[model]\nplugin = 'edit'\n[data]\nlayout = 'musubi'\nroot = '{}'\n", toml.display()),
        )
        .unwrap();
        let cfg = crate::config::Layered::new(Some(&run), &Default::default()).unwrap().extract().unwrap();
        let ds = crate::data::open(&cfg.data, 0).unwrap();
        (cfg, ds)
    }

    /// The image roles each batch of batch size 1 passes (by example id), or the first error.
    fn roles_per_batch(plan: &Plan, ds: &DataSet) -> Result<Vec<(String, Vec<String>)>> {
        let mut cache = crate::data::ImageCache::new();
        let mut out = Vec::new();
        for idx in crate::data::epoch_batches(&ds.train, 1, 0, 0) {
            let examples: Vec<&crate::data::Example> = idx.iter().map(|&i| &ds.train[i]).collect();
            let batch = crate::data::make_batch(&examples, &mut cache)?;
            // What Trainer::model_inputs does with them: each role's tensor of the batch.
            let roles = plan.batch_image_roles(&batch)?;
            for r in &roles {
                crate::train::step::batch_image(&batch, r)?;
            }
            out.push((batch.ids.join(","), roles));
        }
        out.sort();
        Ok(out)
    }

    /// Issue 17: a batch whose example has one control where another has two failed with
    /// "batch of 0/one has no image `control_1`" (every role of the data was required of
    /// every batch). A pattern `control_*` and a declared-optional `control_1` are passed when
    /// the batch has them; a required role a batch lacks is still an error naming it.
    #[test]
    fn issue_17_batches_pass_the_controls_they_have() {
        let d = tempfile::tempdir().unwrap();
        let (cfg, ds) = two_control_counts(d.path());
        let want = |one: &[&str], two: &[&str]| {
            let v = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            vec![("0/one".to_string(), v(one)), ("0/two".to_string(), v(two))]
        };
        let i = interface(&[("target", true), ("control_*", true)]);
        let plan = Plan::new(&cfg, "edit", &i, &ds, None).unwrap();
        assert_eq!(plan.image_inputs[1].roles, vec!["control", "control_1"]);
        assert!(
            plan.notes.iter().any(|n| n.contains("`control_*` takes the roles control, control_1")),
            "{:?}",
            plan.notes
        );
        assert_eq!(
            roles_per_batch(&plan, &ds).unwrap(),
            want(&["target", "control"], &["target", "control", "control_1"])
        );
        let i = interface(&[("target", true), ("control", true), ("control_1", false)]);
        let plan = Plan::new(&cfg, "edit", &i, &ds, None).unwrap();
        assert_eq!(
            roles_per_batch(&plan, &ds).unwrap(),
            want(&["target", "control"], &["target", "control", "control_1"])
        );
        let i = interface(&[("target", true), ("control_1", true)]);
        let plan = Plan::new(&cfg, "edit", &i, &ds, None).unwrap();
        let e = roles_per_batch(&plan, &ds).unwrap_err().to_string();
        assert!(e.contains("batch of 0/one has no image `control_1`"), "{e}");
    }

    /// A required pattern no role of the data matches is refused before anything loads, with
    /// the roles it would take and those the data has.
    #[test]
    fn a_required_pattern_needs_a_matching_role() {
        let d = tempfile::tempdir().unwrap();
        let (cfg, ds) = two_control_counts(d.path());
        let i = interface(&[("target", true), ("mask_*", true), ("depth_*", false)]);
        let e = Plan::new(&cfg, "edit", &i, &ds, None).unwrap_err().to_string();
        assert!(e.contains("needs images matching `mask_*` (`mask`, `mask_1`, `mask_2`, …)"), "{e}");
        assert!(e.contains("provides images: control, control_1, reference, target"), "{e}");
        assert!(!e.contains("depth"), "{e}");
    }

    /// The variant is named for what it reads (`timestep_weights`); configs keep spelling it
    /// `"timestep"`.
    #[test]
    fn timestep_weights_keep_their_config_spelling() {
        let w: IdentityWeighting = serde_json::from_value(json!("timestep")).unwrap();
        assert_eq!(w, IdentityWeighting::TimestepWeights);
        assert_eq!(serde_json::to_value(w).unwrap(), json!("timestep"));
        assert!(serde_json::from_value::<IdentityWeighting>(json!("timestep_weights")).is_err());
    }
}
