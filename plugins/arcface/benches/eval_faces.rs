//! Bench: `host eval-faces --metric arcface` against insightface 0.7.3's Python `FaceAnalysis`,
//! `get` and cosine similarity, on the same ONNX files and the same images, in one run.
//!
//!     bash scripts/bench.sh                      # set-up env + build/stage + this bench
//!     cargo bench -p likeness-plugin-arcface --bench eval_faces   # needs the env below
//!
//! Environment: `LIKENESS_PYTHON` (the project venv's python, with torch/onnx for
//! scripts/make_face_models.py and insightface==0.7.3 for tests/python/bench_insightface.py;
//! required), `LIKENESS_DATA` (default `~/.cache/likeness/data`), `ORT_DYLIB_PATH` (else the
//! venv's libonnxruntime is found as the host finds it), `LIKENESS_BENCH_RUNS` (timed runs per
//! side, default 3), `LIKENESS_BENCH_DEPTH` (recognizer depth, default `r50`).
//! The host and its staged plugin are `target/release/host` and
//! `target/release/plugins/arcface` (`bash scripts/build.sh`).
//!
//! What it does:
//! 1. generates a buffalo_l-style pack (det_10g.onnx + w600k_r50.onnx) into a temp dir with
//!    scripts/make_face_models.py;
//! 2. builds the pairs from real photos ($LIKENESS_DATA/faces/*.jpg, photos/insightface/t1.jpg):
//!    each photo is a control, its flipped / cropped / flipped-and-cropped / brightened copies
//!    are the "generated" images; every image is written fitted into 640×640 (aspect kept,
//!    top-left, black padding — the host's own `--image-size 640` rule) as PNG, so both sides
//!    decode identical pixels and the host passes them through untouched;
//! 3. one warm-up run of each side, then `LIKENESS_BENCH_RUNS` alternating timed runs of
//!    (a) `host eval-faces --control-dir --generated-dir --metric arcface --metric-config
//!    {"model_root": …}` (fresh process: wall clock of the whole command) and (b)
//!    tests/python/bench_insightface.py (fresh process; it reports its timed loop after model
//!    load + one warm-up `get`, and its import/load times);
//! 4. an in-process breakdown of our pipeline (decode / detect / align / recognise) through the
//!    plugin crate's own detector and recognizer, the same ONNX Runtime library;
//! 5. prints the table, the ratios ours/python, the ONNX Runtime thread settings of both sides,
//!    and the mean |Δ| of the per-pair similarities of the two sides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use image::{imageops, RgbImage};
use serde_json::Value;

const SIZE: u32 = 640;

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("bench eval_faces: error: {msg}");
    std::process::exit(1)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|e| fail(format!("repo root: {e}")))
}

fn python() -> PathBuf {
    match std::env::var_os("LIKENESS_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
        Some(p) => fail(format!(
            "LIKENESS_PYTHON={} does not exist; run `bash scripts/setup.sh` (or scripts/bench.sh, which sets it)",
            Path::new(&p).display()
        )),
        None => fail(
            "LIKENESS_PYTHON is not set: it must name the project venv's python (torch, onnx, insightface==0.7.3); \
                      run `bash scripts/bench.sh`, or `source scripts/common.sh` first",
        ),
    }
}

fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LIKENESS_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("LIKENESS_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| fail("neither LIKENESS_DATA nor HOME is set")))
            .join(".cache/likeness")
    });
    home.join("data")
}

fn target_release() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target")).join("release")
}

