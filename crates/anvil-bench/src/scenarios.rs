//! The anvil measurements: each drives the daemon over its socket with N keep-alive clients.

use crate::client::Client;
use crate::daemon::{CLASS_COLD, CLASS_RECREATE, CLASS_VM, CLASS_WARM};
use crate::error::{Context, Error, Result};
use crate::stats::{run_clients, Budget, Run, Series};
use bytes::Bytes;
use hyper::Method;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the daemon listens; every client opens its own connection.
#[derive(Clone)]
pub struct Target {
    pub socket: Arc<PathBuf>,
}

impl Target {
    pub async fn client(&self) -> Result<Client> {
        Client::connect(&self.socket, "anvil").await
    }
}

/// Creates a sandbox of `class`; returns (id, start_path).
pub async fn create(c: &mut Client, class: &str) -> Result<(String, String)> {
    let v = c
        .post("/v1/instances", &json!({ "workload_class": class }))
        .await?
        .expect(&format!("create {class}"), &[201])?
        .json()?;
    let id = v["instance"]["id"]
        .as_str()
        .ctx(format!("create answer without instance id: {v}"))?
        .to_string();
    let path = v["start_path"].as_str().unwrap_or("").to_string();
    Ok((id, path))
}

pub async fn exec_true(c: &mut Client, id: &str) -> Result<()> {
    let v = c
        .post(
            &format!("/v1/instances/{id}/exec"),
            &json!({ "cmd": ["true"] }),
        )
        .await?
        .expect("exec true", &[200])?
        .json()?;
    if v["exit_code"] != 0 {
        return Err(Error(format!("exec true in {id}: {v}")));
    }
    Ok(())
}

pub async fn destroy(c: &mut Client, id: &str) -> Result<()> {
    c.delete(&format!("/v1/instances/{id}"))
        .await?
        .expect(&format!("destroy {id}"), &[200])?;
    Ok(())
}

/// Resets `id`; returns the mode the daemon reports and whether it went back to its pool.
pub async fn reset(c: &mut Client, id: &str, return_to_pool: bool) -> Result<(String, bool)> {
    let v = reset_answer(c, id, return_to_pool).await?;
    Ok((
        v["mode"].as_str().unwrap_or("").to_string(),
        v["returned_to_pool"].as_bool().unwrap_or(false),
    ))
}

/// The whole answer of `POST /v1/instances/{id}/reset`.
async fn reset_answer(c: &mut Client, id: &str, return_to_pool: bool) -> Result<serde_json::Value> {
    c.post(
        &format!("/v1/instances/{id}/reset"),
        &json!({ "return_to_pool": return_to_pool }),
    )
    .await?
    .expect(&format!("reset {id}"), &[200])?
    .json()
}

/// (1) cold create → exec `true` → destroy. Series: total, create, exec, destroy.
pub async fn cold_cycle(t: &Target, clients: usize, budget: Budget) -> Result<Run> {
    run_clients(clients, budget, |_, ticket| {
        let t = t.clone();
        async move {
            let mut c = t.client().await?;
            let mut s = Series::default();
            let mut iter = 0usize;
            let mut measuring = false;
            loop {
                if iter == ticket.warmup() && !measuring {
                    ticket.begin().await;
                    measuring = true;
                }
                if measuring && ticket.next().is_none() {
                    break;
                }
                iter += 1;
                let t0 = Instant::now();
                let (id, path) = create(&mut c, CLASS_COLD).await?;
                let t1 = Instant::now();
                exec_true(&mut c, &id).await?;
                let t2 = Instant::now();
                destroy(&mut c, &id).await?;
                let t3 = Instant::now();
                if path != "cold" {
                    return Err(Error(format!("{CLASS_COLD} create was `{path}`, not cold")));
                }
                if measuring {
                    s.push("total", t3 - t0);
                    s.push("create", t1 - t0);
                    s.push("exec", t2 - t1);
                    s.push("destroy", t3 - t2);
                }
            }
            Ok(s)
        }
    })
    .await
}

/// Counts of warm-pool claims that were served warm vs. cold.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ClaimCounts {
    pub warm: usize,
    pub other: usize,
    pub returned: usize,
}

