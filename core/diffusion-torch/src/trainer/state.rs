//! Clipping and AdamW over the parameter groups, and the saved state (LoRA weights + AdamW
//! moments, with the structural config check on load).

use std::collections::BTreeMap;
use std::path::Path;

use likeness_sdk::{err, GroupHyper, OptimizerStep, StepReport};
use likeness_sdk_torch::{load_into, save_tensors};
use tch::Tensor;

use super::error::{config as bad, file, input, Result};
use super::{LoraModel, ModelConfig, MODEL_FILE, OPTIMIZER_FILE};
use crate::backbone::Backbone;

impl<B: Backbone> LoraModel<B> {
    /// clip_grad_norm_ over every LoRA weight of every group, then each group's AdamW with its
    /// own lr / weight decay and clipping off (the gradients are already clipped).
    pub(super) fn step_groups(
        &mut self,
        s: OptimizerStep,
        groups: &[GroupHyper<'_>],
    ) -> likeness_sdk::Result<StepReport> {
        if s.step == 0 {
            return Err(err::input("optimizer step numbers start at 1"));
        }
        let names: Vec<&str> = self.groups.iter().map(|(c, _)| c.as_str()).collect();
        for g in groups {
            if !names.contains(&g.name.as_str()) {
                return Err(err::input(format!(
                    "model `{}` has no parameter group `{}`; groups: {}{}",
                    B::ID,
                    g.name,
                    names.join(", "),
                    if names.len() < B::COMPONENTS.len() {
                        " (text encoders need train_text_encoder = true)"
                    } else {
                        ""
                    }
                )));
            }
        }
        let _g = tch::no_grad_guard();
        let mut total = 0f64;
        for (_, o) in &self.groups {
            let n = o.grad_norm();
            total += n * n;
        }
        let norm = total.sqrt();
        if !norm.is_finite() {
            return Err(err::internal(format!("gradient norm is {norm}: the loss diverged (lower the learning rate)")));
        }
        let clip = if s.max_grad_norm > 0.0 { (s.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
        for (c, o) in self.groups.iter_mut() {
            if clip < 1.0 {
                for (_, p) in o.params() {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(clip);
                    }
                }
            }
            let (lr, wd) = groups
                .iter()
                .rev()
                .find(|g| g.name.as_str() == c.as_str())
                .map(|g| (g.lr, g.weight_decay))
                .unwrap_or((s.lr, s.weight_decay));
            o.step(&OptimizerStep { lr, weight_decay: wd, max_grad_norm: 0.0, ..s })?;
        }
        Ok(StepReport { grad_norm: norm })
    }

    /// Every AdamW moment by its saved name, sharing storage.
    fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        self.groups.iter().flat_map(|(_, o)| o.state()).collect()
    }

    pub(super) fn save(&self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let config = self.config.to_json()?;
        let meta = |extra: Option<(&str, &str)>| {
            let mut m = BTreeMap::from([
                ("likeness.plugin".to_string(), B::ID.to_string()),
                ("likeness.config".to_string(), config.clone()),
            ]);
            if let Some((k, v)) = extra {
                m.insert(k.into(), v.into());
            }
            m
        };
        save_tensors(&dir.join(MODEL_FILE), &self.lora_parameters(), &meta(None))?;
        if with_optimizer {
            let state = self.optimizer_state();
            save_tensors(&dir.join(OPTIMIZER_FILE), &state, &meta(Some(("likeness.optimizer", "adamw"))))?;
        }
        Ok(())
    }

    /// Loads weights (and moments, when saved) after checking the saved plugin id and that the
    /// saved config agrees on the adapter's shape.
    pub(super) fn load(&mut self, dir: &Path) -> Result<()> {
        let model = dir.join(MODEL_FILE);
        let meta = likeness_sdk::st::read_header(&model)?.metadata;
        if let Some(id) = meta.get("likeness.plugin") {
            if id != B::ID {
                return Err(input(format!("{} was saved by plugin `{id}`, not `{}`", model.display(), B::ID)));
            }
        }
        if let Some(json) = meta.get("likeness.config") {
            let saved = ModelConfig::<B::Config>::read(json)
                .map_err(|e| file(model.display(), format!("metadata `likeness.config` is not a valid config: {e}")))?;
            let (was, is) = (saved.train.structural(), self.config.train.structural());
            if was != is {
                return Err(bad(
                    "(saved state)",
                    format!(
                        "{} was saved with LoRA settings {was}, this instance has {is}; create the model with the saved config",
                        model.display()
                    ),
                ));
            }
        }
        load_into(&model, &self.lora_parameters())?;
        let opt = dir.join(OPTIMIZER_FILE);
        let state = self.optimizer_state();
        if opt.exists() {
            load_into(&opt, &state)?;
        } else {
            // Weights only: the moments start afresh.
            let _g = tch::no_grad_guard();
            for (_, mut t) in state {
                let _ = t.zero_();
            }
        }
        Ok(())
    }
}
