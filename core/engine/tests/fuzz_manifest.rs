//! Fuzzing `plugin.toml` parsing (`Manifest::parse` / `Manifest::read`): random text, random
//! edits of a valid manifest, and manifests assembled from hostile field values. None may
//! panic; whatever parses names a library inside the manifest's own folder; a huge file is
//! refused after reading at most `Manifest::MAX_BYTES` (TOML has no length fields: the only
//! untrusted length is the file's own).

use std::path::{Component, Path};

use likeness_engine::plugins::Manifest;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config(cases: u32) -> Config {
    let cases = std::env::var("LIKENESS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    let seed = std::env::var("LIKENESS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_f022);
    Config { cases, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..Config::default() }
}

const VALID: &str = "[plugin]\nid = \"pixel\"\nkind = \"loss\"          # model | metric | loss\nversion = \"0.1.0\"\nabi = \"1.0\"\nlibrary = \"liblikeness_plugin_loss_pixel.so\"\nsummary = \"L1 / MSE / SSIM pixel losses — with analytic gradients\"\n[requires]\nlibtorch = \"2.13.0\"\n";

/// Parses `text` as `/plugins/x/plugin.toml`: no panic, and an accepted manifest's library lies
/// inside `/plugins/x` (no root, no `..`).
fn check(text: &str) {
    let dir = Path::new("/plugins/x");
    if let Ok(m) = Manifest::parse(text, &dir.join("plugin.toml")) {
        let rel = m
            .library
            .strip_prefix(dir)
            .unwrap_or_else(|_| panic!("library {} escapes {}:\n{text}", m.library.display(), dir.display()));
        assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
            "library {} escapes {}:\n{text}",
            m.library.display(),
            dir.display()
        );
    }
}

fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/usr/lib/x86_64-linux-gnu/libm.so.6".to_string()),
        Just("../../../lib/libc.so.6".to_string()),
        Just("a/../../b.so".to_string()),
        Just("./lib.so".to_string()),
        Just("sub/dir/lib.so".to_string()),
        Just("".to_string()),
        Just("..".to_string()),
        Just("\\u0000lib.so".to_string()),
        Just("18446744073709551616.4294967296".to_string()),
        Just("1.99999999999999999999".to_string()),
        Just("1.0".to_string()),
        Just("\\\\server\\share\\x.dll".to_string()),
        "[a-z0-9./_-]{0,12}",
        "\\PC{0,8}",
    ]
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn random_text(text in "\\PC{0,200}") {
        check(&text);
    }

    #[test]
    fn random_bytes_as_text(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_edits_of_a_valid_manifest(edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, "\\PC{0,4}"), 1..6)) {
        let mut s = VALID.to_string();
        for (at, how, with) in edits {
            let mut i = at.index(s.len() + 1);
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            match how {
                0 => s.insert_str(i, &with),
                1 => s.truncate(i),
                2 => {
                    let e = (i + with.len().max(1)).min(s.len());
                    let e = (e..=s.len()).find(|&e| s.is_char_boundary(e)).unwrap_or(s.len());
                    s.replace_range(i..e, "");
                }
                _ => s.insert_str(i, ["\"", "'", "\n", "[", "]", "=", "\"\"\"", "#", "\\"][with.len() % 9]),
            }
        }
        check(&s);
    }

    #[test]
    fn hostile_field_values(id in hostile_value(), kind in hostile_value(), version in hostile_value(), abi in hostile_value(), library in hostile_value(), summary in hostile_value()) {
        let text = format!(
            "[plugin]\nid = \"{id}\"\nkind = \"{kind}\"\nversion = \"{version}\"\nabi = \"{abi}\"\nlibrary = \"{library}\"\nsummary = \"{summary}\"\n"
        );
        check(&text);
        check(&text.replace("\"", "'"));
    }
}

#[test]
fn the_valid_manifest_parses() {
    let m = Manifest::parse(VALID, Path::new("/plugins/x/plugin.toml")).unwrap();
    assert_eq!((m.id.as_str(), m.version.as_str()), ("pixel", "0.1.0"));
    assert_eq!(m.library, Path::new("/plugins/x/liblikeness_plugin_loss_pixel.so"));
}

/// A `plugin.toml` larger than the limit, or one that is a symlink to `/dev/zero` (endless),
/// is refused after reading at most `Manifest::MAX_BYTES + 1` bytes.
#[test]
fn huge_manifest_files_are_refused_without_reading_them_whole() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big/plugin.toml");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    let mut text = VALID.to_string();
    text.push_str(&"# padding\n".repeat((Manifest::MAX_BYTES / 10) as usize + 1));
    std::fs::write(&big, &text).unwrap();
    let e = Manifest::read(&big).unwrap_err().to_string();
    assert!(e.contains("plugin.toml") && e.contains("larger than 64 KiB"), "{e}");
    #[cfg(unix)]
    {
        let zero = dir.path().join("zero/plugin.toml");
        std::fs::create_dir_all(zero.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let t = std::time::Instant::now();
        let e = Manifest::read(&zero).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        assert!(t.elapsed().as_secs() < 5);
    }
    // Not UTF-8: a manifest error, not a panic.
    let bin = dir.path().join("bin/plugin.toml");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, b"[plugin]\nid = \"\xff\xfe\"\n").unwrap();
    assert!(Manifest::read(&bin).unwrap_err().to_string().contains("not UTF-8"));
}
