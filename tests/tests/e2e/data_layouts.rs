//! `host data check` on every dataset layout (issue 6, parts 4 and 6): bundles (seed 000),
//! drip (seed 002), pairs (seed 003), musubi-tuner's dataset.toml (seed 004), each with bad
//! input (dangling symbolic link, truncated JPEG, tiny image, missing prompt/caption, orphan
//! control) reported by path, through the real `host` binary. The musubi buckets are checked
//! against musubi-tuner's BucketSelector run in Python, and the bucket resize against its
//! `resize_image_to_bucket` (Pillow + OpenCV), both in `tests/python/bucket_oracle.py`.

use std::path::{Path, PathBuf};

use likeness_engine::data::image_io::save_chw;
use likeness_tests::{built_or_skip, python_or_skip, run_python, Dir, TestCommand};
use serde_json::{json, Value};

/// A `w`×`h` image with a colour pattern, PNG or JPEG by extension.
fn img(path: &Path, w: u32, h: u32) -> PathBuf {
    let p = (w * h) as usize;
    let mut v = vec![0f32; 3 * p];
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) as usize;
            v[i] = x as f32 / w as f32;
            v[p + i] = y as f32 / h as f32;
            v[2 * p + i] = ((x + y) % 17) as f32 / 16.0;
        }
    }
    save_chw(path, &v, (w, h)).unwrap_or_else(|e| panic!("{e}"));
    path.to_path_buf()
}

/// A JPEG cut to two thirds of its bytes (the image crate alone decodes it without error).
fn truncated_jpeg(path: &Path) {
    img(path, 64, 64);
    let b = std::fs::read(path).unwrap();
    std::fs::write(path, &b[..b.len() * 2 / 3]).unwrap();
}

fn dangling(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(path.with_file_name("missing-target.jpg"), path).unwrap();
}

fn check(dir: &Dir, args: &[&str]) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.args(["data", "check"]).args(args);
    t
}

fn check_json(dir: &Dir, path: &Path, extra: &[&str]) -> Value {
    let mut args = vec![path.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let o = check(dir, &args).output();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "host data check {args:?} failed\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"))
}

/// The problem reported for the file ending in `suffix` with `severity`.
fn problem<'a>(report: &'a Value, suffix: &str, severity: &str) -> &'a str {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"].as_str().unwrap().ends_with(suffix) && p["severity"] == severity)
        .unwrap_or_else(|| panic!("no {severity} for {suffix} in {:#}", report["problems"]))["message"]
        .as_str()
        .unwrap()
}

