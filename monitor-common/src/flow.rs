//! The flow state machine: what one packet means for one flow. Plain functions
//! over the boundary types, called by the eBPF programs per packet, by the
//! offline analyzer per captured packet, and by host tests.

use crate::parse::Packet;
use crate::types::{
    state, Config, Dir, Event, EventKind, Flow, FlowKey, NEVER, SAMPLES_PER_REQUEST, TCP_ACK,
    TCP_FIN, TCP_RST, TCP_SYN,
};

/// The flow key for `pkt` seen in direction `dir` (server side normalised).
#[inline(always)]
pub fn flow_key(pkt: &Packet, dir: Dir) -> FlowKey {
    let (client_addr, server_addr, client_port, server_port) = match dir {
        Dir::In => (pkt.src_addr, pkt.dst_addr, pkt.src_port, pkt.dst_port),
        Dir::Out => (pkt.dst_addr, pkt.src_addr, pkt.dst_port, pkt.src_port),
    };
    // From zero, then the fields: the padding then joins the zero words
    // (built field by field, its 3 bytes are a call to memset).
    let mut key = FlowKey::ZERO;
    key.client_addr = client_addr;
    key.server_addr = server_addr;
    key.client_port = client_port;
    key.server_port = server_port;
    key.family = pkt.family;
    key
}

/// Tap mode (a mirror port, both directions arriving on one interface): the
/// packet's direction from which side carries a tracked server port, and,
/// with a server table, a server address (`is_server`). The destination is
/// tried first: between two tracked ports, the packet goes to the server.
#[inline(always)]
pub fn tap_direction(
    cfg: &Config,
    pkt: &Packet,
    is_server: impl Fn(&[u8; 16]) -> bool,
) -> Option<Dir> {
    if cfg.tracks(pkt.dst_port) && is_server(&pkt.dst_addr) {
        Some(Dir::In)
    } else if cfg.tracks(pkt.src_port) && is_server(&pkt.src_addr) {
        Some(Dir::Out)
    } else {
        None
    }
}

/// Copies of one packet arrive within this of each other (a switch
/// mirroring both of its ports); a stack's own retransmission comes an RTO
/// (200 ms or more) later.
pub const DUPLICATE_WINDOW_NS: u64 = 2_000_000;

/// What tells one packet of a flow from another: its numbers, flags,
/// window, IP ID and length, and (lowest bit) its direction.
#[inline(always)]
pub fn packet_sig(pkt: &Packet, dir: Dir) -> u32 {
    let h = pkt.seq
        ^ pkt.ack.rotate_left(11)
        ^ pkt.payload_len.rotate_left(22)
        ^ ((pkt.window as u32) << 16 | pkt.ip_id as u32).rotate_left(5)
        // Clear of the direction's bit: FIN is flag bit 0, and a FIN right
        // after an ACK with the same numbers is no copy of it.
        ^ (pkt.tcp_flags as u32) << 1;
    (h & !1) | dir as u32
}

/// Is `sig` a second copy of one of the flow's last two packets, seen
/// just before?
#[inline(always)]
pub fn is_duplicate(flow: &Flow, sig: u32, dir: Dir, now: u64) -> bool {
    let last = match dir {
        Dir::In => flow.last_in_ns,
        Dir::Out => flow.last_out_ns,
    };
    (flow.last_sig == sig || flow.prev_sig == sig)
        && last != 0
        && now.saturating_sub(last) < DUPLICATE_WINDOW_NS
}

/// Remember `sig` as the flow's last packet's.
#[inline(always)]
pub fn remember_sig(flow: &mut Flow, sig: u32) {
    flow.prev_sig = flow.last_sig;
    flow.last_sig = sig;
}

/// Should a packet for an unknown flow create a table entry? Not a lone RST or
/// FIN: that would fill the table with flows that are already over.
#[inline(always)]
pub fn opens_flow(pkt: &Packet) -> bool {
    pkt.tcp_flags & (TCP_RST | TCP_FIN) == 0
}

/// A new, empty flow first seen at `now`. Apply its first packet with
/// [`update`] (after [`classify`] said [`EventKind::Opened`]).
#[inline(always)]
pub fn new_flow(pkt: &Packet, dir: Dir, now: u64) -> Flow {
    let mut flow = Flow {
        first_seen_ns: now,
        last_payload_dir: 0xff,
        ..Flow::default()
    };
    // A connection starts with the client's SYN; anything else means we joined late.
    let handshake = dir == Dir::In && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !handshake {
        flow.state |= state::MIDSTREAM;
    }
    flow
}

