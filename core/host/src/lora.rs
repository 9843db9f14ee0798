//! `host lora inspect|convert`: LoRA files in the kohya, diffusers, PEFT and ComfyUI layouts, for
//! SD1.x and Flux.1, through likeness_diffusion::lora_keys (pure Rust; no model, no venv).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use likeness_diffusion::lora_keys::{self, BaseArch, Component, LoraFormat, LoraSet};
use serde_json::{json, Value};

const LORA_HELP: &str = "\
Formats:
  kohya      one .safetensors, keys lora_unet_<diffusers path with _> / lora_te_text_model_… with
             .lora_down.weight, .lora_up.weight and a 0-d .alpha (sd-scripts). Loads in ComfyUI,
             A1111 / Forge, and diffusers pipe.load_lora_weights(file) (converted on load).
  comfyui    what ComfyUI loads best: the kohya layout (the same bytes as --to kohya). Read also:
             diffusion_model.<LDM path>, lycoris_<path>, bare diffusers names.
  diffusers  <dir>/pytorch_lora_weights.safetensors, keys unet.<path>.lora_A.weight / lora_B.weight
             (alpha/r folded into lora_B). Loads with diffusers pipe.load_lora_weights(dir).
  peft       a folder: adapter_config.json + adapter_model.safetensors (base_model.model.<path>),
             the text encoder's in <dir>/text_encoder/. Loads with peft
             PeftModel.from_pretrained(unet, dir) (text encoder: subfolder=\"text_encoder\").
             NOT with diffusers pipe.load_lora_weights: it accepts a PEFT folder without an error
             and changes nothing (measured, diffusers 0.42.1 + peft 0.21.2).
Also read: the original-LDM kohya spelling (lora_unet_input_blocks_1_1_…, middle_block, output_blocks),
  diffusers' older spellings (.lora.down.weight, .lora_linear_layer.down.weight,
  attn1.processor.to_q_lora.down.weight), lora_te1_, and text-encoder names with or without
  `text_model.` (transformers 5 drops it).
Base models (detected from the key names, printed as `base model`): SD1.x, and Flux.1:
  kohya / musubi / ai-toolkit BFL names lora_unet_double_blocks_<i>_img_attn_qkv (fused q,k,v),
  lora_unet_single_blocks_<i>_linear1 (fused q,k,v,mlp), …, lora_te1_ (CLIP-L), lora_te3_ (T5);
  diffusers transformer.<path> (split to_q/to_k/to_v, proj_mlp), text_encoder., text_encoder_2.;
  PEFT base_model.model.<path>; ComfyUI diffusion_model.<BFL path>. Converting to kohya merges
  to_q/k/v (+ proj_mlp) into one module of rank Σr (block-diagonal up, alpha scaled with the rank);
  reading splits them again. Qwen-Image files are recognised and refused (not implemented yet).

Examples:
  host lora inspect runs/x/me.safetensors
  host lora inspect runs/x/me-peft --json
  host lora convert --to diffusers me.safetensors me-diffusers/
  host lora convert --to kohya me-peft/ me.safetensors
  host lora convert --to kohya flux-diffusers/ flux-kohya.safetensors";

