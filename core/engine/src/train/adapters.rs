//! Adapter files: the trained adapter in every configured format under musubi-tuner's names
//! (`<name>.safetensors` = kohya, `<name>-diffusers/`, `<name>-peft/`,
//! `<name>-comfyui.safetensors`), per-save copies (`<name>-step<N>…`), and DRIP's per-epoch
//! `<save_dir>/epochNN/`. Every file or folder is assembled under a temporary name and renamed
//! into place, so a crash never leaves half an adapter.

use std::path::{Path, PathBuf};

use serde_json::json;
use tracing::info;

use super::{io, Trainer};
use crate::plugins::Model;
use crate::{EngineError, Result};

impl Trainer<'_> {
    /// Writes the trained adapter in every configured format under musubi-tuner's names:
    /// `<name>.safetensors` (kohya), `<name>-diffusers/`, `<name>-peft/`, `<name>-comfyui.safetensors`;
    /// `step` adds `-step<NNNNNNNN>` as musubi-tuner (sd-scripts' `get_step_ckpt_name`) names
    /// its per-save copies.
    pub(crate) fn export_adapters(&mut self, step: Option<u64>) -> Result<Vec<PathBuf>> {
        let name = self.cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into());
        let base = match step {
            Some(s) => format!("{name}-step{s:08}"),
            None => name,
        };
        self.export_adapters_as(&base)
    }

    /// musubi-tuner's `--save_every_n_epochs` files after 1-based epoch `epoch`:
    /// `<name>-<epoch:06>.safetensors` (`train_utils.get_epoch_ckpt_name`) and the other formats
    /// under the same base.
    pub(crate) fn export_epoch_adapters(&mut self, epoch: u64) -> Result<Vec<PathBuf>> {
        let name = self.cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into());
        let written = self.export_adapters_as(&epoch_adapter_base(&name, epoch))?;
        // Not DRIP's `epoch_adapter` record (a 0-based epoch and one folder): a 1-based epoch and its files.
        self.log.log(&json!({"type": "epoch_adapters", "step": self.state.step, "epoch": epoch, "paths": written}))?;
        Ok(written)
    }

    fn export_adapters_as(&mut self, base: &str) -> Result<Vec<PathBuf>> {
        let base = base.to_string();
        let meta =
            self.plan.adapter_metadata(self.cfg, &self.ds, self.state.step, self.state.epoch, self.started_at_ms);
        let mut written = Vec::new();
        for format in self.plan.adapter_formats.clone() {
            written.push(export_adapter(&mut self.parts.model, &self.dirs.out, &base, &format, &meta)?);
        }
        Ok(written)
    }

    /// DRIP's per-epoch output: every configured adapter format of the weights after epoch
    /// `epoch` (0-based) in `save_dir/epochNN/`, under the same names as the run's final files.
    /// The folder is assembled under a temporary name and renamed into place, so a crash never
    /// leaves a half-written `epochNN/` (a folder left from an earlier, interrupted run is
    /// replaced).
    pub(crate) fn export_epoch(&mut self, save_dir: &Path, epoch: u64) -> Result<PathBuf> {
        let name = self.cfg.run.output_name.clone().unwrap_or_else(|| "likeness".into());
        let dest = save_dir.join(epoch_dir_name(epoch));
        let tmp = save_dir.join(format!(".{}.tmp", epoch_dir_name(epoch)));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let meta = self.plan.adapter_metadata(self.cfg, &self.ds, self.state.step, epoch + 1, self.started_at_ms);
        for format in self.plan.adapter_formats.clone() {
            export_adapter(&mut self.parts.model, &tmp, &name, &format, &meta)?;
        }
        replace_dir(&tmp, &dest, &save_dir.join(format!(".{}.old", epoch_dir_name(epoch))))?;
        info!(epoch, path = %dest.display(), "epoch adapter written");
        self.log.log(&json!({"type": "epoch_adapter", "step": self.state.step, "epoch": epoch, "path": dest}))?;
        Ok(dest)
    }
}

