//! Security (issue 5): an escape suite for bubblewrap sandboxes. From inside a sandbox, try
//! to read host files, mount, create namespaces, see or signal another sandbox, reach the
//! host's network, write the template's lower layer, exceed quotas, and escape through the
//! file API. Every attempt must fail; each assertion says what was tried.
mod bwrap_support;
mod common;

use bwrap_support::*;
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

const CLASS: &str = "esc";

fn policy(quota: &str) -> Vec<(&'static str, String)> {
    vec![(
        "esc.toml",
        bwrap_policy(
            CLASS,
            &format!("[pool]\nenabled = false\nreset_mode = \"overlayfs-rollback\"\n{quota}"),
        ),
    )]
}

/// Runs `script` with /bin/sh inside `id`; returns (exit code, stdout + stderr).
fn attempt(bw: &Bw, id: &str, script: &str) -> (i64, String) {
    let r = bw.d.post(
        &format!("/v1/instances/{id}/exec"),
        json!({"cmd": ["/bin/sh", "-c", script], "timeout_ms": 20000}),
    );
    assert_eq!(r.status, 200, "exec of `{script}`: {}", r.text());
    let v: Value = r.json();
    let out = format!(
        "{}{}",
        v["stdout"].as_str().unwrap_or(""),
        v["stderr"].as_str().unwrap_or("")
    );
    (v["exit_code"].as_i64().unwrap_or(-1), out)
}

/// Asserts the attempt failed (non-zero exit) and its output does not contain `secret`.
fn blocked(bw: &Bw, id: &str, what: &str, script: &str, secret: &str) {
    let (code, out) = attempt(bw, id, script);
    assert!(
        code != 0 && (secret.is_empty() || !out.contains(secret)),
        "ESCAPE: {what} succeeded\n  tried: {script}\n  exit {code}, output: {out}"
    );
    eprintln!(
        "blocked: {what} (exit {code}: {})",
        out.trim().lines().last().unwrap_or("")
    );
}

