//! Benchmarks. Here: the per-packet cost of the kernel programs, measured
//! with BPF_PROG_TEST_RUN against empty reference programs in the same run
//! (ratios, not absolute times: the machine is noisy). Throughput, scale and
//! the event path have modules of their own.

pub mod events;
pub mod frames;
pub mod scale;
pub mod throughput;

use std::{net::IpAddr, time::Duration};

use aya::{
    maps::RingBuf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use monitor::{loader, AgentConfig};
use monitor_common::{craft::Tcp, Dir, TCP_ACK, TCP_SYN};

pub const BASELINE_XDP: &str = "baseline_xdp";
pub const BASELINE_TC: &str = "baseline_tc";
/// The XDP program cut short after each stage of its packet path, in order.
pub const STAGES: [(&str, &str); 3] = [
    ("stage_parse_xdp", "count, glance, full header parse"),
    ("stage_key_xdp", "+ second counter, clock, 40-byte flow key"),
    ("stage_lookup_xdp", "+ flow table (LRU hash) lookup"),
];

#[derive(Clone, Debug)]
pub struct Case {
    pub hook: &'static str,
    pub name: &'static str,
    /// Median ns per packet, ours and the empty program's, same method.
    pub ours_ns: f64,
    pub empty_ns: f64,
    /// The least of the rounds (or single runs), ours and empty: the cost
    /// when nothing interfered. Steadier than the median on a busy machine.
    pub ours_min_ns: f64,
    pub empty_min_ns: f64,
    pub method: &'static str,
    /// The target ratio, if the issue sets one.
    pub target: Option<f64>,
}

impl Case {
    pub fn ratio(&self) -> f64 {
        self.ours_ns / self.empty_ns.max(0.001)
    }

    /// Ratio of the least costs: what a regression check compares.
    pub fn min_ratio(&self) -> f64 {
        self.ours_min_ns / self.empty_min_ns.max(0.001)
    }
}

fn load() -> Ebpf {
    let cfg = AgentConfig {
        interfaces: vec!["unused".into()],
        // A gap threshold of 1 ms lets case (e) end a gap every few ms.
        gap_threshold: Duration::from_millis(1),
        ..AgentConfig::default()
    };
    let mut ebpf = loader::load(&cfg).expect("loading the programs");
    let x: &mut Xdp = ebpf.program_mut(BASELINE_XDP).unwrap().try_into().unwrap();
    x.load().expect("baseline xdp");
    let t: &mut SchedClassifier = ebpf.program_mut(BASELINE_TC).unwrap().try_into().unwrap();
    t.load().expect("baseline tc");
    for (name, _) in STAGES {
        let x: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        x.load().expect("stage program");
    }
    ebpf
}

fn run(ebpf: &mut Ebpf, prog: &str, frame: &[u8], repeat: u32) -> Duration {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    };
    let p = ebpf.program_mut(prog).expect("program");
    let r = if let Ok(x) = <&mut Xdp>::try_from(&mut *p) {
        x.test_run(opts)
    } else {
        let t: &mut SchedClassifier = p.try_into().expect("xdp or tc");
        t.test_run(opts)
    };
    r.expect("BPF_PROG_TEST_RUN").duration
}

/// Median and least of per-round (or per-run) ns, ours and empty.
struct Timings {
    ours: Vec<f64>,
    empty: Vec<f64>,
}

