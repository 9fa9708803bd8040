//! The state machine, packet by packet, on the host.

use std::net::IpAddr;
use std::vec::Vec;

use super::*;
use crate::craft::Tcp;
use crate::parse::parse_ethernet;
use crate::types::Config;
use crate::types::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};

const S: u64 = 1_000_000_000;
const THRESHOLD: u64 = 5 * S;

/// A scripted connection: client 192.0.2.2:40000, server 192.0.2.1:443.
struct Conn {
    flow: Option<Flow>,
    half: Option<Flow>,
    key: FlowKey,
    client_seq: u32,
    server_seq: u32,
    events: Vec<Event>,
}

fn addrs() -> (IpAddr, IpAddr) {
    ("192.0.2.2".parse().unwrap(), "192.0.2.1".parse().unwrap())
}

/// One connection's two table slots.
impl FlowTables for Conn {
    fn flow(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        (*key == self.key).then_some(()).and(self.flow.as_mut())
    }
    fn half_open(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        (*key == self.key).then_some(()).and(self.half.as_mut())
    }
    fn insert_flow(&mut self, _key: &FlowKey, flow: Flow) {
        self.flow = Some(flow);
    }
    fn insert_half_open(&mut self, _key: &FlowKey, flow: Flow) {
        self.half = Some(flow);
    }
    fn remove_half_open(&mut self, _key: &FlowKey) {
        self.half = None;
    }
}

impl Conn {
    fn new() -> Conn {
        let (c, s) = addrs();
        let pkt = parse_ethernet(Tcp::syn(c, s).frame().as_slice()).unwrap();
        Conn {
            flow: None,
            half: None,
            key: flow_key(&pkt, Dir::In),
            client_seq: 1000,
            server_seq: 5000,
            events: Vec::new(),
        }
    }

    fn packet(&self, dir: Dir, flags: u8, payload: usize, seq: u32, ttl: u8) -> Packet {
        let (c, s) = addrs();
        let mut t = match dir {
            Dir::In => Tcp::syn(c, s),
            Dir::Out => {
                let mut t = Tcp::syn(s, c);
                t.sport = 443;
                t.dport = 40000;
                t
            }
        };
        t.flags = flags;
        t.payload = payload;
        t.seq = seq;
        // All the other side has sent, as a stack acknowledges.
        t.ack = match dir {
            Dir::In => self.server_seq,
            Dir::Out => self.client_seq,
        };
        t.ttl = ttl;
        parse_ethernet(t.frame().as_slice()).unwrap()
    }

    /// Feed one packet at time `at`; return the event it caused.
    fn send(&mut self, at: u64, dir: Dir, flags: u8, payload: usize, ttl: u8) -> Option<Event> {
        let seq = match dir {
            Dir::In => self.client_seq,
            Dir::Out => self.server_seq,
        };
        let pkt = self.packet(dir, flags, payload, seq, ttl);
        let advance = payload as u32 + u32::from(flags & (TCP_SYN | TCP_FIN) != 0);
        match dir {
            Dir::In => self.client_seq = self.client_seq.wrapping_add(advance),
            Dir::Out => self.server_seq = self.server_seq.wrapping_add(advance),
        }
        self.feed(at, dir, &pkt)
    }

    /// The packet's own event (or, for the establishing packet without
    /// one, the `Opened` event).
    fn feed(&mut self, at: u64, dir: Dir, pkt: &Packet) -> Option<Event> {
        let key = self.key;
        let [opened, own] = step(self, &key, pkt, dir, at, THRESHOLD);
        self.events.extend(opened.iter().chain(own.iter()).copied());
        own.or(opened)
    }

    /// SYN, SYN-ACK, ACK at t=0, 1 ms, 2 ms.
    fn handshake(&mut self) {
        self.send(0, Dir::In, TCP_SYN, 0, 64);
        self.send(1_000_000, Dir::Out, TCP_SYN | TCP_ACK, 0, 64);
        self.send(2_000_000, Dir::In, TCP_ACK, 0, 64);
    }

    fn flow(&self) -> &Flow {
        self.flow.as_ref().unwrap()
    }
}

fn kind(ev: Option<Event>) -> Option<EventKind> {
    ev.map(|e| EventKind::from_u8(e.kind).unwrap())
}

