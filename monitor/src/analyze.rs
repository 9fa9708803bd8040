//! `monitor analyze`: the same state machine (`monitor-common`) and the same
//! detector over a capture file, with packet timestamps as the clock. For
//! administrators who cannot load eBPF on the mail server but can capture on
//! a firewall or a SPAN port.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufReader, Read},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use monitor_common::{
    parse::parse_ip, parse_ethernet, Config, Dir, Packet, ParseError, MAX_PORTS, TCP_ACK, TCP_SYN,
};
use pcap_file::{
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
    DataLink, TsResolution,
};
use serde::Serialize;

use crate::{
    detector::{report::Report, Detector, DetectorConfig, Output, Verdict},
    event::key_addr,
    replay::Replay,
};

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
    /// Only packets from this many seconds after the first one...
    pub from: Option<f64>,
    /// ...to this many.
    pub to: Option<f64>,
    pub gap_threshold: Duration,
    pub detector: DetectorConfig,
}

/// What was read, and what could not be used, so nothing is silently lost.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
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
}

#[derive(Debug, Serialize)]
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

struct Engine<'a> {
    opts: &'a AnalyzeOptions,
    replay: Replay,
    detector: Detector,
    requests: crate::ping::Reader,
    stats: CaptureStats,
    verdicts: Vec<Verdict>,
    last_ns: u64,
    last_tick_ns: u64,
    start_ns: Option<u64>,
}

impl Engine<'_> {
    fn absorb(&mut self, out: Vec<Output>) {
        for o in out {
            if let Output::Verdict(v) = o {
                self.verdicts.push(v);
            }
        }
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
        if ns.saturating_sub(self.last_tick_ns) >= 1_000_000_000 {
            self.last_tick_ns = ns;
            let out = self.detector.tick(ns);
            self.absorb(out);
        }
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
        let (ev, sample) = self.replay.packet_with_payload(&pkt, dir, ns, data);
        if let Some(s) = sample {
            self.requests.feed(&s, &mut self.detector);
        }
        for ev in ev {
            let out = self.detector.ingest(&ev);
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

/// One record of a capture file.
enum Record<'a> {
    Packet {
        link: DataLink,
        ts: Duration,
        orig_len: u32,
        data: &'a [u8],
    },
    /// A pcapng simple packet block: no timestamp.
    Untimed,
    /// A timestamp whose fraction is out of range.
    BadTimestamp,
}

/// Hand every record of a pcap or pcapng file to `f`.
fn read_capture(path: &Path, f: &mut dyn FnMut(Record)) -> Result<(), AnalyzeError> {
    let open = |p: &Path| {
        File::open(p)
            .map(BufReader::new)
            .map_err(|source| AnalyzeError::Open {
                path: p.to_path_buf(),
                source,
            })
    };
    let mut magic = [0u8; 4];
    open(path)?
        .read_exact(&mut magic)
        .map_err(|e| format_err(path, format!("too short for a capture: {e}")))?;
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut r = PcapNgReader::new(open(path)?).map_err(|e| format_err(path, e))?;
        // Each interface block gives the link type of the packets that name it.
        let mut links: Vec<DataLink> = Vec::new();
        while let Some(block) = r.next_block() {
            let block = block.map_err(|e| format_err(path, e))?;
            match block {
                Block::InterfaceDescription(i) => links.push(i.linktype),
                Block::EnhancedPacket(p) => {
                    let link = links
                        .get(p.interface_id as usize)
                        .copied()
                        .unwrap_or(DataLink::Unknown(u32::MAX));
                    f(Record::Packet {
                        link,
                        ts: p.timestamp,
                        orig_len: p.original_len,
                        data: &p.data,
                    });
                }
                Block::SimplePacket(_) => f(Record::Untimed),
                _ => {}
            }
        }
    } else {
        let mut r = PcapReader::new(open(path)?).map_err(|e| format_err(path, e))?;
        let header = r.header();
        let link = header.datalink;
        let nanos = header.ts_resolution == TsResolution::NanoSecond;
        // Raw records: pcap-file 2.0 rejects packets longer on the wire than
        // the snaplen, which is exactly what a snaplen-limited capture holds.
        while let Some(p) = r.next_raw_packet() {
            let p = p.map_err(|e| format_err(path, e))?;
            let frac_ns = if nanos {
                u64::from(p.ts_frac)
            } else {
                u64::from(p.ts_frac) * 1000
            };
            if frac_ns >= 1_000_000_000 {
                f(Record::BadTimestamp);
                continue;
            }
            f(Record::Packet {
                link,
                ts: Duration::new(u64::from(p.ts_sec), frac_ns as u32),
                orig_len: p.orig_len,
                data: &p.data,
            });
        }
    }
    Ok(())
}

