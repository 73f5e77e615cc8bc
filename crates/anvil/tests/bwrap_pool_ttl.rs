//! bubblewrap on the real daemon: a warm sandbox older than the pool's `warm_ttl` is evicted
//! (destroyed with reason `evicted`, nothing left on the host) and replaced by a fresh one.
mod bwrap_support;
mod common;

use bwrap_support::*;
use std::time::Duration;

#[test]
fn warm_ttl_evicts_and_replaces_real_sandboxes() {
    let class = "bw-warm-ttl";
    let policy = bwrap_policy(
        class,
        "[pool]\nenabled = true\nmin = 0\ntarget = 1\nmax = 1\nwarm_ttl = \"1s\"\nreset_mode = \"overlayfs-rollback\"\n",
    );
    let Some(bw) = Bw::start(vec![("p.toml", policy)]) else {
        return;
    };
    wait_until("a warm sandbox", Duration::from_secs(60), || {
        bw.d.ids("state=warm").len() == 1
    });
    let first = bw.d.ids("state=warm").remove(0);
    let fp = bw.footprint(&first);
    let gone = bw.wait_destroyed(&first, Duration::from_secs(30));
    assert_eq!(gone["termination_reason"], "evicted", "{gone}");
    bw.assert_gone(&fp);
    // Replaced by a new warm sandbox, never more than max = 1 at a time.
    wait_until(
        "a replacement warm sandbox",
        Duration::from_secs(30),
        || {
            let warm = bw.d.ids("state=warm");
            assert!(warm.len() <= 1, "more than max warm: {warm:?}");
            warm.len() == 1 && warm[0] != first
        },
    );
    bw.finish();
}