/// Adds the pooled policy (owned daemon) and waits until the pool holds `target` warm.
pub async fn enable_pool(
    t: &Target,
    policies_dir: Option<&Path>,
    target: u32,
    limit: Duration,
) -> Result<()> {
    let mut c = t.client().await?;
    if let Some(dir) = policies_dir {
        let (name, text) = crate::daemon::warm_policy(target);
        std::fs::write(dir.join(&name), text).ctx(format!("write {name}"))?;
        c.post("/v1/admin/reload", &json!({}))
            .await?
            .expect("reload policies", &[200])?;
    }
    let t0 = Instant::now();
    loop {
        let v = c
            .get(&format!("/v1/pools/bubblewrap/{CLASS_WARM}"))
            .await?
            .expect("pool stats", &[200])?
            .json()?;
        let warm = v[0]["stats"]["warm_count"].as_u64().unwrap_or(0);
        if warm >= u64::from(target) {
            return Ok(());
        }
        if t0.elapsed() > limit {
            return Err(Error(format!(
                "pool {CLASS_WARM} has {warm} warm after {limit:?}, wanted {target}: {v}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drains the pool so its refills stop competing with later measurements.
pub async fn drain_pool(t: &Target) -> Result<()> {
    let mut c = t.client().await?;
    c.post(
        &format!("/v1/pools/bubblewrap/{CLASS_WARM}/drain"),
        &json!({}),
    )
    .await?
    .expect("drain pool", &[200])?;
    Ok(())
}

/// (2) warm claim → exec `true` → reset with return to the pool.
/// Series: claim, claim_exec, reset_return, cycle.
pub async fn warm_cycle(t: &Target, clients: usize, budget: Budget) -> Result<(Run, ClaimCounts)> {
    let counts = Arc::new(std::sync::Mutex::new(ClaimCounts::default()));
    let run = run_clients(clients, budget, |_, ticket| {
        let t = t.clone();
        let counts = counts.clone();
        async move {
            let mut c = t.client().await?;
            let mut s = Series::default();
            let mut local = ClaimCounts::default();
            let mut iter = 0usize;
            let mut measuring = false;
            loop {
                if iter == ticket.warmup() && !measuring {
                    ticket.begin().await;
                    measuring = true;
                }
                if measuring && ticket.next().is_none() {
                    break;
                }
                iter += 1;
                let t0 = Instant::now();
                let (id, path) = create(&mut c, CLASS_WARM).await?;
                let t1 = Instant::now();
                exec_true(&mut c, &id).await?;
                let t2 = Instant::now();
                let (_, returned) = reset(&mut c, &id, true).await?;
                let t3 = Instant::now();
                if !returned {
                    // Not pool-eligible any more: do not leave it running.
                    destroy(&mut c, &id).await?;
                }
                if measuring {
                    s.push("claim", t1 - t0);
                    s.push("claim_exec", t2 - t0);
                    s.push("reset_return", t3 - t2);
                    s.push("cycle", t3 - t0);
                    if path == "warm" {
                        local.warm += 1;
                    } else {
                        local.other += 1;
                    }
                    local.returned += usize::from(returned);
                }
            }
            if let Ok(mut g) = counts.lock() {
                g.warm += local.warm;
                g.other += local.other;
                g.returned += local.returned;
            }
            Ok(s)
        }
    })
    .await?;
    let totals = counts.lock().map(|g| *g).unwrap_or_default();
    Ok((run, totals))
}

/// Runs `op` in a loop on one sandbox per client (created before, destroyed after).
async fn on_sandbox<F, Fut>(
    t: &Target,
    class: &'static str,
    clients: usize,
    budget: Budget,
    op: F,
) -> Result<Run>
where
    F: Fn(Client, String) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(Client, Series)>> + Send,
{
    let mut c = t.client().await?;
    let mut ids = Vec::new();
    for _ in 0..clients {
        match create(&mut c, class).await {
            Ok((id, _)) => ids.push(id),
            Err(e) => {
                for id in &ids {
                    let _ = destroy(&mut c, id).await;
                }
                return Err(e);
            }
        }
    }
    let ids = Arc::new(ids);
    let result = run_clients(clients, budget, |i, ticket| {
        let t = t.clone();
        let op = op.clone();
        let id = ids[i].clone();
        async move {
            let mut c = t.client().await?;
            let mut s = Series::default();
            for _ in 0..ticket.warmup() {
                let (back, _) = op(c, id.clone()).await?;
                c = back;
            }
            ticket.begin().await;
            while ticket.next().is_some() {
                let (back, one) = op(c, id.clone()).await?;
                c = back;
                for (k, v) in one.0 {
                    for d in v {
                        s.push(k, d);
                    }
                }
            }
            Ok(s)
        }
    })
    .await;
    for id in ids.iter() {
        let _ = destroy(&mut c, id).await;
    }
    result
}

/// (3) exec `true` on a running sandbox. Series: exec.
pub async fn exec_loop(t: &Target, clients: usize, budget: Budget) -> Result<Run> {
    on_sandbox(t, CLASS_COLD, clients, budget, |mut c, id| async move {
        let mut s = Series::default();
        let t0 = Instant::now();
        exec_true(&mut c, &id).await?;
        s.push("exec", t0.elapsed());
        Ok((c, s))
    })
    .await
}

/// (4) 1 MiB file PUT then GET (content checked). Series: put, get, put_get.
pub async fn files_loop(t: &Target, budget: Budget) -> Result<Run> {
    let data = Bytes::from(
        (0..(1usize << 20))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    on_sandbox(t, CLASS_COLD, 1, budget, move |mut c, id| {
        let data = data.clone();
        async move {
            let mut s = Series::default();
            let path = format!("/v1/instances/{id}/files?path=/tmp/bench.bin");
            let t0 = Instant::now();
            c.request(Method::PUT, &path, data.clone())
                .await?
                .expect("PUT 1 MiB", &[200])?;
            let t1 = Instant::now();
            let got = c.get(&path).await?.expect("GET 1 MiB", &[200])?;
            let t2 = Instant::now();
            if got.body != data {
                return Err(Error(format!(
                    "GET returned {} bytes that differ from the {} written",
                    got.body.len(),
                    data.len()
                )));
            }
            s.push("put", t1 - t0);
            s.push("get", t2 - t1);
            s.push("put_get", t2 - t0);
            Ok((c, s))
        }
    })
    .await
}

/// (5) reset in place of the policy's mode for `class`; checks the mode the daemon used.
pub async fn reset_loop(t: &Target, class: &'static str, budget: Budget) -> Result<Run> {
    let want = match class {
        CLASS_COLD => "overlayfs-rollback",
        CLASS_RECREATE => "full-recreate",
        _ => "mm-template",
    };
    on_sandbox(t, class, 1, budget, move |mut c, id| async move {
        let mut s = Series::default();
        let t0 = Instant::now();
        let (mode, _) = reset(&mut c, &id, false).await?;
        s.push("reset", t0.elapsed());
        if mode != want {
            return Err(Error(format!("reset of {class} used `{mode}`, not {want}")));
        }
        Ok((c, s))
    })
    .await
}

/// (5b) reset in place on the pooled class, one every `period`: the daemon hands over a warm
/// twin's fresh sandbox when its pool has one, else resets in place. Series: reset (all),
/// swap (served from the pool), in_place.
pub async fn pooled_reset(t: &Target, budget: Budget, period: Duration) -> Result<Run> {
    on_sandbox(t, CLASS_WARM, 1, budget, move |mut c, id| async move {
        let mut s = Series::default();
        let t0 = Instant::now();
        let v = reset_answer(&mut c, &id, false).await?;
        let took = t0.elapsed();
        if v["mode"] != "overlayfs-rollback" {
            return Err(Error(format!(
                "pooled reset used {}, not overlayfs-rollback",
                v["mode"]
            )));
        }
        s.push("reset", took);
        s.push(
            if v["from_pool"] == true {
                "swap"
            } else {
                "in_place"
            },
            took,
        );
        if let Some(rest) = period.checked_sub(took) {
            tokio::time::sleep(rest).await;
        }
        Ok((c, s))
    })
    .await
}

/// (6) Firecracker restore-to-ready from the template snapshot: create (start_path restore)
/// then destroy. Series: create, destroy.
pub async fn vm_restore(t: &Target, budget: Budget) -> Result<Run> {
    run_clients(1, budget, |_, ticket| {
        let t = t.clone();
        async move {
            let mut c = t.client().await?;
            let mut s = Series::default();
            let mut iter = 0usize;
            let mut measuring = false;
            loop {
                if iter == ticket.warmup() && !measuring {
                    ticket.begin().await;
                    measuring = true;
                }
                if measuring && ticket.next().is_none() {
                    break;
                }
                iter += 1;
                let t0 = Instant::now();
                let (id, path) = create(&mut c, CLASS_VM).await?;
                let t1 = Instant::now();
                destroy(&mut c, &id).await?;
                let t2 = Instant::now();
                if path != "restore" {
                    return Err(Error(format!(
                        "{CLASS_VM} create was `{path}`, not restore"
                    )));
                }
                if measuring {
                    s.push("create", t1 - t0);
                    s.push("destroy", t2 - t1);
                }
            }
            Ok(s)
        }
    })
    .await
}

/// (7) GET /v1/instances/{id} paced at `rate` req/s over all clients (0 = as fast as
/// possible). Series: get.
pub async fn get_load(t: &Target, clients: usize, rate: u32, budget: Budget) -> Result<Run> {
    let mut c = t.client().await?;
    let (id, _) = create(&mut c, CLASS_COLD).await?;
    let id = Arc::new(id);
    let result = run_clients(clients, budget, |_, ticket| {
        let t = t.clone();
        let id = id.clone();
        async move {
            let mut c = t.client().await?;
            let path = format!("/v1/instances/{id}");
            let mut s = Series::default();
            for _ in 0..ticket.warmup() {
                c.get(&path).await?.expect("GET instance", &[200])?;
            }
            let mut pace = (rate > 0).then(|| {
                let period = Duration::from_secs_f64(clients as f64 / f64::from(rate));
                let mut i = tokio::time::interval(period);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            ticket.begin().await;
            while ticket.next().is_some() {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                let t0 = Instant::now();
                c.get(&path).await?.expect("GET instance", &[200])?;
                s.push("get", t0.elapsed());
            }
            Ok(s)
        }
    })
    .await;
    let _ = destroy(&mut c, &id).await;
    result
}

/// (8) creates `count` sandboxes with `clients` concurrent creators; returns their ids.
pub async fn create_many(t: &Target, count: usize, clients: usize) -> Result<Vec<String>> {
    let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let budget = Budget {
        max_ops: count,
        max_time: Duration::from_secs(120),
        warmup: 0,
    };
    let result = run_clients(clients, budget, |_, ticket| {
        let t = t.clone();
        let ids = ids.clone();
        async move {
            let mut c = t.client().await?;
            ticket.begin().await;
            while ticket.next().is_some() {
                let (id, _) = create(&mut c, CLASS_COLD).await?;
                if let Ok(mut g) = ids.lock() {
                    g.push(id);
                }
            }
            Ok(Series::default())
        }
    })
    .await;
    let made = ids.lock().map(|g| g.clone()).unwrap_or_default();
    match result {
        Ok(_) if made.len() == count => Ok(made),
        Ok(_) => {
            destroy_many(t, &made, clients).await;
            Err(Error(format!(
                "created only {} of {count} sandboxes within the time limit",
                made.len()
            )))
        }
        Err(e) => {
            destroy_many(t, &made, clients).await;
            Err(e)
        }
    }
}

/// Destroys `ids` with `clients` connections (best effort; failures are printed).
pub async fn destroy_many(t: &Target, ids: &[String], clients: usize) {
    let chunks: Vec<Vec<String>> = ids
        .chunks(ids.len().div_ceil(clients.max(1)).max(1))
        .map(|c| c.to_vec())
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for chunk in chunks {
        let t = t.clone();
        set.spawn(async move {
            let mut c = match t.client().await {
                Ok(c) => c,
                Err(e) => return eprintln!("bench: destroy: {e}"),
            };
            for id in chunk {
                if let Err(e) = destroy(&mut c, &id).await {
                    eprintln!("bench: {e}");
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}
