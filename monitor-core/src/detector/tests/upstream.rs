//! A reverse proxy's host: devices' flows to it, its upstream legs to
//! Exchange, and its own timeout (see `detector::upstream`).

use super::*;

/// The proxy host's address (devices connect to it; its legs leave from it).
const PROXY: &str = "192.0.2.11";
const EXCHANGE: &str = "192.0.2.1";
/// Path `i`'s device `n`.
fn device(i: u8, n: u8) -> String {
    format!("100.64.{i}.{n}")
}

/// The kernel's key of `c`'s flow (IPv4).
fn key_of(c: &Conn) -> FlowKey {
    let v4 = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => unreachable!("IPv4 in these tests"),
    };
    let mut k = FlowKey {
        client_addr: [0; 16],
        server_addr: [0; 16],
        client_port: c.port,
        server_port: 443,
        family: monitor_common::FAMILY_V4,
        _pad: [0; 3],
    };
    k.client_addr[..4].copy_from_slice(&v4(c.client));
    k.server_addr[..4].copy_from_slice(&v4(c.server));
    k
}

fn proxy_lab() -> Lab {
    let mut lab = Lab::new(cfg());
    lab.det
        .set_upstream(&[443], [PROXY.parse::<IpAddr>().unwrap()]);
    lab
}

/// One Ping through the proxy at `t`: the device's request, the proxy's
/// upstream leg carrying it. Returns (device flow, upstream leg).
fn ping_through(lab: &mut Lab, dev: &str, t: u64) -> (Conn, Conn) {
    let mut d = lab.connect_between(dev, PROXY, t, MS);
    lab.ping(&mut d, t + 10 * MS);
    let mut up = lab.connect_between(PROXY, EXCHANGE, t + 11 * MS, MS);
    lab.ping(&mut up, t + 20 * MS);
    (d, up)
}

