//! `monitor run`: attach, feed kernel events to the detector, serve /metrics
//! and the query socket, until SIGINT/SIGTERM; then detach.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Context;
use monitor_common::{state, Counter};
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::broadcast,
};

use crate::{
    api::{self, AttachmentInfo, EventPayload, FlowRow, ProgramInfo, ReportPayload},
    clock,
    config::FileConfig,
    detector::{Detector, Output},
    event::{client_of, server_of, Record},
    exporter,
    metrics::{Metrics, TableStats},
    monitor::{Monitor, Scan},
    ping,
    query::{self, Request, Response},
};

/// How often the kernel table is swept for flows that left it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);
/// Verdicts buffered for `events --follow` clients.
const FOLLOW_BUFFER: usize = 1024;

/// Everything the tasks share. One lock: events are rare, queries rarer.
pub struct Shared {
    pub monitor: Monitor,
    pub detector: Detector,
    /// Reads ActiveSync requests from plaintext-port samples.
    pub requests: ping::Reader,
    pub metrics: Metrics,
    pub table_entries: u64,
    pub half_open_entries: u64,
    pub decode_errors: u64,
    pub started: Instant,
    pub config: FileConfig,
}

pub type State = Arc<Mutex<Shared>>;

/// Lock, surviving a poisoned lock (a panicked task must not stop the agent).
pub fn lock(state: &State) -> MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Feed events and timer outputs through the detector into the metrics
    /// and to followers.
    fn absorb(&mut self, outputs: Vec<Output>, followers: &broadcast::Sender<String>) {
        for o in outputs {
            self.metrics.observe(&o, &self.detector);
            match &o {
                Output::Verdict(v) => {
                    log::debug!("verdict: {v}");
                    // Rendering costs more than the detector's own work: only
                    // for someone following.
                    if followers.receiver_count() == 0 {
                        continue;
                    }
                    let payload = EventPayload {
                        text: v.to_string(),
                        verdict: serde_json::to_value(v).unwrap_or_default(),
                    };
                    if let Ok(line) = serde_json::to_string(&Response::Ok(payload)) {
                        // No followers is fine.
                        let _ = followers.send(line);
                    }
                }
                Output::Alert(a) => {
                    let names: Vec<String> = a
                        .culprits
                        .iter()
                        .map(|(p, n)| format!("{p} ({n})"))
                        .collect();
                    log::warn!(
                        "heartbeat window alert (Exchange 3033/1040 logic): mean {:.0} s over {} samples; pulled down by {}",
                        a.mean_seconds,
                        a.samples,
                        if names.is_empty() { "no single path".into() } else { names.join(", ") }
                    );
                }
                _ => {}
            }
        }
    }

    fn ingest(&mut self, record: &Record, followers: &broadcast::Sender<String>) {
        match record {
            Record::Event(ev) => {
                log::debug!("{ev}");
                let out = self.detector.ingest(ev);
                if ev.kind == monitor_common::EventKind::Closed {
                    self.requests.forget(&ev.raw.key);
                }
                self.absorb(out, followers);
            }
            Record::Sample(s) => {
                for o in self.requests.feed(s, &mut self.detector) {
                    log::debug!("request from {}: {o:?}", client_of(&s.key));
                    self.metrics.request(&o);
                }
            }
        }
    }

    /// Apply a scan of the kernel tables: count them, and retire flows that
    /// left the flow table.
    fn apply_scan(&mut self, scan: &Scan, followers: &broadcast::Sender<String>) {
        self.table_entries = scan.flow_keys.len() as u64;
        self.half_open_entries = scan.half_open_entries;
        let out = self
            .detector
            .retire_missing(clock::boot_ns(), |k| scan.flow_keys.contains(k));
        self.absorb(out, followers);
    }

    pub fn status(&self) -> api::Status {
        let counters = self.monitor.counters().unwrap_or_default();
        let capacity = u64::from(self.monitor.flow_table_size());
        api::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ports: self.config.agent.ports.clone(),
            plaintext_ports: self.config.agent.plaintext_ports.clone(),
            gap_threshold_seconds: self.config.agent.gap_threshold.as_secs_f64(),
            attachments: self
                .monitor
                .attachments()
                .iter()
                .map(|a| AttachmentInfo {
                    interface: a.iface.clone(),
                    xdp_mode: a.xdp_mode.to_string(),
                    tc_mode: a.tc_mode.to_string(),
                })
                .collect(),
            programs: self
                .monitor
                .programs()
                .iter()
                .map(|p| ProgramInfo {
                    name: p.name.to_string(),
                    verified_instructions: p.verified_instructions,
                })
                .collect(),
            flow_table_entries: self.table_entries,
            flow_table_capacity: capacity,
            flow_table_fill_ratio: self.table_entries as f64 / capacity.max(1) as f64,
            flow_table_memory_bytes: self.monitor.flow_table_memory_bytes(),
            flow_table_evictions: self.tables(&counters).evictions,
            half_open_entries: self.half_open_entries,
            half_open_capacity: u64::from(self.monitor.half_open_table_size()),
            half_open_memory_bytes: self.monitor.half_open_memory_bytes(),
            half_open_evictions: self.tables(&counters).half_open_evictions,
            kernel_counters: Counter::ALL
                .iter()
                .map(|c| (c.name().to_string(), counters.get(*c)))
                .collect(),
            events_dropped: counters.get(Counter::EventsDropped),
            event_decode_errors: self.decode_errors,
            flows_followed: self.detector.flows_tracked(),
            paths: self.detector.paths().count(),
            metrics_listen: self
                .config
                .metrics
                .enabled
                .then(|| self.config.metrics.listen.to_string()),
        }
    }

    pub fn flows(&self) -> Result<Vec<FlowRow>, String> {
        let now = clock::boot_ns();
        let table = self.monitor.flows().map_err(|e| e.to_string())?;
        let mut rows = Vec::new();
        for item in table.iter() {
            let (key, f) = item.map_err(|e| format!("reading the flow table: {e}"))?;
            let client = client_of(&key);
            let last = f.last_in_ns.max(f.last_out_ns);
            let mut st = if f.state & state::CLOSED != 0 {
                "closed"
            } else if f.state & state::RETRANS_REPORTED != 0 {
                "retransmitting"
            } else {
                "open"
            }
            .to_string();
            if f.state & state::MIDSTREAM != 0 {
                st.push_str("+midstream");
            }
            rows.push(FlowRow {
                client: client.to_string(),
                server: server_of(&key).to_string(),
                path: self
                    .detector
                    .path_of(client.ip(), key.server_port)
                    .to_string(),
                age_seconds: now.saturating_sub(f.first_seen_ns) as f64 / 1e9,
                silence_seconds: now.saturating_sub(last) as f64 / 1e9,
                bytes_in: f.bytes_in,
                bytes_out: f.bytes_out,
                packets_in: f.pkts_in,
                packets_out: f.pkts_out,
                heartbeat_seconds: self.detector.flow_heartbeat(&key),
                state: st,
            });
        }
        Ok(rows)
    }

    /// Both tables as of the last sweep. Entries leave the flow table only
    /// by eviction, and the half-open table by eviction or by being
    /// established, so the counters give the evictions.
    fn tables(&self, k: &crate::counters::KernelCounters) -> TableStats {
        let created = k.get(Counter::FlowsCreated);
        TableStats {
            entries: self.table_entries,
            capacity: u64::from(self.monitor.flow_table_size()),
            memory_bytes: self.monitor.flow_table_memory_bytes().unwrap_or(0),
            evictions: created.saturating_sub(self.table_entries),
            half_open_entries: self.half_open_entries,
            half_open_capacity: u64::from(self.monitor.half_open_table_size()),
            half_open_memory_bytes: self.monitor.half_open_memory_bytes().unwrap_or(0),
            half_open_evictions: k
                .get(Counter::HalfOpenCreated)
                .saturating_sub(created)
                .saturating_sub(self.half_open_entries),
        }
    }

    pub fn metrics_text(&mut self) -> Result<String, prometheus::Error> {
        let kernel = self.monitor.counters().ok();
        let table = kernel.as_ref().map(|k| self.tables(k));
        let decode = self.decode_errors;
        let now = clock::boot_ns();
        let Shared {
            metrics, detector, ..
        } = self;
        metrics.render(detector, kernel.as_ref(), table, decode, now)
    }
}

