//! The detector, fed by the real state machine from scripted packets.

use std::net::IpAddr;
use std::time::Duration;

use monitor_common::{
    craft::Tcp, parse_ethernet, Config, Dir, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
};

use super::*;
use crate::replay::Replay;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const SERVER: &str = "192.0.2.1";
/// Client packets arrive with this TTL; a middlebox one hop closer uses 64.
const CLIENT_TTL: u8 = 60;

fn cfg() -> DetectorConfig {
    DetectorConfig {
        min_heartbeat: Duration::from_secs(10),
        max_heartbeat: Duration::from_secs(45),
        min_silence: Duration::from_secs(5),
        black_hole_after: Duration::from_secs(30),
        hbi_sample_size: 10,
        hbi_alert_threshold: Duration::from_secs(30),
        ..DetectorConfig::default()
    }
}

/// One scripted TCP connection seen from the server host.
struct Conn {
    client: IpAddr,
    server: IpAddr,
    port: u16,
    cseq: u32,
    sseq: u32,
}

struct Lab {
    replay: Replay,
    det: Detector,
    out: Vec<Output>,
    next_port: u16,
    /// Mark every event as the kernel does after losing one of the flow's.
    lose_events: bool,
    /// (window, IP ID) of the next packet sent, once (a forged RST's).
    forge_next: Option<(u16, u16)>,
}

impl Lab {
    fn new(cfg: DetectorConfig) -> Lab {
        let mut k = Config::DEFAULT;
        k.gap_threshold_ns = cfg.min_silence.as_nanos() as u64;
        Lab {
            replay: Replay::new(k),
            det: Detector::new(cfg).unwrap(),
            out: Vec::new(),
            next_port: 40000,
            lose_events: false,
            forge_next: None,
        }
    }

    // A scripted packet has this many fields; naming each at the call site reads best.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        c: &mut Conn,
        at: u64,
        dir: Dir,
        flags: u8,
        payload: usize,
        ttl: u8,
        seq: Option<u32>,
    ) {
        let server = c.server;
        let mut t = match dir {
            Dir::In => Tcp::syn(c.client, server),
            Dir::Out => Tcp::syn(server, c.client),
        };
        let (sp, dp) = match dir {
            Dir::In => (c.port, 443),
            Dir::Out => (443, c.port),
        };
        t.sport = sp;
        t.dport = dp;
        t.flags = flags;
        t.payload = payload;
        t.ttl = ttl;
        if let Some((window, ip_id)) = self.forge_next.take() {
            t.window = window;
            t.ip_id = ip_id;
        }
        // Each side acknowledges all the other has sent, as a stack does.
        t.ack = match dir {
            Dir::In => c.sseq,
            Dir::Out => c.cseq,
        };
        let own = match dir {
            Dir::In => &mut c.cseq,
            Dir::Out => &mut c.sseq,
        };
        t.seq = seq.unwrap_or(*own);
        if seq.is_none() {
            *own = own.wrapping_add(payload as u32 + u32::from(flags & (TCP_SYN | TCP_FIN) != 0));
        }
        let pkt = parse_ethernet(t.frame().as_slice()).unwrap();
        for mut ev in self.replay.packet(&pkt, dir, at) {
            if self.lose_events {
                ev.raw.flow_state |= monitor_common::state::EVENT_LOST;
            }
            let o = self.det.ingest(&ev);
            self.out.extend(o);
        }
    }

    /// Handshake at `at`; the connection is then ready for pings.
    fn connect(&mut self, client: &str, at: u64) -> Conn {
        self.connect_rtt(client, at, MS)
    }

    /// Handshake at `at` over a path of round-trip time `rtt`.
    fn connect_rtt(&mut self, client: &str, at: u64, rtt: u64) -> Conn {
        self.connect_between(client, SERVER, at, rtt)
    }

    /// Handshake from `client` to `server` at `at` over a round trip `rtt`.
    fn connect_between(&mut self, client: &str, server: &str, at: u64, rtt: u64) -> Conn {
        self.next_port += 1;
        let mut c = Conn {
            client: client.parse().unwrap(),
            server: server.parse().unwrap(),
            port: self.next_port,
            cseq: 1000,
            sseq: 9000,
        };
        self.send(&mut c, at, Dir::In, TCP_SYN, 0, CLIENT_TTL, None);
        self.send(&mut c, at + MS, Dir::Out, TCP_SYN | TCP_ACK, 0, 64, None);
        self.send(&mut c, at + MS + rtt, Dir::In, TCP_ACK, 0, CLIENT_TTL, None);
        c
    }

    /// The device sends a Ping at `at`; the server ACKs 1 ms later.
    fn ping(&mut self, c: &mut Conn, at: u64) {
        self.send(c, at, Dir::In, TCP_ACK | TCP_PSH, 300, CLIENT_TTL, None);
        self.send(c, at + MS, Dir::Out, TCP_ACK, 0, 64, None);
    }

    /// The client's bare ACK at `at` (of a probe, say).
    fn client_ack(&mut self, c: &mut Conn, at: u64) {
        self.send(c, at, Dir::In, TCP_ACK, 0, CLIENT_TTL, None);
    }

    /// The server answers at `at`; the client ACKs one RTT later.
    fn answer(&mut self, c: &mut Conn, at: u64, rtt: u64) {
        self.send(c, at, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
        self.send(c, at + rtt, Dir::In, TCP_ACK, 0, CLIENT_TTL, None);
    }

    /// The verdicts so far, resets held for a burst judged first (as at
    /// the end of a capture).
    fn verdicts(&mut self) -> Vec<Verdict> {
        let held = self.det.conclude_held();
        self.out.extend(held);
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Verdict(v) => Some(v.clone()),
                _ => None,
            })
            .collect()
    }

    fn last(&mut self) -> Verdict {
        self.verdicts().pop().expect("a verdict")
    }
}

/// Ping at 1 s; the server answers at 41 s, then resends the answer 200 ms
/// later (nobody acknowledged it).
fn answer_then_resend(lab: &mut Lab, c: &mut Conn) {
    lab.ping(c, S);
    let seq = c.sseq;
    lab.send(c, 41 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
    lab.send(
        c,
        41 * S + 200 * MS,
        Dir::Out,
        TCP_ACK | TCP_PSH,
        200,
        64,
        Some(seq),
    );
}

/// A healthy cycle: ping at t, answer after `hb`. Returns the time after.
fn cycle(lab: &mut Lab, c: &mut Conn, t: u64, hb: u64) -> u64 {
    lab.ping(c, t);
    lab.answer(c, t + hb, 20 * MS);
    t + hb + 30 * MS
}

#[test]
fn client_fin_after_a_healthy_ping_is_a_normal_close() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    // Two answers: one alone could be early, and no heartbeat is claimed from it.
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let t = cycle(&mut lab, &mut c, t, 40 * S);
    lab.send(
        &mut c,
        t + S,
        Dir::In,
        TCP_FIN | TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
    let v = lab.last();
    assert_eq!(v.ending, Ending::ClientFin);
    assert!(!v.premature);
    assert_eq!(v.heartbeat_seconds.map(|h| h.round()), Some(40.0));
}

#[test]
fn server_fin_and_server_rst_are_the_servers() {
    for (flags, ending) in [
        (TCP_FIN | TCP_ACK, Ending::ServerFin),
        (TCP_RST, Ending::ServerReset),
    ] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect("198.51.100.7", 0);
        lab.send(&mut c, S, Dir::Out, flags, 0, 64, None);
        assert_eq!(lab.last().ending, ending);
        assert!(!lab.last().premature);
    }
}

