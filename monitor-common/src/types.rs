//! `#[repr(C)]` boundary types. Kernel and user space must agree on every byte:
//! explicit padding, no `bool`, and a size assertion beside each type.

use core::mem::size_of;

/// How many server ports one agent can track.
pub const MAX_PORTS: usize = 8;
/// Default number of flows the kernel table holds (overridable at load time).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
/// Default size of the half-open table: connections whose handshake has not
/// completed (a SYN flood fills this one, never the flow table).
pub const DEFAULT_HALF_OPEN_TABLE_SIZE: u32 = 65_536;
/// Ring buffer size for events, in bytes (a power of two and a page multiple).
pub const EVENT_RING_BYTES: u32 = 1 << 22;
/// Payload bytes of a plaintext client segment copied to user space: enough
/// for an ActiveSync request line, its headers and a Ping body.
pub const SAMPLE_BYTES: usize = 1024;
/// Client payload segments sampled per request (since the server last sent
/// payload): a request split over a few segments is read, a large upload is not.
pub const SAMPLES_PER_REQUEST: u8 = 3;
/// Server addresses or prefixes tap mode can be told (the server table's size).
pub const MAX_SERVER_PREFIXES: u32 = 256;
/// Default silence that makes an "idle gap" worth an event.
pub const DEFAULT_GAP_THRESHOLD_NS: u64 = 5_000_000_000;
/// "Never happened" for the `since_*` fields of an [`Event`].
pub const NEVER: u64 = u64::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// TCP flag bits as on the wire.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Settings the agent writes into the programs' read-only data at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Local (server) ports to track; only the first `port_count` are used.
    pub ports: [u16; MAX_PORTS],
    pub port_count: u32,
    /// Bit i set: `ports[i]` carries plaintext HTTP (behind a TLS-terminating
    /// load balancer), whose requests are sampled for ActiveSync Pings.
    pub plaintext_mask: u32,
    /// A packet after at least this much silence ends an idle gap (event).
    pub gap_threshold_ns: u64,
    /// Tap mode: 1 when only addresses in the server table are servers
    /// (two servers on one mirror stay apart); 0: any address.
    pub server_filter: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 40);

impl Config {
    pub const DEFAULT: Config = Config {
        ports: [443, 0, 0, 0, 0, 0, 0, 0],
        port_count: 1,
        plaintext_mask: 0,
        gap_threshold_ns: DEFAULT_GAP_THRESHOLD_NS,
        server_filter: 0,
        _pad: 0,
    };

    /// Where `port` is among the tracked local ports. Bounded loop: verifier friendly.
    #[inline(always)]
    pub fn port_index(&self, port: u16) -> Option<u32> {
        let mut i = 0;
        while i < MAX_PORTS {
            // Stop at the last configured port: an untracked port costs
            // `port_count` comparisons, not MAX_PORTS.
            if i as u32 >= self.port_count {
                return None;
            }
            if self.ports[i] == port {
                return Some(i as u32);
            }
            i += 1;
        }
        None
    }

    /// Is `port` one of the tracked local ports?
    #[inline(always)]
    pub fn tracks(&self, port: u16) -> bool {
        self.port_index(port).is_some()
    }

    /// Is the tracked port at `index` plaintext?
    #[inline(always)]
    pub fn plaintext_at(&self, index: u32) -> bool {
        index < MAX_PORTS as u32 && self.plaintext_mask & (1 << index) != 0
    }

    /// Is `port` a tracked plaintext port?
    #[inline(always)]
    pub fn plaintext(&self, port: u16) -> bool {
        self.port_index(port).is_some_and(|i| self.plaintext_at(i))
    }
}

/// The key of the tap mode's server table (an LPM trie): the family, then
/// the address, so IPv4 and IPv6 prefixes never match each other. The
/// prefix length counts the family's 8 bits.
pub type ServerKeyData = [u8; 17];

/// The server table key's data for `addr` of `family`.
#[inline(always)]
pub fn server_key_data(family: u8, addr: &[u8; 16]) -> ServerKeyData {
    let mut d = [0u8; 17];
    d[0] = family;
    let mut i = 0;
    while i < 16 {
        d[1 + i] = addr[i];
        i += 1;
    }
    d
}

/// Direction relative to the server this agent runs on.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to server (ingress, XDP).
    In = 0,
    /// Server to client (egress, TC).
    Out = 1,
}

impl Dir {
    pub fn from_u8(v: u8) -> Option<Dir> {
        match v {
            0 => Some(Dir::In),
            1 => Some(Dir::Out),
            _ => None,
        }
    }
}

/// A TCP flow, normalised so the server side is always `server_*`.
/// Aligned to 8 so the kernel builds and copies it in 8-byte words (at
/// alignment 2 every copy is 16-bit moves and a call to fill the padding).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// IPv4 addresses use the first 4 bytes; the rest are zero.
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    pub const ZERO: FlowKey = FlowKey {
        client_addr: [0; 16],
        server_addr: [0; 16],
        client_port: 0,
        server_port: 0,
        family: 0,
        _pad: [0; 3],
    };
}
const _: () = assert!(core::mem::align_of::<FlowKey>() == 8);

