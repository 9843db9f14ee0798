use std::collections::HashMap;
use std::path::Path;

use super::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A small diffusers-shaped folder stored as `org/model` at COMMIT (refs/main), and at OTHER
/// under the tag `v2`.
fn cache() -> (tempfile::TempDir, CacheRoot) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for (f, text) in [("model_index.json", "{}"), ("unet/config.json", "{\"a\":1}"), ("unet/w.safetensors", "w")] {
        std::fs::create_dir_all(src.join(f).parent().unwrap()).unwrap();
        std::fs::write(src.join(f), text).unwrap();
    }
    let hub = t.path().join("hub");
    testing::store_snapshot(&hub, "org/model", "main", COMMIT, &src).unwrap();
    testing::store_snapshot(&hub, "org/model", "v2", OTHER, &src).unwrap();
    (t, CacheRoot::at(hub))
}

fn cached(r: Pretrained) -> Resolved {
    match r {
        Pretrained::Cached(r) => r,
        other => panic!("not resolved from the cache: {other:?}"),
    }
}

#[test]
fn ids_parse_as_huggingface_hub_validates_them() {
    let p = |s: &str| ModelRef::parse(s).map(|m| (m.repo_id, m.subpath));
    assert_eq!(p("runwayml/stable-diffusion-v1-5"), Some(("runwayml/stable-diffusion-v1-5".into(), None)));
    assert_eq!(p("black-forest-labs/FLUX.1-dev/"), Some(("black-forest-labs/FLUX.1-dev".into(), None)));
    assert_eq!(p("org/name/unet"), Some(("org/name".into(), Some("unet".into()))));
    assert_eq!(p("org/name/a/b.safetensors"), Some(("org/name".into(), Some("a/b.safetensors".into()))));
    for not_id in
        ["sd15", "/models/sd15", "./org/name", "../org/name", "~/org/name", "org--x/name", "org/na..me", "-org/name"]
    {
        assert_eq!(p(not_id), None, "{not_id}");
    }
    for not_id in
        ["org/name.git", "org/name.", "C:/org/name", "org\\name", "org//name", "org/name/../x", "org/name/./x"]
    {
        assert_eq!(p(not_id), None, "{not_id}");
    }
    assert_eq!(p(&format!("o/{}", "n".repeat(95))), None, "over 96 characters");
    let m = ModelRef::parse("runwayml/stable-diffusion-v1-5").unwrap();
    assert_eq!(m.folder_name(), "models--runwayml--stable-diffusion-v1-5");
    assert_eq!(m.download_command("main"), "huggingface-cli download runwayml/stable-diffusion-v1-5");
    assert_eq!(m.download_command("fp16"), "huggingface-cli download runwayml/stable-diffusion-v1-5 --revision fp16");
}

#[test]
fn the_cache_root_follows_huggingface_hubs_order() {
    let root = |vars: &[(&str, &str)]| {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CacheRoot::from_vars(|k| m.get(k).cloned())
    };
    let all = [
        ("HOME", "/home/u"),
        ("HF_HUB_CACHE", "/a"),
        ("HUGGINGFACE_HUB_CACHE", "/b"),
        ("HF_HOME", "/c"),
        ("XDG_CACHE_HOME", "/d"),
    ];
    let dirs: Vec<_> = root(&all).candidates.into_iter().map(|c| c.0).collect();
    let want = ["/a", "/b", "/c/hub", "/d/huggingface/hub", "/home/u/.cache/huggingface/hub"];
    assert_eq!(dirs, want.iter().map(PathBuf::from).collect::<Vec<_>>());
    for n in 1..all.len() {
        assert_eq!(root(&[all[0]].iter().chain(&all[n..]).copied().collect::<Vec<_>>()).dir, Path::new(want[n - 1]));
    }
    assert_eq!(root(&[("HOME", "/home/u")]).dir, Path::new("/home/u/.cache/huggingface/hub"));
    assert_eq!(root(&[("HOME", "/home/u"), ("HF_HOME", "")]).dir, Path::new("/home/u/.cache/huggingface/hub"));
    // expanduser / expandvars, as huggingface_hub applies them.
    let r = root(&[("HOME", "/home/u"), ("HF_HOME", "~/hf"), ("SCRATCH", "/s")]);
    assert_eq!(r.dir, Path::new("/home/u/hf/hub"));
    assert_eq!(r.chosen_by(), "HF_HOME=~/hf (+ /hub)");
    assert_eq!(
        root(&[("HF_HUB_CACHE", "$SCRATCH/${SCRATCH}/$NOPE/x$"), ("SCRATCH", "/s")]).dir,
        Path::new("/s//s/$NOPE/x$")
    );
}

