//! The on-disk cache of model encodings (VAE latents, text-encoder outputs), ABI 1.1's
//! `encode`.
//!
//! An encoding is computed once per distinct source and stored as one safetensors file per
//! sample: `<dir>/<plugin>/<encoding>/<key[..2]>/<key>.safetensors`, whose tensors are the
//! encoding's outputs for that sample (batch dimension 1). The key is the SHA-256 of the
//! plugin id and version, the encoding name, the values of the model-config keys the model
//! declared as affecting it, and the content the model would have seen: the decoded, resized
//! f32 image (so a change of bucket or resize rule is a new key) or the UTF-8 text — for an
//! encoding of several sources (`caption+control_*`), each input the sample has under its role
//! name. A variable-length output (one with an `<name>_mask`) is stored with its real positions
//! only and padded per batch ([`likeness_abi::EncodingDecl`] states the rule). Entries are
//! written atomically (temp + rename); a file that does not read back is recomputed with a
//! warning.

use std::path::{Path, PathBuf};

use likeness_abi::{CpuTensor, EncodingDecl, TensorView};
use safetensors::tensor::{Dtype, TensorView as StView};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::plan::PlannedEncoding;
use crate::data::{Batch, Example};
use crate::plugins::{Model, TextBatch};
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
        encodings: &[PlannedEncoding],
        enabled: bool,
    ) -> Self {
        let config_values = encodings
            .iter()
            .map(|PlannedEncoding { decl: e, .. }| {
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

    /// The SHA-256 of what the entry depends on. `parts`: each input the encoding read, under
    /// its role or text name (images, then texts). An encoding of one plain source keeps the first
    /// key format (its content alone), so caches written before encodings of several sources
    /// stay valid.
    fn key(&self, enc: &PlannedEncoding, parts: &[(&str, Vec<u8>)]) -> String {
        let decl = &enc.decl;
        let mut h = Sha256::new();
        let cfg =
            self.config_values.iter().find(|(n, _)| n == decl.name.as_str()).map(|(_, v)| v.as_str()).unwrap_or("");
        let single = enc.is_single_plain_source() && parts.len() == 1;
        let version = if single { "likeness-encoding-v1" } else { "likeness-encoding-v2" };
        let mut put = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        for part in [version, &self.plugin, &self.version, decl.name.as_str(), decl.source.as_str(), cfg] {
            put(part.as_bytes());
        }
        for (name, content) in parts {
            if !single {
                put(name.as_bytes());
            }
            put(content);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn path(&self, decl: &EncodingDecl, key: &str) -> PathBuf {
        self.dir.join(&self.plugin).join(decl.name.as_str()).join(&key[..2]).join(format!("{key}.safetensors"))
    }

    /// The encoding of every example of `batch`, read from the cache or computed (in one `encode`
    /// call for the missing ones) and stored; returns the outputs stacked over the batch
    /// (variable-length ones padded, with their masks).
    pub fn encodings(
        &mut self,
        model: &mut Model,
        enc: &PlannedEncoding,
        examples: &[Example],
        batch: &Batch,
    ) -> Result<Vec<(String, CpuTensor<f32>)>> {
        let decl = &enc.decl;
        let n = examples.len();
        let (images, texts) = enc.inputs_of(batch)?;
        // Per sample: the content the model would see (each image under its role name, then each
        // text under its name), its key and (when cached) the entry.
        let keys: Vec<String> = (0..n)
            .map(|i| {
                let mut parts: Vec<(&str, Vec<u8>)> = Vec::new();
                for (role, img) in &images {
                    parts.push((role, row(img, i).iter().flat_map(|x| x.to_le_bytes()).collect()));
                }
                for (name, t) in &texts {
                    parts.push((name, t[i].as_bytes().to_vec()));
                }
                self.key(enc, &parts)
            })
            .collect();
        let mut entries: Vec<Option<Named>> = keys.iter().map(|k| self.read(&self.path(decl, k))).collect();
        let missing: Vec<usize> = (0..n).filter(|&i| entries[i].is_none()).collect();
        self.hits += n - missing.len();
        self.misses += missing.len();
        if !missing.is_empty() {
            let outs = self.compute(model, decl, &images, &texts, &missing)?;
            for (k, &i) in missing.iter().enumerate() {
                let per_sample = entry_of(&outs, k).map_err(|m| self.plugin_error(decl, m))?;
                self.write(&self.path(decl, &keys[i]), &per_sample, &examples[i])?;
                entries[i] = Some(per_sample);
            }
        }
        debug!(encoding = %decl.name, hits = n - missing.len(), misses = missing.len(), "encoding cache");
        stack(entries.into_iter().map(|e| e.expect("every entry read or computed")).collect())
    }

    fn plugin_error(&self, decl: &EncodingDecl, message: String) -> EngineError {
        EngineError::Plugin { plugin: self.plugin.clone(), message: format!("encode(`{}`): {message}", decl.name) }
    }

    /// The encoding `decl` of the samples `missing` of the batch (one `encode` call), each output
    /// checked to have one row per sample.
    fn compute(
        &self,
        model: &mut Model,
        decl: &EncodingDecl,
        images: &[(&str, &CpuTensor<f32>)],
        texts: &[(&str, &[String])],
        missing: &[usize],
    ) -> Result<Named> {
        let sub_images: Vec<(&str, CpuTensor<f32>)> = images
            .iter()
            .map(|(role, img)| {
                let mut shape = img.shape.clone();
                shape[0] = missing.len() as i64;
                (*role, CpuTensor::new(shape, missing.iter().flat_map(|&i| row(img, i)).copied().collect()))
            })
            .collect();
        let sub_texts: Vec<(&str, Vec<String>)> =
            texts.iter().map(|(name, t)| (*name, missing.iter().map(|&i| t[i].clone()).collect())).collect();
        let views: Vec<(&str, TensorView)> = sub_images.iter().map(|(r, t)| (*r, t.view())).collect();
        let text_batches: Vec<TextBatch<'_>> = sub_texts.iter().map(|(n, t)| (*n, t.as_slice())).collect();
        let computed = model.encode(decl.name.as_str(), &views, &text_batches)?;
        let outs: Named = computed
            .0
            .iter()
            .map(|(name, t)| CpuTensor::<f32>::from_managed(t, name).map(|c| (name.clone(), c)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.plugin_error(decl, e.message.to_string()))?;
        for (name, t) in &outs {
            if t.shape.first().copied() != Some(missing.len() as i64) {
                return Err(self.plugin_error(
                    decl,
                    format!("output `{name}` has shape {:?}, expected {} rows", t.shape, missing.len()),
                ));
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

/// Row `i` of a batch tensor.
fn row(t: &CpuTensor<f32>, i: usize) -> &[f32] {
    let per = t.numel() / t.shape[0].max(1) as usize;
    &t.data[i * per..(i + 1) * per]
}

/// The suffix that marks an output's mask (see [`likeness_abi::EncodingDecl`]).
const MASK: &str = "_mask";

/// Sample `k` of an encoding's outputs (batch dimension 1). A variable-length output `x` (one
/// with an `x_mask` `[n, L]`) keeps its real positions only, and `x_mask` as many ones: the
/// entry does not depend on how long the batch it was computed in happened to be.
fn entry_of(outs: &Named, k: usize) -> std::result::Result<Named, String> {
    // (x, its real positions in row k) for every variable-length output x.
    let mut lens: Vec<(&str, i64)> = Vec::new();
    for (name, mask) in outs {
        let Some(x) = name.strip_suffix(MASK) else { continue };
        let Some((_, xt)) = outs.iter().find(|(n, _)| n == x) else { continue };
        if mask.shape.len() != 2 || xt.shape.len() < 2 || xt.shape[1] != mask.shape[1] {
            return Err(format!(
                "`{name}` must be [n, L] with `{x}` [n, L, …], got {:?} and {:?}",
                mask.shape, xt.shape
            ));
        }
        let m = row(mask, k);
        let len = m.iter().take_while(|&&v| v != 0.0).count();
        if m[len..].iter().any(|&v| v != 0.0) {
            return Err(format!("`{name}` row {k} is not real positions first, then padding: {m:?}"));
        }
        lens.push((x, len as i64));
    }
    let mut out = Named::new();
    for (name, t) in outs {
        let x = name.strip_suffix(MASK).unwrap_or(name);
        let mut shape = t.shape.clone();
        shape[0] = 1;
        let mut data = row(t, k);
        if let Some(&(_, len)) = lens.iter().find(|(n, _)| *n == x) {
            // Row-major: the first `len` positions of dimension 1 are a prefix of the row.
            let per_position: i64 = t.shape[2..].iter().product();
            shape[1] = len;
            data = &data[..(len * per_position) as usize];
        }
        out.push((name.clone(), CpuTensor::new(shape, data.to_vec())));
    }
    Ok(out)
}

/// Concatenates per-sample entries (batch dimension 1) along dimension 0. A variable-length
/// output and its mask are zero-padded at the end of dimension 1 to the longest entry; every
/// other output must have one shape within the batch.
fn stack(entries: Vec<Named>) -> Result<Vec<(String, CpuTensor<f32>)>> {
    let Some(first) = entries.first() else { return Ok(Vec::new()) };
    let variable = |name: &str| {
        let x = name.strip_suffix(MASK).unwrap_or(name);
        first.iter().any(|(n, _)| n == x) && first.iter().any(|(n, _)| *n == format!("{x}{MASK}"))
    };
    let mut out: Vec<(String, CpuTensor<f32>)> = Vec::new();
    for (name, t0) in first {
        let mut rows: Vec<&CpuTensor<f32>> = Vec::with_capacity(entries.len());
        for e in &entries {
            let t = e
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| EngineError::Other(format!("encoding cache: an entry lacks `{name}`")))?;
            let same = if variable(name) {
                t.shape.len() == t0.shape.len() && t.shape[2..] == t0.shape[2..]
            } else {
                t.shape[1..] == t0.shape[1..]
            };
            if !same {
                return Err(EngineError::Other(format!(
                    "encoding cache: `{name}` has shapes {:?} and {:?} within one batch",
                    t0.shape, t.shape
                )));
            }
            rows.push(t);
        }
        let mut shape = t0.shape.clone();
        shape[0] = entries.len() as i64;
        if variable(name) {
            shape[1] = rows.iter().map(|t| t.shape[1]).max().unwrap_or(0);
        }
        let per: usize = shape[1..].iter().product::<i64>() as usize;
        let mut data = Vec::with_capacity(per * entries.len());
        for t in rows {
            // Real positions first, then zeros (a row-major [1, L, …] is its L positions in order).
            data.extend_from_slice(&t.data);
            data.resize(data.len() + per - t.data.len(), 0.0);
        }
        out.push((name.clone(), CpuTensor::new(shape, data)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[i64], data: &[f32]) -> CpuTensor<f32> {
        CpuTensor::new(shape.to_vec(), data.to_vec())
    }

    /// Issue 17: a batch's variable-length encoding (`prompt_embeds` with `prompt_embeds_mask`,
    /// padded to the longest of the batch it was computed in) is stored per sample with its real
    /// positions only, and a batch of entries is padded again to its own longest, with the mask.
    #[test]
    fn issue_17_variable_length_entries_are_trimmed_and_padded_with_their_mask() {
        // Two samples, L = 3 positions of 2 values; sample 0 has 1 real position, sample 1 has 3.
        let outs: Named = vec![
            ("prompt_embeds".into(), t(&[2, 3, 2], &[1., 2., 0., 0., 0., 0., 3., 4., 5., 6., 7., 8.])),
            ("prompt_embeds_mask".into(), t(&[2, 3], &[1., 0., 0., 1., 1., 1.])),
            ("latents".into(), t(&[2, 1], &[9., 10.])),
        ];
        let a = entry_of(&outs, 0).unwrap();
        assert_eq!(a[0].1.shape, vec![1, 1, 2]);
        assert_eq!(a[0].1.data, vec![1., 2.]);
        assert_eq!(a[1].1.shape, vec![1, 1]);
        assert_eq!(a[2].1.data, vec![9.]);
        let b = entry_of(&outs, 1).unwrap();
        assert_eq!(b[0].1.shape, vec![1, 3, 2]);
        // Stacked in the other order: padded to 3 positions, the mask marks the padding.
        let s = stack(vec![b.clone(), a.clone()]).unwrap();
        assert_eq!(s[0].1.shape, vec![2, 3, 2]);
        assert_eq!(s[0].1.data, vec![3., 4., 5., 6., 7., 8., 1., 2., 0., 0., 0., 0.]);
        assert_eq!(s[1].1.data, vec![1., 1., 1., 1., 0., 0.]);
        assert_eq!(s[2].1.data, vec![10., 9.]);
        // A batch of one: no padding at all.
        let one = stack(vec![a]).unwrap();
        assert_eq!(one[0].1.shape, vec![1, 1, 2]);
        // A fixed-size output of two shapes is refused, and so is a mask that is not a prefix.
        let bad = vec![
            vec![("latents".to_string(), t(&[1, 2], &[1., 2.]))],
            vec![("latents".to_string(), t(&[1, 1], &[1.]))],
        ];
        assert!(stack(bad).unwrap_err().to_string().contains("`latents` has shapes"));
        let holes: Named = vec![("x".into(), t(&[1, 2, 1], &[1., 2.])), ("x_mask".into(), t(&[1, 2], &[0., 1.]))];
        assert!(entry_of(&holes, 0).unwrap_err().contains("real positions first"));
    }
}
