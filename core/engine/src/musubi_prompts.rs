//! musubi-tuner's `--sample_prompts` file (`sample.prompt_file`), read as musubi-tuner reads it
//! (`src/musubi_tuner/training/sampling_prompts.py` at 30c658c, `line_to_prompt_dict` L14-100 and
//! `load_prompts` L103-130).
//!
//! - `.txt`: one prompt per line. Lines that are empty after trimming, or whose *first
//!   character* is `#`, are skipped (so `  # x` is the prompt `# x`, as in musubi-tuner). A line is
//!   split on `" --"`; the first piece is the prompt, and every piece, the prompt included, is
//!   tested against the options below (case-insensitively, matched at the piece's start as
//!   Python's `re.match` does: `w 512px` sets the width to 512).
//! - `.toml`: `[prompt]` with `[[prompt.subset]]`; each subset merged over the `[prompt]` keys.
//! - `.json`: a list whose items are lines (strings, parsed as above) or objects.
//! - Any other extension is an error (musubi-tuner then fails on an unbound variable).
//!
//! | option | object key | here |
//! |---|---|---|
//! | `--w N` / `--h N` | `width` / `height` | the sample's size, floored to a multiple of 16 (musubi-tuner floors to 8 and its 2×2-packed latents to 16); default 256 × 256 (musubi-tuner's Qwen default) unless `sample.width/height` are set |
//! | `--s N` | `sample_steps` | clamped to 1..=1000 (line syntax, as musubi-tuner) |
//! | `--d N` | `seed` | the sample's seed; default `sample.seed + index` (musubi-tuner draws a random one) |
//! | `--l F` | `cfg_scale` | the request's guidance (classifier-free guidance scale) |
//! | `--g F` | `guidance_scale` | the embedded-guidance scale; used as the request's guidance only when `--l` is absent and the model is not Qwen-Image (musubi-tuner's Qwen sampler ignores it) |
//! | `--n TEXT` | `negative_prompt` | the sample's negative prompt |
//! | `--fs F` | `discrete_flow_shift` | parsed; the sample request has no shift field, so the model's own sampling shift applies (a warning says so) |
//! | `--ci PATH` (repeatable) | `control_image_path` (string or list) | control images, passed as the roles `control`, `control_1`, … ([`crate::data::roles::control`]) |
//! | `--f N`, `--i`, `--ei`, `--cn`, `--of` | `frame_count`, … | other architectures' options: parsed, unused, and warned about |
//!
//! An option whose value does not parse (`--g 1.2.3`) is skipped with a warning, as musubi-tuner
//! logs and skips it. Relative `--ci` paths are relative to the current directory, as in
//! musubi-tuner.

use std::path::{Path, PathBuf};

/// One entry of a prompt file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplePrompt {
    /// Its position in the file (among the kept lines / items): musubi-tuner's `enum`, the
    /// `<prompt:02d>` of its sample names.
    pub index: usize,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub seed: Option<u64>,
    /// `--l`: classifier-free guidance scale.
    pub cfg_scale: Option<f64>,
    /// `--g`: embedded guidance scale.
    pub guidance_scale: Option<f64>,
    /// `--fs`.
    pub discrete_flow_shift: Option<f64>,
    /// `--ci`, in order.
    pub control_images: Vec<PathBuf>,
    /// What was parsed but is not used here, or did not parse (one sentence each).
    pub notes: Vec<String>,
}

/// A prompt file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PromptFileError {
    #[error("--sample_prompts {path}: cannot read: {message}")]
    Io { path: PathBuf, message: String },
    #[error("--sample_prompts {path}: the file must end in .txt, .toml or .json (musubi-tuner's formats)")]
    Extension { path: PathBuf },
    #[error("--sample_prompts {path}: {message}")]
    Format { path: PathBuf, message: String },
}

