//! `host eval-faces` (issue 3, part 4): seed 004's face-consistency evaluator, run through the
//! real `host` with the `testing-color-metric` fixture, its numbers checked against numpy
//! (`tests/python/eval_faces_oracle.py`, an independent re-implementation of the fixture's
//! colour embedding + seed 004's statistics).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use likeness_tests::{built_or_skip, profile_dir, python_or_skip, run_python, Dir, TestCommand};
use serde_json::{json, Value};

/// Images are written at the evaluation size, so the host does not resize them.
const SIZE: u32 = 32;

fn solid(rgb: [f32; 3]) -> Vec<f32> {
    let p = (SIZE * SIZE) as usize;
    rgb.iter().flat_map(|&v| std::iter::repeat_n(v, p)).collect()
}

/// Left-to-right blend from `a` to `b`.
fn gradient(a: [f32; 3], b: [f32; 3]) -> Vec<f32> {
    let s = SIZE as usize;
    let mut v = vec![0f32; 3 * s * s];
    for c in 0..3 {
        for y in 0..s {
            for x in 0..s {
                let t = x as f32 / (s - 1) as f32;
                v[c * s * s + y * s + x] = a[c] * (1.0 - t) + b[c] * t;
            }
        }
    }
    v
}

fn black() -> Vec<f32> {
    solid([0.0; 3])
}

fn write_png(path: &Path, chw: &[f32]) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    likeness_engine::visual::chw_to_rgb_image(chw, SIZE)
        .save(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path.to_path_buf()
}

fn eval_cmd(dir: &Dir) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.args(["--plugin-dir".into(), profile_dir().join("test-plugins").to_string_lossy().into_owned()]);
    t.args(["eval-faces", "--metric", "testing-color-metric", "--image-size", &SIZE.to_string(), "--no-progress"]);
    t
}

/// (control, generated, step key) the test expects the host to pair.
type Expected = Vec<(PathBuf, PathBuf, &'static str)>;

fn oracle(dir: &Dir, pairs: &Expected) -> Value {
    let spec = json!({"pairs": pairs.iter().map(|(c, g, s)| json!({"control": c, "generated": g, "step": s})).collect::<Vec<_>>()});
    let spec_path = dir.create("oracle/pairs.json", spec.to_string());
    let out = dir.join("oracle/expected.json");
    run_python("eval_faces_oracle.py", &["--pairs", spec_path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Within 1e-6 of numpy: the fixture's embedding is computed in f64 and returned as f32
/// (6-d, rounding ≤ 6e-8 per component), the host's cosine and statistics are f64, numpy's
/// are f64: the f32 rounding bounds the difference by ~1e-7 on every CPU.
fn close(got: &Value, want: &Value, what: &str) {
    match (got.as_f64(), want.as_f64()) {
        (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-6, "{what}: host {a}, numpy {b}"),
        _ => assert_eq!(got, want, "{what}"),
    }
}

/// Seed 004's fields exactly (+ `likeness`), every number within 1e-6 of numpy's.
fn check_report(got: &Value, want: &Value) {
    let keys: BTreeSet<&str> = got.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "total_pairs",
        "valid_pairs",
        "overall_mean",
        "overall_std",
        "overall_min",
        "overall_max",
        "by_step",
        "likeness",
    ]
    .into();
    assert_eq!(keys, expected, "top-level fields of {got}");
    assert_eq!(got["total_pairs"], want["total_pairs"]);
    assert_eq!(got["valid_pairs"], want["valid_pairs"]);
    for k in ["overall_mean", "overall_std", "overall_min", "overall_max"] {
        close(&got[k], &want[k], k);
    }
    let gs = got["by_step"].as_object().unwrap();
    let ws = want["by_step"].as_object().unwrap();
    assert_eq!(gs.keys().collect::<BTreeSet<_>>(), ws.keys().collect::<BTreeSet<_>>(), "by_step keys");
    for (step, w) in ws {
        let g = &gs[step];
        assert_eq!(
            g.as_object().unwrap().keys().map(|k| k.as_str()).collect::<BTreeSet<_>>(),
            ["count", "mean", "std", "min", "max"].into()
        );
        assert_eq!(g["count"], w["count"], "by_step[{step}].count");
        for k in ["mean", "std", "min", "max"] {
            close(&g[k], &w[k], &format!("by_step[{step}].{k}"));
        }
    }
}

/// CSV rows keyed by (control, generated): (step, similarity, valid).
fn read_csv(p: &Path) -> BTreeMap<(PathBuf, PathBuf), (String, Option<f64>, bool)> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("control,generated,step,similarity,valid,reason"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.splitn(6, ',').collect();
            assert_eq!(f.len(), 6, "CSV row {l:?}");
            let sim = (!f[3].is_empty()).then(|| f[3].parse::<f64>().unwrap());
            assert_eq!(f[4] == "1", sim.is_some(), "row {l:?}: valid flag vs similarity");
            ((PathBuf::from(f[0]), PathBuf::from(f[1])), (f[2].to_string(), sim, f[4] == "1"))
        })
        .collect()
}

/// The CSV has exactly the expected pairs, steps and per-pair similarities.
fn check_csv(p: &Path, pairs: &Expected, want: &Value) {
    let rows = read_csv(p);
    assert_eq!(rows.len(), pairs.len(), "CSV rows: {rows:?}");
    for (i, (c, g, s)) in pairs.iter().enumerate() {
        let (step, sim, _) = rows
            .get(&(c.clone(), g.clone()))
            .unwrap_or_else(|| panic!("no CSV row for {} <- {}: {rows:?}", c.display(), g.display()));
        assert_eq!(step, s, "step of {}", g.display());
        match (sim, want["similarities"][i].as_f64()) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-6, "{}: host {a}, numpy {b}", g.display()),
            (None, None) => {}
            (a, b) => panic!("{}: host {a:?}, numpy {b:?}", g.display()),
        }
    }
}