#[test]
fn rst_ttl_exactly_at_tolerance_is_the_clients_and_one_beyond_is_injected() {
    // Baseline 60; tolerance 2: 62 is the client's own, 63 is a middlebox's.
    for (ttl, ending) in [
        (62, Ending::ClientReset),
        (58, Ending::ClientReset),
        (63, Ending::InjectedReset),
        (57, Ending::InjectedReset),
    ] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect("198.51.100.7", 0);
        let t = cycle(&mut lab, &mut c, S, 40 * S);
        // A silence of 20 s with no request pending, then the RST.
        lab.send(&mut c, t + 20 * S, Dir::In, TCP_RST, 0, ttl, None);
        let v = lab.last();
        assert_eq!(v.ending, ending, "ttl {ttl}");
        assert_eq!(v.evidence.rst_ttl, Some(ttl));
        assert_eq!(
            (v.evidence.client_ttl_min, v.evidence.client_ttl_max),
            (Some(60), Some(60))
        );
    }
}

/// A Ping at 1 s, then after 20 s of silence `bytes` of client data and at
/// once its FIN: the verdict.
fn data_then_fin(bytes: usize) -> Verdict {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    let at = S + MS + 20 * S;
    lab.send(
        &mut c,
        at,
        Dir::In,
        TCP_ACK | TCP_PSH,
        bytes,
        CLIENT_TTL,
        None,
    );
    let fin = TCP_FIN | TCP_ACK;
    lab.send(&mut c, at + MS, Dir::In, fin, 0, CLIENT_TTL, None);
    lab.last()
}

#[test]
fn a_tls_close_notify_before_the_fin_keeps_the_silence_and_the_answer_owed() {
    // A TLS-terminating proxy closing at its timeout: the 31-byte alert
    // ends the silence, the FIN follows at once.
    let v = data_then_fin(31);
    assert_eq!(v.ending, Ending::ProxyTimeout, "{v:#?}");
    assert!(v.premature);
    assert!((v.evidence.silence_seconds - 20.0).abs() < 0.01, "{v:#?}");
    // A request (more than an alert), or a few bytes of the client's own
    // data (less than one), before the FIN is no close_notify.
    for bytes in [300, 5] {
        assert_eq!(
            data_then_fin(bytes).ending,
            Ending::ClientFin,
            "{bytes} bytes"
        );
    }
}

#[test]
fn injected_reset_at_expiry_while_a_ping_is_pending_is_premature_with_its_silence() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    lab.send(&mut c, S + MS + 20 * S, Dir::In, TCP_RST, 0, 64, None);
    let v = lab.last();
    assert_eq!(v.ending, Ending::InjectedReset);
    assert!(v.premature);
    assert!(v.evidence.server_owed_answer);
    assert!((v.evidence.silence_seconds - 20.0).abs() < 1e-6);
}

#[test]
fn injected_reset_silence_just_below_and_above_the_heartbeat() {
    // Heartbeat 40 s is known from two earlier healthy cycles; no Ping pending.
    for (silence, premature) in [(39 * S, true), (41 * S, false)] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect("198.51.100.7", 0);
        let t = cycle(&mut lab, &mut c, S, 40 * S);
        let t = cycle(&mut lab, &mut c, t, 40 * S);
        lab.send(&mut c, t + silence, Dir::In, TCP_RST, 0, 64, None);
        let v = lab.last();
        assert_eq!(v.ending, Ending::InjectedReset);
        assert_eq!(v.premature, premature, "silence {silence}");
    }
}

#[test]
fn rst_one_rtt_after_the_servers_answer_is_reset_on_next_packet_ten_seconds_after_is_not() {
    for (delay, ending) in [
        (30 * MS, Ending::ResetOnNextPacket),
        (10 * S, Ending::InjectedReset),
    ] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect("198.51.100.7", 0);
        lab.ping(&mut c, S);
        // The middlebox forgot the flow; the server answers at 40 s.
        lab.send(&mut c, 41 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
        lab.send(&mut c, 41 * S + delay, Dir::In, TCP_RST, 0, 64, None);
        let v = lab.last();
        assert_eq!(v.ending, ending, "delay {delay}");
        assert!(v.premature || ending == Ending::InjectedReset);
        if ending == Ending::ResetOnNextPacket {
            // The silence that killed it is the one before the answer.
            assert!((v.evidence.silence_seconds - 40.0).abs() < 0.01, "{v:?}");
        }
    }
}

/// Issue 13's second flaw: the TTL vetoed the timing. A box next to the
/// client (a carrier NAT) resets with the client's own TTL.
#[test]
fn reset_on_next_packet_with_the_clients_own_ttl_is_a_kill_at_or_next_to_the_client() {
    for (ttl, location) in [
        (CLIENT_TTL, BoxLocation::AtOrNextToClient),
        (CLIENT_TTL + 1, BoxLocation::AtOrNextToClient),
        (64, BoxLocation::OnThePath),
    ] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect("198.51.100.7", 0);
        lab.ping(&mut c, S);
        lab.send(&mut c, 41 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
        lab.send(&mut c, 41 * S + 30 * MS, Dir::In, TCP_RST, 0, ttl, None);
        let v = lab.last();
        assert_eq!(v.ending, Ending::ResetOnNextPacket, "ttl {ttl}");
        assert!(v.premature);
        assert_eq!(v.evidence.location, Some(location), "ttl {ttl}");
        assert!(v.evidence.signals.contains(&Signal::NextPacketTiming));
        let r = lab.det.report();
        assert_eq!(r.killing_paths[0].box_location, Some(location));
        let text = crate::render::report(&r);
        assert!(text.contains("where: "), "{text}");
    }
}