#[test]
fn syn_is_half_open_until_the_handshake_ack_opens_the_flow() {
    let mut c = Conn::new();
    assert!(c.send(10, Dir::In, TCP_SYN, 0, 64).is_none());
    assert!(
        c.flow.is_none() && c.half.is_some(),
        "half-open after the SYN"
    );
    assert!(c.send(20, Dir::Out, TCP_SYN | TCP_ACK, 0, 64).is_none());
    assert!(c.flow.is_none(), "still half-open after the SYN-ACK");
    let ev = c.send(30, Dir::In, TCP_ACK, 0, 64).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Opened));
    assert_eq!(ev.dir, Dir::In as u8);
    assert_eq!(ev.first_seen_ns, 10, "the flow dates from its SYN");
    assert!(c.half.is_none(), "moved, not copied");
    assert_eq!(c.flow().state & state::MIDSTREAM, 0);
    assert_eq!(c.flow().first_seen_ns, 10);
    assert_eq!((c.flow().pkts_in, c.flow().pkts_out), (2, 1));
}

#[test]
fn a_spoofed_syn_never_opens_a_flow() {
    let mut c = Conn::new();
    c.send(10, Dir::In, TCP_SYN, 0, 64);
    // The server answers; the spoofed source never does. Retransmitted SYNs too.
    c.send(20, Dir::Out, TCP_SYN | TCP_ACK, 0, 64);
    c.send(1_000_000_000, Dir::In, TCP_SYN, 0, 64);
    assert!(c.flow.is_none() && c.events.is_empty());
}

#[test]
fn a_spoofed_ack_answered_by_a_reset_never_opens_a_flow() {
    let mut c = Conn::new();
    c.send(10, Dir::In, TCP_ACK, 0, 64);
    c.send(20, Dir::Out, TCP_RST, 0, 64);
    c.send(30, Dir::In, TCP_ACK, 0, 64);
    assert!(c.flow.is_none() && c.events.is_empty());
}

#[test]
fn a_flow_first_seen_mid_stream_opens_when_both_sides_speak() {
    let mut c = Conn::new();
    c.send(10, Dir::Out, TCP_ACK | TCP_PSH, 100, 64);
    assert!(c.flow.is_none());
    let ev = c.send(20, Dir::In, TCP_ACK, 0, 64).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Opened));
    assert_ne!(c.flow().state & state::MIDSTREAM, 0);
}

#[test]
fn an_establishing_fin_gives_opened_then_closed() {
    let mut c = Conn::new();
    c.send(10, Dir::In, TCP_SYN, 0, 64);
    c.send(20, Dir::Out, TCP_SYN | TCP_ACK, 0, 64);
    c.send(30, Dir::In, TCP_ACK | TCP_FIN, 0, 64);
    let kinds: Vec<_> = c.events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Opened as u8, EventKind::Closed as u8]);
}

#[test]
fn lone_rst_or_fin_for_an_unknown_flow_creates_nothing() {
    let mut c = Conn::new();
    assert!(c.send(10, Dir::In, TCP_RST, 0, 64).is_none());
    assert!(c.send(10, Dir::In, TCP_FIN | TCP_ACK, 0, 64).is_none());
    assert!(c.flow.is_none());
}

#[test]
fn handshake_and_quick_exchange_emit_no_event_beyond_opened() {
    let mut c = Conn::new();
    c.handshake();
    assert!(c
        .send(3 * S / 1000, Dir::In, TCP_ACK | TCP_PSH, 300, 64)
        .is_none());
    assert!(c.send(4 * S / 1000, Dir::Out, TCP_ACK, 0, 64).is_none());
    assert_eq!(c.events.len(), 1);
}

#[test]
fn silence_at_or_above_threshold_ends_a_gap_with_its_length_side_and_payload() {
    // (silence, direction, payload, expect an event)
    let cases = [
        (THRESHOLD - 1, Dir::In, 10, false),
        (THRESHOLD, Dir::In, 10, true),
        (40 * S, Dir::Out, 200, true),
        (40 * S, Dir::In, 0, true),
    ];
    for (silence, dir, payload, expect) in cases {
        let mut c = Conn::new();
        c.handshake();
        let t0 = 2_000_000;
        let ev = c.send(t0 + silence, dir, TCP_ACK | TCP_PSH, payload, 64);
        assert_eq!(ev.is_some(), expect, "silence {silence} dir {dir:?}");
        if let Some(ev) = ev {
            assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::GapEnded));
            assert_eq!(ev.silence_ns, silence);
            assert_eq!(ev.dir, dir as u8);
            assert_eq!(ev.payload_len, payload as u32);
        }
        assert_eq!(c.flow().max_gap_ns, silence);
    }
}