impl Timings {
    fn case(
        self,
        hook: &'static str,
        name: &'static str,
        method: &'static str,
        target: Option<f64>,
    ) -> Case {
        Case {
            hook,
            name,
            ours_ns: median(&self.ours),
            empty_ns: median(&self.empty),
            ours_min_ns: least(&self.ours),
            empty_min_ns: least(&self.empty),
            method,
            target,
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn least(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Mean ns per run over `repeat` runs, median of `rounds`, ours and empty
/// interleaved round by round.
fn repeated(
    ebpf: &mut Ebpf,
    ours: &str,
    empty: &str,
    frame: &[u8],
    repeat: u32,
    rounds: usize,
) -> Timings {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(run(ebpf, ours, frame, repeat).as_nanos() as f64);
        b.push(run(ebpf, empty, frame, repeat).as_nanos() as f64);
    }
    Timings { ours: a, empty: b }
}

/// One run per distinct frame (each one creates a flow or ends a gap), the
/// median of the kernel-measured durations; the empty program measured the
/// same way on the same frames.
fn single_runs(
    ebpf: &mut Ebpf,
    ours: &str,
    empty: &str,
    frames: &[Vec<u8>],
    pause: Duration,
) -> Timings {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for f in frames {
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        a.push(run(ebpf, ours, f, 1).as_nanos() as f64);
        b.push(run(ebpf, empty, f, 1).as_nanos() as f64);
    }
    Timings { ours: a, empty: b }
}

fn drain(ebpf: &mut Ebpf) {
    if let Some(m) = ebpf.map_mut("EVENTS") {
        if let Ok(mut r) = RingBuf::try_from(m) {
            while r.next().is_some() {}
        }
    }
}

fn oriented(mut t: Tcp, dir: Dir) -> Tcp {
    if dir == Dir::Out {
        std::mem::swap(&mut t.src, &mut t.dst);
        std::mem::swap(&mut t.sport, &mut t.dport);
    }
    t
}

/// An established flow in the table (its handshake run through both
/// programs); returns the frame of one of its ACKs, as `dir` sees it.
fn established_ack(ebpf: &mut Ebpf, c: IpAddr, s: IpAddr, dir: Dir) -> Vec<u8> {
    let mut syn = Tcp::syn(c, s);
    syn.sport = 50000;
    let mut synack = Tcp::syn(s, c).flags(TCP_SYN | TCP_ACK);
    synack.sport = 443;
    synack.dport = 50000;
    run(ebpf, loader::XDP_PROGRAM, &syn.frame(), 1);
    run(ebpf, loader::TC_PROGRAM, &synack.frame(), 1);
    run(
        ebpf,
        loader::XDP_PROGRAM,
        &syn.clone().flags(TCP_ACK).frame(),
        1,
    );
    oriented(syn.flags(TCP_ACK), dir).frame()
}

/// One stage of case (c), measured: cumulative ns per packet.
#[derive(Clone, Debug)]
pub struct Stage {
    pub what: &'static str,
    pub ns: f64,
}

/// Case (c) through the XDP program cut short after each stage, the full
/// program and the empty one, interleaved round by round (medians): where
/// an established flow's packet spends its time.
pub fn profile(repeat: u32, rounds: usize) -> Vec<Stage> {
    let mut ebpf = load();
    let ack = established_ack(
        &mut ebpf,
        "192.0.2.2".parse().unwrap(),
        "192.0.2.1".parse().unwrap(),
        Dir::In,
    );
    let mut progs: Vec<(&str, &'static str)> = vec![(BASELINE_XDP, "empty program")];
    progs.extend(STAGES);
    progs.push((loader::XDP_PROGRAM, "+ state machine (the whole program)"));
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); progs.len()];
    for _ in 0..rounds {
        for (i, (prog, _)) in progs.iter().enumerate() {
            ns[i].push(run(&mut ebpf, prog, &ack, repeat).as_nanos() as f64);
        }
    }
    progs
        .iter()
        .zip(ns)
        .map(|((_, what), v)| Stage {
            what,
            ns: median(&v),
        })
        .collect()
}

/// A Markdown table of the stages: cumulative and added ns.
pub fn profile_table(stages: &[Stage]) -> String {
    let mut s = String::from(
        "| stage | ns/pkt (cumulative) | added | share of ours over empty |\n|---|---|---|---|\n",
    );
    let empty = stages.first().map_or(0.0, |x| x.ns);
    let total = stages.last().map_or(0.0, |x| x.ns) - empty;
    let mut prev = empty;
    for (i, st) in stages.iter().enumerate() {
        let added = st.ns - prev;
        let share = if i == 0 || total <= 0.0 {
            String::new()
        } else {
            format!("{:.0}%", 100.0 * added / total)
        };
        s.push_str(&format!(
            "| {} | {:.1} | {} | {share} |\n",
            st.what,
            st.ns,
            if i == 0 {
                String::new()
            } else {
                format!("{added:+.1}")
            }
        ));
        prev = st.ns;
    }
    s
}

/// All cases for both hooks. `repeat` runs per round, `rounds` rounds,
/// `singles` frames for the flow-creating and gap-ending cases.
pub fn per_packet(repeat: u32, rounds: usize, singles: usize) -> Vec<Case> {
    let mut ebpf = load();
    let c: IpAddr = "192.0.2.2".parse().unwrap();
    let s: IpAddr = "192.0.2.1".parse().unwrap();
    let mut out = Vec::new();
    for (hook, ours, empty, dir) in [
        ("XDP", loader::XDP_PROGRAM, BASELINE_XDP, Dir::In),
        ("TC", loader::TC_PROGRAM, BASELINE_TC, Dir::Out),
    ] {
        let mut udp = oriented(Tcp::syn(c, s), dir).frame();
        udp[14 + 9] = 17;
        let mut other = Tcp::syn(c, s);
        other.dport = 8080;
        let other = oriented(other, dir).frame();
        // An established flow: hand-shake it once, then time its ACKs.
        let ack = established_ack(&mut ebpf, c, s, dir);
        for (name, frame, target) in [
            ("(a) non-TCP packet", &udp, Some(1.3)),
            ("(b) TCP to an untracked port", &other, Some(1.3)),
            ("(c) packet of an established tracked flow", &ack, Some(3.0)),
        ] {
            let t = repeated(&mut ebpf, ours, empty, frame, repeat, rounds);
            out.push(t.case(hook, name, "repeat", target));
        }
        let base_port = if dir == Dir::In { 10000 } else { 30000 };
        let syns: Vec<Vec<u8>> = (0..singles)
            .map(|i| {
                let mut t = Tcp::syn(c, s).flags(TCP_SYN);
                t.sport = base_port + i as u16;
                oriented(t, dir).frame()
            })
            .collect();
        let t = single_runs(&mut ebpf, ours, empty, &syns, Duration::ZERO);
        out.push(t.case(hook, "(d) SYN creating a half-open entry", "single", None));
        drain(&mut ebpf);
        if dir == Dir::In {
            // The handshake's ACK: moves the connection to the flow table
            // with an Opened event. The SYN-ACKs come first, untimed.
            let ours_tc = loader::TC_PROGRAM;
            let acks: Vec<Vec<u8>> = (0..singles)
                .map(|i| {
                    let mut syn = Tcp::syn(c, s).flags(TCP_SYN);
                    syn.sport = base_port + i as u16;
                    let mut synack = Tcp::syn(s, c).flags(TCP_SYN | TCP_ACK);
                    synack.sport = 443;
                    synack.dport = syn.sport;
                    run(&mut ebpf, ours_tc, &synack.frame(), 1);
                    syn.flags(TCP_ACK).frame()
                })
                .collect();
            let t = single_runs(&mut ebpf, ours, empty, &acks, Duration::ZERO);
            out.push(t.case(
                hook,
                "(f) ACK establishing a flow (Opened event)",
                "single",
                None,
            ));
            drain(&mut ebpf);
        }
        // Each ACK comes 2 ms after the last packet of its flow: over the 1 ms threshold.
        let acks: Vec<Vec<u8>> = (0..singles.min(500)).map(|_| ack.clone()).collect();
        let t = single_runs(&mut ebpf, ours, empty, &acks, Duration::from_millis(2));
        out.push(t.case(
            hook,
            "(e) packet ending an idle gap (event)",
            "single",
            None,
        ));
        drain(&mut ebpf);
    }
    out
}

/// A Markdown table of the cases.
pub fn table(cases: &[Case]) -> String {
    let mut s = String::from("| hook | case | ours ns/pkt | empty ns/pkt | ratio | ratio of the least | target | |\n|---|---|---|---|---|---|---|---|\n");
    for c in cases {
        let (target, verdict) = match c.target {
            Some(t) if c.ratio() <= t => (format!("<= {t}x"), "met"),
            Some(t) => (format!("<= {t}x"), "MISSED"),
            None => ("reported".to_string(), ""),
        };
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}x | {:.2}x | {target} | {verdict} |\n",
            c.hook,
            c.name,
            c.ours_ns,
            c.empty_ns,
            c.ratio(),
            c.min_ratio()
        ));
    }
    s
}
