//! The agent binary as an operator runs it: CLI answers compared field by
//! field with the traffic the test made, and /metrics cardinality bounded
//! while 10,000 client addresses connect.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::Duration,
};

use monitor_tests::agent_bin;
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use xtask::{
    lab::{Agent, AgentOptions},
    netns::{ip, sh, Pair, CLIENT_V4, SERVER_V4},
};

fn start_agent(pair: &Pair) -> Agent {
    let workdir = std::env::temp_dir().join(format!("agent-test-{}", pair.server.name));
    let mut o = AgentOptions::new(&pair.server_if, workdir);
    o.config.agent.gap_threshold = Duration::from_secs(1);
    o.config.detector.min_heartbeat = Duration::from_secs(1);
    o.config.detector.max_heartbeat = Duration::from_secs(60);
    Agent::start_in(&agent_bin(), &pair.server, o).expect("agent starts")
}

fn json(agent: &Agent, args: &[&str]) -> Value {
    let out = agent
        .cli(args)
        .unwrap_or_else(|e| panic!("monitor {args:?}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("monitor {args:?}: {e}: {out}"))
}

/// `monitor ARGS | head -1` under `pipefail`: its status is the agent CLI's.
fn piped(agent: &Agent, args: &str) -> std::process::Child {
    let script = format!(
        "set -o pipefail; {} --socket {} {args} | head -1 >/dev/null",
        agent.bin.display(),
        agent.socket.display()
    );
    std::process::Command::new("bash")
        .args(["-c", &script])
        .spawn()
        .expect("bash")
}

fn wait_child(mut c: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().expect("wait") {
            return st;
        }
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn without_an_agent_the_cli_says_so_in_one_line_and_no_backtrace() {
    let out = std::process::Command::new(agent_bin())
        .args(["--socket", "/nonexistent/monitor.sock", "flows"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("monitor runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("monitor: no agent is running"), "{err}");
}

fn approx(v: &Value, want: f64, tol: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() <= tol)
}

/// A server that never answers: it accepts `n` connections, reads what
/// they send, and lets each go only after the client closed it (so the
/// client side always closes first, with the server owing an answer).
/// Returns the bytes read in total.
fn silent_server(pair: &Pair, n: usize) -> std::thread::JoinHandle<usize> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = pair.server.spawn(move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 443)).expect("bind 443");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let (mut accepted, mut total) = (0, 0);
        let mut held: Vec<TcpStream> = Vec::new();
        let mut buf = [0u8; 512];
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while (accepted < n || !held.is_empty()) && std::time::Instant::now() < deadline {
            while let Ok((s, _)) = l.accept() {
                s.set_nonblocking(true).unwrap();
                held.push(s);
                accepted += 1;
            }
            held.retain_mut(|s| loop {
                match s.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(k) => total += k,
                    Err(_) => return true,
                }
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        total
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    h
}

#[test]
fn cli_answers_match_the_traffic_field_by_field() {
    let pair = Pair::new();
    let agent = start_agent(&pair);
    let srv = silent_server(&pair, 2);
    let (killed, idle) = pair.client.run(|| {
        // Flow 1: a request the server never answers; after 2 s of silence
        // the client side gives up (FIN) -- what a proxy's idle timeout does.
        let mut a = TcpStream::connect((ip(SERVER_V4), 443)).unwrap();
        a.write_all(&[b'p'; 300]).unwrap();
        // Flow 2: stays open and idle.
        let mut b = TcpStream::connect((ip(SERVER_V4), 443)).unwrap();
        b.write_all(&[b'q'; 100]).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let killed = a.local_addr().unwrap();
        drop(a);
        std::thread::sleep(Duration::from_millis(1500));
        (killed, b)
    });
    let idle_addr = idle.local_addr().unwrap();

    let status = json(&agent, &["status", "--json"]);
    assert_eq!(status["ports"], serde_json::json!([443, 8080]));
    assert_eq!(status["plaintext_ports"], serde_json::json!([8080]));
    assert_eq!(
        status["attachments"][0]["interface"],
        pair.server_if.as_str()
    );
    assert_eq!(status["attachments"][0]["tc_mode"], "tcx");
    assert!(["native", "skb"].contains(&status["attachments"][0]["xdp_mode"].as_str().unwrap()));
    assert_eq!(status["kernel_counters"]["flows_created"], 2);
    assert_eq!(status["events_dropped"], 0);
    // Only the hooks in use are loaded: XDP ingress and TC egress.
    let programs: Vec<&str> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(programs, ["monitor_tc", "monitor_xdp"]);
    assert_eq!(status["kernel_counters"]["half_open_created"], 2);
    assert_eq!(status["half_open_capacity"], 65536);

    let flows = json(&agent, &["flows", "--json", "--fresh"]);
    let row = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == idle_addr.to_string().as_str())
        .unwrap_or_else(|| panic!("idle flow listed: {flows:#}"));
    assert_eq!(row["server"], format!("{SERVER_V4}:443").as_str());
    assert_eq!(row["path"], "192.0.2.0/24:443");
    assert_eq!(row["state"], "open");
    assert!(row["silence_seconds"].as_f64().unwrap() >= 1.4, "{row:#}");
    // SYN, ACK, 100-byte segment at least; IP bytes include 100 of payload.
    assert!(row["packets_in"].as_u64().unwrap() >= 3, "{row:#}");
    assert!(row["bytes_in"].as_u64().unwrap() >= 100 + 3 * 40, "{row:#}");
    let only_silent = json(&agent, &["flows", "--json", "--min-silence", "1000"]);
    assert_eq!(only_silent.as_array().unwrap().len(), 0);

    let report = json(&agent, &["report", "--json"]);
    let p = &report["killing_paths"][0];
    assert_eq!(p["path"], "192.0.2.0/24:443", "{report:#}");
    assert_eq!(p["how"], "proxy_timeout");
    assert_eq!(p["premature_kills"], 1);
    assert_eq!(p["estimate"]["kind"], "point");
    assert!(approx(&p["estimate"]["seconds"], 2.0, 0.1), "{p:#}");

    let events = agent.cli(&["events", "--json"]).unwrap();
    let verdicts: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(verdicts.len(), 1, "{events}");
    let v = &verdicts[0];
    assert_eq!(v["client"], killed.to_string().as_str());
    assert_eq!(v["ending"], "proxy_timeout");
    assert_eq!(v["premature"], true);
    assert_eq!(v["evidence"]["server_owed_answer"], true);
    assert!(approx(&v["evidence"]["silence_seconds"], 2.0, 0.1), "{v:#}");

    // A closed pipe ends `events --follow` quietly, with success, at the
    // next verdict (the idle flow's close).
    let follow = piped(&agent, "events --follow");
    std::thread::sleep(Duration::from_millis(500));
    drop(idle);
    let st = wait_child(follow, Duration::from_secs(15));
    assert!(st.success(), "events --follow | head -1: {st:?}");
    assert_eq!(srv.join().unwrap(), 400);
    let log = agent.stop().expect("clean stop");
    assert!(!log.contains("panicked"), "{log}");
    // SIGINT detached everything the agent added.
    let iface = pair.server_if.clone();
    let (xdp, tcx) = pair.server.run(move || {
        let link = std::process::Command::new("ip")
            .args(["-d", "link", "show", "dev", &iface])
            .output()
            .unwrap();
        let tcx = aya::programs::SchedClassifier::query_tcx(
            &iface,
            aya::programs::tc::TcAttachType::Egress,
        )
        .map(|(_, p)| p.len())
        .unwrap_or(0);
        (
            String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
            tcx,
        )
    });
    assert_eq!((xdp, tcx), (false, 0), "nothing left attached after SIGINT");
}

#[test]
fn metrics_series_stay_bounded_while_10000_client_addresses_connect() {
    const CLIENTS: usize = 10_000;
    let pair = Pair::new();
    // 10,000 client addresses over 40 /24 prefixes (40 paths, twice top_paths).
    let addrs: Vec<Ipv4Addr> = (0..CLIENTS)
        .map(|i| Ipv4Addr::new(100, 64, (i / 250) as u8, (i % 250 + 1) as u8))
        .collect();
    let batch = std::env::temp_dir().join(format!("addrs-{}", pair.client.name));
    let lines: String = addrs
        .iter()
        .map(|a| format!("addr add {a}/32 dev {}\n", pair.client_if))
        .collect();
    std::fs::write(&batch, lines).unwrap();
    sh(&[
        "ip",
        "-n",
        &pair.client.name,
        "-batch",
        batch.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&batch);
    sh(&[
        "ip",
        "-n",
        &pair.server.name,
        "route",
        "add",
        "100.64.0.0/16",
        "via",
        CLIENT_V4,
    ]);
    let agent = start_agent(&pair);
    let srv = silent_server(&pair, CLIENTS);
    pair.client.run(move || {
        let server: SocketAddr = (ip(SERVER_V4), 443).into();
        // In waves of 1,000 (file descriptors are limited): each client asks,
        // hears nothing for 1.5 s, and gives up -- a premature kill.
        for wave in addrs.chunks(1000) {
            let mut held = Vec::with_capacity(wave.len());
            for a in wave {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
                s.bind(&SocketAddr::new(IpAddr::V4(*a), 0).into()).unwrap();
                s.connect_timeout(&server.into(), Duration::from_secs(5))
                    .unwrap();
                let mut t: TcpStream = s.into();
                t.write_all(b"ping").unwrap();
                held.push(t);
            }
            std::thread::sleep(Duration::from_millis(1500));
            drop(held);
        }
    });
    assert_eq!(srv.join().unwrap(), CLIENTS * 4);
    // Let the agent take in 20,000 events.
    let mut ended = 0;
    for _ in 0..100 {
        let status = json(&agent, &["status", "--json"]);
        let report = json(&agent, &["report", "--json"]);
        ended = report["premature_kills"].as_u64().unwrap_or(0);
        if ended >= CLIENTS as u64 || status["events_dropped"] != 0 {
            assert_eq!(status["events_dropped"], 0, "no events lost");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ended, CLIENTS as u64);
    let metrics = agent.scrape().expect("scrape");
    let series = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let bound = monitor::metrics::Metrics::max_series(20, false);
    assert!(series <= bound, "{series} series, bound {bound}");
    let path_labels: std::collections::HashSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("activesync_monitor_path_premature_kills_total{"))
        .collect();
    assert_eq!(
        path_labels.len(),
        21,
        "20 top paths + other: {path_labels:#?}"
    );
    assert!(metrics.contains("path=\"other\""));
    assert!(
        !metrics.contains("100.64.3.7\""),
        "no client addresses by default"
    );
    println!("{CLIENTS} clients on 40 paths: {series} series (bound {bound})");
    agent.stop().expect("clean stop");
}

#[test]
fn a_syn_flood_of_a_million_sources_leaves_established_flows_measured_and_memory_flat() {
    use monitor_tests::bench::frames::{flow_frame, sender_in};
    let pair = Pair::new();
    let agent = start_agent(&pair);
    // Ten long-lived connections, established before the flood.
    let (tx, rx) = mpsc::channel();
    let server = pair.server.spawn(move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 443)).expect("bind 443");
        tx.send(()).unwrap();
        let mut held = Vec::new();
        for _ in 0..10 {
            let (s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            held.push(s);
        }
        // Read until each client closes.
        held.into_iter()
            .map(|mut s| {
                let mut b = Vec::new();
                let _ = s.read_to_end(&mut b);
                b.len()
            })
            .sum::<usize>()
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let clients = pair.client.run(|| {
        (0..10)
            .map(|_| TcpStream::connect((ip(SERVER_V4), 443)).expect("connect"))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = xtask::soak::rss_bytes(agent.pid());
    // 1,048,576 spoofed sources, each one SYN never acknowledged.
    let flood = 1u32 << 20;
    let tx = sender_in(&pair.client, &pair.client_if);
    let server_ip: IpAddr = SERVER_V4.parse().unwrap();
    for i in 0..flood {
        tx.send(&flow_frame(i, server_ip, 443, monitor_common::TCP_SYN))
            .expect("send");
    }
    // After a silence, every long-lived flow speaks and closes: the agent
    // must still measure each one.
    std::thread::sleep(Duration::from_secs(2));
    let locals: Vec<SocketAddr> = pair.client.run(move || {
        clients
            .into_iter()
            .map(|mut c| {
                c.write_all(b"still here").unwrap();
                c.local_addr().unwrap()
            })
            .collect()
    });
    assert_eq!(server.join().unwrap(), 100);
    // A sweep (every 15 s) counts the tables.
    let status = xtask::netns::wait_for(Duration::from_secs(40), || {
        let s = json(&agent, &["status", "--json"]);
        (s["half_open_entries"].as_u64().unwrap_or(0) > 0).then_some(s)
    })
    .expect("a sweep counted the half-open table");
    let events: Vec<Value> = agent
        .cli(&["events", "--json"])
        .expect("monitor events")
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event line"))
        .collect();
    let report = json(&agent, &["report", "--json"]);
    let rss_after = xtask::soak::rss_bytes(agent.pid());
    let _ = agent.stop();
    let verdicts: Vec<&Value> = events
        .iter()
        .filter(|v| {
            locals
                .iter()
                .any(|l| v["client"].as_str() == Some(&l.to_string()))
        })
        .collect();
    assert_eq!(
        verdicts.len(),
        10,
        "every long-lived flow still measured: {events:#?}"
    );
    for v in &verdicts {
        assert_eq!(v["ending"], "client_fin", "{v:#}");
        // Followed from its handshake, before the flood, to its end.
        assert!(v["flow_age_seconds"].as_f64().unwrap() >= 2.0, "{v:#}");
    }
    // The 2 s silence after the flood was measured on their path.
    let quiet = &report["quiet_paths"][0];
    assert!(
        quiet["longest_survived_seconds"].as_f64().unwrap() >= 1.9,
        "{report:#}"
    );
    let c = &status["kernel_counters"];
    assert_eq!(c["flows_created"], 10, "the flood established nothing");
    assert_eq!(
        c["half_open_created"].as_u64().unwrap(),
        u64::from(flood) + 10
    );
    let half = status["half_open_entries"].as_u64().unwrap();
    assert!(
        half <= 65_536 + 1024,
        "the flood stays in its table: {half}"
    );
    let evicted = status["half_open_evictions"].as_u64().unwrap();
    assert!(evicted >= u64::from(flood) - 65_536 - 1024, "{status:#}");
    assert_eq!(status["events_dropped"], 0);
    let grew = rss_after.saturating_sub(rss_before);
    assert!(
        grew < 8 << 20,
        "agent memory grew {grew} bytes under the flood"
    );
    println!(
        "SYN flood of {flood} spoofed sources: 10 of 10 established flows measured after it; \
         half-open table {half} entries, {evicted} evicted; agent RSS {:.1} -> {:.1} MiB; 0 events dropped",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
}

/// `curl` inside the agent's namespace; (HTTP status, body).
fn curl(ns: &str, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

#[test]
fn metrics_over_tls_with_basic_auth_from_a_prometheus_web_config() {
    let pair = Pair::new();
    let dir = std::env::temp_dir().join(format!("webcfg-{}", pair.server.name));
    std::fs::create_dir_all(&dir).unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let hash = bcrypt::hash("scrape-me", 6).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    let mut o = AgentOptions::new(&pair.server_if, dir.join("agent"));
    o.config.metrics.web_config_file = Some(web.clone());
    let agent = Agent::start_in(&agent_bin(), &pair.server, o).expect("agent starts");
    let url = format!("https://{}/metrics", agent.metrics);
    let ca = dir.join("tls.crt").display().to_string();
    let ns = agent.ns.clone();
    let ok = curl(&ns, &["--cacert", &ca, "-u", "prometheus:scrape-me", &url]);
    let wrong = curl(&ns, &["--cacert", &ca, "-u", "prometheus:guess", &url]);
    let anonymous = curl(&ns, &["--cacert", &ca, &url]);
    let plain = curl(&ns, &[&format!("http://{}/metrics", agent.metrics)]);
    let _ = agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(ok.0, "200", "{ok:?}");
    assert!(ok.1.contains("activesync_monitor_build_info"), "{ok:?}");
    assert_eq!(wrong.0, "401");
    assert_eq!(anonymous.0, "401");
    assert!(
        !anonymous.1.contains("activesync_monitor"),
        "nothing leaks without auth"
    );
    assert_ne!(
        plain.0, "200",
        "no plain HTTP when TLS is configured: {plain:?}"
    );
}

/// A bpffs mounted at a directory; unmounted and removed on drop.
struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn mount(dir: &str) -> BpfFs {
        std::fs::create_dir_all(dir).unwrap();
        sh(&["mount", "-t", "bpf", "bpf", dir]);
        BpfFs(dir.into())
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Programs attached to `iface` in namespace `ns`: XDP (from `ip link`) and
/// TCX egress/ingress (from `tc filter`... TCX links show in `ip link` too).
fn attached_programs(ns: &str, iface: &str) -> (usize, usize) {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", iface])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let xdp = text.matches("prog/xdp").count();
    let path = format!("/run/netns/{ns}");
    let iface = iface.to_string();
    let tcx = std::thread::spawn(move || {
        xtask::netns::enter(&path);
        [
            aya::programs::tc::TcAttachType::Egress,
            aya::programs::tc::TcAttachType::Ingress,
        ]
        .into_iter()
        .map(|t| {
            aya::programs::SchedClassifier::query_tcx(&iface, t)
                .map(|(_, progs)| progs.len())
                .unwrap_or(0)
        })
        .sum::<usize>()
    })
    .join()
    .unwrap();
    (xdp, tcx)
}

#[test]
fn a_kill_9_restart_keeps_the_flow_table_and_counters_and_measures_a_silence_across_it() {
    let pair = Pair::new();
    // `ip netns exec` mounts a fresh /sys, hiding /sys/fs/bpf: a bpffs of
    // the test's own, outside /sys, unmounted on every exit path.
    let bpffs = BpfFs::mount(&format!("/run/mt-bpffs-{}", pair.server.name));
    let pins = bpffs.0.join("activesync-monitor");
    let opts = |dir: &str| {
        let workdir = std::env::temp_dir().join(format!("restart-{}-{dir}", pair.server.name));
        let mut o = AgentOptions::new(&pair.server_if, workdir);
        o.config.agent.gap_threshold = Duration::from_secs(1);
        o.config.agent.pin_path = Some(pins.clone());
        o
    };
    let first = Agent::start_in(&agent_bin(), &pair.server, opts("a")).expect("agent starts");
    let (tx, rx) = mpsc::channel();
    let server = pair.server.spawn(move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 443)).expect("bind 443");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
        b.len()
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let client = pair.client.run(|| {
        let mut c = TcpStream::connect((ip(SERVER_V4), 443)).expect("connect");
        c.write_all(b"before").unwrap();
        (c, std::time::Instant::now())
    });
    let (client, spoke) = client;
    std::thread::sleep(Duration::from_millis(300));
    let before = json(&first, &["status", "--json"]);
    let seen_before = before["kernel_counters"]["packets_tracked"]
        .as_u64()
        .unwrap();
    assert_eq!(before["kernel_counters"]["flows_created"], 1);
    // kill -9: no cleanup. The programs stay attached through their pinned links.
    first.kill9();
    assert_eq!(
        attached_programs(&pair.server.name, &pair.server_if),
        (1, 1)
    );
    assert!(pins.join("FLOWS").exists());
    // The flow stays silent across the restart (3 s), then speaks and closes.
    std::thread::sleep(Duration::from_secs(1));
    let second = Agent::start_in(&agent_bin(), &pair.server, opts("b")).expect("agent restarts");
    // Re-attached into the same links: still one program per hook.
    assert_eq!(
        attached_programs(&pair.server.name, &pair.server_if),
        (1, 1)
    );
    std::thread::sleep(Duration::from_secs(2));
    let (local, silent) = pair.client.run(move || {
        let mut c = client;
        c.write_all(b"after").unwrap();
        (c.local_addr().unwrap(), spoke.elapsed().as_secs_f64())
        // dropped: FIN
    });
    assert_eq!(server.join().unwrap(), 11);
    let verdict = xtask::netns::wait_for(Duration::from_secs(10), || {
        let out = second.cli(&["events", "--json"]).ok()?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["client"] == local.to_string())
    })
    .expect("the flow's ending, seen by the restarted agent");
    let after = json(&second, &["status", "--json"]);
    let report = json(&second, &["report", "--json"]);
    let stopped = second.stop();
    assert!(stopped.is_ok(), "{stopped:?}");
    // Still attached and pinned after a clean stop, until uninstalled.
    assert_eq!(
        attached_programs(&pair.server.name, &pair.server_if),
        (1, 1)
    );
    let un = std::process::Command::new(agent_bin())
        .args(["uninstall", "--pin-path"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        un.status.success(),
        "{}",
        String::from_utf8_lossy(&un.stderr)
    );
    assert!(!pins.exists());
    assert_eq!(
        attached_programs(&pair.server.name, &pair.server_if),
        (0, 0)
    );

    // Counters kept, not restarted from zero; the flow kept its history.
    let seen_after = after["kernel_counters"]["packets_tracked"]
        .as_u64()
        .unwrap();
    assert!(seen_after > seen_before, "{seen_before} -> {seen_after}");
    assert_eq!(
        after["kernel_counters"]["flows_created"], 1,
        "the same flow, not a new one"
    );
    assert_eq!(verdict["ending"], "client_fin", "{verdict:#}");
    assert!(
        verdict["flow_age_seconds"].as_f64().unwrap() >= 3.0,
        "{verdict:#}"
    );
    // The 3 s silence spanning the restart was measured.
    let survived = report["quiet_paths"][0]["longest_survived_seconds"]
        .as_f64()
        .unwrap();
    assert!(
        (survived - silent).abs() < 0.1,
        "silence across the restart: measured {survived} s, made {silent} s"
    );
    println!(
        "kill -9 restart: packets_tracked {seen_before} -> {seen_after}, 1 flow kept, \
         a {survived:.2} s silence across the restart measured; one program per hook"
    );
}

#[test]
fn detach_on_exit_removes_every_pin_and_attachment() {
    let pair = Pair::new();
    let bpffs = BpfFs::mount(&format!("/run/mt-bpffs-{}", pair.server.name));
    let pins = bpffs.0.join("activesync-monitor");
    let workdir = std::env::temp_dir().join(format!("detach-{}", pair.server.name));
    let mut o = AgentOptions::new(&pair.server_if, workdir);
    o.config.agent.pin_path = Some(pins.clone());
    o.config.agent.detach_on_exit = true;
    let a = Agent::start_in(&agent_bin(), &pair.server, o).expect("agent starts");
    assert_eq!(
        attached_programs(&pair.server.name, &pair.server_if),
        (1, 1)
    );
    assert!(pins
        .join("link-xdp-".to_string() + &pair.server_if)
        .exists());
    a.stop().expect("clean stop");
    assert!(!pins.exists(), "pins removed");
    assert_eq!(
        attached_programs(&pair.server.name, &pair.server_if),
        (0, 0)
    );
}

/// `monitor flows` on a full million-entry table answers from the agent's
/// snapshot: fast, and without starving the ring buffer while connections
/// keep opening and closing.
#[test]
fn a_flows_query_on_a_million_entry_table_answers_within_100_ms_and_drops_no_event() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use monitor::{
        flows::{FlowList, FlowQuery},
        query::{Client, Request},
    };
    use monitor_common::{Flow, FlowKey, FAMILY_V4};
    const ENTRIES: u32 = 1 << 20;
    let pair = Pair::new();
    let bpffs = BpfFs::mount(&format!("/run/mt-bpffs-{}", pair.server.name));
    let pins = bpffs.0.join("activesync-monitor");
    let workdir = std::env::temp_dir().join(format!("flows-1m-{}", pair.server.name));
    let mut o = AgentOptions::new(&pair.server_if, workdir);
    o.config.agent.gap_threshold = Duration::from_secs(1);
    o.config.agent.flow_table_size = ENTRIES;
    o.config.agent.pin_path = Some(pins.clone());
    o.config.agent.detach_on_exit = true;
    let agent = Agent::start_in(&agent_bin(), &pair.server, o).expect("agent starts");
    // Fill the kernel table through its pin: flows nobody sends on.
    let data = MapData::from_pin(pins.join("FLOWS")).expect("the pinned flow table");
    let mut table: BpfHashMap<MapData, FlowKey, Flow> =
        BpfHashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash map");
    let now = monitor::clock::now_ns();
    for i in 0..ENTRIES - 64 {
        let mut client_addr = [0u8; 16];
        client_addr[..4].copy_from_slice(&(0x0a00_0000u32 | (i >> 8)).to_be_bytes());
        let key = FlowKey {
            client_addr,
            server_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port: 1024 + (i & 0xff) as u16,
            server_port: 443,
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        // Silences up to 10 minutes (the machine may have booted just before).
        let ago = u64::from(i % 600) * 1_000_000_000;
        let flow = Flow {
            first_seen_ns: now.saturating_sub(ago + 1_000_000_000),
            last_in_ns: now.saturating_sub(ago),
            bytes_in: u64::from(i),
            ..Flow::default()
        };
        table
            .insert(key, flow, 0)
            .expect("insert into the pinned table");
    }
    // An LRU table may evict a little before it is full: 99% is full.
    let full = u64::from(ENTRIES) * 99 / 100;
    let mut last = Value::Null;
    let status = xtask::netns::wait_for(Duration::from_secs(60), || {
        last = json(&agent, &["status", "--json"]);
        (last["flow_table_entries"].as_u64()? >= full).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("a scan saw the full table: {last:#}"));
    assert_eq!(status["events_dropped"], 0);

    // Connections open and close all through the queries.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        pair.server.spawn(move || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 443)).expect("bind 443");
            l.set_nonblocking(true).unwrap();
            // Until told to stop and a second passes with nothing to accept
            // (bounded: a few minutes at most on a busy machine).
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            let mut idle_since = std::time::Instant::now();
            let mut n = 0usize;
            while std::time::Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let _ = s.read_to_end(&mut Vec::new());
                        n += 1;
                        idle_since = std::time::Instant::now();
                    }
                    Err(_)
                        if stop.load(std::sync::atomic::Ordering::Relaxed)
                            && idle_since.elapsed() > Duration::from_secs(1) =>
                    {
                        break
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            n
        })
    };
    let churn = {
        let stop = stop.clone();
        pair.client.spawn(move || {
            let mut made = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && made < 5000 {
                // The server thread may not listen yet: retry, bounded (1 s).
                let mut c = (0..100)
                    .find_map(|_| {
                        let c = TcpStream::connect((ip(SERVER_V4), 443));
                        if c.is_err() {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        c.ok()
                    })
                    .expect("connect to the server within 1 s");
                c.write_all(b"ping").unwrap();
                made += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            made
        })
    };
    let mut latencies = Vec::new();
    let queries = [
        FlowQuery {
            limit: 50,
            ..FlowQuery::default()
        },
        FlowQuery {
            limit: 50,
            min_silence: Some(300.0),
            ..FlowQuery::default()
        },
        FlowQuery {
            limit: 10,
            sort: monitor::flows::FlowSort::Bytes,
            ..FlowQuery::default()
        },
        FlowQuery {
            limit: 10,
            sort: monitor::flows::FlowSort::Client,
            min_silence: Some(60.0),
            ..FlowQuery::default()
        },
        // A path filter is a full pass over the snapshot (timed apart).
        FlowQuery {
            limit: 10,
            path: Some("10.0.1.0/24:443".into()),
            ..FlowQuery::default()
        },
    ];
    let mut path_latencies = Vec::new();
    for round in 0..15 {
        let q = queries[round % queries.len()].clone();
        let t = std::time::Instant::now();
        let v = Client::call(&agent.socket, &Request::Flows(q.clone())).expect("flows answered");
        match q.path {
            Some(_) => path_latencies.push(t.elapsed()),
            None => latencies.push(t.elapsed()),
        }
        let list: FlowList = serde_json::from_value(v).expect("a flow list");
        assert_eq!(
            list.rows.len(),
            q.limit,
            "{q:?}: matching {} of {}",
            list.matching,
            list.flows_in_table
        );
        assert!(list.flows_in_table >= full);
        if let Some(m) = q.min_silence {
            assert!(list.rows.iter().all(|r| r.silence_seconds >= m));
            assert!(list.matching < list.flows_in_table);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Thousands of rows into a pipe closed after the first: a quiet success.
    let head = piped(&agent, "flows --limit 5000");
    let st = wait_child(head, Duration::from_secs(30));
    assert!(st.success(), "flows | head -1: {st:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = churn.join().unwrap();
    let served = server.join().unwrap();
    assert_eq!(made, served);
    let verdicts = xtask::netns::wait_for(Duration::from_secs(20), || {
        let events = agent.cli(&["events", "--json"]).ok()?;
        let n = events.lines().filter(|l| l.contains("client_fin")).count();
        (n >= made).then_some(n)
    });
    let after = json(&agent, &["status", "--json"]);
    let _ = agent.stop();
    latencies.sort();
    path_latencies.sort();
    let worst = *latencies.last().unwrap();
    let worst_path = *path_latencies.last().unwrap();
    println!(
        "flows on a {} entry table: median {:?}, worst {:?} over {} queries; \
         with a path filter (a full pass) worst {worst_path:?} over {}; \
         {made} connections meanwhile, events dropped {}",
        after["flow_table_entries"],
        latencies[latencies.len() / 2],
        worst,
        latencies.len(),
        path_latencies.len(),
        after["events_dropped"]
    );
    assert_eq!(after["events_dropped"], 0, "{after:#}");
    assert_eq!(after["event_decode_errors"], 0);
    assert_eq!(
        verdicts,
        Some(made),
        "every connection's ending reached the agent"
    );
    assert!(worst < Duration::from_millis(100), "{latencies:?}");
    assert!(worst_path < Duration::from_secs(1), "{path_latencies:?}");
}