#[test]
fn an_id_resolves_to_its_snapshot_through_refs_main() {
    let (_t, root) = cache();
    let r = cached(resolve_with("org/model", None, &root).unwrap());
    let snap = root.dir.join("models--org--model/snapshots").join(COMMIT);
    assert_eq!((r.commit.as_str(), r.revision.as_str()), (COMMIT, "main"));
    assert_eq!((&r.snapshot, &r.path), (&snap, &snap));
    // The snapshot's files are symlinks into blobs/ that read as the files.
    let link = snap.join("unet/config.json");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert!(std::fs::canonicalize(&link)
        .unwrap()
        .starts_with(std::fs::canonicalize(root.dir.join("models--org--model/blobs")).unwrap()));
    assert_eq!(std::fs::read_to_string(r.path.join("unet/config.json")).unwrap(), "{\"a\":1}");
    // A tag, a commit hash, a sub-folder and a single file.
    assert_eq!(cached(resolve_with("org/model", Some("v2"), &root).unwrap()).commit, OTHER);
    assert_eq!(cached(resolve_with("org/model", Some(OTHER), &root).unwrap()).commit, OTHER);
    assert_eq!(cached(resolve_with("org/model/unet", None, &root).unwrap()).path, snap.join("unet"));
    let f = cached(resolve_with("org/model/unet/w.safetensors", None, &root).unwrap());
    // The snapshot's name, not the blob's: loaders look at the extension.
    assert_eq!(f.path, snap.join("unet/w.safetensors"));
}

#[test]
fn an_existing_path_or_a_non_id_is_a_path() {
    let (t, root) = cache();
    let local = t.path().join("org/model");
    std::fs::create_dir_all(&local).unwrap();
    let s = local.to_str().unwrap();
    assert_eq!(resolve_with(s, None, &root).unwrap(), Pretrained::Path(local.clone()));
    for v in ["sd15", "/nonexistent/sd15", "./models/x"] {
        assert_eq!(resolve_with(v, None, &root).unwrap(), Pretrained::Path(v.into()), "{v}");
    }
}

#[test]
fn a_missing_id_lists_every_place_looked_and_the_command() {
    let (t, root) = cache();
    let other = t.path().join("other-hub");
    testing::store_snapshot(&other, "runwayml/stable-diffusion-v1-5", "main", COMMIT, &t.path().join("src")).unwrap();
    let root = CacheRoot {
        dir: root.dir.clone(),
        candidates: vec![(root.dir.clone(), "HF_HOME=/x (+ /hub)".into()), (other.clone(), "the default".into())],
    };
    let e = resolve_with("runwayml/stable-diffusion-v1-5", None, &root).unwrap_err();
    assert!(matches!(e, HfCacheError::NotCached { .. }), "{e:?}");
    let m = e.to_string();
    for want in [
        "`runwayml/stable-diffusion-v1-5` is not an existing path",
        "never downloaded",
        "(as a local path): does not exist",
        &format!(
            "{}: does not exist (the hub cache, from HF_HOME=/x (+ /hub))",
            root.dir.join("models--runwayml--stable-diffusion-v1-5").display()
        ),
        &format!("{}: holds it", other.join("models--runwayml--stable-diffusion-v1-5").display()),
        "huggingface-cli download runwayml/stable-diffusion-v1-5\n",
        &format!("set HF_HUB_CACHE={}", other.display()),
    ] {
        assert!(m.contains(want), "no {want:?} in:\n{m}");
    }
}

