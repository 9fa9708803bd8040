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
    let mut agent = toml::Table::new();
    agent.insert("gap_threshold_seconds".into(), 1.into());
    let mut detector = toml::Table::new();
    detector.insert("min_heartbeat".into(), 1.into());
    detector.insert("max_heartbeat".into(), 60.into());
    Agent::start_in(
        &agent_bin(),
        &pair.server,
        AgentOptions {
            iface: pair.server_if.clone(),
            agent,
            detector,
            workdir: std::env::temp_dir().join(format!("agent-test-{}", pair.server.name)),
        },
    )
    .expect("agent starts")
}

fn json(agent: &Agent, args: &[&str]) -> Value {
    let out = agent
        .cli(args)
        .unwrap_or_else(|e| panic!("monitor {args:?}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("monitor {args:?}: {e}: {out}"))
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
    // XDP, TC egress, and TC ingress (loaded, attached only with ingress = "tc").
    assert_eq!(status["programs"].as_array().unwrap().len(), 3);
    assert_eq!(status["kernel_counters"]["half_open_created"], 2);
    assert_eq!(status["half_open_capacity"], 65536);

    let flows = json(&agent, &["flows", "--json"]);
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

    drop(idle);
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