#[test]
fn host_files_are_out_of_reach() {
    let Some(bw) = Bw::start(policy("")) else {
        return;
    };
    let id = bw.create(CLASS);
    let token = format!("host-secret-{}", std::process::id());
    let secret = bw.d.dir.path().join("host-secret.txt");
    std::fs::write(&secret, &token).unwrap();
    let p = secret.display().to_string();
    blocked(
        &bw,
        &id,
        "read a host file by its host path",
        &format!("cat {p}"),
        &token,
    );
    blocked(
        &bw,
        &id,
        "read via /proc/1/root",
        &format!("cat /proc/1/root{p}"),
        &token,
    );
    blocked(
        &bw,
        &id,
        "read via /proc/self/root",
        &format!("cat /proc/self/root{p}"),
        &token,
    );
    blocked(
        &bw,
        &id,
        "read via ../ climbing",
        &format!("cd /root && cat ../../../../..{p}"),
        &token,
    );
    blocked(
        &bw,
        &id,
        "read via a symlink to the host path",
        &format!("ln -sf {p} /root/l && cat /root/l"),
        &token,
    );
    blocked(
        &bw,
        &id,
        "chroot into /proc/1/root",
        &format!("busybox chroot /proc/1/root cat {p}"),
        &token,
    );
    blocked(
        &bw,
        &id,
        "search the whole visible tree for the secret",
        &format!(
            "grep -rls {token} /bin /etc /root /run /sbin /tmp /usr /proc/1/root/etc 2>/dev/null"
        ),
        "",
    );
    // The host's /etc/shadow (if it has one) never shows up inside.
    if let Ok(shadow) = std::fs::read_to_string("/etc/shadow") {
        let root_line = shadow.lines().next().unwrap_or("").to_string();
        for script in [
            "cat /etc/shadow",
            "cat /proc/1/root/etc/shadow",
            "cat /proc/self/root/../../etc/shadow",
        ] {
            let (_, out) = attempt(&bw, &id, script);
            assert!(
                root_line.is_empty() || !out.contains(&root_line),
                "ESCAPE: host /etc/shadow read with `{script}`"
            );
        }
    }
    // The daemon's state dir, socket and the agent binary's host path are not visible.
    for host_path in [
        bw.d.state_dir().display().to_string(),
        bw.d.socket.display().to_string(),
    ] {
        blocked(
            &bw,
            &id,
            "see a daemon path",
            &format!("ls -d {host_path}"),
            "",
        );
    }
    // Nothing under / but the template (plus what bwrap mounts).
    let mut tpl: Vec<String> = std::fs::read_dir(&bw.template_rootfs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tpl.sort();
    let (_, ls) = attempt(&bw, &id, "ls -A /");
    let inside: Vec<String> = ls.lines().map(String::from).collect();
    assert_eq!(inside, tpl, "sandbox / shows more than the template");
    bw.finish();
}

#[test]
fn privileged_operations_fail() {
    let Some(bw) = Bw::start(policy("")) else {
        return;
    };
    let id = bw.create(CLASS);
    let (_, caps) = attempt(&bw, &id, "grep -E 'Cap(Eff|Prm|Bnd)' /proc/self/status");
    for l in caps.lines() {
        assert!(
            l.trim().ends_with("0000000000000000"),
            "capabilities left: {caps}"
        );
    }
    let host_mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    blocked(
        &bw,
        &id,
        "mount a tmpfs",
        "mkdir -p /root/m && mount -t tmpfs none /root/m",
        "",
    );
    blocked(
        &bw,
        &id,
        "bind-mount /",
        "mkdir -p /root/m && busybox mount --bind / /root/m",
        "",
    );
    blocked(
        &bw,
        &id,
        "remount / read-write elsewhere",
        "mount -o remount,rw /",
        "",
    );
    blocked(
        &bw,
        &id,
        "create a user namespace (to regain capabilities)",
        "busybox unshare -U true",
        "",
    );
    blocked(
        &bw,
        &id,
        "create a user+mount namespace and mount in it",
        "busybox unshare -U -r -m sh -c 'mkdir -p /root/m && mount -t tmpfs none /root/m && echo MOUNTED'",
        "MOUNTED",
    );
    blocked(
        &bw,
        &id,
        "create a mount namespace",
        "busybox unshare -m true",
        "",
    );
    blocked(
        &bw,
        &id,
        "make a block device node",
        "mknod /root/sda b 8 0",
        "",
    );
    blocked(
        &bw,
        &id,
        "enter the host's namespaces",
        "busybox nsenter -t 1 -m -u -n -p true && ls /proc/1/root/work",
        "",
    );
    blocked(
        &bw,
        &id,
        "write a kernel sysctl",
        "echo 1 > /proc/sys/kernel/sysrq",
        "",
    );
    blocked(
        &bw,
        &id,
        "trigger sysrq",
        "echo h > /proc/sysrq-trigger",
        "",
    );
    blocked(
        &bw,
        &id,
        "read kernel memory",
        "dd if=/dev/mem bs=16 count=1 || dd if=/dev/kmem bs=16 count=1",
        "",
    );
    blocked(
        &bw,
        &id,
        "load a kernel module",
        "busybox insmod /root/x.ko || (echo > /root/x.ko; busybox insmod /root/x.ko)",
        "",
    );
    blocked(
        &bw,
        &id,
        "change the hostname of the host",
        "hostname hacked",
        "",
    );
    // busybox date reports a refused settimeofday but exits 0: check the clock itself.
    let (_, out) = attempt(&bw, &id, "date -s '2000-01-01 00:00:00' 2>&1; date +%Y");
    assert!(
        out.trim().ends_with(&chrono_year()),
        "ESCAPE: set the clock\n  tried: date -s '2000-01-01 00:00:00'\n  output: {out}"
    );
    let host_mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        host_mounts_before.lines().count(),
        host_mounts_after.lines().count(),
        "host mount table changed while mounting from inside"
    );
    let inside = attempt(&bw, &id, "cat /proc/self/mountinfo").1;
    assert!(
        !inside.contains(" /root/m "),
        "a mount appeared inside: {inside}"
    );
    bw.finish();
}

