//! The lab: real middleboxes between simulated devices and an ActiveSync-like
//! server, in network namespaces this code creates and removes.
//!
//! ```text
//!  clients ns (path i) ── router ns (path i: conntrack/nftables, injector, HAProxy)
//!                                  │ 192.0.2.(10+i)
//!                        switch ns (bridge) ── server ns: srv0 192.0.2.1, agent, endpoint :443
//! ```
//! Path i's clients live in 100.64.i.0/24 and 2001:db8:i::/64 and start at
//! TTL 50 (a device ~15 hops away), so a router's own packets (TTL 64) stand
//! out as they do in the wild.

pub mod device;
pub mod http;
pub mod injector;
pub mod scenario;
pub mod server;
pub mod tls;
pub mod wbxml;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{atomic::AtomicBool, atomic::Ordering, Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::netns::{sh, unique_tag, Netns};
pub use scenario::{Middlebox, Scenario};

pub const SERVER_V4: &str = "192.0.2.1";
pub const SERVER_V6: &str = "2001:db8:ffff::1";
pub const SERVER_PORT: u16 = 443;
/// The endpoint's plaintext port, as behind a TLS-terminating load balancer:
/// the agent reads its Pings for the exact heartbeat.
pub const PLAINTEXT_PORT: u16 = 8080;
/// The device's initial TTL / hop limit.
pub const DEVICE_TTL: u32 = 50;

fn client_v4(path: usize, host: usize) -> String {
    format!("100.64.{path}.{host}")
}
fn client_v6(path: usize, host: usize) -> String {
    format!("2001:db8:{path:x}::{host:x}")
}

/// Add an address (IPv6 without duplicate address detection: the lab is ready at once).
fn add_addr(ns: &str, cidr: &str, dev: &str) {
    if cidr.contains(':') {
        sh(&[
            "ip", "-n", ns, "-6", "addr", "add", cidr, "dev", dev, "nodad",
        ]);
    } else {
        sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
    }
}

fn shq(ns: &str, cmd: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .with_context(|| format!("running {cmd:?} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct PathRuntime {
    pub spec: scenario::PathSpec,
    pub index: usize,
    pub router: Netns,
    pub clients: Netns,
    /// The path as the monitor names it (client prefix and port).
    pub monitor_path: String,
}

/// Namespaces and middleboxes; removed on drop.
pub struct Topology {
    pub tag: String,
    pub switch: Netns,
    pub server: Netns,
    pub server_if: String,
    pub paths: Vec<PathRuntime>,
    children: Vec<Child>,
    workdir: PathBuf,
}

impl Topology {
    pub fn up(s: &Scenario) -> Result<Topology> {
        crate::setup::check_root()?;
        let tag = unique_tag();
        let workdir = std::env::temp_dir().join(format!("monitor-lab-{tag}"));
        std::fs::create_dir_all(&workdir)?;
        let switch = Netns::new(format!("lab{tag}-sw"));
        let server = Netns::new(format!("lab{tag}-srv"));
        let server_if = "srv0".to_string();
        let mut topo = Topology {
            tag: tag.clone(),
            switch,
            server,
            server_if,
            paths: Vec::new(),
            children: Vec::new(),
            workdir,
        };
        let sw = topo.switch.name.clone();
        let srv = topo.server.name.clone();
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        sh(&[
            "ip", "link", "add", "srv0", "netns", &srv, "type", "veth", "peer", "name", "p-srv",
            "netns", &sw,
        ]);
        sh(&[
            "ip", "-n", &sw, "link", "set", "p-srv", "master", "br0", "up",
        ]);
        add_addr(&srv, &format!("{SERVER_V4}/24"), "srv0");
        add_addr(&srv, &format!("{SERVER_V6}/64"), "srv0");
        sh(&["ip", "-n", &srv, "link", "set", "srv0", "up"]);
        for (i0, spec) in s.paths.iter().enumerate() {
            let i = i0 + 1;
            let router = Netns::new(format!("lab{tag}-r{i}"));
            let clients = Netns::new(format!("lab{tag}-c{i}"));
            let (r, c) = (router.name.clone(), clients.name.clone());
            let up_v4 = format!("192.0.2.{}", 10 + i);
            let up_v6 = format!("2001:db8:ffff::{:x}", 10 + i);
            sh(&[
                "ip",
                "link",
                "add",
                "up0",
                "netns",
                &r,
                "type",
                "veth",
                "peer",
                "name",
                &format!("p-r{i}"),
                "netns",
                &sw,
            ]);
            sh(&[
                "ip",
                "-n",
                &sw,
                "link",
                "set",
                &format!("p-r{i}"),
                "master",
                "br0",
                "up",
            ]);
            sh(&[
                "ip", "link", "add", "down0", "netns", &r, "type", "veth", "peer", "name", "cl0",
                "netns", &c,
            ]);
            add_addr(&r, &format!("{up_v4}/24"), "up0");
            add_addr(&r, &format!("{up_v6}/64"), "up0");
            add_addr(&r, &format!("{}/24", client_v4(i, 1)), "down0");
            add_addr(&r, &format!("{}/64", client_v6(i, 1)), "down0");
            for ifname in ["up0", "down0"] {
                sh(&["ip", "-n", &r, "link", "set", ifname, "up"]);
            }
            shq(
                &r,
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
            )?;
            let hosts: u32 = spec.devices.iter().map(|d| d.count).sum();
            for h in 0..hosts as usize {
                add_addr(&c, &format!("{}/24", client_v4(i, 10 + h)), "cl0");
                add_addr(&c, &format!("{}/64", client_v6(i, 10 + h)), "cl0");
            }
            sh(&["ip", "-n", &c, "link", "set", "cl0", "up"]);
            sh(&[
                "ip",
                "-n",
                &c,
                "route",
                "add",
                "default",
                "via",
                &client_v4(i, 1),
            ]);
            sh(&[
                "ip",
                "-n",
                &c,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &client_v6(i, 1),
            ]);
            sh(&[
                "ip",
                "-n",
                &srv,
                "route",
                "add",
                &format!("100.64.{i}.0/24"),
                "via",
                &up_v4,
            ]);
            sh(&[
                "ip",
                "-n",
                &srv,
                "-6",
                "route",
                "add",
                &format!("2001:db8:{i:x}::/64"),
                "via",
                &up_v6,
            ]);
            let port = spec.port();
            let monitor_path = match spec.middlebox {
                // The proxy is the client the server sees.
                Middlebox::Proxy => format!("192.0.2.0/24:{port}"),
                _ => format!("100.64.{i}.0/24:{port}"),
            };
            topo.paths.push(PathRuntime {
                spec: spec.clone(),
                index: i,
                router,
                clients,
                monitor_path,
            });
        }
        for i in 0..topo.paths.len() {
            topo.configure_middlebox(i)?;
        }
        Ok(topo)
    }

    fn configure_middlebox(&mut self, i: usize) -> Result<()> {
        let p = &self.paths[i];
        let r = p.router.name.clone();
        let t = p.spec.timeout_seconds;
        match p.spec.middlebox {
            Middlebox::Control | Middlebox::Injector => {}
            Middlebox::ConntrackReset | Middlebox::ConntrackDrop => {
                let verdict = if p.spec.middlebox == Middlebox::ConntrackReset {
                    "reject with tcp reset"
                } else {
                    "drop"
                };
                // The rule loads conntrack in this namespace; then its sysctls exist.
                shq(&r, &format!(
                    "nft add table inet mb && nft 'add chain inet mb killer {{ type filter hook forward priority 0; policy accept; }}' && nft add rule inet mb killer ct state invalid {verdict}"
                ))?;
                // Per-namespace timeout (nftables ct timeout objects did not take effect on this kernel).
                shq(&r, &format!(
                    "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_established={t} net.netfilter.nf_conntrack_tcp_loose=0"
                ))?;
            }
            Middlebox::Proxy => {
                let cfg = self.workdir.join(format!("haproxy-{i}.cfg"));
                std::fs::write(
                    &cfg,
                    format!(
                        "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client {t}s\n  timeout server {t}s\n\
                         frontend fe\n  bind {}:{port}\n  default_backend be\nbackend be\n  server exchange {SERVER_V4}:{port}\n",
                        client_v4(p.index, 1),
                        port = p.spec.port(),
                    ),
                )?;
                let child = crate::netns::die_with_parent(&mut Command::new("ip"))
                    .args(["netns", "exec", &r, "haproxy", "-db", "-f"])
                    .arg(&cfg)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting haproxy (Debian package haproxy)")?;
                self.children.push(child);
            }
        }
        Ok(())
    }

    /// Where path `p`'s devices connect (the proxy, or the server itself).
    pub fn target(&self, p: &PathRuntime, ipv6: bool) -> SocketAddr {
        let ip: IpAddr = match (p.spec.middlebox, ipv6) {
            (Middlebox::Proxy, false) => client_v4(p.index, 1).parse().expect("address"),
            (Middlebox::Proxy, true) => client_v6(p.index, 1).parse().expect("address"),
            (_, false) => SERVER_V4.parse().expect("address"),
            (_, true) => SERVER_V6.parse().expect("address"),
        };
        SocketAddr::new(ip, p.spec.port())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
        // Namespaces go with their `Netns` guards (paths first, then the rest).
        self.paths.clear();
    }
}

/// Traffic in the topology: the endpoint, the devices, the injectors.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub devices: Vec<Arc<Mutex<device::DeviceReport>>>,
    pub server_stats: Arc<server::ServerStats>,
    pub injector_stats: Arc<injector::InjectorStats>,
}

/// Waits for a thread's ready signal; on failure tells the threads already
/// started to stop (each polls the flag), so none outlives the error.
fn started(ready: &std::sync::mpsc::Receiver<()>, stop: &AtomicBool, what: &str) -> Result<()> {
    if ready.recv_timeout(Duration::from_secs(5)).is_err() {
        stop.store(true, Ordering::Relaxed);
        bail!("{what} did not start within 5 s");
    }
    Ok(())
}

impl Traffic {
    pub fn start(topo: &Topology, s: &Scenario) -> Result<Traffic> {
        let tls = tls::lab_tls()?;
        let stop = Arc::new(AtomicBool::new(false));
        let server_stats = Arc::new(server::ServerStats::default());
        let injector_stats = Arc::new(injector::InjectorStats::default());
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for (port, tls) in [
            (SERVER_PORT, Some(tls.server.clone())),
            (PLAINTEXT_PORT, None),
        ] {
            let (stop, stats, p, ready) = (
                stop.clone(),
                server_stats.clone(),
                s.mail_probability,
                ready_tx.clone(),
            );
            threads.push(topo.server.spawn(move || {
                // One dual-stack listener serves IPv4 and IPv6.
                let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
                let _ = ready.send(());
                if let Err(e) = server::serve(addr, tls, p, stop, stats) {
                    eprintln!("lab server on port {port}: {e}");
                }
            }));
        }
        for _ in 0..2 {
            started(&ready_rx, &stop, "the lab server")?;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut devices = Vec::new();
        for p in &topo.paths {
            if p.spec.middlebox == Middlebox::Injector {
                let (stopping, stats, t, port) = (
                    stop.clone(),
                    injector_stats.clone(),
                    Duration::from_secs(u64::from(p.spec.timeout_seconds)),
                    p.spec.port(),
                );
                let (ready, injector_ready) = std::sync::mpsc::channel();
                threads.push(p.router.spawn(move || {
                    if let Err(e) = injector::run("down0", port, t, stopping, stats, ready) {
                        eprintln!("lab injector: {e}");
                    }
                }));
                started(
                    &injector_ready,
                    &stop,
                    &format!("the injector on path {}", p.spec.name),
                )?;
            }
            let mut host = 10;
            for g in &p.spec.devices {
                for _ in 0..g.count {
                    let source: IpAddr = if g.ipv6 {
                        client_v6(p.index, host)
                    } else {
                        client_v4(p.index, host)
                    }
                    .parse()
                    .expect("address");
                    let name = format!("{}-{}", p.spec.name, host - 9);
                    let report = Arc::new(Mutex::new(device::DeviceReport {
                        name: name.clone(),
                        path: p.spec.name.clone(),
                        source: source.to_string(),
                        ..Default::default()
                    }));
                    let spec = device::DeviceSpec {
                        name,
                        path: p.spec.name.clone(),
                        source,
                        server: topo.target(p, g.ipv6),
                        profile: g.profile.clone(),
                        ttl: DEVICE_TTL,
                        grace: Duration::from_secs(s.device_grace_seconds),
                        plaintext: p.spec.plaintext,
                        base64_query: g.base64_query,
                    };
                    let (tls, stop, r) = (tls.client.clone(), stop.clone(), report.clone());
                    threads.push(p.clients.spawn(move || device::run(spec, tls, stop, r)));
                    devices.push(report);
                    host += 1;
                }
            }
        }
        Ok(Traffic {
            stop,
            threads,
            devices,
            server_stats,
            injector_stats,
        })
    }

    pub fn device_reports(&self) -> Vec<device::DeviceReport> {
        self.devices
            .iter()
            .filter_map(|d| d.lock().ok().map(|r| r.clone()))
            .collect()
    }

    /// Stop everything; threads blocked in a read end by their timeouts, so
    /// we wait a bounded time and leave stragglers to the namespace teardown.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        for t in self.threads.drain(..) {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The agent under test: the real `monitor run` binary in the server namespace.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    /// The configuration file the agent runs with.
    pub config: PathBuf,
    pub bin: PathBuf,
    pub log: PathBuf,
    pub metrics: SocketAddr,
    pub ns: String,
}

/// Where and how to run the agent.
pub struct AgentOptions {
    pub iface: String,
    /// Extra `[agent]` keys (e.g. gap_threshold_seconds).
    pub agent: toml::Table,
    pub detector: toml::Table,
    pub workdir: PathBuf,
    /// Extra `[metrics]` keys (e.g. web_config_file).
    pub metrics: toml::Table,
}

impl Agent {
    pub fn start(bin: &Path, topo: &Topology, s: &Scenario) -> Result<Agent> {
        Agent::start_in(
            bin,
            &topo.server,
            AgentOptions {
                iface: topo.server_if.clone(),
                agent: toml::Table::new(),
                detector: s.detector.clone(),
                workdir: topo.workdir.clone(),
                metrics: toml::Table::new(),
            },
        )
    }

    /// Start `monitor run` in namespace `ns`, configured through a file.
    pub fn start_in(bin: &Path, ns: &Netns, o: AgentOptions) -> Result<Agent> {
        std::fs::create_dir_all(&o.workdir)?;
        let socket = o.workdir.join("monitor.sock");
        let log = o.workdir.join("agent.log");
        let cfg_path = o.workdir.join("agent.toml");
        let metrics: SocketAddr = "127.0.0.1:19443".parse().expect("address");
        let mut cfg = toml::Table::new();
        let mut agent = o.agent.clone();
        agent.insert(
            "interfaces".into(),
            toml::Value::Array(vec![o.iface.clone().into()]),
        );
        agent.insert(
            "ports".into(),
            toml::Value::Array(vec![
                i64::from(SERVER_PORT).into(),
                i64::from(PLAINTEXT_PORT).into(),
            ]),
        );
        agent.insert(
            "plaintext_ports".into(),
            toml::Value::Array(vec![i64::from(PLAINTEXT_PORT).into()]),
        );
        cfg.insert("agent".into(), agent.into());
        cfg.insert("detector".into(), o.detector.clone().into());
        let mut m = o.metrics.clone();
        m.insert("listen".into(), metrics.to_string().into());
        cfg.insert("metrics".into(), m.into());
        let mut q = toml::Table::new();
        q.insert("socket".into(), socket.display().to_string().into());
        cfg.insert("query".into(), q.into());
        std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
        let child = crate::netns::die_with_parent(&mut Command::new("ip"))
            .args(["netns", "exec", &ns.name])
            .arg(bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut a = Agent {
            child,
            socket,
            config: cfg_path.clone(),
            bin: bin.to_path_buf(),
            log,
            metrics,
            ns: ns.name.clone(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !a.socket.exists() {
            if let Ok(Some(st)) = a.child.try_wait() {
                bail!(
                    "the agent exited ({st}): {}",
                    std::fs::read_to_string(&a.log).unwrap_or_default()
                );
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the agent did not open its socket within 30 s: {}",
                    std::fs::read_to_string(&a.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(a)
    }

    /// kill -9, and reap: the agent gets no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's process id (`ip netns exec` execs into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run a CLI command against this agent and return its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .with_context(|| format!("running monitor {args:?}"))?;
        if !out.status.success() {
            bail!(
                "monitor {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// GET /metrics from inside the agent's namespace.
    pub fn scrape(&self) -> Result<String> {
        crate::netns::http_get_in(&self.ns, self.metrics, "/metrics").map_err(anyhow::Error::msg)
    }

    /// SIGINT, and wait (bounded) for a clean detach.
    pub fn stop(mut self) -> Result<String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                if !st.success() {
                    bail!("the agent exited with {st}: {log}");
                }
                return Ok(log);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the agent did not stop within 10 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// tcpdump on an interface of a namespace, writing a pcap file.
pub struct Capture {
    child: Child,
    pub path: PathBuf,
}

impl Capture {
    /// Start and wait until tcpdump listens. A 400-byte snaplen keeps every
    /// header and a plaintext Ping's head, and cuts longer payloads (TLS
    /// certificates), like a capture on a busy firewall. `-Z root`:
    /// dropping to tcpdump's own user would clear the parent-death signal.
    pub fn start(ns: &str, iface: &str, path: &Path) -> Result<Capture> {
        use std::io::BufRead;
        let mut child = crate::netns::die_with_parent(&mut Command::new("ip"))
            .args([
                "netns", "exec", ns, "tcpdump", "-Z", "root", "-i", iface, "-s", "400", "-U", "-w",
            ])
            .arg(path)
            .arg(format!(
                "tcp port {SERVER_PORT} or tcp port {PLAINTEXT_PORT}"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (Debian package tcpdump)")?;
        let stderr = child.stderr.take().context("tcpdump's stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            bail!("tcpdump did not start listening on {iface} within 10 s");
        }
        Ok(Capture {
            child,
            path: path.to_path_buf(),
        })
    }

    /// SIGINT: tcpdump flushes and closes the file.
    pub fn stop(mut self) -> Result<PathBuf> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        for _ in 0..100 {
            if let Some(st) = self.child.try_wait()? {
                // tcpdump ends with 0 on SIGINT, after flushing the file.
                if !st.success() {
                    bail!("tcpdump exited with {st}");
                }
                return Ok(self.path.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("tcpdump did not stop within 5 s")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A whole lab run: topology, agent, traffic. Dropping it tears everything
/// down in the right order (traffic, capture, agent, namespaces).
pub struct LabRun {
    pub traffic: Option<Traffic>,
    pub capture: Option<Capture>,
    pub agent: Option<Agent>,
    pub topo: Topology,
    pub scenario: Scenario,
}

impl LabRun {
    pub fn start(s: &Scenario, monitor_bin: &Path) -> Result<LabRun> {
        LabRun::start_capturing(s, monitor_bin, None)
    }

    /// Also capture the server's port-443 traffic to `capture` (pcap) from
    /// before the first device connects.
    pub fn start_capturing(
        s: &Scenario,
        monitor_bin: &Path,
        capture: Option<&Path>,
    ) -> Result<LabRun> {
        let topo = Topology::up(s)?;
        let agent = Agent::start(monitor_bin, &topo, s)?;
        let capture = match capture {
            Some(p) => Some(Capture::start(&topo.server.name, &topo.server_if, p)?),
            None => None,
        };
        let traffic = Traffic::start(&topo, s)?;
        Ok(LabRun {
            traffic: Some(traffic),
            capture,
            agent: Some(agent),
            topo,
            scenario: s.clone(),
        })
    }

    /// Stop the capture (traffic goes on); the pcap's path.
    pub fn stop_capture(&mut self) -> Result<Option<PathBuf>> {
        self.capture.take().map(Capture::stop).transpose()
    }

    pub fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .expect("the agent runs until the lab stops")
    }

    /// `monitor report --json`, parsed.
    pub fn report(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.agent().cli(&["report", "--json"])?,
        )?)
    }

    pub fn devices(&self) -> Vec<device::DeviceReport> {
        self.traffic
            .as_ref()
            .map(|t| t.device_reports())
            .unwrap_or_default()
    }

    /// Stop traffic and the agent; returns the agent's log.
    pub fn stop(mut self) -> Result<String> {
        if let Some(t) = self.traffic.take() {
            t.stop();
        }
        match self.agent.take() {
            Some(a) => a.stop(),
            None => Ok(String::new()),
        }
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        if let Some(t) = self.traffic.take() {
            t.stop();
        }
        self.agent.take();
    }
}

/// Remove every lab namespace left by a run that was killed.
pub fn down_all() -> Result<usize> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("ip netns list")?;
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with("lab") && name.contains('-') {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            n += 1;
        }
    }
    Ok(n)
}
