//! Loading the kernel programs and attaching them: XDP on ingress, TC on egress.
//! Detaching is dropping: aya closes the links, and `Attached` removes a clsact
//! qdisc if (and only if) it added one.

use std::{ffi::CString, process::Command};

use aya::{
    programs::{
        tc::{self, TcAttachType},
        ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};

use crate::config::{AgentConfig, IngressHook, XdpModeSetting};

pub const XDP_PROGRAM: &str = "monitor_xdp";
pub const TC_PROGRAM: &str = "monitor_tc";
pub const TC_INGRESS_PROGRAM: &str = "monitor_tc_ingress";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("interface {iface:?} does not exist in this network namespace (see `ip link show`)")]
    NoInterface { iface: String },
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
    /// "tcx" (kernel >= 6.6) or "clsact".
    pub tc_mode: &'static str,
}

impl Attachment {
    /// "XDP ingress (native), TC egress (tcx)" or "TC ingress and egress (tcx)".
    pub fn hooks(xdp_mode: &str, tc_mode: &str) -> String {
        if xdp_mode == "off" {
            format!("TC ingress and egress ({tc_mode})")
        } else {
            format!("XDP ingress ({xdp_mode}), TC egress ({tc_mode})")
        }
    }
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
/// this with BPF_PROG_TEST_RUN).
pub fn load(cfg: &AgentConfig) -> Result<Ebpf, LoadError> {
    let kcfg = cfg.kernel_config();
    let mut loader = EbpfLoader::new();
    loader
        .override_global("CONFIG", &kcfg, true)
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
    let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?;
    xdp.load().map_err(|e| verifier_error(XDP_PROGRAM, e))?;
    for name in [TC_PROGRAM, TC_INGRESS_PROGRAM] {
        let tc: &mut SchedClassifier = program(&mut ebpf, name)?;
        tc.load().map_err(|e| verifier_error(name, e))?;
    }
    Ok(ebpf)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::MissingProgram { program: name })
}

pub fn program_stats(ebpf: &Ebpf) -> Vec<ProgramStats> {
    [XDP_PROGRAM, TC_PROGRAM, TC_INGRESS_PROGRAM]
        .into_iter()
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

/// Load and attach to every configured interface. Interfaces are checked
/// first so a typo fails before anything changes.
pub fn attach(cfg: &AgentConfig) -> Result<Attached, LoadError> {
    for iface in &cfg.interfaces {
        if !iface_exists(iface) {
            return Err(LoadError::NoInterface {
                iface: iface.clone(),
            });
        }
    }
    let ebpf = load(cfg)?;
    let programs = program_stats(&ebpf);
    let mut attached = Attached {
        ebpf,
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
        let tc_mode = attach_tc(&mut attached, cfg, iface, TC_PROGRAM, TcAttachType::Egress)?;
        let xdp_mode = match cfg.ingress {
            IngressHook::Xdp => {
                if is_virtual(iface) {
                    log::warn!(
                        "{iface} is a virtual device: with an XDP program it gives up GRO \
                         (measured on veth: 0.15 of the throughput); `ingress = \"tc\"` keeps ~0.98 (BENCHMARKS.md)"
                    );
                }
                attach_xdp(&mut attached, cfg, iface)?
            }
            IngressHook::Tc => {
                attach_tc(
                    &mut attached,
                    cfg,
                    iface,
                    TC_INGRESS_PROGRAM,
                    TcAttachType::Ingress,
                )?;
                "off"
            }
        };
        attached.attachments.push(Attachment {
            iface: iface.clone(),
            xdp_mode,
            tc_mode,
        });
    }
    Ok(attached)
}

/// The pinned links this configuration will use: any other pinned link (an
/// interface dropped from the configuration, XDP where TC ingress is now
/// wanted) is removed first, so nothing is attached twice.
fn drop_unexpected_links(dir: &std::path::Path, cfg: &AgentConfig) -> Result<(), LoadError> {
    let mut want = Vec::new();
    for iface in &cfg.interfaces {
        want.push(crate::pins::link_path(dir, HOOK_TC_EGRESS, iface));
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
    if let Some(old) = pinned_link(cfg, HOOK_XDP, iface) {
        let xdp: &mut Xdp = program(&mut attached.ebpf, XDP_PROGRAM)?;
        let adopted = aya::programs::xdp::XdpLink::try_from(old)
            .map_err(|e| e.to_string())
            .and_then(|l| xdp.attach_to_link(l).map_err(|e| e.to_string()));
        match adopted {
            Ok(id) => {
                let link = xdp.take_link(id).map_err(|e| LoadError::Attach {
                    program: XDP_PROGRAM,
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
    let xdp: &mut Xdp = program(&mut attached.ebpf, XDP_PROGRAM)?;
    let err = |mode: &'static str, source| LoadError::Attach {
        program: XDP_PROGRAM,
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
    let tcx = KernelVersion::current()
        .map(|v| v >= KernelVersion::new(6, 6, 0))
        .unwrap_or(false);
    if !tcx && !attached.clsact_added.iter().any(|i| i == iface) {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => attached.clsact_added.push(iface.to_string()),
            // Already there (someone else's): use it, leave it.
            Err(tc::TcError::NetlinkError(e)) if e.to_string().contains("exists") => {}
            Err(source) => {
                return Err(LoadError::Clsact {
                    iface: iface.to_string(),
                    source,
                })
            }
        }
    }
    let mode = if tcx { "tcx" } else { "clsact" };
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
    let id = prog.attach(iface, hook).map_err(err)?;
    if cfg.pin_path.is_some() {
        let link = prog.take_link(id).map_err(err)?;
        pin_link(attached, cfg, hook_name, iface, link.try_into())?;
    }
    Ok(mode)
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
