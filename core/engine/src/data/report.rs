//! The dataset report: counts per role, buckets, splits and problems, as `host data check`
//! prints it ([`DataSet::describe_all`]) and writes it (`--json`, [`DataSet::report_json`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::{roles, DataSet, Example, Severity};

impl DataSet {
    /// Examples per image role, per text role, with a non-empty caption, with controls, and
    /// the number of control images.
    fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.all() {
            for (r, p) in &e.images {
                *c.images.entry(r.clone()).or_insert(0) += 1;
                c.files.entry(r.clone()).or_default().insert(p.clone());
            }
            for (r, t) in &e.texts {
                *c.texts.entry(r.clone()).or_insert(0) += 1;
                if r == roles::CAPTION && !t.trim().is_empty() {
                    c.captions += 1;
                }
            }
            let n = e.images.iter().filter(|(r, _)| r == roles::CONTROL || r.starts_with("control_")).count();
            if n > 0 {
                c.with_controls += 1;
                c.controls += n;
            }
        }
        c
    }

    /// Summary for logs: counts, roles, buckets, splits and the first problems.
    pub fn describe(&self) -> String {
        self.report(Some(10))
    }

    /// [`describe`](Self::describe) listing every problem (`host data check`).
    pub fn describe_all(&self) -> String {
        self.report(None)
    }

    fn report(&self, max_problems: Option<usize>) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dataset {} (layout {}): {} example(s): {} train, {} val, {} test (split {}, seed {})",
            self.root.display(),
            self.layout,
            self.len(),
            self.train.len(),
            self.val.len(),
            self.test.len(),
            self.split,
            self.seed
        );
        self.report_roles(&mut s);
        self.report_buckets(&mut s);
        if self.sources.len() > 1 || self.layout == "musubi" {
            for src in &self.sources {
                let settings = src.settings.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ");
                let _ = writeln!(
                    s,
                    "source {} ({}): {} example(s); {settings}",
                    src.name,
                    src.path.display(),
                    src.examples
                );
            }
        }
        self.report_problems(&mut s, max_problems);
        s
    }

    /// The per-role lines of [`report`](Self::report).
    fn report_roles(&self, s: &mut String) {
        let c = self.counts();
        let list = |m: &BTreeMap<String, usize>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
        };
        let per_role = c
            .images
            .iter()
            .map(|(k, v)| format!("{k} {v} ({} file(s))", c.files.get(k).map_or(0, BTreeSet::len)))
            .collect::<Vec<_>>();
        let _ = writeln!(
            s,
            "images per role (examples): {}",
            if per_role.is_empty() { "none".to_string() } else { per_role.join(", ") }
        );
        let _ = writeln!(s, "texts per role: {}", list(&c.texts));
        let _ = writeln!(s, "captions: {} example(s) with a non-empty caption", c.captions);
        let _ = writeln!(
            s,
            "controls: {} example(s) with control images, {} control image(s)",
            c.with_controls, c.controls
        );
    }

    /// The bucket lines of [`report`](Self::report).
    fn report_buckets(&self, s: &mut String) {
        let b = self.bucket_counts();
        let _ = writeln!(
            s,
            "buckets ({}; resolution {}x{}, bucketing {}{}): {}",
            if self.square_crop { "square crops" } else { "width x height: examples" },
            self.buckets.resolution.0,
            self.buckets.resolution.1,
            if self.buckets.enable_bucket { "on" } else { "off" },
            if self.buckets.no_upscale { ", no upscale" } else { "" },
            if b.is_empty() {
                "none".into()
            } else {
                b.iter().map(|((w, h), n)| format!("{w}x{h}: {n}")).collect::<Vec<_>>().join(", ")
            }
        );
        if let Some(bs) = self.batch_size {
            let _ = writeln!(s, "batch size asked by the dataset: {bs}");
        }
    }

    /// The problem lines of [`report`](Self::report): all of them, or the first `max_problems`.
    fn report_problems(&self, s: &mut String, max_problems: Option<usize>) {
        let errors = self.problems_of(Severity::Error).count();
        let _ = write!(
            s,
            "problems: {} ({} error(s): left out, {} warning(s))",
            self.problems.len(),
            errors,
            self.problems.len() - errors
        );
        let show = max_problems.unwrap_or(usize::MAX);
        for p in self.problems.iter().take(show) {
            let _ = write!(s, "\n  {:<7} {}: {}", p.severity.as_str(), p.path.display(), p.message);
        }
        if self.problems.len() > show {
            let _ = write!(s, "\n  ... and {} more (host data check lists them all)", self.problems.len() - show);
        }
    }

    /// The machine-readable report of `host data check --json`.
    pub fn report_json(&self) -> Value {
        let c = self.counts();
        let split_of = |e: &Example, name: &str| {
            let mut v = json!({
                "id": e.id,
                "split": name,
                "bucket": [e.bucket.0, e.bucket.1],
                "images": e.images.iter().map(|(r, p)| (r.clone(), json!(p))).collect::<serde_json::Map<_, _>>(),
                "texts": e.texts.iter().map(|(r, t)| (r.clone(), json!(t))).collect::<serde_json::Map<_, _>>(),
            });
            if let Some((w, h)) = e.image(roles::TARGET).and_then(|p| self.image_sizes.get(p)) {
                v["size"] = json!([w, h]);
            }
            if !e.sizes.is_empty() {
                // Images fitted to their own size, not the bucket (musubi's control_resolution).
                v["fitted_sizes"] = json!(e
                    .sizes
                    .iter()
                    .map(|(r, (w, h))| (r.clone(), json!([w, h])))
                    .collect::<serde_json::Map<_, _>>());
            }
            v
        };
        let examples: Vec<Value> = self
            .train
            .iter()
            .map(|e| split_of(e, "train"))
            .chain(self.val.iter().map(|e| split_of(e, "val")))
            .chain(self.test.iter().map(|e| split_of(e, "test")))
            .collect();
        json!({
            "layout": self.layout,
            "root": self.root,
            "usable": !self.is_empty(),
            "counts": {
                "examples": self.len(),
                "train": self.train.len(),
                "val": self.val.len(),
                "test": self.test.len(),
                "images_per_role": c.images,
                "files_per_role": c.files.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
                "texts_per_role": c.texts,
                "captions": c.captions,
                "examples_with_controls": c.with_controls,
                "control_images": c.controls,
                "errors": self.problems_of(Severity::Error).count(),
                "warnings": self.problems_of(Severity::Warning).count(),
            },
            "buckets": self.bucket_counts().iter().map(|((w, h), n)| json!({"width": w, "height": h, "count": n})).collect::<Vec<_>>(),
            "bucketing": self.buckets,
            "square_crop": self.square_crop,
            "batch_size": self.batch_size,
            "split": self.split,
            "seed": self.seed,
            "sources": self.sources,
            "problems": self.problems,
            "examples": examples,
        })
    }
}

#[derive(Default)]
struct Counts {
    images: BTreeMap<String, usize>,
    files: BTreeMap<String, BTreeSet<PathBuf>>,
    texts: BTreeMap<String, usize>,
    captions: usize,
    with_controls: usize,
    controls: usize,
}
