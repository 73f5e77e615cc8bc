//! Firecracker backend: one Firecracker process per VM, driven through its API socket,
//! optionally under the jailer, in its own cgroup.
//!
//! - create: restore the template's boot snapshot (or a checkpoint, for forks) when there is
//!   one (`start_path = restore`), else boot kernel + read-only rootfs (`boot`).
//! - pause/resume: `PATCH /vm`; checkpoint: pause + full snapshot (+ resume);
//!   reset `mm-template`: a fresh VMM restoring the template snapshot; rollback: the same
//!   from a checkpoint.
//! - readiness: the guest agent's `ready` over vsock ([`ReadyProbe::Agent`]) or a marker on
//!   the serial console ([`ReadyProbe::SerialMarker`]) — both event-driven, no sleep loops.
//!
//! See docs/firecracker.md for the host setup and how concurrent restores of one snapshot
//! avoid clashing on the socket paths stored inside it (`layout.rs`).

pub mod api;
mod layout;
mod spares;
mod spawn;
mod watch;

use crate::agent::{AgentClient, AgentEndpoint, ReadyListener};
use crate::cgroup::{Cgroup, CgroupConfig, CgroupManager};
use crate::spec::{InstanceSpec, TemplateFiles, VmSpec};
use crate::steps::Steps;
use crate::{Backend, BackendError, CheckpointOutcome, ExitCause, Probe, Runtime};
use anvil_core::backend::{BackendKind, Capabilities, CheckpointKind, ResetMode};
use api::{ApiError, FcApi, VmState};
use async_trait::async_trait;
use layout::VmDir;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use watch::{MarkerScan, PidFd, WaitError};

pub use layout::{SNAP_MEM, SNAP_META, SNAP_VMSTATE};

/// Guest vsock port the agent serves on (host connects with `CONNECT 1024`).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Host port the agent connects to at startup to say `ready` (Firecracker forwards it to
/// `<vsock_uds>_1025` on the host).
pub const READY_VSOCK_PORT: u32 = 1025;
/// Guest CID (any value ≥ 3; each VM has its own vsock device, so they need not differ).
const GUEST_CID: u32 = 3;
const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Major version this backend speaks the API of.
const SUPPORTED_MAJOR: &str = "1.";

/// How the backend learns a freshly booted guest is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadyProbe {
    /// The guest agent connects to vsock port [`READY_VSOCK_PORT`] and sends `ready`; after a
    /// restore, one `health` call over vsock port [`AGENT_VSOCK_PORT`].
    Agent,
    /// The string appears on the serial console (guests without an agent, e.g. the test
    /// guest). After a restore the VM counts as ready once Firecracker reports it running.
    SerialMarker(String),
}

/// Backend configuration (from the daemon's `[backends.firecracker]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerConfig {
    pub firecracker: PathBuf,
    /// Jailer binary; required when `use_jailer`.
    pub jailer: Option<PathBuf>,
    pub use_jailer: bool,
    /// Jailer chroots live in `<chroot_base>/firecracker/<id>/root`. Keep it on the same file
    /// system as the state dir so template files and snapshots are hard-linked, not copied.
    pub chroot_base: PathBuf,
    /// Without the jailer: the fixed path at which every VMM sees its own VM directory (in a
    /// private mount namespace). Recorded in snapshots; must not change while they are in use.
    pub vm_root: PathBuf,
    /// Jailer: the user and group the VMM runs as.
    pub uid: u32,
    pub gid: u32,
    pub ready_timeout: Duration,
    pub ready_probe: ReadyProbe,
    /// Where sandbox cgroups go; `None` runs VMMs without a cgroup (no quota enforcement).
    pub cgroup: Option<CgroupConfig>,
    /// SIGTERM → SIGKILL grace on destroy.
    pub stop_grace: Duration,
    /// Firecracker's own log level (Error, Warning, Info, Debug).
    pub log_level: String,
    /// Spare VMMs to keep started for restores (plain mode; see `spares.rs`); 0 = none.
    pub spares: usize,
    /// Where spare VMMs keep their directories (same file system as the instance dirs).
    pub spares_dir: PathBuf,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            firecracker: PathBuf::from("/usr/local/bin/firecracker"),
            jailer: Some(PathBuf::from("/usr/local/bin/jailer")),
            use_jailer: false,
            chroot_base: PathBuf::from("/srv/jailer"),
            vm_root: PathBuf::from("/run/anvil-fc/vm"),
            uid: 0,
            gid: 0,
            ready_timeout: Duration::from_secs(30),
            ready_probe: ReadyProbe::Agent,
            cgroup: Some(CgroupConfig::default()),
            stop_grace: Duration::from_secs(2),
            log_level: "Warning".into(),
            spares: 0,
            spares_dir: PathBuf::from("/var/lib/anvil/firecracker/spares"),
        }
    }
}

/// Written next to every snapshot/checkpoint so a restore can refuse an incompatible one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub firecracker_version: String,
    pub jailed: bool,
    /// Plain mode: the `vm_root` the VMM saw (recorded inside the vmstate).
    pub vm_root: Option<PathBuf>,
    pub vsock: bool,
    pub vcpus: u32,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartPath {
    Boot,
    Restore,
}

/// This backend's part of a [`Runtime`] (`Runtime::data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FcRuntime {
    pub instance_dir: PathBuf,
    /// Host path of the VM directory (plain: `<instance_dir>/vm`; jailer: the chroot).
    pub vm_dir: PathBuf,
    /// How the VMM names `vm_dir` (`vm_root` or `/`).
    pub vmm_dir: PathBuf,
    /// Jailer: `<chroot_base>/firecracker/<id>`, removed on destroy.
    pub jail_dir: Option<PathBuf>,
    pub api_socket: PathBuf,
    pub vsock_uds: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    pub cgroup: Option<Cgroup>,
    pub start_path: StartPath,
}