#[test]
fn hold_time_is_the_time_since_the_clients_request() {
    // Client asks (Ping), server ACKs at once, answers 40 s later.
    let mut c = Conn::new();
    c.handshake();
    c.send(10 * S, Dir::In, TCP_ACK | TCP_PSH, 300, 64);
    c.send(10 * S + 1_000_000, Dir::Out, TCP_ACK, 0, 64);
    let ev = c
        .send(50 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64)
        .unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::GapEnded));
    assert_eq!(ev.since_payload_ns, 40 * S);
    assert_eq!(ev.last_payload_dir, Dir::In as u8);
    assert_eq!(ev.silence_ns, 40 * S - 1_000_000);
}

#[test]
fn ttl_baseline_tracks_client_min_and_max_but_not_rsts() {
    let mut c = Conn::new();
    c.send(0, Dir::In, TCP_SYN, 0, 60);
    c.send(1, Dir::Out, TCP_SYN | TCP_ACK, 0, 64);
    c.send(2, Dir::In, TCP_ACK, 0, 62);
    c.send(3, Dir::In, TCP_ACK, 0, 61);
    assert_eq!((c.flow().ttl_min, c.flow().ttl_max), (60, 62));
    let ev = c.send(4, Dir::In, TCP_RST, 0, 250).unwrap();
    assert_eq!((ev.ttl, ev.ttl_min, ev.ttl_max), (250, 60, 62));
    assert_eq!((c.flow().ttl_min, c.flow().ttl_max), (60, 62));
}

#[test]
fn client_rst_closes_with_its_ttl_ip_id_window_and_time_since_server_send() {
    let mut c = Conn::new();
    c.handshake();
    c.send(10 * S, Dir::Out, TCP_ACK | TCP_PSH, 100, 64);
    let ev = c.send(12 * S, Dir::In, TCP_RST, 0, 64).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Closed));
    assert_eq!(ev.dir, Dir::In as u8);
    assert_eq!(ev.tcp_flags, TCP_RST);
    assert_eq!(ev.since_server_ns, 2 * S);
    assert_eq!(ev.silence_ns, 2 * S);
    assert_eq!(ev.ip_id, 1);
    assert_ne!(ev.flow_state & state::CLIENT_SEEN, 0);
}

#[test]
fn fin_by_each_side_closes_once_and_names_the_side() {
    for dir in [Dir::In, Dir::Out] {
        let mut c = Conn::new();
        c.handshake();
        let ev = c.send(S, dir, TCP_FIN | TCP_ACK, 0, 64).unwrap();
        assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Closed));
        assert_eq!(ev.dir, dir as u8);
        let other = if dir == Dir::In { Dir::Out } else { Dir::In };
        // The other side's FIN and a late RST are not second closes.
        assert!(c.send(S + 1, other, TCP_FIN | TCP_ACK, 0, 64).is_none());
        assert!(c.send(20 * S, other, TCP_RST, 0, 64).is_none());
    }
}

#[test]
fn no_gap_events_after_close() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_FIN | TCP_ACK, 0, 64);
    assert!(c.send(60 * S, Dir::Out, TCP_ACK, 0, 64).is_none());
}

#[test]
fn fresh_syn_on_a_closed_tuple_reopens_the_flow() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_RST, 0, 64);
    let ev = c.send(2 * S, Dir::In, TCP_SYN, 0, 64).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Opened));
    assert_eq!(c.flow().state & state::CLOSED, 0);
    assert_eq!(c.flow().first_seen_ns, 2 * S);
    assert_eq!(c.flow().pkts_in, 1);
}

#[test]
fn server_retransmission_after_client_silence_is_reported_once_then_answered() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 300, 64);
    // Server answers at the heartbeat (a gap event), then must resend it.
    let answer_seq = c.server_seq;
    assert_eq!(
        kind(c.send(41 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64)),
        Some(EventKind::GapEnded)
    );
    let resend = c.packet(Dir::Out, TCP_ACK | TCP_PSH, 200, answer_seq, 64);
    let ev = c.feed(41 * S + S / 5, Dir::Out, &resend).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Retransmit));
    assert_eq!(ev.since_client_ns, 40 * S + S / 5);
    // Further resends of the same episode stay quiet.
    assert!(c.feed(41 * S + S / 2, Dir::Out, &resend).is_none());
    // The client speaks: the episode ends with an event.
    assert_eq!(
        kind(c.send(42 * S, Dir::In, TCP_ACK, 0, 64)),
        Some(EventKind::RetransAnswered)
    );
    assert_eq!(c.flow().state & state::RETRANS_REPORTED, 0);
}

