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
    fn epoch_folders_are_drips() {
        assert_eq!(epoch_dir_name(0), "epoch00");
        assert_eq!(epoch_dir_name(7), "epoch07");
        assert_eq!(epoch_dir_name(12), "epoch12");
        assert_eq!(epoch_dir_name(100), "epoch100");
    }
}