/// Reads a prompt file (see the module docs).
pub fn load(path: &Path) -> Result<Vec<SamplePrompt>, PromptFileError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    // musubi-tuner tests `endswith(".txt")`: the extension is case-sensitive there too.
    if !matches!(ext, "txt" | "toml" | "json") {
        return Err(PromptFileError::Extension { path: path.to_path_buf() });
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| PromptFileError::Io { path: path.to_path_buf(), message: e.to_string() })?;
    let bad = |message: String| PromptFileError::Format { path: path.to_path_buf(), message };
    let mut prompts = match ext {
        "txt" => {
            text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(|l| parse_line(l.trim())).collect()
        }
        "toml" => toml_entries(&text).map_err(bad)?,
        _ => json_entries(&text).map_err(bad)?,
    };
    for (i, p) in prompts.iter_mut().enumerate() {
        p.index = i;
    }
    Ok(prompts)
}

/// `line_to_prompt_dict`: the pieces of `line` split on `" --"`, each tested in musubi-tuner's order.
pub fn parse_line(line: &str) -> SamplePrompt {
    let mut p = SamplePrompt::default();
    let pieces: Vec<&str> = line.split(" --").collect();
    p.prompt = pieces[0].to_string();
    for piece in pieces {
        apply_piece(&mut p, piece);
    }
    p
}

/// The value after `key ` at the start of `piece` (ASCII case-insensitive), if any.
fn after<'a>(piece: &'a str, key: &str) -> Option<&'a str> {
    let n = key.len() + 1;
    let head = piece.get(..n)?;
    (head[..key.len()].eq_ignore_ascii_case(key) && head.ends_with(' ')).then(|| &piece[n..])
}

/// The longest prefix of `s` made of characters in `allowed` (regex `[…]+`), if not empty.
fn run_of(s: &str, allowed: impl Fn(char) -> bool) -> Option<&str> {
    let end = s.char_indices().find(|(_, c)| !allowed(*c)).map(|(i, _)| i).unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// A regex value group (`(\d+)`, `([\d\.]+)`, `(.+)`): the value at the start of a string.
type ValuePattern = dyn Fn(&str) -> Option<String>;

/// One piece against musubi-tuner's options, in its order; the first that matches is taken
/// (a value that does not convert is noted and the piece skipped, as its `except ValueError`).
fn apply_piece(p: &mut SamplePrompt, piece: &str) {
    let digits = |s: &str| run_of(s, |c| c.is_ascii_digit()).map(str::to_string);
    let float = |s: &str| run_of(s, |c| c.is_ascii_digit() || c == '.').map(str::to_string);
    let rest = |s: &str| (!s.is_empty()).then(|| s.to_string());
    // (key, value pattern) in line_to_prompt_dict's order.
    let order: [(&str, &ValuePattern); 14] = [
        ("w", &digits),
        ("h", &digits),
        ("f", &digits),
        ("d", &digits),
        ("s", &digits),
        ("g", &float),
        ("fs", &float),
        ("l", &float),
        ("n", &rest),
        ("i", &rest),
        ("ei", &rest),
        ("cn", &rest),
        ("ci", &rest),
        ("of", &rest),
    ];
    for (key, pattern) in order {
        let Some(v) = after(piece, key).and_then(pattern) else { continue };
        if let Err(e) = set_option(p, key, &v) {
            p.notes.push(format!("--{key} {v}: {e}; skipped (musubi-tuner logs and skips it too)"));
        }
        return;
    }
}

fn set_option(p: &mut SamplePrompt, key: &str, v: &str) -> Result<(), String> {
    let int = |v: &str| v.parse::<u64>().map_err(|e| e.to_string());
    let float = |v: &str| v.parse::<f64>().map_err(|e| e.to_string());
    let small = |v: &str| int(v).and_then(|n| u32::try_from(n).map_err(|e| e.to_string()));
    match key {
        "w" => p.width = Some(small(v)?),
        "h" => p.height = Some(small(v)?),
        "d" => p.seed = Some(int(v)?),
        // musubi-tuner: max(1, min(1000, int(…))).
        "s" => p.steps = Some(int(v)?.clamp(1, 1000) as u32),
        "g" => p.guidance_scale = Some(float(v)?),
        "fs" => p.discrete_flow_shift = Some(float(v)?),
        "l" => p.cfg_scale = Some(float(v)?),
        "n" => p.negative_prompt = Some(v.to_string()),
        "ci" => p.control_images.push(PathBuf::from(v.trim())),
        other => p.notes.push(format!(
            "--{other} {v} is another architecture's option (frames, video images, output folder): unused"
        )),
    }
    Ok(())
}

/// `[prompt]` + `[[prompt.subset]]`: `dict(**prompt, **subset)`, so a key in both is an error
/// (Python's "got multiple values for keyword argument").
fn toml_entries(text: &str) -> Result<Vec<SamplePrompt>, String> {
    let t: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let prompt = t.get("prompt").and_then(|v| v.as_table()).ok_or("needs a [prompt] table")?;
    let subsets = prompt.get("subset").and_then(|v| v.as_array()).ok_or("needs [[prompt.subset]] entries")?;
    let mut out = Vec::new();
    for (i, s) in subsets.iter().enumerate() {
        let s = s.as_table().ok_or_else(|| format!("prompt.subset[{i}] must be a table"))?;
        let mut merged = serde_json::Map::new();
        for (k, v) in prompt.iter().filter(|(k, _)| k.as_str() != "subset") {
            merged.insert(k.clone(), serde_json::to_value(v).map_err(|e| e.to_string())?);
        }
        for (k, v) in s {
            if merged.contains_key(k) {
                return Err(format!(
                    "`{k}` is in both [prompt] and prompt.subset[{i}] (musubi-tuner refuses this too)"
                ));
            }
            merged.insert(k.clone(), serde_json::to_value(v).map_err(|e| e.to_string())?);
        }
        out.push(from_object(&merged).map_err(|e| format!("prompt.subset[{i}]: {e}"))?);
    }
    Ok(out)
}

/// A JSON list of lines or objects.
fn json_entries(text: &str) -> Result<Vec<SamplePrompt>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let items = v.as_array().ok_or("must be a JSON list of prompts (strings or objects)")?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            serde_json::Value::String(line) => Ok(parse_line(line)),
            serde_json::Value::Object(o) => from_object(o).map_err(|e| format!("item {i}: {e}")),
            _ => Err(format!("item {i} must be a string or an object")),
        })
        .collect()
}