/// Runs `cmd`, fails with its output when it fails; returns (stdout, seconds).
fn run(cmd: &mut Command, what: &str) -> (String, f64) {
    let t = Instant::now();
    let o = cmd.output().unwrap_or_else(|e| fail(format!("cannot start {what}: {e}")));
    let s = t.elapsed().as_secs_f64();
    if !o.status.success() {
        fail(format!(
            "{what} failed ({}):\n{:?}\n--- stdout\n{}\n--- stderr\n{}",
            o.status,
            cmd,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    (String::from_utf8_lossy(&o.stdout).into_owned(), s)
}

/// The host's `--image-size` rule (core/engine/src/eval_faces.rs `load_image`): fit into
/// SIZE×SIZE, aspect kept, bilinear (Triangle), top-left, black padding.
fn letterbox(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = (SIZE as f64 / w as f64).min(SIZE as f64 / h as f64);
    let nw = ((w as f64 * scale).round() as u32).clamp(1, SIZE);
    let nh = ((h as f64 * scale).round() as u32).clamp(1, SIZE);
    let r = imageops::resize(img, nw, nh, imageops::FilterType::Triangle);
    let mut canvas = RgbImage::new(SIZE, SIZE);
    imageops::replace(&mut canvas, &r, 0, 0);
    canvas
}

fn crop(img: &RgbImage, fx: f64, fy: f64, frac: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cw, ch) = ((w as f64 * frac) as u32, (h as f64 * frac) as u32);
    let (x, y) = (((w - cw) as f64 * fx) as u32, ((h - ch) as f64 * fy) as u32);
    imageops::crop_imm(img, x, y, cw, ch).to_image()
}

/// Controls in `<dir>/control`, generated copies in `<dir>/generated`; returns the pairs
/// (control, generated) in the host's order (generated files sorted by path).
fn make_images(data: &Path, dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(data.join("faces"))
        .unwrap_or_else(|e| {
            fail(format!(
                "{}: {e} (run `bash scripts/setup.sh` to fetch the demo photos)",
                data.join("faces").display()
            ))
        })
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    sources.sort();
    sources.push(data.join("photos/insightface/t1.jpg"));
    let (cdir, gdir) = (dir.join("control"), dir.join("generated"));
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::create_dir_all(&gdir).unwrap();
    let mut pairs = Vec::new();
    for src in &sources {
        let img = image::open(src).unwrap_or_else(|e| fail(format!("{}: {e}", src.display()))).to_rgb8();
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let control = cdir.join(format!("{stem}.png"));
        letterbox(&img).save(&control).unwrap();
        let mut bright = img.clone();
        for p in bright.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = (*c as f32 * 1.15).min(255.0) as u8;
            }
        }
        let variants: [(&str, RgbImage); 4] = [
            ("flip", imageops::flip_horizontal(&img)),
            ("crop90", crop(&img, 0.5, 0.3, 0.9)),
            ("flipcrop85", crop(&imageops::flip_horizontal(&img), 0.4, 0.2, 0.85)),
            ("bright", bright),
        ];
        for (name, v) in variants {
            let g = gdir.join(format!("{stem}_{name}.png"));
            letterbox(&v).save(&g).unwrap();
            pairs.push((control.clone(), g));
        }
    }
    pairs.sort_by(|a, b| a.1.cmp(&b.1));
    pairs
}

