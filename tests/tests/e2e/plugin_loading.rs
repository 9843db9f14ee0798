//! Plugin discovery and loading through the real `host` binary (issue 2).
//!
//! Every test works in its own temporary directory and passes a plugin directory with
//! `--plugin-dir`: real plugins and fixtures are copied from the staged folders
//! (`target/release/plugins/<id>/`, `target/release/test-plugins/<id>/`), broken plugins are
//! crafted in place (garbage libraries, text files named `.so`, a system library that is not a
//! likeness plugin, missing libraries, lying or malformed manifests).
//!
//! What is covered: `plugins list` reads manifests only (a garbage library is still listed);
//! `plugins inspect` prints the descriptor and config schema; a plugin that panics turns into
//! an ordinary error (exit 1, no abort); `plugins check` reports every problem, not only the
//! first; ABI-major and layout mismatches, non-plugin files, missing libraries and manifests
//! that lie about their kind give messages that say what to fix; the host links no heavy
//! runtime and runs with the venv stripped from the environment; a misspelt plugin id gets a
//! suggestion.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use likeness_sdk::abi::{ABI_MAJOR, ABI_MINOR};
use likeness_tests::{
    built_or_skip, demo_bundles_or_skip, host_bin, staged_plugins, staged_test_plugins, Dir, TestCommand,
};

/// Copies the staged plugin folder `id` (real plugins first, then fixtures) to `plugins/<id>`.
fn copy_plugin(dir: &Dir, id: &str) -> PathBuf {
    let src = [staged_plugins().join(id), staged_test_plugins().join(id)]
        .into_iter()
        .find(|p| p.join("plugin.toml").is_file())
        .unwrap_or_else(|| {
            panic!(
                "plugin `{id}` is not staged in {} or {}: run scripts/build.sh",
                staged_plugins().display(),
                staged_test_plugins().display()
            )
        });
    let dest = dir.mkdir(Path::new("plugins").join(id));
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
    dest
}

/// The `--plugin-dir` of a test (`<tmp>/plugins`, created if needed).
fn plugin_dir(dir: &Dir) -> PathBuf {
    dir.mkdir("plugins")
}

/// Writes `plugins/<folder>/plugin.toml` for a loss plugin whose library is `library`.
fn manifest(dir: &Dir, folder: &str, id: &str, kind: &str, library: &str) -> PathBuf {
    dir.create(
        Path::new("plugins").join(folder).join("plugin.toml"),
        format!("[plugin]\nid = \"{id}\"\nkind = \"{kind}\"\nversion = \"0.3.1\"\nabi = \"1.0\"\nlibrary = \"{library}\"\nsummary = \"crafted by the test\"\n"),
    )
}

/// `host --plugin-dir <tmp>/plugins ARGS…`.
fn host(dir: &Dir, args: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(plugin_dir(dir)).args(args);
    t
}

/// The `plugins list` row of `id`, split on whitespace: [id, kind, version, abi, found via…].
fn list_row<'a>(out: &'a str, id: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&id))
        .unwrap_or_else(|| panic!("`plugins list` has no row for `{id}`:\n{out}"))
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The `error: …` message the host prints last (it may span several lines).
fn error_message(out: &str) -> &str {
    let i = out.rfind("error: ").unwrap_or_else(|| panic!("no `error:` line in:\n{out}"));
    &out[i..]
}

fn host_abi() -> String {
    format!("ABI {ABI_MAJOR}.{ABI_MINOR}")
}

#[test]
fn issue_2_list_shows_kind_and_version_and_opens_no_library() {
    let Some(()) = built_or_skip("issue_2_list_shows_kind_and_version_and_opens_no_library") else { return };
    let dir = Dir::new("list");
    copy_plugin(&dir, "identity-autoencoder");
    copy_plugin(&dir, "pixel");
    // A library that is not even an ELF file: listing must not try to open it.
    manifest(&dir, "garbage", "garbage-lib", "metric", "libgarbage.so");
    let garbage: Vec<u8> = likeness_sdk::testing::uniform(1, 4096).into_iter().map(|u| (u * 256.0) as u8).collect();
    dir.create("plugins/garbage/libgarbage.so", garbage);

    let out = host(&dir, &["plugins", "list"]).ok();
    let ae = list_row(&out, "identity-autoencoder");
    assert_eq!(&ae[1..5], ["model", "0.1.0", "1.1", "--plugin-dir"], "{out}");
    let px = list_row(&out, "pixel");
    assert_eq!(&px[1..5], ["loss", "0.1.0", "1.1", "--plugin-dir"], "{out}");
    let g = list_row(&out, "garbage-lib");
    assert_eq!(&g[1..5], ["metric", "0.3.1", "1.0", "--plugin-dir"], "{out}");
    assert!(out.contains("crafted by the test"), "{out}");
    assert!(!out.contains("unreadable manifest"), "{out}");
    // The same garbage library is refused as soon as something opens it.
    let err = host(&dir, &["plugins", "inspect", "garbage-lib"]).fails();
    assert!(error_message(&err).contains("cannot open"), "{err}");
}