#[test]
fn the_next_packet_window_follows_the_handshake_rtt() {
    // 1 ms RTT: the window is ~0.25 s, so an RST 0.6 s after the answer is
    // not its answer; over a 400 ms path it is.
    for (rtt, ending) in [
        (MS, Ending::ClientReset),
        (400 * MS, Ending::ResetOnNextPacket),
    ] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect_rtt("198.51.100.7", 0, rtt);
        lab.ping(&mut c, S);
        lab.send(&mut c, 41 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
        lab.send(
            &mut c,
            41 * S + 600 * MS,
            Dir::In,
            TCP_RST,
            0,
            CLIENT_TTL,
            None,
        );
        let v = lab.last();
        assert_eq!(v.ending, ending, "rtt {rtt}");
        let w = v.evidence.next_packet_window_seconds.unwrap();
        assert!((w - (2.0 * rtt as f64 / 1e9 + 0.25)).abs() < 1e-6, "{w}");
    }
}

#[test]
fn where_the_ttl_is_silent_an_rst_with_window_and_ip_id_off_the_clients_is_injected() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    // 20 s of silence, then an RST with the client's TTL but window 0 and IP ID 0.
    lab.forge_next = Some((0, 0));
    lab.send(&mut c, t + 20 * S, Dir::In, TCP_RST, 0, CLIENT_TTL, None);
    let v = lab.last();
    assert_eq!(v.ending, Ending::InjectedReset, "{v:?}");
    assert_eq!(v.evidence.location, Some(BoxLocation::AtOrNextToClient));
    for s in [Signal::ClientTtl, Signal::WindowOffClient, Signal::IpIdZero] {
        assert!(v.evidence.signals.contains(&s), "{s:?} in {v:?}");
    }
    // The client's own RST (its window and IP ID) after the same silence is its own.
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    lab.send(
        &mut c,
        t + 20 * S,
        Dir::In,
        TCP_RST | TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
    assert_eq!(lab.last().ending, Ending::ClientReset);
}

#[test]
fn unanswered_retransmission_then_reconnect_is_a_black_hole_and_churn() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    answer_then_resend(&mut lab, &mut c);
    assert!(lab.verdicts().is_empty());
    // The device gives up and reconnects from the same address.
    let _c2 = lab.connect("198.51.100.7", 50 * S);
    let v = lab.verdicts()[0].clone();
    assert_eq!(v.ending, Ending::BlackHole);
    assert!(v.premature);
    assert!((v.evidence.silence_seconds - 40.0).abs() < 0.01);
    assert_eq!(lab.det.stats.churn, 1);
    assert!(lab.out.iter().any(|o| matches!(o, Output::Churn { .. })));
}

/// A reconnect later than the device's own wait (its request at 1 s plus
/// the heartbeat, here unknown so `max_heartbeat` 45 s) plus
/// `black_hole_after` (30 s) no longer tells the old flow's fate: the
/// device may have come back into coverage. The old flow ends vanished.
#[test]
fn a_reconnect_later_than_the_devices_wait_plus_black_hole_after_is_no_black_hole() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    answer_then_resend(&mut lab, &mut c);
    lab.out.extend(lab.det.tick(77 * S));
    let _c2 = lab.connect("198.51.100.7", 78 * S);
    assert!(lab.verdicts().is_empty(), "{:?}", lab.verdicts());
    lab.send(&mut c, 200 * S, Dir::Out, TCP_RST, 0, 64, None);
    assert_eq!(lab.last().ending, Ending::Vanished);
    assert_eq!(lab.det.stats.endings[Ending::BlackHole as usize], 0);
}

/// A client that goes dark (out of coverage, switched off) while the
/// server's answer is retransmitted looks like a black hole from here; heard
/// nowhere since, it kills nothing: no verdict at `black_hole_after`, and
/// the server's give-up is a vanished client.
#[test]
fn a_client_gone_dark_is_no_black_hole() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    answer_then_resend(&mut lab, &mut c);
    assert!(lab.det.tick(41 * S + 31 * S).is_empty());
    lab.send(&mut c, 200 * S, Dir::Out, TCP_RST, 0, 64, None);
    let v = lab.last();
    assert_eq!(v.ending, Ending::Vanished, "{v:?}");
    assert!(!v.premature);
    assert!(lab.det.report().killing_paths.is_empty());
}

/// An answer sent at once (mail was waiting) that goes unanswered followed
/// no silence: no idle timer expired, so it is no premature kill and no
/// sample for the path's estimate.
#[test]
fn an_unanswered_send_after_no_silence_is_no_premature_kill() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    let seq = c.sseq;
    lab.send(
        &mut c,
        S + 10 * MS,
        Dir::Out,
        TCP_ACK | TCP_PSH,
        200,
        64,
        None,
    );
    // Retransmitted after the client stayed silent past the gap threshold.
    lab.send(
        &mut c,
        8 * S,
        Dir::Out,
        TCP_ACK | TCP_PSH,
        200,
        64,
        Some(seq),
    );
    let _c2 = lab.connect("198.51.100.7", 20 * S);
    let v = lab.last();
    assert_eq!(v.ending, Ending::BlackHole, "{v:?}");
    assert!(!v.premature, "{v:?}");
    let (_, path) = lab.det.paths().next().unwrap();
    assert!(path.kills.is_empty());
}

#[test]
fn answered_retransmission_is_no_black_hole() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    answer_then_resend(&mut lab, &mut c);
    lab.send(
        &mut c,
        41 * S + 220 * MS,
        Dir::In,
        TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
    assert!(lab.det.tick(200 * S).is_empty());
    let _ = lab.connect("198.51.100.7", 201 * S);
    assert!(lab.verdicts().is_empty());
}

#[test]
fn client_side_close_while_the_server_owes_an_answer_is_a_proxy_timeout() {
    for flags in [TCP_FIN | TCP_ACK, TCP_RST] {
        let mut lab = Lab::new(cfg());
        let mut c = lab.connect("198.51.100.7", 0);
        lab.ping(&mut c, S);
        lab.send(&mut c, S + MS + 25 * S, Dir::In, flags, 0, CLIENT_TTL, None);
        let v = lab.last();
        assert_eq!(v.ending, Ending::ProxyTimeout, "flags {flags:#x}");
        assert!(v.premature);
        assert!((v.evidence.silence_seconds - 25.0).abs() < 1e-6);
    }
}

#[test]
fn client_fin_soon_after_a_request_is_not_a_proxy_timeout() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    lab.send(
        &mut c,
        S + 2 * S,
        Dir::In,
        TCP_FIN | TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
    assert_eq!(lab.last().ending, Ending::ClientFin);
}

/// RTT jitter between 10 and 90 ms, deterministic.
fn jitter(i: u64) -> u64 {
    10 * MS + (i * 7919 % 81) * MS
}

