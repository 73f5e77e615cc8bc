//! Collected figures, their baselines and ratios, the issue-6 targets, table and JSON output.

use crate::stats::Summary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Which figure of a summary a comparison or target uses.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    P50,
    Throughput,
}

impl Metric {
    fn of(self, s: &Summary) -> f64 {
        match self {
            Metric::P50 => s.p50_ms,
            Metric::Throughput => s.throughput_per_s,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Metric::P50 => "p50",
            Metric::Throughput => "ops/s",
        }
    }
}

/// anvil figure `key` next to baseline `base`: ratio = key / base on `metric`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub key: String,
    pub baseline: String,
    pub metric: Metric,
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    /// None: could not be measured in this run (see `figure`).
    pub met: Option<bool>,
    pub figure: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: BTreeMap<String, String>,
    pub mode: String,
    pub clients: usize,
    pub results: BTreeMap<String, Summary>,
    /// Single values (RSS in KiB, one-off timings in ms).
    pub values: BTreeMap<String, f64>,
    pub skipped: BTreeMap<String, String>,
    pub notes: Vec<String>,
    pub comparisons: Vec<Comparison>,
    pub targets: Vec<Target>,
    pub wall_secs: f64,
}

impl Report {
    pub fn add(&mut self, key: &str, s: Summary) {
        self.results.insert(key.to_string(), s);
    }

