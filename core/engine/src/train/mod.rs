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
//! ([`step`], [`terms`]); every term is optional. Gradients never pass through the host's memory: each
//! term's gradient is scaled where it lives (`value_and_scaled_grad`, `backward_scaled`) and
//! the model sums them.
//!
//! Determinism: the data order of epoch `e` is [`crate::data::epoch_batches`]`(…, seed, e)`,
//! the micro-batch position follows from the optimizer step, and everything random a model
//! draws comes from the [`likeness_abi::StepContext`]'s per-sample seeds
//! ([`likeness_abi::sample_seed`]), so a run resumed from step `s` is bit-identical to an
//! uninterrupted one.

mod adapters;
mod cache;
mod plan;
mod samples;
mod setup;
mod step;
mod terms;

/// The text-alignment term's maths under its former path (`train::text`).
pub mod text {
    pub use super::terms::text_alignment::{text_alignment, text_embeddings, TextAlignment};
}

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use likeness_abi::OptimizerStep;
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

pub use crate::checkpoint::{latest_checkpoint, CheckpointState};
use crate::checkpoint::{prune_checkpoints, write_checkpoint};
use crate::config::{Config, Schedule};
use crate::data::{self, DataSet, ImageCache};
use crate::metrics_log::MetricsLog;
use crate::plots::{plot_band, plot_lines, BandPoint, Series};
use crate::plugins::{Model, Registry};
use crate::{EngineError, Result};
pub use adapters::epoch_dir_name;
pub use plan::Plan;
use step::StepTotals;
pub(crate) use terms::Conditioner;
use terms::Terms;

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
    /// The sample grids (`samples/`, [`RunDirs::grids`]).
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

/// Everything a step needs, opened once: the model and the loss terms (which hold their own
/// plugins: the content loss, the identity metric and loss, the `[text]` metric).
pub(crate) struct Parts {
    pub model: Model,
    pub terms: Terms,
}

/// Where a run's files go (the output folders; not the dataset's layout, [`crate::data`]).
///
/// Two sample folders sit side by side on purpose: `sample/` is musubi-tuner's (its file names
/// and `control_image_<i>.png`, so `host eval-faces --sample-dir` and musubi-tuner's own tools
/// read it), `samples/` holds this trainer's reference | target | generated grids for a quick
/// look. Their names are on disk, in the README and in users' scripts, so they stay.
pub(crate) struct RunDirs {
    pub out: PathBuf,
    pub checkpoints: PathBuf,
    /// `samples/`: the reference | target | generated grids (`step-N.png`).
    pub grids: PathBuf,
    /// `sample/`: one PNG per sample under musubi-tuner's names, beside the control images.
    pub musubi_samples: PathBuf,
    pub eval: PathBuf,
    pub plots: PathBuf,
    pub metrics: PathBuf,
}

