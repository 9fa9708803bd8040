//! How a flow ended, from the facts of its close: pure functions, no
//! detector state. Timing decides whether a client-side RST was a kill; the
//! TTL says where the box sits; where the TTL is silent, the RST's other
//! header fields against the client's decide.

use monitor_common::{flow::seq_after, state, Dir, FAMILY_V4, TCP_ACK};

use super::ending::{BoxLocation, Ending, Evidence, Signal};
use crate::event::FlowEvent;

/// An IPv4 ID this far from the client's last one is off its pattern. A
/// per-connection counter moves by the packets sent since (a handful over
/// a silence); a host-wide counter can move by thousands, so this signal is
/// never enough alone.
const IP_ID_JUMP: u16 = 4096;

/// The RTT-based next-packet window: twice the RTT (the box may sit next to
/// the client) plus scheduling slack, bounded.
const WINDOW_SLACK_S: f64 = 0.25;
const WINDOW_MAX_S: f64 = 3.0;

/// The window for a flow whose handshake RTT is known; else the configured one.
pub(super) fn next_packet_window(rtt_s: Option<f64>, configured_s: f64) -> f64 {
    match rtt_s {
        Some(rtt) => (2.0 * rtt + WINDOW_SLACK_S).min(WINDOW_MAX_S),
        None => configured_s,
    }
}

/// The server's send that ended the last silence, as the close sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct ServerSend {
    /// The silence before it (seconds).
    pub silence_s: f64,
    /// It was a keepalive probe, not data.
    pub probe: bool,
}

/// The facts a flow's close is judged on.
#[derive(Clone, Debug)]
pub(super) struct CloseFacts {
    pub dir: Dir,
    pub rst: bool,
    /// Silence before the closing packet, seconds.
    pub silence: f64,
    pub min_silence: f64,
    /// Seconds since the server last sent.
    pub since_server: Option<f64>,
    /// The client's request was unanswered across a silence.
    pub owed: bool,
    /// Whether the RST's TTL is the client's (None: no baseline).
    pub ttl_is_clients: Option<bool>,
    /// The server's send that ended the last silence, if that was the last gap.
    pub after_server_gap: Option<ServerSend>,
    /// The next-packet window for this flow (seconds).
    pub window_s: f64,
    /// An unanswered retransmission was pending (the silence it followed).
    pub suspect_silence: Option<f64>,
    /// The heartbeat in force, if known (seconds).
    pub heartbeat: Option<f64>,
    /// The RST's header fields against the client's last packet.
    pub forged: Vec<Signal>,
}

impl CloseFacts {
    /// Within the window after the server's first send following a silence.
    pub fn next_packet(&self) -> bool {
        self.after_server_gap.is_some() && self.since_server.is_some_and(|s| s <= self.window_s)
    }

    pub fn evidence(&self, ev: &FlowEvent) -> Evidence {
        let mut e = Evidence {
            silence_seconds: self.silence,
            after_server_send_seconds: self.since_server,
            server_owed_answer: self.owed,
            next_packet_window_seconds: Some(self.window_s),
            ..Evidence::default()
        };
        if ev.dir == Dir::In && ev.is_rst() {
            let baseline = ev.ttl_baseline();
            e.rst_ttl = Some(ev.raw.ttl);
            e.client_ttl_min = baseline.map(|b| b.0);
            e.client_ttl_max = baseline.map(|b| b.1);
            e.rst_ip_id = Some(ev.raw.ip_id);
            e.client_ip_id = Some(ev.raw.base_ip_id);
            e.rst_window = Some(ev.raw.window);
            e.client_window = Some(ev.raw.base_window);
            e.location = self.ttl_is_clients.map(|own| {
                if own {
                    BoxLocation::AtOrNextToClient
                } else {
                    BoxLocation::OnThePath
                }
            });
        }
        e
    }
}

/// What a client-side RST's own header fields say against the client's
/// last packet: the signals of a forged reset beside the TTL.
pub(super) fn forged_signals(ev: &FlowEvent) -> Vec<Signal> {
    let r = &ev.raw;
    let mut v = Vec::new();
    if ev.raw.key.family == FAMILY_V4 && r.base_ip_id != 0 {
        if r.ip_id == 0 {
            v.push(Signal::IpIdZero);
        } else if r.ip_id.wrapping_sub(r.base_ip_id) > IP_ID_JUMP
            && r.base_ip_id.wrapping_sub(r.ip_id) > IP_ID_JUMP
        {
            v.push(Signal::IpIdOffPattern);
        }
    }
    if r.window != r.base_window {
        v.push(Signal::WindowOffClient);
    }
    if r.flow_state & state::CLIENT_SEEN != 0 && r.seq != r.client_seq_next {
        v.push(Signal::SeqOffClient);
    }
    if r.tcp_flags & TCP_ACK == 0 {
        v.push(Signal::RstWithoutAck);
    } else if r.ack == 0 {
        v.push(Signal::AckZero);
    } else if r.flow_state & state::SEQ_KNOWN != 0 && seq_after(r.ack, r.server_seq_next) {
        v.push(Signal::AckAheadOfServer);
    }
    v
}