#[test]
fn issue_2_inspect_pixel_prints_descriptor_and_schema() {
    let Some(()) = built_or_skip("issue_2_inspect_pixel_prints_descriptor_and_schema") else { return };
    let dir = Dir::new("inspect");
    let pixel = copy_plugin(&dir, "pixel");
    let out = host(&dir, &["plugins", "inspect", "pixel"]).ok();
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::trim))
            .unwrap_or_else(|| panic!("no `{name}:` line in:\n{out}"))
    };
    assert_eq!(field("id"), "pixel");
    assert_eq!(field("kind"), "loss");
    assert_eq!(field("differentiable"), "true");
    assert_eq!(field("abi"), "1.1");
    assert!(field("library").starts_with(pixel.to_str().unwrap()), "library is the copy in --plugin-dir:\n{out}");
    let schema_text = out.split_once("config schema:").unwrap_or_else(|| panic!("no config schema in:\n{out}")).1;
    let schema: serde_json::Value =
        serde_json::from_str(schema_text.trim()).unwrap_or_else(|e| panic!("schema is not JSON ({e}):\n{out}"));
    for key in ["l1", "mse", "ssim"] {
        assert!(schema["properties"][key].is_object(), "schema lacks `{key}`:\n{out}");
    }
}

#[test]
fn issue_2_panicking_plugin_is_an_error_not_an_abort() {
    const T: &str = "issue_2_panicking_plugin_is_an_error_not_an_abort";
    let (Some(()), Some(data)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("panicking");
    copy_plugin(&dir, "identity-autoencoder");
    copy_plugin(&dir, "testing-panicking");
    let mut cmd = host(&dir, &["train", "--plugin", "identity-autoencoder", "--loss", "testing-panicking"]);
    cmd.arg("--data").arg(&data).arg("--output").arg(dir.join("run")).args([
        "--steps",
        "2",
        "--set",
        "model.config.image_size=32",
        "--set",
        "data.image_size=32",
        "--set",
        "model.config.base_channels=8",
        "--set",
        "model.config.latent_dim=16",
    ]);
    cmd.env("RUST_BACKTRACE", "0");
    let o = cmd.output();
    let (stdout, stderr) = text(&o);
    let all = format!("status: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", o.status);
    assert_eq!(o.status.signal(), None, "the host was killed by a signal (abort?)\n{all}");
    assert_eq!(o.status.code(), Some(1), "expected the ordinary failure code 1\n{all}");
    let msg = error_message(&stderr);
    for want in ["testing-panicking", "panicked", "deliberate panic for the test"] {
        assert!(msg.contains(want), "the error message lacks `{want}`\n{all}");
    }
    assert!(!stderr.contains("panic across the ffi boundary") && !stderr.contains("abort"), "{all}");
    assert!(!stdout.contains("training finished"), "{all}");
}

#[test]
fn issue_2_check_reports_every_problem_not_only_the_first() {
    let Some(()) = built_or_skip("issue_2_check_reports_every_problem_not_only_the_first") else { return };
    let dir = Dir::new("check");
    for id in ["identity-autoencoder", "pixel", "testing-panicking", "testing-abi-mismatch", "testing-layout-mismatch"]
    {
        copy_plugin(&dir, id);
    }
    manifest(&dir, "text-so", "not-a-plugin", "loss", "libnotaplugin.so");
    dir.create("plugins/text-so/libnotaplugin.so", "this is a text file, not a shared library\n");
    manifest(&dir, "libm", "system-libm", "loss", "libm.so.6");
    std::fs::copy(system_libm(), dir.join("plugins/libm/libm.so.6")).unwrap();
    manifest(&dir, "missing", "missing-library", "loss", "libgone.so");
    let bad_manifest = dir.create("plugins/bad/plugin.toml", "[plugin]\nid = \"bad\"\nkind = \"loss\"\nversion = \"0.1.0\"\nabi = \"1.0\"\nlibrary = \"x.so\"\nlibary = \"typo\"\n");

    let o = host(&dir, &["plugins", "check"]).output();
    let (out, err) = text(&o);
    let all = format!("status: {}\n--- stdout\n{out}\n--- stderr\n{err}", o.status);
    assert_eq!(o.status.code(), Some(1), "{all}");
    let line = |prefix: &str| {
        out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line starting with `{prefix}`\n{all}"))
    };
    for ok in ["identity-autoencoder", "pixel", "testing-panicking"] {
        line(&format!("ok    {ok} "));
    }
    assert!(line("FAIL  testing-abi-mismatch:").contains("ABI 2.0"), "{all}");
    assert!(line("FAIL  testing-layout-mismatch:").contains("layout"), "{all}");
    assert!(line("FAIL  not-a-plugin:").contains("cannot open"), "{all}");
    assert!(line("FAIL  system-libm:").contains("is not a likeness plugin"), "{all}");
    assert!(line("FAIL  missing-library:").contains("libgone.so"), "{all}");
    assert!(line(&format!("FAIL  {}:", bad_manifest.display())).contains("libary"), "{all}");
    let fails = out.lines().filter(|l| l.starts_with("FAIL")).count();
    assert_eq!(fails, 6, "{all}");
    assert!(out.contains("6 problem(s)"), "{all}");
}

#[test]
fn issue_2_abi_major_mismatch_names_both_versions() {
    let Some(()) = built_or_skip("issue_2_abi_major_mismatch_names_both_versions") else { return };
    let dir = Dir::new("abi-mismatch");
    copy_plugin(&dir, "testing-abi-mismatch");
    let out = host(&dir, &["plugins", "inspect", "testing-abi-mismatch"]).fails();
    let msg = error_message(&out);
    let plugin_abi = format!("ABI {}.0", ABI_MAJOR + 1);
    assert!(
        msg.contains(&plugin_abi) && msg.contains(&host_abi()),
        "wants `{plugin_abi}` and `{}`:\n{out}",
        host_abi()
    );
    assert!(msg.contains("testing-abi-mismatch") && msg.contains("upgrade"), "{out}");
    assert!(!out.contains("id:"), "nothing is printed for a refused plugin:\n{out}");
}

#[test]
fn issue_2_layout_mismatch_is_refused_with_a_short_report() {
    let Some(()) = built_or_skip("issue_2_layout_mismatch_is_refused_with_a_short_report") else { return };
    let dir = Dir::new("layout-mismatch");
    let lib = copy_plugin(&dir, "testing-layout-mismatch");
    let out = host(&dir, &["plugins", "inspect", "testing-layout-mismatch"]).fails();
    let msg = error_message(&out);
    assert!(msg.to_lowercase().contains("layout"), "{out}");
    assert!(msg.contains(lib.to_str().unwrap()), "the message names the library:\n{out}");
    assert!(!msg.contains("ABI 2.0"), "{out}");
    // The summary shows abi_stable's finding (its `Error:` block), not the layout dumps.
    assert!(msg.contains("Error:") && msg.contains("Expected:") && msg.contains("Found:"), "{out}");
    assert!(!msg.contains("Layout of expected type"), "{out}");
    let lines = out.trim_end().lines().count();
    assert!(lines <= 12, "layout report is {lines} lines, want ≤ 12:\n{out}");
}

/// A real shared library that is not a likeness plugin.
fn system_libm() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("no libm.so.6 on this machine")
}

