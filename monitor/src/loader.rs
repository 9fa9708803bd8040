//! Loading the kernel programs and attaching them: XDP (or TC) on ingress, TC
//! on egress. Only the programs the configuration uses are loaded, chosen for
//! the running kernel's features (`plan`; README "Kernel support").
//! Detaching is dropping: aya closes the links, and `Attached` removes a clsact
//! qdisc if (and only if) it added one.

use std::{ffi::CString, process::Command};

use aya::{
    programs::{
        tc::{self, TcAttachType},
        Program, ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};

use crate::config::{AgentConfig, AgentMode, IngressHook, XdpModeSetting};

pub const XDP_PROGRAM: &str = "monitor_xdp";
/// `monitor_xdp` without `frags` and request samples, for kernels before 5.18.
pub const XDP_NOFRAGS_PROGRAM: &str = "monitor_xdp_nofrags";
pub const TC_PROGRAM: &str = "monitor_tc";
pub const TC_INGRESS_PROGRAM: &str = "monitor_tc_ingress";
/// Tap mode (a mirror port): ingress only, both directions.
pub const XDP_TAP_PROGRAM: &str = "monitor_xdp_tap";
pub const TC_TAP_PROGRAM: &str = "monitor_tc_tap";

/// Something the agent uses and the first Linux release that has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub what: &'static str,
    /// (major, minor)
    pub since: (u8, u8),
}

impl Requirement {
    pub fn met_by(&self, kernel: KernelVersion) -> bool {
        kernel >= KernelVersion::new(self.since.0, self.since.1, 0)
    }
}

/// The floor: every program writes events to a ring buffer.
pub const RING_BUFFER: Requirement = Requirement {
    what: "the agent (BPF ring buffer)",
    since: (5, 8),
};
/// `bpf_ktime_get_coarse_ns`: a cached clock read for every tracked packet
/// (before it, `bpf_ktime_get_ns`, the same clock read precisely).
pub const COARSE_CLOCK: Requirement = Requirement {
    what: "the coarse packet clock (bpf_ktime_get_coarse_ns)",
    since: (5, 11),
};
/// `#[xdp(frags)]` (BPF_F_XDP_HAS_FRAGS) and `bpf_xdp_load_bytes`, which
/// request samples on XDP need.
pub const XDP_FRAGS: Requirement = Requirement {
    what: "plaintext request sampling on XDP (bpf_xdp_load_bytes, XDP frags)",
    since: (5, 18),
};
/// TC through bpf_link (no clsact qdisc); the only TC attachment that can be
/// pinned. XDP links (5.9) come earlier, so this sets the floor for pinning.
pub const TCX: Requirement = Requirement {
    what: "pinned links (`pin_path`: TCX links)",
    since: (6, 6),
};

/// What the running kernel offers the agent. Derived from its version (see
/// `current`), but plain data, so tests can plan for an older kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    pub version: KernelVersion,
    pub ring_buffer: bool,
    pub xdp_frags: bool,
    pub tcx: bool,
    pub coarse_clock: bool,
}

impl KernelFeatures {
    pub fn of(version: KernelVersion) -> Self {
        KernelFeatures {
            version,
            ring_buffer: RING_BUFFER.met_by(version),
            xdp_frags: XDP_FRAGS.met_by(version),
            tcx: TCX.met_by(version),
            coarse_clock: COARSE_CLOCK.met_by(version),
        }
    }

    /// The running kernel's (uname; Ubuntu and Debian kernels report their
    /// upstream version, which aya reads).
    pub fn current() -> Result<Self, LoadError> {
        KernelVersion::current()
            .map(Self::of)
            .map_err(|e| LoadError::KernelVersion {
                message: e.to_string(),
            })
    }
}

/// The kernel lacks something this configuration needs. One line: what,
/// which release has it, and what to change if anything can be.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs Linux {}.{} or later; this kernel is {have}{hint}", .since.0, .since.1)]
pub struct KernelTooOld {
    pub what: &'static str,
    pub since: (u8, u8),
    pub have: KernelVersion,
    /// "" or "; <what to change>".
    pub hint: &'static str,
}

/// How the TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// TCX links (6.6+): no qdisc, gone with the process unless pinned.
    Tcx,
    /// Filters on a clsact qdisc (netlink), before 6.6.
    Clsact,
}

