//! Kernel tests: the real programs in the running kernel. One binary, so
//! `cargo test` runs them all; each test makes its own namespaces, so they
//! can run side by side.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use aya::{
    maps::{HashMap as BpfHashMap, PerCpuArray, RingBuf},
    programs::{tc::TcAttachType, SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use monitor::{
    config::IngressHook,
    counters::{KernelCounters, ReadCounters},
    loader::{self, LoadError},
    monitor::StartError,
    AgentConfig, FlowEvent, Monitor,
};
use monitor_common::{
    craft::{header_boundaries, Tcp},
    flow::seq_after,
    Counter, Dir, EventKind, Flow, FlowKey, Quick, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN,
};
use monitor_tests::*;

const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1, TCX_NEXT) as BPF_PROG_TEST_RUN returns it: the packet
/// goes on to the next program (tests/tests/chain.rs).
const TC_ACT_UNSPEC: u32 = u32::MAX;

fn test_config(iface: &str) -> AgentConfig {
    AgentConfig {
        interfaces: vec![iface.to_string()],
        gap_threshold: Duration::from_secs(1),
        ..AgentConfig::default()
    }
}

// ---------------------------------------------------------------- test runs

fn load_unattached() -> Ebpf {
    require_root();
    loader::load(&test_config("unused")).expect("loading the programs")
}

fn counters(ebpf: &Ebpf) -> KernelCounters {
    let map = PerCpuArray::try_from(ebpf.map("COUNTERS").expect("COUNTERS map")).unwrap();
    KernelCounters::read(&map).expect("reading counters")
}

/// Test-run the agent's XDP program (ingress) or TC egress program.
fn run(ebpf: &mut Ebpf, dir: Dir, frame: &[u8]) -> u32 {
    let name = match dir {
        Dir::In => loader::XDP_PROGRAM,
        Dir::Out => loader::TC_PROGRAM,
    };
    run_program(ebpf, name, frame).0
}

/// Test-run program `name` on `frame`: its verdict and the frame it hands on.
fn run_program(ebpf: &mut Ebpf, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let p = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("{name} in the object"));
    let r = match p {
        aya::programs::Program::Xdp(p) => p.test_run(opts),
        aya::programs::Program::SchedClassifier(p) => p.test_run(opts),
        other => panic!("{name} is neither XDP nor TC: {other:?}"),
    };
    let r = r.expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A frame as seen in `dir`: ingress goes to port 443, egress comes from it.
fn oriented(mut t: Tcp, dir: Dir) -> Tcp {
    if dir == Dir::Out {
        std::mem::swap(&mut t.src, &mut t.dst);
        std::mem::swap(&mut t.sport, &mut t.dport);
    }
    t
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Tracked,
    Untracked,
    Failure,
}

/// Frames for a program at `dir`; `skb`: a TC program (its test frames are
/// skbs, which the kernel builds from fewer cut frames).
fn crafted_cases(dir: Dir, skb: bool) -> Vec<(String, Vec<u8>, Expect)> {
    let c4 = ip(CLIENT_V4);
    let s4 = ip(SERVER_V4);
    let c6 = ip(CLIENT_V6);
    let s6 = ip(SERVER_V6);
    let plain = Tcp::syn(c4, s4);
    let mut opts = Tcp::syn(c4, s4).payload(50);
    opts.ipv4_options = 12;
    opts.tcp_options = 12;
    let mut v6ext = Tcp::syn(c6, s6);
    v6ext.ipv6_ext = vec![0, 60];
    let mut vlan = Tcp::syn(c4, s4);
    vlan.vlan = Some(100);
    let mut other_port = Tcp::syn(c4, s4);
    other_port.dport = 8080;
    let mut cases = vec![];
    for (name, t, expect) in [
        ("ipv4", plain, Expect::Tracked),
        ("ipv4 with IP and TCP options", opts, Expect::Tracked),
        ("ipv6 with extension headers", v6ext, Expect::Tracked),
        ("802.1Q tagged", vlan, Expect::Tracked),
        ("port 8080", other_port, Expect::Untracked),
    ] {
        let t = oriented(t, dir);
        if expect == Expect::Tracked {
            let bounds = header_boundaries(&t);
            // The last boundary ends the fixed TCP header: everything the
            // monitor reads. TCP options and payload may be cut (snaplen).
            let needed = *bounds.last().unwrap();
            // The kernel refuses test frames shorter than an Ethernet header,
            // and skb test frames (TC) that end right after an IP ethertype:
            // the stack never builds such an skb.
            let shortest = if skb && t.vlan.is_none() { 15 } else { 14 };
            for cut in bounds {
                if cut >= shortest && cut < needed {
                    cases.push((
                        format!("{name} cut at {cut}"),
                        t.frame()[..cut].to_vec(),
                        Expect::Failure,
                    ));
                }
            }
        }
        cases.push((name.to_string(), t.frame(), expect));
    }
    let mut udp = oriented(Tcp::syn(c4, s4), dir).frame();
    udp[14 + 9] = 17;
    cases.push(("udp".into(), udp, Expect::Untracked));
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("arp".into(), arp, Expect::Untracked));
    let mut bad_ihl = oriented(Tcp::syn(c4, s4), dir).frame();
    bad_ihl[14] = 0x43;
    cases.push(("ipv4 with IHL 3".into(), bad_ihl, Expect::Failure));
    // TCP data offset 4 (less than the 20-byte header).
    let mut bad_doff = oriented(Tcp::syn(c4, s4), dir).frame();
    bad_doff[14 + 20 + 12] = 0x40;
    cases.push(("tcp data offset 4".into(), bad_doff, Expect::Failure));
    // A non-first IPv4 fragment carries no TCP header: not ours.
    let mut frag = oriented(Tcp::syn(c4, s4), dir).frame();
    frag[14 + 6..14 + 8].copy_from_slice(&[0x00, 0xb9]);
    cases.push(("ipv4 non-first fragment".into(), frag, Expect::Untracked));
    // IPv6 fragment header, offset 8: not ours either.
    let mut f6 = Tcp::syn(c6, s6);
    f6.ipv6_ext = vec![44];
    let mut f6 = oriented(f6, dir).frame();
    f6[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&[0x00, 0x08]);
    cases.push(("ipv6 non-first fragment".into(), f6, Expect::Untracked));
    // Stacked VLAN tags (QinQ): not parsed, passed.
    let mut qinq = oriented(Tcp::syn(c4, s4), dir).frame();
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x14]);
    cases.push(("802.1ad + 802.1Q stacked".into(), qinq, Expect::Untracked));
    // Five IPv6 extension headers: one more than the bound walks.
    let mut long = Tcp::syn(c6, s6);
    long.ipv6_ext = vec![0, 60, 60, 60, 60];
    cases.push((
        "ipv6 with 5 extension headers".into(),
        oriented(long, dir).frame(),
        Expect::Untracked,
    ));
    cases
}