/// Bits of [`Flow::state`].
pub mod state {
    /// The server's next sequence number is known (we saw it send).
    pub const SEQ_KNOWN: u8 = 0x01;
    /// A FIN or RST was seen; the close event was emitted.
    pub const CLOSED: u8 = 0x02;
    /// A retransmission after client silence was reported; cleared when the client speaks.
    pub const RETRANS_REPORTED: u8 = 0x04;
    /// First packet seen was not a SYN: the flow predates the agent (or its table entry).
    pub const MIDSTREAM: u8 = 0x08;
    /// A client packet has been seen (the TTL baseline is valid).
    pub const CLIENT_SEEN: u8 = 0x10;
    /// An event of this flow was lost (ring buffer full): what user space
    /// knows of it is incomplete.
    pub const EVENT_LOST: u8 = 0x20;
}

/// Per-flow state kept in the kernel's LRU table. Times are CLOCK_MONOTONIC ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub first_seen_ns: u64,
    /// Last packet from the client (0: none yet).
    pub last_in_ns: u64,
    /// Last packet from the server (0: none yet).
    pub last_out_ns: u64,
    /// Last packet carrying payload, either direction (0: none yet).
    pub last_payload_ns: u64,
    /// Longest silence (no packet either way) seen so far.
    pub max_gap_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pkts_in: u32,
    pub pkts_out: u32,
    /// Highest sequence number the server has sent, plus one (valid with SEQ_KNOWN).
    pub server_seq_next: u32,
    /// The client's last IP ID and window: the baseline an injected RST is compared with.
    pub client_ip_id: u16,
    pub client_window: u16,
    /// Client IP TTL / hop-limit baseline, RSTs excluded (valid with CLIENT_SEEN).
    pub ttl_min: u8,
    pub ttl_max: u8,
    /// TCP flags ever seen in each direction (OR of all).
    pub flags_in: u8,
    pub flags_out: u8,
    /// Direction of the last payload ([`Dir`] as u8; 0xff: none yet).
    pub last_payload_dir: u8,
    /// Bits from [`state`].
    pub state: u8,
    /// Client payload segments since the server last sent payload (saturating).
    pub req_segments: u8,
    /// RSTs arriving from the client's side (saturating): a second one is a burst.
    pub rsts_in: u8,
    /// The client's next sequence number: the end of its furthest non-RST
    /// segment (valid with CLIENT_SEEN). An RST the client's stack sends
    /// carries it; one whose number is elsewhere races the client's data.
    pub client_seq_next: u32,
    /// The first client-side RST's sequence number (valid with `rsts_in` > 0).
    pub first_rst_seq: u32,
    /// Tap mode: the last two packets' [`crate::flow::packet_sig`], to count
    /// a mirror's second copy once (copies of a burst may interleave:
    /// A, B, A', B').
    pub last_sig: u32,
    pub prev_sig: u32,
}
const _: () = assert!(size_of::<Flow>() == 96);

/// What an [`Event`] reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A flow was established (handshake completed, or both sides seen) and
    /// entered the flow table.
    Opened = 1,
    /// A packet ended a silence of at least the gap threshold.
    GapEnded = 2,
    /// The server retransmitted while the client had been silent for at least the threshold.
    Retransmit = 3,
    /// The client spoke again after a reported retransmission.
    RetransAnswered = 4,
    /// First FIN or RST of the flow.
    Closed = 5,
    /// A second RST from the client's side after the flow closed: reported
    /// once per flow (a burst of resets is an injector's mark when their
    /// sequence numbers differ).
    ResetAgain = 6,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::Opened),
            2 => Some(EventKind::GapEnded),
            3 => Some(EventKind::Retransmit),
            4 => Some(EventKind::RetransAnswered),
            5 => Some(EventKind::Closed),
            6 => Some(EventKind::ResetAgain),
            _ => None,
        }
    }
}

