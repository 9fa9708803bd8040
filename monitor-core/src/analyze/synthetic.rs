//! Synthetic captures of a busy ActiveSync server on port 443, as long as
//! asked, deterministic from a seed, written as they are generated (ten
//! million packets need no more memory than a hundred): many clients, short
//! HTTPS exchanges and long-lived Pings with idle gaps, closed by FINs and
//! RSTs from either side, some killed by a middlebox (an injected RST at its
//! idle timeout), some black-holed, a few vanishing without a close. For
//! proving that offline analysis runs in flat memory, and for tests that
//! need a realistic capture.

use std::{
    borrow::Cow,
    cmp::Reverse,
    collections::BinaryHeap,
    fs::File,
    io::{BufWriter, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use monitor_common::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};
use pcap_file::{
    pcapng::{
        blocks::{
            enhanced_packet::EnhancedPacketBlock,
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
        PcapNgWriter,
    },
    DataLink,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pcap,
    PcapNg,
}

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub seed: u64,
    /// Packets to write (the last connections are cut off there).
    pub packets: u64,
    /// Distinct client addresses (10.x.y.z; every fourth /24 is behind a
    /// middlebox that resets Pings idle for 240 s).
    pub clients: u32,
    /// Connections open at once.
    pub concurrent: u32,
    /// Bytes of each frame captured (the rest only counted, as tcpdump -s).
    pub snaplen: u32,
    pub format: Format,
}

impl Spec {
    /// A busy server: 20,000 clients, 4,000 connections at once, headers
    /// captured (snaplen 96), as pcap.
    pub fn busy(seed: u64, packets: u64) -> Spec {
        Spec {
            seed,
            packets,
            clients: 20_000,
            concurrent: 4_000,
            snaplen: 96,
            format: Format::Pcap,
        }
    }
}

/// What was written.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Written {
    pub packets: u64,
    /// Connections started.
    pub connections: u64,
    pub bytes: u64,
    /// From the first packet to the last (seconds).
    pub span_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
#[error("writing the synthetic capture {path}: {message}")]
pub struct SyntheticError {
    path: PathBuf,
    message: String,
}

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;
/// The capture's first packet: a plausible wall-clock time.
const EPOCH_NS: u64 = 1_700_000_000 * S;
const SERVER: [u8; 4] = [192, 0, 2, 1];
const SERVER_TTL: u8 = 64;
/// The TTL of a middlebox's injected RSTs: off every client's baseline.
const MIDDLEBOX_TTL: u8 = 250;
const MIDDLEBOX_IDLE_NS: u64 = 240 * S;

/// One packet of a connection's script.
#[derive(Clone, Copy, Debug)]
struct Pkt {
    at: u64,
    inbound: bool,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: u16,
    ttl: u8,
}

/// A connection being scripted: its endpoints and where each side's
/// sequence numbers are.
struct Conn {
    client: [u8; 4],
    port: u16,
    ttl: u8,
    cseq: u32,
    sseq: u32,
    t: u64,
}

impl Conn {
    fn push(&mut self, out: &mut Vec<Pkt>, dt: u64, inbound: bool, flags: u8, payload: u16) {
        self.t += dt;
        let (seq, ack) = if inbound {
            (self.cseq, self.sseq)
        } else {
            (self.sseq, self.cseq)
        };
        let ttl = if inbound { self.ttl } else { SERVER_TTL };
        out.push(Pkt {
            at: self.t,
            inbound,
            flags,
            seq,
            ack,
            payload,
            ttl,
        });
        let adv = u32::from(payload) + u32::from(flags & (TCP_SYN | TCP_FIN) != 0);
        if inbound {
            self.cseq = self.cseq.wrapping_add(adv);
        } else {
            self.sseq = self.sseq.wrapping_add(adv);
        }
    }

    fn handshake(&mut self, out: &mut Vec<Pkt>, rtt: u64) {
        self.push(out, 0, true, TCP_SYN, 0);
        self.push(out, rtt / 2, false, TCP_SYN | TCP_ACK, 0);
        self.push(out, rtt / 2, true, TCP_ACK, 0);
    }

    /// A close from one side, answered by the other, and the last ACK.
    fn fin(&mut self, out: &mut Vec<Pkt>, rtt: u64, client_first: bool) {
        self.push(out, MS, client_first, TCP_FIN | TCP_ACK, 0);
        self.push(out, rtt / 2, !client_first, TCP_FIN | TCP_ACK, 0);
        self.push(out, rtt / 2, client_first, TCP_ACK, 0);
    }
}

/// The generator's state: one script per concurrent connection, merged in
/// time order by a heap of (next packet time, slot).
struct Gen {
    spec: Spec,
    /// Seeded: the same capture for the same seed.
    rng: fastrand::Rng,
    scripts: Vec<(Vec<Pkt>, usize, [u8; 4], u16)>,
    ports: Vec<u16>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    connections: u64,
}

fn client_addr(c: u32) -> [u8; 4] {
    [10, (c >> 16) as u8, (c >> 8) as u8, c as u8]
}

/// Each client's heartbeat (what its device asks for), seconds.
fn heartbeat_of(c: u32) -> u64 {
    [120, 300, 480, 540, 900][(c % 5) as usize]
}

/// Every fourth /24 of clients is behind the resetting middlebox.
fn behind_middlebox(c: u32) -> bool {
    (c >> 8).is_multiple_of(4)
}

impl Gen {
    fn new(spec: Spec) -> Gen {
        Gen {
            spec,
            rng: fastrand::Rng::with_seed(spec.seed),
            scripts: (0..spec.concurrent)
                .map(|_| (Vec::new(), 0, [0; 4], 0))
                .collect(),
            ports: vec![0; spec.clients.max(1) as usize],
            heap: BinaryHeap::new(),
            connections: 0,
        }
    }

    /// Script a new connection in `slot`, starting after a pause from `now`.
    fn start(&mut self, slot: usize, now: u64) {
        let c = self.rng.u32(0..self.spec.clients.max(1));
        let n = &mut self.ports[c as usize];
        *n = n.wrapping_add(1);
        let mut conn = Conn {
            client: client_addr(c),
            port: 32768 + *n % 28_000,
            ttl: 40 + (c % 20) as u8,
            cseq: self.rng.u32(..),
            sseq: self.rng.u32(..),
            t: now + self.rng.u64(0..=30 * S),
        };
        let rtt = self.rng.u64(10..=200) * MS;
        let mut out = std::mem::take(&mut self.scripts[slot].0);
        out.clear();
        conn.handshake(&mut out, rtt);
        if self.rng.u64(0..1000) < 600 {
            self.short(&mut conn, &mut out, rtt);
        } else {
            self.pings(&mut conn, &mut out, rtt, c);
        }
        self.connections += 1;
        let first = out[0].at;
        self.scripts[slot] = (out, 0, conn.client, conn.port);
        self.heap.push(Reverse((first, slot)));
    }

    /// A few HTTPS requests and answers, then a close.
    fn short(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, rtt: u64) {
        for _ in 0..self.rng.u64(1..=3) {
            let think = self.rng.u64(10..=2000) * MS;
            c.push(
                out,
                think,
                true,
                TCP_PSH | TCP_ACK,
                self.rng.u64(200..=900) as u16,
            );
            let work = self.rng.u64(5..=50) * MS;
            c.push(
                out,
                rtt / 2 + work,
                false,
                TCP_PSH | TCP_ACK,
                self.rng.u64(300..=1400) as u16,
            );
            c.push(out, rtt / 2, true, TCP_ACK, 0);
        }
        self.close(c, out, rtt);
    }

    /// FIN from either side, RST from either side, or (rarely) nothing.
    fn close(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, rtt: u64) {
        match self.rng.u64(0..=999) {
            0..=549 => c.fin(out, rtt, true),
            550..=799 => c.fin(out, rtt, false),
            800..=899 => c.push(out, MS, true, TCP_RST | TCP_ACK, 0),
            900..=997 => c.push(out, MS, false, TCP_RST | TCP_ACK, 0),
            // The client vanishes: the flow stays until the table drops it.
            _ => {}
        }
    }

    /// Long-lived Pings: request, a heartbeat of silence, answer; then a
    /// close, a middlebox's reset at its idle timeout, or a black hole.
    fn pings(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, rtt: u64, client: u32) {
        let h = heartbeat_of(client) * S;
        for _ in 0..self.rng.u64(1..=6) {
            let pause = self.rng.u64(100..=1000) * MS;
            c.push(
                out,
                pause,
                true,
                TCP_PSH | TCP_ACK,
                self.rng.u64(400..=700) as u16,
            );
            c.push(out, rtt / 2, false, TCP_ACK, 0);
            if behind_middlebox(client) && h > MIDDLEBOX_IDLE_NS {
                c.t += MIDDLEBOX_IDLE_NS;
                c.ttl = MIDDLEBOX_TTL;
                c.push(out, 0, true, TCP_RST, 0);
                return;
            }
            if self.rng.u64(0..1000) < 20 {
                self.black_hole(c, out, h);
                return;
            }
            c.push(
                out,
                h,
                false,
                TCP_PSH | TCP_ACK,
                self.rng.u64(100..=300) as u16,
            );
            c.push(out, rtt / 2, true, TCP_ACK, 0);
        }
        self.close(c, out, rtt);
    }

    /// The server answers into the void, retransmits, and gives up.
    fn black_hole(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, h: u64) {
        let len = self.rng.u64(100..=300) as u16;
        let seq = c.sseq;
        c.push(out, h, false, TCP_PSH | TCP_ACK, len);
        for backoff in [1, 2, 4, 8] {
            c.sseq = seq;
            c.push(out, backoff * S, false, TCP_PSH | TCP_ACK, len);
        }
        c.push(out, 16 * S, false, TCP_RST | TCP_ACK, 0);
    }
}

/// Write a synthetic capture of `spec` to `path`.
pub fn write(path: &Path, spec: &Spec) -> Result<Written, SyntheticError> {
    let err = |e: &dyn std::fmt::Display| SyntheticError {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut sink = Sink::create(path, spec.format, spec.snaplen)?;
    let mut g = Gen::new(*spec);
    for slot in 0..spec.concurrent as usize {
        g.start(slot, EPOCH_NS);
    }
    let mut w = Written::default();
    let mut frame = Vec::with_capacity(1600);
    let mut first = None;
    while w.packets < spec.packets {
        let Some(Reverse((at, slot))) = g.heap.pop() else {
            break; // No connection at all (concurrent = 0).
        };
        let (script, next, client, port) = &mut g.scripts[slot];
        let p = script[*next];
        *next += 1;
        build_frame(&mut frame, *client, *port, &p);
        w.bytes += sink.packet(at, &frame).map_err(|e| err(&e))?;
        w.packets += 1;
        first.get_or_insert(at);
        w.span_seconds = (at - first.unwrap_or(at)) as f64 / S as f64;
        match script.get(*next) {
            Some(n) => g.heap.push(Reverse((n.at, slot))),
            None => g.start(slot, at),
        }
    }
    sink.finish().map_err(|e| err(&e))?;
    w.connections = g.connections;
    Ok(w)
}

/// Ethernet, IPv4 (checksummed), TCP (checksum left zero: the monitor never
/// reads it), and the payload's bytes (zeros; only their count matters).
fn build_frame(f: &mut Vec<u8>, client: [u8; 4], port: u16, p: &Pkt) {
    let (client, server) = (IpAddr::from(client), IpAddr::from(SERVER));
    let (src, dst, sport, dport) = if p.inbound {
        (client, server, port, 443)
    } else {
        (server, client, 443, port)
    };
    let seg = Segment {
        src,
        dst,
        sport,
        dport,
        seq: p.seq,
        ack: if p.flags & TCP_ACK != 0 { p.ack } else { 0 },
        flags: p.flags,
        window: 0xfaf0,
        ttl: p.ttl,
        ip_id: p.seq as u16,
        payload: p.payload,
    };
    build_segment(f, &seg);
}

/// One TCP segment as it crossed the wire: what a frame is built from.
/// Shared by every generator of captures (this one, [`crate::scenario`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// IPv4 only (IPv6 has none).
    pub ip_id: u16,
    /// Payload bytes (written as zeros: only their count matters).
    pub payload: u16,
}

/// Ethernet, IPv4 (checksummed) or IPv6, TCP (checksum left zero: the
/// monitor never reads it), and the payload. Mixed families fall back to
/// IPv4-mapped addresses in an IPv6 header.
pub(crate) fn build_segment(f: &mut Vec<u8>, s: &Segment) {
    f.clear();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
    match (s.src, s.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let ip_start = f.len();
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&(40 + s.payload).to_be_bytes());
            f.extend_from_slice(&s.ip_id.to_be_bytes());
            f.extend_from_slice(&[0x40, 0, s.ttl, 6, 0, 0]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            let sum = checksum(&f[ip_start..]);
            f[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
        }
        (src, dst) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(20 + s.payload).to_be_bytes());
            f.extend_from_slice(&[6, s.ttl]);
            f.extend_from_slice(&v6(src));
            f.extend_from_slice(&v6(dst));
        }
    }
    f.extend_from_slice(&s.sport.to_be_bytes());
    f.extend_from_slice(&s.dport.to_be_bytes());
    f.extend_from_slice(&s.seq.to_be_bytes());
    f.extend_from_slice(&s.ack.to_be_bytes());
    f.extend_from_slice(&[0x50, s.flags]);
    f.extend_from_slice(&s.window.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.resize(f.len() + usize::from(s.payload), 0);
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Where the packets go, in the format asked for.
pub(crate) enum Sink {
    Pcap(BufWriter<File>, u32),
    PcapNg(Box<PcapNgWriter<BufWriter<File>>>, u32),
}

impl Sink {
    /// A capture file at `path`, its header written.
    pub(crate) fn create(
        path: &Path,
        format: Format,
        snaplen: u32,
    ) -> Result<Sink, SyntheticError> {
        let err = |e: &dyn std::fmt::Display| SyntheticError {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = File::create(path).map_err(|e| err(&e))?;
        let w = BufWriter::with_capacity(1 << 20, file);
        Sink::new(w, format, snaplen).map_err(|e| err(&*e))
    }

    fn new(
        mut w: BufWriter<File>,
        format: Format,
        snaplen: u32,
    ) -> Result<Sink, Box<dyn std::error::Error>> {
        match format {
            Format::Pcap => {
                // Microsecond pcap, little-endian, Ethernet.
                let mut h = Vec::with_capacity(24);
                h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
                h.extend_from_slice(&2u16.to_le_bytes());
                h.extend_from_slice(&4u16.to_le_bytes());
                h.extend_from_slice(&[0; 8]);
                h.extend_from_slice(&snaplen.to_le_bytes());
                h.extend_from_slice(&1u32.to_le_bytes());
                w.write_all(&h)?;
                Ok(Sink::Pcap(w, snaplen))
            }
            Format::PcapNg => {
                let mut ng = PcapNgWriter::new(w)?;
                ng.write_pcapng_block(InterfaceDescriptionBlock {
                    linktype: DataLink::ETHERNET,
                    snaplen,
                    // Timestamps in nanoseconds (the default is microseconds).
                    options: vec![InterfaceDescriptionOption::IfTsResol(9)],
                })?;
                Ok(Sink::PcapNg(Box::new(ng), snaplen))
            }
        }
    }

    /// Write one frame seen at `at_ns`; the bytes it took.
    pub(crate) fn packet(
        &mut self,
        at_ns: u64,
        frame: &[u8],
    ) -> Result<u64, Box<dyn std::error::Error>> {
        match self {
            Sink::Pcap(w, snaplen) => {
                let cap = frame.len().min(*snaplen as usize);
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&((at_ns / S) as u32).to_le_bytes());
                h[4..8].copy_from_slice(&((at_ns % S / 1000) as u32).to_le_bytes());
                h[8..12].copy_from_slice(&(cap as u32).to_le_bytes());
                h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
                w.write_all(&h)?;
                w.write_all(&frame[..cap])?;
                Ok(16 + cap as u64)
            }
            Sink::PcapNg(w, snaplen) => {
                let cap = frame.len().min(*snaplen as usize);
                let n = w.write_pcapng_block(EnhancedPacketBlock {
                    interface_id: 0,
                    timestamp: Duration::from_nanos(at_ns),
                    original_len: frame.len() as u32,
                    data: Cow::Borrowed(&frame[..cap]),
                    options: vec![],
                })?;
                Ok(n as u64)
            }
        }
    }

    pub(crate) fn finish(self) -> Result<(), Box<dyn std::error::Error>> {
        let mut w = match self {
            Sink::Pcap(w, _) => w,
            Sink::PcapNg(w, _) => w.into_inner(),
        };
        w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_writes_the_same_bytes_and_another_seed_does_not() {
        let dir = std::env::temp_dir();
        let p = |n: &str| dir.join(format!("synthetic-{}-{n}.pcap", std::process::id()));
        let a = write(&p("a"), &Spec::busy(7, 5_000)).unwrap();
        let b = write(&p("b"), &Spec::busy(7, 5_000)).unwrap();
        write(&p("c"), &Spec::busy(8, 5_000)).unwrap();
        let read = |n| std::fs::read(p(n)).unwrap();
        assert_eq!(a.packets, 5_000);
        assert_eq!(a, b);
        assert_eq!(read("a"), read("b"));
        assert_ne!(read("a"), read("c"));
        assert_eq!(a.bytes + 24, read("a").len() as u64);
        for n in ["a", "b", "c"] {
            let _ = std::fs::remove_file(p(n));
        }
    }
}