#[test]
fn a_keepalive_probe_to_a_silent_client_asks_for_an_answer_like_a_retransmission() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 300, 64);
    c.send(S + S / 50, Dir::Out, TCP_ACK, 0, 64);
    // Linux's probe: empty, one byte behind what the server has sent.
    let probe = c.packet(Dir::Out, TCP_ACK, 0, c.server_seq.wrapping_sub(1), 64);
    let ev = c.feed(24 * S, Dir::Out, &probe).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Retransmit));
    assert_eq!(ev.payload_len, 0);
    // A repeat soon after (no answer yet) stays quiet; the client's ACK ends it.
    assert!(c.feed(24 * S + S / 2, Dir::Out, &probe).is_none());
    assert_eq!(
        kind(c.send(31 * S, Dir::In, TCP_ACK, 0, 64)),
        Some(EventKind::RetransAnswered)
    );
}

#[test]
fn an_empty_segment_at_the_next_number_after_a_silence_is_no_probe() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 300, 64);
    c.send(S + S / 50, Dir::Out, TCP_ACK, 0, 64);
    // A window update or pure ACK carries the next number: it asks nothing.
    assert_eq!(
        kind(c.send(24 * S, Dir::Out, TCP_ACK, 0, 64)),
        Some(EventKind::GapEnded)
    );
}

#[test]
fn retransmission_while_the_client_is_active_is_not_reported() {
    let mut c = Conn::new();
    c.handshake();
    let seq = c.server_seq;
    c.send(S, Dir::Out, TCP_ACK | TCP_PSH, 100, 64);
    c.send(S + 1000, Dir::In, TCP_ACK, 0, 64);
    let resend = c.packet(Dir::Out, TCP_ACK | TCP_PSH, 100, seq, 64);
    assert!(c.feed(S + S / 5, Dir::Out, &resend).is_none());
}

#[test]
fn new_data_is_not_a_retransmission_across_sequence_wrap() {
    let mut c = Conn::new();
    c.server_seq = u32::MAX - 50;
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 10, 64);
    // 100 bytes crossing 2^32, after 40 s of client silence: new data, a gap.
    assert_eq!(
        kind(c.send(41 * S, Dir::Out, TCP_ACK | TCP_PSH, 100, 64)),
        Some(EventKind::GapEnded)
    );
    assert!(seq_after(c.flow().server_seq_next, u32::MAX - 50));
}

#[test]
fn counters_add_up_bytes_and_packets_each_way() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 100, 64);
    c.send(S, Dir::Out, TCP_ACK | TCP_PSH, 1000, 64);
    let f = c.flow();
    assert_eq!((f.pkts_in, f.pkts_out), (3, 2));
    assert_eq!(f.bytes_in, 40 + 40 + 140);
    assert_eq!(f.bytes_out, 40 + 1040);
    assert_eq!(f.flags_in & TCP_SYN, TCP_SYN);
    assert_eq!(f.flags_out, TCP_SYN | TCP_ACK | TCP_PSH);
}

/// Would the next packet `dir` with `payload` bytes be sampled, then send it.
fn sampled(c: &mut Conn, cfg: &Config, at: u64, dir: Dir, payload: usize) -> bool {
    let seq = match dir {
        Dir::In => c.client_seq,
        Dir::Out => c.server_seq,
    };
    let pkt = c.packet(dir, TCP_ACK | TCP_PSH, payload, seq, 64);
    let wanted = wants_sample(
        cfg.plaintext(pkt.dst_port),
        c.flow.as_ref().unwrap(),
        &pkt,
        dir,
    );
    c.send(at, dir, TCP_ACK | TCP_PSH, payload, 64);
    wanted
}

#[test]
fn plaintext_requests_are_sampled_for_their_first_three_segments_only() {
    let mut cfg = Config::DEFAULT;
    cfg.plaintext_mask = 1;
    let mut c = Conn::new();
    c.handshake();
    let got: Vec<bool> = (0..5)
        .map(|i| sampled(&mut c, &cfg, 3_000_000 + i, Dir::In, 100))
        .collect();
    assert_eq!(got, [true, true, true, false, false]);
    // The server's answer ends the request; its own payload is never sampled.
    assert!(!sampled(&mut c, &cfg, 4_000_000, Dir::Out, 100));
    assert!(sampled(&mut c, &cfg, 5_000_000, Dir::In, 100));
    // Pure ACKs carry nothing to read.
    assert!(!sampled(&mut c, &cfg, 6_000_000, Dir::In, 0));
}

