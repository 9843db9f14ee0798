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
//!    Where the CPU has AVX512_BF16, the host also runs with `precision = "bf16"`;
//!    then both sides again, as whole processes, on the set replicated 3× (copies under new
//!    names): the difference of the wall clocks over the extra images is each side's steady-state
//!    cost per image with every fixed cost (start, imports, model load, warm-up) cancelled — the
//!    headline ratio, "steady state, measured as whole processes";
//! 4. in-process variants of our pipeline (decode / detect / align / recognise) through the
//!    plugin crate's own detector and recognizers, the same ONNX Runtime library: fp32 per
//!    image with ONNX Runtime's default options (as landed), with intra-op spinning off, with
//!    all faces in one recognizer batch, and bf16 (libtorch) in one batch;
//! 5. prints the table, the ratios ours/python (steady state and end to end, fp32 and bf16),
//!    detection+embedding images/s, the bf16-vs-fp32 decisions at seed 004's bands on the
//!    eval set and on every face of the real photos, the recognizer's FLOPs against the
//!    measured peak, the ONNX Runtime thread settings of both sides, and the mean |Δ| of the
//!    per-pair similarities of the two sides.

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

/// The pair set `k` times over, as new files under `dst` (`<stem>_r<j>.png` controls,
/// `<stem>_r<j><variant>.png` generated): each copy is decoded and embedded again by both sides
/// (they embed each distinct path once), so a run on it does `k` times the per-image work with
/// the same fixed costs (start, import, model load, warm-up).
fn replicate(pairs: &[(PathBuf, PathBuf)], dst: &Path, k: usize) -> Vec<(PathBuf, PathBuf)> {
    let (cdir, gdir) = (dst.join("control"), dst.join("generated"));
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::create_dir_all(&gdir).unwrap();
    let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for j in 0..k {
        for (c, g) in pairs {
            let (cs, gs) = (stem(c), stem(g));
            let rest = gs.strip_prefix(&cs).unwrap_or_else(|| fail(format!("{gs} does not start with {cs}")));
            let (c2, g2) = (cdir.join(format!("{cs}_r{j}.png")), gdir.join(format!("{cs}_r{j}{rest}.png")));
            if !c2.exists() {
                std::fs::copy(c, &c2).unwrap();
            }
            std::fs::copy(g, &g2).unwrap();
            out.push((c2, g2));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
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

fn host_run(host: &Path, plugin_dir: &Path, img_dir: &Path, model_root: &Path, out: &Path, precision: &str) -> HostRun {
    let json = out.join("host.json");
    let csv = out.join("host.pairs.csv");
    let cfg = serde_json::json!({"model_root": model_root, "precision": precision}).to_string();
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

/// One in-process variant of our pipeline (the plugin crate's detector, aligner and
/// recognizers; the same ONNX Runtime library as the host).
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    /// ONNX Runtime intra-op spinning (its default: on).
    spinning: bool,
    /// All faces of all images in one recognizer call (else one call per image, as python).
    batched: bool,
    bf16: bool,
}

/// Our pipeline in-process, one `variant`: where the time goes, after one warm-up image, and
/// each image's embedding (`None`: no face).
fn breakdown(model_root: &Path, images: &[PathBuf], v: Variant) -> (Value, Vec<Option<Vec<f32>>>) {
    use likeness_plugin_arcface::align::{norm_crop_u8, WarpKernel};
    use likeness_plugin_arcface::bf16::Bf16Recognizer;
    use likeness_plugin_arcface::detector::{Detector, Provider, SessionOptions};
    use likeness_plugin_arcface::recognizer::Recognizer;
    use likeness_plugin_arcface::scrfd::FaceChoice;
    let pack = model_root.join("buffalo_l");
    let opts = SessionOptions { intra_spinning: v.spinning, ..SessionOptions::default() };
    let t = Instant::now();
    let mut det = Detector::load_with(&pack.join("det_10g.onnx"), Provider::Cpu, 640, 0.5, &opts)
        .unwrap_or_else(|e| fail(format!("detector: {}", e.message)));
    let mut rec = Recognizer::load_with(&pack.join("w600k_r50.onnx"), Provider::Cpu, &opts)
        .unwrap_or_else(|e| fail(format!("recognizer: {}", e.message)));
    let bf = v.bf16.then(|| {
        Bf16Recognizer::load(&pack.join("w600k_r50.onnx"), rec.input_size, rec.input_mean, rec.input_std)
            .unwrap_or_else(|e| fail(format!("bf16 recognizer: {}", e.message)))
    });
    let load = t.elapsed().as_secs_f64();
    let side = rec.input_size;
    let mut embed = |crops: &[Vec<u8>]| -> Vec<Vec<f32>> {
        match &bf {
            Some(b) => b.embed(crops).unwrap(),
            None => rec.embed(crops).unwrap(),
        }
    };
    let (mut t_dec, mut t_det, mut t_align, mut t_rec) = (0.0, 0.0, 0.0, 0.0);
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut has_face: Vec<bool> = Vec::new();
    let mut embs: Vec<Option<Vec<f32>>> = Vec::new();
    let mut run = |list: &[PathBuf], acc: bool| {
        let mut t_rec_here = 0.0;
        let (mut d0, mut d1, mut d2) = (0.0, 0.0, 0.0);
        for p in list {
            let t0 = Instant::now();
            let img = image::open(p).unwrap().to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let rgb = img.into_raw();
            let t1 = Instant::now();
            let dets = det.detect(&rgb, w, h, 1, FaceChoice::Default).unwrap();
            let t2 = Instant::now();
            let mut crops = Vec::new();
            for d in dets.iter().take(1) {
                let c = norm_crop_u8(&rgb, w, h, 3, d.kps.as_ref().unwrap(), side, WarpKernel::default());
                crops.push(c.unwrap().0);
            }
            let t3 = Instant::now();
            d0 += (t1 - t0).as_secs_f64();
            d1 += (t2 - t1).as_secs_f64();
            d2 += (t3 - t2).as_secs_f64();
            if acc {
                has_face.push(!crops.is_empty());
            }
            if v.batched {
                pending.extend(crops);
            } else if !crops.is_empty() {
                let t4 = Instant::now();
                let e = embed(&crops);
                t_rec_here += t4.elapsed().as_secs_f64();
                if acc {
                    embs.extend(e.into_iter().map(Some));
                }
            }
        }
        if v.batched && !pending.is_empty() {
            let t4 = Instant::now();
            let e = embed(&pending);
            t_rec_here += t4.elapsed().as_secs_f64();
            pending.clear();
            if acc {
                embs.extend(e.into_iter().map(Some));
            }
        }
        if acc {
            t_dec += d0;
            t_det += d1;
            t_align += d2;
            t_rec += t_rec_here;
        }
    };
    run(&images[..1], false);
    let t = Instant::now();
    run(images, true);
    let total = t.elapsed().as_secs_f64();
    let mut it = embs.into_iter();
    let per_image: Vec<Option<Vec<f32>>> =
        has_face.iter().map(|&f| if f { it.next().flatten() } else { None }).collect();
    let faces = per_image.iter().flatten().count();
    let json = serde_json::json!({"name": v.name, "load_seconds": load, "seconds": total,
        "images_per_s": images.len() as f64 / total, "faces": faces,
        "decode_seconds": t_dec, "detect_seconds": t_det, "align_seconds": t_align, "recognise_seconds": t_rec});
    (json, per_image)
}

/// Every face of every real photo ($LIKENESS_DATA/photos/*/*.{jpg,png}), aligned: the crops
/// of the "real photos' pairs" decision check.
fn photo_crops(data: &Path, model_root: &Path) -> Vec<(String, Vec<u8>)> {
    use likeness_plugin_arcface::align::{norm_crop_u8, WarpKernel};
    use likeness_plugin_arcface::detector::{Detector, Provider};
    use likeness_plugin_arcface::scrfd::FaceChoice;
    let mut det = Detector::load(&model_root.join("buffalo_l/det_10g.onnx"), Provider::Cpu, 640, 0.5)
        .unwrap_or_else(|e| fail(format!("detector: {}", e.message)));
    let mut files: Vec<PathBuf> = ["face_recognition", "insightface"]
        .iter()
        .flat_map(|d| std::fs::read_dir(data.join("photos").join(d)).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "png"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let Ok(img) = image::open(&f) else { continue };
        let img = img.to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let rgb = img.into_raw();
        for (k, d) in det.detect(&rgb, w, h, 0, FaceChoice::Default).unwrap().iter().enumerate() {
            let c = norm_crop_u8(&rgb, w, h, 3, d.kps.as_ref().unwrap(), 112, WarpKernel::default()).unwrap().0;
            out.push((format!("{}#{k}", f.file_name().unwrap().to_string_lossy()), c));
        }
    }
    out
}

/// Seed 004's band boundaries, the decisions `eval-faces` prints (≥ 0.6: "possibly same person").
const BANDS: [f64; 3] = [0.4, 0.6, 0.8];

fn band_of(s: f64) -> usize {
    BANDS.iter().filter(|&&b| s >= b).count()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    likeness_plugin_arcface::recognizer::cosine(a, b)
}

/// (pairs, same-person flips at 0.6, band changes, max |Δ similarity|) of two embeddings of the
/// same items, over the `pairs` (index pairs).
fn flips(a: &[Vec<f32>], b: &[Vec<f32>], pairs: &[(usize, usize)]) -> (usize, usize, usize, f64) {
    let (mut same, mut band, mut dmax) = (0, 0, 0f64);
    for &(i, j) in pairs {
        let (sa, sb) = (dot(&a[i], &a[j]), dot(&b[i], &b[j]));
        same += usize::from((sa >= BANDS[1]) != (sb >= BANDS[1]));
        band += usize::from(band_of(sa) != band_of(sb));
        dmax = dmax.max((sa - sb).abs());
    }
    (pairs.len(), same, band, dmax)
}

/// Single-core peak of fused multiply-adds, measured: 12 independent accumulator chains held in
/// named registers (an array of accumulators gets spilled and runs at half speed) — enough to
/// cover the FMA latency (4 cycles) × 2 ports of any AVX-512 core — of `_mm512_fmadd_ps` (fp32,
/// 32 flops per instruction) or `_mm512_dpbf16_ps` (bf16 pairs into fp32, 64 flops per
/// instruction). AMX tiles (oneDNN's bf16 path on CPUs with AMX) are not measured here.
#[cfg(target_arch = "x86_64")]
fn peak_flops_one_core(bf16: bool) -> Option<f64> {
    use std::arch::x86_64::*;
    macro_rules! chains {
        ($op:expr, $iters:expr) => {{
            let z = _mm512_set1_ps(0.0);
            let (mut x0, mut x1, mut x2, mut x3, mut x4, mut x5) = (z, z, z, z, z, z);
            let (mut x6, mut x7, mut x8, mut x9, mut x10, mut x11) = (z, z, z, z, z, z);
            for _ in 0..$iters {
                x0 = $op(x0);
                x1 = $op(x1);
                x2 = $op(x2);
                x3 = $op(x3);
                x4 = $op(x4);
                x5 = $op(x5);
                x6 = $op(x6);
                x7 = $op(x7);
                x8 = $op(x8);
                x9 = $op(x9);
                x10 = $op(x10);
                x11 = $op(x11);
            }
            [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11].iter().map(|x| _mm512_reduce_add_ps(*x)).sum::<f32>()
        }};
    }
    #[target_feature(enable = "avx512f")]
    fn fma(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(1.0000001), _mm512_set1_ps(0.9999999));
        chains!(|x| _mm512_fmadd_ps(x, a, b), iters)
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dp(iters: u64) -> f32 {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        chains!(|x| _mm512_dpbf16_ps(x, a, a), iters)
    }
    let ok = if bf16 { is_x86_feature_detected!("avx512bf16") } else { is_x86_feature_detected!("avx512f") };
    if !ok {
        return None;
    }
    let iters = 20_000_000u64;
    let run = || {
        let t = Instant::now();
        // SAFETY: the features each function enables were detected above.
        let r = unsafe {
            if bf16 {
                dp(iters)
            } else {
                fma(iters)
            }
        };
        std::hint::black_box(r);
        t.elapsed().as_secs_f64()
    };
    let s = (0..3).map(|_| run()).fold(f64::INFINITY, f64::min);
    Some((iters * 12 * if bf16 { 64 } else { 32 }) as f64 / s)
}

#[cfg(not(target_arch = "x86_64"))]
fn peak_flops_one_core(_bf16: bool) -> Option<f64> {
    None
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
    let has_bf16 = likeness_plugin_arcface::bf16::cpu_has_bf16();
    let _ = host_run(&host, &plugin_dir, &img_dir, &model_root, &out, "fp32");
    let _ = py_run(&py, &model_root, &pairs_json);
    if has_bf16 {
        let _ = host_run(&host, &plugin_dir, &img_dir, &model_root, &out, "bf16");
    }
    // Steady state measured as whole processes (issue 14, part 6): both sides also run, as
    // fresh processes, on the set replicated REPLICAS times; (wall(big) − wall(small)) / (extra
    // images) is each side's cost per image with every fixed cost cancelled (process start,
    // python's imports, model load, warm-up): what a user's long eval pays. The four runs of an
    // iteration are interleaved so that a burst of other load on the machine hits all of them.
    const REPLICAS: usize = 3;
    let big_dir = tmp.path().join("images-x3");
    let big_pairs = replicate(&pairs, &big_dir, REPLICAS);
    let big_json = tmp.path().join("pairs-x3.json");
    let big_list: Vec<Value> =
        big_pairs.iter().map(|(c, g)| serde_json::json!({"control": c, "generated": g})).collect();
    std::fs::write(&big_json, serde_json::to_string(&big_list).unwrap()).unwrap();
    let (mut hs, mut ps, mut hb) = (Vec::new(), Vec::new(), Vec::new());
    let (mut h_big, mut p_big) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("[bench] run {}/{runs} (set and set ×{REPLICAS}, both sides) …", i + 1);
        hs.push(host_run(&host, &plugin_dir, &img_dir, &model_root, &out, "fp32"));
        ps.push(py_run(&py, &model_root, &pairs_json));
        h_big.push(host_run(&host, &plugin_dir, &big_dir, &model_root, &out, "fp32"));
        p_big.push(py_run(&py, &model_root, &big_json));
        if has_bf16 {
            hb.push(host_run(&host, &plugin_dir, &img_dir, &model_root, &out, "bf16"));
        }
    }
    eprintln!("[bench] in-process variants of our pipeline …");
    let mut variants = vec![
        Variant {
            name: "fp32 ORT, per image, ORT default options (as landed)",
            spinning: true,
            batched: false,
            bf16: false,
        },
        Variant { name: "fp32 ORT, per image, intra-op spinning off", spinning: false, batched: false, bf16: false },
        Variant { name: "fp32 ORT, all faces in one batch, spinning off", spinning: false, batched: true, bf16: false },
    ];
    if has_bf16 {
        variants.push(Variant {
            name: "bf16 libtorch, all faces in one batch, spinning off",
            spinning: false,
            batched: true,
            bf16: true,
        });
    }
    let mut bds: Vec<(Value, Vec<Option<Vec<f32>>>)> = Vec::new();
    for v in &variants {
        let mut best_run: Option<(Value, Vec<Option<Vec<f32>>>)> = None;
        for _ in 0..runs {
            let r = breakdown(&model_root, &distinct, *v);
            if best_run.as_ref().is_none_or(|b| r.0["seconds"].as_f64() < b.0["seconds"].as_f64()) {
                best_run = Some(r);
            }
        }
        bds.push(best_run.unwrap());
    }
    let ours_bd = bds[0].0.clone();

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

    // ---- the variants, the headline ratios, decisions, FLOP/s ------------------------------
    let py_ips = py_images as f64 / p_loop;
    println!();
    println!(
        "in-process variants (best of {runs}; steady state = after load + one warm-up image) vs python loop {:.3} s:",
        p_loop
    );
    println!(
        "  {:<56} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>9}",
        "variant", "loop s", "decode", "detect", "align", "recog.", "ratio", "det+emb/s"
    );
    for (b, _) in &bds {
        let g = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:<56} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.3} {:>6.2}x {:>9.2}",
            b["name"].as_str().unwrap_or("?"),
            g("seconds"),
            g("decode_seconds"),
            g("detect_seconds"),
            g("align_seconds"),
            g("recognise_seconds"),
            (distinct.len() as f64 / g("seconds")) / py_ips,
            distinct.len() as f64 / (g("detect_seconds") + g("align_seconds") + g("recognise_seconds"))
        );
    }
    let py_det_emb = py_images as f64 / (p_det + p_rec);
    println!("  python FaceAnalysis.get: detect+recognise {:.2} images/s", py_det_emb);
    let steady = |b: &Value| (distinct.len() as f64 / b["seconds"].as_f64().unwrap()) / py_ips;
    let best_fp32 =
        bds.iter().filter(|(b, _)| !b["name"].as_str().unwrap().starts_with("bf16")).map(|(b, _)| steady(b));
    let best_fp32 = best_fp32.fold(0.0, f64::max);
    let extra = (h_big[0].images.saturating_sub(images)) as f64;
    let h_marginal = (best(&mut h_big.iter().map(|r| r.wall).collect::<Vec<_>>()) - h_wall) / extra;
    let p_marginal = (best(&mut p_big.iter().map(|r| r.wall).collect::<Vec<_>>()) - p_wall) / extra;
    println!();
    println!(
        "steady state as whole processes ({images} and {} images, (best wall(big) − best wall(small)) / {extra} images):",
        h_big[0].images
    );
    println!("  host eval-faces {:.1} ms/image, python {:.1} ms/image", 1e3 * h_marginal, 1e3 * p_marginal);
    println!();
    println!("HEADLINE ratios ours/python, images/s (goal ≥ 2x steady state, measured as whole processes):");
    println!(
        "  steady state fp32, host process vs python process:           {:.2}x   (ours/best in-process fp32 variant: {:.2})",
        p_marginal / h_marginal,
        (p_marginal / h_marginal) / best_fp32.max(f64::MIN_POSITIVE)
    );
    println!("  steady state fp32 (best in-process fp32 variant vs python loop): {best_fp32:.2}x");
    if has_bf16 {
        println!(
            "  steady state bf16 (precision = \"bf16\"):                      {:.2}x",
            steady(&bds.last().unwrap().0)
        );
        let hb_wall = best(&mut hb.iter().map(|r| r.wall).collect::<Vec<_>>());
        println!(
            "  end to end fp32: host process vs python process:             {:.2}x",
            (images as f64 / h_wall) / (py_images as f64 / p_wall)
        );
        println!(
            "  end to end bf16: host process vs python process:             {:.2}x   (host bf16 best {hb_wall:.3} s)",
            (hb[0].images as f64 / hb_wall) / (py_images as f64 / p_wall)
        );
        println!(
            "  host process bf16 vs python loop (load excluded):            {:.2}x",
            (hb[0].images as f64 / hb_wall) / py_ips
        );
    } else {
        println!("  bf16: not measured: this CPU has no AVX512_BF16 (precision = \"auto\" runs fp32 here)");
        println!(
            "  end to end fp32: host process vs python process:             {:.2}x",
            (images as f64 / h_wall) / (py_images as f64 / p_wall)
        );
    }

    // Decisions at the metric's thresholds, fp32 (ORT) vs bf16 (libtorch) embeddings.
    if has_bf16 {
        use likeness_plugin_arcface::bf16::Bf16Recognizer;
        use likeness_plugin_arcface::recognizer::Recognizer;
        let (f32e, bfe) = (&bds[2].1, &bds.last().unwrap().1);
        let mut min_cos = 1f64;
        for (a, b) in f32e.iter().zip(bfe) {
            if let (Some(a), Some(b)) = (a, b) {
                min_cos = min_cos.min(dot(a, b));
            }
        }
        let idx = |p: &PathBuf| distinct.iter().position(|d| d == p).unwrap();
        let ev: Vec<(usize, usize)> = pairs
            .iter()
            .map(|(c, g)| (idx(c), idx(g)))
            .filter(|&(i, j)| f32e[i].is_some() && f32e[j].is_some())
            .collect();
        let fill = |v: &[Option<Vec<f32>>]| v.iter().map(|e| e.clone().unwrap_or_default()).collect::<Vec<_>>();
        let (n, same, band, dmax) = flips(&fill(f32e), &fill(bfe), &ev);
        println!();
        println!("bf16 vs fp32 decisions (bands 0.4 / 0.6 / 0.8; 'same person' = ≥ 0.6):");
        println!("  eval set: {n} pairs: {same} same-person flips, {band} band changes, max |Δ sim| {dmax:.2e}; min embedding cosine {min_cos:.6}");
        let crops = photo_crops(&data, &model_root);
        let pack = model_root.join("buffalo_l/w600k_r50.onnx");
        let mut rec = Recognizer::load(&pack, likeness_plugin_arcface::detector::Provider::Cpu).unwrap();
        let bfr = Bf16Recognizer::load(&pack, rec.input_size, rec.input_mean, rec.input_std).unwrap();
        let c: Vec<Vec<u8>> = crops.iter().map(|(_, c)| c.clone()).collect();
        let (a, b) = (rec.embed(&c).unwrap(), bfr.embed(&c).unwrap());
        let mc = a.iter().zip(&b).map(|(x, y)| dot(x, y)).fold(1.0, f64::min);
        let all: Vec<(usize, usize)> = (0..c.len()).flat_map(|i| (i + 1..c.len()).map(move |j| (i, j))).collect();
        let (n, same, band, dmax) = flips(&a, &b, &all);
        println!(
            "  real photos (every face of $LIKENESS_DATA/photos/*, all {} faces pairwise): {n} pairs: {same} same-person flips, \
             {band} band changes, max |Δ sim| {dmax:.2e}; min embedding cosine {mc:.6}",
            c.len()
        );
        println!("  (the bench's recognizer has random weights: similarities are not identity scores, the flip count is what bf16 rounding does at these thresholds)");
    }

    // Load: the optimised graph cached (`optimized_model_filepath`, then loaded with the
    // optimiser off) against ONNX Runtime optimising at every load.
    {
        use likeness_plugin_arcface::detector::{Detector, Provider, SessionOptions};
        use likeness_plugin_arcface::recognizer::Recognizer;
        let pack = model_root.join("buffalo_l");
        let cache = tmp.path().join("ort-cache");
        let load = |opts: &SessionOptions| {
            let t = Instant::now();
            let d = Detector::load_with(&pack.join("det_10g.onnx"), Provider::Cpu, 640, 0.5, opts);
            let td = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let r = Recognizer::load_with(&pack.join("w600k_r50.onnx"), Provider::Cpu, opts);
            let tr = t.elapsed().as_secs_f64();
            let (_d, mut r) = (d.unwrap(), r.unwrap_or_else(|e| fail(e.message)));
            let probe = vec![vec![128u8; r.input_size * r.input_size * 3]];
            (td, tr, r.embed(&probe).unwrap().remove(0))
        };
        let plain = SessionOptions::default();
        let cached = SessionOptions { optimized_cache: Some(cache.clone()), ..SessionOptions::default() };
        let (d0, r0, e0) = load(&plain);
        let (d1, r1, _) = load(&cached);
        let (d2, r2, e2) = load(&cached);
        println!();
        println!(
            "session load (detector + recognizer): optimised every time {d0:.3} + {r0:.3} s; cache first load (optimise + write) \
             {d1:.3} + {r1:.3} s; cached (optimiser off) {d2:.3} + {r2:.3} s; embedding cosine cached vs plain {:.9}",
            dot(&e0, &e2)
        );
    }

    // Where the time goes against the peak.
    let net =
        likeness_plugin_arcface::iresnet::OnnxNet::load(&model_root.join("buffalo_l/w600k_r50.onnx"), tch::Device::Cpu)
            .unwrap_or_else(|e| fail(e));
    let macs = net
        .macs(&tch::Tensor::zeros([1, 3, 112, 112], (tch::Kind::Float, tch::Device::Cpu)))
        .unwrap_or_else(|e| fail(e));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!();
    println!(
        "recognizer work: {:.3} GMAC = {:.3} GFLOP per face (Conv + Gemm, counted by OnnxNet::macs on the bench's graph)",
        macs as f64 / 1e9,
        2.0 * macs as f64 / 1e9
    );
    let peak32 = peak_flops_one_core(false);
    let peak16 = peak_flops_one_core(true);
    let show = |p: Option<f64>| p.map(|p| format!("{:.1} GFLOP/s", p * cores / 1e9)).unwrap_or_else(|| "n/a".into());
    println!(
        "peak, measured (12 register chains of _mm512_fmadd_ps / _mm512_dpbf16_ps on one core, × {cores} cores): fp32 FMA {}, AVX512_BF16 dot {} (AMX, which oneDNN uses where present, is faster still: not measured)",
        show(peak32),
        show(peak16)
    );
    for (b, _) in &bds {
        let faces = b["faces"].as_u64().unwrap_or(0) as f64;
        let rs = b["recognise_seconds"].as_f64().unwrap_or(f64::NAN);
        let achieved = 2.0 * macs as f64 * faces / rs;
        let peak = if b["name"].as_str().unwrap().starts_with("bf16") { peak16 } else { peak32 };
        println!(
            "  {:<56} {faces:>3} faces in {rs:.3} s: {:.1} GFLOP/s = {} of peak",
            b["name"].as_str().unwrap(),
            achieved / 1e9,
            peak.map(|p| format!("{:.0} %", 100.0 * achieved / (p * cores))).unwrap_or_else(|| "n/a".into())
        );
    }
}
