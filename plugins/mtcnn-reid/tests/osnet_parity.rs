//! OSNet against torchreid 0.2.5's own osnet.py (tests/python/osnet_oracle.py): the same seeded
//! random weights (read from the oracle's `.safetensors` and torchreid-style `.pth.tar`), the same
//! inputs, the 512-d eval features and input gradients.

use std::path::{Path, PathBuf};
use std::process::Command;

use likeness_plugin_mtcnn_reid::osnet::{Arch, OsNet};
use likeness_sdk::testing;
use tch::{Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the oracle for `arch` into a temp dir; `None` (skip line, panic under CI) without the venv.
fn oracle(test: &str, arch: Arch) -> Option<tempfile::TempDir> {
    let python = testing::python_or_skip(test)?;
    testing::data_path_or_skip(test, "reference/torchreid-0.2.5")?;
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(python)
        .arg(repo().join("tests/python/osnet_oracle.py"))
        .args(["--arch", arch.name(), "--out"])
        .arg(dir.path())
        .output()
        .expect("cannot start LIKENESS_PYTHON");
    assert!(o.status.success(), "osnet_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    Some(dir)
}

fn io(dir: &Path, arch: Arch) -> std::collections::BTreeMap<String, Tensor> {
    likeness_plugin_mtcnn_reid::osnet::read_checkpoint(&dir.join(format!("{}_io.safetensors", arch.name())))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn parity(test: &str, arch: Arch) {
    let Some(dir) = oracle(test, arch) else { return };
    let io = io(dir.path(), arch);
    let st = OsNet::load(arch, &dir.path().join(format!("{}.safetensors", arch.name()))).unwrap();
    let pth = OsNet::load(arch, &dir.path().join(format!("{}.pth.tar", arch.name()))).unwrap();
    let (ours, from_pth) = tch::no_grad(|| (st.forward(&io["input"]), pth.forward(&io["input"])));
    assert_eq!(ours.size(), vec![2, 512]);
    let theirs = &io["feature"];
    let scale = theirs.abs().max().double_value(&[]);
    let err = max_abs(&ours, theirs);
    eprintln!("{}: max |ours − torchreid| = {err:.3e} (max |feature| = {scale:.3})", arch.name());
    // Both checkpoints hold the same bits: identical weights give identical outputs.
    assert_eq!(max_abs(&ours, &from_pth), 0.0, ".pth.tar and .safetensors load differently");
    // f32 on both sides with possibly different kernels (oneDNN vs libtorch's, blocking, FMA,
    // AVX2 vs AVX-512): each dot product of depth K differs by ≲ √K·2⁻²⁴ relatively (random-walk
    // of rounding errors; K ≤ 512·1 for the 1×1 convolutions and fc, 3·49 for conv1), and the
    // network composes about 40 such layers on the longest path (conv1, 3 stages × 2 blocks × up
    // to 6 convs, transitions, conv5, fc), each BatchNorm rescaling by O(1): relative error
    // ≲ 40·√512·6e-8 ≈ 5.4e-5 of the feature scale (≈ 0.7–0.8 here); 1e-4 absolute covers it
    // with under 2× slack, and is the bound the issue sets.
    assert!(err <= 1e-4, "{}: max abs error {err:.3e} > 1e-4", arch.name());

    // Input gradient of sum(feature · r) in f64 against torch's f64 autograd: same maths, f64
    // rounding (2⁻⁵³ ≈ 1.1e-16) through the same ~40 layers and sums of up to 256·128 terms:
    // relative error ≲ 40·√32768·1.1e-16 ≈ 8e-13; 1e-9 of the gradient scale leaves room for a
    // ReLU/max-pool tie broken differently (none expected with continuous random inputs).
    let net = st.to(tch::Device::Cpu, Kind::Double);
    let x = io["input"].to_kind(Kind::Double).set_requires_grad(true);
    let s = (net.forward(&x) * &io["r"]).sum(Kind::Double);
    let g = Tensor::run_backward(&[&s], &[&x], false, false).pop().unwrap();
    let gscale = io["grad"].abs().max().double_value(&[]);
    let gerr = max_abs(&g, &io["grad"]);
    eprintln!("{}: f64 input gradient max |ours − torch| = {gerr:.3e} (scale {gscale:.3e})", arch.name());
    assert!(gerr <= 1e-9 * gscale, "gradient differs from torch's: {gerr:.3e}");
}

#[test]
fn osnet_x0_25_matches_torchreid() {
    parity("osnet_x0_25_matches_torchreid", Arch::X0_25);
}

#[test]
fn osnet_x1_0_matches_torchreid() {
    parity("osnet_x1_0_matches_torchreid", Arch::X1_0);
}

/// The tch model's own autograd against central finite differences in f64 (independent of torch).
#[test]
fn osnet_gradient_matches_finite_differences() {
    let arch = Arch::X0_25;
    let Some(dir) = oracle("osnet_gradient_matches_finite_differences", arch) else { return };
    let io = io(dir.path(), arch);
    let net = OsNet::load(arch, &dir.path().join(format!("{}.pth.tar", arch.name())))
        .unwrap()
        .to(tch::Device::Cpu, Kind::Double);
    let x0 = io["input"].to_kind(Kind::Double);
    let r = &io["r"];
    let f = |x: &Tensor| (net.forward(x) * r).sum(Kind::Double).double_value(&[]);
    let x = x0.copy().set_requires_grad(true);
    let s = (net.forward(&x) * r).sum(Kind::Double);
    let g = Tensor::run_backward(&[&s], &[&x], false, false).pop().unwrap();
    let flat = g.flatten(0, -1);
    // The coordinates with the largest gradients (informative) plus fixed spread ones.
    let top = flat.abs().topk(4, 0, true, true).1;
    let mut idx: Vec<i64> = Vec::<i64>::try_from(&top).unwrap();
    idx.extend([1000, 77_777, 150_000, 190_001]);
    // h = 1e-5: truncation h^2/6*f''' is ~1e-11 relative for this smooth-between-kinks function;
    // rounding: the two f64 forwards differ only through the one perturbed pixel, and their
    // different rounding is about 2^-53*|f|/h = 1e-11*|f| with |f| = O(1) here. Measured: <= 7e-11
    // absolute on a gradient scale of 3.4e-4 (2e-7 relative), 5x under the 1e-6*max|g| bound.
    // A ReLU or max-pool kink inside +-h would break the smoothness; with continuous random
    // inputs the chance is ~ (kinks per input)*h on each of the 8 coordinates.
    let h = 1e-5;
    let scale = flat.abs().max().double_value(&[]);
    let xs = x0.flatten(0, -1);
    for &i in &idx {
        let p = xs.copy();
        let _ = p.get(i).fill_(xs.double_value(&[i]) + h);
        let m = xs.copy();
        let _ = m.get(i).fill_(xs.double_value(&[i]) - h);
        let fd = (f(&p.reshape(x0.size())) - f(&m.reshape(x0.size()))) / (2.0 * h);
        let an = flat.double_value(&[i]);
        eprintln!("x[{i}]: autograd {an:.10e} fd {fd:.10e}");
        assert!((fd - an).abs() <= 1e-6 * scale.max(1e-12), "x[{i}]: autograd {an} vs fd {fd}");
    }
}

#[test]
fn bad_checkpoints_are_named() {
    let arch = Arch::X0_25;
    let Some(dir) = oracle("bad_checkpoints_are_named", arch) else { return };
    let bad = dir.path().join("osnet_x0_25_bad.pth");
    let e = OsNet::load(arch, &bad).err().expect("a checkpoint without a tensor must fail").to_string();
    assert!(e.contains("missing tensors: conv2.0.gate.fc1.bias"), "{e}");
    assert!(e.contains("osnet_x0_25_bad.pth"), "{e}");
    // The wrong architecture: shapes named, and the fix (`arch`).
    let e = OsNet::load(Arch::X1_0, &dir.path().join("osnet_x0_25.pth.tar")).err().unwrap().to_string();
    assert!(e.contains("wrong shapes: `conv1.conv.weight` is [16, 3, 7, 7], expected [64, 3, 7, 7]"), "{e}");
    assert!(e.contains("check `arch`"), "{e}");
    // An unreadable file.
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"not a zip").unwrap();
    let e = OsNet::load(arch, &junk).err().unwrap().to_string();
    assert!(e.contains("junk.pth"), "{e}");
}