fn crafted_frames_pass_and_move_the_right_counter(dir: Dir, pass: u32) {
    let program = match dir {
        Dir::In => loader::XDP_PROGRAM,
        Dir::Out => loader::TC_PROGRAM,
    };
    crafted_frames_through(&mut load_unattached(), program, dir, pass);
}

fn crafted_frames_through(ebpf: &mut Ebpf, program: &str, dir: Dir, pass: u32) {
    let skb = matches!(
        ebpf.program(program),
        Some(aya::programs::Program::SchedClassifier(_))
    );
    let kcfg = test_config("unused").kernel_config();
    let mut settled = 0usize;
    let cases = crafted_cases(dir, skb);
    for (name, frame, expect) in cases.iter().cloned() {
        let before = counters(ebpf);
        let (verdict, out) = run_program(ebpf, program, &frame);
        assert_eq!(verdict, pass, "{program}, {name}: must pass");
        assert_eq!(out, frame, "{program}, {name}: handed on unchanged");
        let after = counters(ebpf);
        let delta = |c| after.get(c) - before.get(c);
        // Exactly the frames the one pass leaves take the full parse, once
        // (issue 18: no counter on the untracked path, one on the tracked
        // path); a failure always took it.
        let one_pass = monitor_common::quick(frame.as_slice(), dir == Dir::In, &kcfg);
        let full = delta(Counter::FullParses);
        assert_eq!(
            full,
            u64::from(one_pass == Quick::Unsure),
            "{name}: full parses"
        );
        assert!(expect != Expect::Failure || full == 1, "{name}: a failure");
        if PLAIN.contains(&name.as_str()) {
            assert_eq!(full, 0, "{name}: a plain frame takes the one pass");
            settled += 1;
        }
        assert_eq!(
            delta(Counter::PacketsTracked),
            u64::from(expect == Expect::Tracked),
            "{name}: tracked"
        );
        assert_eq!(
            delta(Counter::ParseFailures),
            u64::from(expect == Expect::Failure),
            "{name}: parse failures"
        );
    }
    assert_eq!(settled, PLAIN.len(), "every plain case was run");
}

/// Crafted cases with whole headers, no VLAN tag, no IPv6 extension header.
const PLAIN: [&str; 3] = ["ipv4", "ipv4 with IP and TCP options", "port 8080"];

#[test]
fn xdp_passes_every_crafted_frame_and_counts_it_right() {
    crafted_frames_pass_and_move_the_right_counter(Dir::In, XDP_PASS);
}

#[test]
fn tc_passes_every_crafted_frame_and_counts_it_right() {
    crafted_frames_pass_and_move_the_right_counter(Dir::Out, TC_ACT_UNSPEC);
}

#[test]
fn tc_ingress_passes_every_crafted_frame_unchanged_and_counts_it_right() {
    require_root();
    let cfg = AgentConfig {
        ingress: IngressHook::Tc,
        ..test_config("unused")
    };
    let mut ebpf = loader::load(&cfg).expect("loading the TC programs");
    crafted_frames_through(
        &mut ebpf,
        loader::TC_INGRESS_PROGRAM,
        Dir::In,
        TC_ACT_UNSPEC,
    );
}

/// A kernel before 5.18, forced: the planned XDP program is the twin without
/// frags, which this kernel verifies and runs like the one with them.
#[test]
fn before_5_18_the_xdp_twin_without_frags_tracks_every_crafted_frame_alike() {
    require_root();
    let old = loader::KernelFeatures::of(aya::util::KernelVersion::new(5, 15, 0));
    let mut ebpf = loader::load_for(&test_config("unused"), &old).expect("loading for 5.15");
    assert!(
        program_loaded(&ebpf, loader::XDP_NOFRAGS_PROGRAM)
            && !program_loaded(&ebpf, loader::XDP_PROGRAM),
        "5.15 has no XDP frags: only the twin is loaded"
    );
    crafted_frames_through(&mut ebpf, loader::XDP_NOFRAGS_PROGRAM, Dir::In, XDP_PASS);
}