#[test]
fn estimate_converges_on_a_reset_at_expiry_path_with_rtt_jitter() {
    let mut lab = Lab::new(DetectorConfig {
        max_heartbeat: Duration::from_secs(1800),
        min_heartbeat: Duration::from_secs(60),
        ..cfg()
    });
    let mut t = 0;
    for i in 0..40 {
        let mut c = lab.connect("198.51.100.7", t);
        lab.ping(&mut c, t + S);
        // F5-like: RST at 300 s of silence, seen one-way-delay later.
        lab.send(
            &mut c,
            t + S + MS + 300 * S + jitter(i) / 2,
            Dir::In,
            TCP_RST,
            0,
            64,
            None,
        );
        t += 400 * S;
    }
    let r = lab.det.report();
    let p = &r.killing_paths[0];
    assert_eq!(p.path, "198.51.100.0/24:443");
    assert_eq!(p.premature_kills, 40);
    let est = p.estimate.as_ref().unwrap();
    let err = (est.seconds() - 300.0).abs();
    assert!(err < 0.1, "estimate {est:?}");
    assert_eq!(est.confidence(), super::path::Confidence::High);
    assert!(
        p.likely_devices[0].starts_with("F5 BIG-IP FastL4"),
        "{:?}",
        p.likely_devices
    );
    assert_eq!(p.recommended_idle_timeout_seconds, Some(1800.0 + 120.0));
    // Where the F5 cannot be changed: keepalive under its 300 s by 10 %.
    let k = p
        .keepalive_cure
        .expect("a reset at expiry is cured by keepalive");
    assert!((265..=270).contains(&k.idle_seconds), "{k:?}");
    assert_eq!((k.interval_seconds, k.count), (67, 4));
    let text = crate::render::report(&r);
    assert!(
        text.contains(&format!(
            "so_keepalive={}s:67s:4 on the listen directive of port 443",
            k.idle_seconds
        )),
        "{text}"
    );
}

#[test]
fn bracket_from_varying_heartbeats_contains_the_timeout_and_narrows_to_the_step() {
    // Silent forgetting at T = 22 s; a Windows Mobile-like device tries 16,
    // 20, 24 s heartbeats (step 4 s), reverting after each failure.
    let mut lab = Lab::new(cfg());
    let mut t = 0;
    let mut hb = 16u64;
    for _ in 0..12 {
        let mut c = lab.connect("198.51.100.7", t);
        let mut now = t + S;
        loop {
            lab.ping(&mut c, now);
            if hb < 22 {
                lab.answer(&mut c, now + hb * S, 20 * MS);
                now += hb * S + 30 * MS;
                hb += 4;
            } else {
                lab.send(
                    &mut c,
                    now + hb * S,
                    Dir::Out,
                    TCP_ACK | TCP_PSH,
                    200,
                    64,
                    None,
                );
                lab.send(
                    &mut c,
                    now + hb * S + 20 * MS,
                    Dir::In,
                    TCP_RST,
                    0,
                    64,
                    None,
                );
                hb -= 4;
                t = now + hb * S + S;
                break;
            }
        }
    }
    let r = lab.det.report();
    let p = &r.killing_paths[0];
    match p.estimate.as_ref().unwrap() {
        Estimate::Bracket {
            low_seconds,
            high_seconds,
            ..
        } => {
            assert!(
                *low_seconds < 22.0 && 22.0 <= *high_seconds,
                "{low_seconds}..{high_seconds}"
            );
            assert!(
                high_seconds - low_seconds <= 4.0 + 0.1,
                "{low_seconds}..{high_seconds}"
            );
        }
        e => panic!("{e:?}"),
    }
    assert!(
        p.likely_devices.is_empty(),
        "scaled numbers match no default"
    );
}

#[test]
fn window_alert_names_the_killing_path_not_the_healthy_one() {
    let mut lab = Lab::new(cfg());
    // A healthy path: heartbeats of 40 s.
    let mut h = lab.connect("203.0.113.5", 0);
    let mut t = S;
    for _ in 0..3 {
        t = cycle(&mut lab, &mut h, t, 40 * S);
    }
    // A killing path: kills at 15 s, enough to pull the mean below 30 s.
    for i in 0..10 {
        let mut c = lab.connect("198.51.100.7", t + i * 20 * S);
        lab.ping(&mut c, t + i * 20 * S + S);
        lab.send(
            &mut c,
            t + i * 20 * S + S + MS + 15 * S,
            Dir::In,
            TCP_RST,
            0,
            64,
            None,
        );
    }
    let alert = lab
        .out
        .iter()
        .find_map(|o| match o {
            Output::Alert(a) => Some(a.clone()),
            _ => None,
        })
        .expect("the window alert fired");
    assert_eq!(alert.culprits[0].0.to_string(), "198.51.100.0/24:443");
    assert!(alert
        .culprits
        .iter()
        .all(|(p, _)| p.to_string() != "203.0.113.0/24:443"));
    // Rate limited: one alert in this hour, though every sample kept it low.
    let alerts = lab
        .out
        .iter()
        .filter(|o| matches!(o, Output::Alert(_)))
        .count();
    assert_eq!(alerts, 1);
}

#[test]
fn paths_are_bounded_and_evictions_counted() {
    let mut lab = Lab::new(DetectorConfig {
        max_paths: 8,
        ..cfg()
    });
    for i in 0..20u64 {
        let mut c = lab.connect(&format!("198.51.{i}.7"), i * S);
        lab.send(
            &mut c,
            i * S + 10 * MS,
            Dir::In,
            TCP_FIN | TCP_ACK,
            0,
            CLIENT_TTL,
            None,
        );
    }
    assert_eq!(lab.det.paths().count(), 8);
    assert_eq!(lab.det.stats.paths_evicted, 12);
}

#[test]
fn flows_are_bounded_and_the_excess_counted() {
    let mut lab = Lab::new(DetectorConfig {
        max_flows: 5,
        ..cfg()
    });
    for i in 0..9u64 {
        lab.connect("198.51.100.7", i * S);
    }
    assert_eq!(lab.det.flows_tracked(), 5);
    assert_eq!(lab.det.stats.flows_not_tracked, 4);
}

#[test]
fn flows_the_kernel_dropped_without_a_close_vanish() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let _ = cycle(&mut lab, &mut c, S, 40 * S);
    let out = lab.det.retire_missing(100 * S, |_| false);
    assert!(
        matches!(&out[..], [Output::Verdict(v)] if v.ending == Ending::Vanished && !v.premature)
    );
    assert_eq!(lab.det.flows_tracked(), 0);
}

#[test]
fn early_answers_are_hold_times_but_not_heartbeat_samples() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    // New mail after 3 s: Status 2, early answer (below min_heartbeat 10 s).
    lab.ping(&mut c, S);
    lab.answer(&mut c, S + 6 * S, 20 * MS);
    // A hold time counts once the answer is proven delivered: the client
    // is heard after it (here by the next answer's event).
    assert_eq!(lab.det.stats.hold_times, 0);
    let t = cycle(&mut lab, &mut c, 10 * S, 40 * S);
    assert_eq!(lab.det.stats.hold_times, 1);
    assert_eq!(lab.det.window().len(), 0);
    lab.send(
        &mut c,
        t + S,
        Dir::In,
        TCP_FIN | TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
    assert_eq!(lab.det.stats.hold_times, 2);
    assert_eq!(lab.det.window().len(), 1);
}

