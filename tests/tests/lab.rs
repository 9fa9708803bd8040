//! The lab, end to end: real middleboxes (conntrack + nftables, an RST
//! injector, HAProxy), real TLS Direct Push traffic, the real agent binary.
//! All paths run side by side in one lab (the demo's own scenario).

use std::{path::PathBuf, process::Command, time::Duration};

use monitor::{
    analyze::Analysis,
    detector::{
        report::{LocalTimeoutReport, PathReport, Report},
        BoxLocation, Ending, Estimate, Verdict,
    },
};
use monitor_tests::agent_bin;
use serde_json::Value;
use xtask::lab::{device::DeviceReport, LabRun, Scenario};

fn scenario() -> Scenario {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    Scenario::load(&root.join("xtask/scenarios/demo.toml")).expect("demo scenario")
}

fn path<'a>(report: &'a Report, name: &str) -> Option<&'a PathReport> {
    report
        .killing_paths
        .iter()
        .chain(&report.quiet_paths)
        .find(|p| p.path == name)
}

fn killing<'a>(report: &'a Report, name: &str) -> &'a PathReport {
    report
        .killing_paths
        .iter()
        .find(|p| p.path == name)
        .unwrap_or_else(|| panic!("{name} should be a killing path: {report:#?}"))
}

fn assert_point_near(p: &PathReport, t: f64) {
    let Some(Estimate::Point { seconds: s, .. }) = p.estimate else {
        panic!("a point estimate: {p:#?}")
    };
    assert!(
        (s - t).abs() < 1.0,
        "estimate {s} should be within 1 s of {t}: {p:#?}"
    );
}

/// The path's bracket (low, high], which must hold `t`.
fn bracket_holding(p: &PathReport, t: f64) -> (f64, f64) {
    let Some(Estimate::Bracket {
        low_seconds: lo,
        high_seconds: hi,
        ..
    }) = p.estimate
    else {
        panic!("a bracket: {p:#?}")
    };
    assert!(
        lo < t && t <= hi,
        "bracket ({lo}, {hi}] should contain {t}: {p:#?}"
    );
    (lo, hi)
}

fn assert_bracket_holds(p: &PathReport, t: f64, step: f64) {
    let (lo, hi) = bracket_holding(p, t);
    // The device's heartbeat step, plus timing slack of the lab.
    assert!(
        hi - lo <= step + 0.5,
        "bracket ({lo}, {hi}] wider than the step {step}: {p:#?}"
    );
}

/// The demo's paths for the cases a detector gets wrong (issue 13), as the
/// monitor names them: a box next to the clients in hops, a NAT rewriting
/// ports, a black hole only early answers can bound from below.
const HARD_CASES: [&str; 3] = [
    "100.64.9.0/24:443",
    "100.65.10.0/24:443",
    "100.64.11.0/24:443",
];

/// The agent's verdicts on path `name` (as the monitor prints paths).
fn verdicts_on<'a>(verdicts: &'a [Verdict], name: &str) -> Vec<&'a Verdict> {
    verdicts.iter().filter(|v| v.path == name).collect()
}

/// The devices of lab path `name` (as the scenario names paths).
fn devices_of<'a>(devices: &'a [DeviceReport], name: &str) -> Vec<&'a DeviceReport> {
    devices.iter().filter(|d| d.path == name).collect()
}

/// One line per verdict on the path: what the closing note quotes.
fn print_verdicts(name: &str, verdicts: &[&Verdict]) {
    println!("verdicts on {name}:");
    for v in verdicts {
        let e = &v.evidence;
        println!(
            "  {v} | heartbeat {:?} ({:?}) location {:?} rst_ttl {:?} client_ttl {:?}..{:?} signals {:?}",
            v.heartbeat_seconds,
            v.heartbeat_source,
            e.location,
            e.rst_ttl,
            e.client_ttl_min,
            e.client_ttl_max,
            e.signals,
        );
    }
}

