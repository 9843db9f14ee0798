//! The adapters' training start time (`ss_training_started_at`, `modelspec.date`): the engine
//! passes when the run began to `export_adapter`, keeps it in every checkpoint's `state.json`,
//! and a `--resume`d run writes the original run's date, not the time of the resume. Checked on
//! the real `host` with the `testing-flow` fixture, whose kohya file carries the metadata the
//! engine hands it as it is (the engine's values, not a plugin's).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use likeness_sdk::st;
use likeness_tests::{built_or_skip, demo_bundles_or_skip, Dir};

use crate::trainer::{drip_dataset, flow_train};

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SS` (UTC, no offset, as the engine writes it), or `None`
/// when it is not that shape. Days from the civil date by Howard Hinnant's `days_from_civil`
/// (the inverse of what the writer uses, so a wrong year/month/day on either side shows).
fn parse_iso(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = &s[r];
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[test]
fn iso_parser_knows_its_dates() {
    // `date -u -d @N +%FT%T` for each N.
    assert_eq!(parse_iso("1970-01-01T00:00:00"), Some(0));
    assert_eq!(parse_iso("2000-02-29T00:00:00"), Some(951_782_400));
    assert_eq!(parse_iso("2023-11-14T22:13:20"), Some(1_700_000_000));
    assert_eq!(parse_iso("2024-12-02T04:05:45"), Some(1_733_112_345));
    assert_eq!(parse_iso("2023-11-14 22:13:20"), None);
    assert_eq!(parse_iso("2023-13-14T22:13:20"), None);
}

/// The start time in a run's final kohya file: (`ss_training_started_at` as f64 seconds,
/// `modelspec.date` as Unix seconds, `ss_steps`).
fn start_time(run: &Path) -> (f64, i64, String) {
    let kohya = run.join("likeness.safetensors");
    let (_, meta) = st::load(&kohya).unwrap_or_else(|e| panic!("{}: {e}", kohya.display()));
    let get = |k: &str| meta.get(k).unwrap_or_else(|| panic!("{}: no `{k}` in {meta:?}", kohya.display())).clone();
    let started = get("ss_training_started_at");
    // sd-scripts' str(time.time()): a decimal with a fraction, never an exponent for these dates.
    assert!(
        started.contains('.') && !started.contains('e') && started.parse::<f64>().is_ok(),
        "ss_training_started_at = {started:?} is not Python's float spelling"
    );
    let date = get("modelspec.date");
    let date_s = parse_iso(&date).unwrap_or_else(|| panic!("modelspec.date = {date:?} is not YYYY-MM-DDTHH:MM:SS"));
    let started: f64 = started.parse().unwrap();
    assert_eq!(started.floor() as i64, date_s, "modelspec.date {date} is not the whole second of {started}");
    (started, date_s, get("ss_steps"))
}

/// `state.json` of a run's newest checkpoint.
fn checkpoint_state(run: &Path, step: u64) -> (std::path::PathBuf, serde_json::Value) {
    let p = run.join(format!("checkpoints/step-{step:08}/state.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (p, serde_json::from_str(&text).unwrap())
}

/// A short run's kohya file is dated when the run began (between just before `host train` was
/// started and its end, so in particular within the last hour); resumed a few seconds later it
/// keeps that date; resumed from a checkpoint written before the start time was kept, it takes
/// the time of the resume (with a warning) and keeps that from then on.
#[test]
fn adapters_are_dated_when_the_run_began_and_a_resume_keeps_the_date() {
    const T: &str = "adapters_are_dated_when_the_run_began_and_a_resume_keeps_the_date";
    let (Some(()), Some(bundles)) = (built_or_skip(T), demo_bundles_or_skip(T)) else { return };
    let dir = Dir::new("adapter-date");
    let data = drip_dataset(&dir, &bundles);

    // A: 2 steps (a checkpoint at step 2, train.save_every = 2), then resumed to 4.
    let a = dir.join("a");
    // Whole seconds before, since modelspec.date has whole seconds.
    let before = unix_now().floor();
    flow_train(&dir, &data, &a, 2, &[]).ok();
    let after = unix_now();
    let (started, date, steps) = start_time(&a);
    assert_eq!(steps, "2");
    assert!(
        before <= started && started <= after,
        "ss_training_started_at {started} is not within the run ({before} ..= {after})"
    );
    assert!(unix_now() - (date as f64) < 3600.0, "modelspec.date is more than an hour old");
    let (p, st) = checkpoint_state(&a, 2);
    assert_eq!(
        st["training_started_at_ms"].as_u64().map(|ms| ms as f64 / 1000.0),
        Some(started),
        "{} does not keep the start time: {st}",
        p.display()
    );

    // More than a second later, so that a new start time would change modelspec.date as well.
    std::thread::sleep(Duration::from_millis(1100));
    let log = flow_train(&dir, &data, &a, 4, &["--resume"]).ok();
    assert!(log.contains("resumed from step 2"), "{log}");
    let (started_b, date_b, steps_b) = start_time(&a);
    assert_eq!(steps_b, "4", "the resumed run did not rewrite the adapter");
    assert_eq!((started_b, date_b), (started, date), "the resumed run changed the training start time");
    assert_eq!(checkpoint_state(&a, 4).1["training_started_at_ms"], st["training_started_at_ms"]);

    // B: a checkpoint from before the field existed (state.json without it) resumes, dated at
    // the resume, says so, and its later checkpoints carry that time.
    let b = dir.join("b");
    flow_train(&dir, &data, &b, 2, &[]).ok();
    let (p, mut st) = checkpoint_state(&b, 2);
    let old_start = start_time(&b).0;
    st.as_object_mut().unwrap().remove("training_started_at_ms").expect("the field is written");
    std::fs::write(&p, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let before = unix_now().floor();
    let log = flow_train(&dir, &data, &b, 4, &["--resume"]).ok();
    let after = unix_now();
    assert!(log.contains("resumed from step 2"), "{log}");
    assert!(log.contains("WARN") && log.contains("has no training_started_at_ms"), "no warning:\n{log}");
    let (started_b, _, steps_b) = start_time(&b);
    assert_eq!(steps_b, "4");
    assert!(started_b > old_start, "an old checkpoint's resume kept a start time it did not have");
    assert!(
        before <= started_b && started_b <= after,
        "ss_training_started_at {started_b} is not the time of the resume ({before} ..= {after})"
    );
    assert_eq!(
        checkpoint_state(&b, 4).1["training_started_at_ms"].as_u64().map(|ms| ms as f64 / 1000.0),
        Some(started_b)
    );
}
