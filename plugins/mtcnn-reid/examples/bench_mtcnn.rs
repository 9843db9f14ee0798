//! The Rust side of the MTCNN bench (scripts/bench_mtcnn.sh; tests/python/bench_mtcnn.py is the
//! Python side and runs first, in the same run):
//!
//!     bench_mtcnn --dir DIR [--repeats 5] [--threads 2] [--profile]
//!
//! DIR holds what the Python side wrote: `python.json` (its timings and outputs), the decoded
//! `<stem>.rgb` photos and the seeded random `<arch>.safetensors` OSNet. The same three stages
//! per image, on the same pixels, the same weights (facenet-pytorch's `.pt` files, read from
//! `$LIKENESS_DATA`) and the same thread count:
//!   detect  likeness_mtcnn's `Mtcnn::detect`
//!   crop    `face_crop(SIZE, MARGIN)` of the largest face (facenet's `extract_face`)
//!   embed   the mtcnn-reid metric's `crop_box` + `embed_boxes` (bilinear crop to 256×128,
//!           ImageNet normalisation, OSNet, L2 normalisation) of the largest face
//! One warm-up pass, then `--repeats` timed passes; min and median of each side's passes, as
//! images/s over all photos, and the ratios ours / Python (> 1: ours is faster); also per
//! CPU-second (the process's CPU time over a pass, all threads), which other load moves less. `--profile`
//! adds where our detection time goes (`Mtcnn::detect_profiled`).
//!
//! Exits non-zero when the two sides did not compute the same thing (see `check`), so a
//! ratio is never reported for different work.

use std::path::PathBuf;
use std::time::Instant;

use likeness_mtcnn::{face_crop, Face, Mtcnn, MtcnnConfig, StageTimes};
use likeness_plugin_mtcnn_reid::osnet::{Arch, OsNet};
use likeness_plugin_mtcnn_reid::plugin::{crop_box, ReidMetric};
use serde_json::Value;
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Default)]
struct Pass {
    detect: f64,
    crop: f64,
    embed: f64,
    /// CPU seconds of the whole process over the pass (every thread): the work done, which the
    /// machine's other load moves much less than the wall clock.
    cpu: f64,
}

impl Pass {
    fn get(&self, stage: &str) -> f64 {
        match stage {
            "detect" => self.detect,
            "crop" => self.crop,
            "embed" => self.embed,
            "detect+crop" => self.detect + self.crop,
            "cpu" => self.cpu,
            _ => self.detect + self.crop + self.embed,
        }
    }
}

struct Out {
    faces: usize,
    first: Option<Face>,
    embedding: Option<Vec<f32>>,
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} needs a value (see the module comment)")),
        None => default,
    }
}

/// This process's user + system CPU seconds, all threads (/proc/self/stat fields 14 and 15, in
/// USER_HZ ticks, which Linux fixes at 100 for user space on x86).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_else(|e| fail(format!("/proc/self/stat: {e}")));
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')').expect("/proc/self/stat has `(comm)`") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| f[i - 3].parse::<f64>().expect("/proc/self/stat tick count");
    (ticks(14) + ticks(15)) / 100.0
}