/// The server ports of a capture: where its connection-opening SYNs went
/// (clients' ports only ever receive SYN-ACKs). Most used first, at most
/// [`MAX_PORTS`]; with no SYN at all, none.
pub fn infer_server_ports(path: &Path) -> Result<Vec<(u16, u64)>, AnalyzeError> {
    let mut syns: BTreeMap<u16, u64> = BTreeMap::new();
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

/// Analyze a pcap or pcapng file.
pub fn analyze(path: &Path, opts: &AnalyzeOptions) -> Result<Analysis, AnalyzeError> {
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
    let opts = &opts;
    if opts.ports.len() > MAX_PORTS || opts.ports.contains(&0) {
        return Err(AnalyzeError::Options(format!(
            "1 to {MAX_PORTS} non-zero ports, got {:?}",
            opts.ports
        )));
    }
    let detector =
        Detector::new(opts.detector.clone()).map_err(|e| AnalyzeError::Options(e.to_string()))?;
    let mut kcfg = Config::DEFAULT;
    kcfg.ports = [0; MAX_PORTS];
    kcfg.ports[..opts.ports.len()].copy_from_slice(&opts.ports);
    kcfg.port_count = opts.ports.len() as u32;
    for (i, p) in opts.ports.iter().enumerate() {
        if opts.plaintext_ports.contains(p) {
            kcfg.plaintext_mask |= 1 << i;
        }
    }
    kcfg.gap_threshold_ns = opts.gap_threshold.as_nanos() as u64;
    let mut e = Engine {
        opts,
        replay: Replay::new(kcfg),
        detector,
        requests: crate::ping::Reader::new(),
        stats: CaptureStats {
            server_ports: opts.ports.clone(),
            inferred_ports: inferred,
            ..CaptureStats::default()
        },
        verdicts: Vec::new(),
        last_ns: 0,
        last_tick_ns: 0,
        start_ns: None,
    };
    read_capture(path, &mut |r| match r {
        Record::Packet {
            link,
            ts,
            orig_len,
            data,
        } => e.packet(link, ts, orig_len, data),
        Record::Untimed => {
            // No timestamp: a simple packet cannot be placed in time.
            e.stats.packets += 1;
            e.stats.not_ours += 1;
        }
        Record::BadTimestamp => {
            e.stats.packets += 1;
            e.stats.malformed += 1;
        }
    })?;
    if e.stats.packets > 0 && e.stats.unsupported_link.values().sum::<u64>() == e.stats.packets {
        let found = e
            .stats
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
    let out = e.detector.tick(e.last_ns);
    e.absorb(out);
    let report = e.detector.report();
    Ok(Analysis {
        capture: e.stats,
        verdicts: e.verdicts,
        report,
    })
}

impl CaptureStats {
    /// One paragraph on what was read and what was not.
    pub fn summary(&self) -> String {
        let span = match (self.first_seconds, self.last_seconds) {
            (Some(a), Some(b)) => format!("{:.1} s", b - a),
            _ => "no time".into(),
        };
        let mut s = format!(
            "capture: {} packets over {span}; {} tracked, {} not ours",
            self.packets, self.tracked, self.not_ours
        );
        if let Some(found) = &self.inferred_ports {
            let list: Vec<String> = found
                .iter()
                .map(|(p, n)| format!("{p} ({n} SYNs)"))
                .collect();
            s.push_str(&format!(
                "; server ports inferred from SYNs: {}",
                list.join(", ")
            ));
        }
        if self.cut_by_snaplen > 0 {
            s.push_str(&format!(
                ", {} cut by snaplen (headers whole, used)",
                self.cut_by_snaplen
            ));
        }
        if self.truncated > 0 {
            s.push_str(&format!(
                ", {} with headers cut short (skipped)",
                self.truncated
            ));
        }
        if self.malformed > 0 {
            s.push_str(&format!(", {} malformed (skipped)", self.malformed));
        }
        if self.out_of_order > 0 {
            s.push_str(&format!(
                ", {} with timestamps going backwards (clamped: gaps near them are approximate)",
                self.out_of_order
            ));
        }
        for (link, n) in &self.unsupported_link {
            s.push_str(&format!(", {n} of unsupported link type {link} (skipped)"));
        }
        s
    }
}

#[cfg(test)]
mod tests;
