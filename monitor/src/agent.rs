//! `monitor run`: attach, feed kernel records through the pipeline, serve
//! /metrics and the query socket, until SIGINT/SIGTERM; then detach.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{broadcast, watch, Notify},
};

use crate::{
    api::{EventPayload, ReportPayload},
    clock,
    config::FileConfig,
    flows::{self, FlowList, FlowQuery},
    metrics::Metrics,
    monitor::{EventReader, KernelLogger, Monitor, TableScanner},
    pipeline::Pipeline,
    query::{self, Request, Response},
    shared::{lock, Shared, State},
};

/// Verdicts buffered for `events --follow` clients.
const FOLLOW_BUFFER: usize = 1024;
/// Table scans: at least this far apart...
const SCAN_MIN_PAUSE: Duration = Duration::from_secs(1);
/// ...at most this far, and otherwise ten times the last scan's duration
/// (a million entries take about two seconds to walk).
const SCAN_MAX_PAUSE: Duration = Duration::from_secs(15);
/// How long a `flows --fresh` query waits for its scan.
const FRESH_SCAN_WAIT: Duration = Duration::from_secs(30);

/// Why a `flows` query could not be answered.
#[derive(Debug, thiserror::Error)]
enum FlowsError {
    #[error(transparent)]
    Path(#[from] crate::detector::path::BadPath),
    #[error("no table scanner: --fresh is unavailable")]
    NoScanner,
    #[error("the table scanner stopped")]
    ScannerStopped,
    #[error("no table scan finished within {} s", FRESH_SCAN_WAIT.as_secs())]
    ScanTimeout,
    #[error("selecting flows: {0}")]
    Select(#[from] tokio::task::JoinError),
}

/// Asks the scanner for a walk now, and tells when walks end (their time).
#[derive(Clone)]
struct Scans {
    wake: Arc<Notify>,
    done: watch::Receiver<u64>,
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

async fn serve_query(listener: UnixListener, state: State, scans: Option<Scans>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (st, sc) = (state.clone(), scans.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, st, sc).await {
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

async fn answer(stream: UnixStream, state: State, scans: Option<Scans>) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    // Bounded read: an over-long request is cut and then rejected as too long.
    let mut r = BufReader::new(r.take(query::MAX_REQUEST_BYTES as u64 + 1));
    let mut req = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut req))
        .await
        .context("no request within 10 s")??;
    let reply = match query::parse_request(&req) {
        Err(e) => line::<()>(&Response::Error(e.to_string())),
        Ok(Request::Status) => line(&Response::Ok(lock(&state).status())),
        Ok(Request::Flows(q)) => match list_flows(&state, scans.as_ref(), q).await {
            Ok(list) => line(&Response::Ok(list)),
            Err(e) => line::<()>(&Response::Error(e.to_string())),
        },
        Ok(Request::Remedy) => line(&Response::Ok(lock(&state).remedy_status())),
        Ok(Request::Report) => {
            let report = lock(&state).report();
            line(&Response::Ok(ReportPayload {
                text: crate::render::report(&report),
                report,
            }))
        }
        Ok(Request::Events { follow }) => return stream_events(&mut w, &state, follow).await,
    };
    w.write_all(reply.as_bytes()).await?;
    Ok(())
}

/// Recent verdicts, then (with `follow`) each new one as it comes.
async fn stream_events(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    state: &State,
    follow: bool,
) -> anyhow::Result<()> {
    let (recent, mut followers): (Vec<String>, _) = {
        let s = lock(state);
        let recent = s
            .pipeline
            .detector()
            .recent()
            .map(|v| line(&Response::Ok(EventPayload::of(v))))
            .collect();
        (recent, s.followers.subscribe())
    };
    for l in recent {
        w.write_all(l.as_bytes()).await?;
    }
    if !follow {
        return Ok(());
    }
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
    Ok(())
}

/// Answer a `flows` query from the latest snapshot: the lock is held only
/// to take a handle on it and, for the rows shown, their heartbeats.
async fn list_flows(
    state: &State,
    scans: Option<&Scans>,
    q: FlowQuery,
) -> Result<FlowList, FlowsError> {
    if q.fresh {
        wait_for_scan(scans.ok_or(FlowsError::NoScanner)?).await?;
    }
    let (snap, paths) = {
        let s = lock(state);
        (s.snapshot.clone(), s.paths())
    };
    let now = clock::now_ns();
    let (taken_ns, total) = (snap.taken_ns, snap.len());
    // Off the event loop: a `--path` filter is a pass over the whole snapshot.
    let (matching, picked) = tokio::task::spawn_blocking(move || {
        let sel = flows::select(&snap, &q, now, paths)?;
        let picked: Vec<_> = sel.rows.into_iter().copied().collect();
        Ok::<_, FlowsError>((sel.matching, picked))
    })
    .await??;
    let s = lock(state);
    let rows = picked
        .iter()
        .map(|(k, f)| {
            let path = paths.of(crate::event::client_of(k).ip(), k.server_port);
            flows::row(k, f, now, path, s.pipeline.detector().flow_heartbeat(k))
        })
        .collect();
    Ok(FlowList {
        snapshot_age_seconds: now.saturating_sub(taken_ns) as f64 / 1e9,
        flows_in_table: total as u64,
        matching: matching as u64,
        rows,
    })
}

/// Ask for a scan and wait until one that started after now has ended.
async fn wait_for_scan(scans: &Scans) -> Result<(), FlowsError> {
    let asked = clock::now_ns();
    let mut done = scans.done.clone();
    scans.wake.notify_one();
    let wait = async { done.wait_for(|taken| *taken > asked).await.map(|_| ()) };
    match tokio::time::timeout(FRESH_SCAN_WAIT, wait).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(FlowsError::ScannerStopped),
        Err(_) => Err(FlowsError::ScanTimeout),
    }
}

/// Walk the kernel tables on a blocking thread, again and again: as often
/// as every second for small tables, less often for big ones.
async fn scan_loop(
    scanner: Arc<TableScanner>,
    state: State,
    wake: Arc<Notify>,
    done: watch::Sender<u64>,
) {
    loop {
        let started = Instant::now();
        let sc = scanner.clone();
        match tokio::task::spawn_blocking(move || sc.scan()).await {
            Ok(scan) => {
                let taken = scan.flows.taken_ns;
                lock(&state).apply_scan(scan);
                done.send_replace(taken);
            }
            Err(e) => log::warn!("scanning the kernel tables: {e}"),
        }
        let pause = (started.elapsed() * 10).clamp(SCAN_MIN_PAUSE, SCAN_MAX_PAUSE);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wake.notified() => {}
        }
    }
}