/// How a flow ended (pure). Adjusts the evidence to what decided it.
pub(super) fn classify_close(c: &CloseFacts, evidence: &mut Evidence) -> Ending {
    // The server gives up on a send still unanswered: its client did not
    // come back within `black_hole_after` (that would have made it a black
    // hole), so from here it went dark (out of coverage, switched off).
    if c.suspect_silence.is_some() && c.dir == Dir::Out {
        evidence.server_owed_answer = true;
        evidence.note = Some(
            "the client went dark: the server's send was retransmitted unanswered and the client did not come back"
                .into(),
        );
        return Ending::Vanished;
    }
    match (c.dir, c.rst) {
        (Dir::Out, true) => Ending::ServerReset,
        (Dir::Out, false) => Ending::ServerFin,
        (Dir::In, false) if c.owed => Ending::ProxyTimeout,
        (Dir::In, false) => Ending::ClientFin,
        (Dir::In, true) => classify_client_side_reset(c, evidence),
    }
}

fn classify_client_side_reset(c: &CloseFacts, evidence: &mut Evidence) -> Ending {
    let mut signals = vec![match c.ttl_is_clients {
        Some(true) => Signal::ClientTtl,
        Some(false) => Signal::ForeignTtl,
        None => Signal::NoTtlBaseline,
    }];
    // Timing decides: an RST right after the server's first send following
    // a silence answers that send, whatever its TTL.
    if c.next_packet() {
        signals.push(Signal::NextPacketTiming);
        if let Some(g) = c.after_server_gap {
            evidence.silence_seconds = g.silence_s;
            if g.probe {
                signals.push(Signal::KeepaliveProbe);
            }
        }
        evidence.server_owed_answer = true;
        evidence.signals = signals;
        return Ending::ResetOnNextPacket;
    }
    let after_silence = c.silence >= c.min_silence;
    if after_silence {
        signals.push(Signal::AfterSilence);
    }
    let before_heartbeat = c.heartbeat.is_some_and(|h| c.silence < h);
    if after_silence && before_heartbeat {
        signals.push(Signal::BeforeHeartbeat);
    }
    if c.owed {
        signals.push(Signal::AnswerOwed);
    }
    signals.extend(c.forged.iter().copied());
    let ending = if c.ttl_is_clients == Some(false) {
        if !after_silence {
            evidence.note = Some("foreign TTL but no silence before it".into());
        }
        Ending::InjectedReset
    } else if after_silence && forged_where_ttl_is_silent(&signals) {
        Ending::InjectedReset
    } else if c.owed {
        Ending::ProxyTimeout
    } else {
        Ending::ClientReset
    };
    evidence.signals = signals;
    ending
}

/// Where the TTL cannot tell, an RST after a silence is a box's when it
/// acknowledges bytes the server never sent (no client can), or when a
/// header field is off the client's (its window, or its sequence number:
/// the client's own RST carries both; or a burst of numbers) and one more
/// sign says so (another of those, its IP ID, no ACK or a zero one, a
/// silence shorter than the heartbeat, or a request still owed an answer:
/// the client had no reason to give up).
fn forged_where_ttl_is_silent(signals: &[Signal]) -> bool {
    let has = |s: &Signal| signals.contains(s);
    let off = [
        Signal::WindowOffClient,
        Signal::SeqOffClient,
        Signal::RstBurst,
    ];
    let more = [
        Signal::IpIdZero,
        Signal::IpIdOffPattern,
        Signal::RstWithoutAck,
        Signal::AckZero,
        Signal::BeforeHeartbeat,
        Signal::AnswerOwed,
    ];
    let fields = off.iter().filter(|s| has(s)).count();
    let others = more.iter().filter(|s| has(s)).count();
    has(&Signal::AckAheadOfServer) || fields >= 1 && fields + others >= 2
}

