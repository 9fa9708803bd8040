//! Traffic in the topology: the endpoint, the devices, the injectors, each
//! on a thread inside its namespace.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    addressing::*,
    device, injector,
    scenario::{DeviceGroup, Middlebox, Scenario},
    server,
    tls::LabTls,
    PathRuntime, Topology,
};

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
fn started(ready: &mpsc::Receiver<()>, stop: &AtomicBool, what: &str) -> Result<()> {
    if ready.recv_timeout(Duration::from_secs(5)).is_err() {
        stop.store(true, Ordering::Relaxed);
        bail!("{what} did not start within 5 s");
    }
    Ok(())
}

impl Traffic {
    pub fn start(topo: &Topology, s: &Scenario) -> Result<Traffic> {
        let tls = &topo.tls;
        let mut traffic = Traffic {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            devices: Vec::new(),
            server_stats: Arc::new(server::ServerStats::default()),
            injector_stats: Arc::new(injector::InjectorStats::default()),
        };
        traffic.start_servers(topo, s, tls)?;
        std::thread::sleep(Duration::from_millis(200));
        for p in &topo.paths {
            if p.spec.middlebox == Middlebox::Injector {
                traffic.start_injector(p)?;
            }
            traffic.start_devices(topo, p, s, tls);
        }
        Ok(traffic)
    }

    /// The endpoint in the server namespace, on its TLS and plaintext ports.
    fn start_servers(&mut self, topo: &Topology, s: &Scenario, tls: &LabTls) -> Result<()> {
        let (ready_tx, ready_rx) = mpsc::channel();
        for (port, tls) in [
            (SERVER_PORT, Some(tls.server.clone())),
            (PLAINTEXT_PORT, None),
        ] {
            let (stop, stats, mail, ready) = (
                self.stop.clone(),
                self.server_stats.clone(),
                server::MailPlan::new(s),
                ready_tx.clone(),
            );
            self.threads.push(topo.server.spawn(move || {
                // One dual-stack listener serves IPv4 and IPv6.
                let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
                let _ = ready.send(());
                if let Err(e) = server::serve(addr, tls, &mail, stop, stats) {
                    eprintln!("lab server on port {port}: {e}");
                }
            }));
        }
        for _ in 0..2 {
            started(&ready_rx, &self.stop, "the lab server")?;
        }
        Ok(())
    }

    /// The reset-at-expiry injector on path `p`'s router; returns once it listens.
    fn start_injector(&mut self, p: &PathRuntime) -> Result<()> {
        let (stopping, stats, t, port) = (
            self.stop.clone(),
            self.injector_stats.clone(),
            Duration::from_secs(u64::from(p.spec.timeout_seconds)),
            p.spec.port(),
        );
        let (ready, injector_ready) = mpsc::channel();
        self.threads.push(p.router.spawn(move || {
            if let Err(e) = injector::run("down0", port, t, stopping, stats, ready) {
                eprintln!("lab injector: {e}");
            }
        }));
        started(
            &injector_ready,
            &self.stop,
            &format!("the injector on path {}", p.spec.name),
        )
    }

    /// Path `p`'s devices, one thread each in the clients namespace.
    fn start_devices(&mut self, topo: &Topology, p: &PathRuntime, s: &Scenario, tls: &LabTls) {
        let mut host = FIRST_DEVICE_HOST;
        for g in &p.spec.devices {
            for _ in 0..g.count {
                let spec = device_spec(topo, p, g, host, s);
                let report = Arc::new(Mutex::new(device::DeviceReport {
                    name: spec.name.clone(),
                    path: p.spec.name.clone(),
                    source: spec.source.to_string(),
                    ..Default::default()
                }));
                let (tls, stop, r) = (tls.client.clone(), self.stop.clone(), report.clone());
                self.threads
                    .push(p.clients.spawn(move || device::run(spec, tls, stop, r)));
                self.devices.push(report);
                host += 1;
            }
        }
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
        let deadline = Instant::now() + Duration::from_secs(3);
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
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

/// The device at client address `host` of path `p`, from device group `g`.
fn device_spec(
    topo: &Topology,
    p: &PathRuntime,
    g: &DeviceGroup,
    host: usize,
    s: &Scenario,
) -> device::DeviceSpec {
    let source: IpAddr = if g.ipv6 {
        client_v6(p.index, host)
    } else {
        client_v4(p.index, host)
    }
    .parse()
    .expect("address");
    device::DeviceSpec {
        name: format!("{}-{}", p.spec.name, host - FIRST_DEVICE_HOST + 1),
        path: p.spec.name.clone(),
        source,
        server: topo.target(p, g.ipv6),
        profile: g.profile.clone(),
        ttl: g.ttl.unwrap_or(DEVICE_TTL),
        grace: Duration::from_secs(s.device_grace_seconds),
        plaintext: p.spec.plaintext,
        base64_query: g.base64_query,
    }
}