fn check_png(p: &Path) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", p.display());
}

#[test]
fn issue_3_eval_faces_sample_dir_matches_numpy() {
    const T: &str = "issue_3_eval_faces_sample_dir_matches_numpy";
    let (Some(()), Some(_)) = (built_or_skip(T), python_or_skip(T)) else { return };
    let dir = Dir::new("eval-faces-sample");
    let s = dir.mkdir("sample");
    let c0 = write_png(&s.join("control_image_0.png"), &solid([0.8, 0.6, 0.5]));
    let c1 = write_png(&s.join("control_image_1.png"), &gradient([0.1, 0.3, 0.9], [0.9, 0.2, 0.1]));
    // Contains "control" but is no control_image_<idx>: neither control nor sample.
    write_png(&s.join("control_notes.png"), &solid([0.5, 0.5, 0.5]));
    let g = |name: &str, px: Vec<f32>| write_png(&s.join(name), &px);
    let pairs: Expected = vec![
        (c0.clone(), g("face_000500_00_20250101120000_42.png", solid([0.2, 0.9, 0.3])), "500"),
        (c1.clone(), g("face_000500_01_20250101120001_43.png", gradient([0.9, 0.9, 0.1], [0.1, 0.1, 0.1])), "500"),
        (c0.clone(), g("face_001000_00_20250101120500_44.png", solid([0.75, 0.62, 0.52])), "1000"),
        (c1.clone(), g("face_001000_01_20250101120501_45.png", gradient([0.2, 0.3, 0.8], [0.8, 0.25, 0.15])), "1000"),
        (c0.clone(), g("face_001000_00_20250101120502_46.png", gradient([0.7, 0.5, 0.4], [0.9, 0.7, 0.6])), "1000"),
        // seed 004's own naming.
        (c0.clone(), g("generated_step_1500_0.png", solid([0.81, 0.6, 0.49])), "1500"),
        // All black: the fixture finds "no face" → an invalid pair.
        (c1.clone(), g("generated_step_1500_1.png", black()), "1500"),
        // musubi-tuner's per-epoch samples.
        (c1.clone(), g("face_e000002_01_20250101121500_47.png", gradient([0.1, 0.35, 0.85], [0.85, 0.2, 0.1])), "e2"),
    ];
    // Unmatched: no control_image_5, and a name without an index.
    g("face_002000_05_20250101122000_48.png", solid([0.3, 0.3, 0.3]));
    g("notes.png", solid([0.3, 0.4, 0.3]));

    let want = oracle(&dir, &pairs);
    let out = dir.join("out/face_metrics.json");
    let text = eval_cmd(&dir)
        .args(["--sample-dir", s.to_str().unwrap(), "--output-json", out.to_str().unwrap(), "--batch-size", "3"])
        .ok();
    let got = read_json(&out);
    check_report(&got, &want["report"]);
    assert_eq!(got["valid_pairs"], 7);
    assert_eq!(got["by_step"]["1500"]["count"], 1);
    check_csv(&dir.join("out/face_metrics.pairs.csv"), &pairs, &want);
    check_png(&dir.join("out/face_metrics.png"));

    let l = &got["likeness"];
    assert_eq!(l["metric"], "testing-color-metric");
    assert_eq!(l["mode"], "sample_dir");
    let unmatched: Vec<&str> =
        l["unmatched_generated"].as_array().unwrap().iter().map(|u| u["generated"].as_str().unwrap()).collect();
    assert_eq!(unmatched.len(), 2, "{l}");
    assert!(
        unmatched.iter().any(|u| u.ends_with("face_002000_05_20250101122000_48.png"))
            && unmatched.iter().any(|u| u.ends_with("notes.png"))
    );
    assert_eq!(l["invalid_pairs"].as_array().unwrap().len(), 1);

    // The printed summary: totals, the unmatched files, and (issue 7) no verdict: seed 004's
    // bands are ArcFace's, and this metric declares no threshold of its own.
    assert!(text.contains("8 pairs, 7 valid"), "{text}");
    assert!(text.contains("no verdict") && !text.contains("very high") && !text.contains("training target"), "{text}");
    assert_eq!((l["bands"].as_str(), l["same_person_threshold"].is_null()), (Some("none"), true), "{l}");
    assert!(
        text.contains("matched no control image") && text.contains("notes.png") && text.contains("control_image_5"),
        "{text}"
    );
    assert!(!text.contains("valid_pairs = 0"), "{text}");
}

