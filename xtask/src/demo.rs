//! `cargo xtask demo`: the lab with every kind of middlebox, the real agent,
//! a couple of minutes of Direct Push traffic, then the agent's diagnosis.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::{LabRun, Scenario};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM end the wait early; the lab is still torn down.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Build the agent (release) and return its path.
pub fn build_agent() -> Result<PathBuf> {
    let root = workspace_root();
    let st = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--package",
            "monitor",
            "--bin",
            "monitor",
        ])
        .current_dir(&root)
        .status()
        .context("building the agent")?;
    if !st.success() {
        bail!("building the agent failed");
    }
    Ok(root.join("target/release/monitor"))
}

pub fn default_scenario() -> PathBuf {
    workspace_root().join("xtask/scenarios/demo.toml")
}

pub fn run(scenario: &Path, seconds: Option<u64>) -> Result<()> {
    crate::setup::setup()?;
    let mut s = Scenario::load(scenario)?;
    if let Some(secs) = seconds {
        s.duration_seconds = secs;
    }
    let bin = build_agent()?;
    catch_interrupts();
    println!(
        "demo: lab of {} paths, {} s of Direct Push traffic (scenario {})",
        s.paths.len(),
        s.duration_seconds,
        scenario.display()
    );
    for p in &s.paths {
        let n: u32 = p.devices.iter().map(|d| d.count).sum();
        println!(
            "  {:<24} {:?} timeout {} s, {n} devices",
            p.name, p.middlebox, p.timeout_seconds
        );
    }
    let lab = LabRun::start(&s, &bin)?;
    let start = Instant::now();
    let total = Duration::from_secs(s.duration_seconds);
    let mut next_print = Duration::from_secs(30);
    while start.elapsed() < total && !interrupted() {
        std::thread::sleep(Duration::from_millis(200));
        if start.elapsed() >= next_print {
            let st = lab.agent().cli(&["status", "--json"]).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&st).unwrap_or_default();
            println!(
                "demo: {:>3} s: {} flows followed, {} events from the kernel",
                start.elapsed().as_secs(),
                v["flows_followed"],
                v["kernel_counters"]["events_sent"]
            );
            next_print += Duration::from_secs(30);
        }
    }
    println!("\n===== monitor report =====\n");
    print!("{}", lab.agent().cli(&["report"])?);
    println!("\n===== monitor status =====\n");
    print!("{}", lab.agent().cli(&["status"])?);
    println!("\n===== /metrics (excerpt) =====\n");
    let metrics = lab.agent().scrape()?;
    for l in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("activesync_monitor_path_")
                || l.starts_with("activesync_monitor_premature_kills_total")
                || l.starts_with("activesync_monitor_heartbeat_window")
                || l.starts_with("activesync_monitor_flows_ended_total"))
    }) {
        println!("{l}");
    }
    println!("\n===== devices =====\n");
    for d in lab.devices() {
        let first = d.heartbeats.first().copied().unwrap_or(0);
        let last = d.heartbeats.last().copied().unwrap_or(0);
        println!(
            "  {:<28} {:<22} pings ok {:>3} failed {:>3}, heartbeat {first} -> {last} s",
            d.name, d.source, d.pings_ok, d.pings_failed
        );
    }
    lab.stop()?;
    println!("\ndemo: lab torn down");
    Ok(())
}
