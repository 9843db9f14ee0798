//! What a `plugin.toml` may claim, checked through the real `host` binary (issue 6, part 6).
//!
//! - `plugin.library` names a file inside the manifest's own folder: an absolute path (to a
//!   system C library) and a `../../..` escape are refused when the manifest is read, before
//!   any `dlopen`; a symlink whose target lies outside the folder is refused when the library
//!   would be opened. Symlinks that stay inside, and a plugin folder that is itself a symlink,
//!   are fine.
//! - The manifest's id, kind and version must equal the descriptor the library returns, and
//!   its `abi` the library's header (an older minor, as a rebuild leaves it, and a different
//!   summary are warnings: issue 14); each message names both values, the manifest and the fix.
//! - A library that does not `dlopen` says why (the system's own message).
//! - Every real plugin's manifest matches its library (`plugins check` passes on all of them).
//!
//! Each test stages what it needs in its own temporary `--plugin-dir`.

use std::path::{Path, PathBuf};

use likeness_tests::{built_or_skip, staged_plugins, staged_test_plugins, Dir, TestCommand};

/// Copies the staged plugin folder `id` to `<tmp>/plugins/<folder>`.
fn copy_plugin_as(dir: &Dir, id: &str, folder: &str) -> PathBuf {
    let src = [staged_plugins().join(id), staged_test_plugins().join(id)]
        .into_iter()
        .find(|p| p.join("plugin.toml").is_file())
        .unwrap_or_else(|| {
            panic!("plugin `{id}` is not staged in {}: run scripts/build.sh", staged_plugins().display())
        });
    let dest = dir.mkdir(Path::new("plugins").join(folder));
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
    dest
}

/// Rewrites one `key = "…"` line of `<folder>/plugin.toml`.
fn set_field(folder: &Path, key: &str, value: &str) -> PathBuf {
    let path = folder.join("plugin.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.split('=').next().map(str::trim) == Some(key) {
                found = true;
                format!("{key} = \"{value}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "{} has no `{key}` line", path.display());
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
    path
}

/// The value of `key = "…"` in a manifest.
fn field(folder: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(folder.join("plugin.toml")).unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().split('"').nth(1).unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("no `{key}` in {}", folder.display()))
}

fn host(dir: &Dir, args: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(dir.join("plugins")).args(args);
    t
}

/// The `FAIL` line of `plugins check` that starts with `prefix`.
fn fail_line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("FAIL  {prefix}")))
        .unwrap_or_else(|| panic!("no `FAIL  {prefix}` line in:\n{out}"))
}

fn system_libm() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("no libm.so.6 on this machine")
}

fn crafted(dir: &Dir, folder: &str, id: &str, library: &str) -> PathBuf {
    dir.create(
        Path::new("plugins").join(folder).join("plugin.toml"),
        format!("[plugin]\nid = \"{id}\"\nkind = \"loss\"\nversion = \"0.1.0\"\nabi = \"1.0\"\nlibrary = \"{library}\"\nsummary = \"crafted\"\n"),
    )
}