/// The lab's black hole with mail arriving: an early answer (new mail)
/// falls into the black hole before any no-change answer was seen; its
/// hold time is no heartbeat (it was never delivered, and it was early).
#[test]
fn a_killed_answer_is_no_heartbeat_sample() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    answer_then_resend(&mut lab, &mut c);
    let _c2 = lab.connect("198.51.100.7", 50 * S);
    let v = lab.verdicts()[0].clone();
    assert_eq!(v.ending, Ending::BlackHole);
    assert_eq!(v.heartbeat_seconds, None, "{v:?}");
    assert_eq!(lab.det.stats.hold_times, 0);
}

#[test]
fn report_text_names_path_timeout_how_device_and_cure() {
    let mut lab = Lab::new(cfg());
    for i in 0..5u64 {
        let mut c = lab.connect("198.51.100.7", i * 60 * S);
        lab.ping(&mut c, i * 60 * S + S);
        lab.send(
            &mut c,
            i * 60 * S + S + MS + 20 * S,
            Dir::In,
            TCP_RST,
            0,
            64,
            None,
        );
    }
    let text = crate::render::report(&lab.det.report());
    assert!(
        text.contains("PATH 198.51.100.0/24:443: 5 of 5 flows killed"),
        "{text}"
    );
    assert!(text.contains("reset injected by a middlebox"), "{text}");
    assert!(text.contains("idle timeout: 20.0 s"), "{text}");
    assert!(text.contains("no known default matches"), "{text}");
    assert!(text.contains("at least 165 s"), "{text}");
}

#[test]
fn no_heartbeat_claim_where_kills_come_before_any_heartbeat_answer() {
    let mut lab = Lab::new(cfg());
    // Healthy path: heartbeats of 40 s.
    let mut h = lab.connect("203.0.113.5", 0);
    let mut t = S;
    for _ in 0..3 {
        t = cycle(&mut lab, &mut h, t, 40 * S);
    }
    // Killing path at expiry (20 s): only early answers (12 s) get through.
    for i in 0..4u64 {
        let mut c = lab.connect("198.51.100.7", t + i * 60 * S);
        let t0 = t + i * 60 * S + S;
        lab.ping(&mut c, t0);
        lab.answer(&mut c, t0 + 12 * S, 20 * MS);
        lab.ping(&mut c, t0 + 13 * S);
        lab.send(
            &mut c,
            t0 + 13 * S + MS + 20 * S,
            Dir::In,
            TCP_RST,
            0,
            64,
            None,
        );
    }
    let r = lab.det.report();
    assert_eq!(r.killing_paths[0].how, Some(Ending::InjectedReset));
    assert!(r.killing_paths[0].median_heartbeat_seconds.unwrap() < 13.0);
    assert!(
        !crate::render::report(&r).contains("shorter heartbeats"),
        "{}",
        crate::render::report(&r)
    );
}

#[test]
fn one_early_answer_does_not_pass_for_a_shorter_heartbeat_but_a_back_off_does() {
    let mut lab = Lab::new(cfg());
    // A fixed 40 s device: a heartbeat answer, then one early (new mail) at 12 s.
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let t = cycle(&mut lab, &mut c, t, 12 * S);
    // Proven delivered once the client is heard after them (the next cycle).
    let t = cycle(&mut lab, &mut c, t, 40 * S);
    let path = lab.det.path_of("198.51.100.7".parse().unwrap(), 443);
    let p = lab.det.paths().find(|(k, _)| **k == path).unwrap().1;
    assert_eq!(p.median_heartbeat().map(f64::round), Some(40.0));
    // A device that backs off to 25 s for good: after three samples that is its heartbeat.
    let mut t = t;
    for _ in 0..3 {
        t = cycle(&mut lab, &mut c, t, 25 * S);
    }
    let p = lab.det.paths().find(|(k, _)| **k == path).unwrap().1;
    assert_eq!(p.median_heartbeat().map(f64::round), Some(25.0));
}

#[test]
fn a_flow_with_lost_events_is_incomplete_and_kept_out_of_the_estimate() {
    let mut lab = Lab::new(cfg());
    // Two flows killed by an injected reset at 20 s; the second lost events.
    for lost in [false, true] {
        lab.lose_events = lost;
        let client = if lost { "198.51.100.8" } else { "198.51.100.7" };
        let mut c = lab.connect(client, 0);
        lab.ping(&mut c, S);
        lab.send(&mut c, 21 * S, Dir::In, TCP_RST, 0, 64, None);
        let v = lab.last();
        assert_eq!(v.ending, Ending::InjectedReset);
        assert_eq!(v.incomplete, lost);
        assert_eq!(v.to_string().contains("incomplete"), lost, "{v}");
    }
    assert_eq!(lab.det.stats.incomplete, 1);
    let p = &lab.det.report().killing_paths[0];
    assert_eq!((p.kills, p.incomplete_flows), (2, 1));
    // One kill feeds the estimate: a point estimate from one kill, not two.
    let (_, path) = lab.det.paths().next().unwrap();
    assert_eq!(path.kills.len(), 1);
}

#[test]
fn a_bracket_without_a_survived_silence_gives_only_its_upper_bound() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    answer_then_resend(&mut lab, &mut c);
    let _c2 = lab.connect("198.51.100.7", 50 * S);
    let text = crate::render::report(&lab.det.report());
    assert!(
        text.contains("idle timeout: at most 40.0 s (shortest silence that was killed"),
        "{text}"
    );
    assert!(!text.contains("between 0.0 s"), "{text}");
}

/// The longest silence the path has proven to survive (quiet or killing).
fn longest_survived(lab: &Lab) -> f64 {
    let r = lab.det.report();
    r.killing_paths
        .iter()
        .chain(&r.quiet_paths)
        .map(|p| p.longest_survived_seconds)
        .fold(0.0, f64::max)
}

/// Issue 13's first flaw: a server send after a silence is no proof the
/// silence survived; only the client heard after it is.
#[test]
fn a_silence_the_client_is_never_heard_after_has_not_survived() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    // 20 s: answered, and the client speaks after it (its next Ping, 12 s on).
    let t = cycle(&mut lab, &mut c, S, 20 * S);
    lab.ping(&mut c, t + 12 * S);
    // 24 s: the server's answer goes out, the client is never heard again,
    // and the server gives up with a FIN (a normal ending, not a kill).
    let answered = t + 12 * S + 24 * S;
    lab.send(&mut c, answered, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
    lab.send(
        &mut c,
        answered + 10 * S,
        Dir::Out,
        TCP_FIN | TCP_ACK,
        0,
        64,
        None,
    );
    assert_eq!(lab.last().ending, Ending::ServerFin);
    let survived = longest_survived(&lab);
    assert!(
        survived < 21.0,
        "the 24 s silence was never acknowledged by the client: {survived}"
    );
    // The 20 s silence the client spoke after did survive.
    assert!(survived > 19.0, "{survived}");
}

