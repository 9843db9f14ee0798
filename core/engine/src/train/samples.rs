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
//! `[eval] every = N` evaluates the samples of every N-th step with the run's metric, as `host
//! eval-faces` does: `eval/face_consistency_step<N:06d>.json` (seed 004's JSON for that step)
//! and `eval/face_consistency.json` with its plot (every step so far: the curve across steps).

use std::path::{Path, PathBuf};

use abi_stable::std_types::RSlice;
use likeness_abi::{sample_seed, CpuTensor, ForwardMode, StepContext};
use tracing::info;

use super::step::batch_image;
use super::Trainer;
use crate::data::{self, Example};
use crate::eval_faces::{eval_faces_with, EvalFacesOptions, EvalInputs};
use crate::generate::{sample_one, SampleSettings};
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

    /// A model with `sample`: one image per prompt, seed `sample.seed + prompt index`.
    fn sample_with_model(&mut self, step: u64, examples: &[Example], dir: &Path, ts: &str) -> Result<()> {
        let s = &self.cfg.sample;
        let prompts: Vec<(String, Option<Example>)> = if s.prompts.is_empty() {
            examples.iter().map(|e| (e.text("caption").unwrap_or("").to_string(), Some(e.clone()))).collect()
        } else {
            s.prompts.iter().enumerate().map(|(i, p)| (p.clone(), examples.get(i).cloned())).collect()
        };
        // Identity references / controls the model reads, besides the target it generates.
        let conditioning: Vec<String> =
            self.plan.image_inputs.iter().filter(|r| r.as_str() != "target").cloned().collect();
        for (i, (prompt, example)) in prompts.iter().enumerate() {
            let (mut w, mut h) = (s.width, s.height);
            let mut images: Vec<(String, CpuTensor<f32>)> = Vec::new();
            let mut reference = None;
            if let Some(e) = example {
                let b = data::make_batch(&[e], &mut self.images)?;
                if w == 0 || h == 0 {
                    (w, h) = e.bucket;
                }
                for role in &conditioning {
                    if let Ok(t) = batch_image(&b, role) {
                        images.push((role.clone(), t.clone()));
                    }
                }
                // model.conditioning: the metric's embedding of the example's image.
                for c in self.parts.terms.conditioning.iter_mut() {
                    images.push((c.input.clone(), c.embed_batch(&b)?));
                }
                reference = batch_image(&b, "reference").ok().cloned();
            }
            if w == 0 || h == 0 {
                return Err(EngineError::Config(format!("sample {i} (prompt {prompt:?}) has no example to take its size from: set sample.width and sample.height")));
            }
            let seed = s.seed + i as u64;
            let settings = SampleSettings {
                negative_prompt: &s.negative_prompt,
                width: w,
                height: h,
                steps: s.steps,
                guidance: s.guidance,
                seed,
                adapter_scale: s.adapter_scale,
            };
            let views: Vec<(&str, &CpuTensor<f32>)> = images.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let pixels = sample_one(&mut self.parts.model, prompt, &views, &settings)?;
            let stem = sample_stem(self.cfg.run.output_name.as_deref(), step, i, ts, seed);
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
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2026-12-01 is day 20788 since the epoch.
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(timestamp().len(), 14);
    }
}
