//! The training driver: data order, schedule, accumulation, clipping, validation, samples,
//! checkpoints and resume. Parameters and their optimizer live in the model plugin; the
//! bookkeeping lives here.
//!
//! Determinism: the data order of epoch `e` is `epoch_order(n, seed, e)` and the micro-batch
//! position follows from the optimizer step, so a run resumed from step `s` consumes exactly
//! the batches an uninterrupted run consumes after `s`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use likeness_abi::{ForwardMode, OptimizerStep};
use likeness_abi::CpuTensor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::config::{parse_device, Config, Schedule};
use crate::eval_faces::identity_similarities;
use crate::dataset::{self, make_batch, BundleDatasetConfig, Dataset, ImageCache, Pair};
use crate::metrics_log::MetricsLog;
use crate::plugins::{Loss, Metric, Model, Registry};
use crate::plots::{plot_band, plot_lines, BandPoint, Series};
use crate::visual::{save_grid, GridRow};
use crate::{EngineError, Result};

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
    pub seconds: f64,
}

/// Written next to the weights of every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub epoch: u64,
    pub model_plugin: String,
    pub best_val_loss: Option<f64>,
    pub first_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    #[serde(default)]
    pub first_identity_similarity: Option<f64>,
    #[serde(default)]
    pub last_identity_similarity: Option<f64>,
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

/// Everything the loop needs, opened once.
struct Parts {
    model: Model,
    loss: Loss,
    /// The identity metric: measured at every validation; a training loss too when
    /// `identity_loss` is present (metric.weight > 0).
    metric: Option<Metric>,
    identity_loss: Option<(Loss, f64)>,
}

struct Layout {
    out: PathBuf,
    checkpoints: PathBuf,
    samples: PathBuf,
    plots: PathBuf,
    metrics: PathBuf,
}

impl Layout {
    fn new(out: &Path) -> Layout {
        Layout {
            out: out.to_path_buf(),
            checkpoints: out.join("checkpoints"),
            samples: out.join("samples"),
            plots: out.join("plots"),
            metrics: out.join("metrics.jsonl"),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::io(path, e)
}

/// The newest complete checkpoint (`checkpoints/step-NNNNNNNN/state.json`).
pub fn latest_checkpoint(out: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    let dir = out.join("checkpoints");
    let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(None) };
    let mut best: Option<(u64, PathBuf)> = None;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse::<u64>().ok()) else { continue };
        if e.path().join("state.json").is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, e.path()));
        }
    }
    match best {
        None => Ok(None),
        Some((_, p)) => {
            let text = std::fs::read_to_string(p.join("state.json")).map_err(io(&p))?;
            let st: CheckpointState = serde_json::from_str(&text)
                .map_err(|e| EngineError::Io { path: p.join("state.json"), message: format!("corrupt checkpoint state: {e}") })?;
            Ok(Some((p, st)))
        }
    }
}