/// A reset on the next packet from a box one or two hops from its devices:
/// the lab made the RSTs' TTL the clients' own; the timing must still say
/// kill, and the TTL say where the box is.
fn assert_reset_next_to_client(report: &Report, verdicts: &[Verdict]) {
    let name = "100.64.9.0/24:443";
    let here = verdicts_on(verdicts, name);
    // The lab's own premise: RSTs arrive within the tolerance (2) of the clients' TTLs.
    let resets: Vec<_> = here
        .iter()
        .filter(|v| v.evidence.rst_ttl.is_some())
        .collect();
    assert!(!resets.is_empty(), "the router's RSTs were seen on {name}");
    for v in &resets {
        let e = &v.evidence;
        if let (Some(rst), Some(lo), Some(hi)) = (e.rst_ttl, e.client_ttl_min, e.client_ttl_max) {
            assert!(
                rst.saturating_add(2) >= lo && rst <= hi.saturating_add(2),
                "the lab should put the RST's TTL near the client's: {v:#?}"
            );
        }
    }
    let p = killing(report, name);
    assert_eq!(p.how, Some(Ending::ResetOnNextPacket), "{p:#?}");
    assert_bracket_holds(p, 20.0, 4.0);
    for v in here
        .iter()
        .filter(|v| v.ending == Ending::ResetOnNextPacket)
    {
        assert_eq!(
            v.evidence.location,
            Some(BoxLocation::AtOrNextToClient),
            "{v:#?}"
        );
    }
    assert_eq!(
        p.box_location,
        Some(BoxLocation::AtOrNextToClient),
        "{p:#?}"
    );
}

/// A carrier-grade NAT: one address, a random port per connection, and a
/// short timeout answered by an RST on the next packet.
fn assert_nat_rewriting_ports(report: &Report, verdicts: &[Verdict], devices: &[DeviceReport]) {
    let name = "100.65.10.0/24:443";
    let here = verdicts_on(verdicts, name);
    let p = killing(report, name);
    assert_eq!(p.how, Some(Ending::ResetOnNextPacket), "{p:#?}");
    assert_bracket_holds(p, 20.0, 4.0);
    // The lab's own premise: the server saw the NAT's ports, not the devices'.
    let own: Vec<u16> = devices_of(devices, "cgnat-random-ports")
        .iter()
        .flat_map(|d| d.local_ports.iter().copied())
        .collect();
    let mut seen: Vec<u16> = here.iter().map(|v| v.client.port()).collect();
    assert!(
        here.iter()
            .all(|v| v.client.ip().to_string() == "100.65.10.1"),
        "all behind one address"
    );
    assert!(
        seen.iter().all(|port| !own.contains(port)),
        "NAT ports {seen:?} vs the devices' {own:?}"
    );
    seen.sort_unstable();
    seen.dedup();
    assert!(
        seen.len() >= 2,
        "reconnections came from new ports: {seen:?}"
    );
}

