//! Shared helpers of the oracle tests: the venv python, the data dir, running the oracle.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn python() -> PathBuf {
    let p = std::env::var_os("LIKENESS_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| {
        panic!(
            "LIKENESS_PYTHON is unset: point it at the project venv's python (scripts/setup.sh creates \
             ~/.cache/likeness/venv with insightface==0.7.3; `source scripts/common.sh` exports it)"
        )
    });
    PathBuf::from(p)
}

pub fn data_dir() -> PathBuf {
    let d = std::env::var_os("LIKENESS_DATA").filter(|p| !p.is_empty()).unwrap_or_else(|| {
        panic!("LIKENESS_DATA is unset: run scripts/setup.sh and `source scripts/common.sh` (it prepares the photos)")
    });
    let d = PathBuf::from(d);
    assert!(
        d.join("photos/insightface/t1.jpg").is_file(),
        "{} has no photos/insightface/t1.jpg: run scripts/setup.sh",
        d.display()
    );
    d
}

pub fn oracle_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/arcface_oracle.py")
}

/// Runs `arcface_oracle.py <args> --data $LIKENESS_DATA --out <out>`.
pub fn run_oracle(args: &[&str], out: &Path) {
    let o = Command::new(python())
        .arg(oracle_script())
        .args(args)
        .arg("--data")
        .arg(data_dir())
        .arg("--out")
        .arg(out)
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(
        o.status.success(),
        "arcface_oracle.py {args:?} failed (needs insightface==0.7.3 and opencv from scripts/requirements.txt):\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

pub fn read_f32(p: &Path) -> Vec<f32> {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// An RGB8 PNG/JPEG: (pixels, width, height).
pub fn read_rgb(p: &Path) -> (Vec<u8>, usize, usize) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w as usize, h as usize)
}

pub fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}
