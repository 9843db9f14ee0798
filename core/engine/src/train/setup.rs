//! Opening a run, in the order that makes mistakes cost seconds, not model loads (see the
//! module docs of [`super`]): plugin ids, the dataset, the model's declared interface against
//! both ([`Plan::new`]), then the plugins, and a fresh start or a resume.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tracing::{info, warn};

use super::cache::EncodingCache;
use super::plan::IdentityPlan;
use super::terms::{Conditioner, ContentTerm, IdentityRole, IdentityTerm, ModelTerm, Terms, TextAlignmentTerm};
use super::{io, latest_checkpoint, CheckpointState, Curves, Parts, Plan, RunDirs, TrainOptions, Trainer};
use crate::config::{parse_device, Config};
use crate::data::{self, DataSet, ImageCache};
use crate::metrics_log::MetricsLog;
use crate::plugins::{Loss, Model, ModelLibrary, Registry};
use crate::{EngineError, Result};
use likeness_abi::{Device, PluginKind};

/// The newest checkpoint to resume from: its folder and state.
type Resume = Option<(PathBuf, CheckpointState)>;

/// Where a run starts: its state, log and plotted series, and the step it resumed from.
struct Start {
    state: CheckpointState,
    log: MetricsLog,
    curves: Curves,
    resumed_from: Option<u64>,
}

