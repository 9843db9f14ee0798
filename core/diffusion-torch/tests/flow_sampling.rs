//! The flow-matching Euler sampler and the three guidance kinds (`sampling::{FlowSchedule,
//! Guidance, guided_model, run}`), and `_class_name` dispatch of scheduler configs.
//!
//! Parity with diffusers 0.42.1's FlowMatchEulerDiscreteScheduler as FluxPipeline sets it and
//! with FluxPipeline's loop on a toy velocity model (oracle: tests/python/flow_sampling_oracle.py);
//! the guidance kinds on closure models whose exact result is known.

use likeness_diffusion_torch::sampling::{
    self, AnySchedulerConfig, FlowMatchConfig, FlowSchedule, Guidance, Sampler, Schedule, SchedulerConfig,
};
use likeness_diffusion_torch::Result;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const U32: f64 = 5.960464477539063e-8; // 2^-24, f32's unit roundoff

fn f64s(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

struct Oracle {
    json: Value,
}

/// One run of tests/python/flow_sampling_oracle.py per test binary (≈ 10 s); a skip without the
/// project venv unless CI is set.
fn oracle(test: &str) -> Option<&'static Oracle> {
    static O: std::sync::OnceLock<Oracle> = std::sync::OnceLock::new();
    let python = likeness_sdk::testing::python_or_skip(test)?;
    Some(O.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/flow_sampling_oracle.py");
        let o = std::process::Command::new(python).arg(script).arg("--out").arg(dir.path()).output().unwrap();
        assert!(o.status.success(), "flow_sampling_oracle.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(dir.path().join("oracle.json")).unwrap();
        Oracle { json: serde_json::from_str(&text).unwrap() }
    }))
}

fn flow_config(c: &Value) -> FlowMatchConfig {
    match AnySchedulerConfig::from_value(Path::new("oracle"), c).unwrap() {
        AnySchedulerConfig::FlowMatch(f) => f,
        other => panic!("{other:?}"),
    }
}

/// Our f64 schedule against (a) the same formulas evaluated in float64 by the scheduler's own
/// methods — a few f64 roundings of values ≤ 1 (timesteps ≤ 1000): bounds 1e-12 / 1e-9 — and
/// (b) what diffusers stores, which is computed in float32: the given sigmas are cast to f32
/// (1 rounding), the shift takes ≤ 4 f32 operations (1/σ, −1 exact by Sterbenz for σ ≥ ½, +e^μ,
/// the division; the static map likewise), the stretch 3 more, and the timesteps one more
/// multiply. Both maps have a relative condition number ≤ 1 for shift ≥ 1 / μ ≥ 0 (d ln f/d ln σ
/// = 1/(1 + (s−1)σ) and (1/σ)/(e^μ + 1/σ − 1)), and the stretch's is ≤ 1/(1 − terminal) ≈ 1.02
/// near σ ≈ 1 but grows near the terminal σ: so ≤ ~10 f32 roundings, 10·2^-24 ≈ 6e-7 relative,
/// plus 2^-24·|σ| absolute slack for the stretch's 1 − (1−σ)/k at small σ: bound 1e-6·σ + 1e-7.
/// A missing shift, a wrong μ or a dropped stretch is off by ≥ 1e-3.
#[test]
fn flow_schedule_matches_diffusers() {
    let Some(o) = oracle("flow_schedule_matches_diffusers") else { return };
    let cases = o.json["schedules"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let cfg = flow_config(&c["config"]);
        let seq = c["image_seq_len"].as_u64().unwrap() as usize;
        let steps = c["steps"].as_u64().unwrap() as usize;
        assert!((cfg.mu(seq) - c["mu"].as_f64().unwrap()).abs() <= 1e-12, "{name}: mu");
        let s = FlowSchedule::new(&cfg, steps, seq).unwrap();
        let (sig, ts) = (f64s(&c["sigmas"]), f64s(&c["timesteps"]));
        let (sig64, ts64) = (f64s(&c["sigmas_f64"]), f64s(&c["timesteps_f64"]));
        assert_eq!(s.sigmas.len(), steps + 1, "{name}");
        assert_eq!((s.sigmas.len(), s.timesteps.len()), (sig.len(), ts.len()), "{name}");
        let mut worst = 0.0f64;
        for i in 0..sig.len() {
            assert!((s.sigmas[i] - sig64[i]).abs() <= 1e-12, "{name} σ[{i}] f64: {} vs {}", s.sigmas[i], sig64[i]);
            let d = (s.sigmas[i] - sig[i]).abs();
            worst = worst.max(d / sig[i].max(1e-30));
            assert!(d <= 1e-6 * sig[i] + 1e-7, "{name} σ[{i}]: {} vs diffusers' f32 {}", s.sigmas[i], sig[i]);
            if i < ts.len() {
                assert!((s.timesteps[i] - ts64[i]).abs() <= 1e-9, "{name} t[{i}] f64");
                let d = (s.timesteps[i] - ts[i]).abs();
                assert!(d <= 1e-6 * ts[i] + 1e-4, "{name} t[{i}]: {} vs {}", s.timesteps[i], ts[i]);
            }
        }
        eprintln!("{name}: worst relative σ difference to diffusers' f32 = {worst:.2e} ({:.1} u32)", worst / U32);
    }
}

fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    let x: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice(&x).view(shape)
}

/// The oracle's toy velocity, on our tensors: FluxPipeline passes `timestep / 1000`.
fn toy(x: &Tensor, t: &Tensor, g: Option<&Tensor>, ctx: &Tensor, w: &Tensor) -> Tensor {
    let tau = (t / 1000.0).view([-1, 1, 1]);
    let mut v = x * &tau * -0.5
        + w * (1.0 - &tau)
        + ctx.mean_dim([1i64, 2].as_slice(), false, Kind::Float).view([-1, 1, 1]) * 0.3;
    if let Some(g) = g {
        v += g.view([-1, 1, 1]) * 0.05;
    }
    v
}

/// FluxPipeline's loop (true CFG with the embedded guidance also fed; embedded guidance alone)
/// on the toy model: every step's latents. Flux-dev's σ differ from diffusers' f32 ones by
/// ≤ 3 u32 relative (measured above: ≤ 2.4), so dt by ≤ 6·2^-24 ≈ 3.6e-7, times |v| ≲ 6 (true
/// CFG multiplies by 4): 2.1e-6; plus ~10 f32 roundings of values ≲ 6: 3.6e-6; ≈ 6e-6 per step.
/// The map x ↦ x·(1 − 0.5·τ·dt) contracts, so over 6 steps ≤ 3.6e-5; bound 4e-5 (measured:
/// ≤ 6e-7). Running another guidance kind instead (or dropping the embedded scale) moves the
/// result by ≥ 1e-2.
#[test]
fn flow_loop_matches_flux_pipeline() {
    let Some(o) = oracle("flow_loop_matches_flux_pipeline") else { return };
    for c in o.json["loops"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let shape: Vec<i64> = serde_json::from_value(c["shape"].clone()).unwrap();
        let ps: Vec<i64> = serde_json::from_value(c["pos_shape"].clone()).unwrap();
        let ns: Vec<i64> = serde_json::from_value(c["neg_shape"].clone()).unwrap();
        let (x0, w) = (tensor(&c["latents"], &shape), tensor(&c["w"], &[1, shape[1], shape[2]]));
        let (pos, neg) = (vec![tensor(&c["pos"], &ps)], vec![tensor(&c["neg"], &ns)]);
        let cfg = flow_config(&c["config"]);
        let steps = c["steps"].as_u64().unwrap() as usize;
        let sched = FlowSchedule::new(&cfg, steps, c["image_seq_len"].as_u64().unwrap() as usize).unwrap();
        let embedded = c["embedded"].as_f64();
        let guidance = match c["true_cfg"].as_f64() {
            Some(s) => Guidance::TrueCfg { scale: s, embedded },
            None => Guidance::Embedded(embedded.unwrap()),
        };
        let run = |g: Guidance| -> Vec<Tensor> {
            let xs = RefCell::new(Vec::new());
            let mut model = sampling::guided_model(
                |x: &Tensor, t: &Tensor, g: Option<&Tensor>, ctx: &[Tensor]| Ok(toy(x, t, g, &ctx[0], &w)),
                &pos,
                Some(&neg),
                g,
            )
            .unwrap();
            // Record every step's latents: wrap the schedule's step through the model calls.
            let out = sampling::run(&sched, &x0, |x: &Tensor, t: f64| {
                xs.borrow_mut().push(x.shallow_clone());
                model(x, t)
            })
            .unwrap();
            let mut xs = xs.into_inner();
            drop(xs.remove(0));
            xs.push(out);
            xs
        };
        let ours = run(guidance);
        let want: Vec<Vec<f64>> = serde_json::from_value(c["steps_x"].clone()).unwrap();
        assert_eq!(ours.len(), want.len(), "{name}");
        for (i, (x, r)) in ours.iter().zip(&want).enumerate() {
            let r = Tensor::from_slice(r).view(shape.as_slice());
            let d = (x.to_kind(Kind::Double) - &r).abs().max().double_value(&[]);
            eprintln!("{name} step {i}: max |ours − diffusers| = {d:.2e}");
            assert!(d <= 4e-5, "{name} step {i}: {d}");
        }
        let r = Tensor::from_slice(want.last().unwrap()).view(shape.as_slice());
        let wrong = match guidance {
            Guidance::TrueCfg { scale, .. } => [Guidance::Cfg(scale), Guidance::Embedded(embedded.unwrap())],
            _ => [Guidance::None, Guidance::TrueCfg { scale: 4.0, embedded }],
        };
        for g in wrong {
            // Cfg refuses prompt encodings of different lengths (that is TrueCfg's case).
            let Ok(mut m) = sampling::guided_model(
                |x: &Tensor, t: &Tensor, g: Option<&Tensor>, ctx: &[Tensor]| Ok(toy(x, t, g, &ctx[0], &w)),
                &pos,
                Some(&neg),
                g,
            ) else {
                assert!(matches!(g, Guidance::Cfg(_)), "{g:?}");
                continue;
            };
            let x = sampling::run(&sched, &x0, &mut m).unwrap();
            let d = (x.to_kind(Kind::Double) - &r).abs().max().double_value(&[]);
            assert!(d >= 1e-2, "{name}: {g:?} is indistinguishable ({d})");
        }
    }
}