#[test]
fn tls_ports_are_never_sampled() {
    let mut c = Conn::new();
    c.handshake();
    assert!(!sampled(&mut c, &Config::DEFAULT, 3_000_000, Dir::In, 100));
    let mut other = Config::DEFAULT;
    other.ports[1] = 8080;
    other.port_count = 2;
    other.plaintext_mask = 0b10;
    assert!(!sampled(&mut c, &other, 4_000_000, Dir::In, 100));
}

#[test]
fn an_rst_event_carries_its_numbers_and_both_sides_next_sequence_numbers() {
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 50, 64);
    c.send(2 * S, Dir::Out, TCP_ACK | TCP_PSH, 100, 64);
    // The client's retransmission of old data does not move its next number.
    let mut old = c.packet(Dir::In, TCP_ACK, 10, 1001, 64);
    old.ack = 5001;
    c.feed(3 * S, Dir::In, &old);
    let mut rst = c.packet(Dir::In, TCP_RST | TCP_ACK, 0, 7777, 64);
    rst.ack = 5101;
    let ev = c.feed(30 * S, Dir::In, &rst).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::Closed));
    assert_eq!((ev.seq, ev.ack), (7777, 5101));
    // SYN at 1000 takes one, then 50 bytes.
    assert_eq!(ev.client_seq_next, 1051);
    // SYN-ACK at 5000 takes one, then 100 bytes.
    assert_eq!(ev.server_seq_next, 5101);
    assert_eq!(c.flow().first_rst_seq, 7777);
}

#[test]
fn a_second_client_rst_after_the_close_is_reported_once_with_the_firsts_number() {
    let mut c = Conn::new();
    c.handshake();
    let first = c.packet(Dir::In, TCP_RST, 0, 1001, 64);
    assert_eq!(kind(c.feed(S, Dir::In, &first)), Some(EventKind::Closed));
    // A server packet after the close is no event.
    assert!(c.send(S + 1, Dir::Out, TCP_ACK, 0, 64).is_none());
    let second = c.packet(Dir::In, TCP_RST, 0, 2461, 64);
    let ev = c.feed(S + 2, Dir::In, &second).unwrap();
    assert_eq!(EventKind::from_u8(ev.kind), Some(EventKind::ResetAgain));
    assert_eq!((ev.seq, ev.first_rst_seq), (2461, 1001));
    let third = c.packet(Dir::In, TCP_RST, 0, 3921, 64);
    assert!(c.feed(S + 3, Dir::In, &third).is_none());
}

/// A frame from `src` to `dst` (ports as given), parsed.
fn tap_packet(src: (&str, u16), dst: (&str, u16)) -> Packet {
    let mut t = Tcp::syn(src.0.parse().unwrap(), dst.0.parse().unwrap()).flags(TCP_ACK);
    t.sport = src.1;
    t.dport = dst.1;
    parse_ethernet(t.frame().as_slice()).unwrap()
}

#[test]
fn tap_mode_tells_direction_by_the_tracked_server_port_in_both_families() {
    let cfg = Config::DEFAULT;
    let any = |_: &[u8; 16]| true;
    for (client, server) in [("192.0.2.2", "192.0.2.1"), ("2001:db8::2", "2001:db8::1")] {
        let to_server = tap_packet((client, 40000), (server, 443));
        let to_client = tap_packet((server, 443), (client, 40000));
        assert_eq!(tap_direction(&cfg, &to_server, any), Some(Dir::In));
        assert_eq!(tap_direction(&cfg, &to_client, any), Some(Dir::Out));
        // Both directions make one key: the same flow.
        assert_eq!(
            flow_key(&to_server, Dir::In),
            flow_key(&to_client, Dir::Out)
        );
        let other = tap_packet((client, 40000), (server, 8080));
        assert_eq!(tap_direction(&cfg, &other, any), None);
    }
}

