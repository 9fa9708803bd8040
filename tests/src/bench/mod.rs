//! Benchmarks. Here: the per-packet cost of the kernel programs, measured
//! with BPF_PROG_TEST_RUN against empty reference programs in the same run
//! (ratios, not absolute times: the machine is noisy). Throughput, scale and
//! the event path have modules of their own.

pub mod events;
pub mod frames;
pub mod insns;
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
/// The floors (monitor-ebpf/src/floor.rs): the leanest programs doing the
/// necessary work, with our key, table and clock, and with the cheapest
/// (16-byte IPv4 key, coarse clock).
pub const FLOOR_XDP: &str = "floor_xdp";
pub const FLOOR_TC: &str = "floor_tc";
pub const CHEAPEST_XDP: &str = "floor_cheapest_xdp";
pub const CHEAPEST_TC: &str = "floor_cheapest_tc";
/// The XDP program cut short after each stage of its packet path, in order.
pub const STAGES: [(&str, &str); 3] = [
    ("stage_parse_xdp", "one-pass parse and port check"),
    (
        "stage_key_xdp",
        "+ packets-tracked counter, coarse clock, 40-byte flow key",
    ),
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
    /// The target ratio, if the issue sets one, and what it divides by.
    pub target: Option<(f64, Versus)>,
    /// The floors, same method, same rounds (repeat cases only): our key,
    /// table and clock; the cheapest ones.
    pub floor_ns: Option<f64>,
    pub cheapest_ns: Option<f64>,
    /// Instructions executed for this case's frame (interpreter over the
    /// object), ours, the floor and the cheapest floor.
    pub insns: Option<Insns>,
}

/// What a target ratio divides by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versus {
    Empty,
    Floor,
    Cheapest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insns {
    pub ours: u64,
    pub floor: u64,
    pub cheapest: u64,
}

impl Case {
    pub fn ratio(&self) -> f64 {
        self.ours_ns / self.empty_ns.max(0.001)
    }

    /// Ours over the floor with our key, table and clock.
    pub fn floor_ratio(&self) -> Option<f64> {
        self.floor_ns.map(|f| self.ours_ns / f.max(0.001))
    }

    /// Ours over the cheapest floor.
    pub fn cheapest_ratio(&self) -> Option<f64> {
        self.cheapest_ns.map(|f| self.ours_ns / f.max(0.001))
    }