/// One call of a recording closure model.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    rows: i64,
    guidance: Option<Vec<f32>>,
    ctx_len: i64,
}

/// A constant-in-x velocity c = 0.3·mean(context row) + 0.05·g: the flow ODE dx/dσ = c from σ = 1
/// to 0 gives x = x0 − c exactly, and Euler is exact on it (Σ dt = −1), so every kind has a
/// closed form. Rounding: N = 4 steps of x + dt·c in f32 on values ≤ 4: ≤ 8 roundings ≈ 2e-6;
/// bound 1e-5. Contexts: prompt mean 1.0 (length 5), negative mean −1.0 (length 5 or 2), so
/// uncond/cond mix-ups, a doubled batch or a missing embedded scale move x by ≥ 0.17.
fn guidance_case(guidance: Guidance, neg_len: i64) -> Result<(Tensor, Tensor, Vec<Call>)> {
    let opts = (Kind::Float, Device::Cpu);
    let cfg = FlowMatchConfig::flux_dev();
    let sched = FlowSchedule::new(&cfg, 4, 64)?;
    tch::manual_seed(3);
    let x0 = Tensor::randn([2, 3, 4], opts);
    let cond = vec![Tensor::ones([2, 5, 8], opts)];
    let neg = vec![-Tensor::ones([2, neg_len, 8], opts)];
    let calls = RefCell::new(Vec::new());
    let denoiser = |x: &Tensor, t: &Tensor, g: Option<&Tensor>, ctx: &[Tensor]| -> Result<Tensor> {
        assert_eq!(t.size(), vec![x.size()[0]]);
        let gv = g.map(|g| Vec::<f32>::try_from(g).unwrap());
        calls.borrow_mut().push(Call { rows: x.size()[0], guidance: gv, ctx_len: ctx[0].size()[1] });
        let c = ctx[0].mean_dim([1i64, 2].as_slice(), false, Kind::Float).view([-1, 1, 1]) * 0.3;
        let c = match g {
            Some(g) => c + g.view([-1, 1, 1]) * 0.05,
            None => c,
        };
        Ok(x.zeros_like() + c)
    };
    let x = sampling::denoise_flow(&sched, &x0, denoiser, &cond, Some(&neg), guidance)?;
    Ok((x, x0, calls.into_inner()))
}

