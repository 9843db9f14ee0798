//! Samples during training and their face-consistency evaluation.
//!
//! Samples go to `<output>/sample/` ([`super::RunDirs::musubi_samples`]) under musubi-tuner's names,
//! `[<output_name>_]<step:06d>_<prompt:02d>_<YYYYMMDDHHMMSS>_<seed>.png`, beside
//! `control_image_<prompt>.png` (the prompt's identity reference, seed 004's name), so `host eval-faces
//! --sample-dir <output>/sample` reads them as it reads musubi-tuner's. A model that can
//! `sample` generates them from prompts (`[sample] prompts`, else the sample examples'
//! captions); any other model's `forward(Eval)` output on the sample examples is written, with
//! the reference | target | generated grid in `samples/step-N.png` ([`super::RunDirs::grids`])
//! as before.
//!
//! With `sample.prompt_file` (musubi-tuner's `--sample_prompts`, [`crate::musubi_prompts`]) the
//! samples are the file's entries, each with its own size, steps, seed, guidance and negative
//! prompt over `[sample]`'s, and its `--ci` images as the roles `control`, `control_1`, … (the
//! first also written as `control_image_<idx>.png`, so `host eval-faces` pairs the sample with it).
//!
//! `[eval] every = N` evaluates the samples of every N-th step with the run's metric, as `host
//! eval-faces` does: `eval/face_consistency_step<N:06d>.json` (seed 004's JSON for that step)
//! and `eval/face_consistency.json` with its plot (every step so far: the curve across steps).

use std::path::{Path, PathBuf};

use abi_stable::std_types::RSlice;
use likeness_abi::{sample_seed, CpuTensor, ForwardMode, StepContext};
use tracing::info;

use super::step::batch_image;
use super::Trainer;
use crate::config::SampleConfig;
use crate::data::{self, image_io, Example};
use crate::eval_faces::{eval_faces_with, EvalFacesOptions, EvalInputs};
use crate::generate::{sample_one, SampleSettings};
use crate::musubi_prompts;
use crate::visual::{save_chw_png, save_grid, GridRow};
use crate::{EngineError, Result};

/// musubi-tuner's sample file stem.
pub fn sample_stem(output_name: Option<&str>, step: u64, prompt: usize, timestamp: &str, seed: u64) -> String {
    let prefix = output_name.map(|n| format!("{n}_")).unwrap_or_default();
    format!("{prefix}{step:06}_{prompt:02}_{timestamp}_{seed}")
}