impl FcRuntime {
    fn vm(&self) -> VmDir {
        VmDir {
            host: self.vm_dir.clone(),
            vmm: self.vmm_dir.clone(),
        }
    }
    fn api(&self) -> FcApi {
        FcApi::new(&self.api_socket)
    }
}

/// What to start a VMM with.
enum Source<'a> {
    Boot(&'a TemplateFiles),
    /// A directory with `vmstate`, `mem` and `snapshot.json`.
    Snapshot(&'a Path),
}

#[derive(Clone)]
pub struct FirecrackerBackend {
    cfg: FirecrackerConfig,
    cgroups: Option<CgroupManager>,
    spares: std::sync::Arc<spares::Spares>,
}

impl FirecrackerBackend {
    /// Validates the configuration and prepares the host directories it names. Binaries
    /// and KVM are checked by [`Backend::probe`].
    pub fn new(cfg: FirecrackerConfig) -> Result<Self, BackendError> {
        let cgroups = match &cfg.cgroup {
            Some(c) => Some(
                CgroupManager::new(c).map_err(|e| BackendError::Other(format!("cgroups: {e}")))?,
            ),
            None => None,
        };
        if cfg.use_jailer && cfg.jailer.is_none() {
            return Err(BackendError::Other(
                "firecracker: use_jailer is set but no jailer binary is configured".into(),
            ));
        }
        let dir = if cfg.use_jailer {
            &cfg.chroot_base
        } else {
            &cfg.vm_root
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| BackendError::io(format!("create {}", dir.display()), e))?;
        // Spares need the private-namespace mode (the jailer fixes a VMM's id and chroot at
        // its start) and a cgroup to put a quota on when taken.
        let want = if cfg.use_jailer || cgroups.is_none() {
            0
        } else {
            cfg.spares
        };
        let spares = std::sync::Arc::new(spares::Spares::new(cfg.spares_dir.clone(), want));
        Ok(FirecrackerBackend {
            cfg,
            cgroups,
            spares,
        })
    }

    /// The daemon's way in: binaries, cgroup root, ready timeout and state dir from the
    /// registry settings; the jailer is used when one is configured (as uid/gid 0 — set
    /// [`FirecrackerConfig::uid`]/`gid` through [`FirecrackerBackend::new`] for another user).
    /// Shared paths: `<state_dir>/firecracker/{vmroot,jailer}`.
    pub fn from_settings(s: &crate::registry::BackendSettings) -> Result<Self, BackendError> {
        let base = s.state_dir.join("firecracker");
        Self::new(FirecrackerConfig {
            firecracker: s.binary.clone(),
            jailer: s.jailer.clone(),
            use_jailer: s.jailer.is_some(),
            chroot_base: base.join("jailer"),
            vm_root: base.join("vmroot"),
            ready_timeout: s.ready_timeout,
            cgroup: Some(CgroupConfig {
                root_name: s.cgroup_root.clone(),
                base: None,
            }),
            spares: s.vmm_spares as usize,
            spares_dir: base.join("spares"),
            ..FirecrackerConfig::default()
        })
    }

    pub fn config(&self) -> &FirecrackerConfig {
        &self.cfg
    }

    /// Boots `template` once, waits for readiness, pauses and writes a full snapshot
    /// (`vmstate`, `mem`, `snapshot.json`) into `out_dir` (created if missing), then stops
    /// that VM. Point `TemplateFiles::snapshot_dir` at `out_dir` to make creates restore it.
    /// `work_dir` holds the temporary VM (removed afterwards).
    pub async fn prepare_snapshot(
        &self,
        template: &TemplateFiles,
        vm: &VmSpec,
        work_dir: &Path,
        out_dir: &Path,
    ) -> Result<SnapshotMeta, BackendError> {
        std::fs::create_dir_all(out_dir)
            .map_err(|e| BackendError::io(format!("create {}", out_dir.display()), e))?;
        let mut boot_template = template.clone();
        boot_template.snapshot_dir = None;
        // Unique per call: two prepares of one template must not share a jail or cgroup.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = layout::vmm_id(&format!("tmpl-{}-{nonce:x}", layout::vmm_id(&template.id)));
        let spec = InstanceSpec {
            id: name.clone(),
            instance_dir: work_dir.to_path_buf(),
            cgroup_name: name,
            template: boot_template,
            quota: Default::default(),
            network: false,
            env: Default::default(),
            vm: Some(vm.clone()),
            from_checkpoint: None,
        };
        // Written aside and renamed into place: VMs already restored from an older snapshot in
        // `out_dir` keep their MAP_PRIVATE mappings of the old (now unlinked) memory file
        // instead of seeing it rewritten under them.
        let staging = out_dir.join(format!(".new-{}", spec.id));
        std::fs::create_dir_all(&staging)
            .map_err(|e| BackendError::io(format!("create {}", staging.display()), e))?;
        let published = async {
            let rt = self.launch(&spec, Source::Boot(&spec.template)).await?;
            let result = self.snapshot_into(&rt, &spec, &staging, false).await;
            let teardown = self.teardown(&rt, true).await;
            let meta = result?;
            teardown?;
            // The metadata last: a snapshot dir with snapshot.json is complete.
            for f in [layout::SNAP_VMSTATE, layout::SNAP_MEM, layout::SNAP_META] {
                std::fs::rename(staging.join(f), out_dir.join(f))
                    .map_err(|e| BackendError::io(format!("publish snapshot file {f}"), e))?;
            }
            Ok(meta)
        }
        .await;
        remove_tree(&staging)?;
        published
    }

    fn runtime_of(rt: &Runtime) -> Result<FcRuntime, BackendError> {
        serde_json::from_value(rt.data.clone()).map_err(|e| {
            BackendError::Other(format!("firecracker runtime record is unreadable: {e}"))
        })
    }

    fn to_runtime(pid: i32, start: u64, fc: &FcRuntime) -> Result<Runtime, BackendError> {
        Ok(Runtime {
            backend: BackendKind::Firecracker,
            pid: Some(pid),
            pid_start_time: Some(start),
            data: serde_json::to_value(fc)
                .map_err(|e| BackendError::Other(format!("encode runtime: {e}")))?,
        })
    }

    fn vm_spec(spec: &InstanceSpec) -> VmSpec {
        let mut vm = spec.vm.clone().unwrap_or_default();
        if vm.vcpus == 0 {
            vm.vcpus = 1;
        }
        if vm.memory_bytes == 0 {
            vm.memory_bytes = 128 << 20;
        }
        vm
    }

    /// Starts a VMM for `spec` from `source` and waits until it is ready. On any error
    /// everything it set up is gone again.
    async fn launch(
        &self,
        spec: &InstanceSpec,
        source: Source<'_>,
    ) -> Result<Runtime, BackendError> {
        let t0 = Instant::now();
        let probe = &self.probe_for(&spec.template);
        let vm = Self::vm_spec(spec);
        let meta = match source {
            Source::Snapshot(dir) => Some(self.check_snapshot(dir)?),
            Source::Boot(_) => None,
        };
        let vsock = meta
            .as_ref()
            .map_or(vm.enable_vsock || *probe == ReadyProbe::Agent, |m| m.vsock);
        if let Source::Snapshot(dir) = &source {
            let (vmstate, mem) = (dir.join(layout::SNAP_VMSTATE), dir.join(layout::SNAP_MEM));
            if let Some(r) = self.restore_on_spare(spec, &vmstate, &mem, vsock).await {
                return r;
            }
        }
        let vmm_id = layout::vmm_id(&spec.id);
        let (vm_dir, jail_dir) = if self.cfg.use_jailer {
            let jail = layout::jail_dir(&self.cfg.chroot_base, &self.cfg.firecracker, &vmm_id);
            (
                VmDir {
                    host: jail.join("root"),
                    vmm: PathBuf::from("/"),
                },
                Some(jail),
            )
        } else {
            (
                VmDir {
                    host: spec.instance_dir.join("vm"),
                    vmm: self.cfg.vm_root.clone(),
                },
                None,
            )
        };
        let want_console = vm.serial_log || matches!(probe, ReadyProbe::SerialMarker(_));
        let mut fc = FcRuntime {
            instance_dir: spec.instance_dir.clone(),
            vm_dir: vm_dir.host.clone(),
            vmm_dir: vm_dir.vmm.clone(),
            jail_dir,
            api_socket: vm_dir.host(layout::API_SOCK),
            vsock_uds: vsock.then(|| vm_dir.host(layout::VSOCK_UDS)),
            console_log: want_console.then(|| spec.instance_dir.join("console.log")),
            cgroup: None,
            start_path: if meta.is_some() {
                StartPath::Restore
            } else {
                StartPath::Boot
            },
        };
        // From here on, `fail` undoes whatever exists (missing pieces are skipped).
        let mut pid = None;
        let mut steps = Steps::start();
        let res = self
            .launch_inner(
                spec, &vm, source, &vm_dir, &vmm_id, &mut fc, &mut pid, &mut steps,
            )
            .await;
        match res {
            Ok((p, start)) => {
                tracing::info!(id = %spec.id, pid = p, path = ?fc.start_path, ms = t0.elapsed().as_millis() as u64, %steps, "firecracker VM ready");
                Self::to_runtime(p, start, &fc)
            }
            Err(e) => {
                let vmm = pid.and_then(|(p, start)| Some((p, start?)));
                if let Err(cleanup) = self.teardown_fc(vmm, &fc, true).await {
                    tracing::warn!(id = %spec.id, error = %cleanup, "cleanup after failed firecracker start");
                }
                Err(e)
            }
        }
    }

    /// The template's serial marker (guests without an agent) or the configured probe.
    fn probe_for(&self, t: &TemplateFiles) -> ReadyProbe {
        match &t.ready_marker {
            Some(m) => ReadyProbe::SerialMarker(m.clone()),
            None => self.cfg.ready_probe.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch_inner(
        &self,
        spec: &InstanceSpec,
        vm: &VmSpec,
        source: Source<'_>,
        vm_dir: &VmDir,
        vmm_id: &str,
        fc: &mut FcRuntime,
        pid_out: &mut Option<(i32, Option<u64>)>,
        steps: &mut Steps,
    ) -> Result<(i32, u64), BackendError> {
        let io = |what: String| move |e| BackendError::io(what, e);
        let probe = &self.probe_for(&spec.template);
        std::fs::create_dir_all(&spec.instance_dir)
            .map_err(io(format!("create {}", spec.instance_dir.display())))?;
        if let Some(jail) = &fc.jail_dir {
            // A stale jail of the same id (crash during a previous start) would make the jailer fail.
            remove_tree(jail)?;
        } else {
            remove_tree(&vm_dir.host)?;
        }
        std::fs::create_dir_all(&vm_dir.host)
            .map_err(io(format!("create {}", vm_dir.host.display())))?;
        for f in [layout::FC_LOG, layout::METRICS] {
            spawn::touch(&vm_dir.host(f))
                .map_err(io(format!("create {}", vm_dir.host(f).display())))?;
        }

        // Files the VMM opens by path: linked into the chroot under the jailer.
        let mut snapshot_files = None;
        let mut boot_files = None;
        match &source {
            Source::Boot(t) => {
                let kernel = t.kernel.as_deref().ok_or_else(|| {
                    BackendError::Spawn(format!("template {} has no kernel", t.id))
                })?;
                let files = [
                    (Some(kernel), layout::JAIL_KERNEL),
                    (t.initramfs.as_deref(), layout::JAIL_INITRD),
                    (t.rootfs_image.as_deref(), layout::JAIL_ROOTFS),
                ];
                let mut resolved = Vec::new();
                for (src, jail_name) in files {
                    resolved.push(match src {
                        None => None,
                        Some(src) if self.cfg.use_jailer => {
                            let dst = vm_dir.host(jail_name);
                            spawn::link_or_copy(src, &dst)
                                .map_err(io(format!("link {} into the jail", src.display())))?;
                            Some(vm_dir.vmm(jail_name))
                        }
                        Some(src) => Some(src.to_path_buf()),
                    });
                }
                boot_files = Some(resolved);
            }
            Source::Snapshot(dir) => {
                let (vmstate, mem) = (dir.join(layout::SNAP_VMSTATE), dir.join(layout::SNAP_MEM));
                snapshot_files = Some(if self.cfg.use_jailer {
                    let snap = vm_dir.host(layout::JAIL_SNAP_DIR);
                    std::fs::create_dir_all(&snap)
                        .map_err(io(format!("create {}", snap.display())))?;
                    for (src, name) in [(&vmstate, layout::SNAP_VMSTATE), (&mem, layout::SNAP_MEM)]
                    {
                        spawn::link_or_copy(src, &snap.join(name))
                            .map_err(io(format!("link {} into the jail", src.display())))?;
                    }
                    let in_jail = vm_dir.vmm(layout::JAIL_SNAP_DIR);
                    (
                        in_jail.join(layout::SNAP_VMSTATE),
                        in_jail.join(layout::SNAP_MEM),
                    )
                } else {
                    (vmstate, mem)
                });
            }
        }
        if self.cfg.use_jailer {
            for p in [
                vm_dir.host.clone(),
                vm_dir.host(layout::FC_LOG),
                vm_dir.host(layout::METRICS),
            ] {
                spawn::chown(&p, self.cfg.uid, self.cfg.gid)
                    .map_err(io(format!("chown {}", p.display())))?;
            }
        }

        steps.mark("files");
        let cgroup = match &self.cgroups {
            Some(m) => {
                let cg = m.create(&spec.cgroup_name, &spec.quota).map_err(|e| {
                    BackendError::Spawn(format!("cgroup {}: {e}", spec.cgroup_name))
                })?;
                fc.cgroup = Some(cg.clone());
                Some(cg)
            }
            None => None,
        };
        let procs =
            match &cgroup {
                Some(cg) => Some(cg.procs_fds().map_err(|e| {
                    BackendError::Spawn(format!("cgroup {}: {e}", spec.cgroup_name))
                })?),
                None => None,
            };
        let console = match &fc.console_log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io(format!("open {}", p.display())))?,
            ),
            None => None,
        };
        // The ready listener must exist before the guest can connect.
        let ready = match (probe, &source, &fc.vsock_uds) {
            (ReadyProbe::Agent, Source::Boot(_), Some(uds)) => Some(ReadyListener::bind(
                &PathBuf::from(format!("{}_{READY_VSOCK_PORT}", uds.display())),
            )?),
            (ReadyProbe::Agent, Source::Boot(_), None) => {
                return Err(BackendError::Spawn(
                    "agent readiness needs the vsock device".into(),
                ));
            }
            _ => None,
        };

        steps.mark("cgroup");
        let (pid, start, pidfd) = self
            .spawn_vmm(vmm_id, vm_dir, console, procs, fc, pid_out, steps)
            .await?;
        let api = fc.api();
        let api_err = |e: ApiError| BackendError::Spawn(e.to_string());
        match source {
            Source::Boot(t) => {
                let files = boot_files.unwrap_or_default();
                let get = |i: usize| files.get(i).cloned().flatten();
                let kernel = get(0).ok_or_else(|| {
                    BackendError::Spawn(format!("template {} has no kernel", t.id))
                })?;
                let mem_mib = vm.memory_bytes.div_ceil(1 << 20);
                api.put_machine_config(vm.vcpus, mem_mib)
                    .await
                    .map_err(api_err)?;
                let args = vm
                    .boot_args
                    .clone()
                    .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
                api.put_boot_source(&kernel, get(1).as_deref(), &args)
                    .await
                    .map_err(api_err)?;
                if let Some(rootfs) = get(2) {
                    api.put_drive("rootfs", &rootfs, true, true)
                        .await
                        .map_err(api_err)?;
                }
                if fc.vsock_uds.is_some() {
                    api.put_vsock(GUEST_CID, &vm_dir.vmm(layout::VSOCK_UDS))
                        .await
                        .map_err(api_err)?;
                }
                let console_offset = fc.console_log.as_ref().map_or(0, |p| file_len(p));
                api.instance_start().await.map_err(api_err)?;
                match (probe, ready) {
                    (ReadyProbe::Agent, Some(listener)) => {
                        tokio::select! {
                            r = listener.wait(self.cfg.ready_timeout) => { r?; }
                            _ = pidfd.exited() => return Err(self.wait_error(fc, "agent ready", WaitError::Exited)),
                        }
                    }
                    (ReadyProbe::SerialMarker(marker), _) => {
                        let log = fc.console_log.clone().unwrap_or_default();
                        let mut scan = MarkerScan::new(&log, marker.as_str(), console_offset);
                        watch::wait_in_dir(
                            &spec.instance_dir,
                            self.cfg.ready_timeout,
                            Some(&pidfd),
                            || Ok(scan.found()?.then_some(())),
                        )
                        .await
                        .map_err(|e| self.wait_error(fc, "serial marker", e))?;
                    }
                    (ReadyProbe::Agent, None) => {}
                }
            }
            Source::Snapshot(_) => {
                let (vmstate, mem) = snapshot_files.unwrap_or_default();
                api.snapshot_load(&vmstate, &mem, true)
                    .await
                    .map_err(api_err)?;
                // `resume_vm: true` answered 204: Firecracker has resumed the vCPUs.
                steps.mark("snapshot_load");
                self.ready_after_restore(spec, fc).await?;
            }
        }
        Ok((pid, start))
    }

    /// After a snapshot load: with the agent probe, one `health` call over vsock; a serial
    /// marker guest counts as ready once Firecracker has resumed it.
    async fn ready_after_restore(
        &self,
        spec: &InstanceSpec,
        fc: &FcRuntime,
    ) -> Result<(), BackendError> {
        if let (ReadyProbe::Agent, Some(uds)) = (&self.probe_for(&spec.template), &fc.vsock_uds) {
            let ep = AgentEndpoint::Vsock {
                uds: uds.clone(),
                port: AGENT_VSOCK_PORT,
            };
            AgentClient::new(ep)
                .with_timeout(self.cfg.ready_timeout)
                .health()
                .await?;
        }
        Ok(())
    }

    /// Spawns a VMM for `vm_dir` (into the cgroup behind `procs`, if any) and waits until its
    /// API socket accepts. `pid_out` gets (pid, start time) as soon as there is a process,
    /// so the caller can clean up after an error.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_vmm(
        &self,
        vmm_id: &str,
        vm_dir: &VmDir,
        console: Option<std::fs::File>,
        procs: Option<crate::cgroup::ProcsFds>,
        fc: &FcRuntime,
        pid_out: &mut Option<(i32, Option<u64>)>,
        steps: &mut Steps,
    ) -> Result<(i32, u64, PidFd), BackendError> {
        let io = |what: String| move |e| BackendError::io(what, e);
        let jailer = match (self.cfg.use_jailer, &self.cfg.jailer) {
            (true, Some(j)) => Some((
                j.as_path(),
                self.cfg.chroot_base.as_path(),
                self.cfg.uid,
                self.cfg.gid,
            )),
            _ => None,
        };
        let pid = spawn::spawn(spawn::Launch {
            firecracker: &self.cfg.firecracker,
            vmm_id,
            vm_dir,
            vm_root: &self.cfg.vm_root,
            jailer,
            console,
            cgroup: procs.as_ref(),
            log_level: &self.cfg.log_level,
        })
        .map_err(|e| {
            BackendError::Spawn(format!("start {}: {e}", self.cfg.firecracker.display()))
        })?;
        drop(procs);
        // Our unreaped child keeps its pid (even as a zombie): the start time is its own.
        *pid_out = Some((pid, crate::procfs::pid_start_time(pid)));
        let start = pid_out.and_then(|(_, s)| s).ok_or_else(|| {
            BackendError::Spawn(format!(
                "firecracker (pid {pid}) exited immediately{}",
                self.console_tail(fc)
            ))
        })?;
        let pidfd = PidFd::open(pid).map_err(io(format!("pidfd of firecracker pid {pid}")))?;
        steps.mark("spawn");

        // The API socket appears in the VM directory: wait for it by inotify, then for the
        // listen(2) that follows bind(2) with a short bounded connect retry.
        let sock = fc.api_socket.clone();
        watch::wait_in_dir(&vm_dir.host, self.cfg.ready_timeout, Some(&pidfd), || {
            Ok(sock.exists().then_some(()))
        })
        .await
        .map_err(|e| self.wait_error(fc, "API socket", e))?;
        steps.mark("api_bound");
        watch::connect_retry(&sock, Duration::from_secs(1))
            .await
            .map_err(|e| self.wait_error(fc, "API socket to accept", WaitError::Io(e)))?;
        steps.mark("api_socket");

        Ok((pid, start, pidfd))
    }

    fn wait_error(&self, fc: &FcRuntime, what: &str, e: WaitError) -> BackendError {
        BackendError::Spawn(format!("waiting for {what}: {e}{}", self.console_tail(fc)))
    }

    /// Last lines of Firecracker's own log and console, for error messages.
    fn console_tail(&self, fc: &FcRuntime) -> String {
        let mut out = String::new();
        for p in [Some(fc.vm_dir.join(layout::FC_LOG)), fc.console_log.clone()]
            .into_iter()
            .flatten()
        {
            if let Ok(text) = std::fs::read_to_string(&p) {
                let lines: Vec<&str> = text.lines().rev().take(5).collect();
                if !lines.is_empty() {
                    let tail: Vec<&str> = lines.into_iter().rev().collect();
                    out.push_str(&format!("; {}: {}", p.display(), tail.join(" | ")));
                }
            }
        }
        out
    }

    fn check_snapshot(&self, dir: &Path) -> Result<SnapshotMeta, BackendError> {
        let p = dir.join(layout::SNAP_META);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| BackendError::io(format!("read {}", p.display()), e))?;
        let meta: SnapshotMeta = serde_json::from_str(&text)
            .map_err(|e| BackendError::Other(format!("{}: {e}", p.display())))?;
        if meta.jailed != self.cfg.use_jailer {
            return Err(BackendError::Other(format!(
                "snapshot {} was taken {} the jailer; this backend runs {} it",
                dir.display(),
                if meta.jailed { "under" } else { "without" },
                if self.cfg.use_jailer {
                    "under"
                } else {
                    "without"
                },
            )));
        }
        if !meta.jailed && meta.vm_root.as_deref() != Some(self.cfg.vm_root.as_path()) {
            return Err(BackendError::Other(format!(
                "snapshot {} records vm_root {:?}, this backend uses {}",
                dir.display(),
                meta.vm_root,
                self.cfg.vm_root.display()
            )));
        }
        Ok(meta)
    }

    /// Pauses (if needed), writes a full snapshot into `dir`, resumes if `resume`.
    async fn snapshot_into(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        dir: &Path,
        resume: bool,
    ) -> Result<SnapshotMeta, BackendError> {
        let fc = Self::runtime_of(rt)?;
        let api = fc.api();
        let api_err = |e: ApiError| BackendError::Other(e.to_string());
        let info = api.instance_info().await.map_err(api_err)?;
        let was_running = info.state == "Running";
        if was_running {
            api.set_vm_state(VmState::Paused).await.map_err(api_err)?;
        }
        let result = async {
            let vm = fc.vm();
            let (vmstate, mem) = if self.cfg.use_jailer {
                // The jailed VMM can only write inside its chroot; move the files out after.
                let snap = vm.host(layout::JAIL_SNAP_DIR);
                std::fs::create_dir_all(&snap)
                    .map_err(|e| BackendError::io(format!("create {}", snap.display()), e))?;
                spawn::chown(&snap, self.cfg.uid, self.cfg.gid)
                    .map_err(|e| BackendError::io(format!("chown {}", snap.display()), e))?;
                let in_jail = vm.vmm(layout::JAIL_SNAP_DIR);
                (in_jail.join("out-vmstate"), in_jail.join("out-mem"))
            } else {
                (dir.join(layout::SNAP_VMSTATE), dir.join(layout::SNAP_MEM))
            };
            api.snapshot_create(&vmstate, &mem).await.map_err(api_err)?;
            if self.cfg.use_jailer {
                let snap = vm.host(layout::JAIL_SNAP_DIR);
                for (from, to) in [
                    ("out-vmstate", layout::SNAP_VMSTATE),
                    ("out-mem", layout::SNAP_MEM),
                ] {
                    spawn::move_file(&snap.join(from), &dir.join(to)).map_err(|e| {
                        BackendError::io(format!("move snapshot file {from} out of the jail"), e)
                    })?;
                }
            }
            let vmspec = Self::vm_spec(spec);
            let meta = SnapshotMeta {
                firecracker_version: info.vmm_version.clone(),
                jailed: self.cfg.use_jailer,
                vm_root: (!self.cfg.use_jailer).then(|| self.cfg.vm_root.clone()),
                vsock: fc.vsock_uds.is_some(),
                vcpus: vmspec.vcpus,
                memory_bytes: vmspec.memory_bytes,
            };
            let p = dir.join(layout::SNAP_META);
            let json = serde_json::to_vec_pretty(&meta)
                .map_err(|e| BackendError::Other(format!("encode snapshot meta: {e}")))?;
            std::fs::write(&p, json)
                .map_err(|e| BackendError::io(format!("write {}", p.display()), e))?;
            Ok(meta)
        }
        .await;
        if was_running && resume {
            api.set_vm_state(VmState::Resumed).await.map_err(api_err)?;
        }
        result
    }

    /// Stops the VMM and removes its cgroup, jail and (if `remove_instance_dir`) the
    /// instance directory; otherwise only the VM directory inside it.
    async fn teardown(&self, rt: &Runtime, remove_instance_dir: bool) -> Result<(), BackendError> {
        let fc = Self::runtime_of(rt)?;
        self.teardown_fc(vmm_of(rt), &fc, remove_instance_dir).await
    }

    /// Stops the VMM `vmm` (pid, start time), if any, and removes what `fc` names.
    async fn teardown_fc(
        &self,
        vmm: Option<(i32, u64)>,
        fc: &FcRuntime,
        remove_instance_dir: bool,
    ) -> Result<(), BackendError> {
        if let Some((pid, start)) = vmm {
            self.stop_process(pid, start).await?;
        }
        if let Some(cg) = &fc.cgroup {
            let cg = cg.clone();
            // Anything else left in the cgroup (the VMM is gone; this catches strays), then the dirs.
            tokio::task::spawn_blocking(move || cg.kill_all().and_then(|_| cg.remove()))
                .await
                .map_err(|e| BackendError::Other(format!("cgroup cleanup task: {e}")))?
                .map_err(|e| BackendError::Other(format!("cgroup cleanup: {e}")))?;
        }
        if let Some(jail) = &fc.jail_dir {
            remove_tree(jail)?;
        }
        if remove_instance_dir {
            remove_tree(&fc.instance_dir)?;
        } else {
            remove_tree(&fc.vm_dir)?;
            if let Some(c) = &fc.console_log {
                remove_file(c)?;
            }
            // The record of the spare VMM this VM ran in, if any: that VMM is gone now.
            remove_file(&fc.instance_dir.join(spares::RECORD))?;
        }
        Ok(())
    }

    /// SIGTERM, up to `stop_grace` for it to exit, then SIGKILL; waits for the exit. Only
    /// signals the process if it is still the one we started (pid + start time).
    async fn stop_process(&self, pid: i32, start: u64) -> Result<(), BackendError> {
        if !crate::procfs::same_process(pid, start) {
            watch::reap(pid);
            return Ok(());
        }
        let pidfd = match PidFd::open(pid) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            Err(e) => {
                return Err(BackendError::io(
                    format!("pidfd of firecracker pid {pid}"),
                    e,
                ))
            }
        };
        // Re-check after opening the pidfd: from here on signals cannot hit a reused pid.
        if !crate::procfs::same_process(pid, start) {
            watch::reap(pid);
            return Ok(());
        }
        pidfd
            .signal(libc::SIGTERM)
            .map_err(|e| BackendError::io(format!("SIGTERM firecracker pid {pid}"), e))?;
        if tokio::time::timeout(self.cfg.stop_grace, pidfd.exited())
            .await
            .is_err()
        {
            tracing::warn!(pid, "firecracker ignored SIGTERM; sending SIGKILL");
            pidfd
                .signal(libc::SIGKILL)
                .map_err(|e| BackendError::io(format!("SIGKILL firecracker pid {pid}"), e))?;
            if tokio::time::timeout(Duration::from_secs(10), pidfd.exited())
                .await
                .is_err()
            {
                return Err(BackendError::Other(format!(
                    "firecracker pid {pid} survived SIGKILL for 10 s"
                )));
            }
        }
        watch::reap(pid);
        Ok(())
    }

    /// Kills the VMM of `rt` (keeping the instance directory) and starts a new one from the
    /// snapshot in `dir`.
    async fn restore_in_place(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        dir: &Path,
    ) -> Result<Runtime, BackendError> {
        // Validate before killing anything: a bad snapshot must not cost the running VM.
        self.check_snapshot(dir)?;
        self.teardown(rt, false).await?;
        self.launch(spec, Source::Snapshot(dir)).await
    }
}

