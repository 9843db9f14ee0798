//! The on-disk cache of model encodings (VAE latents, text-encoder outputs), ABI 1.1's
//! `encode`.
//!
//! An encoding is computed once per distinct source and stored as one safetensors file per
//! sample: `<dir>/<plugin>/<encoding>/<key[..2]>/<key>.safetensors`, whose tensors are the
//! encoding's outputs for that sample (batch dimension 1). The key is the SHA-256 of the
//! plugin id and version, the encoding name, the values of the model-config keys the model
//! declared as affecting it, and the content the model would have seen: the decoded, resized
//! f32 image (so a change of bucket or resize rule is a new key) or the UTF-8 text. Entries are
//! written atomically (temp + rename); a file that does not read back is recomputed with a
//! warning.

use std::path::{Path, PathBuf};

use likeness_abi::{CpuTensor, EncodingDecl, InputKind};
use safetensors::tensor::{Dtype, TensorView as StView};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::step::{batch_image, batch_texts};
use crate::data::{Batch, Example};
use crate::plugins::Model;
use crate::{EngineError, Result};

/// Named tensors: one cache entry, or an encoding's outputs.
type Named = Vec<(String, CpuTensor<f32>)>;

/// See the module docs.
pub(crate) struct EncodingCache {
    dir: PathBuf,
    enabled: bool,
    plugin: String,
    version: String,
    /// Per encoding: the JSON of the config values that affect it.
    config_values: Vec<(String, String)>,
    pub hits: usize,
    pub misses: usize,
}

impl EncodingCache {
    pub fn new(
        dir: &Path,
        model: &Model,
        config: &serde_json::Map<String, serde_json::Value>,
        encodings: &[EncodingDecl],
        enabled: bool,
    ) -> Self {
        let config_values = encodings
            .iter()
            .map(|e| {
                let vals: Vec<(String, serde_json::Value)> = e
                    .config_keys
                    .iter()
                    .map(|k| (k.to_string(), config.get(k.as_str()).cloned().unwrap_or(serde_json::Value::Null)))
                    .collect();
                (e.name.to_string(), serde_json::to_string(&vals).unwrap_or_default())
            })
            .collect();
        EncodingCache {
            dir: dir.to_path_buf(),
            enabled: enabled && !encodings.is_empty(),
            plugin: model.id.clone(),
            version: model.descriptor.version.to_string(),
            config_values,
            hits: 0,
            misses: 0,
        }
    }

