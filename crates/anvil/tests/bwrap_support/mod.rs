//! Shared setup and host inspection for the bwrap_* tests: the real daemon with the real
//! bubblewrap backend, a busybox template, and checks of what a sandbox leaves on the host
//! (processes, cgroup directories, mounts, instance directories).
//!
//! Needs root, `/usr/bin/bwrap` and the static agent (`$ANVIL_AGENT_BIN` or
//! `<target>/x86_64-unknown-linux-gnu/release/anvil-agent`, built by scripts/build-agent.sh);
//! without them each test prints `SKIP: <reason>` and returns.
#![allow(dead_code)]

use crate::common::{agent_binary, Daemon, Opts};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BWRAP: &str = "/usr/bin/bwrap";
/// v1 controllers the backend creates sandbox cgroups in.
pub const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "freezer"];

/// A policy for `class` on bubblewrap with the busybox template, plus `extra` TOML sections.
pub fn bwrap_policy(class: &str, extra: &str) -> String {
    format!(
        "manifest_version = 1\npolicy_name = \"{class}-policy\"\npriority = 10\n[match]\nworkload_class = [\"{class}\"]\n[select]\nbackend_priority = [\"bubblewrap\"]\ntemplates = [\"busybox\"]\n{extra}\n"
    )
}

/// Why these tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("bubblewrap daemon tests need root (overlay mounts, cgroups)".into());
    }
    if !Path::new(BWRAP).is_file() {
        return Some(format!(
            "{BWRAP} not installed (apt-get install bubblewrap)"
        ));
    }
    if agent_binary().is_none() {
        return Some(
            "static anvil-agent not built (scripts/build-agent.sh or $ANVIL_AGENT_BIN)".into(),
        );
    }
    None
}

/// The busybox template rootfs, built once per test binary into a shared temp path (built
/// elsewhere and renamed into place, so concurrent test binaries never see half a tree).
pub fn template_rootfs() -> PathBuf {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let shared = std::env::temp_dir().join("anvil-bwraptest-busybox");
        let rootfs = shared.join("rootfs");
        if rootfs.join("bin/busybox").is_file() {
            return rootfs;
        }
        let staging =
            std::env::temp_dir().join(format!("anvil-bwraptest-busybox.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-busybox-template.sh");
        let st = Command::new(&script)
            .arg(staging.join("rootfs"))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{} failed: {st}", script.display());
        if std::fs::rename(&staging, &shared).is_err() {
            // Another test binary won the race; its tree is complete (renamed atomically).
            std::fs::remove_dir_all(&staging).unwrap();
        }
        assert!(rootfs.join("bin/busybox").is_file());
        rootfs
    })
    .clone()
}

/// A daemon with the bubblewrap backend and the `busybox` template imported.
pub struct Bw {
    pub d: Daemon,
    /// The daemon's cgroup root name (`[cgroup].root`).
    pub root: String,
    pub template_rootfs: PathBuf,
    finished: bool,
}

/// What a live sandbox holds on the host, recorded before it is destroyed/reset so the
/// checks afterwards cannot pass vacuously.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// The cgroup (and instance directory) name: the id the instance was created with.
    pub name: String,
    /// (pid, start time) of every process in the sandbox cgroup.
    pub procs: Vec<(i32, u64)>,
    pub cgroup_dirs: Vec<PathBuf>,
    pub instance_dir: PathBuf,
}

impl Bw {
    /// Starts the daemon with `policies` (file name, TOML); None (after printing SKIP) when
    /// this host cannot run bubblewrap sandboxes.
    pub fn start(policies: Vec<(&str, String)>) -> Option<Bw> {
        Self::start_with(policies, "")
    }

