//! `host`: the command-line face of likeness. Everything heavy lives in plugins; this binary
//! links no libtorch, ONNX Runtime or CUDA, so it starts, lists plugins and explains errors
//! on any machine.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use likeness_engine::config::{Layered, Overrides};
use likeness_engine::plugins::{default_search_path, Registry};
use likeness_engine::train::{train, TrainOptions};

mod inspect;
mod lora;
mod musubi_flags;
mod plugins_cmd;

const AFTER_HELP: &str = "\
Plugins are found (manifests only, no library is opened) in this order:
  --plugin-dir DIR, then LIKENESS_PLUGIN_PATH (':'-separated), then the user data dir
  ($LIKENESS_DATA_HOME/plugins or ~/.local/share/likeness/plugins), then plugins/ next to
  this executable. Each plugin is a folder with plugin.toml and its shared library.

Logging: RUST_LOG=debug host … (default: info).

Examples:
  host train --config configs/quickstart-cpu.toml
  host train --plugin identity-autoencoder --data ~/faces --steps 200 --lr 1e-3
  host train --config configs/quickstart-cpu.toml --resume
  host train --c=train_image        (PairEdit: config/train_image.yaml, every run of its loops)
  host config show --config configs/quickstart-cpu.toml --set train.lr=3e-4
  host eval-faces --sample-dir output/sample --output-json face_metrics.json
  host generate --config runs/x/config.toml --weights runs/x/final --prompt \"a photo\" --output gen/
  host data check ~/datasets/dataset.toml
  host plugins list
  host plugins new my-loss --kind loss --output ~/src/my-loss
  host plugins manifest target/release/libmy_loss.so > plugin.toml";

#[derive(Parser)]
#[command(name = "host", version, about = "Train image generators that keep a person's identity.", long_about = None, after_help = AFTER_HELP)]
struct Cli {
    /// Extra directory to search for plugins (repeatable; searched first).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model plugin on a dataset (checkpoints, samples, metrics and plots go to --output).
    #[command(after_help = AFTER_HELP, after_long_help = format!("{AFTER_HELP}\n\n{}", musubi_flags::HELP))]
    Train(TrainArgs),
    /// Inspect the merged configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Find, inspect and check plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Face consistency of generated images vs their control images (seed 004's evaluator):
    /// JSON report, per-pair CSV, plot by step.
    #[command(after_help = EVAL_FACES_HELP)]
    EvalFaces(EvalFacesArgs),
    /// Datasets: check what a layout finds and every problem by path.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate images with a (trained) model plugin: PNGs with the settings in their metadata.
    #[command(after_help = GENERATE_HELP)]
    Generate(GenerateArgs),
    /// LoRA files: inspect (format, which tool loads it, ranks, targets, metadata) and convert
    /// between kohya, diffusers, peft and comfyui.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
}

