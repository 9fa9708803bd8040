//! `monitor run`: attach, read events until SIGINT/SIGTERM, detach.

use std::time::Duration;

use anyhow::Context;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{config::AgentConfig, monitor::Monitor};

/// How often the agent logs its kernel counters.
const COUNTER_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let monitor = Monitor::start(&cfg).context("starting the monitor")?;
    for a in monitor.attachments() {
        log::info!(
            "attached to {}: XDP ingress ({}), TC egress ({}); ports {:?}",
            a.iface,
            a.xdp_mode,
            a.tc_mode,
            cfg.ports
        );
    }
    for p in monitor.programs() {
        log::info!(
            "program {}: {} instructions verified, {} bytes translated",
            p.name,
            p.verified_instructions
                .map_or("?".into(), |n| n.to_string()),
            p.translated_bytes.map_or("?".into(), |n| n.to_string())
        );
    }
    let mut monitor = monitor;
    let mut kernel_log = match monitor.take_kernel_logger() {
        // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd lives.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("watching the kernel log ring buffer")?,
        ),
        None => None,
    };
    // SAFETY: the monitor owns the event ring buffer fd for as long as the AsyncFd lives.
    let mut events = unsafe { AsyncFd::register_with_interest(monitor, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the event ring buffer")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(COUNTER_LOG_INTERVAL);

    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); break; }
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                guard.get_inner_mut().drain(|ev| log::debug!("{ev}"));
                guard.clear_ready();
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
                match events.get_ref().counters() {
                    Ok(c) => log::info!("kernel counters: {c}"),
                    Err(e) => log::warn!("reading kernel counters: {e}"),
                }
            }
        }
    }
    // Drain what is left so nothing the kernel reported is lost at exit.
    let mut monitor = events.into_inner();
    monitor.drain(|ev| log::debug!("{ev}"));
    if let Some(mut l) = kernel_log.map(AsyncFd::into_inner) {
        l.flush();
    }
    drop(monitor);
    log::info!("detached");
    Ok(())
}
