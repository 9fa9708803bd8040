//! The cure, applied (issue 16): the remedy programs, loaded with
//! `[remedy] keepalive = true`, and the loop that keeps the kernel in step
//! with `monitor_core::remedy::Remedy`'s decisions.
//!
//! Chosen: a sock_ops program on the root cgroup for connections accepted
//! from now on (no per-packet cost, nothing to poll), and a TCP iterator
//! for the connections already open, by socket cookie, which this host's
//! own socket list (sock_diag) gives with their addresses. The iterator
//! is the only way to set an option on another process's socket without
//! CAP_SYS_PTRACE (`pidfd_getfd`). Linux 6.1 (keepalive options set from
//! an iterator, and read back to tell an application's own). Both need
//! nothing after start that the agent does not keep (file descriptors).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{links::CgroupAttachMode, Iter, SockOps},
    util::KernelVersion,
    Btf, Ebpf, EbpfLoader,
};
use monitor_common::remedy::{
    KeepaliveSetting, RemedyCounter, SweepTarget, MAX_SWEEP_TARGETS, REMEDY_PENDING, SWEEP_APPLY,
    SWEEP_OURS, SWEEP_REARM,
};
use monitor_core::{
    detector::{keepalive::Keepalive, path::PathKey},
    remedy::sound::Candidates,
};

use crate::sock_diag::{self, SockDiagError, TcpSocket};

mod cgroup;
mod maps;
mod task;

pub use cgroup::{cgroup2_root, CGROUP_ROOT};
pub use task::{RemedyTask, SYNC_EVERY};

/// Keepalive options in `bpf_setsockopt` from an iterator (5.15) and
/// reading them back with `bpf_getsockopt`, which tells an application's
/// own keepalive from ours (6.1).
pub const REMEDY_KERNEL: (u8, u8) = (6, 1);

const NEW_PROGRAM: &str = "remedy_new";
const SWEEP_PROGRAM: &str = "remedy_sweep";

