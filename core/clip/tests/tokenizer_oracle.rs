//! Token ids identical to `open_clip.tokenize` (open_clip_torch 3.3.0) on the seed texts and
//! 1,200 generated strings (tests/python/clip_oracle.py). Exact equality: ids are integers, and
//! every step (ftfy subset, html unescape, lower, regex split, BPE) is deterministic.
use likeness_clip::{ClipTokenizer, Padding, EOT_ID, SOT_ID};
use likeness_sdk::testing;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const VOCAB: &str = "reference/open_clip-3.3.0/open_clip/bpe_simple_vocab_16e6.txt.gz";

#[test]
fn ids_match_open_clip_tokenize() {
    let test = "ids_match_open_clip_tokenize";
    let Some(python) = testing::python_or_skip(test) else { return };
    let Some(vocab) = testing::data_path_or_skip(test, VOCAB) else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ids.json");
    let o = Command::new(python)
        .arg(repo().join("tests/python/clip_oracle.py"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let tok = ClipTokenizer::from_open_clip_vocab(&vocab).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 1000, "the oracle produced only {} cases", cases.len());
    let mut failures = Vec::new();
    let mut long = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<i64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let got = tok.encode(&[text], 77, Padding::Zero).unwrap();
        long += usize::from(want[76] == EOT_ID);
        if got.ids != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {:?}", got.ids));
        }
    }
    // The generator makes every 10th string over-long: the truncation path is really exercised.
    assert!(long >= 100, "only {long} over-long cases");
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}

/// (b): transformers' CLIPTokenizer (transformers 5: the `tokenizers` backend) on a folder
/// built from the same vocab, read both as vocab.json + merges.txt and as tokenizer.json.
/// Its preprocessing is NFC + lower only (no ftfy, no html unescape) and it pads with EOT.
#[test]
fn hf_folder_matches_transformers() {
    let test = "hf_folder_matches_transformers";
    let Some(python) = testing::python_or_skip(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ids.json");
    let o = Command::new(python)
        .arg(repo().join("tests/python/clip_oracle.py"))
        .arg("--out")
        .arg(&out)
        .arg("--hf-dir")
        .arg(dir.path())
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "clip_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    for sub in ["files", "saved"] {
        let tok = ClipTokenizer::from_hf_folder(&dir.path().join(sub)).unwrap();
        assert_eq!(tok.special_ids(), (SOT_ID, EOT_ID));
        let mut failures = Vec::new();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<i64> = case["hf_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let got = tok.encode(&[text], 77, Padding::Eot).unwrap();
            if got.ids != want {
                failures.push(format!("{text:?}\n  want {want:?}\n  got  {:?}", got.ids));
            }
        }
        assert!(
            failures.is_empty(),
            "{sub}: {} of {} differ:\n{}",
            failures.len(),
            cases.len(),
            failures[..failures.len().min(5)].join("\n")
        );
    }
}

#[test]
fn truncation_padding_and_eot_positions() {
    let test = "truncation_padding_and_eot_positions";
    let Some(vocab) = testing::data_path_or_skip(test, VOCAB) else { return };
    let tok = ClipTokenizer::from_open_clip_vocab(&vocab).unwrap();
    let long = "a ".repeat(200);
    let e = tok.encode(&["a photo", &long], 8, Padding::Eot).unwrap();
    assert_eq!(e.ids[0], SOT_ID);
    assert_eq!(e.eot_positions, vec![3, 7]);
    assert_eq!(&e.ids[3..8], &[EOT_ID; 5], "EOT padding");
    assert_eq!(e.ids[15], EOT_ID, "truncation keeps EOT last");
    let z = tok.encode(&["a photo"], 8, Padding::Zero).unwrap();
    assert_eq!(&z.ids[4..8], &[0; 4]);
    assert!(tok.encode(&["x"], 1, Padding::Zero).unwrap_err().to_string().contains("context_length 1"));
}

#[test]
fn bad_vocab_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vocab.txt.gz");
    std::fs::write(&p, b"not gzip").unwrap();
    let msg = ClipTokenizer::from_open_clip_vocab(&p).err().unwrap().to_string();
    assert!(msg.contains("vocab.txt.gz") && msg.contains("Fix"), "{msg}");
    let missing = dir.path().join("missing.gz");
    let msg = ClipTokenizer::from_open_clip_vocab(&missing).err().unwrap().to_string();
    assert!(msg.contains("missing.gz"), "{msg}");
}