/// Writes a checkpoint directory atomically: everything goes to `.<name>.tmp`, then one rename.
fn write_checkpoint(model: &mut Model, dir: &Path, with_optimizer: bool, state: &CheckpointState) -> Result<()> {
    let parent = dir.parent().expect("checkpoint dir has a parent");
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".{}.tmp", dir.file_name().unwrap().to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    model.save_state(&tmp, with_optimizer)?;
    let state_path = tmp.join("state.json");
    crate::write_atomic(&state_path, &serde_json::to_vec_pretty(state).unwrap())?;
    // A previous checkpoint of the same name (a run that was killed after writing it and is
    // now past it again) is replaced.
    if dir.exists() {
        let old = parent.join(format!(".{}.old", dir.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    Ok(())
}

fn prune_checkpoints(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut steps: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for (_, p) in steps.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_dir_all(&p) {
            warn!("could not delete old checkpoint {}: {e}", p.display());
        }
    }
}

fn open_parts(cfg: &Config, registry: &Registry) -> Result<Parts> {
    let device = parse_device(&cfg.run.device)?;
    let seed = cfg.run.seed;
    let model = registry.open_model(&cfg.model.plugin, &cfg.model_config_json(), device, seed)?;
    let loss_json = serde_json::Value::Object(cfg.loss.config.clone()).to_string();
    let loss = registry.open_loss(&cfg.loss.plugin, &loss_json, device, seed)?;
    if !loss.descriptor.capabilities.differentiable {
        return Err(EngineError::Config(format!(
            "loss plugin `{}` is not differentiable and cannot be a training loss",
            loss.id
        )));
    }
    let mut metric = None;
    let mut identity_loss = None;
    if let Some(m) = &cfg.metric {
        let opened = registry.open_metric(&m.plugin, &serde_json::Value::Object(m.config.clone()).to_string(), device, seed)?;
        if m.weight > 0.0 {
            if !opened.descriptor.capabilities.differentiable {
                return Err(EngineError::Config(format!(
                    "metric `{}` has no backward (its descriptor says it is not differentiable), so it cannot be a training loss with metric.weight = {}; set metric.weight = 0 to use it for evaluation only",
                    opened.id, m.weight
                )));
            }
            let l = registry.open_loss(&m.loss, &serde_json::Value::Object(m.loss_config.clone()).to_string(), device, seed)?;
            if !l.descriptor.capabilities.differentiable {
                return Err(EngineError::Config(format!("identity loss `{}` is not differentiable", l.id)));
            }
            identity_loss = Some((l, m.weight));
        }
        metric = Some(opened);
    }
    Ok(Parts { model, loss, metric, identity_loss })
}

/// Trains as configured. See the module docs for the determinism contract.
pub fn train(cfg: &Config, registry: &Registry, opts: &TrainOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    let lay = Layout::new(&cfg.run.output);
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
    for d in [&lay.out, &lay.checkpoints, &lay.samples, &lay.plots] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let cfg_path = lay.out.join("config.toml");
    let cfg_text = format!(
        "# The resolved configuration of this run (all layers merged), as `host config show` prints it.\n{}",
        toml::to_string_pretty(cfg).map_err(|e| EngineError::Config(e.to_string()))?
    );
    crate::write_atomic(&cfg_path, cfg_text.as_bytes())?;

    // Plugins first: a misspelt id or a broken library is reported before a long data scan.
    let mut parts = open_parts(cfg, registry)?;
    let params = parts.model.parameters()?;
    info!(model = %parts.model.id, trainable = params.trainable, total = params.total, "model ready");

    let ds = dataset::scan(&BundleDatasetConfig {
        root: cfg.data.root.clone(),
        image_size: cfg.data.image_size,
        min_images_per_char: cfg.data.min_images_per_char,
        max_chars_per_bundle: cfg.data.max_chars_per_bundle,
        min_image_side: cfg.data.min_image_side,
        val_fraction: cfg.data.val_fraction,
        test_fraction: cfg.data.test_fraction,
        seed: cfg.run.seed,
        ..Default::default()
    })?;
    info!("{}", ds.describe().trim_end());
    if ds.train.is_empty() {
        return Err(EngineError::Dataset { root: cfg.data.root.clone(), message: "no training pairs after the split".into() });
    }
    write_split(&lay.out.join("split.json"), &ds)?;


    let t = &cfg.train;
    let bs = t.batch_size;
    let micro_per_epoch = ds.train.len().div_ceil(bs) as u64;
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
    };
    let mut log;
    let mut train_pts: Vec<(f64, f64)> = Vec::new();
    let mut val_pts: Vec<(f64, f64)> = Vec::new();
    let mut id_pts: Vec<BandPoint> = Vec::new();
    let resumed_from;
    if let Some((dir, st)) = &resume {
        if st.model_plugin != cfg.model.plugin {
            return Err(EngineError::Config(format!(
                "{} was written by model plugin `{}`, but this run uses `{}`",
                dir.display(),
                st.model_plugin,
                cfg.model.plugin
            )));
        }
        parts.model.load_state(dir)?;
        state = st.clone();
        resumed_from = Some(st.step);
        log = MetricsLog::resume(&lay.metrics, st.step)?;
        for r in MetricsLog::read(&lay.metrics)? {
            let (Some(step), kind) = (r["step"].as_f64(), r["type"].as_str()) else { continue };
            match kind {
                Some("train") => train_pts.push((step, r["loss"].as_f64().unwrap_or(f64::NAN))),
                Some("val") => {
                    val_pts.push((step, r["val_loss"].as_f64().unwrap_or(f64::NAN)));
                    if let (Some(mean), Some(min), Some(max)) =
                        (r["identity_similarity"].as_f64(), r["identity_similarity_min"].as_f64(), r["identity_similarity_max"].as_f64())
                    {
                        id_pts.push(BandPoint { x: step, mean, min, max });
                    }
                }
                _ => {}
            }
        }
        info!("resumed from {} (step {})", dir.display(), st.step);
    } else {
        resumed_from = None;
        log = MetricsLog::create(&lay.metrics)?;
        log.log(&json!({"type": "run", "model": cfg.model.plugin, "loss": cfg.loss.plugin, "train_pairs": ds.train.len(), "val_pairs": ds.val.len(), "total_steps": total_steps}))?;
    }

    let mut cache = ImageCache::new();
    let size = cfg.data.image_size;
    let samples: Vec<Pair> = ds.val.iter().chain(ds.train.iter()).take(t.sample_count.max(1)).cloned().collect();

    if resume.is_none() {
        let v = validate(&mut parts, &ds, bs, size, &mut cache, cfg)?;
        state.first_val_loss = v.map(|v| v.loss);
        state.last_val_loss = state.first_val_loss;
        state.first_identity_similarity = v.and_then(|v| v.identity).filter(|i| i.valid_pairs > 0).map(|i| i.mean);
        state.last_identity_similarity = state.first_identity_similarity;
        if let Some(v) = v {
            info!(val_loss = v.loss, identity_similarity = v.identity.map(|i| i.mean), "initial validation");
            record_validation(&mut log, 0, 0, &v, &mut val_pts, &mut id_pts)?;
        }
        write_samples(&mut parts.model, &samples, size, &mut cache, &lay.samples.join("step-00000000.png"))?;
    }

    let bar = progress_bar(opts.progress, total_steps, state.step);
    let mut order_epoch = u64::MAX;
    let mut order: Vec<usize> = Vec::new();
    let mut last_tick = Instant::now();
    let start_step = state.step;
    while state.step < total_steps {
        let step = state.step + 1;
        let lr = learning_rate(t.schedule, t.lr, step, t.warmup_steps, total_steps);
        let mut loss_sum = 0.0;
        let mut terms_sum: std::collections::BTreeMap<String, f64> = Default::default();
        for a in 0..accum {
            let micro = (step - 1) * accum + a;
            let epoch = micro / micro_per_epoch;
            if epoch != order_epoch {
                order = dataset::epoch_order(ds.train.len(), cfg.run.seed, epoch);
                order_epoch = epoch;
            }
            let pos = (micro % micro_per_epoch) as usize;
            let idx = &order[pos * bs..((pos + 1) * bs).min(order.len())];
            let pairs: Vec<&Pair> = idx.iter().map(|&i| &ds.train[i]).collect();
            let batch = make_batch(&pairs, size, &mut cache)?;
            let (l, terms) = train_micro_batch(&mut parts, &batch.reference, &batch.target, 1.0 / accum as f64, cfg)?;
            loss_sum += l / accum as f64;
            for (k, v) in terms {
                *terms_sum.entry(k).or_default() += v / accum as f64;
            }
        }
        let report = parts.model.optimizer_step(OptimizerStep {
            step,
            lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            max_grad_norm: t.max_grad_norm,
        })?;
        parts.model.zero_grad()?;
        state.step = step;
        let epoch_after = (step * accum) / micro_per_epoch;
        let epoch_done = epoch_after > ((step - 1) * accum) / micro_per_epoch;
        state.epoch = epoch_after;
        let it_s = 1.0 / last_tick.elapsed().as_secs_f64().max(1e-9);
        last_tick = Instant::now();
        log.log(&json!({"type": "train", "step": step, "epoch": state.epoch, "loss": loss_sum, "lr": lr, "grad_norm": report.grad_norm, "terms": terms_sum, "it_s": it_s}))?;
        train_pts.push((step as f64, loss_sum));
        bar.set_position(step);
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e}"));
        tracing::debug!(step, loss = loss_sum, lr, grad_norm = report.grad_norm, "step");

        let last = step == total_steps;
        if (epoch_done && state.epoch.is_multiple_of(t.validate_every_epochs.max(1))) || last {
            if let Some(v) = validate(&mut parts, &ds, bs, size, &mut cache, cfg)? {
                record_validation(&mut log, step, state.epoch, &v, &mut val_pts, &mut id_pts)?;
                state.last_val_loss = Some(v.loss);
                if let Some(i) = v.identity.filter(|i| i.valid_pairs > 0) {
                    state.last_identity_similarity = Some(i.mean);
                }
                if state.best_val_loss.is_none_or(|b| v.loss < b) {
                    state.best_val_loss = Some(v.loss);
                    write_checkpoint(&mut parts.model, &lay.out.join("best"), false, &state)?;
                }
                bar.suspend(|| info!(step, epoch = state.epoch, val_loss = v.loss, identity_similarity = v.identity.map(|i| i.mean), "validation"));
            }
            write_samples(&mut parts.model, &samples, size, &mut cache, &lay.samples.join(format!("step-{step:08}.png")))?;
            plot_lines(
                &lay.plots.join("loss.png"),
                &format!("{} — loss", cfg.model.plugin),
                "optimizer step",
                "loss",
                &[Series::new("train", train_pts.clone()), Series::new("validation", val_pts.clone())],
            )?;
            if let Some(m) = &parts.metric {
                plot_band(
                    &lay.plots.join("identity.png"),
                    &format!("identity similarity ({}), generated vs reference", m.id),
                    "optimizer step",
                    "cosine similarity (mean, min–max)",
                    &id_pts,
                )?;
            }
        }
        if (t.save_every > 0 && step.is_multiple_of(t.save_every)) || last {
            write_checkpoint(&mut parts.model, &lay.checkpoints.join(format!("step-{step:08}")), true, &state)?;
            prune_checkpoints(&lay.checkpoints, t.keep_checkpoints);
        }
    }
    bar.finish_and_clear();
    let final_dir = lay.out.join("final");
    write_checkpoint(&mut parts.model, &final_dir, false, &state)?;
    let done = state.step - start_step;
    info!(steps = done, seconds = started.elapsed().as_secs_f64(), "training finished");
    Ok(TrainSummary {
        output: lay.out.clone(),
        steps: state.step,
        resumed_from,
        first_val_loss: state.first_val_loss,
        last_val_loss: state.last_val_loss,
        best_val_loss: state.best_val_loss,
        final_weights: final_dir,
        best_weights: lay.out.join("best").exists().then(|| lay.out.join("best")),
        checkpoints: lay.checkpoints,
        samples: lay.samples,
        metrics: lay.metrics,
        plot: lay.plots.join("loss.png"),
        first_identity_similarity: state.first_identity_similarity,
        last_identity_similarity: state.last_identity_similarity,
        identity_plot: parts.metric.as_ref().map(|_| lay.plots.join("identity.png")),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn progress_bar(enabled: bool, total: u64, pos: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), if enabled { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} | {msg} | {per_sec} | ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}

/// One forward/backward over a micro-batch; returns the weighted loss and its terms.
/// `scale` = 1 / grad_accum: gradients are scaled so accumulated steps average.
fn train_micro_batch(
    parts: &mut Parts,
    reference: &CpuTensor<f32>,
    target: &CpuTensor<f32>,
    scale: f64,
    cfg: &Config,
) -> Result<(f64, Vec<(String, f64)>)> {
    let out = parts.model.forward(&[("reference", reference.view()), ("target", target.view())], ForwardMode::Train)?;
    let pixels = out.outputs.cpu(&parts.model.id, "pixels")?;
    if pixels.shape != target.shape {
        return Err(EngineError::Plugin {
            plugin: parts.model.id.clone(),
            message: format!("output `pixels` has shape {:?}, the targets have {:?}", pixels.shape, target.shape),
        });
    }
    let w = cfg.loss.weight;
    let l = parts.loss.value_and_grad(&[("prediction", pixels.view()), ("target", target.view())], true)?;
    let mut d_pixels = l.grads.cpu(&parts.loss.id, "prediction")?;
    let k = (w * scale) as f32;
    d_pixels.data.iter_mut().for_each(|g| *g *= k);
    let mut total = w * l.value;
    let mut terms: Vec<(String, f64)> = l.terms.iter().map(|(n, v)| (format!("{}.{n}", parts.loss.id), *v)).collect();
    terms.push((parts.loss.id.clone(), l.value));

    if let (Some(metric), Some((id_loss, weight))) = (parts.metric.as_mut(), parts.identity_loss.as_mut()) {
        // The reference embedding is a constant (no graph); the generated one keeps its graph.
        let r = metric.embed(reference.view(), ForwardMode::Eval)?;
        let g = metric.embed(pixels.view(), ForwardMode::Train)?;
        let il = id_loss.value_and_grad(
            &[("embedding", g.embeddings.view), ("reference_embedding", r.embeddings.view), ("valid", g.valid.view), ("reference_valid", r.valid.view)],
            true,
        )?;
        let mut d_emb = il.grads.cpu(&id_loss.id, "embedding")?;
        let k = (*weight * scale) as f32;
        d_emb.data.iter_mut().for_each(|x| *x *= k);
        let d_pix = metric.backward(d_emb.view())?;
        let d_pix = CpuTensor::<f32>::from_managed(&d_pix, "d_pixels")
            .map_err(|e| EngineError::Plugin { plugin: metric.id.clone(), message: e.message.to_string() })?;
        if d_pix.shape != d_pixels.shape {
            return Err(EngineError::Plugin {
                plugin: metric.id.clone(),
                message: format!("backward returned shape {:?}, expected {:?}", d_pix.shape, d_pixels.shape),
            });
        }
        d_pixels.data.iter_mut().zip(&d_pix.data).for_each(|(a, b)| *a += b);
        total += *weight * il.value;
        terms.push((format!("identity.{}", metric.id), il.value));
    }
    let internal_weight = 0.0;
    parts.model.backward(&[("pixels", d_pixels.view())], internal_weight)?;
    if let Some(il) = out.internal_loss {
        terms.push(("model.internal".into(), il));
    }
    Ok((total, terms))
}

/// What one validation pass measured.
#[derive(Debug, Clone, Copy)]
struct Validation {
    /// Mean content loss (× loss.weight) over the validation pairs.
    loss: f64,
    /// Identity similarity between generated and reference images, when a metric is configured.
    identity: Option<IdentityStats>,
}

/// Cosine similarity of metric embeddings (generated vs reference) over the pairs where the
/// metric found a face in both.
#[derive(Debug, Clone, Copy)]
struct IdentityStats {
    mean: f64,
    min: f64,
    max: f64,
    valid_pairs: usize,
    total_pairs: usize,
}

/// Validation loss (and identity similarity when a metric is configured) over the validation
/// pairs; None when there are none.
fn validate(parts: &mut Parts, ds: &Dataset, bs: usize, size: u32, cache: &mut ImageCache, cfg: &Config) -> Result<Option<Validation>> {
    if ds.val.is_empty() {
        return Ok(None);
    }
    let mut sum = 0.0;
    let mut n = 0usize;
    let mut sims: Vec<Option<f64>> = Vec::new();
    for chunk in ds.val.chunks(bs) {
        let b = make_batch(chunk, size, cache)?;
        let out = parts.model.forward(&[("reference", b.reference.view()), ("target", b.target.view())], ForwardMode::Eval)?;
        let pixels = out.outputs.cpu(&parts.model.id, "pixels")?;
        let l = parts.loss.value_and_grad(&[("prediction", pixels.view()), ("target", b.target.view())], false)?;
        sum += cfg.loss.weight * l.value * chunk.len() as f64;
        n += chunk.len();
        if let Some(metric) = parts.metric.as_mut() {
            sims.extend(identity_similarities(metric, &pixels, &b.reference)?);
        }
    }
    let identity = parts.metric.as_ref().map(|_| {
        let valid: Vec<f64> = sims.iter().flatten().copied().collect();
        let k = valid.len();
        IdentityStats {
            mean: if k == 0 { 0.0 } else { valid.iter().sum::<f64>() / k as f64 },
            min: valid.iter().copied().fold(f64::INFINITY, f64::min),
            max: valid.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            valid_pairs: k,
            total_pairs: sims.len(),
        }
    });
    Ok(Some(Validation { loss: sum / n as f64, identity }))
}

/// Logs a validation record and keeps the plotted series in step.
fn record_validation(
    log: &mut MetricsLog,
    step: u64,
    epoch: u64,
    v: &Validation,
    val_pts: &mut Vec<(f64, f64)>,
    id_pts: &mut Vec<BandPoint>,
) -> Result<()> {
    let mut rec = json!({"type": "val", "step": step, "epoch": epoch, "val_loss": v.loss});
    if let Some(id) = &v.identity {
        rec["identity_valid_pairs"] = json!(id.valid_pairs);
        rec["identity_total_pairs"] = json!(id.total_pairs);
        if id.valid_pairs > 0 {
            rec["identity_similarity"] = json!(id.mean);
            rec["identity_similarity_min"] = json!(id.min);
            rec["identity_similarity_max"] = json!(id.max);
            id_pts.push(BandPoint { x: step as f64, mean: id.mean, min: id.min, max: id.max });
        } else {
            warn!(step, "identity metric found no face in any validation pair (valid_pairs = 0): check the images and the metric's detector settings");
        }
    }
    log.log(&rec)?;
    val_pts.push((step as f64, v.loss));
    Ok(())
}

fn write_samples(model: &mut Model, pairs: &[Pair], size: u32, cache: &mut ImageCache, path: &Path) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let b = make_batch(pairs, size, cache)?;
    let out = model.forward(&[("reference", b.reference.view()), ("target", b.target.view())], ForwardMode::Eval)?;
    let gen = out.outputs.cpu(&model.id, "pixels")?;
    let per = (3 * size * size) as usize;
    let rows: Vec<GridRow> = (0..pairs.len())
        .map(|i| GridRow {
            reference: &b.reference.data[i * per..(i + 1) * per],
            target: &b.target.data[i * per..(i + 1) * per],
            generated: &gen.data[i * per..(i + 1) * per],
        })
        .collect();
    save_grid(path, size, &rows)
}

fn write_split(path: &Path, ds: &Dataset) -> Result<()> {
    let j = json!({"train": ds.train, "val": ds.val, "test": ds.test, "skipped_images": ds.skipped_images, "skipped_characters": ds.skipped_characters});
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
}