/// The clock a SYN was stamped with: its half-open entry's first-seen time,
/// with CLOCK_MONOTONIC read just before and just after the run.
fn syn_stamp(ebpf: &mut Ebpf, program: &str, port: u16) -> (u64, u64, u64) {
    let mut syn = Tcp::syn(ip(CLIENT_V4), ip(SERVER_V4));
    syn.sport = port;
    let before = monitor::clock::now_ns();
    assert_eq!(run_program(ebpf, program, &syn.frame()).0, XDP_PASS);
    let after = monitor::clock::now_ns();
    let stamp = table(ebpf, "HALF_OPEN")
        .into_iter()
        .find(|(k, _)| k.client_port == port)
        .expect("the SYN's half-open entry")
        .1
        .first_seen_ns;
    (before, stamp, after)
}

/// From 5.11 packets are stamped with the coarse clock (CLOCK_MONOTONIC as of
/// the last tick); before, `bpf_ktime_get_ns` reads the same clock precisely
/// (the loader sets a read-only global, and the verifier prunes the coarse
/// call). Both against the agent's own clock.
#[test]
fn packets_are_stamped_on_the_agents_clock_coarse_from_5_11_precise_before() {
    require_root();
    // A tick at HZ=100 (the coarsest), with room for scheduling.
    const TICK_NS: u64 = 20_000_000;
    let new = loader::KernelFeatures::current().expect("kernel version");
    if !new.coarse_clock {
        eprintln!("skipped: this kernel predates bpf_ktime_get_coarse_ns (5.11)");
        return;
    }
    let old = loader::KernelFeatures::of(aya::util::KernelVersion::new(5, 10, 0));
    assert!(!old.coarse_clock);
    let cfg = test_config("unused");
    let program = |k| {
        loader::plan(&cfg, k)
            .expect("a plan")
            .xdp
            .expect("an XDP program")
    };
    let (new_xdp, old_xdp) = (program(&new), program(&old));
    let mut coarse = loader::load_for(&cfg, &new).expect("loading");
    let mut precise = loader::load_for(&cfg, &old).expect("loading for 5.10");
    let mut coarse_behind = 0;
    for i in 0..20u16 {
        let (b, t, a) = syn_stamp(&mut precise, old_xdp, 41000 + i);
        assert!(b <= t && t <= a, "precise: {b} <= {t} <= {a}");
        let (b, t, a) = syn_stamp(&mut coarse, new_xdp, 41000 + i);
        assert!(
            b.saturating_sub(TICK_NS) <= t && t <= a,
            "coarse: {b} - tick <= {t} <= {a}"
        );
        coarse_behind += u32::from(t < b);
        std::thread::sleep(Duration::from_millis(1));
    }
    // A coarse stamp lags the precise clock until the next tick: most of
    // 20 runs, 1 ms apart, land between ticks.
    assert!(
        coarse_behind >= 10,
        "coarse stamps behind the clock: {coarse_behind} of 20"
    );
}

fn program_loaded(ebpf: &Ebpf, name: &str) -> bool {
    ebpf.program(name).is_some_and(|p| p.fd().is_ok())
}

/// Names (as the kernel keeps them: 15 bytes) of the loaded programs that
/// use this load's COUNTERS map: this load's programs, whoever else runs.
fn kernel_programs_of(ebpf: &Ebpf) -> Vec<String> {
    let counters_id = match ebpf.map("COUNTERS") {
        Some(aya::maps::Map::PerCpuArray(m)) => m.info().expect("map info").id(),
        other => panic!("COUNTERS should be a per-CPU array: {other:?}"),
    };
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&counters_id))
        })
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn ingress_tc_loads_no_xdp_program() {
    require_root();
    let cfg = AgentConfig {
        ingress: IngressHook::Tc,
        ..test_config("unused")
    };
    let ebpf = loader::load(&cfg).expect("loading for TC ingress");
    for xdp in [loader::XDP_PROGRAM, loader::XDP_NOFRAGS_PROGRAM] {
        assert!(!program_loaded(&ebpf, xdp), "{xdp} loaded");
    }
    let mut names = kernel_programs_of(&ebpf);
    names.sort();
    // "monitor_tc_ingress", cut to 15 bytes by the kernel.
    assert_eq!(names, ["monitor_tc", "monitor_tc_ingr"]);
    // And the XDP configuration loads XDP and TC egress only.
    let ebpf = load_unattached();
    let mut names = kernel_programs_of(&ebpf);
    names.sort();
    assert_eq!(names, ["monitor_tc", "monitor_xdp"]);
}

/// SYN (XDP), SYN-ACK (TC), ACK (XDP) through test-run, from `client:port`.
fn handshake(ebpf: &mut Ebpf, client: IpAddr, port: u16) {
    let mut syn = Tcp::syn(client, ip(SERVER_V4));
    syn.sport = port;
    let mut synack = Tcp::syn(ip(SERVER_V4), client).flags(TCP_SYN | TCP_ACK);
    synack.sport = 443;
    synack.dport = port;
    let ack = syn.clone().flags(TCP_ACK);
    assert_eq!(run(ebpf, Dir::In, &syn.frame()), XDP_PASS);
    assert_eq!(run(ebpf, Dir::Out, &synack.frame()), TC_ACT_UNSPEC);
    assert_eq!(run(ebpf, Dir::In, &ack.frame()), XDP_PASS);
}

fn table(ebpf: &Ebpf, name: &str) -> Vec<(FlowKey, Flow)> {
    let m: BpfHashMap<_, FlowKey, Flow> = BpfHashMap::try_from(ebpf.map(name).unwrap()).unwrap();
    m.iter().collect::<Result<_, _>>().unwrap()
}

