use std::collections::BTreeMap;

use super::*;
use crate::detector::{
    report::{PathReport, WindowReport},
    Estimate,
};

const S: u64 = 1_000_000_000;

fn keepalive(idle: u32) -> Keepalive {
    Keepalive {
        idle_seconds: idle,
        interval_seconds: 5,
        count: 4,
    }
}

pub(super) fn path(name: &str, how: Ending, premature: u64, cure: Option<Keepalive>) -> PathReport {
    PathReport {
        path: name.to_string(),
        flows_ended: premature,
        endings: BTreeMap::new(),
        kills: premature,
        premature_kills: premature,
        reconnect_churn: 0,
        incomplete_flows: 0,
        how: Some(how),
        estimate: Some(Estimate::Bracket {
            low_seconds: 19.0,
            high_seconds: 23.0,
            samples: 2,
        }),
        confidence: None,
        longest_survived_seconds: 19.0,
        box_location: None,
        reset_bursts: 0,
        likely_devices: Vec::new(),
        defaults_in_range: Vec::new(),
        recommended_idle_timeout_seconds: None,
        median_heartbeat_seconds: None,
        requested_heartbeat_seconds: None,
        pings_read: 0,
        kill_silence_histogram: Vec::new(),
        proxy_timeout_answers: 0,
        keepalive_cure: cure,
        recent_probes: Vec::new(),
    }
}

pub(super) fn report(paths: Vec<PathReport>) -> Report {
    Report {
        flows_tracked: 0,
        endings: BTreeMap::new(),
        premature_kills: 0,
        reconnect_churn: 0,
        median_heartbeat_elsewhere_seconds: None,
        heartbeat_to_cover_seconds: 60.0,
        killing_paths: paths,
        quiet_paths: Vec::new(),
        window: WindowReport {
            samples: 0,
            size: 0,
            mean_seconds: None,
            threshold_seconds: 0.0,
            alerting: false,
            alerts_raised: 0,
            culprits: Vec::new(),
        },
        local_proxy_timeouts: Vec::new(),
        held_requests_capped: None,
        remedy: None,
    }
}

fn on() -> RemedyConfig {
    RemedyConfig {
        keepalive: true,
        retest_after_seconds: 600,
        ..RemedyConfig::default()
    }
}

const NAT: &str = "100.64.1.0/24:443";

#[test]
fn a_box_that_forgets_gets_the_reports_keepalive_and_a_proxy_does_not() {
    let mut r = Remedy::new(on());
    r.update(
        &report(vec![
            path(NAT, Ending::ResetOnNextPacket, 3, Some(keepalive(9))),
            path("100.64.4.0/24:443", Ending::ProxyTimeout, 3, None),
            path(
                "upstream:192.0.2.1/32:443",
                Ending::BlackHole,
                3,
                Some(keepalive(9)),
            ),
        ]),
        10 * S,
    );
    let want: Vec<(PathKey, Keepalive)> = vec![(NAT.parse().unwrap(), keepalive(9))];
    assert_eq!(r.in_force(), want);
    let why: BTreeMap<String, PathRemedyState> = r
        .status()
        .paths
        .into_iter()
        .map(|p| (p.path, p.state))
        .collect();
    assert_eq!(
        why["100.64.4.0/24:443"],
        PathRemedyState::NotRemediable {
            why: NotRemediable::ProxyTimeout
        }
    );
    assert_eq!(
        why["upstream:192.0.2.1/32:443"],
        PathRemedyState::NotRemediable {
            why: NotRemediable::UpstreamLeg
        }
    );
}

#[test]
fn no_safe_timeout_means_no_remedy_and_the_deny_list_wins_over_allow() {
    let mut cfg = on();
    cfg.allow = vec!["100.64.0.0/16".parse().unwrap()];
    cfg.deny = vec!["100.64.2.0/24".parse().unwrap()];
    let mut r = Remedy::new(cfg);
    r.update(
        &report(vec![
            path(NAT, Ending::BlackHole, 1, None),
            path(
                "100.64.2.0/24:443",
                Ending::BlackHole,
                1,
                Some(keepalive(9)),
            ),
            path(
                "198.51.100.0/24:443",
                Ending::BlackHole,
                1,
                Some(keepalive(9)),
            ),
        ]),
        S,
    );
    assert!(r.in_force().is_empty());
    let states: Vec<PathRemedyState> = r.status().paths.into_iter().map(|p| p.state).collect();
    assert_eq!(
        states,
        vec![
            PathRemedyState::NotRemediable {
                why: NotRemediable::NoSafeTimeout
            },
            PathRemedyState::NotRemediable {
                why: NotRemediable::Excluded
            },
            PathRemedyState::NotRemediable {
                why: NotRemediable::Excluded
            },
        ]
    );
}