/// The best (smallest) of the runs: other load on the machine only ever adds time.
fn best(v: &mut [f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct HostRun {
    wall: f64,
    /// `likeness.seconds` of the JSON: eval_faces() itself (plugin open included).
    inner: f64,
    images: usize,
    sims: HashMap<String, Option<f64>>,
}

fn host_run(host: &Path, plugin_dir: &Path, img_dir: &Path, model_root: &Path, out: &Path) -> HostRun {
    let json = out.join("host.json");
    let csv = out.join("host.pairs.csv");
    let cfg = serde_json::json!({"model_root": model_root}).to_string();
    let (_, wall) = run(
        Command::new(host)
            .args([
                "eval-faces",
                "--metric",
                "arcface",
                "--metric-config",
                &cfg,
                "--det-size",
                "640",
                "--device",
                "cpu",
                "--no-progress",
            ])
            .arg("--plugin-dir")
            .arg(plugin_dir)
            .arg("--control-dir")
            .arg(img_dir.join("control"))
            .arg("--generated-dir")
            .arg(img_dir.join("generated"))
            .arg("--output-json")
            .arg(&json)
            .arg("--csv")
            .arg(&csv)
            .arg("--plot")
            .arg(out.join("host.png")),
        "host eval-faces",
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mut sims = HashMap::new();
    let text = std::fs::read_to_string(&csv).unwrap();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let g = Path::new(f[1]).file_name().unwrap().to_string_lossy().into_owned();
        sims.insert(g, f[3].parse::<f64>().ok());
    }
    HostRun {
        wall,
        inner: v["likeness"]["seconds"].as_f64().unwrap_or(f64::NAN),
        images: v["likeness"]["images"].as_u64().unwrap_or(0) as usize,
        sims,
    }
}

struct PyRun {
    wall: f64,
    v: Value,
}

fn py_run(py: &Path, model_root: &Path, pairs_json: &Path) -> PyRun {
    let (stdout, wall) = run(
        Command::new(py)
            .arg(repo().join("tests/python/bench_insightface.py"))
            .arg("--models")
            .arg(model_root)
            .arg("--pairs")
            .arg(pairs_json)
            .args(["--det-size", "640"]),
        "tests/python/bench_insightface.py",
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| fail(format!("bench_insightface.py printed no JSON:\n{stdout}")));
    PyRun { wall, v: serde_json::from_str(line).unwrap() }
}

/// Our pipeline in-process (the plugin crate's detector, aligner and recognizer; same ONNX
/// Runtime library as the host): where the time goes, after one warm-up image.
fn breakdown(model_root: &Path, images: &[PathBuf]) -> Value {
    use likeness_plugin_arcface::align::{norm_crop_u8, WarpKernel};
    use likeness_plugin_arcface::detector::{Detector, Provider};
    use likeness_plugin_arcface::recognizer::Recognizer;
    use likeness_plugin_arcface::scrfd::FaceChoice;
    let pack = model_root.join("buffalo_l");
    let t = Instant::now();
    let mut det = Detector::load(&pack.join("det_10g.onnx"), Provider::Cpu, 640, 0.5)
        .unwrap_or_else(|e| fail(format!("detector: {}", e.message)));
    let mut rec = Recognizer::load(&pack.join("w600k_r50.onnx"), Provider::Cpu)
        .unwrap_or_else(|e| fail(format!("recognizer: {}", e.message)));
    let load = t.elapsed().as_secs_f64();
    let (mut t_dec, mut t_det, mut t_align, mut t_rec) = (0.0, 0.0, 0.0, 0.0);
    let mut one = |p: &Path, acc: bool| {
        let t0 = Instant::now();
        let img = image::open(p).unwrap().to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let rgb = img.into_raw();
        let t1 = Instant::now();
        let dets = det.detect(&rgb, w, h, 1, FaceChoice::Default).unwrap();
        let t2 = Instant::now();
        let mut crops = Vec::new();
        for d in dets.iter().take(1) {
            crops.push(
                norm_crop_u8(&rgb, w, h, 3, d.kps.as_ref().unwrap(), rec.input_size, WarpKernel::default()).unwrap().0,
            );
        }
        let t3 = Instant::now();
        let _ = rec.embed(&crops).unwrap();
        let t4 = Instant::now();
        if acc {
            t_dec += (t1 - t0).as_secs_f64();
            t_det += (t2 - t1).as_secs_f64();
            t_align += (t3 - t2).as_secs_f64();
            t_rec += (t4 - t3).as_secs_f64();
        }
    };
    one(&images[0], false);
    let t = Instant::now();
    for p in images {
        one(p, true);
    }
    let total = t.elapsed().as_secs_f64();
    serde_json::json!({"load_seconds": load, "seconds": total, "images_per_s": images.len() as f64 / total,
        "decode_seconds": t_dec, "detect_seconds": t_det, "align_seconds": t_align, "recognise_seconds": t_rec})
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let py = python();
    let data = data_dir();
    let runs: usize = std::env::var("LIKENESS_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let depth = std::env::var("LIKENESS_BENCH_DEPTH").unwrap_or_else(|_| "r50".into());
    let rel = target_release();
    let host = rel.join("host");
    let plugin_dir = rel.join("plugins");
    if !host.is_file() || !plugin_dir.join("arcface/plugin.toml").is_file() {
        fail(format!(
            "{} or {} is missing: run `bash scripts/build.sh` (scripts/bench.sh does)",
            host.display(),
            plugin_dir.join("arcface").display()
        ));
    }
    if std::env::var_os("ORT_DYLIB_PATH").is_none_or(|p| p.is_empty()) {
        if let Some(p) = likeness_sdk_onnx::find_onnxruntime_library() {
            std::env::set_var("ORT_DYLIB_PATH", p);
        }
    }
    let load_avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into());
    let tmp = tempfile::tempdir().unwrap();
    let model_root = tmp.path().join("models");
    let img_dir = tmp.path().join("images");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    eprintln!("[bench] generating buffalo_l ({depth}) ONNX files with scripts/make_face_models.py …");
    run(
        Command::new(&py).arg(repo().join("scripts/make_face_models.py")).arg("--out").arg(&model_root).args([
            "--pack",
            "buffalo_l",
            "--depth",
            &depth,
        ]),
        "scripts/make_face_models.py",
    );
    let pairs = make_images(&data, &img_dir);
    let pairs_json = tmp.path().join("pairs.json");
    let list: Vec<Value> = pairs.iter().map(|(c, g)| serde_json::json!({"control": c, "generated": g})).collect();
    std::fs::write(&pairs_json, serde_json::to_string(&list).unwrap()).unwrap();
    let mut distinct: Vec<PathBuf> = Vec::new();
    for (c, g) in &pairs {
        for p in [c, g] {
            if !distinct.contains(p) {
                distinct.push(p.clone());
            }
        }
    }
    eprintln!(
        "[bench] {} pairs, {} distinct images (640×640 PNG) from {}",
        pairs.len(),
        distinct.len(),
        data.display()
    );

    eprintln!("[bench] warm-up: one run of each side …");
    let _ = host_run(&host, &plugin_dir, &img_dir, &model_root, &out);
    let _ = py_run(&py, &model_root, &pairs_json);
    let (mut hs, mut ps) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("[bench] run {}/{runs} …", i + 1);
        hs.push(host_run(&host, &plugin_dir, &img_dir, &model_root, &out));
        ps.push(py_run(&py, &model_root, &pairs_json));
    }
    eprintln!("[bench] in-process breakdown of our pipeline …");
    let ours_bd = breakdown(&model_root, &distinct);

    // Similarities: host (last run) vs python (last run), by generated file name.
    let host_sims = &hs.last().unwrap().sims;
    let py_last = &ps.last().unwrap().v;
    let py_sims: Vec<Option<f64>> = py_last["similarities"].as_array().unwrap().iter().map(|s| s.as_f64()).collect();
    let (mut sum, mut maxd, mut both, mut disagree) = (0.0, 0.0f64, 0usize, 0usize);
    for ((_, g), ps_) in pairs.iter().zip(&py_sims) {
        let key = g.file_name().unwrap().to_string_lossy().into_owned();
        match (host_sims.get(&key).copied().flatten(), ps_) {
            (Some(a), Some(b)) => {
                let d = (a - b).abs();
                sum += d;
                maxd = maxd.max(d);
                both += 1;
            }
            (None, None) => {}
            _ => disagree += 1,
        }
    }

    let images = hs[0].images;
    let py_images = py_last["images"].as_u64().unwrap_or(0) as usize;
    let h_wall = best(&mut hs.iter().map(|r| r.wall).collect::<Vec<_>>());
    let h_inner = best(&mut hs.iter().map(|r| r.inner).collect::<Vec<_>>());
    let p_loop = best(&mut ps.iter().map(|r| r.v["seconds"].as_f64().unwrap()).collect::<Vec<_>>());
    let p_wall = best(&mut ps.iter().map(|r| r.wall).collect::<Vec<_>>());
    let f = |k: &str| best(&mut ps.iter().map(|r| r.v[k].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
    let (p_import, p_load, p_dec, p_det, p_rec) =
        (f("import_seconds"), f("load_seconds"), f("decode_seconds"), f("detect_seconds"), f("recognise_seconds"));
    let o = |k: &str| ours_bd[k].as_f64().unwrap_or(f64::NAN);

    println!();
    println!("eval-faces bench: {} pairs, {images} images (python: {py_images}), det_size 640, buffalo_l-style ONNX ({depth} recognizer, stand-in detector), CPU, {} core(s), best of {runs} run(s) after 1 warm-up; load average at start {}",
        pairs.len(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), load_avg);
    println!();
    println!("{:<58} {:>9} {:>10}", "side / what is timed", "seconds", "images/s");
    let row = |name: &str, s: f64, n: usize| println!("{:<58} {:>9.3} {:>10.2}", name, s, n as f64 / s);
    row("ours   host eval-faces, whole process (wall)", h_wall, images);
    row("ours   eval_faces() (plugin open + decode + embed + write)", h_inner, images);
    row("ours   in-process pipeline loop (after load + warm-up)", o("seconds"), distinct.len());
    row("python whole process (import + load + warm-up + loop)", p_wall, py_images);
    row("python FaceAnalysis.get loop (after load + warm-up)", p_loop, py_images);
    println!(
        "  (medians: host process {:.3} s, python loop {:.3} s; runs: host {:?}, python loop {:?})",
        median(&mut hs.iter().map(|r| r.wall).collect::<Vec<_>>()),
        median(&mut ps.iter().map(|r| r.v["seconds"].as_f64().unwrap()).collect::<Vec<_>>()),
        hs.iter().map(|r| (r.wall * 100.0).round() / 100.0).collect::<Vec<_>>(),
        ps.iter().map(|r| (r.v["seconds"].as_f64().unwrap() * 100.0).round() / 100.0).collect::<Vec<_>>()
    );
    println!();
    println!("ratio ours/python, images/s:");
    println!(
        "  host process (everything) vs python loop (load excluded):   {:.2}x",
        (images as f64 / h_wall) / (py_images as f64 / p_loop)
    );
    println!(
        "  steady state: our pipeline loop vs python loop:             {:.2}x",
        (distinct.len() as f64 / o("seconds")) / (py_images as f64 / p_loop)
    );
    println!(
        "  end to end: host process vs python process:                 {:.2}x",
        (images as f64 / h_wall) / (py_images as f64 / p_wall)
    );
    println!();
    println!("where the time goes (seconds per run, {} images):", distinct.len());
    println!("  {:<8} {:>8} {:>8} {:>8} {:>8} {:>10}", "", "load", "decode", "detect", "align", "recognise");
    println!(
        "  {:<8} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>10.3}",
        "ours",
        o("load_seconds"),
        o("decode_seconds"),
        o("detect_seconds"),
        o("align_seconds"),
        o("recognise_seconds")
    );
    println!(
        "  {:<8} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>10.3}   (+ import {:.3} s; python's recognise includes align)",
        "python", p_load, p_dec, p_det, "-", p_rec, p_import
    );
    println!();
    println!("ONNX Runtime threads: both sides load the same libonnxruntime {} ({}) and create sessions with default options",
        py_last["onnxruntime"].as_str().unwrap_or("?"),
        std::env::var("ORT_DYLIB_PATH").unwrap_or_default());
    println!("  (intra_op_num_threads = {} on the python side, unset on ours: 0 = ONNX Runtime's default, one thread per physical core; inter-op sequential)",
        py_last["intra_op_threads"]);
    println!(
        "  the host also decodes images on {} thread(s) (--threads 0 = one per CPU) while ONNX Runtime runs",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    println!(
        "similarities: {both} pairs valid on both sides, {disagree} valid on one side only; mean |ours − python| = {:.3e}, max = {:.3e}",
        if both > 0 { sum / both as f64 } else { f64::NAN },
        maxd
    );
    println!(
        "  mean similarity: ours {:?}, python {}",
        {
            let v: Vec<f64> = host_sims.values().flatten().copied().collect();
            if v.is_empty() {
                None
            } else {
                Some(v.iter().sum::<f64>() / v.len() as f64)
            }
        },
        py_last["mean_similarity"]
    );
}