#[test]
fn a_handshake_moves_a_connection_from_half_open_to_a_flow_with_an_opened_event() {
    let mut ebpf = load_unattached();
    let frame = Tcp::syn(ip(CLIENT_V4), ip(SERVER_V4)).frame();
    assert_eq!(run(&mut ebpf, Dir::In, &frame), XDP_PASS);
    assert_eq!(table(&ebpf, "FLOWS").len(), 0, "a SYN alone is half-open");
    assert_eq!(table(&ebpf, "HALF_OPEN").len(), 1);
    handshake(&mut ebpf, ip(CLIENT_V4), 40000);
    let flows = table(&ebpf, "FLOWS");
    assert_eq!(flows.len(), 1);
    assert_eq!(table(&ebpf, "HALF_OPEN").len(), 0, "moved, not copied");
    assert_eq!(flows[0].0.server_port, 443);
    assert_eq!(flows[0].0.client_port, 40000);
    // Two SYNs (the first and the helper's retransmission), then the ACK.
    assert_eq!((flows[0].1.pkts_in, flows[0].1.pkts_out), (3, 1));
    let mut ring = RingBuf::try_from(ebpf.take_map("EVENTS").unwrap()).unwrap();
    let item = ring.next().expect("an event");
    let ev = FlowEvent::decode(&item).unwrap();
    assert_eq!(ev.kind, EventKind::Opened);
    assert_eq!(
        ev.client(),
        "192.0.2.2:40000".parse::<SocketAddr>().unwrap()
    );
    let c = counters(&ebpf);
    assert_eq!(c.get(Counter::FlowsCreated), 1);
    assert_eq!(c.get(Counter::HalfOpenCreated), 1);
}

#[test]
fn a_second_client_rst_with_another_sequence_number_is_reported_once_with_the_firsts() {
    let mut ebpf = load_unattached();
    handshake(&mut ebpf, ip(CLIENT_V4), 40001);
    let mut rst = Tcp::syn(ip(CLIENT_V4), ip(SERVER_V4)).flags(TCP_RST);
    rst.sport = 40001;
    for seq in [1001, 2461, 3921] {
        rst.seq = seq;
        assert_eq!(run(&mut ebpf, Dir::In, &rst.frame()), XDP_PASS);
    }
    let mut ring = RingBuf::try_from(ebpf.take_map("EVENTS").unwrap()).unwrap();
    let mut kinds = Vec::new();
    while let Some(item) = ring.next() {
        let ev = FlowEvent::decode(&item).unwrap();
        if ev.kind == EventKind::ResetAgain {
            assert_eq!((ev.raw.seq, ev.raw.first_rst_seq), (2461, 1001));
        }
        kinds.push(ev.kind);
    }
    // The third RST is no event: one per flow at most.
    let again = kinds
        .iter()
        .filter(|k| **k == EventKind::ResetAgain)
        .count();
    assert_eq!(again, 1, "{kinds:?}");
    assert!(kinds.contains(&EventKind::Closed), "{kinds:?}");
}

/// Tap mode through test runs of `program`: a handshake and an answer
/// mirrored at both switch ports, and a connection between two other hosts.
fn tap_mode_through(program: &'static str, ingress: monitor::config::IngressHook, pass: u32) {
    require_root();
    let cfg = AgentConfig {
        mode: monitor::config::AgentMode::Tap,
        ingress,
        servers: vec!["192.0.2.1".parse().unwrap()],
        ..test_config("unused")
    };
    let mut ebpf = loader::load(&cfg).expect("loading the tap programs");
    let mut tap = |t: &Tcp| {
        let frame = t.frame();
        let (verdict, out) = run_program(&mut ebpf, program, &frame);
        assert_eq!((verdict, &out), (pass, &frame), "passed unchanged");
    };
    let (client, server) = (ip(CLIENT_V4), ip(SERVER_V4));
    let mut syn = Tcp::syn(client, server);
    syn.sport = 40002;
    let mut synack = Tcp::syn(server, client).flags(TCP_SYN | TCP_ACK);
    synack.sport = 443;
    synack.dport = 40002;
    let answer = synack.clone().flags(TCP_ACK | TCP_PSH).payload(100);
    // Each packet twice, as a switch mirroring both ports shows it.
    for t in [&syn, &synack, &syn.clone().flags(TCP_ACK), &answer] {
        tap(t);
        tap(t);
    }
    // Another host's connection to port 443 on the same mirror: not a server.
    let mut other = Tcp::syn(client, ip("192.0.2.77"));
    other.sport = 40003;
    tap(&other);
    tap(&other.clone().flags(TCP_ACK));
    let flows = table(&ebpf, "FLOWS");
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].0.server_port, 443);
    // The half-open table does not tell the handshake's copies apart (SYN
    // and SYN-ACK count twice); from the establishing ACK on, every copy is
    // passed over.
    assert_eq!((flows[0].1.pkts_in, flows[0].1.pkts_out), (3, 3));
    assert!(
        table(&ebpf, "HALF_OPEN").is_empty(),
        "the other host's SYN is not ours"
    );
    assert_eq!(counters(&ebpf).get(Counter::Duplicates), 2);
}

#[test]
fn tap_mode_on_xdp_tells_directions_apart_and_counts_a_mirrors_copy_once() {
    tap_mode_through(
        loader::XDP_TAP_PROGRAM,
        monitor::config::IngressHook::Xdp,
        XDP_PASS,
    );
}