#[test]
fn tap_mode_with_a_server_table_keeps_two_servers_apart() {
    let cfg = Config::DEFAULT;
    let server = parse_ethernet(
        Tcp::syn("192.0.2.9".parse().unwrap(), "192.0.2.1".parse().unwrap())
            .frame()
            .as_slice(),
    )
    .unwrap()
    .dst_addr;
    let only = move |a: &[u8; 16]| *a == server;
    // A client port of 443 on another host's connection: not ours.
    let foreign = tap_packet(("198.51.100.7", 443), ("203.0.113.5", 443));
    assert_eq!(tap_direction(&cfg, &foreign, only), None);
    let ours = tap_packet(("198.51.100.7", 443), ("192.0.2.1", 443));
    assert_eq!(tap_direction(&cfg, &ours, only), Some(Dir::In));
    let back = tap_packet(("192.0.2.1", 443), ("198.51.100.7", 443));
    assert_eq!(tap_direction(&cfg, &back, only), Some(Dir::Out));
}

#[test]
fn a_mirrors_second_copy_is_passed_over_and_a_retransmission_is_not() {
    let mut c = Conn::new();
    c.handshake();
    let data = c.packet(Dir::Out, TCP_ACK | TCP_PSH, 100, 5001, 64);
    c.feed(S, Dir::Out, &data);
    let pkts = c.flow().pkts_out;
    // The copy from the other switch port, 20 us later.
    assert!(c.feed(S + 20_000, Dir::Out, &data).is_none());
    assert_eq!(c.flow().pkts_out, pkts, "counted once");
    // The same bytes an RTO later are the server's retransmission.
    c.feed(S + 300_000_000, Dir::Out, &data);
    assert_eq!(c.flow().pkts_out, pkts + 1);
    // The client's ACK is no copy of the server's packet; its own copy is.
    let mut ack = c.packet(Dir::In, TCP_ACK, 0, 1001, 64);
    ack.ack = 5101;
    c.feed(S + 300_010_000, Dir::In, &ack);
    c.feed(S + 300_020_000, Dir::In, &ack);
    assert_eq!(c.flow().pkts_in, 3, "handshake SYN and ACK, then one ACK");
    // A burst whose copies interleave (A, B, A', B'): each counted once.
    let a = c.packet(Dir::Out, TCP_ACK, 100, 5101, 64);
    let b = c.packet(Dir::Out, TCP_ACK, 100, 5201, 64);
    for (t, p) in [(0, &a), (10_000, &b), (20_000, &a), (30_000, &b)] {
        c.feed(2 * S + t, Dir::Out, p);
    }
    assert_eq!(c.flow().pkts_out, pkts + 3);
}

#[test]
fn a_fin_right_after_an_ack_with_the_same_numbers_is_no_copy_of_it() {
    // FIN is flag bit 0: it must not vanish under the signature's direction bit.
    let mut c = Conn::new();
    c.handshake();
    let ack = c.packet(Dir::In, TCP_ACK, 0, 1001, 64);
    let fin = c.packet(Dir::In, TCP_ACK | TCP_FIN, 0, 1001, 64);
    assert_ne!(packet_sig(&ack, Dir::In), packet_sig(&fin, Dir::In));
    c.feed(S, Dir::In, &ack);
    let ev = c
        .feed(S + 1_000_000, Dir::In, &fin)
        .expect("the FIN's event");
    assert_eq!(ev.kind, EventKind::Closed as u8);
}

#[test]
fn a_server_segment_that_crossed_the_request_answers_nothing() {
    // TLS 1.3: the server's session ticket, sent before it saw the device's
    // request, arrives after it; the request stays owed.
    let mut c = Conn::new();
    c.handshake();
    c.send(S, Dir::In, TCP_ACK | TCP_PSH, 300, 64);
    let mut ticket = c.packet(Dir::Out, TCP_ACK | TCP_PSH, 250, 5001, 64);
    ticket.ack = 1001; // the request's first byte: not acknowledged
    c.feed(S + 40_000, Dir::Out, &ticket);
    assert_eq!(c.flow().last_payload_dir, Dir::In as u8, "still owed");
    assert_eq!(c.flow().last_payload_ns, S);
    // The answer acknowledges the request: it answers.
    let mut answer = c.packet(Dir::Out, TCP_ACK | TCP_PSH, 200, 5251, 64);
    answer.ack = 1301;
    let ev = c.feed(31 * S, Dir::Out, &answer).expect("a gap ended");
    assert_eq!(ev.last_payload_dir, Dir::In as u8, "it answers the request");
    assert_eq!(c.flow().last_payload_dir, Dir::Out as u8);
}