#[async_trait]
impl Backend for FirecrackerBackend {
    async fn prepare_template(
        &self,
        template: &TemplateFiles,
        vm: &VmSpec,
        dir: &Path,
    ) -> Result<Option<PathBuf>, BackendError> {
        if template.kernel.is_none() {
            return Ok(None);
        }
        let out = dir.join("snapshot");
        self.prepare_snapshot(template, vm, &dir.join("snapshot-work"), &out)
            .await?;
        Ok(Some(out))
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: true,
            files: true,
            pause: true,
            checkpoint_filesystem: false,
            checkpoint_memory: true,
            fork: true,
            rollback: true,
            reset_modes: vec![ResetMode::MmTemplate, ResetMode::FullRecreate],
        }
    }

    async fn probe(&self) -> Probe {
        let version = match binary_version(&self.cfg.firecracker).await {
            Ok(v) => v,
            Err(reason) => return Probe::unavailable(reason),
        };
        if !version.starts_with(SUPPORTED_MAJOR) {
            return Probe::unavailable(format!(
                "firecracker {version} is not a supported version (need 1.x)"
            ));
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Probe::unavailable(format!("/dev/kvm is not usable: {e}"));
        }
        if self.cfg.use_jailer {
            let Some(jailer) = &self.cfg.jailer else {
                return Probe::unavailable("use_jailer is set but no jailer binary is configured");
            };
            match binary_version(jailer).await {
                Ok(v) if v == version => {}
                Ok(v) => {
                    return Probe::unavailable(format!(
                        "jailer {v} does not match firecracker {version}"
                    ))
                }
                Err(reason) => return Probe::unavailable(reason),
            }
        }
        if let Some(m) = &self.cgroups {
            if let Err(e) = m.check_usable() {
                return Probe::unavailable(format!("cgroups: {e}"));
            }
        }
        Probe::available(version)
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Runtime, BackendError> {
        if let Some(dir) = &spec.from_checkpoint {
            return self.launch(spec, Source::Snapshot(dir)).await;
        }
        match &spec.template.snapshot_dir {
            Some(dir) => self.launch(spec, Source::Snapshot(dir)).await,
            None => self.launch(spec, Source::Boot(&spec.template)).await,
        }
    }

    async fn destroy(&self, rt: &Runtime) -> Result<(), BackendError> {
        self.teardown(rt, true).await
    }

    async fn pause(&self, rt: &Runtime) -> Result<(), BackendError> {
        let fc = Self::runtime_of(rt)?;
        self.ensure_alive(rt)?;
        fc.api()
            .set_vm_state(VmState::Paused)
            .await
            .map_err(|e| BackendError::Other(e.to_string()))
    }

    async fn resume(&self, rt: &Runtime) -> Result<(), BackendError> {
        let fc = Self::runtime_of(rt)?;
        self.ensure_alive(rt)?;
        fc.api()
            .set_vm_state(VmState::Resumed)
            .await
            .map_err(|e| BackendError::Other(e.to_string()))
    }

    async fn reset(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        mode: ResetMode,
    ) -> Result<Runtime, BackendError> {
        match mode {
            ResetMode::MmTemplate => {
                let dir = spec.template.snapshot_dir.as_deref().ok_or_else(|| {
                    BackendError::Other(format!(
                        "template {} has no boot snapshot for mm-template reset",
                        spec.template.id
                    ))
                })?;
                self.restore_in_place(rt, spec, dir).await
            }
            ResetMode::FullRecreate => crate::recreate(self, rt, spec).await,
            ResetMode::OverlayfsRollback => Err(BackendError::Unsupported {
                backend: BackendKind::Firecracker,
                op: "reset overlayfs-rollback",
            }),
        }
    }

    async fn checkpoint(
        &self,
        rt: &Runtime,
        dir: &Path,
    ) -> Result<CheckpointOutcome, BackendError> {
        self.ensure_alive(rt)?;
        let fc = Self::runtime_of(rt)?;
        // The checkpoint needs the VM's sizing only for its metadata; read it back from the API.
        let spec = InstanceSpec {
            id: String::new(),
            instance_dir: fc.instance_dir.clone(),
            cgroup_name: String::new(),
            template: Default::default(),
            quota: Default::default(),
            network: false,
            env: Default::default(),
            vm: machine_config(&fc.api()).await,
            from_checkpoint: None,
        };
        self.snapshot_into(rt, &spec, dir, true).await?;
        let size_bytes = [layout::SNAP_VMSTATE, layout::SNAP_MEM, layout::SNAP_META]
            .iter()
            .map(|f| file_len(&dir.join(f)))
            .sum();
        Ok(CheckpointOutcome {
            kind: CheckpointKind::Memory,
            size_bytes,
        })
    }

    async fn rollback(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        dir: &Path,
    ) -> Result<Runtime, BackendError> {
        self.restore_in_place(rt, spec, dir).await
    }

    fn agent_endpoint(&self, rt: &Runtime) -> Option<AgentEndpoint> {
        let fc = Self::runtime_of(rt).ok()?;
        fc.vsock_uds.map(|uds| AgentEndpoint::Vsock {
            uds,
            port: AGENT_VSOCK_PORT,
        })
    }

    async fn wait_exit(&self, rt: &Runtime) -> ExitCause {
        let (Some(pid), Some(start)) = (rt.pid, rt.pid_start_time) else {
            return ExitCause::Exited;
        };
        let pidfd = match PidFd::open(pid) {
            Ok(p) if crate::procfs::same_process(pid, start) => p,
            _ => return ExitCause::Exited,
        };
        pidfd.exited().await;
        watch::reap(pid);
        let oom = Self::runtime_of(rt)
            .ok()
            .and_then(|fc| fc.cgroup)
            .and_then(|cg| cg.oom_kills().ok())
            .is_some_and(|n| n > 0);
        if oom {
            ExitCause::OomKilled
        } else {
            ExitCause::Exited
        }
    }

    async fn adopt(&self, rt: &Runtime) -> Result<bool, BackendError> {
        let fc = Self::runtime_of(rt)?;
        let alive = matches!((rt.pid, rt.pid_start_time), (Some(p), Some(s)) if crate::procfs::same_process(p, s));
        if alive
            && fc
                .api()
                .with_timeout(Duration::from_secs(2))
                .instance_info()
                .await
                .is_ok()
        {
            return Ok(true);
        }
        tracing::info!(pid = ?rt.pid, dir = %fc.instance_dir.display(), "firecracker VM is gone or unresponsive; cleaning up");
        self.teardown_fc(vmm_of(rt), &fc, true).await?;
        Ok(false)
    }

    async fn activate(&self) {
        self.sweep_spares().await;
        if self.spares.want == 0 {
            return;
        }
        self.spares.set_active(true);
        let me = self.clone();
        let task = tokio::spawn(async move { me.refill_spares().await });
        self.spares.set_task(task.abort_handle());
        tracing::info!(spares = self.spares.want, "keeping spare VMMs for restores");
    }

    async fn deactivate(&self) {
        self.spares.set_active(false);
        for s in self.spares.drain() {
            if let Err(e) = self.kill_spare(&s).await {
                tracing::warn!(spare = %s.name, error = %e, "stopping an idle spare VMM failed");
            }
        }
    }

    async fn cleanup_unstarted(&self, spec: &InstanceSpec) -> Result<(), BackendError> {
        // A spare VMM moved into this instance (its record moved with its directory).
        if let Some(s) = spares::Spare::read(&spec.instance_dir) {
            let s = spares::Spare {
                dir: spec.instance_dir.clone(),
                ..s
            };
            if let Err(e) = self.kill_spare(&s).await {
                tracing::warn!(spare = %s.name, error = %e, "stopping the spare VMM of an unfinished create");
            }
        }
        // A VMM may already run in the sandbox's cgroup: kill it before removing its files.
        if let Some(m) = &self.cgroups {
            let cg = m
                .open(&spec.cgroup_name)
                .map_err(|e| BackendError::Other(format!("cgroup {}: {e}", spec.cgroup_name)))?;
            tokio::task::spawn_blocking(move || cg.kill_all().and_then(|_| cg.remove()))
                .await
                .map_err(|e| BackendError::Other(format!("cgroup cleanup task: {e}")))?
                .map_err(|e| BackendError::Other(format!("cgroup cleanup: {e}")))?;
        }
        if self.cfg.use_jailer {
            let vmm_id = layout::vmm_id(&spec.id);
            remove_tree(&layout::jail_dir(
                &self.cfg.chroot_base,
                &self.cfg.firecracker,
                &vmm_id,
            ))?;
        }
        remove_tree(&spec.instance_dir)
    }
}