/// The event ring buffer and the kernel log, watched by the runtime.
struct Readers {
    events: AsyncFd<EventReader>,
    kernel_log: Option<AsyncFd<KernelLogger>>,
}

fn watch_readers(monitor: &mut Monitor) -> anyhow::Result<Readers> {
    let reader = monitor
        .take_event_reader()
        .context("the event reader was already taken")?;
    // SAFETY: each AsyncFd owns the object that owns the fd, for its whole life.
    let events = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the event ring buffer")?;
    let kernel_log = match monitor.take_kernel_logger() {
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("watching the kernel log ring buffer")?,
        ),
        None => None,
    };
    Ok(Readers { events, kernel_log })
}

fn log_attachments(monitor: &Monitor, config: &FileConfig) {
    for a in monitor.attachments() {
        log::info!(
            "attached to {}: {}; ports {:?}{}",
            a.iface,
            a.mode.hooks(a.xdp_mode, a.tc_mode),
            config.agent.ports,
            if config.agent.upstream_ports.is_empty() {
                String::new()
            } else {
                format!(
                    "; upstream legs to ports {:?} (direction by port on both hooks)",
                    config.agent.upstream_ports
                )
            }
        );
    }
    for p in monitor.programs() {
        let n = p
            .verified_instructions
            .map_or("?".into(), |n| n.to_string());
        log::info!("program {}: {n} instructions verified", p.name);
    }
}