#[test]
fn issue_3_eval_faces_control_and_generated_dirs() {
    const T: &str = "issue_3_eval_faces_control_and_generated_dirs";
    let (Some(()), Some(_)) = (built_or_skip(T), python_or_skip(T)) else { return };
    let dir = Dir::new("eval-faces-dirs");
    let (cd, gd) = (dir.mkdir("control"), dir.mkdir("generated"));
    let alice = write_png(&cd.join("alice.png"), &solid([0.8, 0.6, 0.5]));
    let bob = write_png(&cd.join("bob.png"), &gradient([0.2, 0.2, 0.7], [0.7, 0.6, 0.1]));
    write_png(&cd.join("dora.png"), &solid([0.1, 0.1, 0.1])); // matched by nothing
    let pairs: Expected = vec![
        (alice.clone(), write_png(&gd.join("alice.png"), &solid([0.78, 0.61, 0.52])), "unknown"),
        (
            alice.clone(),
            write_png(&gd.join("alice_step500.png"), &gradient([0.7, 0.5, 0.45], [0.9, 0.65, 0.55])),
            "500",
        ),
        (alice.clone(), write_png(&gd.join("alice-2.png"), &solid([0.3, 0.8, 0.8])), "unknown"),
        (bob.clone(), write_png(&gd.join("bob_step_700.png"), &gradient([0.25, 0.2, 0.65], [0.6, 0.6, 0.2])), "700"),
    ];
    write_png(&gd.join("carol.png"), &solid([0.5, 0.4, 0.3])); // unmatched
    write_png(&gd.join("alicex.png"), &solid([0.5, 0.4, 0.3])); // `alice` + no separator: unmatched

    let want = oracle(&dir, &pairs);
    let out = dir.join("r.json");
    let csv = dir.join("pairs/all.csv");
    let plot = dir.join("plots/sim.png");
    let text = eval_cmd(&dir)
        .args([
            "--control-dir",
            cd.to_str().unwrap(),
            "--generated-dir",
            gd.to_str().unwrap(),
            "--output-json",
            out.to_str().unwrap(),
        ])
        .args(["--csv", csv.to_str().unwrap(), "--plot", plot.to_str().unwrap(), "--threads", "2"])
        .ok();
    let got = read_json(&out);
    check_report(&got, &want["report"]);
    assert_eq!(got["valid_pairs"], 4);
    check_csv(&csv, &pairs, &want);
    check_png(&plot);
    assert_eq!(got["likeness"]["mode"], "control_generated_dirs");
    assert_eq!(got["likeness"]["unmatched_generated"].as_array().unwrap().len(), 2);
    assert!(text.contains("carol.png") && text.contains("alicex.png"), "{text}");
    assert!(text.contains("1 control image(s) matched no generated image"), "{text}");
}

