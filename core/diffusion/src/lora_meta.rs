//! kohya `ss_*` and SAI `modelspec.*` metadata of a trained LoRA, spelled as sd-scripts writes it
//! (`train_network.py` builds the `ss_*` dict and stringifies every value with Python's `str`;
//! `library/sai_model_spec.py` builds `modelspec.*`). Values are Python's spellings: floats as
//! `repr` (`0.0001`, `1e-05`, `16.0`), booleans `True`/`False`, `ss_resolution` a tuple `(512, 512)`.
//!
//! Not written: `sshs_model_hash` / `sshs_legacy_hash` (sd-scripts hashes the serialized tensors;
//! the viewers that show them recompute them anyway), `ss_session_id` (a random number).

use std::collections::BTreeMap;

use crate::lora_keys::BaseArch;

/// Which Qwen-Image model a LoRA was trained on: one transformer layout ([`BaseArch::QwenImage`])
/// but different musubi-tuner metadata (`modelspec.architecture`, `ss_base_model_version`,
/// `modelspec.resolution`), which ComfyUI / model sites use to tell the models apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QwenImageVariant {
    /// Qwen-Image text-to-image (musubi without `--edit`).
    #[default]
    TextToImage,
    /// Qwen-Image-Edit (musubi `--edit`).
    Edit,
    /// Qwen-Image-Edit-2509 (musubi `--edit_plus`).
    EditPlus,
}

impl QwenImageVariant {
    /// musubi-tuner's values (notes/qwen-musubi.md §8: `dataset/architectures.py`,
    /// `utils/sai_model_spec.py`): (`modelspec.architecture`, `ss_base_model_version`,
    /// `modelspec.resolution` default).
    pub fn musubi_strings(self) -> (&'static str, &'static str, &'static str) {
        match self {
            QwenImageVariant::TextToImage => ("Qwen-Image/lora", "qwen_image", "1328x1328"),
            QwenImageVariant::Edit => ("Qwen-Image-Edit/lora", "qwen_image_edit", "1024x1024"),
            QwenImageVariant::EditPlus => ("Qwen-Image-Edit-Plus/lora", "qwen_image_edit", "1024x1024"),
        }
    }
}

/// What the trainer knows about a run, for the metadata of its LoRA file.
#[derive(Debug, Clone)]
pub struct TrainingInfo {
    pub arch: BaseArch,
    /// Which Qwen-Image model (only read when `arch` is [`BaseArch::QwenImage`]).
    pub qwen_variant: QwenImageVariant,
    pub rank: usize,
    pub alpha: f64,
    pub title: String,
    pub resolution: (u32, u32),
    pub base_model: String,
    pub steps: u64,
    pub epochs: u64,
    pub learning_rate: f64,
    pub started_at_unix: u64,
    /// More `ss_*` (or `modelspec.*`) keys the trainer knows, written as given: they override ours.
    pub extra: BTreeMap<String, String>,
}