/// Drain the ring buffer into the pipeline.
fn drain_events(readers: &mut Readers, state: &State, batch: &mut Vec<crate::event::Record>) {
    readers.events.get_mut().drain_records(|r| batch.push(r));
    let mut s = lock(state);
    s.decode_errors = readers.events.get_ref().decode_errors;
    for r in batch.drain(..) {
        let out = s.pipeline.record(&r);
        s.absorb(out);
    }
}

/// The event loop: records, the kernel log and the clock, until a signal.
async fn serve(readers: &mut Readers, state: &State) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = Vec::new();
    let mut ticks = 0u64;
    let upstream = !lock(state).config.agent.upstream_ports.is_empty();
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); return Ok(()); }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); return Ok(()); }
            guard = readers.events.readable_mut() => {
                guard.context("waiting for events")?.clear_ready();
                drain_events(readers, state, &mut batch);
            }
            guard = async {
                match readers.kernel_log.as_mut() {
                    Some(fd) => fd.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard.context("waiting for kernel log records")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => {
                ticks += 1;
                // Read outside the lock: a netlink dump takes its time.
                let addrs = (ticks.is_multiple_of(LOCAL_ADDRS_EVERY_TICKS) && upstream)
                    .then(crate::local_addrs::local_addresses);
                let mut s = lock(state);
                match addrs {
                    Some(Ok(a)) => s.pipeline.set_local_addresses(a),
                    Some(Err(e)) => log::warn!("{e}; keeping the last ones"),
                    None => {}
                }
                let out = s.pipeline.tick(clock::now_ns());
                s.absorb(out);
            }
        }
    }
}

/// How often (ticks of 1 s) a proxy host's own addresses are read again:
/// a floating or DHCP address moves seldom.
const LOCAL_ADDRS_EVERY_TICKS: u64 = 30;

/// The remedy's programs, loaded and attached while the agent still holds
/// its capabilities, where `[remedy] keepalive` asks for them. A remedy
/// that cannot start leaves the diagnosis running and says why (log,
/// `monitor remedy status`, the report).
fn start_remedy(config: &FileConfig, state: &State) -> Option<crate::remedy::RemedyRuntime> {
    if !config.remedy.runs() {
        return None;
    }
    let d = &config.detector;
    let cgroup = config.remedy.cgroup.as_deref();
    let ports = &config.agent.ports;
    match crate::remedy::RemedyRuntime::start(ports, d.ipv4_prefix, d.ipv6_prefix, cgroup) {
        Ok(rt) => {
            log::info!(
                "remedy: keepalive for paths whose box forgets idle flows, on ports {ports:?}, at most {} sockets/s",
                config.remedy.sockets_per_second
            );
            Some(rt)
        }
        Err(e) => {
            log::error!("remedy off: {e}");
            lock(state).remedy_error = Some(e.to_string());
            None
        }
    }
}

/// Start the scanner task, if the tables can be scanned.
fn start_scanner(state: &State) -> Option<(Scans, tokio::task::JoinHandle<()>)> {
    let scanner = match lock(state).monitor.table_scanner() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            log::warn!("no table scanner (flow table counts, flows and vanished flows off): {e}");
            return None;
        }
    };
    let wake = Arc::new(Notify::new());
    let (done_tx, done) = watch::channel(0u64);
    let task = tokio::spawn(scan_loop(scanner, state.clone(), wake.clone(), done_tx));
    Some((Scans { wake, done }, task))
}

/// Bind /metrics (before capabilities are dropped).
async fn bind_metrics(config: &FileConfig) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if !config.metrics.enabled {
        return Ok(None);
    }
    let addr = config.metrics.listen;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding /metrics on {addr} (in use? set [metrics] listen)"))?;
    Ok(Some(l))
}

