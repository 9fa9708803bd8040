//! `monitor analyze`: the same state machine (`monitor-common`) and the same
//! detector over a capture file, with packet timestamps as the clock. For
//! administrators who cannot load eBPF on the mail server but can capture on
//! a firewall or a SPAN port.

mod read;
pub mod synthetic;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use monitor_common::{
    parse::parse_ip, parse_ethernet, Config, Dir, FlowKey, Packet, ParseError,
    DEFAULT_FLOW_TABLE_SIZE, MAX_PORTS, TCP_ACK, TCP_SYN,
};
use pcap_file::DataLink;
use serde::{Deserialize, Serialize};

use crate::{
    detector::{self, report::Report, DetectorConfig, Verdict},
    event::key_addr,
    pipeline::{Output, Pipeline},
    replay::Replay,
};
pub use read::CutRecord;
use read::{read_capture, Record};

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("opening the capture {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the capture {path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "the capture {path} has no packet of a supported link type (it has {found}); \
         supported: Ethernet, raw IP, Linux cooked (SLL, SLL2), BSD loopback"
    )]
    UnsupportedLink { path: PathBuf, found: String },
    #[error("analyze options: {0}")]
    Options(String),
}

#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    /// Server ports (at most 8); packets to them are client -> server.
    pub ports: Vec<u16>,
    /// Those of `ports` carrying plaintext HTTP: their Pings are read.
    pub plaintext_ports: Vec<u16>,
    /// Server addresses; empty: any address on those ports.
    pub servers: Vec<IpAddr>,
    /// A capture from a reverse proxy's host: the remote ports of its
    /// upstream legs (also in `ports`), and the host's own addresses.
    pub upstream_ports: Vec<u16>,
    pub local_addresses: Vec<IpAddr>,
    /// Only packets from this many seconds after the first one...
    pub from: Option<f64>,
    /// ...to this many.
    pub to: Option<f64>,
    pub gap_threshold: Duration,
    pub detector: DetectorConfig,
}

/// What was read, and what could not be used, so nothing is silently lost.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CaptureStats {
    /// The server ports analysed.
    pub server_ports: Vec<u16>,
    /// When no port was named: every port SYNs went to, with their counts
    /// (most first; the first eight are analysed).
    pub inferred_ports: Option<Vec<(u16, u64)>>,
    pub packets: u64,
    pub tracked: u64,
    /// Not TCP to or from a server port (or outside the time window).
    pub not_ours: u64,
    /// Headers cut short (snaplen, or a broken frame).
    pub truncated: u64,
    pub malformed: u64,
    /// Captured shorter than on the wire (snaplen) but with whole headers: used.
    pub cut_by_snaplen: u64,
    /// Timestamps that went backwards; clamped to the latest seen.
    pub out_of_order: u64,
    /// Packets of link types we do not read, by link type.
    pub unsupported_link: BTreeMap<String, u64>,
    pub first_seconds: Option<f64>,
    pub last_seconds: Option<f64>,
    /// The file ends inside its last record (tcpdump killed, or still
    /// writing): everything before that record was analysed.
    pub cut_at_end: Option<CutRecord>,
    /// Open flows evicted from the full flow table, as the kernel's LRU
    /// would (their verdicts: vanished).
    pub flows_evicted: u64,
    /// Second copies of a packet passed over: a capture from a mirror port
    /// of both sides of a conversation holds each packet twice.
    #[serde(default)]
    pub duplicates: u64,
    /// Verdicts beyond those listed (see [`Limits::listed_verdicts`]); the
    /// report counts them all.
    pub verdicts_not_listed: u64,
}

/// What keeps an analysis in bounded memory however long the capture.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Flows the replay's flow table holds, as the kernel's.
    pub flow_table: usize,
    /// Verdicts listed of each kind (kills, other endings): the first ones.
    pub listed_verdicts: usize,
}

/// Verdicts listed of each kind by default: enough to read through, a few
/// MB at most, where a day of a busy server ends millions of flows.
pub const LISTED_VERDICTS: usize = 10_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            flow_table: DEFAULT_FLOW_TABLE_SIZE as usize,
            listed_verdicts: LISTED_VERDICTS,
        }
    }
}