fn fail(msg: String) -> ! {
    eprintln!("bench_mtcnn: {msg}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir: PathBuf = arg(&args, "--dir", PathBuf::new());
    if dir.as_os_str().is_empty() {
        fail("--dir DIR is required (the folder tests/python/bench_mtcnn.py wrote)".into());
    }
    let repeats: usize = arg(&args, "--repeats", 5);
    let threads: i32 = arg(&args, "--threads", 2);
    let profile = args.iter().any(|a| a == "--profile");
    tch::set_num_threads(threads);

    let py: Value = serde_json::from_slice(&std::fs::read(dir.join("python.json")).unwrap_or_else(|e| {
        fail(format!("{}: {e} (run tests/python/bench_mtcnn.py first)", dir.join("python.json").display()))
    }))
    .unwrap_or_else(|e| fail(format!("python.json: {e}")));
    let arch = match py["arch"].as_str() {
        Some("osnet_x1_0") => Arch::X1_0,
        Some("osnet_x0_25") => Arch::X0_25,
        other => fail(format!("python.json: `arch` = {other:?} is not osnet_x1_0 or osnet_x0_25")),
    };
    let margin = py["margin"].as_f64().unwrap_or_else(|| fail("python.json: no `margin`".into()));
    let (size, crop_margin) = (py["crop"][0].as_i64().unwrap_or(160), py["crop"][1].as_i64().unwrap_or(20));

    let det = Mtcnn::load_configured(None, "bench_mtcnn", "LIKENESS_DATA", MtcnnConfig::default(), tch::Device::Cpu)
        .unwrap_or_else(|e| fail(e.to_string()));
    let net =
        OsNet::load(arch, &dir.join(format!("{}.safetensors", arch.name()))).unwrap_or_else(|e| fail(e.to_string()));
    let images: Vec<(String, Tensor)> = py["images"]
        .as_array()
        .unwrap_or_else(|| fail("python.json: no `images`".into()))
        .iter()
        .map(|im| {
            let name = im["name"].as_str().expect("name").to_string();
            let (w, h) = (im["width"].as_i64().expect("width"), im["height"].as_i64().expect("height"));
            let p = dir.join(format!("{name}.rgb"));
            let data = std::fs::read(&p).unwrap_or_else(|e| fail(format!("{}: {e}", p.display())));
            assert_eq!(data.len() as i64, w * h * 3, "{}: size", p.display());
            (name, Tensor::from_slice(&data).reshape([h, w, 3]))
        })
        .collect();

    let one = |img: &Tensor, t: &mut Pass| -> Out {
        let c0 = Instant::now();
        let faces = det.detect(img).unwrap_or_else(|e| fail(e.to_string()));
        t.detect += c0.elapsed().as_secs_f64();
        let Some(&first) = faces.first() else { return Out { faces: 0, first: None, embedding: None } };
        let c1 = Instant::now();
        // Computed eagerly (libtorch is not lazy), as extract_face is on the Python side.
        let _crop = face_crop(img, &first, size, crop_margin).unwrap_or_else(|e| fail(e.to_string()));
        t.crop += c1.elapsed().as_secs_f64();
        let c2 = Instant::now();
        let e = {
            let _g = tch::no_grad_guard();
            let img01 = img.permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
            ReidMetric::embed_boxes(&net, &img01.unsqueeze(0), &[crop_box(&first, margin)])
        };
        let e = Vec::<f32>::try_from(&e.flatten(0, -1)).expect("f32 embedding");
        t.embed += c2.elapsed().as_secs_f64();
        Out { faces: faces.len(), first: Some(first), embedding: Some(e) }
    };

    let mut warm = Pass::default();
    let outs: Vec<Out> = images.iter().map(|(_, img)| one(img, &mut warm)).collect();
    let ours: Vec<Pass> = (0..repeats)
        .map(|_| {
            let mut t = Pass::default();
            let c = cpu_seconds();
            for (_, img) in &images {
                one(img, &mut t);
            }
            t.cpu = cpu_seconds() - c;
            t
        })
        .collect();
    let theirs: Vec<Pass> = py["passes"]
        .as_array()
        .expect("passes")
        .iter()
        .map(|p| Pass {
            detect: p["detect"].as_f64().expect("detect"),
            crop: p["crop"].as_f64().expect("crop"),
            embed: p["embed"].as_f64().expect("embed"),
            cpu: p["cpu"].as_f64().expect("cpu"),
        })
        .collect();
    check(&py, &images, &outs);

    let n = images.len() as f64;
    let faced = outs.iter().filter(|o| o.faces > 0).count();
    println!(
        "MTCNN bench: {} photos ({faced} with a face), {threads} threads, fp32 CPU; {} timed passes each \
         (ours) / {} (Python), after one warm-up",
        images.len(),
        ours.len(),
        theirs.len()
    );
    println!("images/s over all photos (min and median pass time); ratio = ours / facenet-pytorch + torchreid:");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "stage", "ours med", "py med", "ratio med", "ours best", "py best", "ratio best"
    );
    for stage in ["detect", "crop", "detect+crop", "embed", "total", "cpu"] {
        let (om, ob) = stats(&ours, stage);
        let (pm, pb) = stats(&theirs, stage);
        let label = if stage == "cpu" { "total per CPU-second" } else { stage };
        println!(
            "{:<22} {:>10.3} {:>10.3} {:>9.2}× {:>10.3} {:>10.3} {:>9.2}×",
            label,
            n / om,
            n / pm,
            pm / om,
            n / ob,
            n / pb,
            pb / ob
        );
    }
    println!("(crop and embed run on the {faced} photos with a face; their images/s still divide by all photos.)");
    if profile {
        let mut total = StageTimes::default();
        for (_, img) in &images {
            let (_, t) = det.detect_profiled(img).unwrap_or_else(|e| fail(e.to_string()));
            total += t;
        }
        println!("where our detection time goes (one pass, s): {total}");
    }
}