#[derive(Subcommand)]
pub enum LoraCommand {
    /// Show a LoRA: its format and which tool loads it, base model, ranks and alphas, target
    /// modules by kind, UNet / text-encoder parts, metadata (ss_*, modelspec.*).
    #[command(after_help = LORA_HELP)]
    Inspect(InspectArgs),
    /// Convert a LoRA between kohya, diffusers, peft and comfyui through the canonical modules:
    /// every key must map (an error names the one that does not), the output is written atomically.
    #[command(after_help = LORA_HELP)]
    Convert(ConvertArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// A .safetensors file, a PEFT folder (adapter_config.json) or a diffusers folder.
    #[arg(value_name = "FILE_OR_DIR")]
    path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Output format: kohya, diffusers, peft or comfyui.
    #[arg(long, value_name = "FORMAT", value_parser = parse_format)]
    to: LoraFormat,
    /// The LoRA to read (file or folder; the format is detected).
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// kohya / comfyui: a .safetensors path; diffusers: a folder (or a .safetensors path); peft: a folder.
    #[arg(value_name = "OUT")]
    output: PathBuf,
    /// Convert even when tensors hold NaN or inf (refused by default: such a LoRA turns a
    /// model's output into NaN wherever it applies).
    #[arg(long)]
    allow_nonfinite: bool,
}

fn parse_format(s: &str) -> Result<LoraFormat, String> {
    s.parse().map_err(|e: likeness_diffusion::DiffusionError| e.to_string())
}

pub fn run(cmd: &LoraCommand) -> ExitCode {
    let res = match cmd {
        LoraCommand::Inspect(a) => inspect(a),
        LoraCommand::Convert(a) => convert(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn describe_format(f: LoraFormat) -> &'static str {
    match f {
        LoraFormat::Kohya => "kohya / sd-scripts (lora_unet_… / lora_te_… keys: lora_down, lora_up, alpha)",
        LoraFormat::ComfyUi => "ComfyUI-style keys (diffusion_model. / lycoris_ / bare names)",
        LoraFormat::Diffusers => "diffusers (unet. / transformer. / text_encoder. keys: lora_A, lora_B)",
        LoraFormat::Peft => "PEFT folder (adapter_config.json + adapter_model.safetensors, base_model.model. keys)",
    }
}

fn describe_arch(a: BaseArch) -> &'static str {
    match a {
        BaseArch::Sd15 => "sd15 (Stable Diffusion 1.x key layout; SD2.x uses the same names)",
        BaseArch::Flux => "flux (Flux.1 FluxTransformer2DModel; CLIP-L text_encoder, T5 text_encoder_2)",
        BaseArch::QwenImage => "qwen-image",
        BaseArch::Unknown => "unknown",
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Everything `inspect` shows, as JSON (the text form is rendered from it).
pub(crate) fn summary(path: &std::path::Path, set: &LoraSet) -> Value {
    let mut parts = serde_json::Map::new();
    for c in [Component::Unet, Component::Transformer, Component::TextEncoder, Component::TextEncoder2] {
        let mods: Vec<_> = set.modules.iter().filter(|m| m.component == c).collect();
        if mods.is_empty() {
            continue;
        }
        let mut groups: BTreeMap<(usize, String), usize> = BTreeMap::new();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
        for m in &mods {
            *groups.entry((m.rank(), fmt_num(m.alpha))).or_default() += 1;
            *kinds.entry(lora_keys::sd15::kind_label(&m.path)).or_default() += 1;
            *dtypes.entry(format!("{:?}", m.up.dtype)).or_default() += 1;
        }
        parts.insert(
            c.as_str().into(),
            json!({
                "modules": mods.len(),
                "ranks": groups.iter().map(|((r, a), n)| json!({"rank": r, "alpha": a.parse::<f64>().unwrap_or(f64::NAN), "modules": n})).collect::<Vec<_>>(),
                "kinds": kinds,
                "dtypes": dtypes,
            }),
        );
    }
    // A PEFT adapter wraps one model: a text encoder's sits in text_encoder/ (Flux's T5: in
    // text_encoder_2/) beside the denoiser's.
    let sub = |name: &str| {
        let f = path.join(name);
        (set.format == LoraFormat::Peft && path.is_dir() && f.join("adapter_config.json").is_file())
            .then(|| f.display().to_string())
    };
    let (te_folder, te2_folder) = (sub("text_encoder"), sub("text_encoder_2"));
    json!({
        "path": path.display().to_string(),
        "text_encoder_folder": te_folder,
        "text_encoder_2_folder": te2_folder,
        "format": set.format.as_str(),
        "format_description": describe_format(set.format),
        "loaded_by": set.format.loaded_by(),
        "base_model": set.arch.as_str(),
        "modules": set.modules.len(),
        "parts": parts,
        "non_finite": set.non_finite().iter().map(|b| json!({"key": b.key, "count": b.count, "numel": b.numel})).collect::<Vec<_>>(),
        "metadata": set.metadata,
    })
}

pub(crate) fn summary_text(s: &Value, arch: BaseArch) -> String {
    let mut o = String::new();
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
    o += &format!("{}\n", str_of(&s["path"]));
    o += &format!("  format:      {} — {}\n", str_of(&s["format"]), str_of(&s["format_description"]));
    o += &format!("  load with:   {}\n", str_of(&s["loaded_by"]));
    o += &format!("  base model:  {}\n", describe_arch(arch));
    if let Some(te) = s["text_encoder_folder"].as_str() {
        o += &format!(
            "  text encoder: {te} — PeftModel.from_pretrained(text_encoder, dir, subfolder=\"text_encoder\")\n"
        );
    }
    if let Some(te) = s["text_encoder_2_folder"].as_str() {
        o += &format!(
            "  text encoder 2: {te} — PeftModel.from_pretrained(text_encoder_2, dir, subfolder=\"text_encoder_2\")\n"
        );
    }
    o += &format!("  modules:     {}\n", s["modules"]);
    if let Some(parts) = s["parts"].as_object() {
        let names = ["unet", "transformer", "text_encoder", "text_encoder_2"];
        for (name, p) in names.iter().filter_map(|n| parts.get(*n).map(|p| (n, p))) {
            let ranks: Vec<String> = p["ranks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| {
                    format!(
                        "r {} α {} on {} module{}",
                        g["rank"],
                        fmt_num(g["alpha"].as_f64().unwrap_or(f64::NAN)),
                        g["modules"],
                        if g["modules"] == 1 { "" } else { "s" }
                    )
                })
                .collect();
            let kinds: Vec<String> = p["kinds"].as_object().unwrap().iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            let dtypes: Vec<String> = p["dtypes"].as_object().unwrap().keys().cloned().collect();
            o += &format!("  {name}: {} modules ({})\n", p["modules"], dtypes.join(", "));
            o += &format!("    ranks:   {}\n", ranks.join("; "));
            o += &format!("    targets: {}\n", kinds.join(", "));
        }
    }
    // Every damaged tensor by key: a NaN LoRA must not look like a healthy one (issue 14, part 7).
    let bad = s["non_finite"].as_array().cloned().unwrap_or_default();
    if bad.is_empty() {
        o += "  values:      all finite\n";
    } else {
        o += &format!(
            "  values:      NOT FINITE in {} tensor(s) (NaN/inf: the LoRA is damaged; convert refuses it):\n",
            bad.len()
        );
        for b in &bad {
            o += &format!("    {}: {} of {} values\n", str_of(&b["key"]), b["count"], b["numel"]);
        }
    }
    let meta = s["metadata"].as_object().cloned().unwrap_or_default();
    if meta.is_empty() {
        o += "  metadata:    none\n";
    } else {
        o += &format!("  metadata:    {} key{}\n", meta.len(), if meta.len() == 1 { "" } else { "s" });
        for (k, v) in &meta {
            let v = v.as_str().unwrap_or_default().replace('\n', " ");
            // Long values (ss_tag_frequency, lora_adapter_metadata) are cut; --json has them whole.
            let shown: String =
                if v.chars().count() > 100 { v.chars().take(100).collect::<String>() + "…" } else { v };
            o += &format!("    {k} = {shown}\n");
        }
    }
    o
}

fn inspect(a: &InspectArgs) -> likeness_diffusion::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    // `detect` reads names only, so a Qwen-Image file is still named before `read` refuses it.
    let (format, arch) = lora_keys::detect(&a.path)?;
    let set = match lora_keys::read(&a.path) {
        Ok(s) => s,
        Err(e) => {
            if a.json {
                let _ = writeln!(
                    out,
                    "{}",
                    json!({"path": a.path.display().to_string(), "format": format.as_str(), "base_model": arch.as_str(), "error": e.to_string()})
                );
            } else {
                let _ = writeln!(out, "{}\n  format:      {} — {}", a.path.display(), format, describe_format(format));
                let _ = writeln!(out, "  base model:  {}", describe_arch(arch));
            }
            return Err(e);
        }
    };
    let s = summary(&a.path, &set);
    // A closed pipe (`| head`) ends the output quietly.
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        let _ = write!(out, "{}", summary_text(&s, set.arch));
    }
    Ok(ExitCode::SUCCESS)
}

fn convert(a: &ConvertArgs) -> likeness_diffusion::Result<ExitCode> {
    let set = lora_keys::read(&a.input)?;
    if a.allow_nonfinite {
        for b in set.non_finite() {
            eprintln!("warning: {}: {b} (converted anyway: --allow-nonfinite)", a.input.display());
        }
    } else {
        set.check_finite(&a.input).map_err(|e| match e {
            likeness_diffusion::DiffusionError::LoraFile { file, why } => {
                likeness_diffusion::DiffusionError::LoraFile {
                    file,
                    why: format!("{why} (--allow-nonfinite converts it anyway)"),
                }
            }
            e => e,
        })?;
    }
    let files = lora_keys::write(&set, a.to, &a.output)?;
    println!("{} ({}, {} modules) → {} ({})", a.input.display(), set.format, set.modules.len(), a.to, a.to.loaded_by());
    for f in files {
        println!("  wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