#[test]
fn issue_6_library_outside_the_manifest_folder_is_refused() {
    const T: &str = "issue_6_library_outside_the_manifest_folder_is_refused";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("manifest-escape");
    let libm = system_libm();
    let abs = crafted(&dir, "abs", "abs-libm", libm.to_str().unwrap());
    // From <tmp>/plugins/dotdot up to / and down to libm.
    let depth = dir.join("plugins/dotdot").components().count() - 1;
    let escape = format!("{}{}", "../".repeat(depth), libm.strip_prefix("/").unwrap().display());
    let dotdot = crafted(&dir, "dotdot", "dotdot-libm", &escape);
    // A symlink inside the folder that points at libm.
    let link_dir = dir.mkdir("plugins/link");
    std::os::unix::fs::symlink(&libm, link_dir.join("libm-link.so")).unwrap();
    let link = crafted(&dir, "link", "link-libm", "libm-link.so");
    // Fine: pixel's library behind a symlink in its own folder.
    let pixel = copy_plugin_as(&dir, "pixel", "pixel-alias");
    let lib = field(&pixel, "library");
    std::os::unix::fs::symlink(&lib, pixel.join("libalias.so")).unwrap();
    set_field(&pixel, "library", "libalias.so");

    let o = host(&dir, &["plugins", "check"]).output();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{out}");
    for (manifest, what) in [(&abs, "an absolute path"), (&dotdot, "leaves the manifest's folder")] {
        let line = fail_line(&out, manifest.to_str().unwrap());
        assert!(line.contains("`plugin.library`") && line.contains(what), "{line}");
        assert!(
            line.contains("copy the library there") && line.contains("library = \"libm.so.6\""),
            "says the fix: {line}"
        );
    }
    let line = fail_line(&out, "link-libm:");
    assert!(line.contains(link.to_str().unwrap()) && line.contains("outside the manifest's folder"), "{line}");
    assert!(line.contains(&libm.canonicalize().unwrap().display().to_string()), "names where it leads: {line}");
    assert!(!line.contains("is not a likeness plugin"), "the library must not have been opened: {line}");
    assert!(out.lines().any(|l| l.starts_with("ok    pixel ") && l.contains("libalias.so")), "{out}");
    assert!(out.contains("3 problem(s)"), "{out}");

    // Fine too: a plugin folder that is itself a symlink to a folder elsewhere.
    let elsewhere = Dir::new("manifest-elsewhere");
    let real = copy_plugin_as(&elsewhere, "pixel", "real-pixel");
    let linked = Dir::new("manifest-linked");
    std::os::unix::fs::symlink(&real, linked.mkdir("plugins").join("pixel")).unwrap();
    let out = host(&linked, &["plugins", "check"]).ok();
    assert!(out.lines().any(|l| l.starts_with("ok    pixel ")), "{out}");

    // `plugins list` reports the refused manifests and opens nothing.
    let list = host(&dir, &["plugins", "list"]).ok();
    assert!(list.lines().any(|l| l.contains(abs.to_str().unwrap()) && l.contains("absolute path")), "{list}");
}

/// An id, version or ABI-major difference, or a manifest ABI minor newer than the library's,
/// is an error; a different summary or an older manifest ABI minor (a plugin rebuilt against a
/// newer SDK) is a warning (issue 14). Each names both values, the manifest and the fix
/// `host plugins manifest LIB > plugin.toml`.
#[test]
fn issue_6_manifest_must_match_the_descriptor() {
    const T: &str = "issue_6_manifest_must_match_the_descriptor";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("manifest-descriptor");
    let staged = staged_plugins().join("pixel");
    let (version, summary) = (field(&staged, "version"), field(&staged, "summary"));
    let abi = field(&staged, "abi");
    let (major, minor) = abi.split_once('.').map(|(a, b)| (a.to_string(), b.parse::<u32>().unwrap())).unwrap();
    let variant = |folder: &str, key: &str, value: &str| {
        let f = copy_plugin_as(&dir, "pixel", folder);
        let m = set_field(&f, key, value);
        (f, m)
    };
    let newer = format!("{major}.{}", minor + 1);
    let other_major = format!("{}.0", major.parse::<u32>().unwrap() + 1);
    let mut errors = vec![
        (
            variant("v9", "version", "9.0.0"),
            vec!["version `0.1.0`".to_string(), "`9.0.0`".into(), "plugin.version".into()],
        ),
        (variant("id", "id", "not-pixel"), vec!["id `pixel`".into(), "`not-pixel`".into()]),
        (
            variant("newer", "abi", &newer),
            vec![format!("built for ABI {abi}"), format!("abi = \"{newer}\""), "plugin.abi".into()],
        ),
        (
            variant("major", "abi", &other_major),
            vec![format!("built for ABI {abi}"), format!("abi = \"{other_major}\"")],
        ),
    ];
    let mut warnings = vec![(
        variant("summary", "summary", "a summary the library does not have"),
        vec![
            format!("descriptor \"{summary}\""),
            "\"a summary the library does not have\"".into(),
            "plugin.summary".into(),
        ],
    )];
    if minor > 0 {
        let older = format!("{major}.{}", minor - 1);
        warnings.push((
            variant("older", "abi", &older),
            vec![format!("says abi = \"{older}\" but its library was built for ABI {abi}")],
        ));
    }

    // Each alone in a plugin dir of its own (several claim id `pixel`: the first found is used).
    let solo = |folder: &std::path::Path| {
        let solo = Dir::new("manifest-descriptor-solo");
        let dest = solo.mkdir("plugins/p");
        for e in std::fs::read_dir(folder).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
        }
        (solo, dest)
    };
    let fix = "host plugins manifest ";
    for ((folder, manifest), want) in errors.drain(..) {
        let (solo, dest) = solo(&folder);
        let id = field(&dest, "id");
        let out = host(&solo, &["plugins", "check"]).fails();
        let line = fail_line(&out, &format!("{id}:"));
        for w in want.iter().map(String::as_str).chain([fix]) {
            assert!(line.contains(w), "{} wants `{w}`: {line}", manifest.display());
        }
        assert!(line.contains(dest.join("plugin.toml").to_str().unwrap()), "names the manifest: {line}");
        let out = host(&solo, &["plugins", "inspect", &id]).fails();
        assert!(out.contains(want[0].as_str()), "{out}");
    }
    for ((folder, manifest), want) in warnings {
        let (solo, dest) = solo(&folder);
        let out = host(&solo, &["plugins", "check"]).ok();
        assert!(out.lines().any(|l| l.starts_with("ok    pixel ")), "{out}");
        let line = out.lines().find(|l| l.contains("WARN")).unwrap_or_else(|| panic!("no warning:\n{out}"));
        for w in want.iter().map(String::as_str).chain([fix, dest.join("plugin.toml").to_str().unwrap()]) {
            assert!(line.contains(w), "{} wants `{w}`: {line}", manifest.display());
        }
        host(&solo, &["plugins", "inspect", "pixel"]).ok();
    }
    assert_eq!(version, "0.1.0", "pixel's own manifest");
}