#[test]
fn a_quiet_remedied_path_is_lifted_to_retest_and_comes_back_only_if_it_kills_again() {
    let mut r = Remedy::new(on());
    let killing = |n| {
        report(vec![path(
            NAT,
            Ending::ResetOnNextPacket,
            n,
            Some(keepalive(9)),
        )])
    };
    r.update(&killing(2), 10 * S);
    assert_eq!(r.in_force().len(), 1);
    // Quiet for less than the retest time: still on.
    r.update(&killing(2), 500 * S);
    assert_eq!(r.in_force().len(), 1);
    // Quiet for the retest time (600 s): lifted.
    r.update(&killing(2), 611 * S);
    assert!(r.in_force().is_empty());
    assert!(matches!(
        r.status().paths[0].state,
        PathRemedyState::Lifted {
            premature_at_lift: 2
        }
    ));
    // The old kills alone do not bring it back; a new one does.
    r.update(&killing(2), 700 * S);
    assert!(r.in_force().is_empty());
    r.update(&killing(3), 710 * S);
    assert_eq!(r.in_force().len(), 1);
    // A path the detector forgot is dropped.
    r.update(&report(Vec::new()), 720 * S);
    assert!(r.in_force().is_empty() && r.status().paths.is_empty());
}

/// A reset on the next packet of `client` on the NAT path (silence 0, at 0).
fn reset_verdict(client: &str, premature: bool) -> Verdict {
    serde_json::from_value(serde_json::json!({
        "client": client, "server": "192.0.2.1:443", "path": NAT,
        "ending": "reset_on_next_packet", "premature": premature,
        "heartbeat_seconds": null, "heartbeat_source": null, "incomplete": false,
        "at_ns": 0, "flow_age_seconds": 60.0,
        "evidence": { "silence_seconds": 0.0, "rst_ttl": null, "client_ttl_min": null,
            "client_ttl_max": null, "rst_ip_id": null, "client_ip_id": null,
            "rst_window": null, "client_window": null,
            "after_server_send_seconds": null, "server_owed_answer": false }
    }))
    .expect("a verdict")
}

#[test]
fn only_kills_of_silences_begun_after_the_remedy_covered_the_path_count_against_it() {
    let mut r = Remedy::new(on());
    r.update(
        &report(vec![path(
            NAT,
            Ending::ResetOnNextPacket,
            1,
            Some(keepalive(9)),
        )]),
        100 * S,
    );
    let verdict = |at_s: u64, silence: f64, premature: bool| {
        let mut v = reset_verdict("100.64.1.7:50000", premature);
        v.at_ns = at_s * S;
        v.evidence.silence_seconds = silence;
        v
    };
    // Nothing counts before a sync has covered the path's connections.
    r.observe(&verdict(130, 5.0, true));
    assert_eq!(r.status().paths[0].kills_while_remedied, 0);
    r.synced(101 * S, false);
    r.observe(&verdict(130, 5.0, true));
    assert_eq!(
        r.status().paths[0].kills_while_remedied,
        0,
        "a sync that deferred some"
    );
    r.synced(100 * S, true);
    // Its silence began at 95 s, before the remedy (100 s): not counted.
    r.observe(&verdict(118, 23.0, true));
    // Not premature: not counted.
    r.observe(&verdict(140, 23.0, false));
    // Began at 117 s: the remedy failed.
    r.observe(&verdict(140, 23.0, true));
    assert_eq!(r.status().paths[0].kills_while_remedied, 1);
}

#[test]
fn bad_settings_are_refused_naming_the_key() {
    let bad = [
        RemedyConfig {
            floor_seconds: 0.0,
            ..on()
        },
        RemedyConfig {
            sockets_per_second: 0,
            ..on()
        },
        RemedyConfig {
            retest_after_seconds: 5,
            ..on()
        },
    ];
    let names = [
        "floor_seconds",
        "sockets_per_second",
        "retest_after_seconds",
    ];
    for (c, name) in bad.iter().zip(names) {
        let e = c.validate().expect_err(name).to_string();
        assert!(e.starts_with(name), "{e}");
    }
    assert_eq!(on().validate(), Ok(()));
}

