//! PEFT's `LoraConfig` as far as it decides a module's rank and alpha: `r`, `lora_alpha`,
//! `rank_pattern`, `alpha_pattern`, `use_rslora`, `use_dora`, `target_modules` — read from an
//! `adapter_config.json` or from diffusers' `lora_adapter_metadata` (the same fields, packed as
//! `unet.r`, `text_encoder.lora_alpha`, …), and written for our PEFT folders.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::write::peft_name;
use super::{Component, LoraModule};
use crate::{DiffusionError, Result};

#[derive(Debug, Clone)]
pub(crate) struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub use_rslora: bool,
    /// `None`: a regex string (peft `re.fullmatch`), which we do not evaluate.
    pub targets: Option<Vec<String>>,
}

fn file_err(file: &Path, why: impl Into<String>) -> DiffusionError {
    DiffusionError::LoraFile { file: file.to_path_buf(), why: why.into() }
}

/// peft's `get_pattern_key`: `re.match(rf"(.*\.)?({pattern})$", module)`. We evaluate patterns
/// whose only regex character is `.` (any character), which is what peft and diffusers write
/// (module paths); anything else is refused rather than guessed.
fn pattern_matches(pat: &str, path: &str, file: &Path, field: &str) -> Result<bool> {
    if pat.chars().any(|c| "*+?[](){}|^$\\".contains(c)) {
        return Err(file_err(
            file,
            format!(
                "`{field}` key `{pat}` is a regular expression; only module paths are supported — list the modules"
            ),
        ));
    }
    let (p, m) = (pat.as_bytes(), path.as_bytes());
    if p.len() > m.len() {
        return Ok(false);
    }
    let s = m.len() - p.len();
    let boundary = s == 0 || m[s - 1] == b'.';
    Ok(boundary && p.iter().zip(&m[s..]).all(|(a, b)| *a == b'.' || a == b))
}

fn lookup<T: Copy + PartialEq + std::fmt::Debug>(
    pats: &BTreeMap<String, T>,
    path: &str,
    file: &Path,
    field: &str,
) -> Result<Option<T>> {
    let mut found: Option<(&str, T)> = None;
    for (k, v) in pats {
        if pattern_matches(k, path, file, field)? {
            if let Some((k0, v0)) = found {
                if v0 != *v {
                    return Err(file_err(
                        file,
                        format!("`{field}` keys `{k0}` and `{k}` both match `{path}` with different values; keep one"),
                    ));
                }
            }
            found = Some((k, *v));
        }
    }
    Ok(found.map(|(_, v)| v))
}

fn num(v: &Value, file: &Path, field: &str) -> Result<f64> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| file_err(file, format!("`{field}` must be a number, got {v}")))
}

