//! A guest that never changes the host: our TC programs share their hooks
//! with other programs, and every packet they see goes on to the programs
//! after them (TC_ACT_UNSPEC, which is TCX_NEXT), in both directions, under
//! TCX, on clsact, and from TCX on to the clsact filters behind it.
//!
//! The other program is `chain_probe_tc`, a fixture in monitor-ebpf the
//! agent never loads: it counts the packets to and from the tracked port it
//! sees and passes them on. One probe runs before ours (the reference: what
//! entered the chain), one after ours (what left it).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use aya::{
    maps::PerCpuArray,
    programs::{
        tc::{self, NlOptions, TcAttachOptions, TcAttachType},
        LinkOrder, SchedClassifier, TestRun, TestRunOptions,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use monitor::{
    config::IngressHook,
    loader::{self, KernelFeatures},
    AgentConfig, Monitor,
};
use monitor_common::{craft::Tcp, Counter, TCP_ACK, TCP_SYN};
use monitor_tests::*;

/// TC_ACT_UNSPEC (-1), TCX_NEXT, as BPF_PROG_TEST_RUN returns it.
const TC_ACT_UNSPEC: u32 = u32::MAX;
const PROBE: &str = "chain_probe_tc";
const PORT: u16 = 443;

/// A probe from a load of the object of its own, so its counts are its own.
struct Probe {
    ebpf: Ebpf,
}

/// What a probe counted: packets to the tracked port, from it, and all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    to_port: u64,
    from_port: u64,
    all: u64,
}

impl Probe {
    fn load() -> Probe {
        require_root();
        // The agent's maps come with the object: keep them small.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS", 1)
            .map_max_entries("HALF_OPEN", 1)
            .load(monitor::EBPF_OBJECT)
            .expect("loading the object for a probe");
        prog(&mut ebpf, PROBE).load().expect("loading the probe");
        Probe { ebpf }
    }

    fn program(&mut self) -> &mut SchedClassifier {
        prog(&mut self.ebpf, PROBE)
    }

    fn attach(&mut self, iface: &str, hook: TcAttachType, at: ProbeAt) {
        let options = match at {
            ProbeAt::TcxFirst => TcAttachOptions::TcxOrder(LinkOrder::first()),
            ProbeAt::TcxLast => TcAttachOptions::TcxOrder(LinkOrder::last()),
            ProbeAt::Clsact(priority) => TcAttachOptions::Netlink(NlOptions {
                priority,
                ..NlOptions::default()
            }),
        };
        self.program()
            .attach_with_options(iface, hook, options)
            .unwrap_or_else(|e| panic!("attaching the probe {at:?} on {iface} {hook:?}: {e}"));
    }

    fn id(&mut self) -> u32 {
        self.program().info().expect("probe info").id()
    }

    fn seen(&self) -> Seen {
        let map = PerCpuArray::try_from(self.ebpf.map("CHAIN_PROBE").expect("CHAIN_PROBE map"))
            .expect("CHAIN_PROBE is a per-CPU array");
        let slot = |i| -> u64 { map.get(&i, 0).expect("probe slot").iter().sum() };
        Seen {
            to_port: slot(0),
            from_port: slot(1),
            all: slot(2),
        }
    }
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .unwrap_or_else(|| panic!("{name} in the object"))
        .try_into()
        .unwrap_or_else(|e| panic!("{name} is a classifier: {e}"))
}

// ------------------------------------------------- BPF_PROG_TEST_RUN

