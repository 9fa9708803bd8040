//! Sounding, measured in the lab (issue 16, item 2): on the paths whose box
//! forgets idle flows silently (a NAT that resets the next packet, a load
//! balancer that drops it), the devices' heartbeats leave a bracket
//! (19 s survived, 27 s killed) around the 20 s timeout. With
//! `[remedy] sound = true` the server agent puts keepalive probes at chosen
//! silences inside it, one connection at a time, and each path ends with a
//! point, `sounded`, within a second of 20 s, its probes as evidence;
//! within the hourly budget; the kills the probes cost are not counted
//! against the remedy.

use std::time::{Duration, Instant};

use monitor::detector::Estimate;
use monitor_tests::{agent_bin, remedy_status, shipped_scenario};
use xtask::lab::LabRun;

const PATHS: [&str; 2] = ["nat-reset-next-packet", "lb-black-hole"];
/// The boxes' true timeout.
const TIMEOUT_S: f64 = 20.0;

fn estimate_of(report: &monitor::detector::report::Report, path: &str) -> Option<Estimate> {
    report
        .killing_paths
        .iter()
        .chain(&report.quiet_paths)
        .find(|p| p.path == path)
        .and_then(|p| p.estimate.clone())
}

#[test]
fn sounding_turns_the_brackets_of_boxes_that_forget_into_points_within_a_second() {
    xtask::netns::require_root();
    let s = shipped_scenario("sound.toml");
    let lab = LabRun::start(&s, &agent_bin()).expect("lab up");
    let monitor_path: Vec<(String, String)> = lab
        .topo
        .paths
        .iter()
        .filter(|p| PATHS.contains(&p.spec.name.as_str()))
        .map(|p| (p.spec.name.clone(), p.monitor_path.clone()))
        .collect();
    assert_eq!(monitor_path.len(), PATHS.len());
    // Every path's first bracket, as the devices left it.
    let mut first_bracket: Vec<Option<(f64, f64)>> = vec![None; PATHS.len()];
    let mut last_probe = vec![0u64; PATHS.len()];
    let started = Instant::now();
    let end = started + Duration::from_secs(s.duration_seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(3));
        let report = lab.report().expect("monitor report --json");
        let st = remedy_status(&lab);
        let t = started.elapsed().as_secs();
        for (i, (name, p)) in monitor_path.iter().enumerate() {
            let active = st
                .sounding
                .iter()
                .find(|x| &x.path == p)
                .and_then(|x| x.active);
            if let Some(a) = active.filter(|a| a.since_ns != last_probe[i]) {
                last_probe[i] = a.since_ns;
                println!(
                    "{t:>3} s {name}: probe at {} s on {} (bracket ({:.2}, {:.2}])",
                    a.keepalive.idle_seconds, a.client, a.low_seconds, a.high_seconds
                );
            }
            if let Some(Estimate::Sounded { seconds, .. }) = estimate_of(&report, p) {
                if last_probe[i] != u64::MAX {
                    println!("{t:>3} s {name}: sounded, {seconds:.2} s");
                    last_probe[i] = u64::MAX;
                }
            }
        }
        for (i, (_, p)) in monitor_path.iter().enumerate() {
            if let (
                None,
                Some(Estimate::Bracket {
                    low_seconds,
                    high_seconds,
                    ..
                }),
            ) = (first_bracket[i], estimate_of(&report, p))
            {
                first_bracket[i] = Some((low_seconds, high_seconds));
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
    lab.stop().expect("the agent stops cleanly");
    println!("{text}\n{report_text}");

    for (i, (name, p)) in monitor_path.iter().enumerate() {
        let first = first_bracket[i]
            .unwrap_or_else(|| panic!("{name}: a bracket from the devices first: {report_text}"));
        assert!(
            first.1 - first.0 >= 2.0,
            "{name}: the devices alone left a wide bracket: {first:?}"
        );
        let Some(Estimate::Sounded {
            seconds,
            low_seconds,
            high_seconds,
            probes,
        }) = estimate_of(&report, p)
        else {
            panic!(
                "{name}: a sounded point: {:?}\n{text}",
                estimate_of(&report, p)
            );
        };
        let sounding = st
            .sounding
            .iter()
            .find(|x| &x.path == p)
            .unwrap_or_else(|| panic!("{name}: in the sounding status: {st:#?}"));
        println!(
            "{name}: bracket ({:.2}, {:.2}] from the devices, sounded to {seconds:.2} s in ({low_seconds:.2}, {high_seconds:.2}] with {} probe(s) set, {} abandoned; evidence {probes:?}",
            first.0, first.1, sounding.probes_total, sounding.abandoned
        );
        assert!(
            (seconds - TIMEOUT_S).abs() <= 1.0,
            "{name}: within a second of the box's {TIMEOUT_S} s: {seconds}"
        );
        assert!(
            low_seconds < TIMEOUT_S + 0.1 && TIMEOUT_S <= high_seconds + 0.1,
            "{name}: the bracket holds the truth: ({low_seconds}, {high_seconds}]"
        );
        assert!(
            probes.iter().any(|q| !q.survived),
            "{name}: a probe the box forgot is evidence: {probes:?}"
        );
        assert!(sounding.done, "{name}: {sounding:?}");
        assert!(
            sounding.probes_total >= 1 && sounding.probes_last_hour <= 10,
            "{name}: within the hourly budget: {sounding:?}"
        );
        let remedy = st
            .paths
            .iter()
            .find(|x| &x.path == p)
            .unwrap_or_else(|| panic!("{name}: remedied: {st:#?}"));
        assert_eq!(
            remedy.kills_while_remedied, 0,
            "{name}: the probes' kills are the sounding's, not the remedy's failure"
        );
    }
    assert!(report_text.contains("sounded"), "{report_text}");
    assert!(text.contains("SOUNDING:"), "{text}");
}
