//! Kernel events decoded for user space: addresses as `SocketAddr`, times as
//! `Duration`, "never" as `None`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use monitor_common::{
    Dir, Event, EventKind, FlowKey, Sample, FAMILY_V4, NEVER, SAMPLE_BYTES, TCP_ACK, TCP_FIN,
    TCP_PSH, TCP_RST, TCP_SYN,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("decoding a ring buffer record: {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("decoding a ring buffer record: unknown event kind {0}")]
    Kind(u8),
    #[error("decoding a ring buffer record: unknown direction {0}")]
    Dir(u8),
    #[error("decoding a request sample: {captured} bytes captured, at most {SAMPLE_BYTES}")]
    Captured { captured: u32 },
}

/// The first bytes of a plaintext client request segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadSample {
    pub key: FlowKey,
    pub ts_ns: u64,
    pub seq: u32,
    pub payload_len: u32,
    pub data: Vec<u8>,
}

impl PayloadSample {
    pub fn from_sample(raw: &Sample) -> Result<Self, DecodeError> {
        let n = raw.captured as usize;
        if n > SAMPLE_BYTES || raw.captured > raw.payload_len {
            return Err(DecodeError::Captured {
                captured: raw.captured,
            });
        }
        Ok(PayloadSample {
            key: raw.key,
            ts_ns: raw.ts_ns,
            seq: raw.seq,
            payload_len: raw.payload_len,
            data: raw.data[..n].to_vec(),
        })
    }
}

/// One ring buffer record: an event, or a request sample (told apart by size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Event(FlowEvent),
    Sample(PayloadSample),
}

impl Record {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() == std::mem::size_of::<Sample>() {
            // SAFETY: length checked; Sample is plain old data valid for any bits.
            let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Sample) };
            return PayloadSample::from_sample(&raw).map(Record::Sample);
        }
        FlowEvent::decode(bytes).map(Record::Event)
    }
}

/// One event from the kernel, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub raw: Event,
    pub kind: EventKind,
    pub dir: Dir,
}

pub fn key_addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

pub fn client_of(key: &FlowKey) -> SocketAddr {
    SocketAddr::new(key_addr(key.family, &key.client_addr), key.client_port)
}

pub fn server_of(key: &FlowKey) -> SocketAddr {
    SocketAddr::new(key_addr(key.family, &key.server_addr), key.server_port)
}

fn opt(ns: u64) -> Option<Duration> {
    (ns != NEVER).then(|| Duration::from_nanos(ns))
}

pub fn flag_names(flags: u8) -> String {
    let mut s = String::new();
    for (bit, name) in [
        (TCP_SYN, "S"),
        (TCP_FIN, "F"),
        (TCP_RST, "R"),
        (TCP_PSH, "P"),
        (TCP_ACK, "."),
    ] {
        if flags & bit != 0 {
            s.push_str(name);
        }
    }
    s
}

impl FlowEvent {
    pub fn from_event(raw: Event) -> Result<Self, DecodeError> {
        let kind = EventKind::from_u8(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
        let dir = Dir::from_u8(raw.dir).ok_or(DecodeError::Dir(raw.dir))?;
        Ok(FlowEvent { raw, kind, dir })
    }

    /// Decode a ring buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let expected = std::mem::size_of::<Event>();
        if bytes.len() != expected {
            return Err(DecodeError::Size {
                got: bytes.len(),
                expected,
            });
        }
        // SAFETY: length checked; Event is plain old data valid for any bits.
        let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Event) };
        Self::from_event(raw)
    }

    pub fn client(&self) -> SocketAddr {
        client_of(&self.raw.key)
    }
    pub fn server(&self) -> SocketAddr {
        server_of(&self.raw.key)
    }
    /// Silence in both directions before the packet.
    pub fn silence(&self) -> Duration {
        Duration::from_nanos(self.raw.silence_ns)
    }
    pub fn since_client(&self) -> Option<Duration> {
        opt(self.raw.since_client_ns)
    }
    pub fn since_server(&self) -> Option<Duration> {
        opt(self.raw.since_server_ns)
    }
    pub fn since_payload(&self) -> Option<Duration> {
        opt(self.raw.since_payload_ns)
    }
    pub fn is_rst(&self) -> bool {
        self.raw.tcp_flags & TCP_RST != 0
    }
    pub fn is_fin(&self) -> bool {
        self.raw.tcp_flags & TCP_FIN != 0
    }
    pub fn has_payload(&self) -> bool {
        self.raw.payload_len > 0
    }
    /// The server's keepalive (or zero-window) probe: an empty segment
    /// behind what it has sent (see [`monitor_common::flow::is_probe`]).
    /// Only the first of a run is reported as one (`Retransmit`); the
    /// repeats end gaps of their own.
    pub fn is_probe(&self) -> bool {
        let r = &self.raw;
        self.dir == Dir::Out
            && r.payload_len == 0
            && r.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
            && r.flow_state & monitor_common::state::SEQ_KNOWN != 0
            && monitor_common::flow::seq_after(r.server_seq_next, r.seq)
    }
    /// The client's TTL baseline (min, max), if a client packet was seen.
    pub fn ttl_baseline(&self) -> Option<(u8, u8)> {
        (self.raw.flow_state & monitor_common::state::CLIENT_SEEN != 0)
            .then_some((self.raw.ttl_min, self.raw.ttl_max))
    }
}

fn side(dir: Dir) -> &'static str {
    match dir {
        Dir::In => "client",
        Dir::Out => "server",
    }
}

impl fmt::Display for FlowEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.raw;
        write!(f, "{} -> {} ", self.client(), self.server())?;
        match self.kind {
            EventKind::Opened => write!(
                f,
                "opened by {} [{}]",
                side(self.dir),
                flag_names(r.tcp_flags)
            ),
            EventKind::GapEnded => write!(
                f,
                "idle gap of {:.3}s ended by {} ({} payload bytes)",
                self.silence().as_secs_f64(),
                side(self.dir),
                r.payload_len
            ),
            EventKind::Retransmit => write!(
                f,
                "server retransmission after {:.3}s of client silence",
                self.since_client().unwrap_or_default().as_secs_f64()
            ),
            EventKind::RetransAnswered => write!(f, "client answered after a retransmission"),
            EventKind::Closed => {
                write!(
                    f,
                    "closed by {} {} after {:.3}s of silence",
                    side(self.dir),
                    if self.is_rst() { "RST" } else { "FIN" },
                    self.silence().as_secs_f64()
                )?;
                if self.dir == Dir::In && self.is_rst() {
                    match self.ttl_baseline() {
                        Some((lo, hi)) => {
                            write!(f, ", ttl {} (client baseline {lo}..{hi})", r.ttl)?
                        }
                        None => write!(f, ", ttl {} (no client baseline)", r.ttl)?,
                    }
                    write!(
                        f,
                        ", ip id {} window {} seq {} (client's next {}) ack {}",
                        r.ip_id, r.window, r.seq, r.client_seq_next, r.ack
                    )?;
                    if let Some(s) = self.since_server() {
                        write!(f, ", {:.3}s after the server's last send", s.as_secs_f64())?;
                    }
                }
                Ok(())
            }
            EventKind::ResetAgain => write!(
                f,
                "another client-side RST {:.6}s after the first, seq {} (the first's {})",
                self.since_client().unwrap_or_default().as_secs_f64(),
                r.seq,
                r.first_rst_seq
            ),
        }
    }
}