#[derive(Debug, thiserror::Error)]
pub enum RemedyError {
    #[error(
        "the remedy needs Linux 6.1 (keepalive set and read back from sock_ops and TCP iterators); this is {0}"
    )]
    KernelTooOld(String),
    #[error("reading the kernel version: {0}")]
    KernelVersion(String),
    #[error("reading this network namespace's cookie: {0}")]
    Netns(#[source] SockDiagError),
    #[error("loading the remedy programs: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("remedy program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("remedy program {0}: missing from the object")]
    MissingProgram(&'static str),
    #[error("remedy map {0}: missing from the object")]
    MissingMap(&'static str),
    #[error(
        "opening the cgroup v2 root {path} (remedy.cgroup, else the first cgroup2 mount): {source}"
    )]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted here (mount -t cgroup2 none {CGROUP_ROOT}, or /sys/fs/cgroup/unified beside cgroup v1): the remedy's sock_ops program attaches to its root")]
    NoCgroup2,
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {0}")]
    Btf(#[source] Box<aya::BtfError>),
    #[error("remedy map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("listing this host's connections: {0}")]
    Sockets(#[source] SockDiagError),
    #[error("running the remedy sweep (TCP iterator): {0}")]
    Sweep(#[source] std::io::Error),
    #[error("running the remedy sweep (TCP iterator): {0}")]
    SweepLink(#[source] Box<aya::programs::links::LinkError>),
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> RemedyError {
    move |e| RemedyError::Map {
        map,
        source: Box::new(e),
    }
}

fn prog_err(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> RemedyError {
    move |e| RemedyError::Program {
        program,
        source: Box::new(e),
    }
}

/// A socket with our keepalive, and the setting (its `path` field unused:
/// the path is `path`, from the socket's own addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Covered {
    path: PathKey,
    setting: KeepaliveSetting,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Connections with the keepalive in force, per path.
    pub covered: BTreeMap<PathKey, u64>,
    /// Sockets changed in this sync's sweep (not counting a probe's
    /// setting set again).
    pub swept: usize,
    /// Changes left for the next sync (the rate bound).
    pub deferred: usize,
    /// setsockopt failures in this sweep.
    pub failed: usize,
    /// Connections of the paths being sounded a probe could go on.
    pub candidates: Candidates,
}

/// What the remedy wants of the kernel.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    /// Keepalive per remedied path.
    pub paths: Vec<(PathKey, Keepalive)>,
    /// Keepalive probes by socket cookie, over their path's (sounding).
    pub probes: Vec<(u64, Keepalive)>,
    /// Paths being sounded: list their connections as candidates.
    pub sounding: Vec<PathKey>,
}

/// Candidates listed per sounded path, at most.
const CANDIDATES_KEPT: usize = 64;

/// The loaded remedy programs and what they have done.
pub struct RemedyRuntime {
    ebpf: Ebpf,
    ports: Vec<u16>,
    prefixes: (u8, u8),
    /// Path table entries in force.
    table: Vec<PathKey>,
    covered: HashMap<u64, Covered>,
    /// Sockets whose application keeps its own keepalive, or that refused it.
    left_alone: HashSet<u64>,
    /// Sockets given a sounding probe's setting.
    probing: HashSet<u64>,
    /// This namespace's keepalive sysctls: what taking it back restores.
    defaults: KeepaliveSetting,
}

/// This namespace's keepalive defaults (net.ipv4.tcp_keepalive_*); zero
/// where unreadable (then taking keepalive back leaves the timings).
fn keepalive_defaults() -> KeepaliveSetting {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/tcp_keepalive_{name}"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let (idle_s, interval_s, count) = (read("time"), read("intvl"), read("probes"));
    if idle_s == 0 || interval_s == 0 || count == 0 {
        return KeepaliveSetting::default();
    }
    KeepaliveSetting {
        idle_s,
        interval_s,
        count,
        path: 0,
    }
}

impl RemedyRuntime {
    /// Load both programs, attach the sock_ops one to the root cgroup (its
    /// link lives as long as this value), and load the iterator.
    pub fn start(
        ports: &[u16],
        v4_prefix: u8,
        v6_prefix: u8,
        cgroup: Option<&std::path::Path>,
    ) -> Result<Self, RemedyError> {
        let v = KernelVersion::current().map_err(|e| RemedyError::KernelVersion(e.to_string()))?;
        if v < KernelVersion::new(REMEDY_KERNEL.0, REMEDY_KERNEL.1, 0) {
            return Err(RemedyError::KernelTooOld(format!("{v:?}")));
        }
        let cookie = sock_diag::netns_cookie().map_err(RemedyError::Netns)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("NETNS_COOKIE", &cookie, true)
            .load(crate::REMEDY_OBJECT)
            .map_err(|e| RemedyError::Load(Box::new(e)))?;
        let root = match cgroup {
            Some(p) => p.to_path_buf(),
            None => cgroup2_root()?,
        };
        let cgroup = std::fs::File::open(&root).map_err(|source| RemedyError::Cgroup {
            path: root.display().to_string(),
            source,
        })?;
        let new: &mut SockOps = ebpf
            .program_mut(NEW_PROGRAM)
            .ok_or(RemedyError::MissingProgram(NEW_PROGRAM))?
            .try_into()
            .map_err(prog_err(NEW_PROGRAM))?;
        new.load().map_err(prog_err(NEW_PROGRAM))?;
        // A cgroup link (every kernel the remedy runs on has them) is
        // always added beside the programs already there (the kernel
        // attaches links with BPF_F_ALLOW_MULTI and refuses flags on them).
        new.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err(NEW_PROGRAM))?;
        let btf = Btf::from_sys_fs().map_err(|e| RemedyError::Btf(Box::new(e)))?;
        let sweep: &mut Iter = ebpf
            .program_mut(SWEEP_PROGRAM)
            .ok_or(RemedyError::MissingProgram(SWEEP_PROGRAM))?
            .try_into()
            .map_err(prog_err(SWEEP_PROGRAM))?;
        sweep.load("tcp", &btf).map_err(prog_err(SWEEP_PROGRAM))?;
        Ok(RemedyRuntime {
            ebpf,
            ports: ports.to_vec(),
            prefixes: (v4_prefix, v6_prefix),
            table: Vec::new(),
            covered: HashMap::new(),
            left_alone: HashSet::new(),
            probing: HashSet::new(),
            defaults: keepalive_defaults(),
        })
    }

    /// Bring the kernel in step with `wanted`: the path table for new
    /// connections, and at most `budget` existing sockets changed.
    pub fn sync(&mut self, wanted: &Wanted, budget: usize) -> Result<SyncOutcome, RemedyError> {
        self.set_table(&wanted.paths)?;
        self.drain_new()?;
        if wanted.paths.is_empty() && wanted.sounding.is_empty() && self.covered.is_empty() {
            // Nothing in force, nothing to take back: no socket listing
            // (a busy proxy's is long), the usual case.
            return Ok(SyncOutcome::default());
        }
        // Only sockets we knew of before the listing can be missing from it
        // because they closed; sock_ops may cover one meanwhile.
        let known: HashSet<u64> = self.covered.keys().copied().collect();
        let sockets: Vec<TcpSocket> = sock_diag::established_tcp()
            .map_err(RemedyError::Sockets)?
            .into_iter()
            .filter(|s| self.ports.contains(&s.local.port()))
            .collect();
        let listed_ns = crate::clock::now_ns();
        self.drain_new()?;
        self.repath(&sockets);
        let want: HashMap<PathKey, Keepalive> = wanted.paths.iter().copied().collect();
        let probes: HashMap<u64, Keepalive> = wanted.probes.iter().copied().collect();
        let mut targets = Vec::new();
        let mut deferred = 0;
        let mut rearmed = 0;
        for s in &sockets {
            let path = self.path_of(s);
            let probe = probes.get(&s.cookie);
            if probe.is_some() {
                self.probing.insert(s.cookie);
            } else if self.probing.contains(&s.cookie) {
                // The sounding moved on, but a probe out unanswered keeps
                // its setting: the connection must outlive the device's own
                // wait, whose reconnect proves the black hole.
                if s.unanswered {
                    continue;
                }
                self.probing.remove(&s.cookie);
            }
            // A probe's setting is set again at every sync until its probe
            // goes out, re-arming the keepalive timer for what remains of
            // the idle time ([`SWEEP_REARM`]): its last arming is short and
            // it fires on time (measured: 20.00-20.03 s for 20, against up
            // to 22 s armed once). Not once it is out: that would send the
            // next probe early.
            let rearm = probe.is_some() && !s.unanswered;
            let k = probe.or_else(|| want.get(&path));
            let (mut t, again) = match (k, self.covered.get(&s.cookie)) {
                (Some(k), None) if !self.left_alone.contains(&s.cookie) => {
                    (target(path, k, None), false)
                }
                (Some(k), Some(c)) if !same(c, k) || rearm => {
                    (target(path, k, Some(c.setting)), same(c, k))
                }
                (None, Some(c)) => (undo(c, self.defaults), false),
                _ => continue,
            };
            if targets.len() >= budget.min(MAX_SWEEP_TARGETS as usize) {
                deferred += 1;
                continue;
            }
            rearmed += usize::from(again);
            if rearm {
                t.1.flags |= SWEEP_REARM;
            }
            targets.push((s.cookie, t));
        }
        let failed = self.sweep(&targets)?;
        // New connections covered while we swept (sock_ops ran first).
        self.drain_new()?;
        self.repath(&sockets);
        let live: HashSet<u64> = sockets.iter().map(|s| s.cookie).collect();
        self.covered
            .retain(|c, _| live.contains(c) || !known.contains(c));
        self.left_alone.retain(|c| live.contains(c));
        self.probing.retain(|c| live.contains(c));
        let mut candidates = self.candidates(&sockets, wanted);
        candidates.listed_ns = listed_ns;
        let mut covered = BTreeMap::new();
        for c in self.covered.values() {
            *covered.entry(c.path).or_insert(0) += 1;
        }
        Ok(SyncOutcome {
            covered,
            swept: targets.len() - rearmed,
            deferred,
            failed,
            candidates,
        })
    }

    /// Take keepalive back from every socket we gave it and empty the path
    /// table (at exit, and when the remedy is switched off).
    pub fn undo_all(&mut self) -> Result<usize, RemedyError> {
        self.drain_new()?;
        self.set_table(&[])?;
        // Any connection sock_ops covered before the table emptied.
        self.drain_new()?;
        let all: Vec<(u64, (PathKey, SweepTarget))> = self
            .covered
            .iter()
            .map(|(cookie, c)| (*cookie, undo(c, self.defaults)))
            .collect();
        let mut n = 0;
        for chunk in all.chunks(MAX_SWEEP_TARGETS as usize) {
            self.sweep(chunk)?;
            n += chunk.len();
        }
        Ok(n)
    }

    /// The kernel's counts, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let Some(m) = self.ebpf.map("REMEDY_COUNTERS") else {
            return out;
        };
        let Ok(a) = PerCpuArray::<&MapData, u64>::try_from(m) else {
            return out;
        };
        for c in RemedyCounter::ALL {
            let v = a.get(&(c as u32), 0).map_or(0, |vals| vals.iter().sum());
            out.insert(c.name().to_string(), v);
        }
        out
    }

    /// The connections of the `sounding` paths a probe could go on: not
    /// one whose application keeps its own keepalive (the sweep just told),
    /// nor one already unanswered (a box may have forgotten it: it lingers
    /// on the server, retransmitting, with no device behind it).
    fn candidates(&self, sockets: &[TcpSocket], wanted: &Wanted) -> Candidates {
        let mut out = Candidates::default();
        if wanted.sounding.is_empty() && wanted.probes.is_empty() {
            return out;
        }
        let probed: HashSet<u64> = wanted.probes.iter().map(|(c, _)| *c).collect();
        let sounding: HashSet<PathKey> = wanted.sounding.iter().copied().collect();
        for s in sockets {
            let own = self.left_alone.contains(&s.cookie);
            if probed.contains(&s.cookie) && !own {
                out.probed_open.insert(s.cookie);
            }
            if own || s.unanswered {
                continue;
            }
            let path = self.path_of(s);
            if sounding.contains(&path) {
                let c = out.ready.entry(path).or_default();
                if c.len() < CANDIDATES_KEPT {
                    c.push((s.cookie, client_of(s)));
                }
            }
        }
        out
    }

    /// Covered sockets' paths from their own addresses (the table index
    /// recorded at establishment may have moved since).
    fn repath(&mut self, sockets: &[TcpSocket]) {
        for s in sockets {
            let path = self.path_of(s);
            if let Some(c) = self.covered.get_mut(&s.cookie) {
                c.path = path;
            }
        }
    }

    fn path_of(&self, s: &TcpSocket) -> PathKey {
        let ip = client_of(s).ip();
        PathKey::new(ip, s.local.port(), self.prefixes.0, self.prefixes.1)
    }
}

/// The client's address as the detector spells it (IPv4, not mapped).
fn client_of(s: &TcpSocket) -> SocketAddr {
    let ip = match s.remote.ip() {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        a => a,
    };
    SocketAddr::new(ip, s.remote.port())
}

fn same(c: &Covered, k: &Keepalive) -> bool {
    let s = &c.setting;
    (s.idle_s, s.interval_s, s.count) == (k.idle_seconds, k.interval_seconds, k.count)
}

fn setting(k: &Keepalive, path: u32) -> KeepaliveSetting {
    KeepaliveSetting {
        idle_s: k.idle_seconds,
        interval_s: k.interval_seconds,
        count: k.count,
        path,
    }
}

/// Keepalive `k` for a socket of `path`; `ours`: the keepalive we set on
/// it before (changed only if still in force).
fn target(path: PathKey, k: &Keepalive, ours: Option<KeepaliveSetting>) -> (PathKey, SweepTarget) {
    (
        path,
        SweepTarget {
            setting: setting(k, 0),
            ours: ours.unwrap_or_default(),
            flags: SWEEP_APPLY | if ours.is_some() { SWEEP_OURS } else { 0 },
            result: REMEDY_PENDING,
        },
    )
}

/// Keepalive taken back from a socket we gave it, timings to `defaults`.
fn undo(c: &Covered, defaults: KeepaliveSetting) -> (PathKey, SweepTarget) {
    (
        c.path,
        SweepTarget {
            setting: defaults,
            ours: c.setting,
            flags: 0,
            result: REMEDY_PENDING,
        },
    )
}