    /// The ratio the target is set on.
    pub fn target_ratio(&self) -> Option<f64> {
        match self.target?.1 {
            Versus::Empty => Some(self.ratio()),
            Versus::Floor => self.floor_ratio(),
            Versus::Cheapest => self.cheapest_ratio(),
        }
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
    for name in [FLOOR_XDP, CHEAPEST_XDP] {
        let x: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        x.load().expect("floor xdp");
    }
    for name in [FLOOR_TC, CHEAPEST_TC] {
        let t: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        t.load().expect("floor tc");
    }
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
    floor: Vec<f64>,
    cheapest: Vec<f64>,
}

impl Timings {
    fn case(
        self,
        hook: &'static str,
        name: &'static str,
        method: &'static str,
        target: Option<(f64, Versus)>,
    ) -> Case {
        let opt = |v: &[f64]| (!v.is_empty()).then(|| median(v));
        Case {
            hook,
            name,
            ours_ns: median(&self.ours),
            empty_ns: median(&self.empty),
            ours_min_ns: least(&self.ours),
            empty_min_ns: least(&self.empty),
            method,
            target,
            floor_ns: opt(&self.floor),
            cheapest_ns: opt(&self.cheapest),
            insns: None,
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

/// The programs one hook's cases compare.
#[derive(Clone, Copy)]
pub struct Programs {
    pub ours: &'static str,
    pub empty: &'static str,
    pub floor: &'static str,
    pub cheapest: &'static str,
}

/// Mean ns per run over `repeat` runs, median of `rounds`: ours, the empty
/// program and both floors interleaved round by round.
fn repeated(ebpf: &mut Ebpf, p: Programs, frame: &[u8], repeat: u32, rounds: usize) -> Timings {
    let mut ns: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        for (i, prog) in [p.ours, p.empty, p.floor, p.cheapest].iter().enumerate() {
            ns[i].push(run(ebpf, prog, frame, repeat).as_nanos() as f64);
        }
    }
    let [ours, empty, floor, cheapest] = ns;
    Timings {
        ours,
        empty,
        floor,
        cheapest,
    }
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
            // After a sleep the first run pays for a CPU woken from idle:
            // the empty program takes that, not ours.
            b.push(run(ebpf, empty, f, 1).as_nanos() as f64);
            a.push(run(ebpf, ours, f, 1).as_nanos() as f64);
        } else {
            a.push(run(ebpf, ours, f, 1).as_nanos() as f64);
            b.push(run(ebpf, empty, f, 1).as_nanos() as f64);
        }
    }
    Timings {
        ours: a,
        empty: b,
        floor: Vec::new(),
        cheapest: Vec::new(),
    }
}

/// Events the programs sent so far (all CPUs).
fn events_sent(ebpf: &Ebpf) -> u64 {
    use monitor::counters::ReadCounters;
    let map = ebpf.map("COUNTERS").expect("COUNTERS map");
    let counters = aya::maps::PerCpuArray::try_from(map).expect("per-CPU counters");
    monitor::counters::KernelCounters::read(&counters)
        .expect("reading counters")
        .get(monitor_common::Counter::EventsSent)
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

/// Each hook's programs and the direction its packets go.
const HOOKS: [(&str, Programs, Dir); 2] = [
    (
        "XDP",
        Programs {
            ours: loader::XDP_PROGRAM,
            empty: BASELINE_XDP,
            floor: FLOOR_XDP,
            cheapest: CHEAPEST_XDP,
        },
        Dir::In,
    ),
    (
        "TC",
        Programs {
            ours: loader::TC_PROGRAM,
            empty: BASELINE_TC,
            floor: FLOOR_TC,
            cheapest: CHEAPEST_TC,
        },
        Dir::Out,
    ),
];

/// Each hook's programs and direction, for callers outside.
pub fn hooks() -> [(&'static str, Programs, Dir); 2] {
    HOOKS
}

/// The cases `count_quick_cases` counts, in its order.
pub const QUICK_CASES: [&str; 3] = [
    "(a) non-TCP packet",
    "(b) TCP to an untracked port",
    "(c) packet of an established tracked flow",
];

const CLIENT: &str = "192.0.2.2";
const SERVER: &str = "192.0.2.1";

/// Cases (a) and (b): a non-TCP packet (the IPv4 protocol set to UDP) and
/// TCP to an untracked port, as `dir` sees them.
fn quick_frames(dir: Dir) -> [Vec<u8>; 2] {
    let (c, s): (IpAddr, IpAddr) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
    let mut udp = oriented(Tcp::syn(c, s), dir).frame();
    udp[14 + 9] = 17;
    let mut other = Tcp::syn(c, s);
    other.dport = 8080;
    [udp, oriented(other, dir).frame()]
}

/// Instructions executed for cases (a), (b) and (c) on one hook: ours and
/// both floors, by the interpreter over the object (see `insns`). The
/// handshake runs through our programs first, as in the timed runs.
pub fn count_quick_cases(p: Programs, dir: Dir) -> Result<[Insns; 3], String> {
    let mut m = insns::Machine::new(monitor::EBPF_OBJECT)?;
    let (c, s): (IpAddr, IpAddr) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
    let mut syn = Tcp::syn(c, s);
    syn.sport = 50000;
    let mut synack = Tcp::syn(s, c).flags(TCP_SYN | TCP_ACK);
    synack.sport = 443;
    synack.dport = 50000;
    m.run(loader::XDP_PROGRAM, &syn.frame())?;
    m.run(loader::TC_PROGRAM, &synack.frame())?;
    m.run(loader::XDP_PROGRAM, &syn.clone().flags(TCP_ACK).frame())?;
    let ack = oriented(syn.flags(TCP_ACK), dir).frame();
    let [udp, other] = quick_frames(dir);
    let mut out = [Insns {
        ours: 0,
        floor: 0,
        cheapest: 0,
    }; 3];
    for (i, frame) in [udp, other, ack].iter().enumerate() {
        // Twice each: the cheapest floor enters its flow on its first packet.
        let mut n = [0u64; 3];
        for _ in 0..2 {
            for (k, prog) in [p.ours, p.floor, p.cheapest].iter().enumerate() {
                n[k] = m.run(prog, frame)?.1;
            }
        }
        out[i] = Insns {
            ours: n[0],
            floor: n[1],
            cheapest: n[2],
        };
    }
    Ok(out)
}

/// All cases for both hooks. `repeat` runs per round, `rounds` rounds,
/// `singles` frames for the flow-creating and gap-ending cases.
pub fn per_packet(repeat: u32, rounds: usize, singles: usize) -> Vec<Case> {
    let mut ebpf = load();
    let c: IpAddr = CLIENT.parse().unwrap();
    let s: IpAddr = SERVER.parse().unwrap();
    let mut out = Vec::new();
    for (hook, progs, dir) in HOOKS {
        let (ours, empty) = (progs.ours, progs.empty);
        let [udp, other] = quick_frames(dir);
        // An established flow: hand-shake it once, then time its ACKs.
        let ack = established_ack(&mut ebpf, c, s, dir);
        let counted = count_quick_cases(progs, dir);
        for (i, (name, frame, target)) in [
            (QUICK_CASES[0], &udp, (1.1, Versus::Floor)),
            (QUICK_CASES[1], &other, (1.1, Versus::Floor)),
            (QUICK_CASES[2], &ack, (1.3, Versus::Cheapest)),
        ]
        .into_iter()
        .enumerate()
        {
            let t = repeated(&mut ebpf, progs, frame, repeat, rounds);
            let mut case = t.case(hook, name, "repeat", Some(target));
            case.insns = counted.as_ref().ok().map(|c| c[i]);
            out.push(case);
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
        // Each ACK comes 12 ms after the last packet of its flow: over the
        // 1 ms threshold by at least one tick of the coarse clock (4 ms at
        // HZ=250, 10 ms at HZ=100), so each one ends a gap.
        let acks: Vec<Vec<u8>> = (0..singles.min(500)).map(|_| ack.clone()).collect();
        let before = events_sent(&ebpf);
        let t = single_runs(&mut ebpf, ours, empty, &acks, Duration::from_millis(12));
        let sent = events_sent(&ebpf) - before;
        assert_eq!(
            sent,
            acks.len() as u64,
            "{hook} case (e): every timed packet must end a gap and send its event"
        );
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

/// A Markdown table of the cases: ours against the empty program and both
/// floors, and the instructions each executes.
pub fn table(cases: &[Case]) -> String {
    let mut s = String::from(
        "| hook | case | ours ns/pkt | empty | floor | cheapest floor | ours / empty | ours / floor \
         | ours / cheapest | insns ours / floor / cheapest | target | |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let ns = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.1}"));
    let x = |v: Option<f64>| v.map_or(String::new(), |r| format!("{r:.2}x"));
    for c in cases {
        let (target, verdict) = match (c.target, c.target_ratio()) {
            (Some((t, v)), Some(r)) => (
                format!("<= {t}x {}", versus_name(v)),
                if r <= t { "met" } else { "MISSED" },
            ),
            _ => ("reported".to_string(), ""),
        };
        let insns = c.insns.map_or(String::new(), |i| {
            format!("{} / {} / {}", i.ours, i.floor, i.cheapest)
        });
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {:.2}x | {} | {} | {insns} | {target} | {verdict} |\n",
            c.hook,
            c.name,
            c.ours_ns,
            c.empty_ns,
            ns(c.floor_ns),
            ns(c.cheapest_ns),
            c.ratio(),
            x(c.floor_ratio()),
            x(c.cheapest_ratio()),
        ));
    }
    s
}

fn versus_name(v: Versus) -> &'static str {
    match v {
        Versus::Empty => "empty",
        Versus::Floor => "floor",
        Versus::Cheapest => "cheapest",
    }
}
