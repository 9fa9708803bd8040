//! The cure, measured in the lab (issue 16, item 3): the server agent with
//! `[remedy] keepalive = true` diagnoses the paths whose box forgets idle
//! flows from their first kills, gives their server sockets TCP keepalive
//! under the box's timeout, and from then on: no premature kill of a
//! silence that began after the remedy, no reconnect churn, devices'
//! heartbeats climb to their maximum, a fixed 40 s heartbeat gets through a
//! 20 s box. The proxy path is reported as not remediable. Before and after
//! are measured in the same run, split at the time the remedy came into
//! force on each path.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use monitor::detector::{report::Report, Ending, Verdict};
use monitor_core::remedy::{NotRemediable, PathRemedyState, RemedyStatus};
use monitor_tests::{agent_bin, remedy_status, shipped_scenario};
use xtask::lab::{device::DeviceReport, LabRun};

const NAT: &str = "nat-reset-next-packet";
const BLACK_HOLE: &str = "lb-black-hole";
const NAT_V6: &str = "nat-reset-ipv6";
const PROXY: &str = "haproxy";
const CONTROL: &str = "control";
/// The first path's box and devices, the remedy denied: kills go on.
const DENIED: &str = "nat-not-remedied";
/// The boxes' timeout and the Windows Mobile devices' maximum heartbeat.
const TIMEOUT_S: f64 = 20.0;
const MAX_HEARTBEAT: u32 = 43;
/// After this long in force, every silence that can still end in a kill
/// began after the remedy (the longest Ping, 43 s, and the devices' grace).
const SETTLE: Duration = Duration::from_secs(50);

/// When the remedy came into force on `path` (agent clock), if it has.
fn since(st: &RemedyStatus, path: &str) -> Option<u64> {
    st.paths
        .iter()
        .find(|p| p.path == path)
        .and_then(|p| match p.state {
            PathRemedyState::On { since_ns, .. } => Some(since_ns),
            _ => None,
        })
}

/// (premature kills, reconnect churn) of `path` in `r`.
fn kills_and_churn(r: &Report, path: &str) -> (u64, u64) {
    r.killing_paths
        .iter()
        .chain(&r.quiet_paths)
        .find(|p| p.path == path)
        .map_or((0, 0), |p| (p.premature_kills, p.reconnect_churn))
}

/// Premature kills on `path` of silences begun (before, after) `since`.
fn kills_split(verdicts: &[Verdict], path: &str, since: u64) -> (usize, usize) {
    let kills: Vec<&Verdict> = verdicts
        .iter()
        .filter(|v| v.path == path && v.premature && v.ending.is_kill())
        .collect();
    let began = |v: &Verdict| {
        v.at_ns
            .saturating_sub((v.evidence.silence_seconds * 1e9) as u64)
    };
    let after = kills.iter().filter(|v| began(v) >= since).count();
    (kills.len() - after, after)
}

/// (thread id, CapEff) of each thread of process `pid`.
fn capabilities_of_threads(pid: u32) -> Vec<(String, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("the agent's threads") {
        let e = e.expect("a thread");
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let cap = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        out.push((e.file_name().to_string_lossy().into_owned(), cap));
    }
    out
}

fn devices_of<'a>(devices: &'a [DeviceReport], name: &str) -> Vec<&'a DeviceReport> {
    devices.iter().filter(|d| d.path == name).collect()
}

