//! open_clip's `SimpleTokenizer` (open_clip 3.3.0, `clean="lower"`): the cleaning, the
//! pre-tokenizer pattern, the byte-to-unicode table, the vocab order (bytes, bytes+`</w>`,
//! merges, specials) and the `tokenize` truncation are ours; the BPE merges are Hugging Face's
//! `tokenizers` crate's `BPE` model (`end_of_word_suffix = "</w>"`), fed one pre-token at a time.
//!
//! Why not the whole `tokenizers` pipeline (its Split pre-tokenizer and added special tokens):
//! added tokens are cut out of the text before the split wherever they occur, while open_clip
//! only recognises `<start_of_text>` / `<end_of_text>` where its regex alternation reaches them
//! (after punctuation the `[^\s\p{L}\p{N}]+` branch has already taken the `<`). On the 1,934
//! oracle strings the full pipeline differed on 27, e.g. `"✨ ^<start_of_text> "`: open_clip
//! `[3531, 61, 283, 1572, 318, 539, 318, 4160, 285]`, the pipeline `[3531, 317, 49406]`. With our
//! split in front of its BPE model all 1,934 agree.
use crate::{fix_text, ClipError, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use unicode_normalization::UnicodeNormalization;

/// `<start_of_text>` in open_clip's vocab (49408 entries; the two specials come last).
pub const SOT_ID: i64 = 49406;
/// `<end_of_text>`.
pub const EOT_ID: i64 = 49407;
/// open_clip keeps `lines[1 : 49152 - 256 - 2 + 1]` of the vocab file as merges.
const N_MERGES: usize = 49152 - 256 - 2;

/// What fills a row after `<end_of_text>`: open_clip pads with 0, transformers' CLIPTokenizer
/// (and so SD1.5 pipelines) with `<end_of_text>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    Zero,
    Eot,
}

/// `[batch, context_length]` token ids (row-major) and, per row, the position of
/// `<end_of_text>` (where the text tower pools).
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub batch: usize,
    pub context_length: usize,
    pub eot_positions: Vec<usize>,
}

/// How text is cleaned before the split: open_clip's (ftfy subset, html unescape twice,
/// whitespace clean, lower) or transformers' CLIPTokenizer in transformers 5 (a `tokenizers`
/// backend: NFC, lower; whitespace never reaches a token either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preprocess {
    OpenClip,
    Transformers,
}

pub struct ClipTokenizer {
    byte_encoder: [char; 256],
    sot_id: i64,
    eot_id: i64,
    specials: [String; 2],
    preprocess: Preprocess,
    /// The `tokenizers` BPE model over the same vocab and merges (the merge loop).
    bpe: tokenizers::models::bpe::BPE,
    pattern: regex::Regex,
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the other bytes to
/// U+0100 upwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut n = 0u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1 is valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("U+0100.. is valid")
        };
    }
    table
}

