//! The Rust side of the CLIP bench (scripts/bench_clip.sh): likeness-clip's image and text towers
//! (f32, no grad) on the model, inputs and thread count tests/python/bench_clip.py used, timed
//! the same way (one warm-up call, then `--repeats` calls), with the outputs checked against
//! transformers' and the throughput ratios printed.
//!
//!     bench_clip --dir DIR [--repeats 5] [--threads 2]
use likeness_clip::{ClipConfig, ClipModel};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn stats(secs: &[f64]) -> (f64, f64) {
    let mut s = secs.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2])
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(arg(&args, "--dir", ""));
    let repeats: usize = arg(&args, "--repeats", "5").parse().expect("--repeats N");
    let threads: i32 = arg(&args, "--threads", "2").parse().expect("--threads N");
    assert!(dir.join("python.json").is_file(), "--dir must hold bench_clip.py's output (run scripts/bench_clip.sh)");
    tch::set_num_threads(threads);
    tch::set_num_interop_threads(1);
    let py: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("python.json")).unwrap()).unwrap();
    let cfg = ClipConfig::from_hf_config_json(&dir.join("model/config.json")).unwrap();
    let t0 = Instant::now();
    let model = ClipModel::load(&dir.join("model/model.safetensors"), &cfg, Kind::Float, Device::Cpu).unwrap();
    eprintln!("loaded {:?} in {:.2} s", dir.join("model"), t0.elapsed().as_secs_f64());
    let b = py["batch"].as_i64().unwrap();
    let raw = std::fs::read(dir.join("pixels.f32")).unwrap();
    let px: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let pixels = Tensor::from_slice(&px).view([b, 3, 224, 224]);
    let ids_json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("ids.json")).unwrap()).unwrap();
    let ids: Vec<i64> = ids_json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .map(|v| v.as_i64().unwrap())
        .collect();
    let ids = Tensor::from_slice(&ids).view([b, 77]);
    let eot: Vec<usize> = ids_json["eot"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();

    let _g = tch::no_grad_guard();
    let time = |f: &dyn Fn() -> Tensor| {
        let mut out = f();
        let mut secs = Vec::new();
        for _ in 0..repeats {
            let t = Instant::now();
            out = f();
            secs.push(t.elapsed().as_secs_f64());
        }
        (out, secs)
    };
    let (img, img_s) = time(&|| model.vision.forward(&pixels).unwrap().image_embeds);
    let (txt, txt_s) = time(&|| model.text.forward(&ids, &eot).unwrap().text_embeds);
    let row = |t: &Tensor| Vec::<f64>::try_from(t.get(0).to_kind(Kind::Double)).unwrap();
    let floats = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>();
    let (ci, ct) =
        (cosine(&row(&img), &floats(&py["image_embeds_row0"])), cosine(&row(&txt), &floats(&py["text_embeds_row0"])));
    let dmax = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let (di, dt) =
        (dmax(&row(&img), &floats(&py["image_embeds_row0"])), dmax(&row(&txt), &floats(&py["text_embeds_row0"])));
    println!("parity (row 0 vs transformers): image cos {ci:.9} max|d| {di:.2e}; text cos {ct:.9} max|d| {dt:.2e}");
    // Two fp32 implementations of the same 12-layer towers agree to ~1e-5 relative; anything
    // below 0.9999 means the bench compares different computations.
    assert!(ci > 0.9999 && ct > 0.9999, "the two sides computed different embeddings");
    let secs = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>();
    let bf = b as f64;
    println!("ViT-B/32 shape, batch {b}, fp32, {threads} threads, {repeats} timed calls per side (one warm-up)");
    println!(
        "{:<12} {:>14} {:>14} {:>14} {:>14} {:>8} {:>8}",
        "tower", "ours min/s", "ours med/s", "hf min/s", "hf med/s", "ratio", "ratio"
    );
    println!(
        "{:<12} {:>14} {:>14} {:>14} {:>14} {:>8} {:>8}",
        "", "(per s)", "(per s)", "(per s)", "(per s)", "best", "median"
    );
    for (name, ours, theirs) in
        [("image", &img_s, secs(&py["image_seconds"])), ("text", &txt_s, secs(&py["text_seconds"]))]
    {
        let ((omin, omed), (tmin, tmed)) = (stats(ours), stats(&theirs));
        println!(
            "{name:<12} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>7.2}x {:>7.2}x",
            bf / omin,
            bf / omed,
            bf / tmin,
            bf / tmed,
            tmin / omin,
            tmed / omed
        );
    }
    println!("(images or texts per second; ratio = ours / transformers throughput, >1 = ours faster; best = min time, median = median time)");
}