#[test]
fn issue_3_eval_faces_no_valid_pairs_warns_with_seed_004_causes() {
    let Some(()) = built_or_skip("issue_3_eval_faces_no_valid_pairs_warns_with_seed_004_causes") else { return };
    let dir = Dir::new("eval-faces-none");
    let s = dir.mkdir("sample");
    write_png(&s.join("control_image_0.png"), &solid([0.8, 0.6, 0.5]));
    write_png(&s.join("face_000100_00_20250101120000_1.png"), &black());
    write_png(&s.join("generated_step_200_0.png"), &black());
    let out = dir.join("none.json");
    let text = eval_cmd(&dir).args(["--sample-dir", s.to_str().unwrap(), "--output-json", out.to_str().unwrap()]).ok();
    let got = read_json(&out);
    let keys: BTreeSet<&str> = got.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "total_pairs",
            "valid_pairs",
            "overall_mean",
            "overall_std",
            "overall_min",
            "overall_max",
            "by_step",
            "likeness"
        ]
        .into()
    );
    assert_eq!(got["total_pairs"], 2);
    assert_eq!(got["valid_pairs"], 0);
    for k in ["overall_mean", "overall_std", "overall_min", "overall_max"] {
        assert!(got[k].is_null(), "{k}: {got}");
    }
    assert_eq!(got["by_step"], json!({}));
    assert_eq!(got["likeness"]["error"], "No valid face pairs detected");
    assert!(text.contains("valid_pairs = 0"), "{text}");
    for cause in ["50×50", "--det-size 1024", "contain faces", "RGB"] {
        assert!(text.contains(cause), "warning lacks `{cause}`:\n{text}");
    }
    assert!(text.contains("no face found in the generated image"), "{text}");
    let rows = read_csv(&dir.join("none.pairs.csv"));
    assert!(rows.values().all(|(_, s, v)| s.is_none() && !v), "{rows:?}");
    check_png(&dir.join("none.png"));
}