#[test]
fn other_sandboxes_are_invisible_and_unsignalable() {
    let Some(bw) = Bw::start(policy("")) else {
        return;
    };
    let a = bw.create(CLASS);
    let b = bw.create(CLASS);
    let fp_b = bw.footprint(&b);
    let b_agent = bw
        .cgroup_procs(&b)
        .into_iter()
        .find(|p| cmdline(*p).is_some_and(|c| c.contains("anvil-agent")))
        .expect("agent of b");
    let b_bwrap = bw
        .cgroup_procs(&b)
        .into_iter()
        .find(|p| cmdline(*p).is_some_and(|c| c.starts_with(BWRAP)))
        .expect("bwrap of b");
    for pid in [b_agent, b_bwrap] {
        if pid <= 10 {
            continue; // would collide with a's own small pids
        }
        blocked(
            &bw,
            &a,
            "kill -9 the other sandbox's process by its host pid",
            &format!("kill -9 {pid}"),
            "",
        );
        blocked(
            &bw,
            &a,
            "read the other sandbox's environment",
            &format!("cat /proc/{pid}/environ"),
            "",
        );
        blocked(
            &bw,
            &a,
            "see the other sandbox's root via /proc",
            &format!("ls /proc/{pid}/root/"),
            "",
        );
    }
    // Signalling every process a sandbox can see reaches only its own.
    let _ = attempt(&bw, &a, "kill -9 -1; true");
    assert_eq!(
        bw.sh(&b, "echo b-alive"),
        "b-alive\n",
        "b survives `kill -9 -1` in a"
    );
    assert_eq!(
        bw.instance(&b)["state"],
        "running",
        "b still running after a's kill -9 -1"
    );
    assert_eq!(
        bw.d.get("/v1/health").status,
        200,
        "daemon survives kill -9 -1 inside"
    );
    // /proc shows only a's own pid namespace: the agent as 1 and a handful of processes.
    let (_, pids) = attempt(&bw, &a, "ls /proc | grep '^[0-9]*$'");
    let pids: Vec<i64> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(pids.contains(&1), "{pids:?}");
    assert!(pids.len() <= 6, "a sees {} processes: {pids:?}", pids.len());
    assert!(
        !pids.contains(&(b_agent as i64)) || b_agent <= 10,
        "a sees b's agent pid {b_agent}"
    );
    // No ptrace: the only processes a can see are its own; b's processes are untouched.
    assert!(fp_b.procs.iter().all(|(p, t)| start_time(*p) == Some(*t)));
    // b's files are not in a's tree.
    bw.put_file(&b, "/root/only-b.txt", b"b");
    blocked(
        &bw,
        &a,
        "read the other sandbox's file",
        "cat /root/only-b.txt",
        "",
    );
    bw.finish();
}

#[test]
fn no_network_beyond_the_sandbox_loopback() {
    let Some(bw) = Bw::start(policy("")) else {
        return;
    };
    let id = bw.create(CLASS);
    // A listener on the host's loopback: nothing from inside may reach it.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let (_, dev) = attempt(&bw, &id, "cat /proc/net/dev");
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"], "interfaces inside: {dev}");
    blocked(
        &bw,
        &id,
        "TCP to the host's loopback listener",
        &format!("echo hi | busybox nc -w 2 127.0.0.1 {port}"),
        "",
    );
    blocked(
        &bw,
        &id,
        "HTTP to the host's loopback",
        &format!("busybox wget -T 2 -O - http://127.0.0.1:{port}/"),
        "",
    );
    blocked(
        &bw,
        &id,
        "reach the internet by IP",
        "busybox wget -T 2 -O - http://1.1.1.1/",
        "",
    );
    blocked(
        &bw,
        &id,
        "resolve a name",
        "busybox nslookup example.com",
        "",
    );
    blocked(
        &bw,
        &id,
        "bring up a new interface",
        "busybox ip link add x type dummy",
        "",
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut got = None;
    if let Ok((mut s, peer)) = l.accept() {
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf);
        got = Some(peer);
    }
    assert!(
        got.is_none(),
        "ESCAPE: the host listener got a connection from {got:?}"
    );
    bw.finish();
}