/// An object entry under musubi-tuner's dict keys (the same keys its line parser writes).
fn from_object(o: &serde_json::Map<String, serde_json::Value>) -> Result<SamplePrompt, String> {
    let mut p = SamplePrompt::default();
    let num = |k: &str, v: &serde_json::Value| v.as_f64().ok_or_else(|| format!("`{k}` must be a number"));
    let int =
        |k: &str, v: &serde_json::Value| v.as_u64().ok_or_else(|| format!("`{k}` must be a non-negative integer"));
    let small = |k: &str, v: &serde_json::Value| {
        int(k, v).and_then(|n| u32::try_from(n).map_err(|_| format!("`{k}` is too large")))
    };
    let text = |k: &str, v: &serde_json::Value| {
        v.as_str().map(str::to_string).ok_or_else(|| format!("`{k}` must be a string"))
    };
    for (k, v) in o {
        match k.as_str() {
            "prompt" => p.prompt = text(k, v)?,
            "negative_prompt" => p.negative_prompt = Some(text(k, v)?),
            "width" => p.width = Some(small(k, v)?),
            "height" => p.height = Some(small(k, v)?),
            "sample_steps" => p.steps = Some(small(k, v)?),
            "seed" => p.seed = Some(int(k, v)?),
            "cfg_scale" => p.cfg_scale = Some(num(k, v)?),
            "guidance_scale" => p.guidance_scale = Some(num(k, v)?),
            "discrete_flow_shift" => p.discrete_flow_shift = Some(num(k, v)?),
            "control_image_path" => match v {
                serde_json::Value::String(s) => p.control_images.push(PathBuf::from(s)),
                serde_json::Value::Array(a) => {
                    for s in a {
                        p.control_images.push(PathBuf::from(text(k, s)?));
                    }
                }
                _ => return Err(format!("`{k}` must be a path or a list of paths")),
            },
            // musubi-tuner's own bookkeeping key.
            "enum" => {}
            other => p.notes.push(format!("`{other}` is not a sample option used here: unused")),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_as_musubi_tuners_line_to_prompt_dict() {
        let p = parse_line(
            "a photo of sks person --w 512 --h 768 --s 30 --d 42 --l 4.5 --g 3.5 --fs 2.2 --n blurry, low quality --ci a.png --ci b/c.png",
        );
        assert_eq!(p.prompt, "a photo of sks person");
        assert_eq!((p.width, p.height, p.steps, p.seed), (Some(512), Some(768), Some(30), Some(42)));
        assert_eq!((p.cfg_scale, p.guidance_scale, p.discrete_flow_shift), (Some(4.5), Some(3.5), Some(2.2)));
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry, low quality"));
        assert_eq!(p.control_images, [PathBuf::from("a.png"), PathBuf::from("b/c.png")]);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        // re.match semantics: a prefix match, case-insensitive; the prompt piece is tested too;
        // --s is clamped to 1..=1000; a float that does not convert is skipped with a note.
        let q = parse_line("W 640 wide --S 5000 --H 512px --g 1.2.3");
        assert_eq!(q.prompt, "W 640 wide");
        assert_eq!((q.width, q.height, q.steps), (Some(640), Some(512), Some(1000)));
        assert_eq!(q.guidance_scale, None);
        assert_eq!(q.notes.len(), 1, "{:?}", q.notes);
        // `--fs` is not `--f` (which needs a space after `f`), and `--f 3` is another architecture's.
        let r = parse_line("x --f 3 --fs 3");
        assert_eq!(r.discrete_flow_shift, Some(3.0));
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
    }

    #[test]
    fn files_in_each_format() {
        let d = tempfile::tempdir().unwrap();
        let txt = d.path().join("p.txt");
        std::fs::write(&txt, "# comment\n\nfirst --w 256\n  # kept: not at column 0\nsecond --ci c.png\n").unwrap();
        let p = load(&txt).unwrap();
        let prompts: Vec<&str> = p.iter().map(|p| p.prompt.as_str()).collect();
        assert_eq!(prompts, ["first", "# kept: not at column 0", "second"]);
        assert_eq!(p.iter().map(|p| p.index).collect::<Vec<_>>(), [0, 1, 2]);
        let toml = d.path().join("p.toml");
        std::fs::write(
            &toml,
            "[prompt]\nwidth = 512\nsample_steps = 8\n[[prompt.subset]]\nprompt = 'a'\ncontrol_image_path = ['x.png', 'y.png']\n[[prompt.subset]]\nprompt = 'b'\nseed = 3\n",
        )
        .unwrap();
        let p = load(&toml).unwrap();
        assert_eq!((p[0].prompt.as_str(), p[0].width, p[0].steps), ("a", Some(512), Some(8)));
        assert_eq!(p[0].control_images.len(), 2);
        assert_eq!((p[1].prompt.as_str(), p[1].seed, p[1].width), ("b", Some(3), Some(512)));
        std::fs::write(&toml, "[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = 'a'\nwidth = 256\n").unwrap();
        assert!(load(&toml).unwrap_err().to_string().contains("`width` is in both"));
        let json = d.path().join("p.json");
        std::fs::write(&json, r#"["one --h 320", {"prompt": "two", "cfg_scale": 1.0, "control_image_path": "c.png"}]"#)
            .unwrap();
        let p = load(&json).unwrap();
        assert_eq!((p[0].prompt.as_str(), p[0].height), ("one", Some(320)));
        assert_eq!((p[1].cfg_scale, p[1].control_images.len(), p[1].index), (Some(1.0), 1, 1));
        let other = d.path().join("p.yaml");
        std::fs::write(&other, "x").unwrap();
        assert!(load(&other).unwrap_err().to_string().contains(".txt, .toml or .json"));
    }
}