impl TcMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Clsact => "clsact",
        }
    }
}

/// The programs to load and how to attach them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookPlan {
    /// Egress through TC (`monitor_tc`); none in tap mode.
    pub egress: Option<&'static str>,
    /// Ingress through XDP: `monitor_xdp` or its no-frags twin, or the tap's.
    pub xdp: Option<&'static str>,
    /// Ingress through TC (`ingress = "tc"`).
    pub tc_ingress: Option<&'static str>,
    pub tc_mode: TcMode,
}

impl HookPlan {
    /// Every program to load, once: TC egress (not in tap mode), one
    /// ingress program (a router's TC program serves both hooks).
    pub fn programs(&self) -> impl Iterator<Item = &'static str> {
        let ingress_tc = self.tc_ingress.filter(|p| Some(*p) != self.egress);
        [self.egress, self.xdp, ingress_tc].into_iter().flatten()
    }
}

/// Which programs this configuration needs on this kernel, or why it cannot
/// run here. Pure: no syscalls.
pub fn plan(cfg: &AgentConfig, kernel: &KernelFeatures) -> Result<HookPlan, KernelTooOld> {
    let too_old = |req: Requirement, hint| KernelTooOld {
        what: req.what,
        since: req.since,
        have: kernel.version,
        hint,
    };
    if !kernel.ring_buffer {
        return Err(too_old(RING_BUFFER, ""));
    }
    if cfg.pin_path.is_some() && !kernel.tcx {
        return Err(too_old(
            TCX,
            "; remove pin_path (the agent then detaches at exit)",
        ));
    }
    let tc_mode = if kernel.tcx {
        TcMode::Tcx
    } else {
        TcMode::Clsact
    };
    if cfg.by_port() {
        let (xdp, tc_ingress) = match cfg.ingress {
            IngressHook::Tc => (None, Some(TC_TAP_PROGRAM)),
            IngressHook::Xdp if kernel.xdp_frags => (Some(XDP_TAP_PROGRAM), None),
            IngressHook::Xdp => return Err(too_old(XDP_FRAGS, "; set ingress = \"tc\"")),
        };
        // A router's interface, or a proxy host's: egress too (the same
        // program: the ports, not the hook, say the direction).
        let egress = (cfg.mode != AgentMode::Tap).then_some(TC_TAP_PROGRAM);
        return Ok(HookPlan {
            egress,
            xdp,
            tc_ingress,
            tc_mode,
        });
    }
    let (xdp, tc_ingress) = match cfg.ingress {
        IngressHook::Tc => (None, Some(TC_INGRESS_PROGRAM)),
        IngressHook::Xdp if kernel.xdp_frags => (Some(XDP_PROGRAM), None),
        // Samples were asked for: refuse rather than silently send none.
        IngressHook::Xdp if !cfg.plaintext_ports.is_empty() => {
            return Err(too_old(
                XDP_FRAGS,
                "; set ingress = \"tc\" (TC ingress samples from 5.8)",
            ))
        }
        IngressHook::Xdp => (Some(XDP_NOFRAGS_PROGRAM), None),
    };
    Ok(HookPlan {
        egress: Some(TC_PROGRAM),
        xdp,
        tc_ingress,
        tc_mode,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("interface {iface:?} does not exist in this network namespace (see `ip link show`)")]
    NoInterface { iface: String },
    #[error("reading the kernel version: {message}")]
    KernelVersion { message: String },
    #[error(transparent)]
    KernelTooOld(#[from] KernelTooOld),
    #[error("loading the eBPF object into the kernel: {source}")]
    Object {
        #[source]
        source: Box<EbpfError>,
    },
    #[error("program {program} is missing from the eBPF object")]
    MissingProgram { program: &'static str },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map {map} has an unexpected type: {source}")]
    MapType {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the kernel refused program {program}: {source}\nverifier log:\n{verifier_log}")]
    Verifier {
        program: &'static str,
        verifier_log: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {iface} ({mode}): {source}")]
    Attach {
        program: &'static str,
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("adding server {prefix} to the tap mode's server table: {source}")]
    ServerTable {
        prefix: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Pins(#[from] crate::pins::PinsError),
    #[error("pinning the {hook} link on {iface} at {path}: {message}")]
    Pin {
        hook: &'static str,
        iface: String,
        path: std::path::PathBuf,
        message: String,
    },
    #[error("adding a clsact qdisc to {iface}: {source}")]
    Clsact {
        iface: String,
        #[source]
        source: tc::TcError,
    },
}

/// Where the programs are attached, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    /// "native" or "skb"; "off" with TC ingress.
    pub xdp_mode: &'static str,
    /// "tcx" (kernel >= 6.6) or "clsact"; "off" for a tap on XDP.
    pub tc_mode: &'static str,
    /// Where the agent sits (tap: ingress only; tap and router: direction by port).
    pub mode: AgentMode,
}

/// Verifier figures for one loaded program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub verified_instructions: Option<u32>,
    pub translated_bytes: Option<u32>,
}

impl Attached {
    /// Did we add a clsact qdisc (kernels before TCX), to be removed at exit?
    pub fn added_qdisc(&self) -> bool {
        !self.clsact_added.is_empty()
    }
}

/// Loaded programs plus what must be undone on drop.
pub struct Attached {
    pub ebpf: Ebpf,
    pub plan: HookPlan,
    pub attachments: Vec<Attachment>,
    pub programs: Vec<ProgramStats>,
    clsact_added: Vec<String>,
    /// Links pinned in bpffs: they outlive the process (see `pins`).
    pinned: Vec<aya::programs::links::PinnedLink>,
    /// Hooks whose existing pinned link got our programs (a restart).
    pub adopted: Vec<String>,
}

fn iface_exists(name: &str) -> bool {
    match CString::new(name) {
        // SAFETY: NUL-terminated string.
        Ok(c) => (unsafe { libc::if_nametoindex(c.as_ptr()) }) != 0,
        Err(_) => false,
    }
}

/// veth, bridges, tunnels: devices under /sys/devices/virtual.
fn is_virtual(iface: &str) -> bool {
    std::fs::canonicalize(format!("/sys/class/net/{iface}"))
        .map(|p| p.to_string_lossy().contains("/devices/virtual/"))
        .unwrap_or(false)
}

fn verifier_error(program: &'static str, source: ProgramError) -> LoadError {
    let verifier_log = match &source {
        ProgramError::LoadError { verifier_log, .. } => verifier_log.to_string(),
        _ => String::from("(none)"),
    };
    LoadError::Verifier {
        program,
        verifier_log,
        source: Box::new(source),
    }
}

/// Load the object with the agent's settings, without attaching (tests use
/// this with BPF_PROG_TEST_RUN): the programs `cfg` uses on this kernel.
pub fn load(cfg: &AgentConfig) -> Result<Ebpf, LoadError> {
    load_for(cfg, &KernelFeatures::current()?)
}

/// `load` as if on a kernel with `kernel`'s features.
pub fn load_for(cfg: &AgentConfig, kernel: &KernelFeatures) -> Result<Ebpf, LoadError> {
    let plan = plan(cfg, kernel)?;
    load_planned(cfg, &plan, kernel)
}

fn load_planned(
    cfg: &AgentConfig,
    plan: &HookPlan,
    kernel: &KernelFeatures,
) -> Result<Ebpf, LoadError> {
    if plan.xdp == Some(XDP_NOFRAGS_PROGRAM) {
        log::info!(
            "this kernel predates XDP frags (Linux {}.{}): loading {XDP_NOFRAGS_PROGRAM}, \
             which does not sample request payloads",
            XDP_FRAGS.since.0,
            XDP_FRAGS.since.1
        );
    }
    let kcfg = cfg.kernel_config();
    let coarse_clock = u8::from(kernel.coarse_clock);
    let mut loader = EbpfLoader::new();
    loader
        .override_global("CONFIG", &kcfg, true)
        .override_global("COARSE_CLOCK", &coarse_clock, true)
        .map_max_entries("FLOWS", cfg.flow_table_size)
        .map_max_entries("HALF_OPEN", cfg.half_open_table_size);
    let pin_paths: Vec<(&str, std::path::PathBuf)> = match &cfg.pin_path {
        Some(dir) => {
            let bad = crate::pins::incompatible(dir, cfg.flow_table_size, cfg.half_open_table_size);
            if !bad.is_empty() {
                log::warn!(
                    "pinned state in {} does not fit this agent ({}): starting afresh",
                    dir.display(),
                    bad.join("; ")
                );
                crate::pins::remove_all(dir)?;
            }
            crate::pins::ensure_dir(dir)?;
            crate::pins::PINNED_MAPS
                .iter()
                .map(|m| (*m, dir.join(m)))
                .collect()
        }
        None => Vec::new(),
    };
    // An existing pin is reused as is (state kept); a missing one is created and pinned.
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(crate::EBPF_OBJECT)
        .map_err(|source| LoadError::Object {
            source: Box::new(source),
        })?;
    fill_servers(&mut ebpf, cfg)?;
    // The others stay unverified and unloaded: the kernel never sees them.
    for name in plan.programs() {
        load_program(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let loaded = match ebpf.program_mut(name) {
        Some(Program::Xdp(p)) => p.load(),
        Some(Program::SchedClassifier(p)) => p.load(),
        _ => return Err(LoadError::MissingProgram { program: name }),
    };
    loaded.map_err(|e| verifier_error(name, e))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::MissingProgram { program: name })
}

pub fn program_stats(ebpf: &Ebpf, plan: &HookPlan) -> Vec<ProgramStats> {
    plan.programs()
        .map(|name| {
            let info = ebpf.program(name).and_then(|p| p.info().ok());
            ProgramStats {
                name,
                verified_instructions: info.as_ref().and_then(|i| i.verified_instruction_count()),
                translated_bytes: info.as_ref().and_then(|i| i.size_translated()),
            }
        })
        .collect()
}

/// Load and attach to every configured interface. Interfaces and the kernel
/// are checked first so a typo or an old kernel fails before anything changes.
pub fn attach(cfg: &AgentConfig) -> Result<Attached, LoadError> {
    attach_for(cfg, &KernelFeatures::current()?)
}

/// `attach` as if on a kernel with `kernel`'s features (tests: clsact on a
/// TCX kernel, the no-frags XDP program).
pub fn attach_for(cfg: &AgentConfig, kernel: &KernelFeatures) -> Result<Attached, LoadError> {
    for iface in &cfg.interfaces {
        if !iface_exists(iface) {
            return Err(LoadError::NoInterface {
                iface: iface.clone(),
            });
        }
    }
    let plan = plan(cfg, kernel)?;
    let ebpf = load_planned(cfg, &plan, kernel)?;
    let programs = program_stats(&ebpf, &plan);
    let mut attached = Attached {
        ebpf,
        plan,
        attachments: Vec::new(),
        programs,
        clsact_added: Vec::new(),
        pinned: Vec::new(),
        adopted: Vec::new(),
    };
    if let Some(dir) = &cfg.pin_path {
        drop_unexpected_links(dir, cfg)?;
    }
    for iface in &cfg.interfaces {
        attach_iface(&mut attached, cfg, iface)?;
    }
    Ok(attached)
}

/// Both hooks on one interface (the ingress hook only, in tap mode).
fn attach_iface(attached: &mut Attached, cfg: &AgentConfig, iface: &str) -> Result<(), LoadError> {
    let egress_mode = match attached.plan.egress {
        Some(name) => attach_tc(attached, cfg, iface, name, TcAttachType::Egress)?,
        None => "off",
    };
    let (xdp_mode, tc_mode) = match (attached.plan.xdp, attached.plan.tc_ingress) {
        (Some(_), _) => {
            if is_virtual(iface) {
                log::warn!(
                    "{iface} is a virtual device: with an XDP program it gives up GRO \
                     (measured on veth: 0.15 of the throughput); `ingress = \"tc\"` keeps ~0.98 (BENCHMARKS.md)"
                );
            }
            (attach_xdp(attached, cfg, iface)?, egress_mode)
        }
        (None, Some(name)) => {
            let mode = attach_tc(attached, cfg, iface, name, TcAttachType::Ingress)?;
            ("off", mode)
        }
        (None, None) => ("off", egress_mode),
    };
    attached.attachments.push(Attachment {
        iface: iface.to_string(),
        xdp_mode,
        tc_mode,
        mode: cfg.mode,
    });
    Ok(())
}

/// Tap mode's server table: the configured addresses and prefixes.
fn fill_servers(ebpf: &mut Ebpf, cfg: &AgentConfig) -> Result<(), LoadError> {
    if cfg.servers.is_empty() {
        return Ok(());
    }
    let map = ebpf
        .map_mut("SERVERS")
        .ok_or(LoadError::MissingMap { map: "SERVERS" })?;
    let mut trie: aya::maps::LpmTrie<_, monitor_common::ServerKeyData, u8> =
        aya::maps::LpmTrie::try_from(map).map_err(|source| LoadError::MapType {
            map: "SERVERS",
            source,
        })?;
    for p in &cfg.servers {
        let (family, addr) = p.key();
        let data = monitor_common::server_key_data(family, &addr);
        let key = aya::maps::lpm_trie::Key::new(8 + u32::from(p.len), data);
        trie.insert(&key, 1, 0)
            .map_err(|source| LoadError::ServerTable {
                prefix: p.to_string(),
                source,
            })?;
    }
    Ok(())
}

/// The pinned links this configuration will use: any other pinned link (an
/// interface dropped from the configuration, XDP where TC ingress is now
/// wanted) is removed first, so nothing is attached twice.
fn drop_unexpected_links(dir: &std::path::Path, cfg: &AgentConfig) -> Result<(), LoadError> {
    let mut want = Vec::new();
    for iface in &cfg.interfaces {
        if cfg.mode != AgentMode::Tap {
            // Server and router modes use egress too.
            want.push(crate::pins::link_path(dir, HOOK_TC_EGRESS, iface));
        }
        want.push(crate::pins::link_path(
            dir,
            match cfg.ingress {
                IngressHook::Xdp => HOOK_XDP,
                IngressHook::Tc => HOOK_TC_INGRESS,
            },
            iface,
        ));
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let is_link = e.file_name().to_string_lossy().starts_with("link-");
        if is_link && !want.contains(&p) {
            log::info!(
                "removing the pinned link {} (not in this configuration)",
                p.display()
            );
            std::fs::remove_file(&p).map_err(|source| crate::pins::PinsError::Remove {
                path: p.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

const HOOK_XDP: &str = "xdp";
const HOOK_TC_EGRESS: &str = "tc-egress";
const HOOK_TC_INGRESS: &str = "tc-ingress";

/// A pinned link of `hook` on `iface` left by an earlier agent, taken out of
/// its pin (it is re-pinned once our program is in it).
fn pinned_link(
    cfg: &AgentConfig,
    hook: &'static str,
    iface: &str,
) -> Option<aya::programs::links::FdLink> {
    let path = crate::pins::link_path(cfg.pin_path.as_deref()?, hook, iface);
    if !path.exists() {
        return None;
    }
    match aya::programs::links::PinnedLink::from_pin(&path).map(|l| l.unpin()) {
        Ok(Ok(link)) => Some(link),
        Ok(Err(e)) => {
            log::warn!("unpinning {}: {e}", path.display());
            None
        }
        Err(e) => {
            log::warn!(
                "opening the pinned link {}: {e}; attaching afresh",
                path.display()
            );
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// Pin the link just made (or adopted) so it outlives the process.
fn pin_link(
    attached: &mut Attached,
    cfg: &AgentConfig,
    hook: &'static str,
    iface: &str,
    link: Result<aya::programs::links::FdLink, aya::programs::links::LinkError>,
) -> Result<(), LoadError> {
    let Some(dir) = cfg.pin_path.as_deref() else {
        return Ok(());
    };
    let path = crate::pins::link_path(dir, hook, iface);
    let err = |message: String| LoadError::Pin {
        hook,
        iface: iface.to_string(),
        path: path.clone(),
        message,
    };
    let link = link.map_err(|e| {
        err(format!(
            "{e} (pinning needs bpf_link attachments: XDP links, TCX on Linux 6.6+)"
        ))
    })?;
    let pinned = link.pin(&path).map_err(|e| err(e.to_string()))?;
    attached.pinned.push(pinned);
    Ok(())
}

fn attach_xdp(
    attached: &mut Attached,
    cfg: &AgentConfig,
    iface: &str,
) -> Result<&'static str, LoadError> {
    let name = attached.plan.xdp.unwrap_or(XDP_PROGRAM);
    if let Some(old) = pinned_link(cfg, HOOK_XDP, iface) {
        let xdp: &mut Xdp = program(&mut attached.ebpf, name)?;
        let adopted = aya::programs::xdp::XdpLink::try_from(old)
            .map_err(|e| e.to_string())
            .and_then(|l| xdp.attach_to_link(l).map_err(|e| e.to_string()));
        match adopted {
            Ok(id) => {
                let link = xdp.take_link(id).map_err(|e| LoadError::Attach {
                    program: name,
                    iface: iface.to_string(),
                    mode: "pinned link",
                    source: Box::new(e),
                })?;
                pin_link(attached, cfg, HOOK_XDP, iface, link.try_into())?;
                attached.adopted.push(format!("{HOOK_XDP} {iface}"));
                return Ok("pinned link");
            }
            Err(e) => {
                log::warn!("{iface}: could not reuse the pinned XDP link ({e}); attaching afresh")
            }
        }
    }
    let xdp: &mut Xdp = program(&mut attached.ebpf, name)?;
    let err = |mode: &'static str, source| LoadError::Attach {
        program: name,
        iface: iface.to_string(),
        mode,
        source: Box::new(source),
    };
    let (mode, id) = match cfg.xdp_mode {
        XdpModeSetting::Native => (
            "native",
            xdp.attach(iface, XdpMode::Driver)
                .map_err(|e| err("native", e))?,
        ),
        XdpModeSetting::Skb => (
            "skb",
            xdp.attach(iface, XdpMode::Skb).map_err(|e| err("skb", e))?,
        ),
        // Try native first so we know (and can report) which mode runs.
        XdpModeSetting::Auto => match xdp.attach(iface, XdpMode::Driver) {
            Ok(id) => ("native", id),
            Err(native) => {
                log::info!("{iface}: native XDP unavailable ({native}); using generic XDP");
                (
                    "skb",
                    xdp.attach(iface, XdpMode::Skb).map_err(|e| err("skb", e))?,
                )
            }
        },
    };
    if cfg.pin_path.is_some() {
        let link = xdp.take_link(id).map_err(|e| err(mode, e))?;
        pin_link(attached, cfg, HOOK_XDP, iface, link.try_into())?;
    }
    Ok(mode)
}

fn attach_tc(
    attached: &mut Attached,
    cfg: &AgentConfig,
    iface: &str,
    name: &'static str,
    hook: TcAttachType,
) -> Result<&'static str, LoadError> {
    let hook_name = match hook {
        TcAttachType::Ingress => HOOK_TC_INGRESS,
        _ => HOOK_TC_EGRESS,
    };
    // TCX links (6.6+) need no qdisc and vanish with the process.
    let tcx = attached.plan.tc_mode == TcMode::Tcx;
    if !tcx && !attached.clsact_added.iter().any(|i| i == iface) {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => attached.clsact_added.push(iface.to_string()),
            // Already there (someone else's): use it, leave it.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(LoadError::Clsact {
                    iface: iface.to_string(),
                    source,
                })
            }
        }
    }
    let mode = attached.plan.tc_mode.as_str();
    let err = |source| LoadError::Attach {
        program: name,
        iface: iface.to_string(),
        mode,
        source: Box::new(source),
    };
    if let Some(old) = pinned_link(cfg, hook_name, iface) {
        let prog: &mut SchedClassifier = program(&mut attached.ebpf, name)?;
        let adopted = tc::SchedClassifierLink::try_from(old)
            .map_err(|e| e.to_string())
            .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()));
        match adopted {
            Ok(id) => {
                let link = prog.take_link(id).map_err(err)?;
                pin_link(attached, cfg, hook_name, iface, link.try_into())?;
                attached.adopted.push(format!("{hook_name} {iface}"));
                return Ok(mode);
            }
            Err(e) => log::warn!(
                "{iface}: could not reuse the pinned {hook_name} link ({e}); attaching afresh"
            ),
        }
    }
    let prog: &mut SchedClassifier = program(&mut attached.ebpf, name)?;
    let id = attach_classifier(prog, iface, hook, attached.plan.tc_mode).map_err(err)?;
    if cfg.pin_path.is_some() {
        let link = prog.take_link(id).map_err(err)?;
        pin_link(attached, cfg, hook_name, iface, link.try_into())?;
    }
    Ok(mode)
}

/// Attach as planned: aya's plain `attach` picks TCX by itself on 6.6+.
/// TCX: after the programs already there (aya's default order); clsact: at
/// the priority the kernel picks (49152 on an empty hook).
fn attach_classifier(
    prog: &mut SchedClassifier,
    iface: &str,
    hook: TcAttachType,
    mode: TcMode,
) -> Result<tc::SchedClassifierLinkId, ProgramError> {
    let options = match mode {
        TcMode::Tcx => tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
        TcMode::Clsact => tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
    };
    prog.attach_with_options(iface, hook, options)
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Links detach when `ebpf` drops; a qdisc we added must go too.
        for iface in &self.clsact_added {
            let out = Command::new("tc")
                .args(["qdisc", "del", "dev", iface, "clsact"])
                .output();
            if let Err(e) = out {
                log::warn!("removing the clsact qdisc we added to {iface}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(major: u8, minor: u8) -> KernelFeatures {
        KernelFeatures::of(KernelVersion::new(major, minor, 0))
    }

    fn cfg(ingress: IngressHook) -> AgentConfig {
        AgentConfig {
            ingress,
            ..AgentConfig::default()
        }
    }

    fn with_plaintext(ingress: IngressHook) -> AgentConfig {
        AgentConfig {
            plaintext_ports: vec![8080],
            ports: vec![443, 8080],
            ..cfg(ingress)
        }
    }

    fn planned(
        xdp: Option<&'static str>,
        tc_ingress: Option<&'static str>,
        tc: TcMode,
    ) -> HookPlan {
        HookPlan {
            egress: Some(TC_PROGRAM),
            xdp,
            tc_ingress,
            tc_mode: tc,
        }
    }

    #[test]
    fn tap_mode_loads_one_ingress_program_and_no_egress() {
        let tap = |ingress| AgentConfig {
            mode: AgentMode::Tap,
            ..cfg(ingress)
        };
        let xdp = plan(&tap(IngressHook::Xdp), &on(6, 18)).unwrap();
        assert_eq!(xdp.programs().collect::<Vec<_>>(), [XDP_TAP_PROGRAM]);
        let tc = plan(&tap(IngressHook::Tc), &on(6, 18)).unwrap();
        assert_eq!(tc.programs().collect::<Vec<_>>(), [TC_TAP_PROGRAM]);
        // No XDP tap without frags: TC is the way on older kernels.
        let old = refusal(&tap(IngressHook::Xdp), 5, 15);
        assert!(old.contains("ingress = \"tc\""), "{old}");
        assert!(plan(&tap(IngressHook::Tc), &on(5, 15)).is_ok());
    }

    #[test]
    fn upstream_legs_on_a_server_load_the_by_port_programs_on_both_hooks() {
        let proxy = AgentConfig {
            upstream_ports: vec![443],
            ..cfg(IngressHook::Tc)
        };
        let p = plan(&proxy, &on(6, 18)).unwrap();
        assert_eq!(
            (p.egress, p.tc_ingress),
            (Some(TC_TAP_PROGRAM), Some(TC_TAP_PROGRAM))
        );
    }

    #[test]
    fn router_mode_loads_the_by_port_programs_on_both_hooks_once_each() {
        let router = |ingress| AgentConfig {
            mode: AgentMode::Router,
            ..cfg(ingress)
        };
        let xdp = plan(&router(IngressHook::Xdp), &on(6, 18)).unwrap();
        assert_eq!(
            xdp.programs().collect::<Vec<_>>(),
            [TC_TAP_PROGRAM, XDP_TAP_PROGRAM]
        );
        let tc = plan(&router(IngressHook::Tc), &on(6, 18)).unwrap();
        assert_eq!(
            (tc.egress, tc.tc_ingress),
            (Some(TC_TAP_PROGRAM), Some(TC_TAP_PROGRAM))
        );
        assert_eq!(
            tc.programs().collect::<Vec<_>>(),
            [TC_TAP_PROGRAM],
            "loaded once"
        );
    }

    #[test]
    fn each_configuration_loads_only_the_programs_it_attaches() {
        let xdp = planned(Some(XDP_PROGRAM), None, TcMode::Tcx);
        let tc = planned(None, Some(TC_INGRESS_PROGRAM), TcMode::Tcx);
        assert_eq!(
            xdp.programs().collect::<Vec<_>>(),
            [TC_PROGRAM, XDP_PROGRAM]
        );
        assert_eq!(
            tc.programs().collect::<Vec<_>>(),
            [TC_PROGRAM, TC_INGRESS_PROGRAM],
            "ingress = \"tc\" loads no XDP program"
        );
    }

    #[test]
    fn hooks_follow_the_kernel_release() {
        use IngressHook::{Tc, Xdp};
        let cases = [
            (
                (6, 18),
                cfg(Xdp),
                planned(Some(XDP_PROGRAM), None, TcMode::Tcx),
            ),
            (
                (6, 6),
                cfg(Tc),
                planned(None, Some(TC_INGRESS_PROGRAM), TcMode::Tcx),
            ),
            (
                (6, 1),
                cfg(Xdp),
                planned(Some(XDP_PROGRAM), None, TcMode::Clsact),
            ),
            (
                (5, 18),
                with_plaintext(Xdp),
                planned(Some(XDP_PROGRAM), None, TcMode::Clsact),
            ),
            // Before XDP frags: the twin without them (and without samples).
            (
                (5, 15),
                cfg(Xdp),
                planned(Some(XDP_NOFRAGS_PROGRAM), None, TcMode::Clsact),
            ),
            (
                (5, 8),
                cfg(Xdp),
                planned(Some(XDP_NOFRAGS_PROGRAM), None, TcMode::Clsact),
            ),
            // TC ingress samples with bpf_skb_load_bytes: fine before 5.18.
            (
                (5, 10),
                with_plaintext(Tc),
                planned(None, Some(TC_INGRESS_PROGRAM), TcMode::Clsact),
            ),
        ];
        for ((major, minor), cfg, want) in cases {
            assert_eq!(
                plan(&cfg, &on(major, minor)),
                Ok(want),
                "Linux {major}.{minor}, {:?}",
                cfg.ingress
            );
        }
    }

    fn refusal(cfg: &AgentConfig, major: u8, minor: u8) -> String {
        match plan(cfg, &on(major, minor)) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("Linux {major}.{minor} should refuse {cfg:?}, planned {p:?}"),
        }
    }

    #[test]
    fn a_kernel_before_5_8_is_refused_whatever_the_hooks() {
        for ingress in [IngressHook::Xdp, IngressHook::Tc] {
            let msg = refusal(&cfg(ingress), 5, 4);
            assert_eq!(
                msg,
                "the agent (BPF ring buffer) needs Linux 5.8 or later; \
                 this kernel is 5.4.0"
            );
        }
    }

    #[test]
    fn xdp_sampling_before_5_18_is_refused_with_tc_ingress_suggested() {
        let msg = refusal(&with_plaintext(IngressHook::Xdp), 5, 15);
        assert!(msg.contains("needs Linux 5.18"), "{msg}");
        assert!(msg.contains("this kernel is 5.15.0"), "{msg}");
        assert!(msg.contains("ingress = \"tc\""), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn pinning_before_tcx_is_refused_before_anything_is_loaded() {
        let cfg = AgentConfig {
            pin_path: Some("/sys/fs/bpf/monitor".into()),
            ..cfg(IngressHook::Tc)
        };
        let msg = refusal(&cfg, 6, 1);
        assert!(msg.contains("needs Linux 6.6"), "{msg}");
        assert!(msg.contains("pin_path"), "{msg}");
        assert!(plan(&cfg, &on(6, 6)).is_ok());
    }

    #[test]
    fn features_switch_on_at_their_first_release() {
        let before = on(6, 5);
        assert!(before.ring_buffer && before.xdp_frags && !before.tcx);
        assert!(on(6, 6).tcx);
        assert!(!on(5, 17).xdp_frags && on(5, 18).xdp_frags);
        assert!(!on(5, 7).ring_buffer && on(5, 8).ring_buffer);
    }
}