#[test]
fn issue_6_bundles_layout_reports_dangling_links_and_truncated_jpegs() {
    const T: &str = "issue_6_bundles_layout_reports_dangling_links_and_truncated_jpegs";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-bundles");
    let root = dir.join("dataset");
    for c in ["char_00001", "char_00002"] {
        for i in 1..=3 {
            img(&root.join(format!("0/{c}/img_0000{i}.jpg")), 48 + 16 * i, 48);
        }
    }
    dangling(&root.join("0/char_00001/img_00009.jpg"));
    truncated_jpeg(&root.join("0/char_00002/img_00008.jpg"));
    img(&root.join("0/char_00002/img_00007.png"), 8, 8);
    let text = check(&dir, &[root.to_str().unwrap()]).ok();
    for want in [
        "layout bundles",
        "4 example(s)",
        "img_00009.jpg",
        "dangling symbolic link",
        "img_00008.jpg",
        "truncated JPEG",
        "img_00007.png",
        "too small",
        "buckets (square crops",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    let r = check_json(&dir, &root, &["--set", "enable_bucket=true"]);
    assert_eq!(r["layout"], "bundles");
    assert_eq!(r["counts"]["examples"], 4);
    assert_eq!(r["counts"]["images_per_role"], json!({"reference": 4, "target": 4}));
    problem(&r, "img_00009.jpg", "error");
    assert!(problem(&r, "img_00008.jpg", "error").contains("truncated"));
    // Targets 80x48 and 96x48 at resolution 64 (buckets of area 64², steps of 16).
    let buckets: Vec<(u64, u64)> = r["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["bucket"][0].as_u64().unwrap(), e["bucket"][1].as_u64().unwrap()))
        .collect();
    assert!(buckets.iter().all(|b| *b == (80, 48)), "{buckets:?}");
}

#[test]
fn issue_6_drip_layout_and_a_missing_prompt() {
    const T: &str = "issue_6_drip_layout_and_a_missing_prompt";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-drip");
    let root = dir.join("dataset");
    for p in ["person_001", "person_002", "person_003"] {
        img(&root.join(p).join("ref_face.jpg"), 64, 64);
        img(&root.join(p).join("orig.jpg"), 96, 128);
        std::fs::write(root.join(p).join("prompt.txt"), format!("a photo of {p}\n")).unwrap();
    }
    img(&root.join("person_004/ref_face.jpg"), 64, 64);
    img(&root.join("person_004/orig.jpg"), 64, 64);
    img(&root.join("person_005/ref_face.jpg"), 64, 64);
    truncated_jpeg(&root.join("person_005/orig.jpg"));
    std::fs::write(root.join("person_005/prompt.txt"), "x").unwrap();
    // Guessed layout: person_* folders.
    let r = check_json(&dir, &root, &[]);
    assert_eq!(r["layout"], "drip");
    assert_eq!(r["counts"]["examples"], 3);
    assert_eq!(r["counts"]["texts_per_role"], json!({"caption": 3}));
    assert_eq!(r["counts"]["captions"], 3);
    assert!(problem(&r, "person_004", "error").contains("missing prompt.txt"));
    assert!(problem(&r, "person_005/orig.jpg", "error").contains("truncated JPEG"));
    let e = r["examples"].as_array().unwrap().iter().find(|e| e["id"] == "person_002").unwrap();
    assert!(e["images"]["target"].as_str().unwrap().ends_with("person_002/orig.jpg"));
    assert!(e["images"]["reference"].as_str().unwrap().ends_with("person_002/ref_face.jpg"));
    assert_eq!(e["texts"]["caption"], "a photo of person_002");
    assert_eq!(e["bucket"], json!([64, 64]));
}

#[test]
fn issue_6_pairs_layout_over_several_attributes() {
    const T: &str = "issue_6_pairs_layout_over_several_attributes";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-pairs");
    let root = dir.join("datasets");
    for a in ["age", "smile"] {
        for n in ["7000", "7001", "7002"] {
            img(&root.join(format!("{a}/source/{n}.jpg")), 64, 64);
            img(&root.join(format!("{a}/target/{n}.jpg")), 64, 64);
        }
    }
    img(&root.join("age/source/7003.jpg"), 64, 64); // no target
    img(&root.join("smile/target/7009.jpg"), 64, 64); // no source
    std::fs::write(root.join("smile/target/7000.txt"), "a big smile").unwrap();
    let r = check_json(&dir, &root, &[]);
    assert_eq!(r["layout"], "pairs");
    assert_eq!(r["counts"]["examples"], 6);
    assert_eq!(r["counts"]["images_per_role"], json!({"control": 6, "reference": 6, "target": 6}));
    assert!(problem(&r, "age/source/7003.jpg", "error").contains("no target image"));
    assert!(problem(&r, "smile/target/7009.jpg", "error").contains("no source image"));
    let cap = |id: &str| {
        r["examples"].as_array().unwrap().iter().find(|e| e["id"] == id).unwrap()["texts"]["caption"].clone()
    };
    assert_eq!(cap("smile/7000"), "a big smile");
    assert_eq!(cap("age/7001"), "age");
    // One attribute only.
    let r = check_json(&dir, &root, &["--layout", "pairs", "--set", "attributes=[\"smile\"]"]);
    assert_eq!(r["counts"]["examples"], 3);
}

/// A musubi-tuner dataset with controls, written as docs/dataset_config.md writes them.
fn musubi_tree(dir: &Dir) -> (PathBuf, Vec<(u32, u32)>) {
    let (images, controls) = (dir.join("image_dir"), dir.join("control_dir"));
    let sizes = [(1920, 1080), (1080, 1920), (1000, 1000), (640, 480), (300, 2000), (123, 457), (2000, 1500)];
    for (i, &(w, h)) in sizes.iter().enumerate() {
        img(&images.join(format!("image{i}.jpg")), w, h);
        std::fs::write(images.join(format!("image{i}.txt")), format!("a photo of alice, number {i}\n")).unwrap();
        img(&controls.join(format!("image{i}_0.png")), 256, 256);
        if i % 2 == 0 {
            img(&controls.join(format!("image{i}_1.png")), 200, 300);
        }
    }
    img(&images.join("nocaption.png"), 500, 500);
    truncated_jpeg(&images.join("cut.jpg"));
    std::fs::write(images.join("cut.txt"), "x").unwrap();
    img(&controls.join("cut.png"), 64, 64);
    dangling(&images.join("gone.jpg"));
    img(&controls.join("orphan.png"), 64, 64);
    let toml = dir.create(
        "dataset.toml",
        format!(
            r#"# resolution, caption_extension, batch_size, num_repeats, enable_bucket, bucket_no_upscale should be set in either general or datasets
# otherwise, the default values will be used for each item

# general configurations
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "{}"
control_directory = "{}"
cache_directory = "{}"
num_repeats = 1 # optional, default is 1. Number of times to repeat the dataset. Useful to balance the multiple datasets with different sizes.

# other datasets can be added here. each dataset can have different configurations
"#,
            images.display(),
            controls.display(),
            dir.join("cache_directory").display()
        ),
    );
    (toml, sizes.to_vec())
}

#[test]
fn issue_6_musubi_dataset_toml_with_controls_and_musubi_buckets() {
    const T: &str = "issue_6_musubi_dataset_toml_with_controls_and_musubi_buckets";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-musubi");
    let (toml, sizes) = musubi_tree(&dir);
    let text = check(&dir, &[toml.to_str().unwrap()]).ok();
    for want in [
        "layout musubi",
        "7 example(s)",
        "nocaption.png",
        "no caption file",
        "cut.jpg",
        "truncated JPEG",
        "gone.jpg",
        "dangling",
        "orphan.png",
        "datasets[0]",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    let r = check_json(&dir, &toml, &[]);
    assert_eq!(r["layout"], "musubi");
    assert_eq!(
        (r["counts"]["train"].as_u64(), r["counts"]["val"].as_u64()),
        (Some(7), Some(0)),
        "musubi: no held-out split"
    );
    assert_eq!(r["counts"]["images_per_role"], json!({"control": 7, "control_1": 4, "reference": 7, "target": 7}));
    assert_eq!(r["counts"]["captions"], 7);
    assert_eq!(r["batch_size"], 1);
    assert!(problem(&r, "control_dir/orphan.png", "warning").contains("matching no image"));
    assert!(problem(&r, "image_dir/nocaption.png", "error").contains("no caption file"));
    let examples = r["examples"].as_array().unwrap();
    let e0 = examples.iter().find(|e| e["id"] == "0/image0").unwrap();
    assert!(e0["images"]["control"].as_str().unwrap().ends_with("image0_0.png"));
    assert!(e0["images"]["control_1"].as_str().unwrap().ends_with("image0_1.png"));
    assert_eq!(e0["images"]["reference"], e0["images"]["control"]);
    assert_eq!(e0["texts"]["caption"], "a photo of alice, number 0");
    let bucket_sum: u64 = r["buckets"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(bucket_sum, 7);

    // Buckets: musubi-tuner's BucketSelector in Python.
    let Some(_) = python_or_skip(T) else { return };
    let spec = json!({"cases": [{"resolution": [960, 544], "enable_bucket": true, "no_upscale": false, "reso_steps": 16, "images": sizes}]});
    let spec_path = dir.create("oracle/spec.json", spec.to_string());
    let out = dir.join("oracle/out.json");
    run_python("bucket_oracle.py", &["--spec", spec_path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["bucketing"]["buckets"], want["cases"][0]["buckets"], "bucket list");
    for (i, (w, h)) in sizes.iter().enumerate() {
        let e = examples.iter().find(|e| e["id"] == format!("0/image{i}")).unwrap();
        assert_eq!(e["size"], json!([w, h]));
        assert_eq!(e["bucket"], want["cases"][0]["selected"][i], "image {w}x{h}");
    }
    // no_upscale, and a square resolution, through --set on a bundle-style folder.
    let spec = json!({"cases": [{"resolution": [1024, 1024], "enable_bucket": true, "no_upscale": true, "images": [[500, 333], [2000, 1500], [640, 480]]}]});
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    run_python("bucket_oracle.py", &["--spec", spec_path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let drip = dir.join("drip");
    for (k, (w, h)) in [(500u32, 333u32), (2000, 1500), (640, 480)].iter().enumerate() {
        let p = drip.join(format!("person_{k}"));
        img(&p.join("ref_face.jpg"), 64, 64);
        img(&p.join("orig.jpg"), *w, *h);
        std::fs::write(p.join("prompt.txt"), "p").unwrap();
    }
    let r = check_json(
        &dir,
        &drip,
        &[
            "--set",
            "enable_bucket=true",
            "--set",
            "bucket_no_upscale=true",
            "--set",
            "resolution=1024",
            "--set",
            "split=none",
        ],
    );
    for k in 0..3 {
        let e = r["examples"].as_array().unwrap().iter().find(|e| e["id"] == format!("person_{k}")).unwrap();
        assert_eq!(e["bucket"], want["cases"][0]["selected"][k], "person_{k}");
    }
}

#[test]
fn issue_6_data_check_fails_on_unusable_data_and_unknown_keys() {
    const T: &str = "issue_6_data_check_fails_on_unusable_data_and_unknown_keys";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-bad");
    // Nothing usable: exit status 1, the problems still listed.
    let root = dir.join("drip");
    truncated_jpeg(&root.join("person_001/orig.jpg"));
    img(&root.join("person_001/ref_face.jpg"), 64, 64);
    std::fs::write(root.join("person_001/prompt.txt"), "x").unwrap();
    let out = check(&dir, &[root.to_str().unwrap()]).fails();
    assert!(out.contains("truncated JPEG") && out.contains("no usable example"), "{out}");
    // An unknown key in a dataset.toml names the file and the key.
    let toml = dir.create(
        "bad.toml",
        "[general]\nresolution = [960, 544]\n\n[[datasets]]\nimage_directory = \"x\"\ncaption_extention = \".txt\"\n",
    );
    let out = check(&dir, &[toml.to_str().unwrap()]).fails();
    assert!(
        out.contains("bad.toml") && out.contains("datasets[0].caption_extention") && out.contains("caption_extension"),
        "{out}"
    );
    let out = check(&dir, &[toml.to_str().unwrap(), "--json"]).fails();
    assert!(out.contains("\"usable\":false") && out.contains("caption_extention"), "{out}");
    // A missing root.
    let out = check(&dir, &[dir.join("nope").to_str().unwrap(), "--layout", "bundles"]).fails();
    assert!(out.contains("does not exist"), "{out}");
}

/// A picture with detail at every scale (gradients, a fine checker, diagonal stripes), so a
/// wrong filter or a one-pixel crop shift shows.
fn detailed(path: &Path, w: u32, h: u32) -> PathBuf {
    let p = (w * h) as usize;
    let mut v = vec![0f32; 3 * p];
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) as usize;
            v[i] = x as f32 / w as f32;
            v[p + i] = if (x / 3 + y / 3) % 2 == 0 { 0.9 } else { 0.1 };
            v[2 * p + i] = (((x + 2 * y) % 23) as f32 / 22.0) * (y as f32 / h as f32);
        }
    }
    save_chw(path, &v, (w, h)).unwrap_or_else(|e| panic!("{e}"));
    path.to_path_buf()
}

#[test]
fn issue_6_bucket_resize_matches_musubi_tuners() {
    const T: &str = "issue_6_bucket_resize_matches_musubi_tuners";
    let Some(_) = python_or_skip(T) else { return };
    use likeness_engine::data::image_io::{decode_rgb, resize_to_bucket, to_chw};
    let dir = Dir::new("data-resize");
    // (image size, bucket): shrinking with the same aspect, shrinking + crop, enlarging + crop,
    // scale exactly 1 on one side (crop only), and a bucket equal to the image.
    let cases = [
        ((300, 200), (192, 128)),
        ((1920, 1080), (960, 544)),
        ((1000, 700), (720, 720)),
        ((100, 150), (368, 560)),
        ((250, 180), (832, 624)),
        ((500, 500), (496, 496)),
        ((512, 512), (512, 512)),
    ];
    for (k, ((w, h), (bw, bh))) in cases.into_iter().enumerate() {
        let src = detailed(&dir.join(format!("in{k}.png")), w, h);
        let out = dir.join(format!("musubi{k}.png"));
        run_python(
            "bucket_oracle.py",
            &[
                "--resize",
                src.to_str().unwrap(),
                "--bucket",
                &bw.to_string(),
                &bh.to_string(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        let theirs = to_chw(&decode_rgb(&out).unwrap());
        let ours = resize_to_bucket(&decode_rgb(&src).unwrap(), (bw, bh));
        assert_eq!(ours.len(), theirs.len(), "case {k}: {w}x{h} -> {bw}x{bh}");
        let d: Vec<f32> = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs() * 255.0).collect();
        let max = d.iter().cloned().fold(0.0, f32::max);
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        let differing = d.iter().filter(|&&x| x > 1e-3).count();
        eprintln!(
            "case {k}: {w}x{h} -> {bw}x{bh}: max |diff| {max:.3}/255, mean {mean:.4}/255, {differing} differing values"
        );
        // Both sides are 8-bit levels. Enlarging (Pillow's integer Lanczos) and cropping are
        // exact integer arithmetic: equal. Shrinking sums f32 products in OpenCV's order
        // (rows, then columns); another order moves a sum by a few ulps of 255 (~1e-5), which
        // can flip the rounding of a value that lies that close to k + 0.5: at most one level,
        // and rarely (measured here: never).
        assert!(max <= 1.0 + 1e-3, "case {k}: {w}x{h} -> {bw}x{bh}: max |diff| {max}/255");
        assert!(differing * 1000 <= d.len(), "case {k}: {differing} of {} values differ", d.len());
    }
}

/// Issue 6, "every layout trains the fixture model": the flow fixture trains two steps on a
/// `bundles` (no captions: `use_text = false`), a `pairs` and a musubi-tuner `dataset.toml`
/// dataset (`drip` is trained in `trainer.rs`), through the real host.
#[test]
fn issue_6_every_layout_trains_the_flow_fixture() {
    const T: &str = "issue_6_every_layout_trains_the_flow_fixture";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-train");
    let bundles = dir.join("bundles");
    for c in 0..3 {
        for i in 0..3 {
            img(&bundles.join(format!("0/char_{c:05}/img_{i:05}.png")), 48, 48);
        }
    }
    let pairs = dir.join("pairs");
    for a in ["age", "smile"] {
        for n in ["7000", "7001", "7002"] {
            img(&pairs.join(format!("{a}/source/{n}.jpg")), 48, 48);
            img(&pairs.join(format!("{a}/target/{n}.jpg")), 48, 48);
        }
    }
    let (musubi, _) = musubi_tree(&dir);
    for (name, data, extra) in [
        ("bundles", &bundles, &["--set", "data.layout=\"bundles\"", "--set", "model.config.use_text=false"][..]),
        ("pairs", &pairs, &["--set", "data.layout=\"pairs\""][..]),
        ("musubi", &musubi, &["--dataset_config"][..]),
    ] {
        let out = dir.join(format!("run-{name}"));
        let mut t = TestCommand::host(&dir);
        t.arg("--plugin-dir").arg(likeness_tests::staged_test_plugins());
        t.args(["train", "--plugin", "testing-flow", "--steps", "2", "--batch-size", "2", "--no-progress"]);
        t.args(["--set", "data.image_size=32", "--set", "train.sample_count=1", "--output"]).arg(&out);
        if name == "musubi" {
            t.args(extra).arg(data);
        } else {
            t.arg("--data").arg(data).args(extra);
        }
        let log = t.ok();
        assert!(log.contains("training finished: 2 optimizer steps"), "{name}:\n{log}");
        assert!(out.join("likeness.safetensors").is_file(), "{name}: no adapter in {}", out.display());
    }
}

/// Issue 17: a musubi dataset's `control_resolution` and `no_resize_control` size each control
/// image as musubi-tuner does (`host data check --json`'s `fitted_sizes`), checked against
/// `tests/python/bucket_oracle.py`'s `control_size` (musubi-tuner's `fetch_and_resize` lines and
/// `calculate_bucket_resolution`, re-typed there). The one divergence (both keys, a control
/// within the maximum area: musubi-tuner keeps its exact size, here rounded down to 16) is
/// checked against that rule instead.
#[test]
fn issue_17_musubi_control_sizes_match_musubi_tuners() {
    const T: &str = "issue_17_musubi_control_sizes_match_musubi_tuners";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("data-musubi-control-sizes");
    // (dataset keys, control_resolution, no_resize_control, control sizes)
    type Case<'a> = (&'a str, Option<[u32; 2]>, bool, &'a [(u32, u32)]);
    let cases: [Case; 3] = [
        ("control_resolution = [1024, 1024]", Some([1024, 1024]), false, &[(1000, 700), (400, 800), (1920, 1080)]),
        ("no_resize_control = true", None, true, &[(1000, 700), (333, 517)]),
        (
            "no_resize_control = true\ncontrol_resolution = 512",
            Some([512, 512]),
            true,
            &[(1000, 700), (900, 300), (410, 500)],
        ),
    ];
    let mut body = "[general]\nresolution = [960, 544]\nenable_bucket = true\n".to_string();
    let mut controls = Vec::new();
    for (k, (keys, reso, no_resize, sizes)) in cases.iter().enumerate() {
        let (images, ctl) = (dir.join(format!("img{k}")), dir.join(format!("ctl{k}")));
        for (i, (w, h)) in sizes.iter().enumerate() {
            img(&images.join(format!("t{i}.png")), 640, 480);
            std::fs::write(images.join(format!("t{i}.txt")), "a caption").unwrap();
            img(&ctl.join(format!("t{i}.png")), *w, *h);
            controls.push((
                format!("{k}/t{i}"),
                json!({"size": [w, h], "control_resolution": reso, "no_resize_control": no_resize}),
            ));
        }
        body += &format!(
            "[[datasets]]\nimage_directory = '{}'\ncontrol_directory = '{}'\n{keys}\n",
            images.display(),
            ctl.display()
        );
    }
    let toml = dir.create("dataset.toml", body);
    let r = check_json(&dir, &toml, &[]);
    let examples = r["examples"].as_array().unwrap();
    let Some(_) = python_or_skip(T) else { return };
    let mut spec_controls = Vec::new();
    for (id, c) in &controls {
        let e = examples.iter().find(|e| e["id"] == *id).unwrap_or_else(|| panic!("{id}: {r:#}"));
        let mut c = c.clone();
        c["bucket"] = e["bucket"].clone();
        spec_controls.push(c);
    }
    let spec = dir.create("oracle/spec.json", json!({"cases": [], "controls": spec_controls}).to_string());
    let out = dir.join("oracle/out.json");
    run_python("bucket_oracle.py", &["--spec", spec.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for (k, (id, c)) in controls.iter().enumerate() {
        let e = examples.iter().find(|e| e["id"] == *id).unwrap();
        let (w, h) = (c["size"][0].as_u64().unwrap(), c["size"][1].as_u64().unwrap());
        let within_max = c["no_resize_control"] == true
            && c["control_resolution"]
                .as_array()
                .is_some_and(|r| w * h <= r[0].as_u64().unwrap() * r[1].as_u64().unwrap());
        if within_max {
            assert_eq!(e["fitted_sizes"]["control"], json!([w / 16 * 16, h / 16 * 16]), "{id}: {w}x{h} under {c}");
            continue;
        }
        assert_eq!(e["fitted_sizes"]["control"], want["controls"][k], "{id}: control {w}x{h} under {c}");
    }
}