/// Killed before the heartbeat: forgetting kills always are; kills at
/// expiry are when the server owed an answer or the silence was shorter
/// than the heartbeat in force.
pub(super) fn is_premature(
    ending: Ending,
    e: &Evidence,
    heartbeat: Option<f64>,
    min_silence: f64,
) -> bool {
    match ending {
        // Forgetting after a silence; without one, no timer expired.
        Ending::ResetOnNextPacket | Ending::BlackHole => e.silence_seconds >= min_silence,
        Ending::InjectedReset
        | Ending::ProxyTimeout
        | Ending::UpstreamTimeout
        | Ending::LocalProxyTimeout => {
            e.silence_seconds >= min_silence
                && (e.server_owed_answer || heartbeat.is_some_and(|h| e.silence_seconds < h))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> CloseFacts {
        CloseFacts {
            dir: Dir::In,
            rst: true,
            silence: 20.0,
            min_silence: 5.0,
            since_server: Some(20.0),
            owed: false,
            ttl_is_clients: Some(true),
            after_server_gap: None,
            window_s: 1.0,
            suspect_silence: None,
            heartbeat: None,
            forged: Vec::new(),
        }
    }

    /// A client-side RST+ACK after a flow whose client is at 1000 and whose
    /// server has sent up to 5000.
    fn rst(seq: u32, ack: u32, flags: u8) -> FlowEvent {
        let mut e = monitor_common::Event::zeroed();
        e.kind = monitor_common::EventKind::Closed as u8;
        e.dir = Dir::In as u8;
        e.key.family = FAMILY_V4;
        e.tcp_flags = flags;
        (e.seq, e.ack) = (seq, ack);
        (e.client_seq_next, e.server_seq_next) = (1000, 5000);
        e.flow_state = state::CLIENT_SEEN | state::SEQ_KNOWN;
        FlowEvent::from_event(e).expect("a valid event")
    }

    #[test]
    fn an_rst_is_held_against_both_sides_next_sequence_numbers() {
        use monitor_common::TCP_RST;
        let own = forged_signals(&rst(1000, 5000, TCP_RST | TCP_ACK));
        assert!(own.is_empty(), "{own:?}");
        // Acknowledging less than was sent: the answer may be in flight.
        assert!(forged_signals(&rst(1000, 4000, TCP_RST | TCP_ACK)).is_empty());
        let ahead = forged_signals(&rst(1000, 5001, TCP_RST | TCP_ACK));
        assert_eq!(ahead, [Signal::AckAheadOfServer]);
        let zero = forged_signals(&rst(1000, 0, TCP_RST | TCP_ACK));
        assert_eq!(zero, [Signal::AckZero]);
        let off = forged_signals(&rst(2460, 5000, TCP_RST));
        assert_eq!(off, [Signal::SeqOffClient, Signal::RstWithoutAck]);
    }

    #[test]
    fn the_window_follows_the_rtt_within_bounds() {
        assert_eq!(next_packet_window(None, 1.0), 1.0);
        assert!((next_packet_window(Some(0.01), 1.0) - 0.27).abs() < 1e-9);
        assert_eq!(next_packet_window(Some(2.0), 1.0), WINDOW_MAX_S);
    }

    #[test]
    fn a_client_ttl_rst_with_the_clients_window_after_a_silence_is_the_clients() {
        let mut e = Evidence::default();
        assert_eq!(classify_close(&facts(), &mut e), Ending::ClientReset);
        assert!(e.signals.contains(&Signal::ClientTtl));
    }

    #[test]
    fn where_the_ttl_is_silent_window_and_ip_id_off_the_clients_decide_injected() {
        let mut c = facts();
        c.forged = vec![Signal::WindowOffClient, Signal::IpIdZero];
        let mut e = Evidence::default();
        assert_eq!(classify_close(&c, &mut e), Ending::InjectedReset);
        // One signal alone (a host-wide IP ID counter moves a lot) is not enough.
        c.forged = vec![Signal::IpIdOffPattern];
        assert_eq!(classify_close(&c, &mut e), Ending::ClientReset);
        c.forged = vec![Signal::WindowOffClient];
        assert_eq!(classify_close(&c, &mut e), Ending::ClientReset);
        // The heartbeat in force was longer: the client had no reason to give up.
        c.heartbeat = Some(40.0);
        assert_eq!(classify_close(&c, &mut e), Ending::InjectedReset);
        assert!(e.signals.contains(&Signal::BeforeHeartbeat), "{e:?}");
    }

    #[test]
    fn where_the_ttl_is_silent_an_ack_of_bytes_never_sent_alone_makes_it_injected() {
        let mut c = facts();
        c.forged = vec![Signal::AckAheadOfServer];
        let mut e = Evidence::default();
        assert_eq!(classify_close(&c, &mut e), Ending::InjectedReset);
        // A sequence number off the client's is one more sign, not enough alone.
        c.forged = vec![Signal::SeqOffClient];
        assert_eq!(classify_close(&c, &mut e), Ending::ClientReset);
        c.forged = vec![Signal::WindowOffClient, Signal::SeqOffClient];
        assert_eq!(classify_close(&c, &mut e), Ending::InjectedReset);
        assert!(e.signals.contains(&Signal::SeqOffClient), "{e:?}");
    }

    #[test]
    fn timing_decides_a_reset_on_the_next_packet_whatever_its_ttl() {
        for ttl_is_clients in [Some(true), Some(false), None] {
            let mut c = facts();
            c.ttl_is_clients = ttl_is_clients;
            c.after_server_gap = Some(ServerSend {
                silence_s: 30.0,
                probe: false,
            });
            c.since_server = Some(0.05);
            let mut e = Evidence::default();
            assert_eq!(classify_close(&c, &mut e), Ending::ResetOnNextPacket);
            assert_eq!(e.silence_seconds, 30.0);
            assert!(e.signals.contains(&Signal::NextPacketTiming));
        }
    }

    #[test]
    fn an_rst_before_the_servers_send_or_after_the_window_is_no_next_packet_kill() {
        let mut c = facts();
        c.since_server = Some(0.05);
        let mut e = Evidence::default();
        assert_eq!(classify_close(&c, &mut e), Ending::ClientReset);
        c.after_server_gap = Some(ServerSend {
            silence_s: 30.0,
            probe: false,
        });
        c.since_server = Some(1.5);
        assert_eq!(classify_close(&c, &mut e), Ending::ClientReset);
    }
}