#[test]
fn a_missing_ref_names_the_refs_and_snapshots_there() {
    let (_t, root) = cache();
    let e = resolve_with("org/model", Some("fp16"), &root).unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, HfCacheError::MissingRef { .. }), "{e:?}");
    for want in
        ["revision `fp16`", "refs/fp16 does not exist", "cached refs: main, v2", COMMIT, OTHER, "--revision fp16"]
    {
        assert!(m.contains(want), "no {want:?} in:\n{m}");
    }
    // A commit hash with no snapshot, a bad revision, a missing sub-path.
    let none = "1111111111111111111111111111111111111111";
    let m = resolve_with("org/model", Some(none), &root).unwrap_err().to_string();
    assert!(m.contains(&format!("commit {none}")) && m.contains("snapshot") && m.contains(COMMIT), "{m}");
    let e = resolve_with("org/model", Some("../../x"), &root).unwrap_err();
    assert!(matches!(e, HfCacheError::BadRevision { .. }), "{e:?}");
    let m = resolve_with("org/model/vae", None, &root).unwrap_err().to_string();
    assert!(m.contains("has no `vae`") && m.contains("model_index.json, unet"), "{m}");
    // refs/main pointing at a snapshot that is gone.
    std::fs::remove_dir_all(root.dir.join("models--org--model/snapshots").join(COMMIT)).unwrap();
    let e = resolve_with("org/model", None, &root).unwrap_err();
    assert!(matches!(e, HfCacheError::MissingSnapshot { .. }), "{e:?}");
}

#[test]
fn a_broken_symlink_names_the_file_and_the_fix() {
    let (_t, root) = cache();
    let repo = root.dir.join("models--org--model");
    let target = std::fs::canonicalize(repo.join("snapshots").join(COMMIT).join("unet/w.safetensors")).unwrap();
    std::fs::remove_file(&target).unwrap();
    let e = resolve_with("org/model", None, &root).unwrap_err();
    assert!(matches!(e, HfCacheError::BrokenSymlink { .. }), "{e:?}");
    let m = e.to_string();
    for want in
        ["unet/w.safetensors is a symlink to", "which does not exist", "cp -a", "huggingface-cli download org/model"]
    {
        assert!(m.contains(want), "no {want:?} in:\n{m}");
    }
    // Only what was asked for is checked: the sub-folder without the broken file resolves.
    assert!(resolve_with("org/model/model_index.json", None, &root).is_ok());
    assert!(resolve_with("org/model/unet", None, &root).is_err());
}

#[test]
fn a_tree_listing_with_files_the_snapshot_lacks_is_incomplete() {
    let (_t, root) = cache();
    let repo = root.dir.join("models--org--model");
    std::fs::create_dir_all(repo.join("trees")).unwrap();
    let listing = serde_json::json!({"format_version": 1, "files": {
        "model_index.json": {"size": 2, "blob_id": "x"}, "vae/config.json": {"size": 2, "blob_id": "y"}}});
    std::fs::write(repo.join("trees").join(format!("{COMMIT}.json")), listing.to_string()).unwrap();
    let m = resolve_with("org/model", None, &root).unwrap_err().to_string();
    assert!(m.contains("lists files that") && m.contains("vae/config.json"), "{m}");
    assert!(resolve_with("org/model/unet", None, &root).is_ok(), "vae/ is not under unet/");
    // An unknown format is not read (huggingface_hub ignores it too).
    std::fs::write(repo.join("trees").join(format!("{COMMIT}.json")), "{\"format_version\": 2}").unwrap();
    assert!(resolve_with("org/model", None, &root).is_ok());
}