impl FirecrackerBackend {
    fn ensure_alive(&self, rt: &Runtime) -> Result<(), BackendError> {
        match (rt.pid, rt.pid_start_time) {
            (Some(p), Some(s)) if crate::procfs::same_process(p, s) => Ok(()),
            _ => Err(BackendError::Gone(format!(
                "firecracker process {:?} is not running",
                rt.pid
            ))),
        }
    }
}

/// `GET /machine-config` → the VM's sizing (best effort: used for checkpoint metadata).
async fn machine_config(api: &FcApi) -> Option<VmSpec> {
    let bytes = api
        .request(hyper::Method::GET, "/machine-config", None)
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(VmSpec {
        vcpus: v.get("vcpu_count")?.as_u64()? as u32,
        memory_bytes: v.get("mem_size_mib")?.as_u64()? << 20,
        ..Default::default()
    })
}

/// Runs `<bin> --version` and returns `1.12.1` from `Firecracker v1.12.1` / `Jailer v1.12.1`.
async fn binary_version(bin: &Path) -> Result<String, String> {
    if !bin.exists() {
        return Err(format!("{} not found", bin.display()));
    }
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(bin)
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{} --version timed out", bin.display()))?
    .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        format!(
            "{} --version printed no version: {:?}",
            bin.display(),
            text.trim()
        )
    })
}

