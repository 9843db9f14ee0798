//! A run killed with SIGKILL mid-way and continued with `--resume` ends with the same weights
//! and the same loss curve as an uninterrupted run (issue 2).
//!
//! Both runs train the tiny identity autoencoder on the demo data on the CPU with the same
//! seed; the driver's determinism contract (data order from the step, optimizer state in every
//! checkpoint) makes the result bit-identical. Tolerance: max |ΔW| ≤ 1e-6 over every tensor of
//! `final/model.safetensors` (measured: exactly 0), train losses ≤ 1e-6 apart. Both runs are
//! the same binary on the same machine and shapes, so libtorch picks the same kernels and
//! summation orders: the result is exact on any CPU; 1e-6 (≈ 16 ulps of |w| ≤ 1) only keeps a
//! failure message readable should a kernel ever be non-deterministic.

use std::path::Path;
use std::time::{Duration, Instant};

use likeness_sdk::st;
use likeness_tests::{
    built_or_skip, demo_bundles_or_skip, staged_plugins, tiny_train_args, train_records, Dir, TestCommand,
};

const SAVE_EVERY: u64 = 4;

fn train_cmd(dir: &Dir, out: &Path, steps: u64) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir")
        .arg(staged_plugins())
        .args(tiny_train_args(out, steps))
        .args(["--set", &format!("train.save_every={SAVE_EVERY}")]);
    t
}

/// Complete checkpoints (`step-N/state.json`) of a run, by step.
fn checkpoints(out: &Path) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else { return vec![] };
    let mut v: Vec<u64> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("state.json").is_file())
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok())
        .collect();
    v.sort();
    v
}

enum Killed {
    /// Killed with the newest checkpoint at this step.
    At(u64),
    /// The run finished before a checkpoint appeared.
    TooFast,
}

/// Starts run B and SIGKILLs it as soon as a checkpoint at step ≥ `save_every` exists.
fn start_and_kill(dir: &Dir, train_cmd: &TrainCmd<'_>, out: &Path, steps: u64, save_every: u64) -> Killed {
    let log = dir.join(format!("{}.log", out.file_name().unwrap().to_string_lossy()));
    let mut child = train_cmd(dir, out, steps).spawn_logged(&log);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            return Killed::TooFast;
        }
        if checkpoints(out).last().is_some_and(|&s| s >= save_every) {
            child.kill().unwrap(); // SIGKILL on Unix: no clean-up handlers run.
            let status = child.wait().unwrap();
            let newest = *checkpoints(out).last().unwrap();
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            if status.success() || out.join("final").exists() {
                // It finished between the check and the signal.
                eprintln!("run finished before SIGKILL arrived (status {status}):\n{log_text}");
                return Killed::TooFast;
            }
            eprintln!("killed run B ({status}) with its newest checkpoint at step {newest} of {steps}");
            return Killed::At(newest);
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint appeared in 300 s; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn load(path: &Path) -> Vec<st::StTensor> {
    let (mut t, _) = st::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

/// Max |a − b| over every tensor of two safetensors files with the same names, dtypes and shapes.
fn max_weight_diff(a: &Path, b: &Path) -> (f64, usize, usize) {
    let (ta, tb) = (load(a), load(b));
    let names = |t: &[st::StTensor]| t.iter().map(|x| x.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb), "tensor names differ between {} and {}", a.display(), b.display());
    let mut max = 0.0f64;
    let mut numel = 0;
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "tensor `{}`", x.name);
        let (vx, vy) = (x.to_f32().unwrap(), y.to_f32().unwrap());
        numel += vx.len();
        for (p, q) in vx.iter().zip(&vy) {
            assert!(p.is_finite() && q.is_finite(), "tensor `{}` has a non-finite value", x.name);
            max = max.max((*p as f64 - *q as f64).abs());
        }
    }
    (max, ta.len(), numel)
}