#[test]
fn issue_2_files_that_are_not_plugins() {
    let Some(()) = built_or_skip("issue_2_files_that_are_not_plugins") else { return };
    let dir = Dir::new("not-a-plugin");
    manifest(&dir, "text-so", "text-so", "loss", "libtext.so");
    let text_lib = dir.create("plugins/text-so/libtext.so", "#!/bin/sh\necho I am a text file renamed .so\n");
    let out = host(&dir, &["plugins", "inspect", "text-so"]).fails();
    let msg = error_message(&out);
    assert!(msg.contains(&format!("cannot open {}", text_lib.display())), "{out}");

    manifest(&dir, "libm", "libm", "loss", "libm.so.6");
    let libm = dir.join("plugins/libm/libm.so.6");
    std::fs::copy(system_libm(), &libm).unwrap();
    let out = host(&dir, &["plugins", "inspect", "libm"]).fails();
    let msg = error_message(&out);
    assert!(msg.contains(&format!("{} is not a likeness plugin", libm.display())), "{out}");
    assert!(msg.contains("likeness_plugin_header"), "names the missing symbol:\n{out}");
}

#[test]
fn issue_2_missing_library_and_lying_kind() {
    let Some(()) = built_or_skip("issue_2_missing_library_and_lying_kind") else { return };
    let dir = Dir::new("manifest-errors");
    let m = manifest(&dir, "gone", "gone", "loss", "libgone.so");
    let out = host(&dir, &["plugins", "inspect", "gone"]).fails();
    let msg = error_message(&out);
    let lib = dir.join("plugins/gone/libgone.so");
    assert!(
        msg.contains(lib.to_str().unwrap()) && msg.contains(m.to_str().unwrap()),
        "names library and manifest:\n{out}"
    );
    assert!(msg.contains("no such file"), "{out}");

    // pixel's real library behind a manifest that says it is a model.
    let pixel = copy_plugin(&dir, "pixel");
    let toml = std::fs::read_to_string(pixel.join("plugin.toml")).unwrap();
    let lying = toml.replacen("kind = \"loss\"", "kind = \"model\"", 1);
    assert_ne!(toml, lying, "pixel's manifest no longer says kind = \"loss\"");
    std::fs::write(pixel.join("plugin.toml"), lying).unwrap();
    let out = host(&dir, &["plugins", "inspect", "pixel"]).fails();
    let msg = error_message(&out);
    assert!(
        msg.contains("is a loss plugin") && msg.contains("(`plugin.kind`)") && msg.contains("host plugins manifest "),
        "{out}"
    );
    assert!(msg.contains(pixel.join("plugin.toml").to_str().unwrap()), "names the manifest:\n{out}");
}

