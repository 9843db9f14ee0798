//! The training driver for any backbone: data order, schedule, accumulation, the loss terms,
//! validation, samples, checkpoints, adapters and resume. Parameters and their optimizer live
//! in the model plugin; the bookkeeping lives here.
//!
//! The order of a run, so that mistakes cost seconds, not model loads:
//! 1. the config's plugin ids are looked up (manifests only);
//! 2. the dataset is opened and checked ([`crate::data::open`]);
//! 3. the model library is opened (no weights) and its declared interface is checked against
//!    the dataset and the configured loss terms ([`plan::Plan::new`]);
//! 4. only then are the model, the metric and the losses created.
//!
//! The loss of a micro-batch is
//! `w_model·L_model + w_content·L_content + w_identity·L_identity + w_text·L_text`
//! ([`step`], [`text`]); every term is optional. Gradients never pass through the host's memory: each
//! term's gradient is scaled where it lives (`value_and_scaled_grad`, `backward_scaled`) and
//! the model sums them.
//!
//! Determinism: the data order of epoch `e` is [`crate::data::epoch_batches`]`(…, seed, e)`,
//! the micro-batch position follows from the optimizer step, and everything random a model
//! draws comes from the [`likeness_abi::StepContext`]'s per-sample seeds
//! ([`likeness_abi::sample_seed`]), so a run resumed from step `s` is bit-identical to an
//! uninterrupted one.

mod cache;
mod plan;
mod samples;
mod step;
pub mod text;

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use likeness_abi::OptimizerStep;
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

pub use crate::checkpoint::{latest_checkpoint, CheckpointState};
use crate::checkpoint::{prune_checkpoints, write_checkpoint};
use crate::config::{parse_device, Config, Schedule};
use crate::data::{self, DataSet, ImageCache};
use crate::metrics_log::MetricsLog;
use crate::plots::{plot_band, plot_lines, BandPoint, Series};
use crate::plugins::{Loss, Metric, Model, Registry};
use crate::{EngineError, Result};
use likeness_abi::PluginKind;
pub use plan::Plan;

/// How `host train` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in the output directory.
    pub resume: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub output: PathBuf,
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub first_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub final_weights: PathBuf,
    pub best_weights: Option<PathBuf>,
    pub checkpoints: PathBuf,
    pub samples: PathBuf,
    pub metrics: PathBuf,
    pub plot: PathBuf,
    /// Mean identity similarity at the first and last validation (when a metric is configured).
    pub first_identity_similarity: Option<f64>,
    pub last_identity_similarity: Option<f64>,
    pub identity_plot: Option<PathBuf>,
    /// Adapter files written at the end (`<output_name>.safetensors`, `-diffusers/`, `-peft/`).
    pub adapters: Vec<PathBuf>,
    /// The face-consistency report of the last `[eval]` (when `eval.every > 0`).
    pub face_consistency: Option<PathBuf>,
    pub seconds: f64,
}

