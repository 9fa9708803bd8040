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
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", &kcfg, true)
        .map_max_entries("FLOWS", cfg.flow_table_size)
        .map_max_entries("HALF_OPEN", cfg.half_open_table_size)
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
    };
    for iface in &cfg.interfaces {
        let tc_mode = attach_tc(&mut attached, iface, TC_PROGRAM, TcAttachType::Egress)?;
        let xdp_mode = match cfg.ingress {
            IngressHook::Xdp => {
                if is_virtual(iface) {
                    log::warn!(
                        "{iface} is a virtual device: with an XDP program it gives up GRO \
                         (measured on veth: 0.15 of the throughput); `ingress = \"tc\"` keeps ~0.98 (BENCHMARKS.md)"
                    );
                }
                attach_xdp(&mut attached.ebpf, iface, cfg.xdp_mode)?
            }
            IngressHook::Tc => {
                attach_tc(
                    &mut attached,
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

fn attach_xdp(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: XdpModeSetting,
) -> Result<&'static str, LoadError> {
    let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?;
    let err = |mode: &'static str, source| LoadError::Attach {
        program: XDP_PROGRAM,
        iface: iface.to_string(),
        mode,
        source: Box::new(source),
    };
    match mode {
        XdpModeSetting::Native => xdp
            .attach(iface, XdpMode::Driver)
            .map(|_| "native")
            .map_err(|e| err("native", e)),
        XdpModeSetting::Skb => xdp
            .attach(iface, XdpMode::Skb)
            .map(|_| "skb")
            .map_err(|e| err("skb", e)),
        // Try native first so we know (and can report) which mode runs.
        XdpModeSetting::Auto => match xdp.attach(iface, XdpMode::Driver) {
            Ok(_) => Ok("native"),
            Err(native) => {
                log::info!("{iface}: native XDP unavailable ({native}); using generic XDP");
                xdp.attach(iface, XdpMode::Skb)
                    .map(|_| "skb")
                    .map_err(|e| err("skb", e))
            }
        },
    }
}

fn attach_tc(
    attached: &mut Attached,
    iface: &str,
    name: &'static str,
    hook: TcAttachType,
) -> Result<&'static str, LoadError> {
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
    let prog: &mut SchedClassifier = program(&mut attached.ebpf, name)?;
    prog.attach(iface, hook)
        .map_err(|source| LoadError::Attach {
            program: name,
            iface: iface.to_string(),
            mode,
            source: Box::new(source),
        })?;
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