#[test]
fn tap_mode_on_tc_tells_directions_apart_and_counts_a_mirrors_copy_once() {
    tap_mode_through(
        loader::TC_TAP_PROGRAM,
        monitor::config::IngressHook::Tc,
        TC_ACT_UNSPEC,
    );
}

#[test]
fn a_syn_flood_fills_the_half_open_table_and_never_evicts_established_flows() {
    require_root();
    let cfg = AgentConfig {
        flow_table_size: 256,
        half_open_table_size: 1024,
        ..test_config("unused")
    };
    let mut ebpf = loader::load(&cfg).unwrap();
    for port in 1000..1100u16 {
        handshake(&mut ebpf, ip(CLIENT_V4), port);
    }
    // 100,000 spoofed sources, each a SYN that is never acknowledged.
    let n = 100_000u32;
    for i in 0..n {
        let src = std::net::Ipv4Addr::new(198, 18 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let t = Tcp::syn(src.into(), ip(SERVER_V4));
        assert_eq!(run(&mut ebpf, Dir::In, &t.frame()), XDP_PASS);
    }
    let flows = table(&ebpf, "FLOWS");
    assert_eq!(flows.len(), 100, "every established flow is still tracked");
    let half = table(&ebpf, "HALF_OPEN").len();
    assert!(half <= 1024 + 4, "the flood stays in its bound: {half}");
    let c = counters(&ebpf);
    assert_eq!(c.get(Counter::HalfOpenCreated), 100 + u64::from(n));
    assert_eq!(c.get(Counter::FlowsCreated), 100);
    assert_eq!(
        c.get(Counter::EventsSent),
        100,
        "no event for a half-open SYN"
    );
    println!(
        "SYN flood of {n}: {} flows kept, {half} half-open entries, {} events",
        flows.len(),
        c.get(Counter::EventsSent)
    );
}

#[test]
fn flow_table_of_one_mebi_entries_loads() {
    require_root();
    let cfg = AgentConfig {
        flow_table_size: 1 << 20,
        ..test_config("unused")
    };
    let ebpf = loader::load(&cfg).expect("1,048,576-entry table must load");
    let info = match ebpf.map("FLOWS").unwrap() {
        aya::maps::Map::LruHashMap(data) => data.info().unwrap(),
        other => panic!("FLOWS should be an LRU hash map, is {other:?}"),
    };
    assert_eq!(info.max_entries(), 1 << 20);
}

// ------------------------------------------------------- real TCP in netns

/// Start the monitor on the pair's server interface.
fn start_monitor(pair: &Pair) -> Monitor {
    start_monitor_with(pair, IngressHook::Xdp)
}

fn start_monitor_with(pair: &Pair, ingress: IngressHook) -> Monitor {
    let mut cfg = test_config(&pair.server_if);
    cfg.ingress = ingress;
    pair.server
        .run(move || Monitor::start(&cfg).expect("monitor start"))
}

/// Collect events until one matches `done`, or 10 s pass.
fn events_until(m: &mut Monitor, done: impl Fn(&FlowEvent) -> bool) -> Vec<FlowEvent> {
    let mut seen = Vec::new();
    wait_for(Duration::from_secs(10), || {
        m.drain(|e| seen.push(e));
        seen.iter().any(&done).then_some(())
    });
    seen
}

/// A server on `port` that reads until EOF; returns bytes read.
fn serve_once(pair: &Pair, addr: IpAddr, port: u16) -> std::thread::JoinHandle<usize> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = pair.server.spawn(move || {
        let l = TcpListener::bind(SocketAddr::new(addr, port)).expect("bind");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf.len()
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    h
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and option struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(r, 0);
}

fn gap_then_fin(server: &str, ingress: IngressHook) {
    let pair = Pair::new();
    let mut m = start_monitor_with(&pair, ingress);
    let hooks = &m.attachments()[0];
    match ingress {
        IngressHook::Xdp => assert_ne!(hooks.xdp_mode, "off"),
        IngressHook::Tc => assert_eq!(hooks.xdp_mode, "off"),
    }
    let addr = ip(server);
    let srv = serve_once(&pair, addr, 443);
    let local = pair.client.run(move || {
        let mut s = TcpStream::connect((addr, 443)).expect("connect");
        s.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_secs(3));
        s.write_all(b"again").unwrap();
        s.local_addr().unwrap()
        // Dropping the stream closes it with a FIN.
    });
    assert_eq!(srv.join().unwrap(), 10);
    let evs = events_until(&mut m, |e| {
        e.kind == EventKind::Closed && e.client() == local
    });
    let mine: Vec<_> = evs.iter().filter(|e| e.client() == local).collect();
    let kinds: Vec<_> = mine.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::Opened, EventKind::GapEnded, EventKind::Closed],
        "{mine:#?}"
    );
    let gap = mine[1];
    assert_eq!(gap.dir, Dir::In, "the client broke the silence");
    assert!(gap.has_payload());
    let err = (gap.silence().as_secs_f64() - 3.0).abs();
    assert!(
        err < 0.1,
        "gap {:?} should be 3 s within 100 ms",
        gap.silence()
    );
    let close = mine[2];
    assert_eq!(close.dir, Dir::In, "the client closed first");
    assert!(close.is_fin() && !close.is_rst());
    assert_eq!(m.decode_errors(), 0);
}

#[test]
fn tcp_gap_of_3s_then_client_fin_is_reported_ipv4() {
    gap_then_fin(SERVER_V4, IngressHook::Xdp);
}