/// Create the socket owner-only, replacing a stale one (no agent behind it).
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is already answering on {}: stop it first (or use another [query] socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding the query socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} owner-only", path.display()))?;
    Ok(l)
}

async fn serve_query(listener: UnixListener, state: State, followers: broadcast::Sender<String>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let st = state.clone();
                let f = followers.subscribe();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, st, f).await {
                        log::debug!("query client: {e}");
                    }
                });
            }
            Err(e) => {
                log::warn!("accepting a query connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn line<T: serde::Serialize>(r: &Response<T>) -> String {
    let mut s = serde_json::to_string(r)
        .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}"));
    s.push('\n');
    s
}

async fn answer(
    stream: UnixStream,
    state: State,
    mut followers: broadcast::Receiver<String>,
) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    // Bounded read: an over-long request is cut and then rejected as too long.
    let mut r = BufReader::new(r.take(query::MAX_REQUEST_BYTES as u64 + 1));
    let mut req = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut req))
        .await
        .context("no request within 10 s")??;
    let request = match query::parse_request(&req) {
        Ok(q) => q,
        Err(e) => {
            w.write_all(line::<()>(&Response::Error(e)).as_bytes())
                .await?;
            return Ok(());
        }
    };
    let reply = match request {
        Request::Status => line(&Response::Ok(lock(&state).status())),
        Request::Flows => match lock(&state).flows() {
            Ok(rows) => line(&Response::Ok(rows)),
            Err(e) => line::<()>(&Response::Error(e)),
        },
        Request::Report => {
            let s = lock(&state);
            let report = s.detector.report();
            line(&Response::Ok(ReportPayload {
                text: report.to_text(),
                report: serde_json::to_value(&report).unwrap_or_default(),
            }))
        }
        Request::Events { follow } => {
            let recent: Vec<String> = lock(&state)
                .detector
                .recent()
                .map(|v| {
                    line(&Response::Ok(EventPayload {
                        text: v.to_string(),
                        verdict: serde_json::to_value(v).unwrap_or_default(),
                    }))
                })
                .collect();
            for l in recent {
                w.write_all(l.as_bytes()).await?;
            }
            if follow {
                loop {
                    match followers.recv().await {
                        Ok(mut l) => {
                            l.push('\n');
                            w.write_all(l.as_bytes()).await?;
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let msg = format!("follower too slow: {n} verdicts skipped");
                            w.write_all(line::<()>(&Response::Error(msg)).as_bytes())
                                .await?;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            return Ok(());
        }
    };
    w.write_all(reply.as_bytes()).await?;
    Ok(())
}

pub async fn run(config: FileConfig) -> anyhow::Result<()> {
    config.validate().context("invalid configuration")?;
    // Read before anything is attached: a bad file changes nothing.
    let web = match &config.metrics.web_config_file {
        Some(p) => crate::web_config::WebConfig::load(p)?,
        None => crate::web_config::WebConfig::default(),
    };
    let mut monitor = Monitor::start(&config.agent).context("starting the monitor")?;
    for a in monitor.attachments() {
        log::info!(
            "attached to {}: {}; ports {:?}",
            a.iface,
            crate::loader::Attachment::hooks(a.xdp_mode, a.tc_mode),
            config.agent.ports
        );
    }
    for p in monitor.programs() {
        log::info!(
            "program {}: {} instructions verified",
            p.name,
            p.verified_instructions
                .map_or("?".into(), |n| n.to_string())
        );
    }
    let detector = Detector::new(config.detector.clone()).context("detector configuration")?;
    let metrics = Metrics::new(config.metrics.top_paths, config.metrics.client_addresses)
        .context("registering metrics")?;
    let reader = monitor
        .take_event_reader()
        .context("the event reader was already taken")?;
    let logger = monitor.take_kernel_logger();
    // SAFETY: each AsyncFd owns the object that owns the fd, for its whole life.
    let mut events = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the event ring buffer")?;
    let mut kernel_log = match logger {
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("watching the kernel log ring buffer")?,
        ),
        None => None,
    };

    let socket_path: PathBuf = config.query.socket.clone();
    let query_listener = bind_socket(&socket_path)?;
    let metrics_listener = if config.metrics.enabled {
        let addr = config.metrics.listen;
        Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding /metrics on {addr} (in use? set [metrics] listen)")
        })?)
    } else {
        None
    };
    let scanner = match monitor.table_scanner() {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            log::warn!("no table scanner (flow table counts and vanished flows off): {e}");
            None
        }
    };
    let scanning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state: State = Arc::new(Mutex::new(Shared {
        monitor,
        detector,
        requests: ping::Reader::new(),
        metrics,
        table_entries: 0,
        half_open_entries: 0,
        decode_errors: 0,
        started: Instant::now(),
        config: config.clone(),
    }));
    let (followers, _) = broadcast::channel::<String>(FOLLOW_BUFFER);
    let query_task = tokio::spawn(serve_query(
        query_listener,
        state.clone(),
        followers.clone(),
    ));
    let metrics_task = metrics_listener.map(|l| {
        log::info!(
            "serving /metrics on {}{}{}",
            config.metrics.listen,
            if web.tls.is_some() { " (TLS)" } else { "" },
            if web.requires_auth() {
                " (basic auth)"
            } else {
                ""
            }
        );
        tokio::spawn(exporter::serve(l, state.clone(), web.clone()))
    });
    log::info!("query socket {}", socket_path.display());
    // Attached and bound: nothing below needs a capability.
    let qdisc = lock(&state).monitor.needs_net_admin_to_detach();
    let kept = crate::privilege::drop_capabilities(qdisc).context("after attaching")?;
    log::info!("capabilities dropped; kept: {kept:?}");

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); break; }
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                guard.get_inner_mut().drain_records(|r| batch.push(r));
                let decode_errors = guard.get_inner().decode_errors;
                guard.clear_ready();
                let mut s = lock(&state);
                s.decode_errors = decode_errors;
                for ev in batch.drain(..) {
                    s.ingest(&ev, &followers);
                }
            }
            guard = async {
                match kernel_log.as_mut() {
                    Some(fd) => fd.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard.context("waiting for kernel log records")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let mut s = lock(&state);
                let now = clock::boot_ns();
                let out = s.detector.tick(now);
                s.requests.expire(now);
                s.absorb(out, &followers);
            }
            _ = sweep.tick() => {
                // Scan on a blocking thread; the loop keeps draining events.
                use std::sync::atomic::Ordering;
                let idle = !scanning.swap(true, Ordering::AcqRel);
                if let (Some(sc), true) = (scanner.clone(), idle) {
                    let (state, followers, scanning) =
                        (state.clone(), followers.clone(), scanning.clone());
                    tokio::spawn(async move {
                        match tokio::task::spawn_blocking(move || sc.scan()).await {
                            Ok(scan) => lock(&state).apply_scan(&scan, &followers),
                            Err(e) => log::warn!("scanning the kernel tables: {e}"),
                        }
                        scanning.store(false, Ordering::Release);
                    });
                } else if !idle {
                    log::debug!("the previous table scan is still running");
                }
            }
        }
    }
    query_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    // Drain what is left so nothing the kernel reported is lost at exit.
    events.get_mut().drain_records(|r| batch.push(r));
    {
        let mut s = lock(&state);
        for ev in batch.drain(..) {
            s.ingest(&ev, &followers);
        }
    }
    if let Some(mut l) = kernel_log.map(AsyncFd::into_inner) {
        l.flush();
    }
    match (&config.agent.pin_path, config.agent.detach_on_exit) {
        (Some(dir), true) => match crate::pins::remove_all(dir) {
            Ok(r) => log::info!("detach on exit: removed {} pins from {}", r.len(), dir.display()),
            Err(e) => log::warn!("detach on exit: {e}"),
        },
        (Some(dir), false) => log::info!(
            "programs stay attached and state stays pinned in {} (`monitor uninstall` removes them)",
            dir.display()
        ),
        _ => {}
    }
    let _ = std::fs::remove_file(&socket_path);
    drop(events);
    drop(state);
    log::info!("detached");
    Ok(())
}