    pub fn skip(&mut self, key: &str, why: impl Into<String>) {
        let why = why.into();
        eprintln!("bench: SKIP {key}: {why}");
        self.skipped.insert(key.to_string(), why);
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    fn get(&self, key: &str, m: Metric) -> Option<f64> {
        self.results.get(key).map(|s| m.of(s))
    }

    /// Fills `comparisons` and `targets` from the results.
    pub fn evaluate(&mut self, clients: usize) {
        let cn = format!("c{clients}");
        let pairs: Vec<(String, String, Metric)> = vec![
            (
                "anvil.cold.total.c1".into(),
                "raw.bwrap.c1".into(),
                Metric::P50,
            ),
            (
                format!("anvil.cold.total.{cn}"),
                format!("raw.bwrap.{cn}"),
                Metric::Throughput,
            ),
            (
                "anvil.cold.total.c1".into(),
                "raw.bwrap_overlay.c1".into(),
                Metric::P50,
            ),
            (
                "anvil.warm.claim_exec.c1".into(),
                "raw.bwrap.c1".into(),
                Metric::P50,
            ),
            (
                format!("anvil.warm.cycle.{cn}"),
                format!("raw.bwrap.{cn}"),
                Metric::Throughput,
            ),
            ("anvil.exec.c1".into(), "raw.bwrap.c1".into(), Metric::P50),
            (
                "anvil.reset.overlayfs-rollback".into(),
                "raw.bwrap.c1".into(),
                Metric::P50,
            ),
            (
                "anvil.reset.full-recreate".into(),
                "raw.bwrap.c1".into(),
                Metric::P50,
            ),
            ("anvil.fc.restore".into(), "raw.fc.load".into(), Metric::P50),
            (
                "anvil.reset.mm-template".into(),
                "raw.fc.load".into(),
                Metric::P50,
            ),
            ("raw.fc.load".into(), "raw.fc.boot".into(), Metric::P50),
            (
                "anvil.cold.total.c1".into(),
                "raw.runsc".into(),
                Metric::P50,
            ),
            ("anvil.cold.total.c1".into(), "raw.runc".into(), Metric::P50),
            (
                "anvil.warm.claim_exec.c1".into(),
                "raw.runsc".into(),
                Metric::P50,
            ),
        ];
        self.comparisons = pairs
            .into_iter()
            .filter(|(k, b, _)| self.results.contains_key(k) || self.results.contains_key(b))
            .map(|(key, baseline, metric)| {
                let ratio = match (self.get(&key, metric), self.get(&baseline, metric)) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                };
                Comparison {
                    key,
                    baseline,
                    metric,
                    ratio,
                }
            })
            .collect();

        let ratio = |k: &str, b: &str, m: Metric| -> Option<(f64, f64, f64)> {
            let (a, bb) = (self.get(k, m)?, self.get(b, m)?);
            (bb > 0.0).then_some((a, bb, a / bb))
        };
        let mut t = Vec::new();
        let missing = |what: &str| Target {
            target: what.to_string(),
            met: None,
            figure: "not measured in this run".into(),
        };
        let what = "warm claim + exec p50 <= 0.5 x raw bwrap /bin/true p50";
        t.push(
            match ratio("anvil.warm.claim_exec.c1", "raw.bwrap.c1", Metric::P50) {
                Some((a, b, r)) => Target {
                    target: what.into(),
                    met: Some(r <= 0.5),
                    figure: format!("{a:.2} ms vs {b:.2} ms = {r:.2}x"),
                },
                None => missing(what),
            },
        );
        let what = "cold create + exec + destroy p50 <= 1.5 x raw bwrap p50";
        t.push(
            match ratio("anvil.cold.total.c1", "raw.bwrap.c1", Metric::P50) {
                Some((a, b, r)) => Target {
                    target: what.into(),
                    met: Some(r <= 1.5),
                    figure: format!("{a:.2} ms vs {b:.2} ms = {r:.2}x"),
                },
                None => missing(what),
            },
        );
        let what = format!("cold cycle throughput at {clients} clients >= 0.8 x raw bwrap");
        t.push(
            match ratio(
                &format!("anvil.cold.total.{cn}"),
                &format!("raw.bwrap.{cn}"),
                Metric::Throughput,
            ) {
                Some((a, b, r)) => Target {
                    target: what,
                    met: Some(r >= 0.8),
                    figure: format!("{a:.1}/s vs {b:.1}/s = {r:.2}x"),
                },
                None => missing(&what),
            },
        );
        let abs = |key: &str, m: Metric, limit: f64, what: &str| match self.get(key, m) {
            Some(v) => Target {
                target: what.into(),
                met: Some(v <= limit),
                figure: format!("{} {v:.3} ms", m.label()),
            },
            None => missing(what),
        };
        t.push(abs(
            "anvil.exec.c1",
            Metric::P50,
            2.0,
            "exec on a running sandbox p50 <= 2 ms",
        ));
        t.push(abs(
            "anvil.reset.overlayfs-rollback",
            Metric::P50,
            10.0,
            "overlayfs-rollback reset p50 <= 10 ms (in place: class without a pool)",
        ));
        t.push(abs(
            "anvil.reset.overlayfs-rollback.pooled",
            Metric::P50,
            10.0,
            "overlayfs-rollback reset p50 <= 10 ms (class with a warm pool)",
        ));
        let what = "Firecracker restore-to-ready p50 <= 1.3 x raw snapshot load";
        t.push(
            match ratio("anvil.fc.restore", "raw.fc.load", Metric::P50) {
                Some((a, b, r)) => Target {
                    target: what.into(),
                    met: Some(r <= 1.3),
                    figure: format!("{a:.2} ms vs {b:.2} ms = {r:.2}x"),
                },
                None => missing(what),
            },
        );
        let what = "API GET p99 <= 1 ms at 1,000 req/s";
        t.push(match self.results.get("anvil.get.paced") {
            Some(s) => Target {
                target: what.into(),
                met: Some(s.p99_ms <= 1.0 && s.throughput_per_s >= 950.0),
                figure: format!(
                    "p99 {:.3} ms at {:.0} req/s achieved",
                    s.p99_ms, s.throughput_per_s
                ),
            },
            None => missing(what),
        });
        let what = "daemon idle RSS <= 20 MiB";
        t.push(match self.values.get("rss.idle_kib") {
            Some(v) => Target {
                target: what.into(),
                met: Some(*v <= 20.0 * 1024.0),
                figure: format!("{:.1} MiB", v / 1024.0),
            },
            None => missing(what),
        });
        let what = "<= 64 KiB RSS per extra sandbox";
        t.push(match self.values.get("rss.per_sandbox_kib") {
            Some(v) => Target {
                target: what.into(),
                met: Some(*v <= 64.0),
                figure: format!("{v:.1} KiB"),
            },
            None => missing(what),
        });
        self.targets = t;
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "anvil-bench ({} mode, {} clients, {:.0} s)",
            self.mode, self.clients, self.wall_secs
        );
        for (k, v) in &self.machine {
            let _ = writeln!(o, "  {k}: {v}");
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<34} {:>3} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "figure", "c", "n", "p50 ms", "p90 ms", "p99 ms", "ops/s"
        );
        for (k, s) in &self.results {
            let _ = writeln!(
                o,
                "{:<34} {:>3} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.1}",
                k, s.clients, s.n, s.p50_ms, s.p90_ms, s.p99_ms, s.throughput_per_s
            );
        }
        if !self.values.is_empty() {
            let _ = writeln!(o);
            for (k, v) in &self.values {
                let _ = writeln!(o, "{k:<34} {v:>12.1}");
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<34} {:<26} {:>6} {:>8}",
            "anvil figure", "baseline", "metric", "ratio"
        );
        for c in &self.comparisons {
            let r = c
                .ratio
                .map(|r| format!("{r:.2}x"))
                .unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                o,
                "{:<34} {:<26} {:>6} {:>8}",
                c.key,
                c.baseline,
                c.metric.label(),
                r
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "targets (issue 6):");
        for t in &self.targets {
            let mark = match t.met {
                Some(true) => "MET    ",
                Some(false) => "NOT MET",
                None => "n/a    ",
            };
            let _ = writeln!(o, "  [{mark}] {} — {}", t.target, t.figure);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(o);
            for (k, why) in &self.skipped {
                let _ = writeln!(o, "skipped {k}: {why}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(o, "note: {n}");
        }
        o
    }
}