#[test]
fn issue_6_failed_dlopen_says_why() {
    const T: &str = "issue_6_failed_dlopen_says_why";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("dlopen-why");
    crafted(&dir, "text", "text-lib", "libtext.so");
    // Longer than an ELF header (a shorter file is "too short" before it is "not ELF").
    let text = dir.create("plugins/text/libtext.so", "#!/bin/sh\necho I am a text file\n".repeat(64));
    crafted(&dir, "empty", "empty-lib", "libempty.so");
    let empty = dir.create("plugins/empty/libempty.so", "");
    let out = host(&dir, &["plugins", "check"]).fails();
    for (id, lib, why) in [("text-lib", &text, "invalid ELF header"), ("empty-lib", &empty, "too short")] {
        let line = fail_line(&out, &format!("{id}:"));
        let prefix = format!("cannot open {}: ", lib.display());
        let rest = line.split_once(&prefix).unwrap_or_else(|| panic!("{line}")).1;
        assert!(rest.contains(why), "the reason is dlerror's text: {line}");
    }
    let out = host(&dir, &["plugins", "inspect", "text-lib"]).fails();
    assert!(out.contains("invalid ELF header"), "{out}");
}

/// The repository's own manifests (as staged) match their libraries: id, kind, version and
/// summary. A manifest whose summary drifted from its descriptor fails here.
#[test]
fn issue_6_every_real_plugin_manifest_matches_its_library() {
    const T: &str = "issue_6_every_real_plugin_manifest_matches_its_library";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("manifest-real");
    let mut ids = Vec::new();
    for e in std::fs::read_dir(staged_plugins()).unwrap() {
        let id = e.unwrap().file_name().to_string_lossy().into_owned();
        copy_plugin_as(&dir, &id, &id);
        ids.push(id);
    }
    assert!(ids.len() >= 5, "{ids:?}");
    let out = host(&dir, &["plugins", "check"]).ok();
    for id in &ids {
        assert!(out.lines().any(|l| l.starts_with(&format!("ok    {id} "))), "{id}:\n{out}");
    }
    assert!(out.contains("0 problem(s)"), "{out}");
}