/// A fresh SYN on a closed 4-tuple: a new connection reusing the ports.
#[inline(always)]
fn reopens(flow: &Flow, pkt: &Packet, dir: Dir) -> bool {
    flow.state & state::CLOSED != 0
        && dir == Dir::In
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn since(now: u64, then: u64) -> u64 {
    if then == 0 {
        NEVER
    } else {
        now.saturating_sub(then)
    }
}

#[inline(always)]
fn silence(flow: &Flow, now: u64) -> u64 {
    let last_any = if flow.last_in_ns > flow.last_out_ns {
        flow.last_in_ns
    } else {
        flow.last_out_ns
    };
    if last_any == 0 {
        0
    } else {
        now.saturating_sub(last_any)
    }
}

/// Is sequence number `a` after `b`, modulo 2^32?
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A keepalive (or zero-window) probe: an empty segment behind what the
/// server has sent (Linux's: one byte behind), which only an answer from
/// the client's end acknowledges. (A pure ACK or window update carries the
/// next number; [`classify`] also requires it to be behind, not ahead.)
#[inline(always)]
pub fn is_probe(flow: &Flow, pkt: &Packet) -> bool {
    pkt.payload_len == 0 && pkt.tcp_flags & TCP_SYN == 0 && pkt.seq != flow.server_seq_next
}

/// What `pkt` means for `flow`, before any change: at most one event kind.
/// Most packets mean nothing worth an event (events are for silences and
/// endings, not per packet).
#[inline(always)]
pub fn classify(
    flow: &Flow,
    pkt: &Packet,
    dir: Dir,
    now: u64,
    gap_threshold_ns: u64,
) -> Option<EventKind> {
    if reopens(flow, pkt, dir) {
        return Some(EventKind::Opened);
    }
    let flags = pkt.tcp_flags;
    if flow.state & state::CLOSED != 0 {
        // Only the second client-side RST: one event per flow at most.
        let again = dir == Dir::In && flags & TCP_RST != 0 && flow.rsts_in == 1;
        return again.then_some(EventKind::ResetAgain);
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        return Some(EventKind::Closed);
    }
    if dir == Dir::Out
        && flow.state & (state::SEQ_KNOWN | state::RETRANS_REPORTED) == state::SEQ_KNOWN
        && (pkt.payload_len > 0 || is_probe(flow, pkt))
        && !seq_after(pkt.seq.wrapping_add(pkt.payload_len), flow.server_seq_next)
        && flow.last_in_ns != 0
        && now.saturating_sub(flow.last_in_ns) >= gap_threshold_ns
    {
        // Data already sent, sent again, to a client silent for a while: the
        // server's answer may be falling into a black hole. Or a keepalive
        // probe: it asks the silent client for an answer just the same.
        return Some(EventKind::Retransmit);
    }
    if dir == Dir::In && flow.state & state::RETRANS_REPORTED != 0 {
        return Some(EventKind::RetransAnswered);
    }
    let gap = silence(flow, now);
    if gap != 0 && gap >= gap_threshold_ns {
        return Some(EventKind::GapEnded);
    }
    None
}

/// Write the event for `pkt` into `ev` (in the kernel: straight into the ring
/// buffer slot), with the flow as it was *before* the packet.
#[inline(always)]
pub fn fill_event(
    ev: &mut Event,
    kind: EventKind,
    key: &FlowKey,
    f: &Flow,
    pkt: &Packet,
    dir: Dir,
    now: u64,
) {
    ev.key = *key;
    ev.ts_ns = now;
    ev.first_seen_ns = f.first_seen_ns;
    ev.silence_ns = silence(f, now);
    ev.since_client_ns = since(now, f.last_in_ns);
    ev.since_server_ns = since(now, f.last_out_ns);
    ev.since_payload_ns = since(now, f.last_payload_ns);
    ev.max_gap_ns = f.max_gap_ns;
    ev.bytes_in = f.bytes_in;
    ev.bytes_out = f.bytes_out;
    ev.pkts_in = f.pkts_in;
    ev.pkts_out = f.pkts_out;
    ev.payload_len = pkt.payload_len;
    ev.ip_id = pkt.ip_id;
    ev.window = pkt.window;
    ev.base_ip_id = f.client_ip_id;
    ev.base_window = f.client_window;
    ev.kind = kind as u8;
    ev.dir = dir as u8;
    ev.tcp_flags = pkt.tcp_flags;
    ev.ttl = pkt.ttl;
    ev.ttl_min = f.ttl_min;
    ev.ttl_max = f.ttl_max;
    ev.last_payload_dir = f.last_payload_dir;
    ev.flow_state = f.state;
    ev.seq = pkt.seq;
    ev.ack = pkt.ack;
    ev.client_seq_next = f.client_seq_next;
    ev.server_seq_next = f.server_seq_next;
    ev.first_rst_seq = f.first_rst_seq;
}

/// Has this half-open connection become a flow worth following? Both sides
/// spoke, the server without a reset, and the client acknowledged: after a
/// SYN, only the client's handshake ACK does it (a spoofed SYN never gets
/// one); a connection first seen mid-stream needs the server to answer
/// without a reset (a spoofed ACK gets a reset).
#[inline(always)]
pub fn established(flow: &Flow) -> bool {
    flow.pkts_in > 0
        && flow.pkts_out > 0
        && flow.flags_out & TCP_RST == 0
        && flow.flags_in & TCP_ACK != 0
        && (flow.state & state::MIDSTREAM != 0 || flow.flags_out & TCP_SYN != 0)
}

/// Should the first bytes of `pkt`'s payload go to user space? Client payload
/// on a plaintext port (`plaintext`: [`Config::plaintext`] of the local
/// port), in the first few segments of a request. Ask before [`update`]
/// (which counts the segment).
#[inline(always)]
pub fn wants_sample(plaintext: bool, flow: &Flow, pkt: &Packet, dir: Dir) -> bool {
    plaintext
        && dir == Dir::In
        && pkt.payload_len > 0
        && flow.req_segments < SAMPLES_PER_REQUEST
        && flow.state & state::CLOSED == 0
}

/// Fold `pkt` into `flow`, given what [`classify`] said of it.
#[inline(always)]
pub fn update(flow: &mut Flow, pkt: &Packet, dir: Dir, now: u64, kind: Option<EventKind>) {
    match kind {
        Some(EventKind::Opened) if flow.state & state::CLOSED != 0 => {
            *flow = new_flow(pkt, dir, now);
        }
        Some(EventKind::Closed) => flow.state |= state::CLOSED,
        Some(EventKind::Retransmit) => flow.state |= state::RETRANS_REPORTED,
        _ => {}
    }
    let gap = silence(flow, now);
    if gap > flow.max_gap_ns {
        flow.max_gap_ns = gap;
    }
    apply(flow, pkt, dir, now);
}

/// The whole step for one packet of a known flow, for callers with stack to
/// spare (host, offline analysis): [`classify`], [`fill_event`], [`update`].
pub fn on_packet(
    flow: &mut Flow,
    key: &FlowKey,
    pkt: &Packet,
    dir: Dir,
    now: u64,
    gap_threshold_ns: u64,
) -> Option<Event> {
    let kind = classify(flow, pkt, dir, now, gap_threshold_ns);
    let ev = kind.map(|k| {
        let mut ev = Event::zeroed();
        fill_event(&mut ev, k, key, flow, pkt, dir, now);
        ev
    });
    update(flow, pkt, dir, now, kind);
    ev
}

/// The two tables a host-side replay keeps, as the kernel keeps two maps:
/// established flows, and half-open connections (bounded apart, so a SYN
/// flood cannot push established flows out).
pub trait FlowTables {
    fn flow(&mut self, key: &FlowKey) -> Option<&mut Flow>;
    fn half_open(&mut self, key: &FlowKey) -> Option<&mut Flow>;
    fn insert_flow(&mut self, key: &FlowKey, flow: Flow);
    fn insert_half_open(&mut self, key: &FlowKey, flow: Flow);
    fn remove_half_open(&mut self, key: &FlowKey);
    /// A second copy of a packet was passed over.
    fn duplicate(&mut self) {}
}

/// What a packet does to a half-open connection `h`. True: the connection
/// is established by this packet; the connection as it was before the call
/// (the caller keeps a copy: the kernel in a map value, not its stack) goes
/// into the flow table with an `Opened` event, then the packet is applied to
/// it as to any known flow. The kernel and [`step`] both follow this.
#[inline(always)]
pub fn half_open_packet(h: &mut Flow, pkt: &Packet, dir: Dir, now: u64) -> bool {
    update(h, pkt, dir, now, None);
    established(h)
}

/// One packet through both tables, on a host: at most two events (the
/// `Opened` of an establishing packet, then that packet's own).
pub fn step<T: FlowTables>(
    t: &mut T,
    key: &FlowKey,
    pkt: &Packet,
    dir: Dir,
    now: u64,
    gap_threshold_ns: u64,
) -> [Option<Event>; 2] {
    if let Some(f) = t.flow(key) {
        // A capture from a mirror port may hold each packet twice.
        let sig = packet_sig(pkt, dir);
        if is_duplicate(f, sig, dir, now) {
            t.duplicate();
            return [None, None];
        }
        let ev = on_packet(f, key, pkt, dir, now, gap_threshold_ns);
        remember_sig(f, sig);
        return [ev, None];
    }
    if let Some(h) = t.half_open(key) {
        let before = *h;
        if !half_open_packet(h, pkt, dir, now) {
            return [None, None];
        }
        t.remove_half_open(key);
        let mut opened = Event::zeroed();
        fill_event(&mut opened, EventKind::Opened, key, &before, pkt, dir, now);
        t.insert_flow(key, before);
        let own = t.flow(key).and_then(|f| {
            let ev = on_packet(f, key, pkt, dir, now, gap_threshold_ns);
            // Its mirror copy, next, is a copy too.
            remember_sig(f, packet_sig(pkt, dir));
            ev
        });
        return [Some(opened), own];
    }
    if opens_flow(pkt) {
        let mut flow = new_flow(pkt, dir, now);
        update(&mut flow, pkt, dir, now, None);
        t.insert_half_open(key, flow);
    }
    [None, None]
}

/// The sequence number after `pkt` (SYN and FIN each take one).
#[inline(always)]
fn seq_end(pkt: &Packet) -> u32 {
    let end = pkt.seq.wrapping_add(pkt.payload_len);
    if pkt.tcp_flags & (TCP_SYN | TCP_FIN) != 0 {
        end.wrapping_add(1)
    } else {
        end
    }
}

/// A server segment that does not acknowledge all the client has sent was
/// sent before the server saw the client's last data: it crossed the
/// request on the wire (a TLS 1.3 session ticket after the handshake,
/// passing the device's first request), so it answers nothing and the
/// request is still owed.
#[inline(always)]
fn crosses_request(flow: &Flow, pkt: &Packet, dir: Dir) -> bool {
    dir == Dir::Out
        && pkt.tcp_flags & TCP_ACK != 0
        && flow.state & state::CLIENT_SEEN != 0
        && seq_after(flow.client_seq_next, pkt.ack)
}

/// Fold the packet into the flow's counters and baselines.
#[inline(always)]
fn apply(flow: &mut Flow, pkt: &Packet, dir: Dir, now: u64) {
    match dir {
        Dir::In => apply_client(flow, pkt, now),
        Dir::Out => apply_server(flow, pkt, now),
    }
    if pkt.payload_len > 0 && !crosses_request(flow, pkt, dir) {
        flow.last_payload_ns = now;
        flow.last_payload_dir = dir as u8;
        // A server answer ends the client's request: the next one is sampled again.
        flow.req_segments = match dir {
            Dir::In => flow.req_segments.saturating_add(1),
            Dir::Out => 0,
        };
    }
}

#[inline(always)]
fn apply_client(flow: &mut Flow, pkt: &Packet, now: u64) {
    flow.last_in_ns = now;
    flow.pkts_in = flow.pkts_in.wrapping_add(1);
    flow.bytes_in = flow.bytes_in.wrapping_add(pkt.ip_len as u64);
    flow.flags_in |= pkt.tcp_flags;
    flow.state &= !state::RETRANS_REPORTED;
    if pkt.tcp_flags & TCP_RST != 0 {
        if flow.rsts_in == 0 {
            flow.first_rst_seq = pkt.seq;
        }
        flow.rsts_in = flow.rsts_in.saturating_add(1);
        // RSTs stay out of the baselines: an injected one must not pollute them.
        return;
    }
    let end = seq_end(pkt);
    if flow.state & state::CLIENT_SEEN == 0 {
        flow.ttl_min = pkt.ttl;
        flow.ttl_max = pkt.ttl;
        flow.client_seq_next = end;
        flow.state |= state::CLIENT_SEEN;
    } else {
        if pkt.ttl < flow.ttl_min {
            flow.ttl_min = pkt.ttl;
        }
        if pkt.ttl > flow.ttl_max {
            flow.ttl_max = pkt.ttl;
        }
        if seq_after(end, flow.client_seq_next) {
            flow.client_seq_next = end;
        }
    }
    flow.client_ip_id = pkt.ip_id;
    flow.client_window = pkt.window;
}

#[inline(always)]
fn apply_server(flow: &mut Flow, pkt: &Packet, now: u64) {
    flow.last_out_ns = now;
    flow.pkts_out = flow.pkts_out.wrapping_add(1);
    flow.bytes_out = flow.bytes_out.wrapping_add(pkt.ip_len as u64);
    flow.flags_out |= pkt.tcp_flags;
    if pkt.tcp_flags & TCP_RST == 0 {
        let end = seq_end(pkt);
        if flow.state & state::SEQ_KNOWN == 0 || seq_after(end, flow.server_seq_next) {
            flow.server_seq_next = end;
            flow.state |= state::SEQ_KNOWN;
        }
    }
}

#[cfg(test)]
mod tests;