fn assert_close(x: &Tensor, want: &Tensor, what: &str) {
    let d = (x - want).abs().max().double_value(&[]);
    assert!(d <= 1e-5, "{what}: {d}");
}

#[test]
fn guidance_none_is_one_plain_forward() {
    let (x, x0, calls) = guidance_case(Guidance::None, 5).unwrap();
    assert_close(&x, &(&x0 - 0.3), "none: x0 − 0.3·mean(prompt)");
    assert_eq!(calls, vec![Call { rows: 2, guidance: None, ctx_len: 5 }; 4]);
}

#[test]
fn guidance_embedded_is_a_model_input_without_doubling() {
    let (x, x0, calls) = guidance_case(Guidance::Embedded(3.5), 2).unwrap();
    assert_close(&x, &(&x0 - (0.3 + 0.05 * 3.5)), "embedded: x0 − (0.3 + 0.05·g)");
    assert_eq!(calls, vec![Call { rows: 2, guidance: Some(vec![3.5, 3.5]), ctx_len: 5 }; 4]);
}

#[test]
fn guidance_cfg_doubles_the_batch() {
    // uncond + s·(cond − uncond) = −0.3 + 4·0.6 = 2.1.
    let (x, x0, calls) = guidance_case(Guidance::Cfg(4.0), 5).unwrap();
    assert_close(&x, &(&x0 - 2.1), "cfg");
    assert_eq!(calls, vec![Call { rows: 4, guidance: None, ctx_len: 5 }; 4]);
    // Prompt encodings of different lengths cannot share a batch: refused, naming TrueCfg.
    let e = guidance_case(Guidance::Cfg(4.0), 2).unwrap_err().to_string();
    assert!(e.contains("TrueCfg") && e.contains("negative"), "{e}");
}

#[test]
fn guidance_true_cfg_runs_two_forwards_of_different_lengths() {
    let (x, x0, calls) = guidance_case(Guidance::TrueCfg { scale: 4.0, embedded: None }, 2).unwrap();
    assert_close(&x, &(&x0 - 2.1), "true cfg");
    let pair = [Call { rows: 2, guidance: None, ctx_len: 5 }, Call { rows: 2, guidance: None, ctx_len: 2 }];
    assert_eq!(calls, pair.iter().cycle().take(8).cloned().collect::<Vec<_>>());
    // With FLUX.1-dev's embedded scale fed to both: neg + s·(pos − neg) with both shifted by 0.05·g.
    let (x, x0, calls) = guidance_case(Guidance::TrueCfg { scale: 4.0, embedded: Some(2.0) }, 2).unwrap();
    assert_close(&x, &(&x0 - 2.2), "true cfg + embedded");
    assert!(calls.iter().all(|c| c.rows == 2 && c.guidance == Some(vec![2.0, 2.0])), "{calls:?}");
    assert_eq!(calls.len(), 8);
}

#[test]
fn guidance_needing_a_negative_refuses_without_one() {
    let cond = vec![Tensor::ones([1, 5, 8], (Kind::Float, Device::Cpu))];
    for g in [Guidance::Cfg(2.0), Guidance::TrueCfg { scale: 2.0, embedded: None }] {
        let r = sampling::guided_model(
            |x: &Tensor, _: &Tensor, _: Option<&Tensor>, _: &[Tensor]| Ok(x.shallow_clone()),
            &cond,
            None,
            g,
        );
        let Err(e) = r else { panic!("{g:?} without a negative was accepted") };
        let e = e.to_string();
        assert!(e.contains("negative"), "{e}");
    }
    // SD's rule: a scale ≤ 1 is no guidance at all.
    assert_eq!(Guidance::cfg(1.0), Guidance::None);
    assert_eq!(Guidance::cfg(7.5), Guidance::Cfg(7.5));
}