/// One program run on `frame`: its verdict and the frame it hands on.
fn test_run(p: &mut SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The kernel's rule for a chain of TC programs (tcx_run; cls_bpf in
/// direct-action mode): run them in order while each answers
/// TC_ACT_UNSPEC, each on the frame the one before handed on. Returns our
/// program's verdict and output.
fn run_chain(
    before: &mut Probe,
    ours: &mut SchedClassifier,
    after: &mut Probe,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    let (verdict, frame) = test_run(before.program(), frame);
    assert_eq!(verdict, TC_ACT_UNSPEC, "the probe passes everything on");
    let (verdict, frame) = test_run(ours, &frame);
    if verdict == TC_ACT_UNSPEC {
        test_run(after.program(), &frame);
    }
    (verdict, frame)
}

/// Frames as a hook sees them: to the server's port 443 (ingress) or from
/// it (egress), plus some the probe does not count.
fn frames(to_server: bool) -> Vec<(&'static str, Vec<u8>)> {
    let orient = |mut t: Tcp| {
        if !to_server {
            std::mem::swap(&mut t.src, &mut t.dst);
            std::mem::swap(&mut t.sport, &mut t.dport);
        }
        t
    };
    let v4 = || Tcp::syn(ip(CLIENT_V4), ip(SERVER_V4));
    let mut other_port = v4();
    other_port.dport = 8080;
    let mut udp = orient(v4()).frame();
    udp[14 + 9] = 17;
    vec![
        ("syn", orient(v4()).frame()),
        ("syn-ack", orient(v4().flags(TCP_SYN | TCP_ACK)).frame()),
        ("data", orient(v4().payload(300)).frame()),
        (
            "ipv6",
            orient(Tcp::syn(ip(CLIENT_V6), ip(SERVER_V6))).frame(),
        ),
        ("port 8080", orient(other_port).frame()),
        ("udp", udp),
        // Cut inside the TCP header: ours counts a parse failure.
        ("truncated", orient(v4()).frame()[..14 + 20 + 10].to_vec()),
    ]
}

#[test]
fn under_test_run_the_program_after_ours_sees_every_frame_unchanged() {
    require_root();
    let cfg = AgentConfig {
        interfaces: vec!["unused".into()],
        ingress: IngressHook::Tc,
        ..AgentConfig::default()
    };
    let mut ours = loader::load(&cfg).expect("loading our programs");
    let (mut before, mut after) = (Probe::load(), Probe::load());
    for (name, to_server) in [
        (loader::TC_PROGRAM, false),
        (loader::TC_INGRESS_PROGRAM, true),
    ] {
        for (frame_name, frame) in frames(to_server) {
            let (verdict, out) = run_chain(&mut before, prog(&mut ours, name), &mut after, &frame);
            assert_eq!(
                verdict, TC_ACT_UNSPEC,
                "{name}, {frame_name}: TC_ACT_UNSPEC (TCX_NEXT)"
            );
            assert_eq!(out, frame, "{name}, {frame_name}: handed on unchanged");
        }
    }
    let (b, a) = (before.seen(), after.seen());
    assert_eq!(a, b, "what entered the chain left it");
    // syn, syn-ack, data, ipv6 each way.
    assert_eq!((b.to_port, b.from_port, b.all), (4, 4, 14));
}

// ------------------------------------------------------- real traffic

#[derive(Clone, Copy, Debug)]
enum ProbeAt {
    TcxFirst,
    TcxLast,
    /// A clsact filter at this priority (lower runs first; every clsact
    /// filter runs after every TCX program).
    Clsact(u16),
}

/// How one test puts ours and the two probes on the server's hooks.
struct Chain {
    /// The agent's TC attachment: TCX, or clsact as on a kernel before 6.6.
    ours_on_tcx: bool,
    first: ProbeAt,
    last: ProbeAt,
}

/// Attached programs, dropped inside the namespace they were attached in:
/// aya detaches a clsact filter by interface index, which means another
/// interface in any other namespace.
struct InNetns<T: Send + 'static> {
    ns: String,
    value: Option<T>,
}

impl<T: Send + 'static> Drop for InNetns<T> {
    fn drop(&mut self) {
        let (path, value) = (format!("/run/netns/{}", self.ns), self.value.take());
        let _ = std::thread::spawn(move || {
            enter(&path);
            drop(value)
        })
        .join();
    }
}

type Attached = (Monitor, Probe, Probe);

fn attach_chain(pair: &Pair, chain: &Chain) -> InNetns<Attached> {
    let iface = pair.server_if.clone();
    let (ours_on_tcx, first, last) = (chain.ours_on_tcx, chain.first, chain.last);
    let attached = pair.server.run(move || {
        let cfg = AgentConfig {
            interfaces: vec![iface.clone()],
            ingress: IngressHook::Tc,
            ..AgentConfig::default()
        };
        // 6.1: the agent's own clsact path (qdisc, filters at the
        // priority the kernel picks), on this TCX kernel.
        let kernel = match ours_on_tcx {
            true => KernelFeatures::current().expect("kernel version"),
            false => KernelFeatures::of(KernelVersion::new(6, 1, 0)),
        };
        let m = Monitor::start_for(&cfg, &kernel).expect("monitor start");
        let want = if ours_on_tcx { "tcx" } else { "clsact" };
        assert_eq!(m.attachments()[0].tc_mode, want);
        if matches!(last, ProbeAt::Clsact(_)) && ours_on_tcx {
            tc::qdisc_add_clsact(&iface).expect("adding a clsact qdisc for the probe");
        }
        let (mut p1, mut p2) = (Probe::load(), Probe::load());
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            p1.attach(&iface, hook, first);
            p2.attach(&iface, hook, last);
        }
        (m, p1, p2)
    });
    InNetns {
        ns: pair.server.name.clone(),
        value: Some(attached),
    }
}