impl RunDirs {
    fn new(out: &Path) -> RunDirs {
        RunDirs {
            out: out.to_path_buf(),
            checkpoints: out.join("checkpoints"),
            grids: out.join("samples"),
            musubi_samples: out.join("sample"),
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
    // Hub ids in model.config.pretrained → their folder in the local Hugging Face cache, before
    // the model's interface is asked or its config written (issue 19).
    let cfg = &cfg.with_model_ids_resolved()?;
    // A bad --sample_prompts file is refused before any weight loads, not at the first sample.
    samples::check_prompt_file(&cfg.sample, &cfg.model.plugin)?;
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
    dirs: RunDirs,
    ds: DataSet,
    plan: Plan,
    parts: Parts,
    images: ImageCache,
    cache: cache::EncodingCache,
    state: CheckpointState,
    resumed_from: Option<u64>,
    log: MetricsLog,
    curves: Curves,
    /// Micro-batches per epoch (every epoch has as many: [`data::epoch_batches`] cuts each
    /// bucket group into the same number of batches whatever the shuffle).
    micro_per_epoch: u64,
    total_steps: u64,
    /// Examples whose samples are written (validation first).
    sample_examples: Vec<data::Example>,
    last_eval: Option<PathBuf>,
}

/// The batches of the epoch being trained, recomputed when the epoch changes.
struct EpochOrder {
    epoch: Option<u64>,
    batches: Vec<Vec<usize>>,
}

impl Trainer<'_> {
    fn run(mut self) -> Result<TrainSummary> {
        if self.resumed_from.is_none() {
            self.initial_validation()?;
        }
        let bar = progress_bar(self.opts.progress, self.total_steps, self.state.step);
        let mut order = EpochOrder { epoch: None, batches: Vec::new() };
        let mut last_tick = Instant::now();
        let start_step = self.state.step;
        let accum = self.cfg.train.grad_accum as u64;
        while self.state.step < self.total_steps {
            let step = self.state.step + 1;
            let (acc, lr, grad_norm) = self.optimizer_step(step, &mut order)?;
            self.state.step = step;
            let epoch_after = (step * accum) / self.micro_per_epoch;
            let epoch_done = epoch_after > ((step - 1) * accum) / self.micro_per_epoch;
            self.state.epoch = epoch_after;
            let it_s = 1.0 / last_tick.elapsed().as_secs_f64().max(1e-9);
            last_tick = Instant::now();
            self.log_step(step, lr, &acc, grad_norm, it_s, &bar)?;
            self.after_step(step, epoch_done, &bar)?;
        }
        bar.finish_and_clear();
        self.finish(start_step)
    }

    /// The validation and samples of step 0 (a fresh run only).
    fn initial_validation(&mut self) -> Result<()> {
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
        self.write_samples(0)
    }

    /// The training examples of micro-batch `micro` (of `epoch`). Every epoch has
    /// `micro_per_epoch` batches; a different count is an engine bug, refused rather than
    /// wrapped around (which would silently train on other batches than an uninterrupted run).
    fn micro_batch(&self, order: &mut EpochOrder, micro: u64, epoch: u64) -> Result<Vec<data::Example>> {
        if order.epoch != Some(epoch) {
            order.batches = data::epoch_batches(&self.ds.train, self.cfg.train.batch_size, self.cfg.run.seed, epoch);
            order.epoch = Some(epoch);
            if order.batches.len() as u64 != self.micro_per_epoch {
                return Err(EngineError::Other(format!(
                    "epoch {epoch} has {} batches but the run counted {} per epoch (engine bug: the batch count must not depend on the epoch)",
                    order.batches.len(),
                    self.micro_per_epoch
                )));
            }
        }
        let pos = (micro % self.micro_per_epoch) as usize;
        Ok(order.batches[pos].iter().map(|&i| self.ds.train[i].clone()).collect())
    }

    /// One optimizer step: `grad_accum` micro-batches, then the optimizer. Returns what the
    /// micro-batches measured, the learning rate and the gradient norm.
    fn optimizer_step(&mut self, step: u64, order: &mut EpochOrder) -> Result<(StepTotals, f64, f64)> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let lr = learning_rate(t.schedule, t.lr, step, t.warmup_steps, self.total_steps);
        let accum = t.grad_accum as u64;
        let mut acc = StepTotals::default();
        for a in 0..accum {
            let micro = (step - 1) * accum + a;
            let epoch = micro / self.micro_per_epoch;
            let examples = self.micro_batch(order, micro, epoch)?;
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
        Ok((acc, lr, report.grad_norm))
    }

    /// The train record of `step` in metrics.jsonl, the plotted series and the progress line.
    fn log_step(
        &mut self,
        step: u64,
        lr: f64,
        acc: &StepTotals,
        grad_norm: f64,
        it_s: f64,
        bar: &ProgressBar,
    ) -> Result<()> {
        let mut rec = json!({
            "type": "train", "step": step, "epoch": self.state.epoch, "loss": acc.loss, "lr": lr,
            "grad_norm": grad_norm, "terms": acc.terms, "it_s": it_s,
        });
        if self.plan.text_alignment.is_some() {
            // Every train record of a run with the term says how aligned the step was
            // (null when the metric found nothing to embed in any sample).
            rec["text"] = json!(acc.terms.get("text"));
            rec["text_similarity"] = json!(acc.text_similarity());
        }
        if let Some(id) = self.parts.terms.training_identity() {
            rec["no_face"] = json!(acc.no_face);
            rec["identity_samples"] = json!(acc.identity_samples);
            if acc.no_face > 0 {
                tracing::debug!(step, no_face = acc.no_face, samples = acc.identity_samples, metric = %id.metric.id, "samples without a face (no identity gradient)");
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
            tracing::debug!(step, loss = acc.loss, lr, grad_norm, no_face = acc.no_face, "step");
        } else {
            // No progress bar (not a terminal): one line per step says where the run is.
            info!(step, loss = acc.loss, lr, grad_norm, no_face = acc.no_face, "step");
        }
        Ok(())
    }

    /// What follows an optimizer step on its cadence: validation (+ best weights), samples
    /// (+ `[eval]`), DRIP's per-epoch adapters, checkpoints (+ per-save adapters).
    fn after_step(&mut self, step: u64, epoch_done: bool, bar: &ProgressBar) -> Result<()> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let last = step == self.total_steps;
        let validate_now = (epoch_done && self.state.epoch.is_multiple_of(t.validate_every_epochs.max(1))) || last;
        if validate_now {
            self.validate_and_record(step, bar)?;
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
            // musubi-tuner's --save_every_n_epochs: state.epoch is the 1-based epoch just done, of
            // train.epochs (or as many as train.steps reaches into, musubi-tuner's ceil).
            let epochs = match t.steps {
                0 => t.epochs,
                _ => (self.total_steps * t.grad_accum.max(1) as u64).div_ceil(self.micro_per_epoch.max(1)),
            };
            if cfg.adapter.pairedit.is_none() && adapters::saves_epoch(t.save_every_epochs, self.state.epoch, epochs) {
                bar.suspend(|| self.export_epoch_adapters(self.state.epoch))?;
            }
        }
        // PairEdit's own cadence and names (its 0-based loop index; see pairedit::intermediate_save).
        if let Some(names) = cfg.adapter.pairedit.clone() {
            if let Some(e) = crate::pairedit::intermediate_save(step, names.save_per_steps) {
                bar.suspend(|| self.export_pairedit(&names, e))?;
            }
        }
        if (t.save_every > 0 && step.is_multiple_of(t.save_every)) || last {
            let st = self.state.clone();
            let model = &mut self.parts.model;
            write_checkpoint(
                |d| model.save_state(d, true),
                &self.dirs.checkpoints.join(format!("step-{step:08}")),
                &st,
            )?;
            prune_checkpoints(&self.dirs.checkpoints, t.keep_checkpoints);
            if !last && cfg.adapter.pairedit.is_none() {
                self.export_adapters(Some(step))?;
            }
        }
        Ok(())
    }

    /// A validation after `step`: recorded, and the best weights kept.
    fn validate_and_record(&mut self, step: u64, bar: &ProgressBar) -> Result<()> {
        let Some(v) = self.validate()? else { return Ok(()) };
        self.record_validation(step, &v)?;
        self.state.last_val_loss = Some(v.loss);
        if let Some(i) = v.identity.filter(|i| i.valid_pairs > 0) {
            self.state.last_identity_similarity = Some(i.mean);
        }
        if self.state.best_val_loss.is_none_or(|b| v.loss < b) {
            self.state.best_val_loss = Some(v.loss);
            let st = self.state.clone();
            let model = &mut self.parts.model;
            write_checkpoint(|d| model.save_state(d, false), &self.dirs.out.join("best"), &st)?;
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
        Ok(())
    }

    /// The end of a run: the final weights and adapters, and the summary.
    fn finish(mut self, start_step: u64) -> Result<TrainSummary> {
        if self.cache.enabled() {
            info!(hits = self.cache.hits, misses = self.cache.misses, "encoding cache");
            self.log.log(&json!({"type": "cache", "step": self.state.step, "hits": self.cache.hits, "misses": self.cache.misses}))?;
        }
        let final_dir = self.dirs.out.join("final");
        let st = self.state.clone();
        let model = &mut self.parts.model;
        write_checkpoint(|d| model.save_state(d, false), &final_dir, &st)?;
        let adapters = match self.cfg.adapter.pairedit.clone() {
            // PairEdit's final files are named after train_iteration (= the steps run).
            Some(names) => self.export_pairedit(&names, self.state.step)?,
            None => self.export_adapters(None)?,
        };
        let done = self.state.step - start_step;
        info!(steps = done, seconds = self.started.elapsed().as_secs_f64(), "training finished");
        let d = &self.dirs;
        Ok(TrainSummary {
            output: d.out.clone(),
            steps: self.state.step,
            resumed_from: self.resumed_from,
            first_val_loss: self.state.first_val_loss,
            last_val_loss: self.state.last_val_loss,
            best_val_loss: self.state.best_val_loss,
            final_weights: final_dir,
            best_weights: d.out.join("best").exists().then(|| d.out.join("best")),
            checkpoints: d.checkpoints.clone(),
            samples: d.grids.clone(),
            metrics: d.metrics.clone(),
            plot: d.plots.join("loss.png"),
            first_identity_similarity: self.state.first_identity_similarity,
            last_identity_similarity: self.state.last_identity_similarity,
            identity_plot: self.parts.terms.metric().map(|_| d.plots.join("identity.png")),
            adapters,
            face_consistency: self.last_eval.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }

    fn plot(&self) -> Result<()> {
        plot_lines(
            &self.dirs.plots.join("loss.png"),
            &format!("{} — loss", self.cfg.model.plugin),
            "optimizer step",
            "loss",
            &[Series::new("train", self.curves.train.clone()), Series::new("validation", self.curves.val.clone())],
        )?;
        if let Some(m) = self.parts.terms.metric() {
            plot_band(
                &self.dirs.plots.join("identity.png"),
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
}