/// Learning rate for the optimizer step `step` (1-based), as diffusers' schedulers compute it:
/// the multiplier of step s is `lambda(s - 1)`.
pub fn learning_rate(schedule: Schedule, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    let s = step.saturating_sub(1) as f64;
    let warmup = warmup as f64;
    if s < warmup {
        return base * s / warmup.max(1.0);
    }
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            let progress = (s - warmup) / ((total as f64 - warmup).max(1.0));
            base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// Everything a step needs, opened once.
pub(crate) struct Parts {
    pub model: Model,
    /// The content loss, when its term is active.
    pub content: Option<Loss>,
    /// The identity metric: measured at every validation; a training loss too when
    /// `identity_loss` is present (metric.weight > 0).
    pub metric: Option<Metric>,
    pub identity_loss: Option<Loss>,
    /// The `[text]` metric (its own instance, even when it is also the `[metric]`).
    pub text: Option<Metric>,
    /// Its embedding of every text seen so far (texts carry no gradient).
    pub text_cache: std::collections::HashMap<String, Vec<f32>>,
}

/// Where a run's files go.
pub(crate) struct Layout {
    pub out: PathBuf,
    pub checkpoints: PathBuf,
    /// The sample grids (`samples/step-N.png`).
    pub samples: PathBuf,
    /// musubi-tuner's `sample/` folder: one PNG per sample, musubi-tuner's names.
    pub sample: PathBuf,
    pub eval: PathBuf,
    pub plots: PathBuf,
    pub metrics: PathBuf,
}

impl Layout {
    fn new(out: &Path) -> Layout {
        Layout {
            out: out.to_path_buf(),
            checkpoints: out.join("checkpoints"),
            samples: out.join("samples"),
            sample: out.join("sample"),
            eval: out.join("eval"),
            plots: out.join("plots"),
            metrics: out.join("metrics.jsonl"),
        }
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::io(path, e)
}

/// The plotted series, rebuilt from metrics.jsonl on resume.
#[derive(Default)]
struct Curves {
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    identity: Vec<BandPoint>,
}

impl Curves {
    fn from_log(path: &Path) -> Result<Curves> {
        let mut c = Curves::default();
        for r in MetricsLog::read(path)? {
            let (Some(step), kind) = (r["step"].as_f64(), r["type"].as_str()) else { continue };
            match kind {
                Some("train") => c.train.push((step, r["loss"].as_f64().unwrap_or(f64::NAN))),
                Some("val") => {
                    c.val.push((step, r["val_loss"].as_f64().unwrap_or(f64::NAN)));
                    if let (Some(mean), Some(min), Some(max)) = (
                        r["identity_similarity"].as_f64(),
                        r["identity_similarity_min"].as_f64(),
                        r["identity_similarity_max"].as_f64(),
                    ) {
                        c.identity.push(BandPoint { x: step, mean, min, max });
                    }
                }
                _ => {}
            }
        }
        Ok(c)
    }
}

/// Trains as configured. See the module docs for the order of a run and the determinism
/// contract.
pub fn train(cfg: &Config, registry: &Registry, opts: &TrainOptions) -> Result<TrainSummary> {
    Trainer::new(cfg, registry, opts)?.run()
}

/// One run: its config, data, plugins, files and state.
pub(crate) struct Trainer<'a> {
    cfg: &'a Config,
    opts: &'a TrainOptions,
    started: Instant,
    /// When the run first began (Unix milliseconds; on `--resume` the original run's, from its
    /// checkpoint): the adapters' `ss_training_started_at` / `modelspec.date`. Metadata only: it
    /// never reaches the weights, the data order or a seed.
    started_at_ms: u64,
    lay: Layout,
    ds: DataSet,
    plan: Plan,
    parts: Parts,
    images: ImageCache,
    cache: cache::EncodingCache,
    state: CheckpointState,
    resumed_from: Option<u64>,
    log: MetricsLog,
    curves: Curves,
    micro_per_epoch: u64,
    total_steps: u64,
    /// Examples whose samples are written (validation first).
    sample_examples: Vec<data::Example>,
    last_eval: Option<PathBuf>,
}

impl<'a> Trainer<'a> {
    fn new(cfg: &'a Config, registry: &'a Registry, opts: &'a TrainOptions) -> Result<Trainer<'a>> {
        let started = Instant::now();
        let now_ms = unix_ms_now();
        let lay = Layout::new(&cfg.run.output);

        // 1. Ids first (manifests only): a misspelt plugin id is reported at once.
        registry.find(&cfg.model.plugin, PluginKind::Model)?;
        if let Some(m) = &cfg.metric {
            registry.find(&m.plugin, PluginKind::Metric)?;
        }
        let text_cfg = cfg.text.as_ref().filter(|t| t.weight != 0.0);
        if let Some(t) = text_cfg {
            registry.find(&t.plugin, PluginKind::Metric)?;
        }
        let device = parse_device(&cfg.run.device)?;

        // 2. Data before any library or weight is loaded.
        let ds = data::open(&cfg.data, cfg.run.seed)?;
        info!("{}", ds.describe().trim_end());
        if ds.train.is_empty() {
            return Err(EngineError::Dataset {
                root: cfg.data.root.clone(),
                message: "no training examples after the split".into(),
            });
        }

        // 3. The model's declared interface against the data and the loss terms.
        let lib = registry.open_model_library(&cfg.model.plugin)?;
        let model_json = cfg.model_config_json();
        let interface = lib.interface(&model_json)?;
        // The [text] metric's declared interface too (its library only, no instance).
        let text_json = text_cfg.map(|t| serde_json::Value::Object(t.config.clone()).to_string());
        let text_interface = match (text_cfg, &text_json) {
            (Some(t), Some(j)) => Some(registry.metric_interface(&t.plugin, j)?),
            _ => None,
        };
        let plan = Plan::new(cfg, &lib.id, &interface, &ds, text_interface.as_ref())?;
        for note in &plan.notes {
            info!("{note}");
        }

        let resume = if opts.resume { latest_checkpoint(&lay.out)? } else { None };
        if opts.resume && resume.is_none() {
            info!("--resume: no checkpoint in {}, starting from scratch", lay.checkpoints.display());
        }
        if !opts.resume && lay.metrics.exists() {
            return Err(EngineError::Config(format!(
                "{} already holds a run (metrics.jsonl exists): pass --resume to continue it, or choose another --output",
                lay.out.display()
            )));
        }
        if let Some((dir, st)) = &resume {
            if st.model_plugin != cfg.model.plugin {
                return Err(EngineError::Config(format!(
                    "{} was written by model plugin `{}`, but this run uses `{}`",
                    dir.display(),
                    st.model_plugin,
                    cfg.model.plugin
                )));
            }
        }
        for d in [&lay.out, &lay.checkpoints, &lay.samples, &lay.plots] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let cfg_path = lay.out.join("config.toml");
        let cfg_text = format!(
            "# The resolved configuration of this run (all layers merged), as `host config show` prints it.\n{}",
            toml::to_string_pretty(cfg).map_err(|e| EngineError::Config(e.to_string()))?
        );
        crate::write_atomic(&cfg_path, cfg_text.as_bytes())?;
        write_split(&lay.out.join("split.json"), &ds)?;

        // 4. The plugins.
        let seed = cfg.run.seed;
        let mut model = lib.create(&model_json, device, seed)?;
        let params = model.parameters()?;
        info!(model = %model.id, abi = %model.abi, trainable = params.trainable, total = params.total, "model ready");
        let content = match &plan.content {
            None => None,
            Some(_) => {
                let loss_json = serde_json::Value::Object(cfg.loss.config.clone()).to_string();
                let l = registry.open_loss(&cfg.loss.plugin, &loss_json, device, seed)?;
                if !l.descriptor.capabilities.differentiable {
                    return Err(EngineError::Config(format!(
                        "loss plugin `{}` is not differentiable and cannot be a training loss",
                        l.id
                    )));
                }
                Some(l)
            }
        };
        let (metric, identity_loss) = open_metric(cfg, registry, device, seed)?;
        let text = match (text_cfg, &text_json, &plan.text) {
            (Some(t), Some(j), Some(_)) => {
                let m = registry.open_metric(&t.plugin, j, device, seed)?;
                if !m.descriptor.capabilities.differentiable {
                    return Err(EngineError::Config(format!(
                        "text.plugin = `{}` has no backward (its descriptor says it is not differentiable), so it cannot train the text term with text.weight = {}; remove [text] or set text.weight = 0",
                        m.id, t.weight
                    )));
                }
                Some(m)
            }
            _ => None,
        };

        let t = &cfg.train;
        let micro_per_epoch = data::epoch_batches(&ds.train, t.batch_size, seed, 0).len().max(1) as u64;
        let accum = t.grad_accum as u64;
        let total_steps = if t.steps > 0 { t.steps } else { (t.epochs * micro_per_epoch).div_ceil(accum).max(1) };

        let mut state = CheckpointState {
            step: 0,
            epoch: 0,
            model_plugin: cfg.model.plugin.clone(),
            best_val_loss: None,
            first_val_loss: None,
            last_val_loss: None,
            first_identity_similarity: None,
            last_identity_similarity: None,
            training_started_at_ms: Some(now_ms),
            ..Default::default()
        };
        let (log, curves, resumed_from) = match &resume {
            Some((dir, st)) => {
                model.load_state(dir)?;
                state = st.clone();
                if state.training_started_at_ms.is_none() {
                    warn!(
                        "{} has no training_started_at_ms (written before the start time was kept): the adapters' ss_training_started_at / modelspec.date are the time of this resume; the checkpoints written from now on keep it",
                        dir.join(crate::checkpoint::STATE_FILE).display()
                    );
                    state.training_started_at_ms = Some(now_ms);
                }
                let log = MetricsLog::resume(&lay.metrics, st.step)?;
                info!("resumed from {} (step {})", dir.display(), st.step);
                (log, Curves::from_log(&lay.metrics)?, Some(st.step))
            }
            None => {
                let mut log = MetricsLog::create(&lay.metrics)?;
                log.log(&json!({
                    "type": "run", "model": cfg.model.plugin, "model_abi": model.abi.to_string(),
                    "loss": content.as_ref().map(|l| l.id.clone()), "metric": metric.as_ref().map(|m| m.id.clone()),
                    "text_metric": text.as_ref().map(|m| m.id.clone()),
                    "terms": plan.term_names(), "layout": ds.layout, "train_examples": ds.train.len(),
                    "val_examples": ds.val.len(), "total_steps": total_steps,
                }))?;
                (log, Curves::default(), None)
            }
        };
        let cache_dir = cfg.cache.dir.clone().unwrap_or_else(|| lay.out.join("cache"));
        let cache =
            cache::EncodingCache::new(&cache_dir, &model, &cfg.model.config, &plan.encodings, cfg.cache.enabled);
        let sample_examples: Vec<data::Example> =
            ds.val.iter().chain(ds.train.iter()).take(t.sample_count.max(1)).cloned().collect();
        let images = ImageCache::for_dataset(&ds);
        let started_at_ms = state.training_started_at_ms.unwrap_or(now_ms);
        Ok(Trainer {
            cfg,
            opts,
            started,
            started_at_ms,
            lay,
            ds,
            plan,
            parts: Parts { model, content, metric, identity_loss, text, text_cache: Default::default() },
            images,
            cache,
            state,
            resumed_from,
            log,
            curves,
            micro_per_epoch,
            total_steps,
            sample_examples,
            last_eval: None,
        })
    }

    fn run(mut self) -> Result<TrainSummary> {
        let cfg = self.cfg;
        let t = &cfg.train;
        if self.resumed_from.is_none() {
            let v = self.validate()?;
            self.state.first_val_loss = v.as_ref().map(|v| v.loss);
            self.state.last_val_loss = self.state.first_val_loss;
            self.state.first_identity_similarity =
                v.as_ref().and_then(|v| v.identity).filter(|i| i.valid_pairs > 0).map(|i| i.mean);
            self.state.last_identity_similarity = self.state.first_identity_similarity;
            if let Some(v) = &v {
                info!(val_loss = v.loss, identity_similarity = v.identity.map(|i| i.mean), "initial validation");
                self.record_validation(0, v)?;
            }
            self.write_samples(0)?;
        }

        let bar = progress_bar(self.opts.progress, self.total_steps, self.state.step);
        let mut order_epoch = u64::MAX;
        let mut order: Vec<Vec<usize>> = Vec::new();
        let mut last_tick = Instant::now();
        let start_step = self.state.step;
        let accum = t.grad_accum as u64;
        while self.state.step < self.total_steps {
            let step = self.state.step + 1;
            let lr = learning_rate(t.schedule, t.lr, step, t.warmup_steps, self.total_steps);
            let mut acc = step::StepTotals::default();
            for a in 0..accum {
                let micro = (step - 1) * accum + a;
                let epoch = micro / self.micro_per_epoch;
                if epoch != order_epoch {
                    order = data::epoch_batches(&self.ds.train, t.batch_size, cfg.run.seed, epoch);
                    order_epoch = epoch;
                }
                let pos = (micro % self.micro_per_epoch) as usize;
                let examples: Vec<data::Example> =
                    order[pos % order.len()].iter().map(|&i| self.ds.train[i].clone()).collect();
                let r = self.train_micro_batch(&examples, step, a, epoch, 1.0 / accum as f64)?;
                acc.add(&r, 1.0 / accum as f64);
            }
            let groups = self.plan.group_hypers(cfg, lr, t.lr);
            let report = self.parts.model.optimizer_step_groups(
                OptimizerStep {
                    step,
                    lr,
                    beta1: t.beta1,
                    beta2: t.beta2,
                    eps: t.eps,
                    weight_decay: t.weight_decay,
                    max_grad_norm: t.max_grad_norm,
                },
                &groups,
            )?;
            self.parts.model.zero_grad()?;
            self.state.step = step;
            let epoch_after = (step * accum) / self.micro_per_epoch;
            let epoch_done = epoch_after > ((step - 1) * accum) / self.micro_per_epoch;
            self.state.epoch = epoch_after;
            let it_s = 1.0 / last_tick.elapsed().as_secs_f64().max(1e-9);
            last_tick = Instant::now();
            let mut rec = json!({
                "type": "train", "step": step, "epoch": self.state.epoch, "loss": acc.loss, "lr": lr,
                "grad_norm": report.grad_norm, "terms": acc.terms, "it_s": it_s,
            });
            if self.plan.text.is_some() {
                // Every train record of a run with the term says how aligned the step was
                // (null when the metric found nothing to embed in any sample).
                rec["text"] = json!(acc.terms.get("text"));
                rec["text_similarity"] = json!(acc.text_similarity());
            }
            if let Some(m) = &self.parts.metric {
                if self.parts.identity_loss.is_some() {
                    rec["no_face"] = json!(acc.no_face);
                    rec["identity_samples"] = json!(acc.identity_samples);
                    if acc.no_face > 0 {
                        tracing::debug!(step, no_face = acc.no_face, samples = acc.identity_samples, metric = %m.id, "samples without a face (no identity gradient)");
                    }
                }
            }
            self.log.log(&rec)?;
            self.curves.train.push((step as f64, acc.loss));
            bar.set_position(step);
            bar.set_message(format!(
                "loss {:.4} lr {lr:.2e}{}",
                acc.loss,
                if acc.identity_samples > 0 {
                    format!(" no-face {}/{}", acc.no_face, acc.identity_samples)
                } else {
                    String::new()
                }
            ));
            if self.opts.progress {
                tracing::debug!(step, loss = acc.loss, lr, grad_norm = report.grad_norm, no_face = acc.no_face, "step");
            } else {
                // No progress bar (not a terminal): one line per step says where the run is.
                info!(step, loss = acc.loss, lr, grad_norm = report.grad_norm, no_face = acc.no_face, "step");
            }

            let last = step == self.total_steps;
            let validate_now = (epoch_done && self.state.epoch.is_multiple_of(t.validate_every_epochs.max(1))) || last;
            if validate_now {
                if let Some(v) = self.validate()? {
                    self.record_validation(step, &v)?;
                    self.state.last_val_loss = Some(v.loss);
                    if let Some(i) = v.identity.filter(|i| i.valid_pairs > 0) {
                        self.state.last_identity_similarity = Some(i.mean);
                    }
                    if self.state.best_val_loss.is_none_or(|b| v.loss < b) {
                        self.state.best_val_loss = Some(v.loss);
                        let st = self.state.clone();
                        let model = &mut self.parts.model;
                        write_checkpoint(|d| model.save_state(d, false), &self.lay.out.join("best"), &st)?;
                    }
                    bar.suspend(|| {
                        info!(
                            step,
                            epoch = self.state.epoch,
                            val_loss = v.loss,
                            identity_similarity = v.identity.map(|i| i.mean),
                            "validation"
                        )
                    });
                }
                self.plot()?;
            }
            // `[eval] every = N` evaluates the samples of every N-th step, so those are written too.
            let eval_now = cfg.eval.every > 0 && step.is_multiple_of(cfg.eval.every);
            let sample_now = eval_now
                || if cfg.sample.every_steps > 0 {
                    step.is_multiple_of(cfg.sample.every_steps) || last
                } else {
                    validate_now
                };
            if sample_now {
                bar.suspend(|| self.write_samples(step))?;
            }
            if epoch_done {
                if let Some(dir) = cfg.adapter.save_dir.clone() {
                    // The epoch just finished is epoch_after − 1 (0-based, DRIP's epochNN).
                    bar.suspend(|| self.export_epoch(&dir, self.state.epoch - 1))?;
                }
            }
            if (t.save_every > 0 && step.is_multiple_of(t.save_every)) || last {
                let st = self.state.clone();
                let model = &mut self.parts.model;
                write_checkpoint(
                    |d| model.save_state(d, true),
                    &self.lay.checkpoints.join(format!("step-{step:08}")),
                    &st,
                )?;
                prune_checkpoints(&self.lay.checkpoints, t.keep_checkpoints);
                if !last {
                    self.export_adapters(Some(step))?;
                }
            }
        }
        bar.finish_and_clear();
        if self.cache.enabled() {
            info!(hits = self.cache.hits, misses = self.cache.misses, "encoding cache");
            self.log.log(&json!({"type": "cache", "step": self.state.step, "hits": self.cache.hits, "misses": self.cache.misses}))?;
        }
        let final_dir = self.lay.out.join("final");
        let st = self.state.clone();
        let model = &mut self.parts.model;
        write_checkpoint(|d| model.save_state(d, false), &final_dir, &st)?;
        let adapters = self.export_adapters(None)?;
        let done = self.state.step - start_step;
        info!(steps = done, seconds = self.started.elapsed().as_secs_f64(), "training finished");
        Ok(TrainSummary {
            output: self.lay.out.clone(),
            steps: self.state.step,
            resumed_from: self.resumed_from,
            first_val_loss: self.state.first_val_loss,
            last_val_loss: self.state.last_val_loss,
            best_val_loss: self.state.best_val_loss,
            final_weights: final_dir,
            best_weights: self.lay.out.join("best").exists().then(|| self.lay.out.join("best")),
            checkpoints: self.lay.checkpoints.clone(),
            samples: self.lay.samples.clone(),
            metrics: self.lay.metrics.clone(),
            plot: self.lay.plots.join("loss.png"),
            first_identity_similarity: self.state.first_identity_similarity,
            last_identity_similarity: self.state.last_identity_similarity,
            identity_plot: self.parts.metric.as_ref().map(|_| self.lay.plots.join("identity.png")),
            adapters,
            face_consistency: self.last_eval.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }

    fn plot(&self) -> Result<()> {
        plot_lines(
            &self.lay.plots.join("loss.png"),
            &format!("{} — loss", self.cfg.model.plugin),
            "optimizer step",
            "loss",
            &[Series::new("train", self.curves.train.clone()), Series::new("validation", self.curves.val.clone())],
        )?;
        if let Some(m) = &self.parts.metric {
            plot_band(
                &self.lay.plots.join("identity.png"),
                &format!("identity similarity ({}), generated vs reference", m.id),
                "optimizer step",
                "cosine similarity (mean, min–max)",
                &self.curves.identity,
            )?;
        }
        Ok(())
    }

    /// Logs a validation record and keeps the plotted series in step.
    fn record_validation(&mut self, step: u64, v: &step::Validation) -> Result<()> {
        let mut rec =
            json!({"type": "val", "step": step, "epoch": self.state.epoch, "val_loss": v.loss, "terms": v.terms});
        if let Some(id) = &v.identity {
            rec["identity_valid_pairs"] = json!(id.valid_pairs);
            rec["identity_total_pairs"] = json!(id.total_pairs);
            if id.valid_pairs > 0 {
                rec["identity_similarity"] = json!(id.mean);
                rec["identity_similarity_min"] = json!(id.min);
                rec["identity_similarity_max"] = json!(id.max);
                self.curves.identity.push(BandPoint { x: step as f64, mean: id.mean, min: id.min, max: id.max });
            } else {
                warn!(step, "identity metric found no face in any validation pair (valid_pairs = 0): check the images and the metric's detector settings");
            }
        }
        self.log.log(&rec)?;
        self.curves.val.push((step as f64, v.loss));
        Ok(())
    }

    /// Writes the trained adapter in every configured format under musubi-tuner's names:
    /// `<name>.safetensors` (kohya), `<name>-diffusers/`, `<name>-peft/`, `<name>-comfyui.safetensors`;
    /// `step` adds `-step<NNNNNNNN>` as musubi-tuner (sd-scripts' `get_step_ckpt_name`) names
    /// its per-save copies.
    fn export_adapters(&mut self, step: Option<u64>) -> Result<Vec<PathBuf>> {
        let name = self.cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into());
        let base = match step {
            Some(s) => format!("{name}-step{s:08}"),
            None => name,
        };
        let meta =
            self.plan.adapter_metadata(self.cfg, &self.ds, self.state.step, self.state.epoch, self.started_at_ms);
        let mut written = Vec::new();
        for format in self.plan.adapter_formats.clone() {
            written.push(samples::export_adapter(&mut self.parts.model, &self.lay.out, &base, &format, &meta)?);
        }
        Ok(written)
    }
}

impl Trainer<'_> {
    /// DRIP's per-epoch output: every configured adapter format of the weights after epoch
    /// `epoch` (0-based) in `save_dir/epochNN/`, under the same names as the run's final files.
    /// The folder is assembled under a temporary name and renamed into place, so a crash never
    /// leaves a half-written `epochNN/` (a folder left from an earlier, interrupted run is
    /// replaced).
    fn export_epoch(&mut self, save_dir: &Path, epoch: u64) -> Result<PathBuf> {
        let name = self.cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into());
        let dest = save_dir.join(epoch_dir_name(epoch));
        let tmp = save_dir.join(format!(".{}.tmp", epoch_dir_name(epoch)));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let meta = self.plan.adapter_metadata(self.cfg, &self.ds, self.state.step, epoch + 1, self.started_at_ms);
        for format in self.plan.adapter_formats.clone() {
            samples::export_adapter(&mut self.parts.model, &tmp, &name, &format, &meta)?;
        }
        if dest.exists() {
            let old = save_dir.join(format!(".{}.old", epoch_dir_name(epoch)));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&dest, &old).map_err(io(&dest))?;
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        info!(epoch, path = %dest.display(), "epoch adapter written");
        self.log.log(&json!({"type": "epoch_adapter", "step": self.state.step, "epoch": epoch, "path": dest}))?;
        Ok(dest)
    }
}

/// DRIP's folder name of the weights after 0-based epoch `epoch`: `epoch00`, `epoch01`, …
/// (the seed's `lora_out/epoch00/ # epoch 0 LoRA weights`); three digits from epoch 100 on.
pub fn epoch_dir_name(epoch: u64) -> String {
    format!("epoch{epoch:02}")
}

fn open_metric(
    cfg: &Config,
    registry: &Registry,
    device: likeness_abi::Device,
    seed: u64,
) -> Result<(Option<Metric>, Option<Loss>)> {
    let Some(m) = &cfg.metric else { return Ok((None, None)) };
    let metric =
        registry.open_metric(&m.plugin, &serde_json::Value::Object(m.config.clone()).to_string(), device, seed)?;
    if m.weight <= 0.0 {
        return Ok((Some(metric), None));
    }
    if !metric.descriptor.capabilities.differentiable {
        return Err(EngineError::Config(format!(
            "metric `{}` has no backward (its descriptor says it is not differentiable), so it cannot be a training loss with metric.weight = {}; set metric.weight = 0 to use it for evaluation only",
            metric.id, m.weight
        )));
    }
    let l = registry.open_loss(&m.loss, &serde_json::Value::Object(m.loss_config.clone()).to_string(), device, seed)?;
    if !l.descriptor.capabilities.differentiable {
        return Err(EngineError::Config(format!("identity loss `{}` is not differentiable", l.id)));
    }
    Ok((Some(metric), Some(l)))
}

fn progress_bar(enabled: bool, total: u64, pos: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if enabled { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} | {msg} | {per_sec} | ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}

/// Now as Unix milliseconds (0 on a clock set before 1970, which only affects metadata).
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn write_split(path: &Path, ds: &DataSet) -> Result<()> {
    let j = json!({"layout": ds.layout, "train": ds.train, "val": ds.val, "test": ds.test, "problems": ds.problems});
    crate::write_atomic(path, serde_json::to_string_pretty(&j).unwrap().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_diffusers() {
        // diffusers get_cosine_schedule_with_warmup(warmup=2, total=10): lambda(0)=0, lambda(1)=0.5,
        // lambda(2)=1, lambda(6)=0.5 (half-way through the cosine), lambda(10)=0.
        let lr = |s| learning_rate(Schedule::Cosine, 1.0, s, 2, 10);
        assert_eq!(lr(1), 0.0);
        assert_eq!(lr(2), 0.5);
        assert!((lr(3) - 1.0).abs() < 1e-12);
        assert!((lr(7) - 0.5).abs() < 1e-12);
        assert!(lr(11).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 2.0, 100, 0, 10), 2.0);
    }

    #[test]
    fn epoch_folders_are_drips() {
        assert_eq!(epoch_dir_name(0), "epoch00");
        assert_eq!(epoch_dir_name(7), "epoch07");
        assert_eq!(epoch_dir_name(12), "epoch12");
        assert_eq!(epoch_dir_name(100), "epoch100");
    }
}