#[test]
fn template_lower_layer_stays_untouched() {
    let Some(bw) = Bw::start(policy("")) else {
        return;
    };
    let a = bw.create(CLASS);
    // The daemon's copy of the template (the overlay's lower layer) and the source.
    let tpl_dirs: Vec<std::path::PathBuf> = std::fs::read_dir(bw.d.state_dir().join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("rootfs"))
        .filter(|p| p.is_dir())
        .chain(std::iter::once(bw.template_rootfs.clone()))
        .collect();
    assert!(tpl_dirs.len() >= 2, "{tpl_dirs:?}");
    let passwd_before: Vec<Vec<u8>> = tpl_dirs
        .iter()
        .map(|d| std::fs::read(d.join("etc/passwd")).unwrap())
        .collect();
    bw.sh(
        &a,
        "echo evil > /bin/evil; echo 'x::0:0::/:/bin/sh' >> /etc/passwd; rm -f /bin/ls; rm -rf /usr; echo ok",
    );
    for (d, before) in tpl_dirs.iter().zip(&passwd_before) {
        assert!(
            !d.join("bin/evil").exists(),
            "ESCAPE: wrote {}/bin/evil",
            d.display()
        );
        assert!(
            d.join("bin/ls").symlink_metadata().is_ok(),
            "ESCAPE: removed {}/bin/ls",
            d.display()
        );
        assert!(
            d.join("usr").is_dir(),
            "ESCAPE: removed {}/usr",
            d.display()
        );
        assert_eq!(
            &std::fs::read(d.join("etc/passwd")).unwrap(),
            before,
            "ESCAPE: changed {}/etc/passwd",
            d.display()
        );
    }
    // The same through the file API.
    let r = bw.put_file(&a, "/bin/evil2", b"x");
    assert_eq!(r.status, 200, "{}", r.text());
    for d in &tpl_dirs {
        assert!(
            !d.join("bin/evil2").exists(),
            "ESCAPE: file API wrote into {}",
            d.display()
        );
    }
    // A new sandbox from the same template sees the pristine tree.
    let b = bw.create(CLASS);
    blocked(
        &bw,
        &b,
        "see another sandbox's writes to the template",
        "test -e /bin/evil",
        "",
    );
    assert_eq!(bw.sh(&b, "test -e /bin/ls && echo present"), "present\n");
    bw.finish();
}