/// The SD path through `guided_model` + `run` is the legacy `denoise` bit for bit (the sd15
/// plugin's sampling goes through it now).
#[test]
fn guided_cfg_equals_legacy_denoise() {
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(5);
    let (x0, cond, uncond) =
        (Tensor::randn([2, 4, 3, 3], opts), Tensor::randn([2, 6, 4], opts), Tensor::randn([2, 6, 4], opts));
    let net = |x: &Tensor, t: &Tensor, c: &Tensor| {
        x * 0.7 + c.mean_dim([1i64, 2].as_slice(), true, Kind::Float).unsqueeze(-1) * (t.view([-1, 1, 1, 1]) / 1000.0)
    };
    let cfg = SchedulerConfig::sd15();
    for sampler in [Sampler::Ddim, Sampler::Euler] {
        let legacy = sampling::conditioned_model(
            |x: &Tensor, t: &Tensor, c: &[Tensor]| Ok(net(x, t, &c[0])),
            std::slice::from_ref(&cond),
            Some(std::slice::from_ref(&uncond)),
            7.5,
        )
        .unwrap();
        let a = sampling::denoise(sampler, &cfg, 5, &x0, 7.5, legacy).unwrap();
        let sched = Schedule::new(sampler, &cfg, 5).unwrap();
        let m = sampling::guided_model(
            |x: &Tensor, t: &Tensor, _: Option<&Tensor>, c: &[Tensor]| Ok(net(x, t, &c[0])),
            std::slice::from_ref(&cond),
            Some(std::slice::from_ref(&uncond)),
            Guidance::Cfg(7.5),
        )
        .unwrap();
        let b = sampling::run(&sched, &x0, m).unwrap();
        assert!(a.equal(&b), "{sampler:?}");
    }
}

#[test]
fn scheduler_configs_dispatch_on_class_name() {
    let p = Path::new("scheduler/scheduler_config.json");
    let flux = json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": true});
    // The bug: a FlowMatchEuler file read as a DDPM beta schedule (linear betas by default).
    let e = SchedulerConfig::from_value(p, &flux).unwrap_err().to_string();
    assert!(e.contains("scheduler_config.json") && e.contains("_class_name") && e.contains("FlowMatchConfig"), "{e}");
    assert_eq!(
        AnySchedulerConfig::from_value(p, &flux).unwrap(),
        AnySchedulerConfig::FlowMatch(FlowMatchConfig::flux_dev())
    );
    // SD folders' classes keep reading as betas.
    for c in
        ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"]
    {
        let v = json!({"_class_name": c, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012});
        assert!(matches!(AnySchedulerConfig::from_value(p, &v).unwrap(), AnySchedulerConfig::Ddpm(_)), "{c}");
    }
    let e = SchedulerConfig::from_value(p, &json!({"_class_name": "LCMScheduler"})).unwrap_err().to_string();
    assert!(
        e.contains("_class_name")
            && e.contains("LCMScheduler")
            && e.contains("PNDMScheduler")
            && e.contains("FlowMatchEulerDiscreteScheduler"),
        "{e}"
    );
    // Unbuilt flow-matching features are refused by name.
    for (field, v) in [
        ("time_shift_type", json!("linear")),
        ("invert_sigmas", json!(true)),
        ("use_karras_sigmas", json!(true)),
        ("use_exponential_sigmas", json!(true)),
        ("use_beta_sigmas", json!(true)),
        ("stochastic_sampling", json!(true)),
        ("shift_terminal", json!(1.5)),
    ] {
        let mut c = flux.clone();
        c[field] = v;
        let e = AnySchedulerConfig::from_value(p, &c).unwrap_err().to_string();
        assert!(e.contains("scheduler_config.json") && e.contains(field), "{field}: {e}");
    }
    let e = FlowMatchConfig::from_value(p, &json!({"_class_name": "DDIMScheduler"})).unwrap_err().to_string();
    assert!(e.contains("_class_name"), "{e}");
}