impl Trainer<'_> {
    /// PairEdit's files (`[adapter.pairedit]`): the model's `pairedit` export (a folder with
    /// `semantic.safetensors` and, for variants with a content LoRA, `content.safetensors`)
    /// moved to `<stem>_<epoch>epoch.safetensors` / `<stem>_<epoch>epoch_0.safetensors` in the
    /// run folder. Each file is complete before its rename, so a crash never leaves half a file.
    pub(crate) fn export_pairedit(&mut self, names: &crate::config::PairEditNames, epoch: u64) -> Result<Vec<PathBuf>> {
        let out = self.dirs.out.clone();
        let tmp = out.join(format!(".pairedit-{epoch}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let meta =
            self.plan.adapter_metadata(self.cfg, &self.ds, self.state.step, self.state.epoch, self.started_at_ms);
        self.parts.model.export_adapter(&tmp, "pairedit", &meta)?;
        let mut written = Vec::new();
        // (file the model wrote, PairEdit's name, required). train_image_real's only LoRA is the
        // content one, under the name without `_0`.
        let files = match names.content_only {
            false => vec![
                ("semantic.safetensors", crate::pairedit::semantic_file_name(&names.stem, epoch), true),
                ("content.safetensors", crate::pairedit::content_file_name(&names.stem, epoch), false),
            ],
            true => vec![("content.safetensors", crate::pairedit::semantic_file_name(&names.stem, epoch), true)],
        };
        for (file, dest, required) in files {
            let src = tmp.join(file);
            if !src.is_file() {
                if required {
                    return Err(EngineError::Plugin {
                        plugin: self.parts.model.id.clone(),
                        message: format!("export_adapter(`pairedit`) wrote no {file} in {}", tmp.display()),
                    });
                }
                continue;
            }
            let dest = out.join(dest);
            std::fs::rename(&src, &dest).map_err(io(&dest))?;
            info!(path = %dest.display(), "PairEdit adapter written");
            written.push(dest);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(written)
    }
}

/// Moves the finished folder `tmp` to `dest`. An existing `dest` is first renamed to `old`
/// (two renames, never a half-written `dest`; a kill between them leaves `old` whole) and
/// removed once the new folder is in place.
fn replace_dir(tmp: &Path, dest: &Path, old: &Path) -> Result<()> {
    if dest.exists() {
        let _ = std::fs::remove_dir_all(old);
        std::fs::rename(dest, old).map_err(io(dest))?;
        std::fs::rename(tmp, dest).map_err(io(dest))?;
        let _ = std::fs::remove_dir_all(old);
    } else {
        std::fs::rename(tmp, dest).map_err(io(dest))?;
    }
    Ok(())
}

/// musubi-tuner's per-epoch base name, `<name>-<epoch:06d>` (1-based epoch).
pub fn epoch_adapter_base(name: &str, epoch: u64) -> String {
    format!("{name}-{epoch:06}")
}

/// Whether musubi-tuner's `--save_every_n_epochs n` writes a numbered file after 1-based epoch
/// `epoch` of `epochs`: `epoch % n == 0 and epoch < num_train_epochs` (trainer_base.py:2142-2154),
/// so the last epoch has only the final file.
pub fn saves_epoch(every: u64, epoch: u64, epochs: u64) -> bool {
    every > 0 && epoch.is_multiple_of(every) && epoch < epochs
}

/// DRIP's folder name of the weights after 0-based epoch `epoch`: `epoch00`, `epoch01`, …
/// (the seed's `lora_out/epoch00/ # epoch 0 LoRA weights`); three digits from epoch 100 on.
pub fn epoch_dir_name(epoch: u64) -> String {
    format!("epoch{epoch:02}")
}

/// Writes the adapter in `format` into `out` under its musubi-tuner name (`<base>.safetensors`
/// for kohya, `<base>-comfyui.safetensors`, `<base>-diffusers/`, `<base>-peft/`), atomically:
/// the plugin writes into a temporary folder, which is renamed (folders) or whose single
/// `.safetensors` file is renamed (files) into place.
fn export_adapter(
    model: &mut Model,
    out: &Path,
    base: &str,
    format: &str,
    metadata: &serde_json::Value,
) -> Result<PathBuf> {
    let tmp = out.join(format!(".{base}-{format}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let files = model.export_adapter(&tmp, format, metadata)?;
    let dest = match format {
        "kohya" | "comfyui" => {
            let st: Vec<&PathBuf> =
                files.iter().filter(|f| f.extension().is_some_and(|e| e == "safetensors")).collect();
            let [file] = st.as_slice() else {
                return Err(EngineError::Plugin {
                    plugin: model.id.clone(),
                    message: format!(
                        "export_adapter(`{format}`) must write exactly one .safetensors file, it wrote {files:?}"
                    ),
                });
            };
            let dest = out.join(if format == "kohya" {
                format!("{base}.safetensors")
            } else {
                format!("{base}-comfyui.safetensors")
            });
            std::fs::rename(file, &dest).map_err(io(&dest))?;
            let _ = std::fs::remove_dir_all(&tmp);
            dest
        }
        _ => {
            let dest = out.join(format!("{base}-{format}"));
            replace_dir(&tmp, &dest, &out.join(format!(".{base}-{format}.old")))?;
            dest
        }
    };
    info!(format, path = %dest.display(), "adapter written");
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_files_follow_musubi_tuners_rule() {
        // --max_train_epochs 16 --save_every_n_epochs 1: face_lora-000001 … face_lora-000015,
        // and epoch 16 only as the final face_lora.safetensors.
        let saved: Vec<u64> = (1..=16).filter(|&e| saves_epoch(1, e, 16)).collect();
        assert_eq!(saved, (1..=15).collect::<Vec<_>>());
        assert_eq!(epoch_adapter_base("face_lora", 1), "face_lora-000001");
        // Every 4th of 10: 4 and 8; every 5th of 10: 5 only (10 is the last); 0 = never.
        assert_eq!((1..=10).filter(|&e| saves_epoch(4, e, 10)).collect::<Vec<_>>(), [4, 8]);
        assert_eq!((1..=10).filter(|&e| saves_epoch(5, e, 10)).collect::<Vec<_>>(), [5]);
        assert!(!(1..=10).any(|e| saves_epoch(0, e, 10)));
    }

    #[test]
    fn epoch_folders_are_drips() {
        assert_eq!(epoch_dir_name(0), "epoch00");
        assert_eq!(epoch_dir_name(7), "epoch07");
        assert_eq!(epoch_dir_name(12), "epoch12");
        assert_eq!(epoch_dir_name(100), "epoch100");
    }
}