fn parse_version(text: &str) -> Option<String> {
    let first = text.lines().next()?;
    let v = first.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn remove_tree(p: &Path) -> Result<(), BackendError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io(format!("remove {}", p.display()), e)),
    }
}

/// The VMM process a runtime records, as (pid, start time).
fn vmm_of(rt: &Runtime) -> Option<(i32, u64)> {
    rt.pid.zip(rt.pid_start_time)
}

fn remove_file(p: &Path) -> Result<(), BackendError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io(format!("remove {}", p.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("Firecracker v1.12.1\n\nmore"),
            Some("1.12.1".into())
        );
        assert_eq!(parse_version("Jailer v1.12.1"), Some("1.12.1".into()));
        assert_eq!(parse_version("nothing here"), None);
    }

    #[test]
    fn runtime_record_round_trips() {
        let fc = FcRuntime {
            instance_dir: "/i".into(),
            vm_dir: "/i/vm".into(),
            vmm_dir: "/run/anvil-fc/vm".into(),
            jail_dir: None,
            api_socket: "/i/vm/fc.sock".into(),
            vsock_uds: Some("/i/vm/v.sock".into()),
            console_log: None,
            cgroup: None,
            start_path: StartPath::Restore,
        };
        let rt = FirecrackerBackend::to_runtime(7, 9, &fc).unwrap();
        assert_eq!(FirecrackerBackend::runtime_of(&rt).unwrap(), fc);
        assert_eq!(rt.data["start_path"], "restore");
    }
}