#[test]
fn issue_3_eval_faces_default_metric_arcface_missing_lists_metrics() {
    let Some(()) = built_or_skip("issue_3_eval_faces_default_metric_arcface_missing_lists_metrics") else { return };
    let dir = Dir::new("eval-faces-nometric");
    // A copy of the host with no plugins/ next to it, so only --plugin-dir is searched.
    let host = dir.join("bin/host");
    std::fs::create_dir_all(host.parent().unwrap()).unwrap();
    std::fs::copy(likeness_tests::host_bin(), &host).unwrap();
    let s = dir.mkdir("sample");
    write_png(&s.join("control_image_0.png"), &solid([0.8, 0.6, 0.5]));
    write_png(&s.join("generated_step_1_0.png"), &solid([0.7, 0.6, 0.5]));
    let mut t = TestCommand::new(&host);
    t.current_dir(dir.path()).env("LIKENESS_DATA_HOME", dir.join(".home")).env("NO_COLOR", "1");
    t.args(["--plugin-dir".into(), profile_dir().join("test-plugins").to_string_lossy().into_owned()]);
    let text = t
        .args([
            "eval-faces",
            "--sample-dir",
            s.to_str().unwrap(),
            "--output-json",
            dir.join("r.json").to_str().unwrap(),
        ])
        .fails();
    assert!(text.contains("no metric plugin `arcface` found"), "{text}");
    assert!(text.contains("Available metric plugins") && text.contains("testing-color-metric"), "{text}");
    assert!(!dir.join("r.json").exists());

    // --model-name / --det-size / --metric-config reach the plugin's config (the fixture
    // accepts only `{}` or a `same_person_threshold`, so it quotes what it got).
    let text = eval_cmd(&dir)
        .args(["--sample-dir", s.to_str().unwrap(), "--output-json", dir.join("r.json").to_str().unwrap()])
        .args(["--model-name", "buffalo_s", "--det-size", "1024", "--metric-config", r#"{"extra": 1}"#])
        .fails();
    for part in [r#""model_name":"buffalo_s""#, r#""det_size":1024"#, r#""extra":1"#] {
        assert!(text.contains(part), "config lacks {part}:\n{text}");
    }
    let text = eval_cmd(&dir).args(["--sample-dir", s.to_str().unwrap(), "--metric-config", "[1]"]).fails();
    assert!(text.contains("--metric-config must be a JSON object"), "{text}");
    // No pairs at all is an error that explains the naming rule.
    let empty = dir.mkdir("empty");
    let text = eval_cmd(&dir).args(["--sample-dir", empty.to_str().unwrap()]).fails();
    assert!(text.contains("no image pairs found") && text.contains("control_image_<idx>"), "{text}");
}

/// Issue 7, part 4: the bands belong to the metric. The colour fixture declaring a threshold
/// gets a two-sided verdict around it (per step and overall), and the JSON says which
/// threshold was used; seed 004's ArcFace bands and targets are not printed for it.
#[test]
fn issue_7_eval_faces_bands_come_from_the_metrics_threshold() {
    const T: &str = "issue_7_eval_faces_bands_come_from_the_metrics_threshold";
    let Some(()) = built_or_skip(T) else { return };
    let dir = Dir::new("eval-faces-threshold");
    let (cd, gd) = (dir.mkdir("control"), dir.mkdir("generated"));
    write_png(&cd.join("alice.png"), &solid([0.8, 0.6, 0.5]));
    write_png(&cd.join("bob.png"), &solid([0.2, 0.3, 0.9]));
    // Step 100: alice vs a near copy (cosine ≈ 1); step 200: bob vs a very different colour.
    write_png(&gd.join("alice_step100.png"), &solid([0.79, 0.61, 0.5]));
    write_png(&gd.join("bob_step200.png"), &solid([0.9, 0.2, 0.1]));
    let thr = 0.95;
    let out = dir.join("r.json");
    let text = eval_cmd(&dir)
        .args(["--control-dir", cd.to_str().unwrap(), "--generated-dir", gd.to_str().unwrap()])
        .args([
            "--output-json",
            out.to_str().unwrap(),
            "--metric-config",
            &format!("{{\"same_person_threshold\": {thr}}}"),
        ])
        .ok();
    let got = read_json(&out);
    let l = &got["likeness"];
    assert_eq!(l["bands"], "metric_threshold", "{l}");
    assert_eq!(l["same_person_threshold"].as_f64(), Some(thr), "{l}");
    assert_eq!(l["declared_same_person_threshold"].as_f64(), Some(thr), "{l}");
    let verdict =
        |s: f64| if s >= thr { format!("same person (≥ {thr})") } else { format!("different person (< {thr})") };
    let mean = got["overall_mean"].as_f64().unwrap();
    assert_eq!(l["verdict"].as_str(), Some(verdict(mean).as_str()), "{l}");
    let s100 = got["by_step"]["100"]["mean"].as_f64().unwrap();
    let s200 = got["by_step"]["200"]["mean"].as_f64().unwrap();
    // The images were chosen so that the two steps fall on either side of the threshold.
    assert!(s100 >= thr && s200 < thr, "step 100: {s100}, step 200: {s200}");
    assert!(text.contains(&verdict(s100)) && text.contains(&verdict(s200)), "{text}");
    assert!(
        text.contains("declared threshold") && !text.contains("very high") && !text.contains("training target"),
        "{text}"
    );
}