/// Under TCX: the hook's programs are [first probe, ours, last probe].
fn assert_tcx_order(pair: &Pair, attached: &mut Attached) {
    let (first, last) = (attached.1.id(), attached.2.id());
    let iface = pair.server_if.clone();
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        let iface = iface.clone();
        let ids: Vec<u32> = pair.server.run(move || {
            let (_, progs) = SchedClassifier::query_tcx(&iface, hook).expect("query_tcx");
            progs.iter().map(|p| p.id()).collect()
        });
        assert_eq!(ids.len(), 3, "{hook:?}: {ids:?}");
        assert_eq!(
            (ids[0], ids[2]),
            (first, last),
            "{hook:?}: probes around ours"
        );
    }
}

const ROUNDS: usize = 10;
const MESSAGE: usize = 1000;

/// A bounded echo exchange on the tracked port: ROUNDS messages of MESSAGE
/// bytes each way, then both sides close.
fn echo_exchange(pair: &Pair) {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = pair.server.spawn(move || {
        let l = TcpListener::bind((ip(SERVER_V4), PORT)).expect("bind");
        tx.send(()).expect("test thread waiting");
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; MESSAGE];
        for _ in 0..ROUNDS {
            s.read_exact(&mut buf).expect("server read");
            s.write_all(&buf).expect("server write");
        }
        // Wait for the client's FIN before closing.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read to EOF");
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("listening");
    pair.client.run(|| {
        let mut s = TcpStream::connect((ip(SERVER_V4), PORT)).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; MESSAGE];
        for round in 0..ROUNDS {
            let sent = [round as u8; MESSAGE];
            s.write_all(&sent).expect("client write");
            s.read_exact(&mut buf).expect("client read");
            assert_eq!(buf, sent, "echo of round {round}");
        }
    });
    srv.join().expect("server thread");
}

/// Real TCP through the chain: the last probe sees every packet of the
/// tracked port the first one saw, both directions, and ours saw them all.
fn every_packet_reaches_the_program_after_ours(chain: Chain) {
    let pair = Pair::new();
    let mut attached = attach_chain(&pair, &chain);
    let all = attached.value.as_mut().expect("attached");
    if chain.ours_on_tcx && matches!(chain.last, ProbeAt::TcxLast) {
        assert_tcx_order(&pair, all);
    }
    echo_exchange(&pair);
    // The last ACKs may still be in flight: wait until the counts settle.
    let settled = || {
        let (m, first, last) = &*all;
        let tracked = m.counters().expect("counters").get(Counter::PacketsTracked);
        (first.seen(), last.seen(), tracked)
    };
    let mut state = settled();
    wait_for(Duration::from_secs(3), || {
        let now = settled();
        let same = now == state && now.0.to_port + now.0.from_port == now.2 && now.0 == now.1;
        state = now;
        same.then_some(())
    });
    let (first, last, ours) = state;
    println!(
        "{:?} / {:?}: first {first:?}, last {last:?}, ours {ours}",
        chain.first, chain.last
    );
    // Each message is at least a segment each way.
    assert!(
        first.to_port > ROUNDS as u64 && first.from_port > ROUNDS as u64,
        "{first:?}"
    );
    assert_eq!(
        (last.to_port, last.from_port),
        (first.to_port, first.from_port),
        "the program after ours missed packets (ingress, egress)"
    );
    assert_eq!(
        ours,
        first.to_port + first.from_port,
        "ours saw every packet"
    );
}

#[test]
fn under_tcx_programs_before_and_after_ours_see_every_packet_both_ways() {
    every_packet_reaches_the_program_after_ours(Chain {
        ours_on_tcx: true,
        first: ProbeAt::TcxFirst,
        last: ProbeAt::TcxLast,
    });
}

#[test]
fn on_clsact_filters_before_and_after_ours_see_every_packet_both_ways() {
    // Ours on an empty hook gets priority 49152: 1 runs before it, 50000 after.
    every_packet_reaches_the_program_after_ours(Chain {
        ours_on_tcx: false,
        first: ProbeAt::Clsact(1),
        last: ProbeAt::Clsact(50000),
    });
}

#[test]
fn under_tcx_the_clsact_filters_behind_ours_see_every_packet_both_ways() {
    // TCX_PASS would skip the whole clsact stage, whatever its priorities.
    every_packet_reaches_the_program_after_ours(Chain {
        ours_on_tcx: true,
        first: ProbeAt::TcxFirst,
        last: ProbeAt::Clsact(1),
    });
}