impl PeftConfig {
    pub(crate) fn from_value(v: &Map<String, Value>, file: &Path) -> Result<PeftConfig> {
        if let Some(t) = v.get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(file_err(file, format!("`peft_type` is {t}; only LORA adapters are supported")));
            }
        }
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(file_err(file, "`use_dora` is true; DoRA adapters are not supported (export a plain LoRA)"));
        }
        // peft's LoraConfig defaults: r = 8, lora_alpha = 8.
        let r = match v.get("r") {
            Some(x) => x
                .as_u64()
                .filter(|r| *r > 0)
                .ok_or_else(|| file_err(file, format!("`r` must be a positive integer, got {x}")))?
                as usize,
            None => 8,
        };
        let lora_alpha = match v.get("lora_alpha") {
            Some(x) => num(x, file, "lora_alpha")?,
            None => 8.0,
        };
        let mut rank_pattern = BTreeMap::new();
        if let Some(Value::Object(m)) = v.get("rank_pattern") {
            for (k, x) in m {
                let r = x
                    .as_u64()
                    .filter(|r| *r > 0)
                    .ok_or_else(|| file_err(file, format!("`rank_pattern.{k}` must be a positive integer, got {x}")))?;
                rank_pattern.insert(k.clone(), r as usize);
            }
        }
        let mut alpha_pattern = BTreeMap::new();
        if let Some(Value::Object(m)) = v.get("alpha_pattern") {
            for (k, x) in m {
                alpha_pattern.insert(k.clone(), num(x, file, &format!("alpha_pattern.{k}"))?);
            }
        }
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|t| {
                        t.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| file_err(file, "`target_modules` must hold strings"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        Ok(PeftConfig {
            r,
            lora_alpha,
            rank_pattern,
            alpha_pattern,
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            targets,
        })
    }

    pub(crate) fn from_file(file: &Path) -> Result<PeftConfig> {
        let text = std::fs::read_to_string(file).map_err(|e| super::tensor::io_err(file, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| file_err(file, format!("not valid JSON ({e})")))?;
        let Value::Object(m) = v else {
            return Err(file_err(file, "adapter_config.json must be a JSON object"));
        };
        PeftConfig::from_value(&m, file)
    }

    /// diffusers' `lora_adapter_metadata`: `{"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": …}`
    /// (Flux: `transformer.r`, …).
    pub(crate) fn from_diffusers_metadata(js: &str, file: &Path) -> Result<BTreeMap<Component, PeftConfig>> {
        let v: Value = serde_json::from_str(js)
            .map_err(|e| file_err(file, format!("metadata `lora_adapter_metadata` is not valid JSON ({e})")))?;
        let Value::Object(m) = v else {
            return Err(file_err(file, "metadata `lora_adapter_metadata` must be a JSON object"));
        };
        let mut parts: BTreeMap<Component, Map<String, Value>> = BTreeMap::new();
        for (k, x) in m {
            let found = [
                ("unet.", Component::Unet),
                ("transformer.", Component::Transformer),
                ("text_encoder.", Component::TextEncoder),
                ("text_encoder_2.", Component::TextEncoder2),
            ]
            .into_iter()
            .find_map(|(pre, c)| k.strip_prefix(pre).map(|f| (c, f)));
            let Some((c, field)) = found else {
                return Err(file_err(
                    file,
                    format!(
                        "`lora_adapter_metadata` key `{k}` has no unet. / transformer. / text_encoder. / \
                         text_encoder_2. prefix"
                    ),
                ));
            };
            parts.entry(c).or_default().insert(field.to_string(), x);
        }
        parts.into_iter().map(|(c, m)| Ok((c, PeftConfig::from_value(&m, file)?))).collect()
    }

    /// The canonical alpha (scale = alpha / r) of module `path` whose tensors have rank `r`.
    pub(crate) fn alpha_for(&self, path: &str, r: usize, file: &Path, key: &str) -> Result<f64> {
        let want_r = lookup(&self.rank_pattern, path, file, "rank_pattern")?.unwrap_or(self.r);
        if want_r != r {
            return Err(DiffusionError::LoraKey {
                file: file.to_path_buf(),
                key: key.to_string(),
                why: format!(
                    "the config gives `{path}` rank {want_r} (r / rank_pattern) but its tensors have rank {r}; \
                     peft would fail to load it — fix rank_pattern"
                ),
            });
        }
        let a = lookup(&self.alpha_pattern, path, file, "alpha_pattern")?.unwrap_or(self.lora_alpha);
        // rsLoRA scales by alpha / √r; as alpha' / r that is alpha' = alpha · √r.
        Ok(if self.use_rslora { a * (r as f64).sqrt() } else { a })
    }

    /// Every module must be selected by `target_modules` (list form: equal, or ends with
    /// `.<target>`), or peft never creates the layer and drops its weights.
    pub(crate) fn check_targets(&self, modules: &[LoraModule], file: &Path) -> Result<()> {
        let Some(t) = &self.targets else { return Ok(()) };
        for m in modules {
            if !t.iter().any(|t| m.path == *t || m.path.ends_with(&format!(".{t}"))) {
                return Err(file_err(
                    file,
                    format!(
                        "module `{}` has weights but `target_modules` does not select it; peft would ignore them",
                        m.path
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn json_num(x: f64) -> Value {
    // Integral alphas as JSON integers, as peft writes them.
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

fn mode<T: Copy + PartialOrd>(xs: &[T]) -> T {
    // The most frequent value; ties to the smallest, so the choice is deterministic.
    let mut best = xs[0];
    let mut best_n = 0;
    for &x in xs {
        let n = xs.iter().filter(|&&y| y == x).count();
        if n > best_n || (n == best_n && x < best) {
            best = x;
            best_n = n;
        }
    }
    best
}

/// The `adapter_config.json` of a PEFT folder holding `modules` (all one component): `r` /
/// `lora_alpha` are the most common values, and modules that differ get `rank_pattern` /
/// `alpha_pattern` entries keyed by their full path. `target_modules` lists the full paths, so
/// peft adds layers exactly where there are weights (a short name like `to_q` would also add
/// untrained layers where the file has none, which peft reports as missing keys).
pub(crate) fn config_json(modules: &[&LoraModule], base_model: &str) -> Value {
    let ranks: Vec<usize> = modules.iter().map(|m| m.rank()).collect();
    let alphas: Vec<f64> = modules.iter().map(|m| m.alpha).collect();
    let r = mode(&ranks);
    let a = mode(&alphas);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for m in modules {
        if m.rank() != r {
            rank_pattern.insert(peft_name(m).to_string(), json!(m.rank()));
        }
        if m.alpha != a {
            alpha_pattern.insert(peft_name(m).to_string(), json_num(m.alpha));
        }
    }
    // Text-encoder names without `text_model.`: peft matches a target by equality or by
    // `.`-suffix, so these select the module under transformers 4 and 5 alike.
    let mut targets: Vec<&str> = modules.iter().map(|m| peft_name(m)).collect();
    targets.sort();
    json!({
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": if base_model.is_empty() { Value::Null } else { json!(base_model) },
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": json_num(a),
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": null,
        "target_modules": targets,
        "task_type": null,
        "use_dora": false,
        "use_rslora": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft_get_pattern_key() {
        let f = Path::new("x.json");
        let m = |p: &str, path: &str| pattern_matches(p, path, f, "alpha_pattern").unwrap();
        assert!(m("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv1"));
        assert!(m("resnets.0.conv1", "down_blocks.0.resnets.0.conv1"), "suffix at a dot boundary");
        assert!(!m("esnets.0.conv1", "down_blocks.0.resnets.0.conv1"), "not at a boundary");
        assert!(!m("conv1", "down_blocks.0.resnets.0.conv12"));
        assert!(pattern_matches("to_.*", "a.to_q", f, "alpha_pattern").is_err());
    }
}