    pub fn start_with(policies: Vec<(&str, String)>, extra_config: &str) -> Option<Bw> {
        if let Some(why) = missing_prerequisite() {
            eprintln!("SKIP: {why}");
            return None;
        }
        let template_rootfs = template_rootfs();
        let d = Daemon::start(Opts {
            backends: format!("bubblewrap = \"{BWRAP}\""),
            policies: policies
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
            extra: extra_config.to_string(),
            ..Opts::default()
        });
        let root = d
            .dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            root.starts_with("anvil-test-"),
            "unexpected daemon dir {root}"
        );
        let bw = Bw {
            d,
            root,
            template_rootfs,
            finished: false,
        };
        let host = bw.d.get("/v1/host").json();
        let text = host.to_string();
        assert!(
            text.contains("bubblewrap"),
            "GET /v1/host does not list bubblewrap: {text}"
        );
        let r = bw.d.post(
            "/v1/templates",
            json!({"name": "busybox", "rootfs_dir": bw.template_rootfs.to_str().unwrap()}),
        );
        assert_eq!(
            r.status,
            201,
            "template import: {}\n{}",
            r.text(),
            bw.d.log()
        );
        Some(bw)
    }

    /// Creates an instance of `class` and returns its id (asserting 201 and `running`).
    pub fn create(&self, class: &str) -> String {
        self.create_body(json!({"workload_class": class}))
    }

    pub fn create_body(&self, body: Value) -> String {
        let r = self.d.post("/v1/instances", body);
        assert_eq!(r.status, 201, "create: {}\n{}", r.text(), self.d.log());
        let v = r.json();
        assert_eq!(v["instance"]["state"], "running", "{v}");
        assert_eq!(v["instance"]["backend"], "bubblewrap", "{v}");
        v["instance"]["id"].as_str().unwrap().to_string()
    }

    /// Runs `cmd` in the sandbox to completion (asserting HTTP 200); the ExecResponse JSON.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Value {
        let r = self.d.post(
            &format!("/v1/instances/{id}/exec"),
            json!({"cmd": cmd, "timeout_ms": 30_000}),
        );
        assert_eq!(r.status, 200, "exec {cmd:?}: {}", r.text());
        r.json()
    }

    /// `sh -c script`, asserting exit 0; returns stdout.
    pub fn sh(&self, id: &str, script: &str) -> String {
        let v = self.exec(id, &["/bin/sh", "-c", script]);
        assert_eq!(v["exit_code"], 0, "`{script}` failed: {v}");
        v["stdout"].as_str().unwrap().to_string()
    }

    pub fn put_file(&self, id: &str, path: &str, data: &[u8]) -> crate::common::Response {
        self.d.put(
            &format!("/v1/instances/{id}/files?path={path}"),
            data.to_vec(),
        )
    }

    pub fn get_file(&self, id: &str, path: &str) -> crate::common::Response {
        self.d.get(&format!("/v1/instances/{id}/files?path={path}"))
    }

    pub fn instance(&self, id: &str) -> Value {
        let r = self.d.get(&format!("/v1/instances/{id}"));
        assert_eq!(r.status, 200, "GET {id}: {}", r.text());
        r.json()
    }

    pub fn instances_dir(&self) -> PathBuf {
        self.d.state_dir().join("instances")
    }

    /// Names of the directories under the state dir's `instances/`, sorted.
    pub fn instance_dir_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.instances_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.instances_dir().join(name)
    }

    /// Every directory the sandbox cgroup `name` has or would have, in every hierarchy.
    pub fn cgroup_dirs(&self, name: &str) -> Vec<PathBuf> {
        hierarchies()
            .into_iter()
            .map(|h| h.join(&self.root).join(name))
            .collect()
    }

    /// The daemon's root cgroup directories.
    pub fn root_dirs(&self) -> Vec<PathBuf> {
        hierarchies()
            .into_iter()
            .map(|h| h.join(&self.root))
            .collect()
    }

    /// pids in the cgroup `name` (union over hierarchies).
    pub fn cgroup_procs(&self, name: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .cgroup_dirs(name)
            .iter()
            .flat_map(|d| read_pids(&d.join("cgroup.procs")))
            .collect();
        pids.sort();
        pids.dedup();
        pids
    }

    /// A v1 (or v2) control file of the sandbox cgroup, e.g. ("pids", "pids.current").
    pub fn cgroup_file(&self, name: &str, controller: &str, file: &str) -> String {
        let base = hierarchy(controller).unwrap_or_else(|| panic!("no {controller} hierarchy"));
        let p = base.join(&self.root).join(name).join(file);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    /// Records what the live sandbox `name` holds on the host and asserts it is all there.
    pub fn footprint(&self, name: &str) -> Footprint {
        let procs: Vec<(i32, u64)> = self
            .cgroup_procs(name)
            .into_iter()
            .filter_map(|p| start_time(p).map(|t| (p, t)))
            .collect();
        assert!(
            procs.len() >= 2,
            "sandbox {name}: expected bwrap and the agent in its cgroup, found {procs:?}"
        );
        let cgroup_dirs = self.cgroup_dirs(name);
        for d in &cgroup_dirs {
            assert!(
                d.is_dir(),
                "cgroup dir {} missing for live sandbox",
                d.display()
            );
        }
        let instance_dir = self.instance_dir(name);
        assert!(
            instance_dir.is_dir(),
            "{} missing for live sandbox",
            instance_dir.display()
        );
        assert_eq!(
            self.mounts_of(&instance_dir).len(),
            1,
            "live sandbox {name} should have exactly its overlay mounted"
        );
        let cmdlines = processes_mentioning(&instance_dir.to_string_lossy());
        assert!(
            !cmdlines.is_empty(),
            "no bwrap process mentions {}",
            instance_dir.display()
        );
        Footprint {
            name: name.to_string(),
            procs,
            cgroup_dirs,
            instance_dir,
        }
    }

    /// Mountinfo lines (of this process and of the daemon) that mention `dir`.
    pub fn mounts_of(&self, dir: &Path) -> Vec<String> {
        let needle = dir.to_string_lossy().into_owned();
        let mut sources = vec![PathBuf::from("/proc/self/mountinfo")];
        if let Some(p) = self.d.pid() {
            sources.push(PathBuf::from(format!("/proc/{p}/mountinfo")));
        }
        let mut out: Vec<String> = sources
            .iter()
            .filter_map(|s| std::fs::read_to_string(s).ok())
            .flat_map(|t| {
                t.lines()
                    .filter(|l| l.contains(&needle))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Asserts the sandbox of `fp` left nothing on the host: its processes are gone, no
    /// process sits in (a child of) its cgroup, its cgroup directories, mounts and instance
    /// directory are removed, and no process mentions its directory.
    pub fn assert_gone(&self, fp: &Footprint) {
        self.assert_procs_gone(fp);
        let cg_suffix = format!("/{}/{}", self.root, fp.name);
        let inside: Vec<_> = all_pids()
            .into_iter()
            .filter(|p| {
                cgroup_paths(*p)
                    .iter()
                    .any(|c| c.ends_with(&cg_suffix) || c.contains(&format!("{cg_suffix}/")))
            })
            .collect();
        assert!(
            inside.is_empty(),
            "processes still in cgroup {cg_suffix}: {inside:?}"
        );
        for d in &fp.cgroup_dirs {
            assert!(!d.exists(), "cgroup dir {} still exists", d.display());
        }
        let m = self.mounts_of(&fp.instance_dir);
        assert!(
            m.is_empty(),
            "mounts of {} left: {m:#?}",
            fp.instance_dir.display()
        );
        assert!(
            !fp.instance_dir.exists(),
            "instance dir {} still exists",
            fp.instance_dir.display()
        );
        let p = processes_mentioning(&fp.instance_dir.to_string_lossy());
        assert!(
            p.is_empty(),
            "processes still mention {}: {p:?}",
            fp.instance_dir.display()
        );
    }

    /// Asserts every process recorded in `fp` has exited (pid gone or reused).
    pub fn assert_procs_gone(&self, fp: &Footprint) {
        let alive: Vec<_> = fp
            .procs
            .iter()
            .filter(|(p, t)| start_time(*p) == Some(*t))
            // A killed agent whose bwrap parent died first is reparented to the host's init,
            // which reaps it; a zombie holds no resources and is no longer in any cgroup.
            .filter(|(p, _)| proc_state(*p) != Some('Z'))
            .map(|(p, _)| {
                (
                    *p,
                    cmdline(*p),
                    std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default(),
                )
            })
            .collect();
        assert!(
            alive.is_empty(),
            "sandbox {} processes still alive: {alive:?}",
            fp.name
        );
    }

    /// Waits until the instance is destroyed; returns its JSON.
    pub fn wait_destroyed(&self, id: &str, timeout: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.instance(id);
            if v["state"] == "destroyed" {
                return v;
            }
            assert!(
                t0.elapsed() < timeout,
                "instance {id} not destroyed after {timeout:?}: {v}\n{}",
                self.d.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the daemon (shutdown = destroy) and asserts nothing of this daemon is left on
    /// the host: no sandbox cgroup under its root, no process in its root, no mount or
    /// process mentioning its directory. Then removes the (empty) root cgroups.
    pub fn finish(mut self) {
        self.finished = true;
        let st = self.d.sigterm();
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon exit: {st:?}\n{}",
            self.d.log()
        );
        let dir = self.d.dir.path().to_string_lossy().into_owned();
        for r in self.root_dirs() {
            if !r.exists() {
                continue;
            }
            let children: Vec<_> = std::fs::read_dir(&r)
                .unwrap()
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect();
            assert!(
                children.is_empty(),
                "sandbox cgroups left under {}: {children:?}",
                r.display()
            );
            let procs = read_pids(&r.join("cgroup.procs"));
            assert!(
                procs.is_empty(),
                "processes left in {}: {procs:?}",
                r.display()
            );
        }
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&dir))
            .map(String::from)
            .collect();
        assert!(mounts.is_empty(), "mounts left under {dir}: {mounts:#?}");
        let procs = processes_mentioning(&dir);
        assert!(
            procs.is_empty(),
            "processes left mentioning {dir}: {procs:?}"
        );
        let agents = self.agents_in_root();
        assert!(
            agents.is_empty(),
            "anvil-agent processes left in cgroup root {}: {agents:?}",
            self.root
        );
        if self.instances_dir().exists() {
            let left: Vec<_> = std::fs::read_dir(self.instances_dir())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "instance dirs left: {left:?}");
        }
        self.remove_roots();
    }

    /// anvil-agent processes whose cgroup lies under this daemon's root.
    pub fn agents_in_root(&self) -> Vec<(i32, String)> {
        let needle = format!("/{}/", self.root);
        all_pids()
            .into_iter()
            .filter(|p| cgroup_paths(*p).iter().any(|c| c.contains(&needle)))
            .filter_map(|p| cmdline(p).map(|c| (p, c)))
            .filter(|(_, c)| {
                c.split(' ')
                    .next()
                    .is_some_and(|argv0| argv0.ends_with("anvil-agent"))
            })
            .collect()
    }

    fn remove_roots(&self) {
        for r in self.root_dirs() {
            if r.exists() {
                if let Err(e) = std::fs::remove_dir(&r) {
                    eprintln!("removing {}: {e}", r.display());
                }
            }
        }
    }

    /// After a failed test: kill whatever is left in our cgroups, detach our mounts.
    fn scrub(&self) {
        for r in self.root_dirs() {
            let Ok(rd) = std::fs::read_dir(&r) else {
                continue;
            };
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                for p in read_pids(&e.path().join("cgroup.procs")) {
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let dir = self.d.dir.path().to_string_lossy().into_owned();
        let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for m in points {
            let c = std::ffi::CString::new(m).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        for r in self.root_dirs() {
            let Ok(rd) = std::fs::read_dir(&r) else {
                continue;
            };
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        self.remove_roots();
    }
}

impl Drop for Bw {
    fn drop(&mut self) {
        if !self.finished {
            self.d.sigterm();
            self.scrub();
        }
    }
}

/// Mount points of the cgroup hierarchies sandboxes use: one per v1 controller (memory,
/// pids, cpu, freezer) and the cgroup2 mount, read from /proc/self/mountinfo.
pub fn hierarchies() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = V1_CONTROLLERS.iter().filter_map(|c| hierarchy(c)).collect();
    if let Some(u) = hierarchy("cgroup2") {
        out.push(u);
    }
    out.sort();
    out.dedup();
    out
}

/// The mount point of a v1 controller's hierarchy, or of cgroup2 for "cgroup2".
pub fn hierarchy(controller: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let (pre, post) = line.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        let mut post = post.split(' ');
        let fstype = post.next()?;
        let opts = post.nth(1).unwrap_or("");
        let hit = match controller {
            "cgroup2" => fstype == "cgroup2",
            c => fstype == "cgroup" && opts.split(',').any(|o| o == c),
        };
        if hit {
            return Some(PathBuf::from(point));
        }
    }
    None
}

pub fn read_pids(p: &Path) -> Vec<i32> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Start time (clock ticks since boot) of a live pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // Fields after the comm: state is field 3, starttime field 22.
    rest.split(' ').nth(19)?.parse().ok()
}

/// The state letter of a live pid (R, S, D, Z, ...).
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// The cgroup paths of a pid (one per hierarchy line of /proc/<pid>/cgroup).
pub fn cgroup_paths(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(String::from))
        .collect()
}

/// The command line of a pid, arguments joined by spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_string(),
    )
}

/// (pid, cmdline) of every process (other than this test) whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter_map(|p| cmdline(p).map(|c| (p, c)))
        .filter(|(_, c)| c.contains(needle))
        .collect()
}

/// Waits until `f` holds or panics with `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}