/// (median, min) seconds of a stage over passes.
fn stats(passes: &[Pass], stage: &str) -> (f64, f64) {
    let mut v: Vec<f64> = passes.iter().map(|p| p.get(stage)).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        fail("no timed passes (--repeats 0?)".into());
    }
    let m = v.len() / 2;
    let median = if v.len().is_multiple_of(2) { (v[m - 1] + v[m]) / 2.0 } else { v[m] };
    (median, v[0])
}

/// Both sides computed the same thing:
/// - the same face count per photo (exact: the oracle test's criterion, core/mtcnn/tests);
/// - the largest face's box within 1 px (the oracle's bound; measured there ≈ 1e-4 px);
/// - the embedding's cosine to Python's ≥ 0.999: the embeddings are L2-normalised 512-d, the
///   OSNet parity test holds the features to ≤ 1e-4 abs, and a box moved by ≤ 1e-3 px moves a
///   bilinear sample by ≤ 1e-3 of a neighbouring pixel difference; 1 − cos of such changes is
///   ≪ 1e-3, so a lower cosine means a different face or a different crop.
fn check(py: &Value, images: &[(String, Tensor)], outs: &[Out]) {
    let mut worst_box = 0f32;
    let mut worst_cos = 1f64;
    for ((name, _), (o, p)) in images.iter().zip(outs.iter().zip(py["images"].as_array().expect("images"))) {
        let pf = p["faces"].as_u64().expect("faces") as usize;
        if pf != o.faces {
            fail(format!("{name}: {} faces here, {pf} in facenet-pytorch: not the same work", o.faces));
        }
        let (Some(f), Some(e)) = (o.first, o.embedding.as_ref()) else { continue };
        for k in 0..4 {
            worst_box = worst_box.max((f.bbox[k] - p["box"][k].as_f64().expect("box") as f32).abs());
        }
        let pe: Vec<f64> = p["embedding"].as_array().expect("embedding").iter().map(|v| v.as_f64().unwrap()).collect();
        let dot: f64 = e.iter().zip(&pe).map(|(a, b)| *a as f64 * b).sum();
        let na = e.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb = pe.iter().map(|b| b * b).sum::<f64>().sqrt();
        worst_cos = worst_cos.min(dot / (na * nb));
    }
    println!("same work: face counts equal on every photo; largest box max |Δ| = {worst_box:e} px; embedding min cosine = {worst_cos:.7}");
    if worst_box > 1.0 || worst_cos < 0.999 {
        fail(format!(
            "outputs differ (box {worst_box} px, cosine {worst_cos}): the two sides did not compute the same thing"
        ));
    }
}