impl ClipTokenizer {
    /// Builds vocab and merges from open_clip's `bpe_simple_vocab_16e6.txt.gz`.
    pub fn from_open_clip_vocab(path: &Path) -> Result<Self> {
        let io = |source| ClipError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file).read_to_string(&mut text).map_err(io)?;
        // Python's str.split('\n'): the header line is skipped, then exactly N_MERGES lines.
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < N_MERGES + 1 {
            return Err(ClipError::BadVocab {
                path: path.to_path_buf(),
                what: format!("{} lines, need at least {} (header + merges)", lines.len(), N_MERGES + 1),
            });
        }
        let mut merges = Vec::with_capacity(N_MERGES);
        for (i, line) in lines[1..=N_MERGES].iter().enumerate() {
            let mut it = line.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(ClipError::BadVocab {
                        path: path.to_path_buf(),
                        what: format!("line {} is {line:?}, expected two space-separated symbols", i + 2),
                    })
                }
            }
        }
        Self::from_merges(merges).map_err(|what| ClipError::BadVocab { path: path.to_path_buf(), what })
    }

    /// A transformers tokenizer folder (SD1.5's `tokenizer/`): `tokenizer.json` when present,
    /// else `vocab.json` + `merges.txt`; specials `<|startoftext|>` / `<|endoftext|>`.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| ClipError::Io { path, source })
        };
        let bad = |name: &str, what: String| ClipError::BadVocab { path: dir.join(name), what };
        let (vocab, merges): (serde_json::Value, Vec<(String, String)>) = if dir.join("tokenizer.json").is_file() {
            let json: serde_json::Value = serde_json::from_str(&read("tokenizer.json")?)
                .map_err(|e| bad("tokenizer.json", format!("not JSON: {e}")))?;
            let model = &json["model"];
            let merges = model["merges"]
                .as_array()
                .ok_or_else(|| bad("tokenizer.json", "field `model.merges` is missing".into()))?
                .iter()
                .map(|m| match (m.as_str(), m.as_array()) {
                    (Some(line), _) => split_merge(line),
                    (_, Some(pair)) if pair.len() == 2 => {
                        Some((pair[0].as_str()?.to_string(), pair[1].as_str()?.to_string()))
                    }
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("tokenizer.json", "`model.merges` holds an entry that is not a pair".into()))?;
            (model["vocab"].clone(), merges)
        } else {
            let vocab =
                serde_json::from_str(&read("vocab.json")?).map_err(|e| bad("vocab.json", format!("not JSON: {e}")))?;
            let text = read("merges.txt")?;
            let mut merges = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                    continue;
                }
                merges.push(split_merge(line).ok_or_else(|| bad("merges.txt", format!("line {} is {line:?}", i + 1)))?);
            }
            (vocab, merges)
        };
        let file = if dir.join("tokenizer.json").is_file() { "tokenizer.json" } else { "vocab.json" };
        let map = vocab.as_object().ok_or_else(|| bad(file, "the vocab is not a {token: id} object".into()))?;
        let mut encoder = HashMap::with_capacity(map.len());
        for (k, v) in map {
            let id = v.as_i64().ok_or_else(|| bad(file, format!("vocab entry {k:?} has no integer id")))?;
            encoder.insert(k.clone(), id);
        }
        let specials = ["<|startoftext|>".to_string(), "<|endoftext|>".to_string()];
        let id = |t: &str| encoder.get(t).copied().ok_or_else(|| bad(file, format!("the vocab lacks {t}")));
        let (sot_id, eot_id) = (id(&specials[0])?, id(&specials[1])?);
        Self::build(encoder, merges, specials, sot_id, eot_id, Preprocess::Transformers).map_err(|what| bad(file, what))
    }

    fn from_merges(merges: Vec<(String, String)>) -> std::result::Result<Self, String> {
        let byte_encoder = bytes_to_unicode();
        // open_clip orders the base alphabet as bytes_to_unicode().values(), i.e. dict insertion
        // order: the printable bytes first (they map to themselves, < U+0100), then the rest.
        let mut base: Vec<char> = byte_encoder.to_vec();
        base.sort_by_key(|&c| (c as u32 >= 0x100, c as u32));
        let mut vocab: Vec<String> = base.iter().map(|c| c.to_string()).collect();
        vocab.extend(base.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        // Later duplicates win in Python's dict(zip(vocab, range)); keep that.
        let encoder = vocab.into_iter().enumerate().map(|(i, v)| (v, i as i64)).collect();
        let specials = ["<start_of_text>".to_string(), "<end_of_text>".to_string()];
        Self::build(encoder, merges, specials, SOT_ID, EOT_ID, Preprocess::OpenClip)
    }

    fn build(
        encoder: HashMap<String, i64>,
        merges: Vec<(String, String)>,
        specials: [String; 2],
        sot_id: i64,
        eot_id: i64,
        preprocess: Preprocess,
    ) -> std::result::Result<Self, String> {
        // Every pre-token is byte-mapped, so each byte symbol (alone and word-final) must exist:
        // then the BPE model cannot fail on any input.
        for c in bytes_to_unicode() {
            for sym in [c.to_string(), format!("{c}</w>")] {
                if !encoder.contains_key(&sym) {
                    return Err(format!("the vocab lacks the byte symbol {sym:?}"));
                }
            }
        }
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (k, &v) in &encoder {
            let id = u32::try_from(v).map_err(|_| format!("vocab id {v} of {k:?} is not in 0..2^32"))?;
            vocab.insert(k.clone(), id);
        }
        let bpe = tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| format!("the merges do not fit the vocab: {e}"))?;
        let pattern = regex::Regex::new(&format!(
            r"(?i){}|{}|'s|'t|'re|'ve|'m|'ll|'d|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}]+",
            regex::escape(&specials[0]),
            regex::escape(&specials[1])
        ))
        .expect("static pattern compiles");
        Ok(Self { byte_encoder: bytes_to_unicode(), sot_id, eot_id, specials, preprocess, bpe, pattern })
    }

    /// The ids of the start / end specials (49406 / 49407 in both shipped vocabs).
    pub fn special_ids(&self) -> (i64, i64) {
        (self.sot_id, self.eot_id)
    }

    fn bpe(&self, token: &str, out: &mut Vec<i64>) {
        use tokenizers::Model;
        // `build` checked that every byte symbol is in the vocab, and merges only produce vocab
        // entries (the builder checks that too), so tokenizing a byte-mapped piece cannot fail.
        let toks = self.bpe.tokenize(token).expect("BPE over a vocab holding every byte symbol");
        out.extend(toks.into_iter().map(|t| i64::from(t.id)));
    }

    /// open_clip's `SimpleTokenizer.encode` (no SOT/EOT).
    pub fn encode_one(&self, text: &str) -> Vec<i64> {
        let text = match self.preprocess {
            Preprocess::OpenClip => clean_lower(text),
            // tokenizers' NFC + Replace(\s+, " ") + Lowercase; the split drops whitespace.
            Preprocess::Transformers => text.nfc().collect::<String>().to_lowercase(),
        };
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&text) {
            let tok = m.as_str();
            match tok {
                t if t == self.specials[0] => ids.push(self.sot_id),
                t if t == self.specials[1] => ids.push(self.eot_id),
                _ => {
                    let mapped: String = tok.bytes().map(|b| self.byte_encoder[b as usize]).collect();
                    self.bpe(&mapped, &mut ids);
                }
            }
        }
        ids
    }

    /// `open_clip.tokenize(texts, context_length)`: SOT + ids + EOT, cut to `context_length`
    /// with EOT forced into the last slot, then padded.
    pub fn encode(&self, texts: &[&str], context_length: usize, padding: Padding) -> Result<Encoded> {
        if context_length < 2 {
            return Err(ClipError::BadContextLength(context_length));
        }
        let (sot, eot) = (self.sot_id, self.eot_id);
        let pad = match padding {
            Padding::Zero => 0,
            Padding::Eot => eot,
        };
        let mut ids = vec![pad; texts.len() * context_length];
        let mut eot_positions = Vec::with_capacity(texts.len());
        for (row, text) in texts.iter().enumerate() {
            let mut toks = vec![sot];
            toks.extend(self.encode_one(text));
            toks.push(eot);
            if toks.len() > context_length {
                toks.truncate(context_length);
                toks[context_length - 1] = eot;
            }
            // The text tower pools at argmax(ids) in open_clip, i.e. the first EOT: the
            // appended one unless the text itself spelled <end_of_text>.
            eot_positions.push(toks.iter().position(|&t| t == eot).expect("EOT appended"));
            ids[row * context_length..row * context_length + toks.len()].copy_from_slice(&toks);
        }
        Ok(Encoded { ids, batch: texts.len(), context_length, eot_positions })
    }
}