fn timestamp() -> String {
    // UTC, as a 14-digit YYYYMMDDHHMMSS (musubi-tuner uses local time; the format is the same).
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Removes the samples of `step` written by an earlier (killed) attempt at the same step, so a
/// resumed run does not leave two of them.
fn remove_step_samples(dir: &Path, output_name: Option<&str>, step: u64) {
    let prefix = format!("{}{step:06}_", output_name.map(|n| format!("{n}_")).unwrap_or_default());
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".png") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn chw_size(t: &CpuTensor<f32>) -> Result<(u32, u32)> {
    match t.shape.as_slice() {
        [_, 3, h, w] => Ok((*w as u32, *h as u32)),
        s => Err(EngineError::Other(format!("expected images of shape [B, 3, H, W], got {s:?}"))),
    }
}

fn row(t: &CpuTensor<f32>, i: usize) -> &[f32] {
    let per = t.numel() / t.shape[0].max(1) as usize;
    &t.data[i * per..(i + 1) * per]
}

/// One sample to generate: its prompt, settings and conditioning.
#[derive(Debug, Clone, PartialEq)]
struct SampleJob {
    /// The `<prompt:02d>` of its file name.
    index: usize,
    prompt: String,
    negative_prompt: String,
    /// 0 = the example's bucket.
    width: u32,
    height: u32,
    steps: u32,
    guidance: f64,
    seed: u64,
    /// The example whose conditioning images (and size) it uses.
    example: Option<Example>,
    /// Control images of a prompt-file entry (`--ci`), passed as `control`, `control_1`, ….
    controls: Vec<PathBuf>,
}

/// musubi-tuner's Qwen-Image sample size when a prompt-file entry has no `--w` / `--h`.
const MUSUBI_SAMPLE_SIZE: u32 = 256;

/// The samples of a sampling step: the prompt file's entries (`sample.prompt_file`, each with
/// its own options over `[sample]`'s), else `sample.prompts`, else the sample examples' captions.
fn sample_jobs(s: &SampleConfig, examples: &[Example], model_id: &str) -> Result<Vec<SampleJob>> {
    let job = |index: usize, prompt: String, example: Option<Example>| SampleJob {
        index,
        prompt,
        negative_prompt: s.negative_prompt.clone(),
        width: s.width,
        height: s.height,
        steps: s.steps,
        guidance: s.guidance,
        seed: s.seed + index as u64,
        example,
        controls: Vec::new(),
    };
    let Some(path) = &s.prompt_file else {
        return Ok(if s.prompts.is_empty() {
            examples
                .iter()
                .enumerate()
                .map(|(i, e)| job(i, e.text("caption").unwrap_or("").to_string(), Some(e.clone())))
                .collect()
        } else {
            s.prompts.iter().enumerate().map(|(i, p)| job(i, p.clone(), examples.get(i).cloned())).collect()
        });
    };
    let entries = musubi_prompts::load(path).map_err(|e| EngineError::Config(e.to_string()))?;
    // musubi-tuner's Qwen-Image sampler ignores `--g` (guidance=None); other models read it as
    // their embedded guidance when no `--l` is given.
    let reads_g = !model_id.starts_with("qwen");
    let size = |given: Option<u32>, config: u32| {
        let px = given.unwrap_or(if config > 0 { config } else { MUSUBI_SAMPLE_SIZE });
        // The 2x2-packed latents of an 8x VAE: musubi-tuner's output is a multiple of 16.
        (px / 16 * 16).max(16)
    };
    Ok(entries
        .into_iter()
        .map(|e| SampleJob {
            negative_prompt: e.negative_prompt.clone().unwrap_or_else(|| s.negative_prompt.clone()),
            width: size(e.width, s.width),
            height: size(e.height, s.height),
            steps: e.steps.unwrap_or(s.steps),
            guidance: e.cfg_scale.or(e.guidance_scale.filter(|_| reads_g)).unwrap_or(s.guidance),
            seed: e.seed.unwrap_or(s.seed + e.index as u64),
            controls: e.control_images.clone(),
            ..job(e.index, e.prompt.clone(), None)
        })
        .collect())
}

/// Checks a prompt file before training starts (an error names the file) and logs, once, what
/// of it is parsed but not used.
pub(crate) fn check_prompt_file(s: &SampleConfig, model_id: &str) -> Result<()> {
    let Some(path) = &s.prompt_file else { return Ok(()) };
    let entries = musubi_prompts::load(path).map_err(|e| EngineError::Config(e.to_string()))?;
    for e in &entries {
        for n in &e.notes {
            tracing::warn!("--sample_prompts {} prompt {}: {n}", path.display(), e.index);
        }
        if let Some(fs) = e.discrete_flow_shift {
            tracing::warn!(
                "--sample_prompts {} prompt {}: --fs {fs} is not passed to `{model_id}` (a sample request has no shift): its own sampling shift applies",
                path.display(),
                e.index
            );
        }
        if e.guidance_scale.is_some() && e.cfg_scale.is_none() && model_id.starts_with("qwen") {
            tracing::warn!(
                "--sample_prompts {} prompt {}: --g (embedded guidance) is unused by Qwen-Image, as in musubi-tuner; --l sets its CFG scale",
                path.display(),
                e.index
            );
        }
        for c in &e.control_images {
            if !c.is_file() {
                return Err(EngineError::Config(format!(
                    "--sample_prompts {} prompt {}: control image --ci {} does not exist",
                    path.display(),
                    e.index,
                    c.display()
                )));
            }
        }
    }
    if entries.is_empty() {
        tracing::warn!("--sample_prompts {}: no prompt in the file, so no samples are written", path.display());
    }
    Ok(())
}

/// A `--ci` image as musubi-tuner's `preprocess_control_image(resize_to_prefered=True)` makes its
/// VAE input: RGB, resized to cover the ~1024² aspect bucket (step 16) and centre-cropped, `[1, 3, H, W]`.
fn load_control(path: &Path) -> Result<CpuTensor<f32>> {
    let img = image_io::decode_rgb(path).map_err(|e| e.into_error(path))?;
    let (bw, bh) = data::bucket::calculate_bucket_resolution(img.dimensions(), (1024, 1024), 16);
    Ok(CpuTensor::new(vec![1, 3, bh as i64, bw as i64], image_io::resize_to_bucket(&img, (bw, bh))))
}

impl Trainer<'_> {
    /// Writes the samples of `step` (0 = before training) and, on `[eval]` steps, evaluates
    /// them.
    pub(crate) fn write_samples(&mut self, step: u64) -> Result<()> {
        let examples = self.sample_examples.clone();
        if examples.is_empty() {
            return Ok(());
        }
        let dir = self.dirs.musubi_samples.clone();
        std::fs::create_dir_all(&dir).map_err(super::io(&dir))?;
        let name = self.cfg.run.output_name.clone();
        remove_step_samples(&dir, name.as_deref(), step);
        let ts = timestamp();
        if self.plan.can_sample {
            self.sample_with_model(step, &examples, &dir, &ts)?;
        } else {
            self.sample_with_forward(step, &examples, &dir, &ts)?;
        }
        if self.cfg.eval.every > 0 && step.is_multiple_of(self.cfg.eval.every) {
            self.evaluate_samples(step)?;
        }
        Ok(())
    }

    /// `control_image_<idx>.png` (seed 004's name): the identity reference of sample `idx`, written once.
    fn write_control(&self, dir: &Path, idx: usize, reference: &[f32], w: u32, h: u32) -> Result<()> {
        let p = dir.join(format!("control_image_{idx}.png"));
        if p.exists() {
            return Ok(());
        }
        save_chw_png(&p, reference, w, h)
    }

    /// A model without `sample`: its `forward(Eval)` output on the sample examples.
    fn sample_with_forward(&mut self, step: u64, examples: &[Example], dir: &Path, ts: &str) -> Result<()> {
        let model_id = self.parts.model.id.clone();
        // (reference, target, generated, (width, height)) per sample, for the grid.
        type GridCell = (Vec<f32>, Vec<f32>, Vec<f32>, (u32, u32));
        let mut grid: Vec<GridCell> = Vec::new();
        for idx in data::epoch_batches(examples, self.cfg.train.batch_size, self.cfg.run.seed, 0) {
            let batch_examples: Vec<Example> = idx.iter().map(|&i| examples[i].clone()).collect();
            let inputs = self.model_inputs(&batch_examples)?;
            // The named seed of sample i is `sample.seed + i`; the model's noise derives from it.
            let seeds: Vec<u64> =
                idx.iter().map(|&i| sample_seed(self.cfg.sample.seed + i as u64, 0, u64::MAX - 1, 0)).collect();
            let ctx = StepContext {
                optimizer_step: step,
                micro_batch: 0,
                epoch: 0,
                sample_seeds: RSlice::from_slice(&seeds),
            };
            let out = self.parts.model.forward_batch(
                &inputs.image_views(),
                &inputs.text_batches(),
                ctx,
                ForwardMode::Eval,
            )?;
            let output = self.cfg.metric.as_ref().map(|m| m.output.clone()).unwrap_or_else(|| "pixels".into());
            let gen = out.outputs.cpu(&model_id, &output)?;
            let (w, h) = chw_size(&gen)?;
            let reference = batch_image(&inputs.batch, "reference").ok();
            let target = batch_image(&inputs.batch, "target").ok();
            for (k, &i) in idx.iter().enumerate() {
                let seed = self.cfg.sample.seed + i as u64;
                let stem = sample_stem(self.cfg.run.output_name.as_deref(), step, i, ts, seed);
                save_chw_png(&dir.join(format!("{stem}.png")), row(&gen, k), w, h)?;
                if let Some(r) = reference.filter(|r| chw_size(r).ok() == Some((w, h))) {
                    self.write_control(dir, i, row(r, k), w, h)?;
                }
                if let (Some(r), Some(t)) = (reference, target) {
                    grid.push((row(r, k).to_vec(), row(t, k).to_vec(), row(&gen, k).to_vec(), (w, h)));
                }
            }
        }
        // The reference | target | generated grid, when every sample is one square size.
        if let Some(&(_, _, _, (w, h))) = grid.first() {
            if w == h && grid.iter().all(|g| g.3 == (w, h)) {
                let rows: Vec<GridRow> =
                    grid.iter().map(|(r, t, g, _)| GridRow { reference: r, target: t, generated: g }).collect();
                save_grid(&self.dirs.grids.join(format!("step-{step:08}.png")), w, &rows)?;
            }
        }
        Ok(())
    }

    /// A model with `sample`: one image per prompt, seed `sample.seed + prompt index` unless
    /// the prompt file gives one.
    fn sample_with_model(&mut self, step: u64, examples: &[Example], dir: &Path, ts: &str) -> Result<()> {
        let jobs = sample_jobs(&self.cfg.sample, examples, &self.parts.model.id)?;
        // Identity references / controls the model reads, besides the target it generates: the
        // declared names, so a pattern (`control_*`) takes every `--ci`.
        let conditioning: Vec<String> =
            self.plan.image_inputs.iter().map(|i| i.name.clone()).filter(|n| n != "target").collect();
        for job in jobs {
            let (i, prompt) = (job.index, &job.prompt);
            let (mut w, mut h) = (job.width, job.height);
            let mut images: Vec<(String, CpuTensor<f32>)> = Vec::new();
            let mut reference = None;
            if let Some(e) = &job.example {
                let b = data::make_batch(&[e], &mut self.images)?;
                if w == 0 || h == 0 {
                    (w, h) = e.bucket;
                }
                // Every role of those inputs the example has (all of a pattern's).
                for role in self.plan.present_image_roles(&b).into_iter().filter(|r| r != "target") {
                    images.push((role.clone(), batch_image(&b, &role)?.clone()));
                }
                // model.conditioning: the metric's embedding of the example's image.
                for c in self.parts.terms.conditioning.iter_mut() {
                    images.push((c.input.clone(), c.embed_batch(&b)?));
                }
                reference = batch_image(&b, "reference").ok().cloned();
            }
            // The prompt file's `--ci` images; the first is what the sample is compared with
            // (`control_image_<idx>.png`) when no example gives a reference.
            for (k, path) in job.controls.iter().enumerate() {
                let t = load_control(path)?;
                if reference.is_none() && k == 0 {
                    reference = Some(t.clone());
                }
                let role = data::roles::control(k);
                if conditioning.iter().any(|n| !data::roles::matching(n, [role.as_str()]).is_empty()) {
                    images.push((role, t));
                } else {
                    tracing::warn!(
                        "sample {i}: model `{}` reads no image `{role}`, so --ci {} is not passed to it",
                        self.parts.model.id,
                        path.display()
                    );
                }
            }
            if w == 0 || h == 0 {
                return Err(EngineError::Config(format!("sample {i} (prompt {prompt:?}) has no example to take its size from: set sample.width and sample.height")));
            }
            let settings = SampleSettings {
                negative_prompt: &job.negative_prompt,
                width: w,
                height: h,
                steps: job.steps,
                guidance: job.guidance,
                seed: job.seed,
                adapter_scale: self.cfg.sample.adapter_scale,
            };
            let views: Vec<(&str, &CpuTensor<f32>)> = images.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let pixels = sample_one(&mut self.parts.model, prompt, &views, &settings)?;
            let stem = sample_stem(self.cfg.run.output_name.as_deref(), step, i, ts, job.seed);
            save_chw_png(&dir.join(format!("{stem}.png")), &pixels.data, w, h)?;
            if let Some(r) = reference {
                let (rw, rh) = chw_size(&r)?;
                self.write_control(dir, i, &r.data, rw, rh)?;
            }
        }
        Ok(())
    }

    /// Seed 004's face-consistency report of the samples of `step`, and of all steps so far.
    fn evaluate_samples(&mut self, step: u64) -> Result<()> {
        let Some(metric) = self.parts.terms.metric_mut() else { return Ok(()) };
        let m = self.cfg.metric.as_ref().expect("a metric section when a metric is open");
        let config = serde_json::Value::Object(m.config.clone());
        let metric_id = metric.id.clone();
        std::fs::create_dir_all(&self.dirs.eval).map_err(super::io(&self.dirs.eval))?;
        let opts = |json: PathBuf| EvalFacesOptions {
            inputs: EvalInputs::SampleDir(self.dirs.musubi_samples.clone()),
            output_json: json,
            csv: None,
            plot: None,
            metric: metric_id.clone(),
            metric_config: None,
            model_name: None,
            det_size: None,
            device: self.cfg.run.device.clone(),
            batch_size: self.cfg.train.batch_size.max(1),
            image_size: 640,
            threads: 0,
            progress: false,
        };
        let one = opts(self.dirs.eval.join(format!("face_consistency_step{step:06}.json")));
        let r = eval_faces_with(metric, config.clone(), &one, Some(&step.to_string()))?;
        info!(
            step,
            valid_pairs = r.valid_pairs,
            total_pairs = r.total_pairs,
            mean = r.overall.as_ref().map(|s| s.mean),
            "face consistency of the samples"
        );
        let all = opts(self.dirs.eval.join("face_consistency.json"));
        let r_all = eval_faces_with(metric, config, &all, None)?;
        self.last_eval = Some(r_all.json.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval_faces::{parse_step, prompt_index, StepKey};

    #[test]
    fn sample_names_are_musubi_tuners_and_eval_faces_reads_them() {
        let stem = sample_stem(Some("face_lora"), 500, 3, "20261201193000", 42);
        assert_eq!(stem, "face_lora_000500_03_20261201193000_42");
        assert_eq!(parse_step(&stem), StepKey::Step(500));
        assert_eq!(prompt_index(&stem), Some(3));
        let bare = sample_stem(None, 0, 0, "20261201193000", 7);
        assert_eq!(bare, "000000_00_20261201193000_7");
        assert_eq!(parse_step(&bare), StepKey::Step(0));
    }

    #[test]
    fn prompt_file_entries_become_samples_with_their_own_settings() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("sample_prompts.txt");
        std::fs::write(
            &file,
            "# seed 004's samples\nsks person smiling --w 1000 --h 520 --s 12 --l 2.5 --ci a.png --ci b.png\nsecond --d 7 --g 3.5 --n ugly\n",
        )
        .unwrap();
        let s =
            SampleConfig { prompt_file: Some(file), seed: 100, steps: 20, guidance: 4.0, ..SampleConfig::default() };
        let jobs = sample_jobs(&s, &[], "qwen-edit-lora").unwrap();
        assert_eq!(jobs.len(), 2);
        let a = &jobs[0];
        assert_eq!((a.index, a.prompt.as_str()), (0, "sks person smiling"));
        // Floored to 16; --l is the CFG scale; seed = sample.seed + index when --d is absent.
        assert_eq!((a.width, a.height, a.steps, a.guidance, a.seed), (992, 512, 12, 2.5, 100));
        assert_eq!(a.controls, [PathBuf::from("a.png"), PathBuf::from("b.png")]);
        assert!(a.example.is_none());
        let b = &jobs[1];
        // musubi-tuner's 256² default; Qwen-Image ignores --g (guidance stays [sample]'s).
        assert_eq!((b.width, b.height, b.steps, b.guidance, b.seed), (256, 256, 20, 4.0, 7));
        assert_eq!(b.negative_prompt, "ugly");
        // A model that reads embedded guidance takes --g when --l is absent.
        assert_eq!(sample_jobs(&s, &[], "flux-lora").unwrap()[1].guidance, 3.5);
        // Without a file: [sample] prompts, seed + index, as before.
        let plain = SampleConfig { prompts: vec!["p".into()], ..SampleConfig::default() };
        let j = sample_jobs(&plain, &[], "x").unwrap();
        assert_eq!((j[0].prompt.as_str(), j[0].seed, j[0].width), ("p", 42, 0));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2026-12-01 is day 20788 since the epoch.
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(timestamp().len(), 14);
    }
}