const GENERATE_HELP: &str = "\
The model comes from --plugin and its model.config from --config (any run's config.toml, or
a config file's [model] section) plus --set model.config.KEY=VALUE and --pretrained. --weights
loads what training wrote (a run's final/, best/ or checkpoints/step-N/). Image i uses seed
--seed + i and is written as <seed>_<i>.png, with prompt, seed, steps, guidance, adapter scale,
model, weights, LoRA path and scale in its PNG text chunks. --lora FILE_OR_DIR applies a trained
LoRA (model.config.lora; --lora-scale 0 = the base model). The model must implement ABI 1.1's
`sample`.

Examples:
  host generate --config runs/x/config.toml --weights runs/x/final --prompt \"a photo of sks person\" --output gen/
  host generate --plugin sd15-lora --pretrained_model /models/sd15 --lora lora_out/epoch02/drip_lora.safetensors --prompt \"a photo of sks person\" --seed 1 --steps 30 --cfg 7.5 --lora-scale 0.8 --width 512 --height 512 --output gen/
  host generate --c=train_image      (PairEdit: its gen_image_script.py's loops, names and images)
  host generate --plugin testing-flow --prompt a --prompt b --seed 7 --steps 20 --cfg 4 --width 64 --height 64 --output gen/";

#[derive(Args)]
struct GenerateArgs {
    /// Model plugin id (default: the config file's model.plugin).
    #[arg(long)]
    plugin: Option<String>,
    /// A config file whose [model] section (plugin, config) is used; a PairEdit YAML
    /// (config/train_image.yaml) generates as its gen_image_script.py does, from its own keys.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// PairEdit's `--c=NAME`: config/NAME.yaml, relative to the current directory.
    #[arg(long = "c", value_name = "NAME", conflicts_with = "config")]
    c: Option<String>,
    /// Base weights (`model.config.pretrained`; DRIP's --pretrained_model, musubi-tuner's --dit):
    /// a folder, a file, or a hub id read offline from the local Hugging Face cache.
    #[arg(long, value_name = "PATH_OR_ID", visible_aliases = ["pretrained_model", "dit"])]
    pretrained: Option<PathBuf>,
    /// Revision of a hub id in --pretrained: a branch, tag or commit hash (default main).
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// Trained state to load (a run's final/, best/ or checkpoints/step-N/).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// A trained run, as DTBack's inference names it (`checkpoints/identity_preserving/best_model.pt`
    /// = that run's best/; also a run folder or a weights folder): its config.toml gives the
    /// model (and the metrics that embed --reference), its weights are loaded.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["config", "c", "weights"])]
    model: Option<PathBuf>,
    /// A LoRA file or folder to apply (`model.config.lora`): a kohya .safetensors, a diffusers
    /// pytorch_lora_weights folder or a PEFT folder (e.g. one of those inside a --save_dir's epochNN/).
    #[arg(long, value_name = "FILE_OR_DIR")]
    lora: Option<PathBuf>,
    /// A prompt (repeatable: one image per prompt; required unless the config is PairEdit's).
    #[arg(long)]
    prompt: Vec<String>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Identity reference image (one for all prompts, or one per prompt).
    #[arg(long, value_name = "IMAGE")]
    reference: Vec<PathBuf>,
    /// Control image, repeatable for a model taking several (an edit model's `control_*`): the
    /// first is the model's `control`, the k-th (from 0) `control_k`. Every prompt gets all of
    /// them (unlike --reference, which may be one per prompt).
    #[arg(long, value_name = "IMAGE")]
    control: Vec<PathBuf>,
    #[arg(long, default_value_t = 512)]
    width: u32,
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// Denoising steps (0 = the model's default).
    #[arg(long, default_value_t = 0)]
    steps: u32,
    /// Guidance scale (0 = the model's default).
    #[arg(long = "cfg", visible_alias = "guidance", default_value_t = 0.0)]
    cfg: f64,
    /// Seed of the first image.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Multiplier of the trained adapter (0 = the base model).
    #[arg(long = "lora-scale", visible_alias = "adapter-scale", default_value_t = 1.0)]
    lora_scale: f64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Any model.config key, e.g. --set model.config.latent_scale=0.5.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output folder (required unless the config is PairEdit's, which names its own).
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
}

const EVAL_FACES_HELP: &str = "\
How pairs are found:
  --sample-dir DIR (musubi-tuner's output/sample folder; image files directly in DIR):
    control images are named control_image_<idx>.png (seed 004). Every other image whose
    name does not contain `control` is a generated sample; its prompt index is musubi-tuner's
    <prompt> field in <name>_<step:06d>_<prompt:02d>_<YYYYMMDDHHMMSS>[_<seed>].png (or
    <name>_e<epoch:06d>_…), else the number after its last `_` (seed 004's *_<idx>.png).
    Indices compare as numbers (_00 = _0). A sample pairs with control_image_<its index>.
  --control-dir C --generated-dir G: each image in G pairs with the image in C whose stem
    equals its stem (any extension, the same one preferred), else with the control whose
    stem is the longest prefix of its stem followed by `_`, `-` or `.`
    (alice.png <- alice_step500.png, alice-2.jpg).
  Generated images that match no control image are listed as warnings and skipped.
Step of a generated image (the by_step key): musubi-tuner's <step:06d> field (\"500\") or
  e<epoch:06d> (\"e3\"), else a `step` token followed by a number (generated_step_1000_0),
  else a token step<N> / step-<N>; otherwise \"unknown\" (as seed 004).
Images: png, jpg, jpeg, webp; decoded, converted to RGB and fitted into N x N (--image-size,
  aspect kept, top-left, black padding; an N x N image is untouched), f32 in [0, 1].
  Each distinct image is embedded once; a pair is valid when the metric finds a face in both;
  its score is the cosine similarity of the two embeddings.
Output: --output-json has exactly seed 004's fields (total_pairs, valid_pairs, overall_mean,
  overall_std, overall_min, overall_max, by_step{step:{count,mean,std,min,max}}; std is the
  population std, numpy's default) with everything else under \"likeness\"; with no valid
  pair the overall_* fields are null and by_step is {}. The per-pair CSV (--csv) and the
  plot (--plot) default to <json stem>.pairs.csv and <json stem>.png next to the JSON.
  The plot's x axis is the step (epoch samples are plotted only when no step is known).
Similarity bands belong to the metric. ArcFace (seed 004): >= 0.8 very high (likely same
  person), 0.6-0.8 high (possibly same person), 0.4-0.6 moderate, < 0.4 low; targets: > 0.85
  training target, > 0.75 good, < 0.65 needs improvement. Another metric: same person at or
  above the threshold it declares, different person below, or no verdict if it declares none.
  The JSON's likeness.bands / likeness.same_person_threshold / likeness.verdict say which.

Examples:
  host eval-faces --sample-dir output/sample --output-json face_metrics.json
  host eval-faces --control-dir faces/ --generated-dir out/ --metric arcface \\
      --model-name buffalo_l --det-size 1024 --device cuda";

#[derive(Args)]
struct EvalFacesArgs {
    /// musubi-tuner sample folder with control_image_<idx> and generated samples (see below).
    #[arg(long, visible_alias = "sample_dir", value_name = "DIR", conflicts_with_all = ["control_dir", "generated_dir"], required_unless_present_all = ["control_dir", "generated_dir"])]
    sample_dir: Option<PathBuf>,
    /// Folder of control (reference) images; use with --generated-dir.
    #[arg(long, visible_alias = "control_dir", value_name = "DIR", requires = "generated_dir")]
    control_dir: Option<PathBuf>,
    /// Folder of generated images, matched to control images by file stem (see below).
    #[arg(long, visible_alias = "generated_dir", value_name = "DIR", requires = "control_dir")]
    generated_dir: Option<PathBuf>,
    /// JSON report (seed 004's format).
    #[arg(long, visible_alias = "output_json", value_name = "FILE", default_value = "face_consistency_results.json")]
    output_json: PathBuf,
    /// Per-pair CSV (control, generated, step, similarity, valid, reason) [default: <json stem>.pairs.csv].
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// PNG plot of similarity by step (mean, min–max band) [default: <json stem>.png].
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Identity-metric plugin id.
    #[arg(long, value_name = "ID", default_value = "arcface")]
    metric: String,
    /// Config passed to the metric plugin (a JSON object).
    #[arg(long, visible_alias = "metric_config", value_name = "JSON")]
    metric_config: Option<String>,
    /// Model pack, e.g. buffalo_l, buffalo_s, antelopev2 (added to the metric config as `model_name`).
    #[arg(long, visible_alias = "model_name", value_name = "NAME")]
    model_name: Option<String>,
    /// Face detection size, e.g. 640 or 1024 (added to the metric config as `det_size`).
    #[arg(long, visible_alias = "det_size", value_name = "N")]
    det_size: Option<u32>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Images per metric call.
    #[arg(long, visible_alias = "batch_size", default_value_t = 16)]
    batch_size: usize,
    /// Images are fitted into N x N before embedding (see below).
    #[arg(long, visible_alias = "image_size", value_name = "N", default_value_t = 640)]
    image_size: u32,
    /// Decoding threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the merged config (file < LIKENESS_* env < flags < --set) and where each value came from.
    Show(ConfigArgs),
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// List discovered plugins (reads manifests only; opens no library).
    List,
    /// Open one plugin, run every check, print its descriptor, its config schema and (for a
    /// model) the interface it declares for a config (--config / --pretrained / --set model.config.KEY=VALUE).
    Inspect(inspect::InspectArgs),
    /// Open every discovered plugin and report every problem found (exit 1 if any).
    Check,
    /// Print the plugin.toml of a built library, from its own descriptor: `host plugins manifest LIB > plugin.toml`.
    Manifest(plugins_cmd::ManifestArgs),
    /// Write a new plugin crate (Cargo.toml, plugin.toml, a working src/lib.rs, README.md) outside this repository.
    New(plugins_cmd::NewArgs),
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Run config: TOML, seed 000's train/config.yaml or PairEdit's config/train_image.yaml
    /// (.yaml/.yml; a PairEdit file trains every dataset x version x noise scale). See configs/.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// PairEdit's `--c=NAME`: the config config/NAME.yaml, relative to the current directory.
    #[arg(long = "c", value_name = "NAME", conflicts_with = "config")]
    c: Option<String>,
    /// Model plugin id (`model.plugin`).
    #[arg(long, value_name = "ID")]
    plugin: Option<String>,
    /// Identity-metric plugin id (`metric.plugin`).
    #[arg(long, value_name = "ID")]
    metric: Option<String>,
    /// Content-loss plugin id (`loss.plugin`).
    #[arg(long, value_name = "ID")]
    loss: Option<String>,
    /// Dataset root (`data.root`).
    #[arg(long, value_name = "DIR", visible_alias = "data_root")]
    data: Option<PathBuf>,
    /// Output directory (`run.output`).
    #[arg(long, short = 'o', value_name = "DIR", visible_alias = "output_dir")]
    output: Option<PathBuf>,
    /// Base name of the trained adapter's files and the samples' prefix (`run.output_name`; musubi-tuner's --output_name).
    #[arg(long = "output-name", value_name = "NAME", visible_alias = "output_name")]
    output_name: Option<String>,
    /// musubi-tuner's dataset.toml (`data.dataset_config`, with `data.layout = "musubi"`; also the data root unless --data or the config sets one).
    #[arg(long = "dataset-config", value_name = "FILE", visible_alias = "dataset_config")]
    dataset_config: Option<PathBuf>,
    /// Base weights: a diffusers folder, a single file, or a hub id (`org/name[/subfolder]`) read
    /// offline from the local Hugging Face cache (`model.config.pretrained`; DRIP's
    /// --pretrained_model, default `runwayml/stable-diffusion-v1-5` on a DRIP dataset; musubi-tuner's --dit).
    #[arg(long, value_name = "PATH_OR_ID", visible_aliases = ["pretrained_model", "dit"])]
    pretrained: Option<PathBuf>,
    /// Revision of a hub id in --pretrained: a branch, tag or commit hash (`model.config.revision`; default main).
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// Optimizer steps (`train.steps`; overrides epochs when > 0).
    #[arg(long, visible_alias = "max_train_steps")]
    steps: Option<u64>,
    /// Epochs (`train.epochs`).
    #[arg(long, visible_alias = "max_train_epochs")]
    epochs: Option<u64>,
    /// Peak learning rate (`train.lr`).
    #[arg(long, visible_alias = "learning_rate")]
    lr: Option<f64>,
    /// Micro-batch size (`train.batch_size`).
    #[arg(long = "batch-size", visible_alias = "batch_size")]
    batch_size: Option<usize>,
    /// Seed for data order, split and initialisation (`run.seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// cpu, cuda or cuda:N (`run.device`).
    #[arg(long)]
    device: Option<String>,
    /// Write samples every N optimizer steps (`sample.every_steps`; musubi-tuner's flag).
    #[arg(long = "sample-every-n-steps", visible_alias = "sample_every_n_steps", value_name = "N")]
    sample_every_n_steps: Option<u64>,
    /// Checkpoint and adapter copy every N optimizer steps (`train.save_every`; musubi-tuner's flag).
    #[arg(long = "save-every-n-steps", visible_alias = "save_every_n_steps", value_name = "N")]
    save_every_n_steps: Option<u64>,
    /// Identity-loss weight (`metric.weight`; DRIP's --l_face; with no --metric/metric.plugin, DRIP's `mtcnn-reid`).
    #[arg(long = "l-face", visible_alias = "l_face", value_name = "W")]
    l_face: Option<f64>,
    /// Text-alignment weight (`text.weight`, with text.plugin = "clip" unless set; DRIP's --l_text).
    #[arg(long = "l-text", visible_alias = "l_text", value_name = "W")]
    l_text: Option<f64>,
    /// Training image size (`data.image_size`; DRIP's --resolution).
    #[arg(long, value_name = "PX")]
    resolution: Option<u32>,
    /// Weight of the model's own (diffusion) loss (`model.loss_weight`; DRIP's λ_recon, 0.1 in
    /// configs/drip-sd15.toml).
    #[arg(long = "l-recon", visible_alias = "l_recon", value_name = "W")]
    l_recon: Option<f64>,
    /// DRIP's --save_dir: the adapter files after each epoch go to DIR/epochNN/ (epoch00 = after
    /// the first epoch) (`adapter.save_dir`); also the run's --output unless one is set.
    #[arg(long = "save-dir", visible_alias = "save_dir", value_name = "DIR")]
    save_dir: Option<PathBuf>,
    /// Any other key, e.g. --set train.warmup_steps=20 --set model.config.image_size=32.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    musubi: musubi_flags::MusubiFlags,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Continue the run in --output from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

impl ConfigArgs {
    /// `--config FILE`, or PairEdit's `--c NAME` = config/NAME.yaml.
    fn config_path(&self) -> likeness_engine::Result<Option<PathBuf>> {
        config_path(self.config.as_ref(), self.c.as_deref())
    }

    fn layered(&self) -> likeness_engine::Result<Layered> {
        let l = Layered::new(self.config_path()?.as_deref(), &self.overrides()?)?;
        let plugin = l.figment.extract_inner::<String>("model.plugin").ok();
        self.musubi.check_network_module(plugin.as_deref()).map_err(musubi_error)?;
        Ok(l)
    }

    fn overrides(&self) -> likeness_engine::Result<Overrides> {
        let musubi = self.musubi.layers(self.epochs.is_some() || self.steps.is_some()).map_err(musubi_error)?;
        for w in &musubi.warnings {
            tracing::warn!("{w}");
        }
        Ok(Overrides {
            plugin: self.plugin.clone(),
            metric: self.metric.clone(),
            loss: self.loss.clone(),
            data: self.data.clone(),
            output: self.output.clone(),
            steps: self.steps,
            epochs: self.epochs,
            lr: self.lr,
            batch_size: self.batch_size,
            seed: self.seed,
            device: self.device.clone(),
            pretrained: self.pretrained.clone(),
            output_name: self.output_name.clone(),
            dataset_config: self.dataset_config.clone(),
            save_dir: self.save_dir.clone(),
            // musubi-tuner's and DRIP's spellings of some keys, below any explicit --set.
            set: [
                self.sample_every_n_steps.map(|n| format!("sample.every_steps={n}")),
                self.save_every_n_steps.map(|n| format!("train.save_every={n}")),
                self.l_face.map(|w| format!("metric.weight={w:?}")),
                self.l_text.map(|w| format!("text.weight={w:?}")),
                self.resolution.map(|r| format!("data.image_size={r}")),
                self.l_recon.map(|w| format!("model.loss_weight={w:?}")),
                self.revision.as_ref().map(|r| format!("model.config.revision={}", toml_string(r))),
            ]
            .into_iter()
            .flatten()
            .chain(musubi.set)
            .chain(self.set.iter().cloned())
            .collect(),
            defaults: musubi.defaults,
        })
    }
}

fn musubi_error(e: musubi_flags::MusubiFlagError) -> likeness_engine::EngineError {
    likeness_engine::EngineError::Config(e.to_string())
}

/// `--config FILE`, or PairEdit's `--c NAME` (config/NAME.yaml, an error naming the path tried).
fn config_path(config: Option<&PathBuf>, c: Option<&str>) -> likeness_engine::Result<Option<PathBuf>> {
    match (config, c) {
        (Some(p), _) => Ok(Some(p.clone())),
        (None, Some(name)) => likeness_engine::pairedit::config_by_name(name).map(Some),
        (None, None) => Ok(None),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> likeness_engine::Result<ExitCode> {
    let registry = || Registry::discover(default_search_path(&cli.plugin_dirs));
    match &cli.command {
        Command::Train(a) => {
            let opts = TrainOptions { resume: a.resume, progress: !a.no_progress && std::io::stderr().is_terminal() };
            if let Some(path) = a.cfg.config_path()?.filter(|p| likeness_engine::pairedit::is_yaml(p)) {
                return train_pairedit(&path, &a.cfg.overrides()?, &registry(), &opts);
            }
            let cfg = a.cfg.layered()?.extract()?;
            let reg = registry();
            let s = train(&cfg, &reg, &opts)?;
            let fmt =
                |v: Option<f64>| v.map(|v| format!("{v:.5}")).unwrap_or_else(|| "n/a (no validation pairs)".into());
            println!(
                "training finished: {} optimizer steps in {:.1} s{}",
                s.steps,
                s.seconds,
                s.resumed_from.map(|r| format!(" (resumed from step {r})")).unwrap_or_default()
            );
            println!(
                "  validation loss: first {}  last {}  best {}",
                fmt(s.first_val_loss),
                fmt(s.last_val_loss),
                fmt(s.best_val_loss)
            );
            if let Some(p) = &s.identity_plot {
                let fmt = |v: Option<f64>| {
                    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a (no face found in a validation pair)".into())
                };
                println!(
                    "  identity similarity: first {}  last {}  (plot: {})",
                    fmt(s.first_identity_similarity),
                    fmt(s.last_identity_similarity),
                    p.display()
                );
            }
            println!("  final weights:   {}", s.final_weights.display());
            if let Some(b) = &s.best_weights {
                println!("  best weights:    {}", b.display());
            }
            println!("  checkpoints:     {}", s.checkpoints.display());
            println!("  sample grids:    {}", s.samples.display());
            for a in &s.adapters {
                println!("  adapter:         {}", a.display());
            }
            if let Some(f) = &s.face_consistency {
                println!("  face consistency: {}", f.display());
            }
            println!("  metrics (JSONL): {}", s.metrics.display());
            println!("  loss plot:       {}", s.plot.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::EvalFaces(a) => {
            use likeness_engine::eval_faces::{eval_faces, summary_text, EvalFacesOptions, EvalInputs};
            let inputs = match (&a.sample_dir, &a.control_dir, &a.generated_dir) {
                (Some(d), _, _) => EvalInputs::SampleDir(d.clone()),
                (None, Some(c), Some(g)) => EvalInputs::Dirs { control: c.clone(), generated: g.clone() },
                _ => {
                    return Err(likeness_engine::EngineError::Config(
                        "give --sample-dir DIR, or --control-dir DIR and --generated-dir DIR".into(),
                    ))
                }
            };
            let opts = EvalFacesOptions {
                inputs,
                output_json: a.output_json.clone(),
                csv: a.csv.clone(),
                plot: a.plot.clone(),
                metric: a.metric.clone(),
                metric_config: a.metric_config.clone(),
                model_name: a.model_name.clone(),
                det_size: a.det_size,
                device: a.device.clone(),
                batch_size: a.batch_size,
                image_size: a.image_size,
                threads: a.threads,
                progress: !a.no_progress && std::io::stderr().is_terminal(),
            };
            let report = eval_faces(&registry(), &opts)?;
            print!("{}", summary_text(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Check(a)) => cmd_data_check(a),
        Command::Generate(a) => cmd_generate(a, &registry()),
        Command::Lora(c) => Ok(lora::run(c)),
        Command::Config(ConfigCommand::Show(a)) => {
            let l = a.layered()?;
            let rows = l.provenance()?;
            let width = rows.iter().map(|(k, v, _)| k.len() + v.len() + 3).max().unwrap_or(0);
            for (k, v, from) in rows {
                let kv = format!("{k} = {v}");
                println!("{kv:width$}  # {from}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins(PluginsCommand::List) => {
            let reg = registry();
            println!("{:<24} {:<7} {:<9} {:<5} {:<24} SUMMARY", "ID", "KIND", "VERSION", "ABI", "FOUND VIA");
            for d in &reg.plugins {
                let m = &d.manifest;
                println!(
                    "{:<24} {:<7} {:<9} {:<5} {:<24} {}",
                    m.id,
                    m.kind.as_str(),
                    m.version,
                    m.abi.to_string(),
                    d.source.as_str(),
                    m.summary
                );
                for s in &d.shadowed {
                    println!("{:<24} (shadowed: {})", "", s.display());
                }
            }
            if reg.plugins.is_empty() {
                println!("(no plugins found)");
            }
            for (p, e) in &reg.problems {
                println!("unreadable manifest {}: {e}", p.display());
            }
            println!("\nsearched:");
            for d in &reg.dirs {
                println!(
                    "  {} ({}{})",
                    d.path.display(),
                    d.source.as_str(),
                    if d.path.is_dir() { "" } else { ", missing" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins(PluginsCommand::Inspect(a)) => {
            inspect::run(&registry(), a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins(PluginsCommand::Manifest(a)) => plugins_cmd::manifest(a),
        Command::Plugins(PluginsCommand::New(a)) => plugins_cmd::new(a),
        Command::Plugins(PluginsCommand::Check) => {
            let reg = registry();
            let mut problems = 0;
            for (p, e) in &reg.problems {
                println!("FAIL  {}: {e}", p.display());
                problems += 1;
            }
            for d in &reg.plugins {
                match reg.check(d) {
                    Ok(_) => println!(
                        "ok    {} ({} plugin, {})",
                        d.manifest.id,
                        d.manifest.kind.as_str(),
                        d.manifest.library.display()
                    ),
                    Err(e) => {
                        println!("FAIL  {}: {e}", d.manifest.id);
                        problems += 1;
                    }
                }
            }
            println!("{} plugin(s) checked, {problems} problem(s)", reg.plugins.len() + reg.problems.len());
            Ok(if problems == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

/// `host train` on a PairEdit YAML: every run of its driver's loops, in order (see
/// likeness_engine::pairedit); the flags apply to each run.
fn train_pairedit(
    path: &std::path::Path,
    o: &Overrides,
    reg: &Registry,
    opts: &TrainOptions,
) -> likeness_engine::Result<ExitCode> {
    let jobs = likeness_engine::pairedit::load(path)?.jobs();
    for (i, job) in jobs.iter().enumerate() {
        tracing::info!(
            run = i + 1,
            of = jobs.len(),
            dataset = %job.dataset,
            version = job.version,
            noise_scale = job.noise_scale,
            image_id = job.image_id,
            output = %job.run_dir.display(),
            "PairEdit training run"
        );
        let cfg = Layered::with_file_layer(job.layer.clone(), o)?.extract()?;
        let s = train(&cfg, reg, opts)?;
        println!(
            "[{}/{}] {}: {} optimizer steps in {:.1} s{}",
            i + 1,
            jobs.len(),
            job.lora_name,
            s.steps,
            s.seconds,
            s.resumed_from.map(|r| format!(" (resumed from step {r})")).unwrap_or_default()
        );
        for a in &s.adapters {
            println!("  adapter: {}", a.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum DataCommand {
    /// What a dataset holds (examples, images per role, captions, controls, buckets) and every
    /// problem by path; exit status 1 when no example is usable.
    #[command(after_help = DATA_CHECK_HELP)]
    Check(DataCheckArgs),
}

const DATA_CHECK_HELP: &str = "\
Layouts (data.layout; guessed when --layout is omitted: a .toml file or a folder with
dataset.toml -> musubi, person_*/ folders -> drip, <attr>/source/ -> pairs, else bundles):
  bundles  <root>/<bundle>/char_*/img_*             seed 000: first image = reference
  drip     <root>/person_*/{ref_face.jpg, orig.jpg, prompt.txt}          seed 002 (DRIP)
  pairs    <datasets_folder>/<attr>/{source,target}/<name>  by file name, seed 003 (PairEdit)
  musubi   musubi-tuner's dataset.toml ([general] + [[datasets]]), read as is
Roles: images target, reference, control, control_1, ...; texts caption (pairs: attribute).
Buckets are musubi-tuner's (BucketSelector); --set enable_bucket=true --set resolution=512
turns them on for bundles, drip and pairs (musubi reads its own from the toml).

Examples:
  host data check ~/faces
  host data check path/to/dataset.toml --json
  host data check datasets --layout pairs --set 'attributes=[\"age\", \"smile\"]'";

#[derive(Args)]
struct DataCheckArgs {
    /// A dataset folder, or a musubi-tuner dataset.toml.
    path: PathBuf,
    /// Dataset layout [default: guessed from PATH].
    #[arg(long, value_parser = ["bundles", "drip", "pairs", "musubi"])]
    layout: Option<String>,
    /// Print the report as JSON (every example, bucket and problem).
    #[arg(long)]
    json: bool,
    /// Any other [data] key, e.g. --set enable_bucket=true --set resolution=[960,544].
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Seed of the train/val/test split (run.seed).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// `host data check`.
fn cmd_data_check(a: &DataCheckArgs) -> likeness_engine::Result<ExitCode> {
    use likeness_engine::data;
    use std::io::Write;
    // A closed pipe (`| head`) ends the output quietly.
    let mut out = std::io::stdout().lock();
    let ds = data::config_with(&a.path, a.layout.as_deref(), &a.set).and_then(|cfg| data::inspect(&cfg, a.seed));
    let ds = match (ds, a.json) {
        (Ok(ds), _) => ds,
        (Err(e), true) => {
            let _ = writeln!(out, "{}", serde_json::json!({"usable": false, "error": e.to_string()}));
            return Ok(ExitCode::FAILURE);
        }
        (Err(e), false) => return Err(e),
    };
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&ds.report_json()).unwrap_or_default());
    } else {
        let _ = writeln!(out, "{}", ds.describe_all());
        if ds.is_empty() {
            let _ = writeln!(out, "no usable example; {}", data::expected_layout(&ds.layout));
        }
    }
    Ok(if ds.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn cmd_generate(a: &GenerateArgs, reg: &Registry) -> likeness_engine::Result<ExitCode> {
    use likeness_engine::generate::{generate, GenerateOptions};
    let config = config_path(a.config.as_ref(), a.c.as_deref())?;
    if let Some(path) = config.as_ref().filter(|p| likeness_engine::pairedit::is_yaml(p)) {
        let y = likeness_engine::pairedit::load(path)?;
        let s = likeness_engine::pairedit::generate(&y, reg)?;
        for f in s.images.iter().chain(&s.collages) {
            println!("{}", f.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(output) = a.output.clone() else {
        return Err(likeness_engine::EngineError::Config("give --output DIR (the folder the images go to)".into()));
    };
    // --lora sits below any explicit --set model.config.lora=….
    let set: Vec<String> = a
        .lora
        .iter()
        .map(|l| format!("model.config.lora={}", toml_string(&l.to_string_lossy())))
        .chain(a.revision.iter().map(|r| format!("model.config.revision={}", toml_string(r))))
        .chain(a.set.iter().cloned())
        .collect();
    // --model: the run's own resolved config and its best (or final) weights.
    let (config, weights) = match &a.model {
        Some(m) => {
            let (run, w) = likeness_engine::generate::resolve_trained_model(m)?;
            (Some(run.join("config.toml")), Some(w))
        }
        None => (config, a.weights.clone()),
    };
    let model =
        likeness_engine::config::model_section(config.as_deref(), a.plugin.as_deref(), a.pretrained.as_deref(), &set)?;
    let files = generate(
        reg,
        &GenerateOptions {
            plugin: model.plugin,
            model_config: model.config,
            conditioning: model.conditioning,
            weights,
            prompts: a.prompt.clone(),
            negative_prompt: a.negative_prompt.clone(),
            references: a.reference.clone(),
            controls: a.control.clone(),
            width: a.width,
            height: a.height,
            steps: a.steps,
            guidance: a.cfg,
            seed: a.seed,
            adapter_scale: a.lora_scale,
            lora: a.lora.clone(),
            device: a.device.clone(),
            output,
        },
    )?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `s` as a TOML basic string (what `--set` values are parsed as), so a path with spaces,
/// quotes or `=` stays one string. A JSON string is one: TOML's basic strings have JSON's
/// escapes (`\"`, `\\`, `\n`, `\uXXXX`…).
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