#[test]
fn the_remedy_is_refused_off_the_endpoint_and_a_deny_narrower_than_a_path() {
    let mut c = crate::FileConfig::default();
    c.agent.interfaces = vec!["eth0".into()];
    c.remedy = on();
    assert_eq!(c.validate(), Ok(()));
    c.remedy.deny = vec!["203.0.113.7/32".parse().unwrap()];
    let e = c
        .validate()
        .expect_err("a /32 inside a /24 path")
        .to_string();
    assert!(e.starts_with("remedy.deny: 203.0.113.7/32"), "{e}");
    c.remedy.deny = vec!["203.0.113.0/24".parse().unwrap()];
    assert_eq!(c.validate(), Ok(()));
    c.agent.mode = crate::config::AgentMode::Tap;
    let e = c.validate().expect_err("tap mode").to_string();
    assert!(e.starts_with("remedy.keepalive"), "{e}");
}

#[test]
fn the_status_text_says_what_is_in_force_what_is_not_and_a_failed_sync() {
    let mut r = Remedy::new(on());
    r.update(
        &report(vec![
            path(NAT, Ending::ResetOnNextPacket, 3, Some(keepalive(9))),
            path("100.64.4.0/24:443", Ending::ProxyTimeout, 3, None),
        ]),
        10 * S,
    );
    r.set_coverage(&BTreeMap::from([(NAT.parse().unwrap(), 3)]));
    let mut st = r.status();
    st.sync_error = Some("listing this host's connections: timed out".into());
    let text = crate::render::remedy(&st);
    assert!(
        text.contains("TCP keepalive in force on 1 path(s)"),
        "{text}"
    );
    assert!(text.contains("100.64.1.0/24:443: keepalive idle 9 s, probes 5 s apart, 4 unanswered end it; 3 connection(s) covered"), "{text}");
    assert!(
        text.contains("100.64.4.0/24:443: not remediable: a proxy times out the request"),
        "{text}"
    );
    assert!(
        text.contains("the last sync failed (retried every 2 s): listing"),
        "{text}"
    );
    st.error = Some("the remedy needs Linux 6.1".into());
    assert!(
        crate::render::remedy(&st).starts_with("REMEDY: not running: the remedy needs Linux 6.1")
    );
}

/// A probe's kill is the sounding's: it neither counts against the
/// remedy nor postpones the retest of a quiet remedied path.
#[test]
fn the_soundings_own_kills_neither_count_against_the_remedy_nor_postpone_its_retest() {
    let mut r = Remedy::new(RemedyConfig {
        sound: true,
        ..on()
    });
    let killing = |n| {
        let mut p = path(NAT, Ending::ResetOnNextPacket, n, Some(keepalive(9)));
        p.estimate = Some(Estimate::Bracket {
            low_seconds: 19.0,
            high_seconds: 27.0,
            samples: 2,
        });
        report(vec![p])
    };
    let client: std::net::SocketAddr = "100.64.1.7:50000".parse().unwrap();
    let key: PathKey = NAT.parse().unwrap();
    r.set_candidates(sound::Candidates {
        ready: [(key, vec![(9, client)])].into_iter().collect(),
        probed_open: [9].into_iter().collect(),
        listed_ns: 0,
    });
    r.update(&killing(2), 10 * S);
    r.synced(10 * S, true);
    assert_eq!(r.probes().len(), 1, "a probe on the one connection");
    let mut v = reset_verdict(&client.to_string(), true);
    v.evidence.silence_seconds = 23.0;
    v.evidence.server_owed_answer = true;
    v.at_ns = 40 * S;
    r.observe(&v);
    assert_eq!(r.status().paths[0].kills_while_remedied, 0);
    // The report now counts 3 premature kills, one the probe's: still
    // quiet since 10 s, so lifted at the retest time (600 s).
    r.update(&killing(3), 611 * S);
    assert!(
        matches!(r.status().paths[0].state, PathRemedyState::Lifted { .. }),
        "{:?}",
        r.status().paths[0]
    );
}