/// One event from the kernel. Values describe the flow *before* the packet
/// that caused the event, plus that packet's own header fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub key: FlowKey,
    /// When the packet was seen (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    pub first_seen_ns: u64,
    /// Silence in both directions before this packet.
    pub silence_ns: u64,
    /// Time since the client's last packet ([`NEVER`]: none).
    pub since_client_ns: u64,
    /// Time since the server's last packet ([`NEVER`]: none).
    pub since_server_ns: u64,
    /// Time since the last payload either way ([`NEVER`]: none).
    pub since_payload_ns: u64,
    pub max_gap_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pkts_in: u32,
    pub pkts_out: u32,
    /// TCP payload bytes of this packet.
    pub payload_len: u32,
    /// This packet's IP ID (IPv4; 0 for IPv6) and TCP window.
    pub ip_id: u16,
    pub window: u16,
    /// The client's last IP ID and window before this packet.
    pub base_ip_id: u16,
    pub base_window: u16,
    pub kind: u8,
    pub dir: u8,
    pub tcp_flags: u8,
    /// This packet's IP TTL / hop limit.
    pub ttl: u8,
    /// Client TTL baseline before this packet (valid if `flow_state` has CLIENT_SEEN).
    pub ttl_min: u8,
    pub ttl_max: u8,
    pub last_payload_dir: u8,
    pub flow_state: u8,
    /// This packet's TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
    /// The client's next sequence number before this packet (valid with
    /// CLIENT_SEEN), and the server's (valid with SEQ_KNOWN): an RST is
    /// held against them.
    pub client_seq_next: u32,
    pub server_seq_next: u32,
    /// The flow's first client-side RST's sequence number (for [`EventKind::ResetAgain`]).
    pub first_rst_seq: u32,
}
const _: () = assert!(size_of::<Event>() == 160);

impl Event {
    pub const fn zeroed() -> Event {
        Event {
            key: FlowKey::ZERO,
            ts_ns: 0,
            first_seen_ns: 0,
            silence_ns: 0,
            since_client_ns: 0,
            since_server_ns: 0,
            since_payload_ns: 0,
            max_gap_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            pkts_in: 0,
            pkts_out: 0,
            payload_len: 0,
            ip_id: 0,
            window: 0,
            base_ip_id: 0,
            base_window: 0,
            kind: 0,
            dir: 0,
            tcp_flags: 0,
            ttl: 0,
            ttl_min: 0,
            ttl_max: 0,
            last_payload_dir: 0,
            flow_state: 0,
            seq: 0,
            ack: 0,
            client_seq_next: 0,
            server_seq_next: 0,
            first_rst_seq: 0,
        }
    }
}

/// The first bytes of a client payload segment on a plaintext port, for
/// user space to read ActiveSync requests from. A separate record type in the
/// same ring buffer as [`Event`] (told apart by size), so it stays in order
/// with the flow's events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub key: FlowKey,
    pub ts_ns: u64,
    /// TCP sequence number of the segment's first payload byte.
    pub seq: u32,
    /// Payload bytes of the segment, as the headers state.
    pub payload_len: u32,
    /// Bytes copied into `data` (at most [`SAMPLE_BYTES`]).
    pub captured: u32,
    pub _pad: u32,
    pub data: [u8; SAMPLE_BYTES],
}
const _: () = assert!(size_of::<Sample>() == 1088);
const _: () = assert!(size_of::<Sample>() != size_of::<Event>());

/// Indices into the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets the first pass could not settle, parsed in full (a VLAN tag,
    /// IPv6 extension headers, short or malformed headers; every packet of
    /// the by-port programs: mirror port, router, proxy host). The common frames count nothing here: a counter update on
    /// every packet was much of their cost.
    FullParses = 0,
    /// Packets of tracked flows (TCP, tracked local port).
    PacketsTracked = 1,
    /// IP/TCP packets too short or malformed to parse (passed untouched).
    ParseFailures = 2,
    /// Flow table inserts the kernel refused (either table).
    FlowInsertFailed = 3,
    /// Events lost because the ring buffer was full.
    EventsDropped = 4,
    /// Flows established and entered into the flow table.
    FlowsCreated = 5,
    /// Events written to the ring buffer.
    EventsSent = 6,
    /// Plaintext request segments copied to user space.
    SamplesSent = 7,
    /// Plaintext request segments not copied (ring buffer full, copy failed).
    SamplesDropped = 8,
    /// Connections entered into the half-open table (first packet seen).
    HalfOpenCreated = 9,
    /// Tap mode: second copies of a packet (a mirror of both switch ports),
    /// passed over.
    Duplicates = 10,
}

impl Counter {
    pub const COUNT: u32 = 11;
    pub const ALL: [Counter; 11] = [
        Counter::FullParses,
        Counter::PacketsTracked,
        Counter::ParseFailures,
        Counter::FlowInsertFailed,
        Counter::EventsDropped,
        Counter::FlowsCreated,
        Counter::EventsSent,
        Counter::SamplesSent,
        Counter::SamplesDropped,
        Counter::HalfOpenCreated,
        Counter::Duplicates,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::FullParses => "full_parses",
            Counter::PacketsTracked => "packets_tracked",
            Counter::ParseFailures => "parse_failures",
            Counter::FlowInsertFailed => "flow_insert_failed",
            Counter::EventsDropped => "events_dropped",
            Counter::FlowsCreated => "flows_created",
            Counter::EventsSent => "events_sent",
            Counter::SamplesSent => "samples_sent",
            Counter::SamplesDropped => "samples_dropped",
            Counter::HalfOpenCreated => "half_open_created",
            Counter::Duplicates => "duplicates",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Sample {}
}