/// Issue 13's first flaw, with a device raising its heartbeat step by step:
/// the answer at the new, longer heartbeat falls into a black hole; the
/// bracket lies between the last answered silence and that one.
#[test]
fn a_black_hole_under_a_rising_heartbeat_brackets_between_the_last_answered_and_the_killed() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let mut t = S;
    for hb in [11, 15, 19] {
        t = cycle(&mut lab, &mut c, t, hb * S);
    }
    // 23 s: the answer and its retransmission vanish; the device reconnects.
    answer_then_resend_after(&mut lab, &mut c, t, 23 * S);
    let _c2 = lab.connect("198.51.100.7", t + MS + 23 * S + 5 * S);
    let p = &lab.det.report().killing_paths[0];
    assert_eq!(p.how, Some(Ending::BlackHole));
    let Some(Estimate::Bracket {
        low_seconds,
        high_seconds,
        ..
    }) = p.estimate
    else {
        panic!("{p:?}")
    };
    assert!((low_seconds - 19.0).abs() < 0.1, "{p:?}");
    assert!((high_seconds - 23.0).abs() < 0.1, "{p:?}");
    assert!((p.longest_survived_seconds - 19.0).abs() < 0.1, "{p:?}");
}

/// Real-scale black holes killing 60 s answers: with no survival below
/// them the bracket is open below and pins no device; once a 50 s silence
/// survives, (50, 60] holds one known default and names it.
#[test]
fn a_bracket_names_a_device_only_when_closed_below_and_holding_one_default() {
    let real = || DetectorConfig {
        black_hole_after: Duration::from_secs(30),
        ..DetectorConfig::default()
    };
    let kill = |lab: &mut Lab, at: u64| {
        let mut c = lab.connect("198.51.100.7", at);
        answer_then_resend_after(lab, &mut c, at + S, 60 * S);
        // The device gives up and reconnects.
        let resent = at + S + MS + 60 * S + 200 * MS;
        let _ = lab.connect("198.51.100.7", resent + 10 * S);
    };
    let mut lab = Lab::new(real());
    kill(&mut lab, 0);
    let r = lab.det.report();
    let p = &r.killing_paths[0];
    assert!(p.likely_devices.is_empty(), "{p:?}");
    assert_eq!(p.defaults_in_range.len(), 1, "{p:?}");
    let text = crate::render::report(&r);
    assert!(text.contains("fits 1 known default"), "{text}");
    // A 50 s silence that survives (answered and acknowledged) closes the bracket.
    let mut c = lab.connect("198.51.100.7", 200 * S);
    let _ = cycle(&mut lab, &mut c, 201 * S, 50 * S);
    lab.ping(&mut c, 300 * S);
    let p = &lab.det.report().killing_paths[0];
    assert_eq!(p.likely_devices.len(), 1, "{p:?}");
    assert!(p.likely_devices[0].contains("60 s"), "{p:?}");
    assert!(p.defaults_in_range.is_empty(), "{p:?}");
}

/// Issue 13's third flaw: a flow's early answer (new mail) was taken for
/// the heartbeat in force when that flow was later killed.
#[test]
fn an_early_answer_on_the_killed_flow_is_not_its_heartbeat() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let mut t = S;
    for _ in 0..2 {
        t = cycle(&mut lab, &mut c, t, 40 * S);
    }
    // A new flow: new mail answers after 12 s, then the next Ping is killed at 20 s.
    let mut c = lab.connect("198.51.100.7", t);
    let t = cycle(&mut lab, &mut c, t + S, 12 * S);
    lab.ping(&mut c, t);
    lab.send(&mut c, t + MS + 20 * S, Dir::In, TCP_RST, 0, 64, None);
    let v = lab.last();
    assert_eq!(v.ending, Ending::InjectedReset);
    assert_eq!(v.heartbeat_seconds.map(f64::round), Some(40.0), "{v:?}");
}

/// The lab's black hole with mail arriving half the time: two early answers
/// in a row are killed (held 21 and 25 s) before any no-change answer; they
/// are no heartbeat (early answers fall at random). A no-change answer held
/// for the same 40 s twice, even killed, is.
#[test]
fn killed_answers_count_for_the_heartbeat_only_where_they_repeat() {
    let mut lab = Lab::new(cfg());
    let mut t = 0;
    let mut kill = |lab: &mut Lab, hold: u64| {
        let mut c = lab.connect("198.51.100.7", t);
        answer_then_resend_after(lab, &mut c, t + S, hold);
        let _ = lab.connect("198.51.100.7", t + S + hold + 5 * S);
        t += hold + 10 * S;
    };
    kill(&mut lab, 21 * S);
    kill(&mut lab, 25 * S);
    assert_eq!(lab.last().ending, Ending::BlackHole);
    assert_eq!(lab.last().heartbeat_seconds, None, "{:?}", lab.last());
    kill(&mut lab, 40 * S);
    kill(&mut lab, 40 * S);
    let h = lab.last().heartbeat_seconds.map(f64::round);
    assert_eq!(h, Some(40.0), "{:?}", lab.last());
}

/// A Ping at `at`, its answer after `hold` resent 200 ms later: nobody
/// acknowledges it.
fn answer_then_resend_after(lab: &mut Lab, c: &mut Conn, at: u64, hold: u64) {
    lab.ping(c, at);
    let seq = c.sseq;
    let answered = at + MS + hold;
    lab.send(c, answered, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
    let resent = answered + 200 * MS;
    lab.send(c, resent, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, Some(seq));
}

/// An injector that does not track the connection: the client's TTL and
/// window copied, three RSTs 50 us apart at the client's next number plus
/// `aheads`.
fn spray_resets(lab: &mut Lab, c: &mut Conn, at: u64, aheads: [u32; 3]) {
    for (k, ahead) in aheads.into_iter().enumerate() {
        let seq = c.cseq.wrapping_add(ahead);
        let t = at + k as u64 * 50_000;
        lab.send(c, t, Dir::In, TCP_RST, 0, CLIENT_TTL, Some(seq));
    }
}

#[test]
fn a_spray_of_resets_with_the_clients_ttl_and_window_is_injected_by_its_sequence_numbers() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let t = cycle(&mut lab, &mut c, t, 40 * S);
    lab.ping(&mut c, t);
    spray_resets(&mut lab, &mut c, t + 20 * S, [1460, 2920, 0]);
    let v = lab.last();
    assert_eq!(v.ending, Ending::InjectedReset, "{v:?}");
    assert!(v.evidence.signals.contains(&Signal::SeqOffClient), "{v:?}");
    assert!(!v.evidence.signals.contains(&Signal::WindowOffClient));
    // Decided by its first reset: not held, so the burst is the path's.
    assert!(!v.evidence.signals.contains(&Signal::RstBurst), "{v:?}");
    let r = lab.det.report();
    let p = &r.killing_paths[0];
    assert_eq!(p.reset_bursts, 1, "{p:?}");
    let text = crate::render::report(&r);
    assert!(text.contains("1 resets came in bursts"), "{text}");
}