/// Python's `str(float)`: shortest round-trip digits, scientific below 1e-4 and from 1e16 with
/// a two-digit exponent, and a `.0` on integral values.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // `{:e}` is Rust's shortest round-trip form, e.g. `1.5e-5`; its exponent decides the layout.
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// ISO-8601 `YYYY-MM-DDTHH:MM:SS` of a Unix time in UTC (sd-scripts writes
/// `datetime.fromtimestamp(int(ts)).isoformat()`, local time without an offset; we use UTC so the
/// file does not depend on the machine's zone).
pub fn iso_datetime(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// `modelspec.architecture` (+ for SD1: `ss_base_model_version`, `modelspec.implementation`).
/// SD1: sd-scripts' own values. Flux: only the architecture, as lora-formats.md lists it
/// (musubi-tuner's spelling). Qwen-Image: see [`qwen_strings`].
fn arch_strings(arch: BaseArch) -> Option<(&'static str, Option<(&'static str, &'static str)>)> {
    match arch {
        BaseArch::Sd15 => Some(("stable-diffusion-v1/lora", Some(("sd_v1", "diffusers")))),
        BaseArch::Flux => Some(("Flux.1-dev/lora", None)),
        BaseArch::QwenImage | BaseArch::Unknown => None,
    }
}

/// musubi-tuner's model keys for a Qwen-Image LoRA (`qwen_image_train_network.py` +
/// `sai_model_spec.py`): the variant's architecture / base model version, the fixed
/// implementation URL, the variant's default `modelspec.resolution` (musubi writes it unless
/// `--metadata_reso`; it names the base model's resolution, not the training buckets) and
/// musubi's network module.
fn qwen_strings(v: QwenImageVariant) -> [(&'static str, &'static str); 5] {
    let (architecture, version, resolution) = v.musubi_strings();
    [
        ("modelspec.architecture", architecture),
        ("ss_base_model_version", version),
        ("modelspec.implementation", "https://github.com/QwenLM/Qwen-Image"),
        ("modelspec.resolution", resolution),
        ("ss_network_module", "networks.lora_qwen_image"),
    ]
}

/// `ss_*` + `modelspec.*` as sd-scripts' `train_network.py` / `library/sai_model_spec.py` write them.
pub fn kohya_metadata(info: &TrainingInfo) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", info.rank.to_string());
    // argparse `--network_alpha` is a float: str() gives `16.0`.
    put("ss_network_alpha", py_float(info.alpha));
    put("ss_output_name", info.title.clone());
    // time.time() is a float; we know whole seconds.
    put("ss_training_started_at", py_float(info.started_at_unix as f64));
    put("ss_steps", info.steps.to_string());
    put("ss_max_train_steps", info.steps.to_string());
    put("ss_epoch", info.epochs.to_string());
    put("ss_num_epochs", info.epochs.to_string());
    put("ss_learning_rate", py_float(info.learning_rate));
    put("ss_resolution", format!("({}, {})", info.resolution.0, info.resolution.1));
    put("ss_v2", "False".into());
    // sd-scripts writes the base model's file name when the path exists, else the id as given.
    let base = std::path::Path::new(&info.base_model);
    let name = if base.exists() {
        base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| info.base_model.clone())
    } else {
        info.base_model.clone()
    };
    put("ss_sd_model_name", name);
    put("modelspec.sai_model_spec", "1.0.1".into());
    put(
        "modelspec.title",
        if info.title.is_empty() { format!("LoRA@{}", info.started_at_unix) } else { info.title.clone() },
    );
    put("modelspec.resolution", format!("{}x{}", info.resolution.0, info.resolution.1));
    put("modelspec.date", iso_datetime(info.started_at_unix));
    put("modelspec.implementation_version", format!("likeness/{}", env!("CARGO_PKG_VERSION")));
    if let Some((architecture, sd)) = arch_strings(info.arch) {
        put("modelspec.architecture", architecture.into());
        if let Some((version, implementation)) = sd {
            put("ss_base_model_version", version.into());
            put("modelspec.implementation", implementation.into());
            // sd-scripts: "epsilon" unless --v_parameterization; the trainer overrides via `extra`.
            put("modelspec.prediction_type", "epsilon".into());
        }
    }
    if info.arch == BaseArch::QwenImage {
        for (k, v) in qwen_strings(info.qwen_variant) {
            put(k, v.into());
        }
    }
    for (k, v) in &info.extra {
        m.insert(k.clone(), v.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_spellings() {
        // Python 3: str(x) for each x.
        for (x, s) in [
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (3e-4, "0.0003"),
            (16.0, "16.0"),
            (0.5, "0.5"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.5e-7, "1.5e-07"),
            (1700000000.0, "1700000000.0"),
            (0.1, "0.1"),
            // The learning rates sd-scripts users see in ss_learning_rate (issue 15).
            (5e-5, "5e-05"),
            (1e-6, "1e-06"),
            (0.001, "0.001"),
            (2.5e-5, "2.5e-05"),
            (1.0, "1.0"),
        ] {
            assert_eq!(py_float(x), s, "{x}");
        }
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_datetime(0), "1970-01-01T00:00:00");
        assert_eq!(iso_datetime(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(iso_datetime(1_700_000_000), "2023-11-14T22:13:20");
    }

    #[test]
    fn sd15_metadata_keys() {
        let info = TrainingInfo {
            arch: BaseArch::Sd15,
            qwen_variant: QwenImageVariant::default(),
            rank: 16,
            alpha: 8.0,
            title: "me".into(),
            resolution: (512, 512),
            base_model: "runwayml/stable-diffusion-v1-5".into(),
            steps: 1000,
            epochs: 10,
            learning_rate: 1e-4,
            started_at_unix: 1_700_000_000,
            extra: [("ss_seed".to_string(), "42".to_string())].into_iter().collect(),
        };
        let m = kohya_metadata(&info);
        assert_eq!(m["ss_network_module"], "networks.lora");
        assert_eq!(m["ss_network_dim"], "16");
        assert_eq!(m["ss_network_alpha"], "8.0");
        assert_eq!(m["ss_base_model_version"], "sd_v1");
        assert_eq!(m["ss_resolution"], "(512, 512)");
        assert_eq!(m["ss_learning_rate"], "0.0001");
        let m5 = kohya_metadata(&TrainingInfo { learning_rate: 5e-5, ..info.clone() });
        assert_eq!(m5["ss_learning_rate"], "5e-05", "Python str(5e-05), not 0.00005");
        assert_eq!(m["ss_sd_model_name"], "runwayml/stable-diffusion-v1-5");
        assert_eq!(m["modelspec.architecture"], "stable-diffusion-v1/lora");
        assert_eq!(m["modelspec.implementation"], "diffusers");
        assert_eq!(m["modelspec.resolution"], "512x512");
        assert_eq!(m["modelspec.date"], "2023-11-14T22:13:20");
        assert_eq!(m["ss_seed"], "42");
        let unknown = kohya_metadata(&TrainingInfo { arch: BaseArch::Unknown, ..info.clone() });
        assert!(!unknown.contains_key("modelspec.architecture"), "no guessed architecture");
    }

    #[test]
    fn qwen_image_metadata_names_the_variant_as_musubi_does() {
        let info = TrainingInfo {
            arch: BaseArch::QwenImage,
            qwen_variant: QwenImageVariant::EditPlus,
            rank: 16,
            alpha: 1.0,
            title: "me".into(),
            resolution: (768, 768),
            base_model: "Qwen/Qwen-Image-Edit-2509".into(),
            steps: 10,
            epochs: 1,
            learning_rate: 1e-4,
            started_at_unix: 1_700_000_000,
            extra: BTreeMap::new(),
        };
        let m = kohya_metadata(&info);
        assert_eq!(m["modelspec.architecture"], "Qwen-Image-Edit-Plus/lora");
        assert_eq!(m["ss_base_model_version"], "qwen_image_edit");
        assert_eq!(m["modelspec.implementation"], "https://github.com/QwenLM/Qwen-Image");
        assert_eq!(m["modelspec.resolution"], "1024x1024");
        assert_eq!(m["ss_network_module"], "networks.lora_qwen_image");
        assert_eq!(m["ss_resolution"], "(768, 768)", "the training resolution stays in ss_resolution");
        assert!(!m.contains_key("modelspec.prediction_type"), "the trainer gives the flow prediction via extra");
        let edit = kohya_metadata(&TrainingInfo { qwen_variant: QwenImageVariant::Edit, ..info.clone() });
        assert_eq!(edit["modelspec.architecture"], "Qwen-Image-Edit/lora");
        let t2i = kohya_metadata(&TrainingInfo { qwen_variant: QwenImageVariant::TextToImage, ..info });
        assert_eq!(
            (t2i["modelspec.architecture"].as_str(), t2i["ss_base_model_version"].as_str()),
            ("Qwen-Image/lora", "qwen_image")
        );
        assert_eq!(t2i["modelspec.resolution"], "1328x1328");
    }
}
