use std::net::SocketAddr;

use super::*;
use crate::detector::Ending;
use crate::remedy::tests::{path, report};

const S: u64 = 1_000_000_000;
const NAT: &str = "100.64.1.0/24:443";

#[test]
fn the_probe_age_is_the_whole_second_nearest_the_middle_strictly_inside() {
    assert_eq!(next_age(19.0, 27.0, 5.0), Some(23));
    assert_eq!(next_age(19.0, 23.0, 5.0), Some(21));
    assert_eq!(next_age(19.0, 21.0, 5.0), Some(20));
    // Under 2 s wide: a point already.
    assert_eq!(next_age(19.0, 20.9, 5.0), None);
    // Open below: from 0, but never under the shortest counted silence.
    assert_eq!(next_age(0.0, 8.0, 5.0), Some(6));
    assert_eq!(next_age(0.0, 5.5, 5.0), None);
    assert_eq!(next_age(300.0, 3600.0, 5.0), Some(1950));
    assert_eq!(next_age(19.0, f64::INFINITY, 5.0), None);
}

fn limits(per_hour: u32) -> Limits {
    Limits {
        probes_per_hour: per_hour,
        min_silence_s: 5.0,
        black_hole_after_s: 30.0,
    }
}

fn bracket(lo: f64, hi: f64) -> Report {
    let mut p = path(NAT, Ending::ResetOnNextPacket, 3, None);
    p.estimate = Some(if hi - lo < SOUNDED_WIDTH {
        Estimate::Sounded {
            seconds: (lo + hi) / 2.0,
            low_seconds: lo,
            high_seconds: hi,
            probes: Vec::new(),
        }
    } else {
        Estimate::Bracket {
            low_seconds: lo,
            high_seconds: hi,
            samples: 2,
        }
    });
    report(vec![p])
}

/// `n` connections, all ready and open.
fn conns(n: u16) -> Candidates {
    let key: PathKey = NAT.parse().unwrap();
    let v: Vec<(u64, SocketAddr)> = (0..n)
        .map(|i| {
            let a: SocketAddr = format!("100.64.1.{}:4000{i}", 10 + i).parse().unwrap();
            (100 + u64::from(i), a)
        })
        .collect();
    Candidates {
        probed_open: v.iter().map(|(c, _)| *c).collect(),
        ready: [(key, v)].into_iter().collect(),
        listed_ns: 0,
    }
}

/// A box that forgets after `t`: a probe at age `a` ends a silence a
/// little shorter (the server's last ACK came after the client's last
/// packet), and survives if that is under `t`.
fn outcome(lo: f64, hi: f64, a: u32, t: f64) -> (f64, f64) {
    let silence = f64::from(a) - 0.03;
    if silence < t {
        (silence.max(lo), hi)
    } else {
        (lo, silence.min(hi))
    }
}

#[test]
fn bisection_closes_the_bracket_to_within_a_second_of_the_timeout() {
    for t in [19.4, 20.0, 20.6, 23.5, 26.9] {
        let mut s = Sounder::default();
        let (mut lo, mut hi) = (19.0, 27.0);
        let mut now = 0;
        let mut used = 0;
        while hi - lo >= SOUNDED_WIDTH {
            s.update(&bracket(lo, hi), &conns(3), now, &limits(10), |_| true);
            let probes = s.probes();
            assert_eq!(probes.len(), 1, "t {t}: ({lo}, {hi}]");
            let (_, k) = probes[0];
            assert!(f64::from(k.idle_seconds) > lo && f64::from(k.idle_seconds) < hi);
            // The probe's connection is kept past the device's wait.
            assert!(k.interval_seconds * k.count >= 60 + 30, "{k:?}");
            (lo, hi) = outcome(lo, hi, k.idle_seconds, t);
            used += 1;
            now += 60 * S;
            assert!(used <= 4, "t {t}: {used} probes, ({lo}, {hi}]");
        }
        s.update(&bracket(lo, hi), &conns(3), now, &limits(10), |_| true);
        assert!(s.probes().is_empty());
        assert!(s.status()[0].done);
        assert!(((lo + hi) / 2.0 - t).abs() <= 1.0, "t {t}: ({lo}, {hi}]");
    }
}