#[test]
fn tc_ingress_reports_the_same_gap_and_fin_as_xdp() {
    gap_then_fin(SERVER_V4, IngressHook::Tc);
    gap_then_fin(SERVER_V6, IngressHook::Tc);
}

#[test]
fn tcp_gap_of_3s_then_client_fin_is_reported_ipv6() {
    gap_then_fin(SERVER_V6, IngressHook::Xdp);
}

fn client_rst(server: &str) {
    let pair = Pair::new();
    let mut m = start_monitor(&pair);
    let addr = ip(server);
    let srv = serve_once(&pair, addr, 443);
    let local = pair.client.run(move || {
        let mut s = TcpStream::connect((addr, 443)).expect("connect");
        s.write_all(b"ping").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        set_linger_zero(&s);
        s.local_addr().unwrap()
    });
    let _ = srv.join();
    let evs = events_until(&mut m, |e| {
        e.kind == EventKind::Closed && e.client() == local
    });
    let close = evs
        .iter()
        .find(|e| e.kind == EventKind::Closed && e.client() == local)
        .expect("a close event");
    assert_eq!(close.dir, Dir::In);
    assert!(close.is_rst());
    let (lo, hi) = close.ttl_baseline().expect("client baseline");
    assert!(
        (lo..=hi).contains(&close.raw.ttl),
        "client's own RST: ttl {} within baseline {lo}..{hi}",
        close.raw.ttl
    );
    assert!(close.since_server().is_some());
    // A real stack resets at its own next sequence number and acknowledges
    // no more than the server sent: none of the forged-reset signs.
    let r = &close.raw;
    assert_eq!(r.seq, r.client_seq_next, "the RST's sequence number");
    assert!(
        r.ack == r.server_seq_next || seq_after(r.server_seq_next, r.ack),
        "ack {} beyond the server's next {}",
        r.ack,
        r.server_seq_next
    );
}

#[test]
fn client_rst_is_reported_with_ttl_matching_its_baseline_ipv4() {
    client_rst(SERVER_V4);
}

#[test]
fn client_rst_is_reported_with_ttl_matching_its_baseline_ipv6() {
    client_rst(SERVER_V6);
}

#[test]
fn connection_to_port_8080_is_not_tracked() {
    let pair = Pair::new();
    let mut m = start_monitor(&pair);
    let before = m.counters().unwrap();
    let srv = serve_once(&pair, ip(SERVER_V4), 8080);
    pair.client.run(|| {
        let mut s = TcpStream::connect((ip(SERVER_V4), 8080)).expect("connect");
        s.write_all(&[TCP_ACK | TCP_PSH; 100]).unwrap();
    });
    assert_eq!(srv.join().unwrap(), 100);
    std::thread::sleep(Duration::from_millis(200));
    let after = m.counters().unwrap();
    let mut evs = Vec::new();
    m.drain(|e| evs.push(e));
    assert!(evs.is_empty(), "no events for port 8080: {evs:?}");
    // Not tracked, and never a failure. (Full parses are not compared: the
    // namespace's own IPv6 traffic, MLD behind a hop-by-hop header, takes
    // the full parse meanwhile; the one pass on plain frames is pinned by
    // the crafted-frame tests.)
    for c in [Counter::PacketsTracked, Counter::ParseFailures] {
        assert_eq!(after.get(c), before.get(c), "{c:?}");
    }
    assert_eq!(m.flows().unwrap().keys().count(), 0);
}