/// How often (capture time) the replay's table is swept, and the flows it
/// dropped retired from the detector, as the agent scans the kernel's table.
const SWEEP_EVERY_NS: u64 = 10_000_000_000;

#[derive(Debug, Serialize, Deserialize)]
pub struct Analysis {
    pub capture: CaptureStats,
    pub verdicts: Vec<Verdict>,
    pub report: Report,
}

/// Where the IP header starts for a link type, or None if we do not read it.
fn parse_link(link: DataLink, data: &[u8]) -> Option<Result<Packet, ParseError>> {
    Some(match link {
        DataLink::ETHERNET => parse_ethernet(data),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => parse_ip(data, 0),
        DataLink::LINUX_SLL => parse_ip(data, 16),
        DataLink::LINUX_SLL2 => parse_ip(data, 20),
        DataLink::NULL | DataLink::LOOP => parse_ip(data, 4),
        _ => return None,
    })
}

/// Sees every output of the pipeline and every second of capture time,
/// with the detector as it then is: what the agent's metrics see live.
pub trait Observer {
    fn output(&mut self, out: &Output, det: &detector::Detector);
    fn tick(&mut self, now_ns: u64, det: &detector::Detector);
}

struct Engine<'a, 'o> {
    opts: &'a AnalyzeOptions,
    observer: Option<&'o mut (dyn Observer + 'o)>,
    limits: Limits,
    replay: Replay,
    pipeline: Pipeline,
    stats: CaptureStats,
    verdicts: Vec<Verdict>,
    kills_listed: usize,
    others_listed: usize,
    last_ns: u64,
    last_tick_ns: u64,
    last_sweep_ns: u64,
    start_ns: Option<u64>,
    /// Keys the last sweep dropped (kept: its capacity is reused).
    dropped: Vec<FlowKey>,
}

impl Engine<'_, '_> {
    fn absorb(&mut self, out: Vec<Output>) {
        if let Some(obs) = self.observer.as_deref_mut() {
            for o in &out {
                obs.output(o, self.pipeline.detector());
            }
        }
        for o in out {
            if let Output::Detector(detector::Output::Verdict(v)) = o {
                self.list(v);
            }
        }
    }

    /// Keep the first verdicts of each kind, count the rest: a day of a busy
    /// server must not be held in memory verdict by verdict.
    fn list(&mut self, v: Verdict) {
        let listed = if v.ending.is_kill() {
            &mut self.kills_listed
        } else {
            &mut self.others_listed
        };
        if *listed < self.limits.listed_verdicts {
            *listed += 1;
            self.verdicts.push(v);
        } else {
            self.stats.verdicts_not_listed += 1;
        }
    }

    /// The capture's clock reached `ns`: once a second time passes for the
    /// pipeline; every [`SWEEP_EVERY_NS`] the replay's table drops what the
    /// kernel's would no longer hold, and the detector forgets those flows.
    fn advance(&mut self, ns: u64) {
        if ns.saturating_sub(self.last_tick_ns) >= 1_000_000_000 {
            self.last_tick_ns = ns;
            let out = self.pipeline.tick(ns);
            self.absorb(out);
            if let Some(obs) = self.observer.as_deref_mut() {
                obs.tick(ns, self.pipeline.detector());
            }
        }
        if ns.saturating_sub(self.last_sweep_ns) >= SWEEP_EVERY_NS {
            self.last_sweep_ns = ns;
            self.sweep(ns);
        }
    }

    fn sweep(&mut self, ns: u64) {
        self.dropped.clear();
        self.replay.sweep(ns, &mut self.dropped);
        let evicted = self.replay.flows_evicted();
        // Closed flows left the detector and the request reader at their
        // close: only open flows evicted for room have state to retire, and
        // retiring looks at every tracked flow, too much to do every sweep.
        if evicted == self.stats.flows_evicted {
            return;
        }
        self.stats.flows_evicted = evicted;
        let flows = self.replay.flows();
        let out = self.pipeline.retire_missing(ns, |k| flows.contains_key(k));
        self.absorb(out);
    }

