//! core/diffusion against diffusers 0.42.1 and the musubi-tuner formulas
//! (tests/python/diffusion_oracle.py through $LIKENESS_PYTHON; skipped only without the venv).
//!
//! diffusers computes betas/ᾱ in float32, we in f64: every bound below is a count of float32
//! roundings (u32 = 2⁻²⁴, the unit roundoff) times the magnitude it applies to.

use likeness_diffusion::schedules::*;
use likeness_diffusion::timesteps::{Sampling, TimestepSampler};
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

const U32: f64 = 1.0 / (1u64 << 24) as f64;

fn oracle() -> Option<&'static Value> {
    static V: OnceLock<Option<Value>> = OnceLock::new();
    V.get_or_init(|| {
        let py = likeness_sdk::testing::python_or_skip("diffusers_oracle")?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/diffusion_oracle.py");
        let out = std::process::Command::new(py).arg(&script).output().expect("run diffusion_oracle.py");
        assert!(out.status.success(), "diffusion_oracle.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Some(serde_json::from_slice(&out.stdout).expect("oracle JSON"))
    })
    .as_ref()
}

fn f(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn sd15_ac() -> Vec<f64> {
    alphas_cumprod(&betas(BetaSchedule::SD15, 1000).unwrap())
}

/// Relative error of float32 ᾱ_k: k+1 products each rounded once (u32) plus the rounding of each
/// factor 1 − β (u32), and the f32 β itself (≤ 4 u32 from linspace in f32 and the squaring).
fn ac_rel_bound(k: usize) -> f64 {
    6.0 * (k + 1) as f64 * U32
}

#[test]
fn ddpm_betas_and_alphas_cumprod() {
    let Some(o) = oracle() else { return };
    for (name, sched) in [
        ("scaled_linear", BetaSchedule::SD15),
        ("linear", BetaSchedule::Linear { beta_start: 0.0001, beta_end: 0.02 }),
        ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
    ] {
        let b = betas(sched, 1000).unwrap();
        let ac = alphas_cumprod(&b);
        let rb = f(&o["ddpm"][name]["betas"]);
        let rac = f(&o["ddpm"][name]["alphas_cumprod"]);
        for k in 0..1000 {
            // β: f32 linspace (start + i·step: 2 roundings, relative to the larger end ≤ 4 u32 of
            // β_end), squared for scaled_linear (doubles it), then stored (1 u32).
            let bb = 10.0 * U32 * rb[k].abs().max(rb[rb.len() - 1] * (k as f64 / 1000.0)) + 1e-300;
            assert!((b[k] - rb[k]).abs() <= bb.max(4.0 * U32 * rb[k]), "{name} beta[{k}] {} vs {}", b[k], rb[k]);
            let rel = (ac[k] - rac[k]).abs() / rac[k];
            assert!(rel <= ac_rel_bound(k), "{name} alphas_cumprod[{k}] {} vs {} (rel {rel:e})", ac[k], rac[k]);
        }
    }
}

#[test]
fn ddim_timesteps_identical() {
    let Some(o) = oracle() else { return };
    for c in o["ddim"].as_array().unwrap() {
        let spacing: Spacing = c["spacing"].as_str().unwrap().parse().unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let off = c["offset"].as_i64().unwrap();
        let ours = ddim_timesteps(1000, steps, spacing, off).unwrap();
        let refs: Vec<i64> = c["timesteps"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(ours, refs, "DDIM {spacing:?} steps={steps} offset={off}");
    }
}

#[test]
fn ddim_step_f32_and_f64() {
    let Some(o) = oracle() else { return };
    let ac = sd15_ac();
    for c in o["ddim_step"].as_array().unwrap() {
        let pred = match c["pred"].as_str().unwrap() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            _ => Prediction::Sample,
        };
        let one = c["one"].as_bool().unwrap();
        let t = c["t"].as_u64().unwrap() as usize;
        let (m, x, r) = (f(&c["m"]), f(&c["x"]), f(&c["prev"]));
        let m32: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut o32 = vec![0f32; m.len()];
        ddim_step(&ac, 50, t, &m32, &x32, pred, one, &mut o32).unwrap();
        let mut o64 = vec![0f64; m.len()];
        ddim_step(&ac, 50, t, &m, &x, pred, one, &mut o64).unwrap();
        let (a, ap) = (
            ac[t],
            if t >= 20 {
                ac[t - 20]
            } else if one {
                1.0
            } else {
                ac[0]
            },
        );
        let (sa, sb, sap, sbp) = (a.sqrt(), (1.0 - a).sqrt(), ap.sqrt(), (1.0 - ap).sqrt());
        for i in 0..m.len() {
            // Magnitude of the terms before they cancel (the widest of the three predictions'
            // forms): ~10 f32 roundings in torch on these, plus ᾱ's own f32 error (half of it
            // relative in each square root, amplified by up to 1/(1 − ᾱ) in √(1 − ᾱ)).
            let mag = (sap / sa + sbp / sb + 1.0) * (x[i].abs() + m[i].abs()) * (1.0 + sa + sb);
            let coef = ac_rel_bound(t) * (1.0 + 1.0 / (1.0 - a))
                + ac_rel_bound(t.saturating_sub(20)) * (1.0 + ap / (1.0 - ap).max(1e-3));
            let bound = mag * (12.0 * U32 + coef);
            assert!(
                (o64[i] - r[i]).abs() <= bound,
                "DDIM step {pred:?} t={t} [{i}] {} vs {} > {bound:e}",
                o64[i],
                r[i]
            );
            assert!((o32[i] as f64 - r[i]).abs() <= bound + U32 * r[i].abs(), "f32 DDIM step {pred:?} t={t} [{i}]");
        }
    }
}

#[test]
fn euler_timesteps_and_sigmas() {
    let Some(o) = oracle() else { return };
    let ac = sd15_ac();
    let base = sigmas(&ac);
    for c in o["euler"].as_array().unwrap() {
        let spacing: Spacing = c["spacing"].as_str().unwrap().parse().unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let off = c["offset"].as_i64().unwrap();
        let (ts, sg) = euler_schedule(&ac, steps, spacing, off).unwrap();
        let (rts, rsg) = (f(&c["timesteps"]), f(&c["sigmas"]));
        assert_eq!(ts.len(), rts.len());
        assert_eq!(sg.len(), rsg.len());
        for i in 0..ts.len() {
            // Timesteps are stored as float32 (one rounding of a value ≤ 1000).
            assert!((ts[i] - rts[i]).abs() <= 1000.0 * U32, "Euler {spacing:?} {steps} t[{i}] {} vs {}", ts[i], rts[i]);
            // σ = √((1 − ᾱ)/ᾱ) from f32 ᾱ: relative ½·δ·(1/(1 − ᾱ) + 1) plus 4 roundings; the
            // interpolation point moved by the f32 timestep (≤ 1000 u32) times the local slope.
            let k = (ts[i].ceil() as usize).min(999);
            let k0 = (ts[i].floor() as usize).min(999);
            let d = ac_rel_bound(k);
            let rel = 0.5 * d * (1.0 / (1.0 - ac[k0]) + 1.0) + 4.0 * U32;
            let slope = (base[k] - base[k0]).abs().max((base[k0.saturating_sub(1)] - base[k0]).abs());
            let bound = rel * sg[i] + 1000.0 * U32 * slope;
            assert!(
                (sg[i] - rsg[i]).abs() <= bound,
                "Euler {spacing:?} {steps} sigma[{i}] {} vs {} > {bound:e}",
                sg[i],
                rsg[i]
            );
        }
    }
}

#[test]
fn flow_match_schedule_matches() {
    let Some(o) = oracle() else { return };
    for c in o["flow"].as_array().unwrap() {
        let steps = c["steps"].as_u64().unwrap() as usize;
        let shift_v = c["shift"].as_f64().unwrap();
        let (shift, gain) = if c["dynamic"].as_bool().unwrap() {
            let mu = c["mu"].as_f64().unwrap();
            (FlowShift::Dynamic { shift: shift_v, mu }, mu.exp().max(1.0))
        } else {
            (FlowShift::Static(shift_v), shift_v)
        };
        let (ts, sg) = flow_match_schedule(1000, steps, shift).unwrap();
        let (rts, rsg) = (f(&c["timesteps"]), f(&c["sigmas"]));
        assert_eq!(sg.len(), rsg.len(), "{c:?}");
        for i in 0..sg.len() {
            // Inputs σ_min/σ_max are f32 (≤ 2 u32), moved through the shift map whose slope is
            // at most `gain` (s for the static map, e^μ for the exponential one), then ≤ 4 f32
            // roundings (linspace, division, the stored value).
            let bound = (2.0 * gain + 4.0) * U32;
            assert!((sg[i] - rsg[i]).abs() <= bound, "flow {c:?} sigma[{i}] {} vs {}", sg[i], rsg[i]);
            if i < ts.len() {
                assert!((ts[i] - rts[i]).abs() <= 1000.0 * bound, "flow timestep[{i}] {} vs {}", ts[i], rts[i]);
            }
        }
    }
}

fn transforms() -> Vec<(&'static str, Sampling)> {
    vec![
        ("uniform", Sampling::Uniform),
        ("sigmoid_1.5", Sampling::Sigmoid { sigmoid_scale: 1.5 }),
        ("logit_normal_0.2_1.3", Sampling::LogitNormal { mean: 0.2, std: 1.3 }),
        ("mode_1.29", Sampling::Mode { mode_scale: 1.29 }),
        ("shift_3.0", Sampling::Shift { sigmoid_scale: 1.0, discrete_flow_shift: 3.0 }),
        ("flux_shift_128x96", Sampling::FluxShift { sigmoid_scale: 1.0, latent_h: 128, latent_w: 96 }),
        ("qwen_shift_6889", Sampling::QwenShift { sigmoid_scale: 1.0, seq_len: 6889 }),
    ]
}

#[test]
fn timestep_transforms_match_reference_formulas() {
    let Some(o) = oracle() else { return };
    let (u, n) = (f(&o["draws"]["u"]), f(&o["draws"]["n"]));
    for (name, s) in transforms() {
        let r = f(&o["transforms"][name]);
        let draws = if s.needs_normal() { &n } else { &u };
        for i in 0..r.len() {
            // Both sides are f64 with the same ~10 operations (exp/cos within 1 ulp in libm and
            // torch): 128 ulp of 1 covers them with the shift maps' slope (≤ e^μ ≈ 3.2 here).
            let t = s.transform(draws[i]);
            assert!((t - r[i]).abs() <= 128.0 * f64::EPSILON, "{name}[{i}] {t} vs {}", r[i]);
        }
    }
}

/// Two-sample Kolmogorov–Smirnov statistic.
fn ks(mut a: Vec<f64>, mut b: Vec<f64>) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            i += 1
        } else {
            j += 1
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

#[test]
fn sampler_distribution_matches_reference_samples() {
    let Some(o) = oracle() else { return };
    for (name, s) in transforms() {
        let reference = f(&o["transforms"][name]);
        let mut sampler = TimestepSampler::new(s, 0.0, 1000.0, 42).unwrap();
        let ours: Vec<f64> = (0..20_000).map(|_| sampler.sample()).collect();
        let (n, m) = (reference.len() as f64, ours.len() as f64);
        // KS critical value at α = 1e-6 for samples of n and m: √(−ln(α/2)/2)·√((n+m)/(nm)); a
        // correct sampler fails once in a million seeds, a wrong transform (e.g. a missing
        // shift) moves the CDF by > 0.15 and fails surely.
        let crit = (-(1e-6f64 / 2.0).ln() / 2.0).sqrt() * ((n + m) / (n * m)).sqrt();
        let d = ks(ours, reference);
        assert!(d <= crit, "{name}: KS {d} > {crit}");
    }
}

#[test]
fn loss_weightings_match() {
    use likeness_diffusion::weighting::*;
    let Some(o) = oracle() else { return };
    let w = &o["weighting"];
    let ac = sd15_ac();
    let snr_all = snr(&ac);
    let ts: Vec<usize> = w["timesteps"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let rsnr = f(&w["snr"]);
    for (i, &t) in ts.iter().enumerate() {
        // diffusers' ᾱ starts as f32 (our f64 differs by ≤ ac_rel_bound); SNR = ᾱ/(1 − ᾱ)
        // amplifies it by 1/(1 − ᾱ).
        let rel = ac_rel_bound(t) * (1.0 + 1.0 / (1.0 - ac[t])) + 4.0 * U32;
        assert!((snr_all[t] - rsnr[i]).abs() <= rel * rsnr[i], "snr[{t}] {} vs {}", snr_all[t], rsnr[i]);
        // The weights are then computed from the reference SNR itself, in f64 on both sides.
        let s = rsnr[i];
        let close = |a: f64, b: f64, what: &str| {
            assert!((a - b).abs() <= 8.0 * f64::EPSILON * b.abs(), "{what} t={t}: {a} vs {b}")
        };
        for g in [1.0, 5.0] {
            close(min_snr_weight(s, g, Prediction::Epsilon), f(&w[format!("min_snr_eps_{g:.1}")])[i], "min_snr eps");
            close(min_snr_weight(s, g, Prediction::VPrediction), f(&w[format!("min_snr_v_{g:.1}")])[i], "min_snr v");
        }
        close(debiased_weight(s, Prediction::Epsilon), f(&w["debiased_eps"])[i], "debiased eps");
        close(debiased_weight(s, Prediction::VPrediction), f(&w["debiased_v"])[i], "debiased v");
    }
    let sig = f(&w["sigmas"]);
    for (name, scheme) in
        [("sigma_sqrt", FlowWeighting::SigmaSqrt), ("cosmap", FlowWeighting::Cosmap), ("none", FlowWeighting::None)]
    {
        let r = f(&w[name]);
        for i in 0..sig.len() {
            let ours = scheme.weight(sig[i]);
            // compute_loss_weighting_for_sd3 ends in `.float()`: one f32 rounding (u32 relative).
            assert!((ours - r[i]).abs() <= 2.0 * U32 * r[i].abs(), "{name}[{i}] {ours} vs {}", r[i]);
        }
    }
}