fn split_merge(line: &str) -> Option<(String, String)> {
    let mut it = line.split(' ');
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}

/// open_clip's `whitespace_clean(basic_clean(text)).lower()`.
fn clean_lower(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    // Python's str.split() / re \s on str both use str.isspace; after fix_text removed
    // U+001C..U+001F the remaining set equals Rust's White_Space.
    let words: Vec<&str> = unescaped.split(char::is_whitespace).filter(|w| !w.is_empty()).collect();
    words.join(" ").to_lowercase()
}

/// The subset of Python's `html.unescape` handled: decimal/hex character references (with or
/// without `;`; 0 and out-of-range → U+FFFD) and the named entities amp, lt, gt, quot, nbsp,
/// copy, reg (with or without `;`, as HTML5's legacy names) and apos (with `;`). NOT handled:
/// other named entities, and references to U+0080..U+009F / non-characters (Python remaps or
/// drops them); those are left as written.
fn html_unescape(s: &str) -> String {
    const NAMED: &[(&str, &str)] = &[
        ("amp;", "&"),
        ("lt;", "<"),
        ("gt;", ">"),
        ("quot;", "\""),
        ("apos;", "'"),
        ("nbsp;", "\u{a0}"),
        ("copy;", "©"),
        ("reg;", "®"),
        ("amp", "&"),
        ("lt", "<"),
        ("gt", ">"),
        ("quot", "\""),
        ("nbsp", "\u{a0}"),
        ("copy", "©"),
        ("reg", "®"),
    ];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        if let Some((c, used)) = numeric_ref(after) {
            out.extend(c);
            rest = &after[used..];
            continue;
        }
        if after.starts_with('#') {
            out.push('&');
            rest = after;
            continue;
        }
        // Python: the run [^\t\n\f <&#;]{1,32};? is replaced whole when it is a known name,
        // else by its longest known prefix of >= 2 chars followed by the rest of the run.
        let stop = after.find(['\t', '\n', '\x0c', ' ', '<', '&', '#', ';']).unwrap_or(after.len());
        let run_end = after[..stop].char_indices().nth(32).map_or(stop, |(i, _)| i);
        let full_end = run_end + usize::from(after[run_end..].starts_with(';'));
        let lookup = |name: &str| NAMED.iter().find(|(n, _)| *n == name).map(|(_, rep)| *rep);
        let hit = if run_end == 0 {
            None
        } else if let Some(rep) = lookup(&after[..full_end]) {
            Some((rep, full_end))
        } else {
            (2..full_end).rev().filter(|&x| after.is_char_boundary(x)).find_map(|x| lookup(&after[..x]).map(|r| (r, x)))
        };
        match hit {
            Some((rep, used)) => {
                out.push_str(rep);
                rest = &after[used..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `#123;` / `#x7b;` (the `;` optional) → the char (none: Python drops invalid code points)
/// and the bytes consumed.
fn numeric_ref(after: &str) -> Option<(Option<char>, usize)> {
    let body = after.strip_prefix('#')?;
    let (digits, radix, prefix) = match body.strip_prefix(['x', 'X']) {
        Some(hex) => (hex, 16, 2),
        None => (body, 10, 1),
    };
    let n = digits.find(|c: char| !c.is_digit(radix)).unwrap_or(digits.len());
    if n == 0 {
        return None;
    }
    let value = u32::from_str_radix(&digits[..n], radix).unwrap_or(u32::MAX);
    let used = prefix + n + usize::from(digits[n..].starts_with(';'));
    let c = match value {
        0 => Some('\u{FFFD}'),
        0x0D => Some('\r'),
        0x80..=0x9F => return None,
        0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF => None,
        v if v & 0xFFFE == 0xFFFE && v <= 0x10FFFF => None,
        v => Some(char::from_u32(v).unwrap_or('\u{FFFD}')),
    };
    Some((c, used))
}