fn new_state(monitor: Monitor, config: &FileConfig) -> anyhow::Result<State> {
    let mut detector = config.detector.clone();
    // The report's cure and the agent's remedy share one floor.
    detector.keepalive_floor_seconds = config.remedy.floor_seconds;
    let mut pipeline = Pipeline::new(detector).context("detector configuration")?;
    if !config.agent.upstream_ports.is_empty() {
        let local = crate::local_addrs::local_addresses()?;
        log::info!(
            "upstream legs: this host's connections to ports {:?} from {} local addresses",
            config.agent.upstream_ports,
            local.len()
        );
        pipeline.set_upstream(&config.agent.upstream_ports, local);
    }
    let metrics = Metrics::new(config.metrics.top_paths, config.metrics.client_addresses)
        .context("registering metrics")?;
    Ok(Arc::new(Mutex::new(Shared {
        monitor,
        pipeline,
        metrics,
        snapshot: Arc::default(),
        half_open_entries: 0,
        decode_errors: 0,
        started: Instant::now(),
        config: config.clone(),
        followers: broadcast::channel(FOLLOW_BUFFER).0,
        remedy: monitor_core::remedy::Remedy::new(config.remedy.clone())
            .with_detector(&config.detector),
        remedy_kernel: Default::default(),
        remedy_error: None,
        remedy_sync_error: None,
    })))
}

pub async fn run(config: FileConfig) -> anyhow::Result<()> {
    config.validate().context("invalid configuration")?;
    // Read before anything is attached: a bad file changes nothing.
    let web = match &config.metrics.web_config_file {
        Some(p) => crate::web_config::WebConfig::load(p)?,
        None => crate::web_config::WebConfig::default(),
    };
    let mut monitor = Monitor::start(&config.agent).context("starting the monitor")?;
    log_attachments(&monitor, &config);
    let mut readers = watch_readers(&mut monitor)?;
    let socket_path = config.query.socket.clone();
    let query_listener = bind_socket(&socket_path)?;
    let metrics_listener = bind_metrics(&config).await?;
    let state = new_state(monitor, &config)?;
    // Loaded and attached before the capabilities go.
    let remedy = start_remedy(&config, &state);
    let scanner = start_scanner(&state);
    let query_task = tokio::spawn(serve_query(
        query_listener,
        state.clone(),
        scanner.as_ref().map(|s| s.0.clone()),
    ));
    let metrics_task = metrics_listener.map(|l| {
        log::info!(
            "serving /metrics on {}{}",
            config.metrics.listen,
            web.describe()
        );
        tokio::spawn(crate::exporter::serve(l, state.clone(), web.clone()))
    });
    log::info!("query socket {}", socket_path.display());
    // Attached and bound: nothing below needs a capability.
    let qdisc = lock(&state).monitor.needs_net_admin_to_detach();
    let kept = crate::privilege::drop_capabilities(qdisc).context("after attaching")?;
    log::info!("capabilities dropped; kept: {kept:?}");
    // Its thread starts after the drop: capabilities are per thread, and a
    // thread started before would keep them all.
    let remedy = remedy.map(|rt| crate::remedy::RemedyTask::spawn(rt, state.clone()));

    let served = serve(&mut readers, &state).await;
    // Keepalive taken back from every socket given it, whatever ended the loop.
    if let Some(r) = remedy {
        r.stop();
    }
    served?;

    query_task.abort();
    metrics_task.inspect(|t| t.abort());
    scanner.inspect(|s| s.1.abort());
    shutdown(readers, &state, &config, &socket_path);
    Ok(())
}

/// Drain what is left (nothing the kernel reported is lost at exit), then
/// leave the pins as configured and remove the socket.
fn shutdown(mut readers: Readers, state: &State, config: &FileConfig, socket: &Path) {
    drain_events(&mut readers, state, &mut Vec::new());
    {
        // Resets held for a burst that has no time left to come.
        let mut s = lock(state);
        let out = s.pipeline.conclude_held();
        s.absorb(out);
    }
    if let Some(mut l) = readers.kernel_log.map(AsyncFd::into_inner) {
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
    let _ = std::fs::remove_file(socket);
    log::info!("detached");
}