    fn packet(&mut self, link: DataLink, ts: Duration, orig_len: u32, data: &[u8]) {
        self.stats.packets += 1;
        let mut ns = ts.as_nanos().min(u64::MAX as u128) as u64;
        if ns < self.last_ns {
            self.stats.out_of_order += 1;
            ns = self.last_ns;
        }
        self.last_ns = ns;
        let start = *self.start_ns.get_or_insert(ns);
        let rel = (ns - start) as f64 / 1e9;
        self.stats.first_seconds.get_or_insert(ns as f64 / 1e9);
        self.stats.last_seconds = Some(ns as f64 / 1e9);
        if self.opts.from.is_some_and(|f| rel < f) || self.opts.to.is_some_and(|t| rel > t) {
            self.stats.not_ours += 1;
            return;
        }
        self.advance(ns);
        let pkt = match parse_link(link, data) {
            None => {
                *self
                    .stats
                    .unsupported_link
                    .entry(format!("{link:?}"))
                    .or_default() += 1;
                return;
            }
            Some(Ok(p)) => p,
            Some(Err(ParseError::Truncated)) => {
                self.stats.truncated += 1;
                return;
            }
            Some(Err(ParseError::Malformed)) => {
                self.stats.malformed += 1;
                return;
            }
            Some(Err(_)) => {
                self.stats.not_ours += 1;
                return;
            }
        };
        let Some(dir) = self.replay.direction(&pkt) else {
            self.stats.not_ours += 1;
            return;
        };
        if !self.opts.servers.is_empty() {
            let server = match dir {
                Dir::In => key_addr(pkt.family, &pkt.dst_addr),
                Dir::Out => key_addr(pkt.family, &pkt.src_addr),
            };
            if !self.opts.servers.contains(&server) {
                self.stats.not_ours += 1;
                return;
            }
        }
        if (data.len() as u32) < orig_len {
            self.stats.cut_by_snaplen += 1;
        }
        self.stats.tracked += 1;
        for r in self.replay.records(&pkt, dir, ns, data) {
            let out = self.pipeline.record(&r);
            self.absorb(out);
        }
    }
}

fn format_err(path: &Path, e: impl std::fmt::Display) -> AnalyzeError {
    AnalyzeError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The server ports of a capture: where its connection-opening SYNs went
/// (clients' ports only ever receive SYN-ACKs). Most used first, at most
/// [`MAX_PORTS`]; with no SYN at all, none.
pub fn infer_server_ports(path: &Path) -> Result<Vec<(u16, u64)>, AnalyzeError> {
    let mut syns: BTreeMap<u16, u64> = BTreeMap::new();
    // A cut last record is the analysis's to report, not this count's.
    read_capture(path, &mut |r| {
        if let Record::Packet { link, data, .. } = r {
            if let Some(Ok(p)) = parse_link(link, data) {
                if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    *syns.entry(p.dst_port).or_default() += 1;
                }
            }
        }
    })?;
    let mut v: Vec<(u16, u64)> = syns.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(v)
}

/// Analyze a pcap or pcapng file, within the default [`Limits`].
pub fn analyze(path: &Path, opts: &AnalyzeOptions) -> Result<Analysis, AnalyzeError> {
    analyze_within(path, opts, Limits::default())
}

/// Ports with how many SYNs went to each.
type PortCounts = Vec<(u16, u64)>;

