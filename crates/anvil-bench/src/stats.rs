//! Latency series, percentiles, and the concurrent-client runner with bounded budgets.

use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How much one measurement may do: at most `max_ops` iterations and `max_time` of wall clock
/// (whichever ends first), after `warmup` unrecorded iterations per client.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_ops: usize,
    pub max_time: Duration,
    pub warmup: usize,
}

/// Shared between the clients of one run: hands out iterations until the budget ends. The
/// clock starts when every client finished its warm-up ([`Ticket::begin`]).
pub struct Ticket {
    next: AtomicUsize,
    budget: Budget,
    gate: tokio::sync::Barrier,
    start: OnceLock<Instant>,
}

impl Ticket {
    /// Untimed iterations each client runs before [`Ticket::begin`].
    pub fn warmup(&self) -> usize {
        self.budget.warmup
    }

    /// Waits for the other clients to finish warming up; starts the clock.
    pub async fn begin(&self) {
        self.gate.wait().await;
        self.start.get_or_init(Instant::now);
    }

    /// The next iteration number, or None when the count or the time is used up.
    pub fn next(&self) -> Option<usize> {
        let start = *self.start.get_or_init(Instant::now);
        if start.elapsed() >= self.budget.max_time {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.budget.max_ops).then_some(i)
    }
}

/// Named latency series one client recorded.
#[derive(Default, Debug)]
pub struct Series(pub BTreeMap<&'static str, Vec<Duration>>);

impl Series {
    pub fn push(&mut self, name: &'static str, d: Duration) {
        self.0.entry(name).or_default().push(d);
    }
    fn merge(&mut self, other: Series) {
        for (k, mut v) in other.0 {
            self.0.entry(k).or_default().append(&mut v);
        }
    }
}

/// What a run of N clients produced.
pub struct Run {
    pub clients: usize,
    pub wall: Duration,
    pub series: Series,
}

impl Run {
    pub fn summary(&self, series: &'static str, name: &str) -> Result<Summary> {
        let v = self
            .series
            .0
            .get(series)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::msg(format!("{name}: no samples recorded")))?;
        Ok(Summary::of(name, self.clients, v, self.wall))
    }
}

/// Runs `clients` copies of `client(index, ticket)` concurrently and merges their series.
/// Each client warms up, calls `ticket.begin()`, then loops on `ticket.next()`. The first
/// client error cancels the others and is returned.
pub async fn run_clients<F, Fut>(clients: usize, budget: Budget, client: F) -> Result<Run>
where
    F: Fn(usize, Arc<Ticket>) -> Fut,
    Fut: Future<Output = Result<Series>> + Send + 'static,
{
    let ticket = Arc::new(Ticket {
        next: AtomicUsize::new(0),
        budget,
        gate: tokio::sync::Barrier::new(clients),
        start: OnceLock::new(),
    });
    let mut set = tokio::task::JoinSet::new();
    for i in 0..clients {
        set.spawn(client(i, ticket.clone()));
    }
    let mut series = Series::default();
    while let Some(joined) = set.join_next().await {
        let result = joined.map_err(|e| Error::msg(format!("bench client panicked: {e}")))?;
        match result {
            Ok(s) => series.merge(s),
            Err(e) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                return Err(e);
            }
        }
    }
    let wall = ticket.start.get().map(|s| s.elapsed()).unwrap_or_default();
    Ok(Run {
        clients,
        wall,
        series,
    })
}

/// Latency summary of one series.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub clients: usize,
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// Completed operations per second of wall clock (all clients together).
    pub throughput_per_s: f64,
}

impl Summary {
    pub fn of(name: &str, clients: usize, v: &[Duration], wall: Duration) -> Summary {
        let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        let n = ms.len();
        let mean = if n == 0 {
            0.0
        } else {
            ms.iter().sum::<f64>() / n as f64
        };
        Summary {
            name: name.to_string(),
            clients,
            n,
            p50_ms: percentile(&ms, 50.0),
            p90_ms: percentile(&ms, 90.0),
            p99_ms: percentile(&ms, 99.0),
            mean_ms: mean,
            max_ms: ms.last().copied().unwrap_or(0.0),
            throughput_per_s: if wall.is_zero() {
                0.0
            } else {
                n as f64 / wall.as_secs_f64()
            },
        }
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 90.0), 90.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn summary_throughput_counts_all_clients() {
        let v = vec![Duration::from_millis(10); 20];
        let s = Summary::of("x", 2, &v, Duration::from_secs(2));
        assert_eq!(s.n, 20);
        assert!((s.throughput_per_s - 10.0).abs() < 1e-9);
        assert!((s.p50_ms - 10.0).abs() < 1e-9);
    }
}