#[test]
fn issue_2_malformed_manifest_does_not_break_list() {
    let Some(()) = built_or_skip("issue_2_malformed_manifest_does_not_break_list") else { return };
    let dir = Dir::new("malformed");
    copy_plugin(&dir, "pixel");
    let bad = dir.create(
        "plugins/typo/plugin.toml",
        "[plugin]\nid = \"typo\"\nkind = \"loss\"\nversion = \"0.1.0\"\nabi = \"1.0\"\nlibrary = \"libtypo.so\"\nsumary = \"misspelt\"\n",
    );
    let out = host(&dir, &["plugins", "list"]).ok();
    list_row(&out, "pixel");
    let line = out
        .lines()
        .find(|l| l.contains(bad.to_str().unwrap()))
        .unwrap_or_else(|| panic!("the malformed manifest is not reported:\n{out}"));
    assert!(line.contains("sumary") && line.contains("unknown field"), "{out}");
    assert!(line.contains("line 7"), "points at the line:\n{out}");
}

#[test]
fn issue_2_host_links_no_heavy_runtime_and_runs_without_the_venv() {
    let Some(()) = built_or_skip("issue_2_host_links_no_heavy_runtime_and_runs_without_the_venv") else { return };
    let host_path = host_bin();
    let ldd = Command::new("ldd").arg(&host_path).output().expect("ldd");
    let libs = String::from_utf8_lossy(&ldd.stdout).to_lowercase();
    assert!(ldd.status.success(), "ldd failed: {libs}");
    for heavy in ["torch", "onnxruntime", "cuda", "nvrtc", "cudnn", "cublas", "not found"] {
        assert!(!libs.contains(heavy), "host links `{heavy}`:\n{libs}");
    }

    let dir = Dir::new("no-venv");
    copy_plugin(&dir, "pixel");
    let home = dir.mkdir("home");
    let bare = |args: &[&str]| {
        let o = Command::new(&host_path)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &home)
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?} failed with a bare environment: {}\n{out}\n{err}", o.status);
        out + &err
    };
    let help = bare(&["--help"]);
    assert!(help.contains("plugins") && help.contains("train"), "{help}");
    let pd = plugin_dir(&dir);
    let list = bare(&["--plugin-dir", pd.to_str().unwrap(), "plugins", "list"]);
    assert_eq!(&list_row(&list, "pixel")[1..3], ["loss", "0.1.0"], "{list}");
    // A plugin that needs no heavy runtime opens too.
    let inspect = bare(&["--plugin-dir", pd.to_str().unwrap(), "plugins", "inspect", "pixel"]);
    assert!(inspect.contains("differentiable: true"), "{inspect}");
}

#[test]
fn issue_2_unknown_plugin_id_suggests_the_closest() {
    const T: &str = "issue_2_unknown_plugin_id_suggests_the_closest";
    let (Some(()), Some(data)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("unknown-id");
    copy_plugin(&dir, "identity-autoencoder");
    copy_plugin(&dir, "pixel");
    let mut cmd =
        host(&dir, &["train", "--plugin", "identity-autoencodr", "--steps", "1", "--set", "data.image_size=32"]);
    cmd.arg("--data").arg(&data).arg("--output").arg(dir.join("run"));
    let out = cmd.fails();
    let msg = error_message(&out);
    assert!(msg.contains("identity-autoencodr") && msg.contains("Did you mean `identity-autoencoder`?"), "{out}");
    assert!(msg.contains("--plugin-dir"), "says where it looked:\n{out}");
}