/// A fixed heartbeat with mail arriving, behind a black hole shorter than
/// the heartbeat: only early answers can bound the bracket from below, and
/// they never count as the heartbeat in force.
fn assert_black_hole_with_early_answers(
    report: &Report,
    verdicts: &[Verdict],
    devices: &[DeviceReport],
) {
    let name = "100.64.11.0/24:443";
    let here = verdicts_on(verdicts, name);
    let p = killing(report, name);
    assert_eq!(p.how, Some(Ending::BlackHole), "{p:#?}");
    let (lo, _) = bracket_holding(p, 20.0);
    // A Status 2 the device received is a silence it survived (its next Ping proves it).
    let early: u64 = devices_of(devices, "bh-early-answers")
        .iter()
        .map(|d| d.early_answers)
        .sum();
    println!("early answers received on {name}: {early}");
    if early > 0 {
        assert!(lo > 0.0, "{early} early answers survived: {p:#?}");
    }
    let stated: Vec<f64> = here
        .iter()
        .filter(|v| v.premature)
        .filter_map(|v| v.heartbeat_seconds)
        .collect();
    // A device whose no-change answer (held the full 40 s) was killed
    // twice has shown its heartbeat: its second such kill states it. How
    // many devices get there in 150 s is the mail draws' luck (each Ping
    // has even odds of an early answer), so the check applies where they
    // did, and says so.
    let mut shown = 0;
    for client in here
        .iter()
        .map(|v| v.client.ip())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let at_heartbeat: Vec<&&Verdict> = here
            .iter()
            .filter(|v| v.client.ip() == client && (v.evidence.silence_seconds - 40.0).abs() < 0.5)
            .collect();
        if let Some(second) = at_heartbeat.get(1) {
            shown += 1;
            assert!(
                second.heartbeat_seconds.is_some(),
                "a second kill at the heartbeat states it: {second:#?}"
            );
        }
    }
    println!(
        "on {name}: {shown} devices had two no-change answers killed; {} kills stated a heartbeat: {stated:?}",
        stated.len()
    );
    // Most kills state the devices' 40 s. One can state an early answer's
    // hold time: a device whose only delivered answer was early (mail) and
    // whose killed no-change answers have not repeated yet (README: the
    // heartbeat rule's failure cases); never most of them.
    // (With two kills stating one, one early hold is half, not most: a
    // CI run saw [20.4, 40.0].)
    let wrong = stated.iter().filter(|h| (*h - 40.0).abs() > 2.0).count();
    assert!(
        2 * wrong <= stated.len(),
        "the devices' fixed 40 s, not an early answer's hold time: {stated:?}"
    );
}

/// What an agent on a reverse proxy's host said.
struct ProxyHost {
    name: String,
    client_path: String,
    report: Report,
    text: String,
}

/// The local proxy timeout an agent on a proxy host names for `upstream`.
fn local_timeout<'a>(h: &'a ProxyHost, upstream: &str) -> &'a LocalTimeoutReport {
    h.report
        .local_proxy_timeouts
        .iter()
        .find(|t| t.upstream == upstream)
        .unwrap_or_else(|| {
            panic!(
                "{}: a local proxy timeout on {upstream}: {}",
                h.name, h.text
            )
        })
}

/// nginx at its default 60 s and HAProxy at 30 s are named as this host's
/// own timeouts, with their settings; the devices' requests they ended are
/// kills of the proxy, not heartbeats; the raised nginx kills nothing.
fn assert_proxy_hosts(proxies: &[ProxyHost], server: &Report, devices: &[DeviceReport]) {
    let host = |name: &str| {
        proxies
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("a proxy host agent on {name}"))
    };
    for h in proxies {
        println!("agent on {}'s proxy host:\n{}", h.name, h.text);
    }
    let nginx = host("nginx-default");
    let t = local_timeout(nginx, "upstream:[2001:db8:ffff::1/128]:443");
    assert!((t.seconds - 60.0).abs() < 1.0, "{t:#?}");
    assert!(
        t.cure.iter().any(|c| c.contains("proxy_read_timeout")),
        "{t:#?}"
    );
    assert!(
        t.client_paths
            .iter()
            .any(|(p, n)| *p == nginx.client_path && *n >= 2),
        "the devices' Pings it ended: {t:#?}"
    );
    assert!(
        nginx.text.contains("held requests end at 6"),
        "{}",
        nginx.text
    );
    let facing = killing(&nginx.report, &nginx.client_path);
    assert_eq!(facing.how, Some(Ending::LocalProxyTimeout), "{facing:#?}");
    // nginx's 504 at 60 s is no heartbeat (the Android-like device's
    // answered 47 s Pings are).
    assert!(
        facing
            .median_heartbeat_seconds
            .is_none_or(|h| (h - 60.0).abs() > 1.0),
        "{facing:#?}"
    );
    // The server sees nginx give up too, as a proxy timeout at 60 s.
    let seen = killing(server, "[2001:db8:ffff::/56]:443");
    assert_eq!(seen.how, Some(Ending::ProxyTimeout), "{seen:#?}");
    assert_point_near(seen, 60.0);

    let fixed = host("nginx-fixed");
    assert!(
        fixed.report.local_proxy_timeouts.is_empty(),
        "{}",
        fixed.text
    );
    assert_eq!(fixed.report.premature_kills, 0, "{}", fixed.text);
    for d in devices_of(devices, "nginx-fixed") {
        assert!(d.pings_ok >= 1 && d.pings_failed == 0, "{d:?}");
    }

    let haproxy = host("haproxy-http");
    let t = local_timeout(haproxy, "upstream:[2001:db8:ffff::1/128]:8080");
    assert!((t.seconds - 30.0).abs() < 1.0, "{t:#?}");
    assert!(
        t.cure.iter().any(|c| c.contains("timeout server")),
        "{t:#?}"
    );
    assert_eq!(
        killing(&haproxy.report, &haproxy.client_path).how,
        Some(Ending::LocalProxyTimeout)
    );
    // Its legs are plain HTTP: the Pings read there say what the devices asked for.
    let leg = killing(&haproxy.report, "upstream:[2001:db8:ffff::1/128]:8080");
    assert_eq!(leg.how, Some(Ending::UpstreamTimeout), "{leg:#?}");
    assert_eq!(leg.requested_heartbeat_seconds, Some(45.0), "{leg:#?}");
}