#[test]
fn probes_stay_within_the_hourly_budget() {
    let mut s = Sounder::default();
    let mut now = 0;
    // Each probe is abandoned (the bracket never moves): two an hour.
    let mut started = Vec::new();
    for _ in 0..40 {
        s.update(&bracket(19.0, 27.0), &conns(3), now, &limits(2), |_| true);
        if let Some(a) = s.status()[0].active {
            if started.last() != Some(&a.since_ns) {
                started.push(a.since_ns);
            }
        }
        now += 300 * S;
    }
    // 200 minutes: two in each of the hours begun.
    assert!(started.len() <= 8, "{started:?}");
    for w in started.windows(3) {
        assert!(w[2] - w[0] >= 3600 * S, "{started:?}");
    }
    assert!(s.status()[0].abandoned >= 2);
}

#[test]
fn a_probe_whose_connection_closes_without_an_outcome_is_abandoned_and_another_tried() {
    let mut s = Sounder::default();
    s.update(&bracket(19.0, 27.0), &conns(2), 0, &limits(10), |_| true);
    let first = s.probes()[0].0;
    let mut others = conns(2);
    others.probed_open.remove(&first);
    for v in others.ready.values_mut() {
        v.retain(|(c, _)| *c != first);
    }
    // A listing from before the probe says nothing of it, however often seen.
    for t in 1..4 {
        s.update(&bracket(19.0, 27.0), &others, t * S, &limits(10), |_| true);
    }
    assert_eq!(s.probes()[0].0, first);
    others.listed_ns = 5 * S;
    s.update(&bracket(19.0, 27.0), &others, 6 * S, &limits(10), |_| true);
    s.update(&bracket(19.0, 27.0), &others, 7 * S, &limits(10), |_| true);
    assert_eq!(s.probes()[0].0, first, "one listing gone is not yet enough");
    others.listed_ns = 8 * S;
    s.update(&bracket(19.0, 27.0), &others, 9 * S, &limits(10), |_| true);
    assert_eq!(s.status()[0].abandoned, 1);
    assert_ne!(s.probes()[0].0, first);
}

#[test]
fn a_path_excluded_or_already_a_point_is_not_sounded_and_its_kills_are_told_apart() {
    let mut s = Sounder::default();
    s.update(&bracket(19.0, 27.0), &conns(2), 0, &limits(10), |_| false);
    assert!(s.probes().is_empty());
    s.update(&bracket(19.0, 20.5), &conns(2), 0, &limits(10), |_| true);
    assert!(s.probes().is_empty());
    s.update(&bracket(19.0, 27.0), &conns(2), 0, &limits(10), |_| true);
    let client = s.status()[0].active.unwrap().client;
    assert!(s.probed(client));
    assert!(!s.probed("100.64.1.99:1".parse().unwrap()));
}

/// Timers fire late (Linux's timer wheel: up to an eighth of the wait):
/// a probe may end a silence past the bracket's top. Its own outcome, not
/// a moved bracket, resolves it, and the next probe starts at once.
#[test]
fn a_probe_that_lands_past_the_bracket_is_resolved_by_its_own_outcome() {
    let mut s = Sounder::default();
    s.update(&bracket(19.0, 21.0), &conns(2), 0, &limits(10), |_| true);
    let a = s.status()[0].active.expect("a probe");
    assert_eq!(a.keepalive.idle_seconds, 20);
    let mut r = bracket(19.0, 21.0);
    r.killing_paths[0].recent_probes = vec![Probe {
        silence_seconds: 21.4,
        survived: false,
        at_ns: 30 * S,
        client: a.client,
    }];
    s.update(&r, &conns(2), 31 * S, &limits(10), |_| true);
    let b = s.status()[0].active.expect("the next probe");
    assert_eq!(b.since_ns, 31 * S, "at once");
    assert_ne!(b.client, a.client, "on another connection");
    assert_eq!(s.status()[0].abandoned, 0);
}