impl<'a> Trainer<'a> {
    pub(super) fn new(cfg: &'a Config, registry: &'a Registry, opts: &'a TrainOptions) -> Result<Trainer<'a>> {
        let started = Instant::now();
        let now_ms = unix_ms_now();
        let dirs = RunDirs::new(&cfg.run.output);
        // 1. Ids first (manifests only): a misspelt plugin id is reported at once.
        check_plugin_ids(cfg, registry)?;
        let device = parse_device(&cfg.run.device)?;
        // 2. Data before any library or weight is loaded.
        let ds = open_data(cfg)?;
        // 3. The model's declared interface against the data and the loss terms.
        let lib = registry.open_model_library(&cfg.model.plugin)?;
        let model_json = cfg.model_config_json();
        let plan = make_plan(cfg, registry, &lib, &model_json, &ds)?;
        let resume = find_resume(cfg, opts, &dirs)?;
        prepare_output(cfg, &dirs, &ds)?;

        // 4. The plugins.
        let seed = cfg.run.seed;
        let mut model = lib.create(&model_json, device, seed)?;
        let params = model.parameters()?;
        info!(model = %model.id, abi = %model.abi, trainable = params.trainable, total = params.total, "model ready");
        let terms = open_terms(cfg, registry, &plan, device, seed)?;

        let t = &cfg.train;
        let micro_per_epoch = data::epoch_batches(&ds.train, t.batch_size, seed, 0).len().max(1) as u64;
        let accum = t.grad_accum as u64;
        let total_steps = if t.steps > 0 { t.steps } else { (t.epochs * micro_per_epoch).div_ceil(accum).max(1) };
        let start = match resume {
            Some((dir, st)) => resume_from(&dirs, &mut model, dir, st, now_ms)?,
            None => fresh_start(cfg, &dirs, &model, &terms, &plan, &ds, total_steps, now_ms)?,
        };

        let cache_dir = cfg.cache.dir.clone().unwrap_or_else(|| dirs.out.join("cache"));
        let cache = EncodingCache::new(&cache_dir, &model, &cfg.model.config, &plan.encodings, cfg.cache.enabled);
        // `train.sample_count = 0`: no samples (PairEdit's runs write none).
        let sample_examples: Vec<data::Example> =
            ds.val.iter().chain(ds.train.iter()).take(t.sample_count).cloned().collect();
        let images = ImageCache::for_dataset(&ds);
        let started_at_ms = start.state.training_started_at_ms.unwrap_or(now_ms);
        Ok(Trainer {
            cfg,
            opts,
            started,
            started_at_ms,
            dirs,
            ds,
            plan,
            parts: Parts { model, terms },
            images,
            cache,
            state: start.state,
            resumed_from: start.resumed_from,
            log: start.log,
            curves: start.curves,
            micro_per_epoch,
            total_steps,
            sample_examples,
            last_eval: None,
        })
    }
}

/// The `[text]` section, when its term is on (text.weight ≠ 0; Plan::new refuses < 0).
fn text_section(cfg: &Config) -> Option<&crate::config::TextSection> {
    cfg.text.as_ref().filter(|t| t.weight != 0.0)
}

fn json_string(config: &serde_json::Map<String, Value>) -> String {
    Value::Object(config.clone()).to_string()
}

/// Every configured plugin id is known (manifests only).
fn check_plugin_ids(cfg: &Config, registry: &Registry) -> Result<()> {
    registry.find(&cfg.model.plugin, PluginKind::Model)?;
    if let Some(m) = &cfg.metric {
        registry.find(&m.plugin, PluginKind::Metric)?;
    }
    if let Some(t) = text_section(cfg) {
        registry.find(&t.plugin, PluginKind::Metric)?;
    }
    Ok(())
}

/// The dataset, opened and checked; at least one training example.
fn open_data(cfg: &Config) -> Result<DataSet> {
    let ds = data::open(&cfg.data, cfg.run.seed)?;
    info!("{}", ds.describe().trim_end());
    if ds.train.is_empty() {
        return Err(EngineError::Dataset {
            root: cfg.data.root.clone(),
            message: "no training examples after the split".into(),
        });
    }
    Ok(ds)
}

/// The plan: the model's and the `[text]` metric's declared interfaces (libraries only, no
/// instance) against the data and the configured terms.
fn make_plan(cfg: &Config, registry: &Registry, lib: &ModelLibrary, model_json: &str, ds: &DataSet) -> Result<Plan> {
    let interface = lib.interface(model_json)?;
    let text_interface = match text_section(cfg) {
        Some(t) => Some(registry.metric_interface(&t.plugin, &json_string(&t.config))?),
        None => None,
    };
    let plan = Plan::new(cfg, &lib.id, &interface, ds, text_interface.as_ref())?;
    for note in &plan.notes {
        info!("{note}");
    }
    Ok(plan)
}

/// The checkpoint `--resume` continues from; an error when the output holds a run and
/// `--resume` is not given, or the checkpoint is another model plugin's.
fn find_resume(cfg: &Config, opts: &TrainOptions, dirs: &RunDirs) -> Result<Resume> {
    let resume = if opts.resume { latest_checkpoint(&dirs.out)? } else { None };
    if opts.resume && resume.is_none() {
        info!("--resume: no checkpoint in {}, starting from scratch", dirs.checkpoints.display());
    }
    if !opts.resume && dirs.metrics.exists() {
        return Err(EngineError::Config(format!(
            "{} already holds a run (metrics.jsonl exists): pass --resume to continue it, or choose another --output",
            dirs.out.display()
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
        warn_on_changed_config(cfg, &dirs.out.join("config.toml"));
    }
    Ok(resume)
}

/// A resumed run continues bit-identically only with the configuration it was started with
/// (seed, data, schedule). Changing one is allowed, as sd-scripts and musubi-tuner allow it
/// (a lower learning rate after a resume is common), but is said: each changed key, old → new.
fn warn_on_changed_config(cfg: &Config, previous: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(previous) else { return };
    let (Ok(old), Ok(new)) = (toml::from_str::<toml::Value>(&text), toml::Value::try_from(cfg)) else { return };
    let changed = config_changes(&old, &new);
    if !changed.is_empty() {
        warn!(
            "--resume with a configuration other than the run's ({}): {}; the result will differ from an uninterrupted run",
            previous.display(),
            changed.join(", ")
        );
    }
}

/// The dotted keys whose values differ between two configurations, `key: old → new`.
fn config_changes(old: &toml::Value, new: &toml::Value) -> Vec<String> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (Default::default(), Default::default());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let none = "(unset)".to_string();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} → {}", a.get(k).unwrap_or(&none), b.get(k).unwrap_or(&none)))
        .collect()
}

/// The output folders, the resolved `config.toml` and `split.json`.
fn prepare_output(cfg: &Config, dirs: &RunDirs, ds: &DataSet) -> Result<()> {
    for d in [&dirs.out, &dirs.checkpoints, &dirs.grids, &dirs.plots] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let cfg_path = dirs.out.join("config.toml");
    let cfg_text = format!(
        "# The resolved configuration of this run (all layers merged), as `host config show` prints it.\n{}",
        toml::to_string_pretty(cfg).map_err(|e| EngineError::Config(e.to_string()))?
    );
    crate::write_atomic(&cfg_path, cfg_text.as_bytes())?;
    let split =
        json!({"layout": ds.layout, "train": ds.train, "val": ds.val, "test": ds.test, "problems": ds.problems});
    crate::write_atomic(&dirs.out.join("split.json"), serde_json::to_string_pretty(&split).unwrap().as_bytes())
}

/// A loss plugin that must be differentiable to train; `refuse` words the error from its id.
fn open_training_loss(
    registry: &Registry,
    (id, config): (&str, &str),
    (device, seed): (Device, u64),
    refuse: fn(&str) -> String,
) -> Result<Loss> {
    let l = registry.open_loss(id, config, device, seed)?;
    if !l.descriptor.capabilities.differentiable {
        return Err(EngineError::Config(refuse(&l.id)));
    }
    Ok(l)
}

/// The loss terms with their plugins, created in the order model (done), content loss,
/// metric, identity loss, text metric.
fn open_terms(cfg: &Config, registry: &Registry, plan: &Plan, device: Device, seed: u64) -> Result<Terms> {
    let content = match plan.content_weight {
        None => None,
        Some(weight) => {
            let loss = open_training_loss(
                registry,
                (&cfg.loss.plugin, &json_string(&cfg.loss.config)),
                (device, seed),
                |id| format!("loss plugin `{id}` is not differentiable and cannot be a training loss"),
            )?;
            Some(ContentTerm { weight, loss })
        }
    };
    let identity =
        open_identity(cfg.metric.as_ref(), plan.identity.as_ref(), IdentityRole::Face, registry, (device, seed))?;
    let body = open_identity(cfg.body.as_ref(), plan.body.as_ref(), IdentityRole::Body, registry, (device, seed))?;
    let mut conditioning = Vec::new();
    for (input, c) in &cfg.model.conditioning {
        // Its config is resolved from [metric] / [body] by Layered::extract when it has none.
        let metric = registry.open_metric(&c.plugin, &json_string(&c.config), device, seed)?;
        conditioning.push(Conditioner { input: input.clone(), image: c.image.clone(), metric });
    }
    let text_alignment = match (text_section(cfg), &plan.text_alignment) {
        (Some(t), Some(tp)) => {
            let m = registry.open_metric(&t.plugin, &json_string(&t.config), device, seed)?;
            if !m.descriptor.capabilities.differentiable {
                return Err(EngineError::Config(format!(
                    "text.plugin = `{}` has no backward (its descriptor says it is not differentiable), so it cannot train the text term with text.weight = {}; remove [text] or set text.weight = 0",
                    m.id, t.weight
                )));
            }
            Some(TextAlignmentTerm::new(tp.clone(), m))
        }
        _ => None,
    };
    Ok(Terms { model: ModelTerm { weight: plan.model_weight }, content, identity, body, text_alignment, conditioning })
}

/// The identity term: the metric (measured at every validation), and with metric.weight > 0
/// the identity loss it trains with.
fn open_identity(
    section: Option<&crate::config::MetricSection>,
    plan: Option<&IdentityPlan>,
    role: IdentityRole,
    registry: &Registry,
    (device, seed): (Device, u64),
) -> Result<Option<IdentityTerm>> {
    let Some(m) = section else { return Ok(None) };
    let metric = registry.open_metric(&m.plugin, &json_string(&m.config), device, seed)?;
    let training = match (plan, m.weight > 0.0) {
        (Some(p), true) => {
            if !metric.descriptor.capabilities.differentiable {
                return Err(EngineError::Config(format!(
                    "metric `{}` has no backward (its descriptor says it is not differentiable), so it cannot be a training loss with metric.weight = {}; set metric.weight = 0 to use it for evaluation only",
                    metric.id, m.weight
                )));
            }
            let loss = open_training_loss(registry, (&m.loss, &json_string(&m.loss_config)), (device, seed), |id| {
                format!("identity loss `{id}` is not differentiable")
            })?;
            Some((p.clone(), loss))
        }
        _ => None,
    };
    Ok(Some(IdentityTerm { role, metric, output: m.output.clone(), training }))
}

/// A run from step 0: a new metrics.jsonl whose first record says what runs.
#[allow(clippy::too_many_arguments)]
fn fresh_start(
    cfg: &Config,
    dirs: &RunDirs,
    model: &Model,
    terms: &Terms,
    plan: &Plan,
    ds: &DataSet,
    total_steps: u64,
    now_ms: u64,
) -> Result<Start> {
    let state = CheckpointState {
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
    let mut log = MetricsLog::create(&dirs.metrics)?;
    log.log(&json!({
        "type": "run", "model": cfg.model.plugin, "model_abi": model.abi.to_string(),
        "loss": terms.content.as_ref().map(|t| t.loss.id.clone()), "metric": terms.metric().map(|m| m.id.clone()),
        "text_metric": terms.text_alignment.as_ref().map(|t| t.metric.id.clone()),
        "terms": plan.term_names(), "layout": ds.layout, "train_examples": ds.train.len(),
        "val_examples": ds.val.len(), "total_steps": total_steps,
    }))?;
    Ok(Start { state, log, curves: Curves::default(), resumed_from: None })
}

/// A run resumed from checkpoint `dir`: the model's state, the log cut at its step.
fn resume_from(dirs: &RunDirs, model: &mut Model, dir: PathBuf, st: CheckpointState, now_ms: u64) -> Result<Start> {
    model.load_state(&dir)?;
    let mut state = st.clone();
    if state.training_started_at_ms.is_none() {
        warn!(
            "{} has no training_started_at_ms (written before the start time was kept): the adapters' ss_training_started_at / modelspec.date are the time of this resume; the checkpoints written from now on keep it",
            dir.join(crate::checkpoint::STATE_FILE).display()
        );
        state.training_started_at_ms = Some(now_ms);
    }
    let log = MetricsLog::resume(&dirs.metrics, st.step)?;
    info!("resumed from {} (step {})", dir.display(), st.step);
    Ok(Start { state, log, curves: Curves::from_log(&dirs.metrics)?, resumed_from: Some(st.step) })
}

/// Now as Unix milliseconds (0 on a clock set before 1970, which only affects metadata).
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume with another seed was silently accepted (found in issue 17's resume test): the
    /// changed keys are named, unchanged ones are not.
    #[test]
    fn issue_17_a_resume_names_the_changed_config_keys() {
        let old: toml::Value = toml::from_str("[run]\nseed = 42\noutput = \"runs/a\"\n[train]\nlr = 1e-4\n").unwrap();
        let new: toml::Value =
            toml::from_str("[run]\nseed = 7\noutput = \"runs/a\"\n[train]\nlr = 1e-4\nsteps = 10\n").unwrap();
        assert_eq!(
            config_changes(&old, &new),
            vec!["run.seed: 42 → 7".to_string(), "train.steps: (unset) → 10".to_string()]
        );
        assert!(config_changes(&old, &old).is_empty());
    }
}