#[test]
fn a_burst_whose_first_reset_carries_the_clients_number_is_injected_by_the_burst() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let t = cycle(&mut lab, &mut c, t, 40 * S);
    lab.ping(&mut c, t);
    spray_resets(&mut lab, &mut c, t + 20 * S, [0, 1460, 2920]);
    // Held for the window, then judged with the burst: nothing before.
    let v = lab.last();
    assert_eq!(v.ending, Ending::InjectedReset, "{v:?}");
    assert!(!v.evidence.signals.contains(&Signal::SeqOffClient), "{v:?}");
    assert!(v.evidence.signals.contains(&Signal::RstBurst), "{v:?}");
    assert_eq!(
        v.at_ns,
        t + 20 * S,
        "the verdict keeps the first reset's time"
    );
}

#[test]
fn a_held_reset_is_judged_once_its_window_has_passed() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let judged = |lab: &Lab| lab.out.iter().any(|o| matches!(o, Output::Verdict(_)));
    // Without a silence before it a burst decides nothing: judged at once.
    lab.send(&mut c, t + S, Dir::In, TCP_RST, 0, CLIENT_TTL, None);
    assert!(judged(&lab), "no silence, nothing to wait for");
    lab.out.clear();
    let mut c = lab.connect("198.51.100.7", t + 2 * S);
    let t = cycle(&mut lab, &mut c, t + 3 * S, 40 * S);
    let rst = t + 20 * S;
    lab.send(&mut c, rst, Dir::In, TCP_RST, 0, CLIENT_TTL, None);
    assert!(!judged(&lab), "held for a possible burst");
    lab.out.extend(lab.det.tick(rst + 50 * MS));
    assert!(!judged(&lab), "still within the window");
    lab.out.extend(lab.det.tick(rst + 101 * MS));
    assert!(judged(&lab), "judged after the window");
}

#[test]
fn a_client_reconnecting_while_its_reset_is_held_is_churn() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let t = cycle(&mut lab, &mut c, t, 40 * S);
    // A proxy-like close (the server owes an answer), held, then a new
    // connection 10 ms later: the close is judged first, so it is churn.
    lab.ping(&mut c, t);
    lab.send(&mut c, t + 20 * S, Dir::In, TCP_RST, 0, CLIENT_TTL, None);
    lab.connect("198.51.100.7", t + 20 * S + 10 * MS);
    let churn = lab
        .out
        .iter()
        .filter(|o| matches!(o, Output::Churn { .. }))
        .count();
    assert_eq!(churn, 1, "{:?}", lab.last());
}

#[test]
fn a_clients_own_reset_at_its_next_number_repeated_is_no_burst() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 40 * S);
    let seq = c.cseq;
    // The client's stack answers two segments with the same number.
    lab.send(&mut c, t + S, Dir::In, TCP_RST, 0, CLIENT_TTL, Some(seq));
    lab.send(
        &mut c,
        t + S + MS,
        Dir::In,
        TCP_RST,
        0,
        CLIENT_TTL,
        Some(seq),
    );
    let v = lab.last();
    assert_eq!(v.ending, Ending::ClientReset, "{v:?}");
    assert!(!v.evidence.signals.contains(&Signal::SeqOffClient), "{v:?}");
    let bursts: u64 = lab.det.paths.values().map(|p| p.reset_bursts).sum();
    assert_eq!(bursts, 0);
}

mod upstream;

/// The server's keepalive probe at `at`: empty, one byte behind what it sent.
fn probe(lab: &mut Lab, c: &mut Conn, at: u64) {
    let seq = c.sseq.wrapping_sub(1);
    lab.send(c, at, Dir::Out, TCP_ACK, 0, 64, Some(seq));
}

fn probes(lab: &Lab) -> Vec<(f64, bool)> {
    lab.det
        .paths()
        .flat_map(|(_, p)| p.probes.iter().map(|q| (q.silence_seconds, q.survived)))
        .collect()
}

#[test]
fn a_keepalive_probe_the_client_answers_is_a_survived_silence_of_its_age() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    probe(&mut lab, &mut c, 24 * S);
    lab.client_ack(&mut c, 24 * S + 20 * MS);
    assert!((longest_survived(&lab) - 23.0).abs() < 0.01);
    let p = probes(&lab);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!((p[0].0 - 23.0).abs() < 0.01 && p[0].1, "{p:?}");
    assert!(lab.verdicts().is_empty());
}

#[test]
fn a_box_that_resets_a_keepalive_probe_killed_the_silence_before_it() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    probe(&mut lab, &mut c, 24 * S);
    // The box answers the probe for the client, with its own TTL.
    lab.send(&mut c, 24 * S + 2 * MS, Dir::In, TCP_RST, 0, 64, Some(5000));
    let v = lab.last();
    assert_eq!(v.ending, Ending::ResetOnNextPacket);
    assert!(v.premature);
    assert!((v.evidence.silence_seconds - 23.0).abs() < 0.01, "{v:?}");
    assert!(
        v.evidence.signals.contains(&Signal::KeepaliveProbe),
        "{v:?}"
    );
    assert_eq!(probes(&lab).len(), 1);
    assert!(!probes(&lab)[0].1);
}

#[test]
fn an_unanswered_keepalive_probe_then_a_reconnect_is_a_black_hole_at_the_probes_age() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    probe(&mut lab, &mut c, 24 * S);
    probe(&mut lab, &mut c, 24 * S + 300 * MS);
    // The server answers the Ping at 41 s, into the hole; the device gives up.
    lab.send(&mut c, 41 * S, Dir::Out, TCP_ACK | TCP_PSH, 200, 64, None);
    assert!(lab.verdicts().is_empty());
    let _c2 = lab.connect("198.51.100.7", 47 * S);
    let v = lab.last();
    assert_eq!(v.ending, Ending::BlackHole);
    assert!(v.premature);
    assert!((v.evidence.silence_seconds - 23.0).abs() < 0.01, "{v:?}");
    assert!(v.evidence.signals.contains(&Signal::KeepaliveProbe));
    assert_eq!(probes(&lab), vec![(v.evidence.silence_seconds, false)]);
}