/// The ports to analyse: those named, else those inferred from the SYNs.
fn resolve_ports(
    path: &Path,
    opts: &AnalyzeOptions,
) -> Result<(AnalyzeOptions, Option<PortCounts>), AnalyzeError> {
    let mut opts = opts.clone();
    let mut inferred = None;
    if opts.ports.is_empty() {
        let found = infer_server_ports(path)?;
        if found.is_empty() {
            return Err(AnalyzeError::Options(format!(
                "{}: no connection-opening SYN to tell the server side by: name the server port(s) with --port",
                path.display()
            )));
        }
        opts.ports = found.iter().take(MAX_PORTS).map(|p| p.0).collect();
        inferred = Some(found);
    }
    if opts.ports.len() > MAX_PORTS || opts.ports.contains(&0) {
        return Err(AnalyzeError::Options(format!(
            "1 to {MAX_PORTS} non-zero ports, got {:?}",
            opts.ports
        )));
    }
    Ok((opts, inferred))
}

/// The settings the kernel programs would be loaded with.
fn kernel_config(opts: &AnalyzeOptions) -> Config {
    crate::config::kernel_config(&opts.ports, &opts.plaintext_ports, opts.gap_threshold)
}

/// As [`analyze`], with the memory bounds given.
pub fn analyze_within(
    path: &Path,
    opts: &AnalyzeOptions,
    limits: Limits,
) -> Result<Analysis, AnalyzeError> {
    analyze_observed(path, opts, limits, None)
}

/// As [`analyze_within`], showing `observer` what the pipeline says as
/// capture time passes.
pub fn analyze_observed(
    path: &Path,
    opts: &AnalyzeOptions,
    limits: Limits,
    observer: Option<&mut dyn Observer>,
) -> Result<Analysis, AnalyzeError> {
    let (opts, inferred) = resolve_ports(path, opts)?;
    let mut pipeline =
        Pipeline::new(opts.detector.clone()).map_err(|e| AnalyzeError::Options(e.to_string()))?;
    if !opts.upstream_ports.is_empty() {
        pipeline.set_upstream(&opts.upstream_ports, opts.local_addresses.iter().copied());
    }
    let mut e = Engine {
        opts: &opts,
        observer,
        limits,
        replay: Replay::with_capacity(kernel_config(&opts), limits.flow_table),
        pipeline,
        stats: CaptureStats {
            server_ports: opts.ports.clone(),
            inferred_ports: inferred,
            ..CaptureStats::default()
        },
        verdicts: Vec::new(),
        kills_listed: 0,
        others_listed: 0,
        last_ns: 0,
        last_tick_ns: 0,
        last_sweep_ns: 0,
        start_ns: None,
        dropped: Vec::new(),
    };
    e.stats.cut_at_end = read_capture(path, &mut |r| e.record(r))?;
    e.finish(path)
}

impl Engine<'_, '_> {
    fn record(&mut self, r: Record) {
        match r {
            Record::Packet {
                link,
                ts,
                orig_len,
                data,
            } => self.packet(link, ts, orig_len, data),
            Record::Untimed => {
                // No timestamp: a simple packet cannot be placed in time.
                self.stats.packets += 1;
                self.stats.not_ours += 1;
            }
            Record::BadTimestamp => {
                self.stats.packets += 1;
                self.stats.malformed += 1;
            }
        }
    }

    fn finish(mut self, path: &Path) -> Result<Analysis, AnalyzeError> {
        let s = &self.stats;
        if s.packets > 0 && s.unsupported_link.values().sum::<u64>() == s.packets {
            let found = s
                .unsupported_link
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            return Err(AnalyzeError::UnsupportedLink {
                path: path.to_path_buf(),
                found,
            });
        }
        // Time ends with the capture: unanswered retransmissions older than the
        // black-hole delay by then are black holes; newer ones stay open.
        let out = self.pipeline.tick(self.last_ns);
        self.absorb(out);
        let out = self.pipeline.conclude_held();
        self.absorb(out);
        self.stats.duplicates = self.replay.duplicates();
        // The capture ends before the next events that would prove the
        // last silences survived; the table knows when clients were heard.
        let flows = self.replay.flows();
        let out = self
            .pipeline
            .settle(self.last_ns, |k| flows.get(k).map(|f| f.last_in_ns));
        self.absorb(out);
        let report = self.pipeline.report();
        Ok(Analysis {
            capture: self.stats,
            verdicts: self.verdicts,
            report,
        })
    }
}

#[cfg(test)]
mod tests;