    /// Whether encodings are cached (and passed in place of their sources).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn key(&self, decl: &EncodingDecl, content: &[u8]) -> String {
        let mut h = Sha256::new();
        let cfg =
            self.config_values.iter().find(|(n, _)| n == decl.name.as_str()).map(|(_, v)| v.as_str()).unwrap_or("");
        for part in ["likeness-encoding-v1", &self.plugin, &self.version, decl.name.as_str(), decl.source.as_str(), cfg]
        {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update((content.len() as u64).to_le_bytes());
        h.update(content);
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn path(&self, decl: &EncodingDecl, key: &str) -> PathBuf {
        self.dir.join(&self.plugin).join(decl.name.as_str()).join(&key[..2]).join(format!("{key}.safetensors"))
    }

    /// The encoding `decl` of every example of `batch`, read from the cache or computed (in one
    /// `encode` call for the missing ones) and stored; returns the outputs stacked over the
    /// batch.
    pub fn encodings(
        &mut self,
        model: &mut Model,
        decl: &EncodingDecl,
        examples: &[Example],
        batch: &Batch,
    ) -> Result<Vec<(String, CpuTensor<f32>)>> {
        let n = examples.len();
        let source = decl.source.as_str();
        // Per sample: the content the model would see, its key and (when cached) the entry.
        let image = match decl.source_kind {
            InputKind::Image => Some(batch_image(batch, source)?),
            InputKind::Text => None,
        };
        let texts: &[String] = match decl.source_kind {
            InputKind::Text => batch_texts(batch, source)?,
            InputKind::Image => &[],
        };
        let row = |t: &CpuTensor<f32>, i: usize| -> Vec<f32> {
            let per = t.numel() / t.shape[0].max(1) as usize;
            t.data[i * per..(i + 1) * per].to_vec()
        };
        let keys: Vec<String> = (0..n)
            .map(|i| match image {
                Some(img) => self.key(decl, &row(img, i).iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
                None => self.key(decl, texts[i].as_bytes()),
            })
            .collect();
        let mut entries: Vec<Option<Named>> = keys.iter().map(|k| self.read(&self.path(decl, k))).collect();
        let missing: Vec<usize> = (0..n).filter(|&i| entries[i].is_none()).collect();
        self.hits += n - missing.len();
        self.misses += missing.len();
        if !missing.is_empty() {
            let outs = self.compute(model, decl, image, texts, &missing)?;
            for (k, &i) in missing.iter().enumerate() {
                let per_sample: Vec<(String, CpuTensor<f32>)> = outs
                    .iter()
                    .map(|(name, t)| {
                        let mut shape = t.shape.clone();
                        shape[0] = 1;
                        (name.clone(), CpuTensor::new(shape, row(t, k)))
                    })
                    .collect();
                self.write(&self.path(decl, &keys[i]), &per_sample, &examples[i])?;
                entries[i] = Some(per_sample);
            }
        }
        debug!(encoding = %decl.name, hits = n - missing.len(), misses = missing.len(), "encoding cache");
        stack(entries.into_iter().map(|e| e.expect("every entry read or computed")).collect())
    }

    /// The encoding `decl` of the samples `missing` of the batch (one `encode` call), each output
    /// checked to have one row per sample.
    fn compute(
        &self,
        model: &mut Model,
        decl: &EncodingDecl,
        image: Option<&CpuTensor<f32>>,
        texts: &[String],
        missing: &[usize],
    ) -> Result<Named> {
        let source = decl.source.as_str();
        let computed = match image {
            Some(img) => {
                let per = img.numel() / img.shape[0].max(1) as usize;
                let mut shape = img.shape.clone();
                shape[0] = missing.len() as i64;
                let mut data = Vec::with_capacity(per * missing.len());
                for &i in missing {
                    data.extend_from_slice(&img.data[i * per..(i + 1) * per]);
                }
                let sub = CpuTensor::new(shape, data);
                model.encode(decl.name.as_str(), &[(source, sub.view())], &[])?
            }
            None => {
                let sub: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
                model.encode(decl.name.as_str(), &[], &[(source, sub.as_slice())])?
            }
        };
        let outs: Named = computed
            .0
            .iter()
            .map(|(name, t)| CpuTensor::<f32>::from_managed(t, name).map(|c| (name.clone(), c)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| EngineError::Plugin {
                plugin: self.plugin.clone(),
                message: format!("encode(`{}`): {}", decl.name, e.message),
            })?;
        for (name, t) in &outs {
            if t.shape.first().copied() != Some(missing.len() as i64) {
                return Err(EngineError::Plugin {
                    plugin: self.plugin.clone(),
                    message: format!(
                        "encode(`{}`) output `{name}` has shape {:?}, expected {} rows",
                        decl.name,
                        t.shape,
                        missing.len()
                    ),
                });
            }
        }
        Ok(outs)
    }

    fn read(&self, path: &Path) -> Option<Vec<(String, CpuTensor<f32>)>> {
        let bytes = std::fs::read(path).ok()?;
        let parsed = safetensors::SafeTensors::deserialize(&bytes);
        let st = match parsed {
            Ok(st) => st,
            Err(e) => {
                warn!("encoding cache entry {} is unreadable ({e}); recomputing it", path.display());
                return None;
            }
        };
        let mut out = Vec::new();
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        for name in names {
            let t = st.tensor(&name).ok()?;
            if t.dtype() != Dtype::F32 {
                warn!("encoding cache entry {}: tensor `{name}` is not f32; recomputing it", path.display());
                return None;
            }
            let data: Vec<f32> =
                t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            out.push((name, CpuTensor::new(t.shape().iter().map(|&d| d as i64).collect(), data)));
        }
        Some(out)
    }

    fn write(&self, path: &Path, tensors: &[(String, CpuTensor<f32>)], example: &Example) -> Result<()> {
        let parent = path.parent().expect("cache path has a parent");
        std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    t.shape.iter().map(|&d| d as usize).collect(),
                )
            })
            .collect();
        let views: Vec<(String, StView<'_>)> = bytes
            .iter()
            .map(|(n, b, s)| StView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| EngineError::io(path, format!("cannot build safetensors: {e}")))?;
        let meta = std::collections::HashMap::from([
            ("plugin".to_string(), self.plugin.clone()),
            ("plugin_version".to_string(), self.version.clone()),
            ("example".to_string(), example.id.clone()),
        ]);
        let data = safetensors::serialize(views, &Some(meta))
            .map_err(|e| EngineError::io(path, format!("cannot serialize: {e}")))?;
        crate::write_atomic(path, &data)
    }
}

/// Concatenates per-sample entries (batch dimension 1) along dimension 0.
fn stack(entries: Vec<Vec<(String, CpuTensor<f32>)>>) -> Result<Vec<(String, CpuTensor<f32>)>> {
    let Some(first) = entries.first() else { return Ok(Vec::new()) };
    let mut out: Vec<(String, CpuTensor<f32>)> = Vec::new();
    for (name, t0) in first {
        let mut shape = t0.shape.clone();
        shape[0] = entries.len() as i64;
        let mut data = Vec::with_capacity(t0.numel() * entries.len());
        for e in &entries {
            let t = e
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| EngineError::Other(format!("encoding cache: an entry lacks `{name}`")))?;
            if t.shape[1..] != t0.shape[1..] {
                return Err(EngineError::Other(format!(
                    "encoding cache: `{name}` has shapes {:?} and {:?} within one batch",
                    t0.shape, t.shape
                )));
            }
            data.extend_from_slice(&t.data);
        }
        out.push((name.clone(), CpuTensor::new(shape, data)));
    }
    Ok(out)
}