#[test]
fn missing_interface_is_a_clear_error_and_attaches_nothing() {
    let pair = Pair::new();
    let err = pair
        .server
        .run(|| Monitor::start(&test_config("nosuch0")).err())
        .expect("must fail");
    assert!(
        matches!(err, StartError::Load(LoadError::NoInterface { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("\"nosuch0\" does not exist"),
        "{err}"
    );
}

#[test]
fn agent_binary_reports_a_missing_interface_and_exits_nonzero() {
    require_root();
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("monitor");
    assert!(bin.exists(), "build the agent first: {bin:?}");
    let out = std::process::Command::new(bin)
        .args(["run", "--iface", "nosuch0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"nosuch0\" does not exist"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn dropping_the_monitor_detaches_xdp_and_tc() {
    let pair = Pair::new();
    let m = start_monitor(&pair);
    let iface = pair.server_if.clone();
    let attached = |iface: String| {
        move || {
            let link = std::process::Command::new("ip")
                .args(["-d", "link", "show", "dev", &iface])
                .output()
                .unwrap();
            let xdp = String::from_utf8_lossy(&link.stdout).contains("prog/xdp");
            let tcx = SchedClassifier::query_tcx(&iface, TcAttachType::Egress)
                .map(|(_, progs)| progs.len())
                .unwrap_or(0);
            (xdp, tcx)
        }
    };
    assert_eq!(pair.server.run(attached(iface.clone())), (true, 1));
    drop(m);
    assert_eq!(pair.server.run(attached(iface)), (false, 0));
}

#[test]
fn flow_table_memory_is_reported_from_the_kernels_accounting() {
    let pair = Pair::new();
    let m = start_monitor(&pair);
    let bytes = m.flow_table_memory_bytes().expect("memlock in fdinfo");
    // An LRU hash of 262,144 entries of 40 + 88 bytes cannot take less than that.
    assert!(bytes >= 262_144 * (40 + 88), "{bytes}");
    println!("flow table memory at 262,144 entries: {bytes} bytes");
}

/// Regression check, not a benchmark. Instructions executed (an
/// interpreter over the object: no timing noise) must stay within 1.3x of
/// the counts recorded in BENCHMARKS.md; the quick cases' cost over the
/// floors measured in the same run (far steadier than over an empty
/// program) within 1.3x of the recorded ratios; the event and flow-creating
/// cases within a few times their recorded ratio to the empty program. On
/// this shared 2-core machine noise alone can put a timed case over its
/// bound, so a case passes if any of three runs is within it.
#[test]
fn per_packet_cost_has_not_regressed() {
    require_root();
    // (hook, case, instructions recorded, ours / floor recorded)
    let recorded = [
        ("XDP", "(a) non-TCP packet", 19, 1.22),
        ("XDP", "(b) TCP to an untracked port", 43, 1.22),
        ("XDP", "(c) packet of an established tracked flow", 243, 1.6),
        ("TC", "(a) non-TCP packet", 21, 1.22),
        ("TC", "(b) TCP to an untracked port", 43, 1.22),
        ("TC", "(c) packet of an established tracked flow", 218, 1.4),
    ];
    for (hook, progs, dir) in monitor_tests::bench::hooks() {
        let counts = monitor_tests::bench::count_quick_cases(progs, dir).expect("interpreter");
        for (name, n) in monitor_tests::bench::QUICK_CASES.iter().zip(counts) {
            let r = recorded
                .iter()
                .find(|r| (r.0, r.1) == (hook, *name))
                .unwrap();
            assert!(
                n.ours as f64 <= r.2 as f64 * 1.3,
                "{hook} {name}: {} instructions, recorded {}",
                n.ours,
                r.2
            );
        }
    }
    let empty_bounds = [
        ("(d) SYN creating a half-open entry", 24.0),
        ("(f) ACK establishing a flow (Opened event)", 32.0),
        ("(e) packet ending an idle gap (event)", 25.0),
    ];
    let bound = |hook: &str, name: &str| -> Option<(f64, bool)> {
        if let Some(r) = recorded.iter().find(|r| (r.0, r.1) == (hook, name)) {
            return Some((r.3 * 1.3, true));
        }
        empty_bounds
            .iter()
            .find(|b| b.0 == name)
            .map(|b| (b.1, false))
    };
    // (hook, case, the best ratio so far, its bound)
    let mut best: Vec<(&str, &str, f64, f64)> = Vec::new();
    for attempt in 1..=3 {
        let cases = monitor_tests::bench::per_packet(100_000, 15, 300);
        println!("run {attempt}:\n{}", monitor_tests::bench::table(&cases));
        for c in &cases {
            let Some((limit, to_floor)) = bound(c.hook, c.name) else {
                continue;
            };
            let ratio = if to_floor {
                c.floor_ratio().expect("floor measured")
            } else {
                c.ratio()
            };
            match best.iter_mut().find(|b| (b.0, b.1) == (c.hook, c.name)) {
                Some(b) => b.2 = b.2.min(ratio),
                None => best.push((c.hook, c.name, ratio, limit)),
            }
        }
        let over: Vec<_> = best.iter().filter(|b| b.2 > b.3).collect();
        if over.is_empty() {
            return;
        }
        assert!(
            attempt < 3,
            "over their bounds in all three runs (hook, case, ratio, bound): {over:?}"
        );
    }
}

#[test]
fn a_full_ring_buffer_drops_events_counted_marks_their_flows_and_every_packet_still_passes() {
    // Nobody reads the ring buffer: 40,000 new flows overflow its 4 MiB.
    let mut ebpf = load_unattached();
    for i in 0..40_000u32 {
        let port = 1024 + (i % 60_000) as u16;
        let src = std::net::Ipv4Addr::new(100, 64, (i / 60_000) as u8, 1);
        handshake(&mut ebpf, src.into(), port);
    }
    let c = counters(&ebpf);
    let (sent, dropped) = (c.get(Counter::EventsSent), c.get(Counter::EventsDropped));
    assert!(
        dropped > 0,
        "the ring buffer should have filled: sent {sent}"
    );
    assert_eq!(
        sent + dropped,
        c.get(Counter::FlowsCreated),
        "every event is sent or counted as dropped"
    );
    assert_eq!(c.get(Counter::FlowsCreated), 40_000);
    // Every flow whose Opened event was lost carries the mark user space
    // turns into "incomplete".
    let marked = table(&ebpf, "FLOWS")
        .iter()
        .filter(|(_, f)| f.state & monitor_common::state::EVENT_LOST != 0)
        .count() as u64;
    assert_eq!(marked, dropped);
    println!("ring buffer full: {sent} events sent, {dropped} dropped, counted and marked");
}

#[test]
fn a_full_flow_table_evicts_and_every_packet_still_passes() {
    require_root();
    let cfg = AgentConfig {
        flow_table_size: 64,
        ..test_config("unused")
    };
    let mut ebpf = loader::load(&cfg).unwrap();
    for port in 2000..3000u16 {
        handshake(&mut ebpf, ip(CLIENT_V4), port);
    }
    let c = counters(&ebpf);
    assert_eq!(c.get(Counter::FlowsCreated), 1000);
    assert_eq!(
        c.get(Counter::FlowInsertFailed),
        0,
        "LRU evicts instead of failing"
    );
    let held = table(&ebpf, "FLOWS").len();
    assert!(
        held <= 64 + 2 * 2,
        "table bounded (LRU keeps per-CPU slack): {held}"
    );
}

fn fold(mut acc: u64, data: &[u8]) -> u64 {
    for chunk in data.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        acc = acc.rotate_left(5) ^ u64::from_le_bytes(w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    acc
}

#[test]
fn a_gibibyte_through_the_tracked_port_arrives_byte_identical() {
    const TOTAL: usize = 1 << 30;
    let pair = Pair::new();
    let m = start_monitor(&pair);
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.server.spawn(move || {
        let l = TcpListener::bind((ip(SERVER_V4), 443)).unwrap();
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let (mut acc, mut n, mut buf) = (0u64, 0usize, vec![0u8; 1 << 16]);
        // Re-chunk into 8-byte-aligned pieces so both sides fold the same words.
        let mut carry = Vec::new();
        loop {
            let k = s.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k;
            carry.extend_from_slice(&buf[..k]);
            let whole = carry.len() / 8 * 8;
            acc = fold(acc, &carry[..whole]);
            carry.drain(..whole);
        }
        (fold(acc, &carry), n)
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let sent = pair.client.run(|| {
        let mut s = TcpStream::connect((ip(SERVER_V4), 443)).unwrap();
        let mut block = vec![0u8; 1 << 16];
        let (mut acc, mut x) = (0u64, 0x2545_f491_4f6c_dd1du64);
        for _ in 0..TOTAL / block.len() {
            for w in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            acc = fold(acc, &block);
            s.write_all(&block).unwrap();
        }
        acc
    });
    let (received, n) = srv.join().unwrap();
    assert_eq!(n, TOTAL);
    assert_eq!(received, sent, "bytes changed in flight");
    // And the monitor tracked it all.
    let flows = m.flows().unwrap();
    let bytes_in: u64 = flows
        .iter()
        .filter_map(Result::ok)
        .map(|(_, f)| f.bytes_in)
        .sum();
    assert!(bytes_in >= TOTAL as u64, "tracked {bytes_in} bytes in");
    let c = m.counters().unwrap();
    assert_eq!(c.get(Counter::ParseFailures), 0);
    println!("1 GiB byte-identical; {bytes_in} IP bytes tracked in");
}

/// `<Ping><HeartbeatInterval>h</HeartbeatInterval><Folders/></Ping>` in WBXML.
fn ping_body(h: &str) -> Vec<u8> {
    let mut b = vec![0x03, 0x01, 0x6a, 0x00, 0x00, 13, 0x45, 0x48, 0x03];
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(&[0x00, 0x01, 0x09, 0x01]);
    b
}

fn ping_head(query: &str, body_len: usize) -> String {
    format!(
        "POST /Microsoft-Server-ActiveSync?{query} HTTP/1.1\r\nHost: mail\r\n\
         Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: {body_len}\r\n\r\n"
    )
}

#[test]
fn plaintext_pings_reach_user_space_and_give_their_heartbeats() {
    plaintext_pings(IngressHook::Xdp);
}

#[test]
fn plaintext_pings_are_read_through_tc_ingress_too() {
    plaintext_pings(IngressHook::Tc);
}

fn plaintext_pings(ingress: IngressHook) {
    use monitor::{
        event::Record,
        ping::{request::encode_base64_query, Heartbeat, Outcome, Reader},
    };
    let pair = Pair::new();
    let mut cfg = test_config(&pair.server_if);
    cfg.ports = vec![443, 8080];
    cfg.plaintext_ports = vec![8080];
    cfg.ingress = ingress;
    let mut m = pair
        .server
        .run(move || Monitor::start(&cfg).expect("monitor start"));
    let addr = ip(SERVER_V4);
    let body1 = ping_body("480");
    let req1_len = ping_head("", 0).len();
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.server.spawn(move || {
        let l = TcpListener::bind(SocketAddr::new(addr, 8080)).expect("bind");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Answer the first request, then read to the end.
        let mut first = Vec::new();
        let mut buf = [0u8; 4096];
        while !first.windows(4).any(|w| w == b"\r\n\r\n") || first.len() < req1_len {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "client closed early");
            first.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let _ = s.read_to_end(&mut first);
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("listening");
    let b1 = body1.clone();
    pair.client.run(move || {
        let mut s = TcpStream::connect((addr, 8080)).expect("connect");
        s.set_nodelay(true).unwrap();
        // Head and body in separate segments, as many clients send them.
        s.write_all(ping_head("Cmd=Ping&User=u&DeviceId=KT1&DeviceType=T", b1.len()).as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(&b1).unwrap();
        let mut answer = [0u8; 64];
        let _ = s.read(&mut answer).unwrap();
        let body2 = ping_body("900");
        let mut req2 = ping_head(&encode_base64_query(18, "KT2", "T"), body2.len()).into_bytes();
        req2.extend_from_slice(&body2);
        s.write_all(&req2).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    srv.join().unwrap();
    let mut reader = Reader::new();
    let mut heartbeats = Vec::new();
    wait_for(Duration::from_secs(10), || {
        m.drain_records(|r| {
            if let Record::Sample(s) = r {
                for o in reader.sample(&s.key, s.ts_ns, s.seq, s.payload_len, &s.data) {
                    if let Outcome::Ping(p) = o {
                        heartbeats.push((p.device_id, p.base64_query, p.heartbeat));
                    }
                }
            }
        });
        (heartbeats.len() >= 2).then_some(())
    });
    assert_eq!(
        heartbeats,
        [
            (Some("KT1".into()), false, Heartbeat::Stated(480)),
            (Some("KT2".into()), true, Heartbeat::Stated(900)),
        ]
    );
    let c = m.counters().unwrap();
    assert_eq!(c.get(Counter::SamplesSent), 3, "head, body, second request");
    assert_eq!(c.get(Counter::SamplesDropped), 0);
}