/// The proxy gives up after `after` of silence: it closes its leg (a TLS
/// close_notify, then the FIN, as nginx does), answers the device with an
/// error, and the device drops the connection.
fn proxy_times_out(lab: &mut Lab, d: &mut Conn, up: &mut Conn, t: u64, after: u64) {
    let at = t + 20 * MS + after;
    lab.send(up, at, Dir::In, TCP_ACK | TCP_PSH, 31, 64, None);
    lab.send(up, at + MS / 10, Dir::In, TCP_FIN | TCP_ACK, 0, 64, None);
    lab.send(d, at + MS / 2, Dir::Out, TCP_ACK | TCP_PSH, 180, 64, None);
    lab.send(d, at + 30 * MS, Dir::In, TCP_ACK, 0, CLIENT_TTL, None);
    lab.send(
        d,
        at + 31 * MS,
        Dir::In,
        TCP_FIN | TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
}

/// Three devices on two paths whose Pings the proxy ends at 60 s.
fn three_timeouts(lab: &mut Lab) {
    for (n, dev) in [device(1, 10), device(1, 11), device(2, 10)]
        .iter()
        .enumerate()
    {
        let t = S + n as u64 * 7 * S;
        let (mut d, mut up) = ping_through(lab, dev, t);
        proxy_times_out(lab, &mut d, &mut up, t, 60 * S);
    }
    let out = lab.det.tick(100 * S);
    lab.out.extend(out);
}

#[test]
fn a_proxy_host_names_its_own_timeout_from_the_upstream_legs_it_gave_up() {
    let mut lab = proxy_lab();
    three_timeouts(&mut lab);
    let verdicts = lab.verdicts();
    let legs: Vec<_> = verdicts
        .iter()
        .filter(|v| v.path == "upstream:192.0.2.1/32:443")
        .collect();
    assert_eq!(legs.len(), 3, "{verdicts:#?}");
    for v in &legs {
        assert_eq!(v.ending, Ending::UpstreamTimeout, "{v:#?}");
        assert!((v.evidence.silence_seconds - 60.0).abs() < 0.01, "{v:#?}");
        assert!(v.evidence.server_owed_answer);
    }
    let r = lab.det.report();
    let [t] = r.local_proxy_timeouts.as_slice() else {
        panic!("one local proxy timeout: {r:#?}")
    };
    assert!((t.seconds - 60.0).abs() < 0.01, "{t:#?}");
    assert_eq!(t.give_ups, 3);
    assert!(t.cure.iter().any(|c| c.contains("proxy_read_timeout")));
    assert!(t.cure.iter().any(|c| c.contains("timeout server")));
    assert!(t.cure.iter().any(|c| c.contains("ProxyTimeout")));
    let text = crate::render::report(&r);
    assert!(text.contains("LOCAL PROXY TIMEOUT"), "{text}");
    assert!(text.contains("held requests end at 60.0 s"), "{text}");
}

#[test]
fn a_devices_flow_closed_after_the_proxys_timeout_answer_is_the_local_proxy_timeout() {
    let mut lab = proxy_lab();
    three_timeouts(&mut lab);
    let verdicts = lab.verdicts();
    let facing: Vec<_> = verdicts
        .iter()
        .filter(|v| v.path.starts_with("100.64."))
        .collect();
    assert_eq!(facing.len(), 3, "{verdicts:#?}");
    for v in &facing {
        assert_eq!(v.ending, Ending::LocalProxyTimeout, "{v:#?}");
        assert!(v.premature, "the device's Ping failed: {v:#?}");
        assert!((v.evidence.silence_seconds - 60.0).abs() < 0.05, "{v:#?}");
    }
    let r = lab.det.report();
    let paths: Vec<(String, u64)> = r.local_proxy_timeouts[0].client_paths.clone();
    assert_eq!(
        paths,
        vec![
            ("100.64.1.0/24:443".to_string(), 2),
            ("100.64.2.0/24:443".to_string(), 1)
        ]
    );
    // The proxy's error answers are no heartbeat: no hold time, no estimate.
    assert_eq!(lab.det.stats.hold_times, 0);
    assert_eq!(lab.det.stats.proxy_timeout_answers, 3);
    let p = r
        .killing_paths
        .iter()
        .find(|p| p.path == "100.64.1.0/24:443")
        .expect("a killing path");
    assert_eq!(p.how, Some(Ending::LocalProxyTimeout));
    assert_eq!(p.median_heartbeat_seconds, None, "{p:#?}");
    assert_eq!(p.proxy_timeout_answers, 2);
}

#[test]
fn without_upstream_legs_the_proxys_answer_at_its_timeout_passes_for_a_heartbeat() {
    // The trap the upstream legs avoid: seen from the client side alone.
    let mut lab = Lab::new(cfg());
    three_timeouts(&mut lab);
    let verdicts = lab.verdicts();
    assert!(verdicts.iter().all(|v| !matches!(
        v.ending,
        Ending::UpstreamTimeout | Ending::LocalProxyTimeout
    )));
    assert_eq!(lab.det.stats.hold_times, 3, "three 60 s 'heartbeats'");
    assert!(lab.det.report().local_proxy_timeouts.is_empty());
}

#[test]
fn an_answer_the_proxy_relays_from_exchange_is_a_hold_time() {
    let mut lab = proxy_lab();
    let dev = device(1, 10);
    let mut t = S;
    let (mut d, mut up) = ping_through(&mut lab, &dev, t);
    for _ in 0..2 {
        // Exchange answers at 40 s; the proxy relays it at once.
        lab.answer(&mut up, t + 40 * S, MS);
        lab.answer(&mut d, t + 40 * S + MS, 20 * MS);
        lab.send(
            &mut up,
            t + 40 * S + 2 * MS,
            Dir::In,
            TCP_FIN | TCP_ACK,
            0,
            64,
            None,
        );
        t += 41 * S;
        lab.ping(&mut d, t);
        up = lab.connect_between(PROXY, EXCHANGE, t + MS, MS);
        lab.ping(&mut up, t + 5 * MS);
    }
    assert_eq!(
        lab.det.flow_heartbeat(&key_of(&d)).map(f64::round),
        Some(40.0)
    );
    lab.send(
        &mut d,
        t + S,
        Dir::In,
        TCP_FIN | TCP_ACK,
        0,
        CLIENT_TTL,
        None,
    );
    let out = lab.det.tick(t + 5 * S);
    lab.out.extend(out);
    assert_eq!(lab.det.stats.hold_times, 2);
    assert_eq!(lab.det.stats.proxy_timeout_answers, 0);
    let verdicts = lab.verdicts();
    assert!(
        verdicts.iter().all(|v| v.ending == Ending::ClientFin),
        "legs closed by the proxy once answered, the device's own close: {verdicts:#?}"
    );
    assert!(lab.det.report().local_proxy_timeouts.is_empty());
}

#[test]
fn this_host_closing_a_waiting_devices_flow_is_the_local_proxy_timeout() {
    let mut lab = proxy_lab();
    let mut d = lab.connect_between(&device(1, 10), PROXY, S, MS);
    lab.ping(&mut d, 2 * S);
    lab.send(&mut d, 32 * S, Dir::Out, TCP_FIN | TCP_ACK, 0, 64, None);
    let v = lab.last();
    assert_eq!(v.ending, Ending::LocalProxyTimeout, "{v:#?}");
    assert!(v.premature);
}

#[test]
fn a_leg_from_another_host_to_the_upstream_port_is_a_devices_flow() {
    // On the same port, a client that is not this host is a device.
    let mut lab = proxy_lab();
    let mut c = lab.connect_between("192.0.2.99", EXCHANGE, S, MS);
    lab.ping(&mut c, 2 * S);
    lab.send(&mut c, 62 * S, Dir::In, TCP_FIN | TCP_ACK, 0, 64, None);
    let v = lab.last();
    assert_eq!(v.path, "192.0.2.0/24:443");
    assert_ne!(v.ending, Ending::UpstreamTimeout);
}

/// A Ping read from `c`'s flow (a plaintext port) asking for `hb` seconds.
fn ping_read(lab: &mut Lab, c: &Conn, hb: u32, at: u64) {
    let req = crate::ping::PingRequest {
        device_id: None,
        base64_query: false,
        heartbeat: crate::ping::Heartbeat::Stated(hb),
    };
    lab.det.ping(&key_of(c), &req, at);
}

/// Three devices on two paths ask for `asked` seconds; their requests are
/// answered after `held` (two Pings each, the answers delivered).
fn held_while_asking(asked: [u32; 3], held: u64) -> Lab {
    let mut lab = Lab::new(cfg());
    for (n, (dev, hb)) in [device(1, 10), device(1, 11), device(2, 10)]
        .iter()
        .zip(asked)
        .enumerate()
    {
        let mut c = lab.connect(dev, n as u64 * S);
        let mut t = n as u64 * S + S;
        for _ in 0..3 {
            ping_read(&mut lab, &c, hb, t);
            t = cycle(&mut lab, &mut c, t, held);
        }
    }
    lab
}

#[test]
fn held_requests_ending_at_one_value_below_what_the_pings_ask_are_named_capped() {
    let lab = held_while_asking([90, 120, 90], 40 * S);
    let cap = lab.det.report().held_requests_capped.expect("a cap");
    assert!((cap.seconds - 40.0).abs() < 0.1, "{cap:#?}");
    assert_eq!((cap.clients, cap.asked_seconds), (3, 90.0));
    assert_eq!(cap.paths, ["100.64.1.0/24:443", "100.64.2.0/24:443"]);
    let text = crate::render::report(&lab.det.report());
    assert!(text.contains("HELD REQUESTS CAPPED"), "{text}");
}

#[test]
fn holds_that_match_what_the_pings_ask_are_no_cap() {
    let lab = held_while_asking([40, 40, 40], 40 * S);
    assert_eq!(lab.det.report().held_requests_capped, None);
    // Two clients capped are not yet a population.
    let lab = held_while_asking([90, 90, 40], 40 * S);
    assert_eq!(lab.det.report().held_requests_capped, None);
}

#[test]
fn a_device_that_stays_connected_after_the_proxys_error_gives_no_hold_time() {
    let mut lab = proxy_lab();
    let t = S;
    let (mut d, mut up) = ping_through(&mut lab, &device(1, 10), t);
    let at = t + 20 * MS + 60 * S;
    lab.send(&mut up, at, Dir::In, TCP_FIN | TCP_ACK, 0, 64, None);
    lab.answer(&mut d, at + MS / 2, 20 * MS);
    // Its next Ping on the same connection, 2 s later, proves the error delivered.
    lab.ping(&mut d, at + 2 * S);
    let out = lab.det.tick(at + 10 * S);
    lab.out.extend(out);
    lab.send(&mut d, at + 20 * S, Dir::In, TCP_ACK, 0, CLIENT_TTL, None);
    assert_eq!(lab.det.stats.proxy_timeout_answers, 1);
    assert_eq!(lab.det.stats.hold_times, 0, "the 504 is no heartbeat");
}

#[test]
fn a_leg_closed_as_its_devices_flow_is_killed_relays_that_kill() {
    // A box resets the device's flow at 20 s; nginx closes the leg at once.
    let mut lab = proxy_lab();
    let t = S;
    let (mut d, mut up) = ping_through(&mut lab, &device(1, 10), t);
    let at = t + 20 * MS + 20 * S;
    lab.send(&mut d, at, Dir::In, TCP_RST, 0, 64, None);
    lab.send(&mut up, at + MS, Dir::In, TCP_FIN | TCP_ACK, 0, 64, None);
    let verdicts = lab.verdicts();
    let leg = verdicts
        .iter()
        .find(|v| v.path.starts_with("upstream:"))
        .expect("the leg's verdict");
    assert_eq!(leg.ending, Ending::ClientFin, "{leg:#?}");
    assert!(lab.det.report().local_proxy_timeouts.is_empty());
}

#[test]
fn a_flow_forwarded_through_this_host_is_not_its_proxys() {
    // Router mode with upstream ports: the server is not this host.
    let mut lab = proxy_lab();
    let mut c = lab.connect_between(&device(1, 10), EXCHANGE, S, MS);
    lab.ping(&mut c, 2 * S);
    lab.send(&mut c, 32 * S, Dir::Out, TCP_FIN | TCP_ACK, 0, 64, None);
    assert_eq!(lab.last().ending, Ending::ServerFin);
}

#[test]
fn this_hosts_tls_alert_then_fin_while_the_device_waits_is_its_timeout_not_an_answer() {
    let mut lab = proxy_lab();
    let mut d = lab.connect_between(&device(1, 10), PROXY, S, MS);
    lab.ping(&mut d, 2 * S);
    lab.send(&mut d, 32 * S, Dir::Out, TCP_ACK | TCP_PSH, 24, 64, None);
    lab.send(
        &mut d,
        32 * S + MS,
        Dir::Out,
        TCP_FIN | TCP_ACK,
        0,
        64,
        None,
    );
    let v = lab.last();
    assert_eq!(v.ending, Ending::LocalProxyTimeout, "{v:#?}");
    assert!((v.evidence.silence_seconds - 30.0).abs() < 0.01, "{v:#?}");
    let out = lab.det.tick(40 * S);
    lab.out.extend(out);
    assert_eq!(lab.det.stats.hold_times, 0);
}

#[test]
fn a_reset_from_exchanges_side_while_this_host_waits_is_a_box_on_the_upstream_leg() {
    let mut lab = proxy_lab();
    let (_, mut up) = ping_through(&mut lab, &device(1, 10), S);
    lab.send(&mut up, 41 * S, Dir::Out, TCP_RST, 0, 60, None);
    let v = lab
        .verdicts()
        .into_iter()
        .find(|v| v.path.starts_with("upstream:"))
        .expect("the leg's verdict");
    assert_eq!(v.ending, Ending::InjectedReset, "{v:#?}");
    assert!(v.premature);
}

#[test]
fn a_proxy_timeout_after_a_session_ticket_that_trailed_the_request_is_still_paired() {
    // TLS 1.3: the proxy's session ticket, written as the request arrived
    // (it acknowledges it), makes the request look answered; the proxy's
    // 504 after 30 s of silence is still its timeout.
    let mut lab = proxy_lab();
    let t = S;
    let (mut d, mut up) = ping_through(&mut lab, &device(1, 10), t);
    lab.send(
        &mut d,
        t + 12 * MS,
        Dir::Out,
        TCP_ACK | TCP_PSH,
        250,
        64,
        None,
    );
    proxy_times_out(&mut lab, &mut d, &mut up, t, 30 * S);
    let out = lab.det.tick(t + 40 * S);
    lab.out.extend(out);
    let v = lab
        .verdicts()
        .into_iter()
        .find(|v| v.path.starts_with("100.64."))
        .expect("the device's verdict");
    assert_eq!(v.ending, Ending::LocalProxyTimeout, "{v:#?}");
    assert_eq!(lab.det.stats.proxy_timeout_answers, 1);
    assert_eq!(lab.det.stats.hold_times, 0);
}