#[test]
fn issue_2_killed_and_resumed_run_reaches_the_same_final_weights() {
    const T: &str = "issue_2_killed_and_resumed_run_reaches_the_same_final_weights";
    let (Some(()), Some(_)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("resume");
    kill_and_resume(&dir, &train_cmd, Weights::Values);
}

/// Issue 6: with a model that draws fresh noise and timesteps every step (the flow fixture,
/// seeded by the step context), a killed and resumed run still ends bit-identical: the final
/// state files are byte-equal.
#[test]
fn issue_6_resume_is_bit_identical_with_per_step_noise() {
    const T: &str = "issue_6_resume_is_bit_identical_with_per_step_noise";
    let (Some(()), Some(bundles)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("resume-flow");
    let data = crate::trainer::drip_dataset(&dir, &bundles);
    let cmd = move |dir: &Dir, out: &Path, steps: u64| {
        let mut t = crate::trainer::flow_train(dir, &data, out, steps, &[]);
        t.args(["--set", &format!("train.save_every={SAVE_EVERY}")]);
        t
    };
    kill_and_resume(&dir, &cmd, Weights::Bytes);
}

/// How final weights are compared.
#[derive(Clone, Copy)]
pub(crate) enum Weights {
    /// Every f32/bf16/f16 value within 1e-6.
    Values,
    /// The files byte for byte (f64 state).
    Bytes,
}

/// `train_cmd(dir, out, steps)`: a `host train` of `steps` optimizer steps into `out` that
/// checkpoints every [`Schedule::save_every`] steps.
pub(crate) type TrainCmd<'a> = dyn Fn(&Dir, &Path, u64) -> TestCommand + 'a;

/// The step counts a kill-and-resume check tries and how close the losses must be.
pub(crate) struct Schedule {
    /// Step counts tried in turn while a run ends before the kill lands (both runs of an
    /// attempt always use the same count, since the learning-rate schedule depends on it).
    pub attempts: &'static [u64],
    /// The run's checkpoint interval (`train.save_every`): run B is killed once a checkpoint
    /// at step ≥ this exists.
    pub save_every: u64,
    /// Max |loss_A − loss_B| of any train step.
    pub loss_tolerance: f64,
}

/// The two runs of a passed check, for the caller's own comparisons.
pub(crate) struct Resumed {
    /// The uninterrupted run.
    pub a: std::path::PathBuf,
    /// The killed and resumed run.
    pub b: std::path::PathBuf,
    pub steps: u64,
    pub killed_at: u64,
}

/// The autoencoder's and the flow fixture's schedule: 24 steps take well under a second
/// there, so a run that ends before the kill lands is tried again with more steps.
const TINY: Schedule = Schedule { attempts: &[24, 120, 600], save_every: SAVE_EVERY, loss_tolerance: 1e-6 };

fn kill_and_resume(dir: &Dir, train_cmd: &TrainCmd<'_>, weights: Weights) {
    kill_and_resume_with(dir, train_cmd, weights, &TINY);
}

/// Run A uninterrupted; run B SIGKILLed after a checkpoint and continued with `--resume`; then
/// the final weights (`final/model.safetensors`, compared as `weights` says) and every train
/// step's loss and learning rate of the two must agree.
pub(crate) fn kill_and_resume_with(
    dir: &Dir,
    train_cmd: &TrainCmd<'_>,
    weights: Weights,
    schedule: &Schedule,
) -> Resumed {
    for (attempt, &steps) in schedule.attempts.iter().enumerate() {
        let a = dir.join(format!("a{attempt}"));
        let b = dir.join(format!("b{attempt}"));
        let t0 = Instant::now();
        let log_a = train_cmd(dir, &a, steps).ok();
        let a_s = t0.elapsed().as_secs_f64();
        assert!(log_a.contains(&format!("training finished: {steps} optimizer steps")), "{log_a}");

        let t1 = Instant::now();
        let killed_at = match start_and_kill(dir, train_cmd, &b, steps, schedule.save_every) {
            Killed::TooFast => {
                eprintln!("attempt {attempt}: {steps} steps finished before the kill; retrying with more steps");
                continue;
            }
            Killed::At(s) => s,
        };
        let kill_s = t1.elapsed().as_secs_f64();
        assert!(!b.join("final").exists(), "a killed run must not have final weights");
        assert!(killed_at < steps, "killed at step {killed_at} of {steps}");

        let t2 = Instant::now();
        let log_b = train_cmd(dir, &b, steps).arg("--resume").ok();
        let resume_s = t2.elapsed().as_secs_f64();
        assert!(
            log_b.contains(&format!("resumed from step {killed_at}")),
            "expected a resume from step {killed_at}:\n{log_b}"
        );
        assert!(log_b.contains(&format!("training finished: {steps} optimizer steps")), "{log_b}");

        // Final weights.
        let (fa, fb) = (a.join("final/model.safetensors"), b.join("final/model.safetensors"));
        match weights {
            Weights::Values => {
                let (diff, tensors, numel) = max_weight_diff(&fa, &fb);
                eprintln!(
                    "resume: {steps} steps, killed after checkpoint {killed_at}; {tensors} tensors / {numel} values; \
                     max |W_a - W_b| = {diff:e} (tolerance 1e-6); wall: run A {a_s:.2} s, B until kill {kill_s:.2} s, resume {resume_s:.2} s"
                );
                assert!(diff <= 1e-6, "final weights differ: max abs diff {diff:e}");
            }
            Weights::Bytes => {
                let (x, y) = (std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
                eprintln!("resume: {steps} steps, killed after checkpoint {killed_at}; final state {} bytes; wall: run A {a_s:.2} s, B until kill {kill_s:.2} s, resume {resume_s:.2} s", x.len());
                assert!(x == y, "final state files differ: {} vs {}", fa.display(), fb.display());
            }
        }

        // Metrics: every step exactly once, and the same losses as the uninterrupted run.
        let ra = train_records(&a);
        let rb = train_records(&b);
        let steps_b: Vec<u64> = rb.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            steps_b,
            (1..=steps).collect::<Vec<_>>(),
            "train steps in {}/metrics.jsonl (duplicates or gaps)",
            b.display()
        );
        assert_eq!(ra.len(), rb.len());
        let mut loss_diff_after = 0.0f64;
        let mut loss_diff_before = 0.0f64;
        for ((sa, x), (sb, y)) in ra.iter().zip(&rb) {
            assert_eq!(sa, sb);
            let (la, lb) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
            let d = (la - lb).abs();
            if *sa > killed_at {
                loss_diff_after = loss_diff_after.max(d);
            } else {
                loss_diff_before = loss_diff_before.max(d);
            }
            assert!(
                d <= schedule.loss_tolerance,
                "step {sa}: loss {la} (uninterrupted) vs {lb} (resumed), |Δ| {d:e} > {:e}",
                schedule.loss_tolerance
            );
            assert_eq!(x["lr"], y["lr"], "step {sa}: learning rate");
        }
        let val_steps = |r: &Path| -> Vec<u64> {
            likeness_tests::read_metrics(r)
                .iter()
                .filter(|v| v["type"] == "val")
                .map(|v| v["step"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(val_steps(&a), val_steps(&b), "validation records");
        eprintln!("resume: train loss max |Δ| before the resume point {loss_diff_before:e}, after {loss_diff_after:e}");
        check_refuses_existing_run(dir, train_cmd, &a, steps);
        return Resumed { a, b, steps, killed_at };
    }
    panic!("every attempt finished before SIGKILL could interrupt it ({:?} steps)", schedule.attempts);
}

/// `host train` into a directory that already holds a run, without --resume, is refused with a
/// message that names --resume, and leaves the run alone.
fn check_refuses_existing_run(dir: &Dir, train_cmd: &TrainCmd<'_>, run: &Path, steps: u64) {
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let weights = std::fs::read(run.join("final/model.safetensors")).unwrap();
    let e = train_cmd(dir, run, steps).fails();
    assert!(e.contains("--resume") && e.contains("already holds a run"), "{e}");
    assert!(e.contains(&run.display().to_string()), "the message names the directory: {e}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before, "metrics.jsonl was touched");
    assert_eq!(std::fs::read(run.join("final/model.safetensors")).unwrap(), weights, "final weights were touched");
}