/// An empty segment at the next number (a window update) asks nothing:
/// a box's reset after it is no probe's kill.
#[test]
fn a_window_update_after_a_silence_is_no_probe() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    lab.send(&mut c, 24 * S, Dir::Out, TCP_ACK, 0, 64, None);
    lab.client_ack(&mut c, 24 * S + 20 * MS);
    lab.send(
        &mut c,
        30 * S,
        Dir::In,
        TCP_ACK | TCP_PSH,
        300,
        CLIENT_TTL,
        None,
    );
    assert!(probes(&lab).is_empty());
}

/// Probes at chosen ages close a bracket the devices left wide: under
/// 2 s it is a point, `sounded`, with the probes as evidence.
#[test]
fn probes_that_close_a_bracket_under_two_seconds_make_a_sounded_point() {
    let mut lab = Lab::new(cfg());
    // Heartbeats of 19 s survive, one of 27 s is reset on the next packet.
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 19 * S);
    lab.ping(&mut c, t);
    lab.send(
        &mut c,
        t + 27 * S,
        Dir::Out,
        TCP_ACK | TCP_PSH,
        200,
        64,
        None,
    );
    lab.send(
        &mut c,
        t + 27 * S + 2 * MS,
        Dir::In,
        TCP_RST,
        0,
        64,
        Some(5000),
    );
    let est = |lab: &Lab| lab.det.paths().next().and_then(|(_, p)| p.estimate());
    assert!(matches!(est(&lab), Some(Estimate::Bracket { .. })));
    // Probes at 23 s and 21 s are reset; one at 20.5 s is answered.
    let mut at = t + 40 * S;
    for (age, answered) in [(23, false), (21, false)] {
        let mut c = lab.connect("198.51.100.7", at);
        lab.ping(&mut c, at + S);
        probe(&mut lab, &mut c, at + S + MS + age * S);
        if !answered {
            lab.send(
                &mut c,
                at + S + MS + age * S + 2 * MS,
                Dir::In,
                TCP_RST,
                0,
                64,
                Some(5000),
            );
        }
        at += 40 * S;
    }
    assert!(
        matches!(est(&lab), Some(Estimate::Bracket { .. })),
        "{:?}",
        est(&lab)
    );
    let mut c = lab.connect("198.51.100.7", at);
    lab.ping(&mut c, at + S);
    probe(&mut lab, &mut c, at + S + MS + 20 * S + S / 2);
    lab.client_ack(&mut c, at + 22 * S);
    let Some(Estimate::Sounded {
        seconds,
        low_seconds,
        high_seconds,
        probes,
    }) = est(&lab)
    else {
        panic!("{:?}", est(&lab));
    };
    assert!((low_seconds - 20.5).abs() < 0.01 && (high_seconds - 21.0).abs() < 0.01);
    assert!((seconds - 20.75).abs() < 0.01);
    assert_eq!(probes.len(), 3);
    assert_eq!(est(&lab).unwrap().confidence(), path::Confidence::High);
}

/// A device's other connection opened while a probe is on its way (a
/// Sync beside the Ping) proves nothing: a probe is unanswered only once
/// the client's round trip has passed.
#[test]
fn a_new_connection_within_a_round_trip_of_a_probe_is_no_black_hole() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    probe(&mut lab, &mut c, 24 * S);
    let _c2 = lab.connect("198.51.100.7", 24 * S + 10 * MS);
    lab.client_ack(&mut c, 24 * S + 20 * MS);
    assert!(lab.verdicts().is_empty(), "{:?}", lab.verdicts());
    assert_eq!(probes(&lab), vec![(probes(&lab)[0].0, true)]);
}

/// The remedy's keepalive, under a low end the path already survived,
/// asks nothing new: a client slow to answer it (a phone waking its
/// radio) while its address opens another connection, or one that resets
/// it, is no kill under the low end.
#[test]
fn a_probe_under_the_low_end_is_no_kill_however_it_is_answered() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    let t = cycle(&mut lab, &mut c, S, 19 * S);
    lab.ping(&mut c, t);
    probe(&mut lab, &mut c, t + 9 * S);
    let _c2 = lab.connect("198.51.100.7", t + 9 * S + S / 2);
    lab.client_ack(&mut c, t + 10 * S);
    probe(&mut lab, &mut c, t + 19 * S);
    lab.send(
        &mut c,
        t + 19 * S + 2 * MS,
        Dir::In,
        TCP_RST,
        0,
        64,
        Some(5000),
    );
    let v = lab.verdicts();
    assert!(v.iter().all(|v| !v.premature), "{v:?}");
    assert!(probes(&lab).is_empty());
    assert!(longest_survived(&lab) > 18.9, "{}", longest_survived(&lab));
}

/// A phone that answers a probe a few seconds late, while its address
/// opens another connection, has not dropped it.
#[test]
fn a_probe_answered_late_while_the_address_reconnects_is_no_black_hole() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    probe(&mut lab, &mut c, 24 * S);
    let _c2 = lab.connect("198.51.100.7", 26 * S);
    lab.client_ack(&mut c, 27 * S);
    assert!(lab.verdicts().is_empty(), "{:?}", lab.verdicts());
    assert_eq!(probes(&lab).len(), 1);
    assert!(probes(&lab)[0].1, "answered: survived");
}

/// Only the first probe of a run asks about the silence: a reset after a
/// repeat (the first went unanswered) is no kill at the probes' interval.
#[test]
fn a_reset_after_a_repeated_probe_is_no_kill_at_the_probe_interval() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    probe(&mut lab, &mut c, 24 * S);
    probe(&mut lab, &mut c, 31 * S);
    lab.send(&mut c, 31 * S + 2 * MS, Dir::In, TCP_RST, 0, 64, Some(5000));
    let v = lab.verdicts();
    assert!(
        v.iter()
            .all(|v| v.ending != Ending::ResetOnNextPacket || v.evidence.silence_seconds > 20.0),
        "{v:?}"
    );
    assert!(
        probes(&lab).iter().all(|p| p.0 > 20.0),
        "{:?}",
        probes(&lab)
    );
}

/// An empty segment ahead of what the server was seen to send (a tap
/// that missed some) is no probe.
#[test]
fn an_empty_segment_ahead_of_the_servers_number_is_no_probe() {
    let mut lab = Lab::new(cfg());
    let mut c = lab.connect("198.51.100.7", 0);
    lab.ping(&mut c, S);
    let ahead = c.sseq.wrapping_add(500);
    lab.send(&mut c, 24 * S, Dir::Out, TCP_ACK, 0, 64, Some(ahead));
    lab.send(&mut c, 24 * S + 2 * MS, Dir::In, TCP_RST, 0, 64, Some(5000));
    let v = lab.last();
    assert!(
        !v.evidence.signals.contains(&Signal::KeepaliveProbe),
        "{v:?}"
    );
    assert!(probes(&lab).is_empty());
}