#[test]
fn quotas_hold() {
    let Some(bw) = Bw::start(policy("[quota]\npids_max = 24\nmemory_max = \"64Mi\"\n")) else {
        return;
    };
    let id = bw.create(CLASS);
    // pids: 60 background sleeps; at most pids_max processes can exist.
    let _ = attempt(
        &bw,
        &id,
        "for i in $(seq 60); do sleep 20 & done 2>/dev/null; true",
    );
    let sleeps = bw
        .cgroup_procs(&id)
        .into_iter()
        .filter(|p| cmdline(*p).is_some_and(|c| c == "sleep 20"))
        .count();
    let current: u64 = bw
        .cgroup_file(&id, "pids", "pids.current")
        .trim()
        .parse()
        .unwrap();
    eprintln!("pids: tried 60 background processes, {sleeps} started, pids.current {current}");
    assert!(
        current <= 24 && sleeps < 60,
        "ESCAPE: {sleeps} of 60 processes started, pids.current {current}, pids_max 24"
    );
    // Free the pids again (from the host: the sandbox has none left to fork `kill`).
    for p in bw.cgroup_procs(&id) {
        if cmdline(p).is_some_and(|c| c == "sleep 20") {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    wait_until("sleeps gone", Duration::from_secs(5), || {
        !bw.cgroup_procs(&id)
            .into_iter()
            .any(|p| cmdline(p).is_some_and(|c| c == "sleep 20"))
    });
    // memory: fill a tmpfs well past memory_max; the cgroup never exceeds its limit.
    let fill = bw.d.post(
        &format!("/v1/instances/{id}/exec"),
        json!({"cmd": ["/bin/sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=200; echo done"], "timeout_ms": 20000}),
    );
    let max_usage = hierarchy("memory").and_then(|h| {
        std::fs::read_to_string(h.join(&bw.root).join(&id).join("memory.max_usage_in_bytes")).ok()
    });
    let state = bw.instance(&id);
    eprintln!(
        "memory: fill answered {} {}; max usage {max_usage:?}, instance {}",
        fill.status,
        fill.text(),
        state["state"]
    );
    if let Some(u) = max_usage {
        let u: u64 = u.trim().parse().unwrap();
        assert!(
            u <= 64 << 20,
            "ESCAPE: memory usage {u} above memory_max 64Mi"
        );
    }
    if state["state"] == "destroyed" {
        assert_eq!(state["termination_reason"], "oom-killed", "{state}");
    }
    bw.finish();
}

#[test]
fn file_api_paths_and_symlinks_stay_inside() {
    let Some(bw) = Bw::start(policy("")) else {
        return;
    };
    let id = bw.create(CLASS);
    let token = format!("api-secret-{}", std::process::id());
    let secret = bw.d.dir.path().join("api-secret.txt");
    std::fs::write(&secret, &token).unwrap();
    let p = secret.display().to_string();
    // Symlinks inside pointing at host paths and at /proc/1/root.
    bw.sh(
        &id,
        &format!("ln -s {p} /root/to-host; ln -s / /root/to-root; ln -s /proc/1/root /root/to-proc-root; echo ok"),
    );
    for path in [
        p.clone(),
        "/root/to-host".into(),
        format!("/root/to-root{p}"),
        format!("/root/to-proc-root{p}"),
        format!("/../../..{p}"),
        format!("/proc/1/root{p}"),
        format!("/proc/self/root{p}"),
    ] {
        let r = bw.get_file(&id, &path);
        assert!(
            r.status != 200 || !String::from_utf8_lossy(&r.body).contains(&token),
            "ESCAPE: GET files?path={path} returned the host secret"
        );
        eprintln!("blocked: GET {path} → {}", r.status);
    }
    // Writes through the same paths never land on the host.
    let host_target = bw.d.dir.path().join("written-from-inside.txt");
    let ht = host_target.display().to_string();
    bw.sh(&id, &format!("ln -s {ht} /root/w-host; echo ok"));
    for path in [
        ht.clone(),
        "/root/w-host".into(),
        format!("/../..{ht}"),
        format!("/proc/1/root{ht}"),
        format!("/root/to-root{ht}"),
    ] {
        let r = bw.put_file(&id, &path, b"pwned");
        eprintln!("PUT {path} → {}", r.status);
        assert!(
            !host_target.exists(),
            "ESCAPE: PUT files?path={path} wrote on the host"
        );
    }
    // Paths the API refuses outright.
    for path in ["relative/path", "", "/etc/%00passwd"] {
        let r = bw.d.get(&format!("/v1/instances/{id}/files?path={path}"));
        assert!(
            r.status == 400 || r.status == 404,
            "GET path={path:?}: {}",
            r.status
        );
    }
    let state = bw.d.state_dir();
    assert!(Path::new(&state).is_dir());
    bw.finish();
}

/// The host's current year, as `date +%Y` prints it.
fn chrono_year() -> String {
    let out = std::process::Command::new("date")
        .arg("+%Y")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