/// Debian's Prometheus server in the lab's server namespace, scraping the
/// agent every 2 s and evaluating the shipped rules.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    ns: String,
}

const PROMETHEUS: &str = "127.0.0.1:19090";

impl Prometheus {
    fn start(ns: &str) -> Prometheus {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = std::env::temp_dir().join(format!("lab-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = root
            .join("deploy/prometheus/rules.yml")
            .canonicalize()
            .unwrap();
        let cfg = format!(
            "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: activesync-monitor\n    static_configs:\n      - targets: ['127.0.0.1:19443']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
        let child = xtask::netns::die_with_parent(&mut Command::new("ip"))
            .args(["netns", "exec", ns, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        Prometheus {
            child,
            dir,
            ns: ns.to_string(),
        }
    }

    fn get(&self, path: &str) -> Value {
        let body = xtask::netns::http_get_in(&self.ns, PROMETHEUS.parse().unwrap(), path)
            .expect("Prometheus API");
        serde_json::from_str(&body).expect("Prometheus JSON")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        xtask::cmd::kill_and_reap(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Metric names the shipped rules and dashboard use (recording rules aside).
fn referenced_metrics() -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = std::fs::read_to_string(root.join("deploy/prometheus/rules.yml")).unwrap();
    text.push_str(
        &std::fs::read_to_string(root.join("deploy/grafana/activesync-monitor.json")).unwrap(),
    );
    let mut names = Vec::new();
    for (i, _) in text.match_indices("activesync_monitor_") {
        if i > 0 && text.as_bytes()[i - 1] == b':' {
            continue; // a recording rule's name
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| {
                n.strip_suffix(s).unwrap_or(&n).to_string()
            });
        if !names.contains(&base) {
            names.push(base);
        }
    }
    names
}

/// Every killing path the live agent reported, offline analysis reports
/// too: the same kill class, the same estimate within 0.2 s, the same number
/// of kills give or take one (the capture and the report end a moment apart).
/// `o` (another placement's, or the offline analysis's) gives `l`'s
/// diagnosis of its path: the same manner, premature kills within one,
/// estimates within 0.2 s.
fn same_diagnosis(l: &PathReport, o: &PathReport) {
    let name = &l.path;
    let close = |a: f64, b: f64| (a - b).abs() <= 0.2;
    assert_eq!(o.how, l.how, "{name}: other {o:#?} live {l:#?}");
    let (lk, ok) = (l.premature_kills as i64, o.premature_kills as i64);
    assert!((lk - ok).abs() <= 1, "{name}: {lk} live, {ok} other");
    let same = match (&l.estimate, &o.estimate) {
        (Some(Estimate::Point { seconds: a, .. }), Some(Estimate::Point { seconds: b, .. })) => {
            close(*a, *b)
        }
        (
            Some(Estimate::Bracket {
                low_seconds: la,
                high_seconds: ha,
                ..
            }),
            Some(Estimate::Bracket {
                low_seconds: lb,
                high_seconds: hb,
                ..
            }),
        ) => close(*la, *lb) && close(*ha, *hb),
        _ => false,
    };
    assert!(same, "{name}: {:?} vs {:?}", l.estimate, o.estimate);
}

/// `other` (the offline analysis, the tap agent) gives `live`'s diagnosis.
fn compare_reports(live: &Report, offline: &Report, other: &str) {
    for l in &live.killing_paths {
        same_diagnosis(l, killing(offline, &l.path));
    }
    for q in &live.quiet_paths {
        let offline_kills = offline.killing_paths.iter().any(|p| p.path == q.path);
        assert!(
            !offline_kills,
            "{} is quiet live but killing offline",
            q.path
        );
    }
    println!(
        "{other} matched the live agent on {} killing paths",
        live.killing_paths.len()
    );
}

#[test]
fn lab_classifies_every_middlebox_side_by_side() {
    xtask::netns::require_root();
    let s = scenario();
    let pcap = std::env::temp_dir().join(format!("lab-{}.pcap", std::process::id()));
    // With a SPAN port on the switch and an agent in tap mode behind it.
    let mut lab = LabRun::start_with(&s, &agent_bin(), Some(&pcap), true).expect("lab up");
    let prometheus = Prometheus::start(&lab.topo.server.name);
    std::thread::sleep(Duration::from_secs(s.duration_seconds));
    // The premature-kill alert fires a minute after the path's first kill
    // (`for: 1m`); a kill late in the run leaves it pending at the end.
    // Wait, bounded, for what is asserted below.
    let fired = |a: &Value, name: &str, path: Option<&str>| {
        a["state"] == "firing"
            && a["labels"]["alertname"] == name
            && path.is_none_or(|p| a["labels"]["path"] == p)
    };
    let alerts = xtask::netns::wait_for(Duration::from_secs(75), || {
        let v = prometheus.get("/api/v1/alerts");
        let list = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
        (list
            .iter()
            .any(|a| fired(a, "ActiveSyncPrematureKills", Some("100.64.1.0/24:443")))
            && list
                .iter()
                .any(|a| fired(a, "ActiveSyncHeartbeatWindowLow", None)))
        .then_some(v)
    })
    .unwrap_or_else(|| prometheus.get("/api/v1/alerts"));
    let targets = prometheus.get("/api/v1/targets");
    drop(prometheus);
    let report = lab.report().expect("monitor report --json");
    let tap_agent = lab.tap_agent.as_ref().expect("the tap agent");
    let tap = tap_agent.report().expect("the tap agent's report");
    let tap_text = tap_agent.cli(&["report"]).expect("the tap agent's report");
    let tap_status = tap_agent.status().expect("the tap agent's status");
    let (router_path, router_agent) = lab.router_agent.as_ref().expect("a router placement");
    let router_path = router_path.clone();
    let router = router_agent.report().expect("the router agent's report");
    let router_text = router_agent
        .cli(&["report"])
        .expect("the router agent's report");
    let (edge_paths, edge_agent) = lab
        .client_side_router_agent
        .as_ref()
        .expect("a router agent on a client-facing interface");
    let edge_paths = edge_paths.clone();
    let edge = edge_agent
        .report()
        .expect("the client-side router agent's report");
    let proxies: Vec<ProxyHost> = lab
        .proxy_agents
        .iter()
        .map(|p| ProxyHost {
            name: p.name.clone(),
            client_path: p.client_path.clone(),
            report: p.agent.report().expect("a proxy host agent's report"),
            text: p
                .agent
                .cli(&["report"])
                .expect("a proxy host agent's report"),
        })
        .collect();
    let pcap = lab
        .stop_capture()
        .expect("capture stops")
        .expect("a capture");
    // The lab's files go with it: keep a copy of the agent's configuration.
    let agent_config = std::env::temp_dir().join(format!("lab-agent-{}.toml", std::process::id()));
    std::fs::copy(&lab.agent().config, &agent_config).expect("copy the agent configuration");
    let text = lab.agent().cli(&["report"]).expect("monitor report");
    let metrics = lab.agent().scrape().expect("scrape /metrics");
    let verdicts = lab.agent().verdicts().expect("monitor events --json");
    let devices = lab.devices();
    let log = lab.stop().expect("the agent stops cleanly");
    assert!(!log.contains("panicked"), "{log}");
    println!("{text}");
    for name in HARD_CASES {
        print_verdicts(name, &verdicts_on(&verdicts, name));
    }

    // Reset at expiry (F5-like injector, T = 20 s, heartbeat 40 s).
    let f5 = killing(&report, "100.64.1.0/24:443");
    assert_eq!(f5.how, Some(Ending::InjectedReset), "{f5:#?}");
    assert!(f5.premature_kills >= 2);
    assert_point_near(f5, 20.0);
    assert!(
        f5.likely_devices.is_empty(),
        "scaled numbers match no default"
    );
    assert!(text.contains("no known default matches"));

    // Reset on the next packet (conntrack + reject), Windows Mobile-like step 4 s.
    let nat = killing(&report, "100.64.2.0/24:443");
    assert_eq!(nat.how, Some(Ending::ResetOnNextPacket), "{nat:#?}");
    assert_bracket_holds(nat, 20.0, 4.0);

    // Black hole (conntrack + drop): IPv6 Windows Mobile-like devices, IPv4 fixed.
    let bh6 = killing(&report, "[2001:db8:3::/56]:443");
    assert_eq!(bh6.how, Some(Ending::BlackHole), "{bh6:#?}");
    assert_bracket_holds(bh6, 20.0, 4.0);
    assert!(bh6.reconnect_churn > 0, "{bh6:#?}");
    assert_eq!(
        killing(&report, "100.64.3.0/24:443").how,
        Some(Ending::BlackHole)
    );

    // Full proxy (HAProxy, timeout 20 s): the server sees the proxy's address.
    let proxy = killing(&report, "192.0.2.0/24:443");
    assert_eq!(proxy.how, Some(Ending::ProxyTimeout), "{proxy:#?}");
    assert_point_near(proxy, 20.0);

    // Control paths and a timeout longer than the heartbeat: no premature kills.
    for name in [
        "100.64.5.0/24:443",
        "100.64.6.0/24:443",
        "[2001:db8:6::/56]:443",
    ] {
        let p = path(&report, name).unwrap_or_else(|| panic!("{name} seen: {report:#?}"));
        assert_eq!(p.premature_kills, 0, "{name}: {p:#?}");
    }

    // Behind a TLS-terminating load balancer (plaintext port 8080) the agent
    // reads the heartbeat from each Ping: exact where inference cannot see
    // it (the proxy closes at 20 s, before any 40 s Ping is answered).
    let offload = killing(&report, "192.0.2.0/24:8080");
    assert_eq!(offload.how, Some(Ending::ProxyTimeout), "{offload:#?}");
    assert_point_near(offload, 20.0);
    assert!(offload.pings_read >= 4, "{offload:#?}");
    assert_eq!(
        offload.requested_heartbeat_seconds,
        Some(40.0),
        "{offload:#?}"
    );
    assert!(text.contains("read from"), "{text}");
    let inferred_here = offload.median_heartbeat_seconds;
    assert!(
        inferred_here.is_none_or(|h| h < 30.0),
        "only the short Pings that beat the proxy leave a hold time: {offload:#?}"
    );
    // Where Pings survive, inference and the exact value agree.
    let calm = path(&report, "100.64.8.0/24:8080").expect("offload control path");
    assert_eq!(calm.premature_kills, 0, "{calm:#?}");
    let (exact, inferred) = (
        calm.requested_heartbeat_seconds.expect("read from Pings"),
        calm.median_heartbeat_seconds.expect("inferred"),
    );
    assert!(
        (exact - inferred).abs() < 1.0,
        "exact {exact} vs inferred {inferred}"
    );
    println!(
        "heartbeat on 192.0.2.0/24:8080: read from Pings {:?}, inferred {:?}; \
         on 100.64.8.0/24:8080: read {exact}, inferred {inferred}",
        offload.requested_heartbeat_seconds, offload.median_heartbeat_seconds,
    );

    // The Android-like device backs off on the killing path, not on the control path.
    let last = |name: &str| {
        devices
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| d.heartbeats.last().copied())
            .unwrap_or_else(|| panic!("device {name}"))
    };
    assert!(last("nat-reset-next-packet-3") < last("control-1"));
    let here = nat
        .median_heartbeat_seconds
        .expect("hold times on the NAT path");
    let elsewhere = report
        .median_heartbeat_elsewhere_seconds
        .expect("hold times elsewhere");
    assert!(here < 0.9 * elsewhere, "{here} vs {elsewhere}");
    assert!(
        text.contains("devices here use shorter heartbeats"),
        "{text}"
    );

    // A real scrape passes promtool with no warnings.
    let dir = std::env::temp_dir().join(format!("lab-metrics-{}", std::process::id()));
    std::fs::write(&dir, &metrics).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", dir.display()))
        .output()
        .expect("promtool (Debian package prometheus)");
    let _ = std::fs::remove_file(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    assert!(metrics.contains("activesync_monitor_premature_kills_total{ending=\"injected_reset\"}"));

    // Every metric the shipped rules and dashboard use exists in a real
    // scrape (the remedy's where it runs: the cure test checks those).
    for name in referenced_metrics()
        .into_iter()
        .filter(|n| !n.starts_with("activesync_monitor_remedy_"))
    {
        assert!(
            metrics.contains(&format!("{name}{{"))
                || metrics.contains(&format!("{name} "))
                || metrics.contains(&format!("{name}_bucket")),
            "{name} is not exported"
        );
    }

    // A real Prometheus scraped the agent, evaluated the shipped rules, and
    // the premature-kill alert fired for the reset-at-expiry path.
    assert_eq!(
        targets["data"]["activeTargets"][0]["health"], "up",
        "{targets:#}"
    );
    let firing: Vec<&Value> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(
        firing
            .iter()
            .any(|a| a["labels"]["alertname"] == "ActiveSyncPrematureKills"
                && a["labels"]["path"] == "100.64.1.0/24:443"),
        "ActiveSyncPrematureKills should fire for the injector path: {alerts:#}"
    );
    assert!(
        firing
            .iter()
            .any(|a| a["labels"]["alertname"] == "ActiveSyncHeartbeatWindowLow"),
        "{alerts:#}"
    );
    assert!(
        !firing
            .iter()
            .any(|a| a["labels"]["path"] == "100.64.6.0/24:443"),
        "control path must not alert"
    );
    // The same capture analysed offline gives the same diagnosis.
    let out = Command::new(agent_bin())
        .arg("analyze")
        .arg(&pcap)
        .arg("--config")
        .arg(&agent_config)
        .arg("--json")
        .output()
        .expect("monitor analyze");
    let _ = std::fs::remove_file(&pcap);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Analysis = serde_json::from_slice(&out.stdout).expect("analyze JSON");
    assert_eq!(offline.capture.truncated, 0, "{:#?}", offline.capture);
    assert!(
        offline.capture.cut_by_snaplen > 0,
        "snaplen 400 cut some packets"
    );
    compare_reports(&report, &offline.report, "offline analysis");
    // The mirror placement: the same diagnosis from a SPAN port, each
    // packet seen twice there and counted once.
    println!("tap agent on the switch's SPAN port:\n{tap_text}");
    compare_reports(&report, &tap, "the tap agent");
    let duplicates = tap_status.kernel_counters["duplicates"];
    let tracked = tap_status.kernel_counters["packets_tracked"];
    println!("tap agent: {tracked} packets tracked, {duplicates} second copies passed over");
    assert!(duplicates > 0 && duplicates <= tracked, "{tap_status:?}");
    // The router placement: router mode on the interface toward the server
    // of the path's own firewall router, its path's diagnosis the server's.
    println!("router agent on {router_path}'s router:\n{router_text}");
    same_diagnosis(
        killing(&report, &router_path),
        killing(&router, &router_path),
    );
    println!("the router agent matched the live agent on {router_path}");
    // Router mode on a plain router's client-facing interface: the same
    // flows, endings and heartbeats as the server saw on that path.
    for name in &edge_paths {
        let (l, o) = (
            path(&report, name).unwrap_or_else(|| panic!("{name} on the server")),
            path(&edge, name).unwrap_or_else(|| panic!("{name} on the router: {edge:#?}")),
        );
        assert_eq!((l.premature_kills, o.premature_kills), (0, 0), "{name}");
        assert!(
            l.flows_ended.abs_diff(o.flows_ended) <= 1,
            "{name}: {} flows ended at the server, {} at the router",
            l.flows_ended,
            o.flows_ended
        );
        // The devices' answered Pings: hold times at both, the same.
        let (Some(a), Some(b)) = (l.median_heartbeat_seconds, o.median_heartbeat_seconds) else {
            panic!("{name}: heartbeats at both: server {l:#?} router {o:#?}")
        };
        assert!((a - b).abs() < 1.0, "{name}: heartbeat {a} vs {b}");
        println!(
            "router agent on {name}'s client-facing interface: {} flows ended (server {}), median heartbeat {:?} (server {:?})",
            o.flows_ended, l.flows_ended, o.median_heartbeat_seconds, l.median_heartbeat_seconds
        );
    }
    // The reverse proxies' hosts: their own timeouts named, with the cure.
    assert_proxy_hosts(&proxies, &report, &devices);
    // The exact heartbeat, from the capture too.
    let o = killing(&offline.report, "192.0.2.0/24:8080");
    assert_eq!(o.requested_heartbeat_seconds, Some(40.0), "{o:#?}");
    assert!(o.pings_read >= 4, "{o:#?}");

    // The cases a detector gets wrong (issue 13): a box next to the clients
    // in hops, a NAT that rewrites ports, a bracket only early answers bound.
    assert_reset_next_to_client(&report, &verdicts);
    assert_nat_rewriting_ports(&report, &verdicts, &devices);
    assert_black_hole_with_early_answers(&report, &verdicts, &devices);

    println!(
        "alerts firing: {}",
        firing
            .iter()
            .map(|a| format!(
                "{}{{path={}}}",
                a["labels"]["alertname"], a["labels"]["path"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The soak, short: 200 devices, constant churn and kills, for 2 minutes,
/// side by side with the lab test above. `cargo xtask soak` runs it for 10.
#[test]
fn soak_keeps_agent_memory_flat_and_loses_no_event() {
    xtask::netns::require_root();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let s = Scenario::load(&root.join("xtask/scenarios/soak.toml")).expect("soak scenario");
    let soak = xtask::soak::run(&s, &agent_bin(), 120, Duration::from_secs(10)).expect("soak");
    println!("{}", soak.markdown());
    assert!(!soak.log_panicked);
    let last = soak.samples.last().expect("samples");
    assert_eq!(last.events_dropped, 0, "no event lost");
    assert_eq!(soak.decode_errors, 0);
    assert!(
        soak.devices >= 200 && soak.connections > 400 && last.flows_ended > 300,
        "churn happened: {} connections, {} flows ended",
        soak.connections,
        last.flows_ended
    );
    let grew = soak.rss_growth_after_warmup();
    assert!(
        grew < 4 << 20,
        "agent memory grew {grew} bytes after the warm-up"
    );
}