#[test]
fn keepalive_stops_the_kills_of_boxes_that_forget_and_heartbeats_climb() {
    xtask::netns::require_root();
    let s = shipped_scenario("cure.toml");
    let started_ns = monitor::clock::now_ns();
    let lab = LabRun::start(&s, &agent_bin()).expect("lab up");
    let mut monitor_path: BTreeMap<String, String> = lab
        .topo
        .paths
        .iter()
        .map(|p| (p.spec.name.clone(), p.monitor_path.clone()))
        .collect();
    // An IPv6-only path is its clients' /56 (the detector's default prefix).
    let v6 = lab
        .topo
        .paths
        .iter()
        .find(|p| p.spec.name == NAT_V6)
        .expect("the IPv6 path");
    monitor_path.insert(NAT_V6.into(), format!("[2001:db8:{:x}::/56]:443", v6.index));
    let names = [NAT, BLACK_HOLE, NAT_V6];
    let remedied = names.map(|n| monitor_path[n].clone());
    // Each remedied path's kills and churn once the remedy has settled.
    let mut settled: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(s.duration_seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(5));
        let st = remedy_status(&lab);
        let report = lab.report().expect("monitor report --json");
        for p in &remedied {
            let settles = since(&st, p).map(|t| t + SETTLE.as_nanos() as u64);
            if !settled.contains_key(p) && settles.is_some_and(|t| monitor::clock::now_ns() >= t) {
                settled.insert(p.clone(), kills_and_churn(&report, p));
            }
        }
    }
    let st = remedy_status(&lab);
    let text = lab
        .agent()
        .cli(&["remedy", "status"])
        .expect("remedy status");
    let report_text = lab.agent().cli(&["report"]).expect("monitor report");
    let report = lab.report().expect("monitor report --json");
    let verdicts = lab.agent().verdicts().expect("monitor events --json");
    let metrics = lab.agent().scrape().expect("scrape /metrics");
    let devices = lab.devices();
    // Capabilities are per thread: the remedy's holds none either.
    let pid = lab.agent().pid();
    let threads = capabilities_of_threads(pid);
    let log = lab.stop().expect("the agent stops cleanly");
    assert!(
        threads.len() >= 2,
        "the agent and its remedy thread: {threads:?}"
    );
    // What the main thread kept (nothing from Linux 6.5), every thread.
    let main = threads
        .iter()
        .find(|(t, _)| *t == pid.to_string())
        .map(|(_, c)| c.clone())
        .expect("the main thread");
    assert!(
        threads.iter().all(|(_, cap)| *cap == main) && main == "0000000000000000",
        "every thread of the agent dropped its capabilities: {threads:?}"
    );
    println!("{text}\n{report_text}");

    for (name, p) in names.iter().zip(&remedied) {
        let pr = st
            .paths
            .iter()
            .find(|x| &x.path == p)
            .unwrap_or_else(|| panic!("{name} ({p}) should be remedied: {st:#?}"));
        let PathRemedyState::On {
            keepalive,
            since_ns,
        } = pr.state
        else {
            panic!("{name}: the remedy should be on: {pr:?}");
        };
        assert!(
            f64::from(keepalive.idle_seconds) < TIMEOUT_S && keepalive.idle_seconds >= 5,
            "{name}: idle {} s, under the box's {TIMEOUT_S} s and at the floor or above",
            keepalive.idle_seconds
        );
        assert!(
            pr.sockets_covered >= 2,
            "{name}: connections covered: {pr:?}"
        );
        assert_eq!(pr.kills_while_remedied, 0, "{name}: {pr:?}");
        let (before, after) = kills_split(&verdicts, p, since_ns);
        println!(
            "{name}: remedy in force {:.0} s into the run, idle {} s, {} connections covered; premature kills before it {before}, after {after}",
            since_ns.saturating_sub(started_ns) as f64 / 1e9,
            keepalive.idle_seconds,
            pr.sockets_covered
        );
        assert!(
            before >= 1,
            "{name}: diagnosed from kills before the remedy"
        );
        assert_eq!(
            after, 0,
            "{name}: no kill of a silence begun after the remedy"
        );
        let at_settle = settled
            .get(p)
            .unwrap_or_else(|| panic!("{name}: the remedy settled before the end"));
        let at_end = kills_and_churn(&report, p);
        println!("{name}: (kills, churn) settled {at_settle:?}, end {at_end:?}");
        assert_eq!(at_end, *at_settle, "{name}: kills and churn stop");
        let devs = devices_of(&devices, name);
        for d in &devs {
            let top = d.heartbeats.iter().copied().max().unwrap_or(0);
            println!(
                "{name} {}: heartbeats {:?}, ok {}, failed {}",
                d.name, d.heartbeats, d.pings_ok, d.pings_failed
            );
            if d.heartbeats.first() == Some(&11) {
                assert_eq!(top, MAX_HEARTBEAT, "{}: climbs to its maximum", d.name);
            } else {
                assert!(
                    d.pings_ok >= 1,
                    "{}: a 40 s Ping through a 20 s box",
                    d.name
                );
            }
        }
        assert!(
            metrics.contains(&format!(
                "activesync_monitor_remedy_sockets_covered{{path=\"{p}\"}}"
            )),
            "{name}: per-path remedy series"
        );
    }
    // The proxy path: the server sees HAProxy's own connections, from its
    // address, time out the request.
    assert!(
        st.paths.iter().any(|x| x.state
            == PathRemedyState::NotRemediable {
                why: NotRemediable::ProxyTimeout
            }),
        "the proxy path ({}) should be reported as not remediable: {st:#?}",
        monitor_path[PROXY]
    );
    assert!(
        text.contains("not remediable: a proxy times out the request"),
        "{text}"
    );
    assert!(
        report_text.contains("REMEDY: TCP keepalive in force on 3 path(s)."),
        "{report_text}"
    );
    // The in-run control: the same box and devices, the remedy denied.
    let denied = &monitor_path[DENIED];
    let dr = st.paths.iter().find(|x| &x.path == denied);
    assert_eq!(
        dr.map(|x| x.state),
        Some(PathRemedyState::NotRemediable {
            why: NotRemediable::Excluded
        }),
        "{st:#?}"
    );
    let first = remedied
        .iter()
        .filter_map(|p| since(&st, p))
        .min()
        .expect("a remedy in force");
    let (before, after) = kills_split(&verdicts, denied, first);
    println!("{DENIED}: premature kills before the first remedy {before}, after {after}");
    assert!(after >= 3, "{DENIED}: kills go on without the remedy");
    for d in devices_of(&devices, DENIED) {
        let top = d.heartbeats.iter().copied().max().unwrap_or(0);
        println!(
            "{DENIED} {}: heartbeats {:?}, ok {}, failed {}",
            d.name, d.heartbeats, d.pings_ok, d.pings_failed
        );
        if d.heartbeats.first() == Some(&11) {
            assert!(
                top <= 27,
                "{}: never above the first killed heartbeat",
                d.name
            );
        } else {
            assert_eq!(d.pings_ok, 0, "{}: a 40 s Ping never gets through", d.name);
        }
    }
    let control = &monitor_path[CONTROL];
    assert!(
        st.paths.iter().all(|x| &x.path != control),
        "the control path is never remedied"
    );
    for d in devices_of(&devices, CONTROL) {
        assert_eq!(d.heartbeats.iter().copied().max(), Some(MAX_HEARTBEAT));
    }
    assert!(
        report
            .killing_paths
            .iter()
            .filter(|p| remedied.contains(&p.path))
            .all(|p| p.how != Some(Ending::ProxyTimeout)),
        "{report_text}"
    );
    assert!(st.counters["new_covered"] >= 1, "{:?}", st.counters);
    // What the shipped alert reads (ActiveSyncRemedyStillKilling).
    assert!(
        metrics.contains("activesync_monitor_remedy_premature_kills_total{"),
        "{metrics}"
    );
    if let Some(l) = log
        .lines()
        .find(|l| l.contains("remedy: keepalive taken back from"))
    {
        println!("at exit: {l}");
    }
    assert!(
        log.contains("remedy: keepalive taken back from"),
        "the agent undoes it at exit: {log}"
    );
}
