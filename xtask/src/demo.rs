//! `cargo xtask demo`: the lab with every kind of middlebox, the real agent,
//! a couple of minutes of Direct Push traffic, then the agent's diagnosis.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    cmd::{self, workspace_root},
    lab::{LabRun, Scenario},
};

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

/// The kernel's clock for events (boot time), to put verdicts on the run's timeline.
fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Build the agent (release) and return its path.
pub fn build_agent() -> Result<PathBuf> {
    let root = workspace_root();
    cmd::run(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--package",
                "monitor",
                "--bin",
                "monitor",
            ])
            .current_dir(&root),
    )
    .context("building the agent")?;
    Ok(root.join("target/release/monitor"))
}

pub fn default_scenario() -> PathBuf {
    workspace_root().join("xtask/scenarios/demo.toml")
}

/// Plot every verdict of the run: silence before the ending against time,
/// one series per ending, the middleboxes' 20 s timeout as a line.
fn plot(verdicts: &[monitor_core::detector::Verdict], png: &Path, t0_ns: u64) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("demo-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut series: std::collections::BTreeMap<String, String> = Default::default();
    for v in verdicts {
        let at = v.at_ns.saturating_sub(t0_ns) as f64 / 1e9;
        let silence = v.evidence.silence_seconds;
        series
            .entry(v.ending.to_string())
            .or_default()
            .push_str(&format!("{at:.1} {silence:.3}\n"));
    }
    let mut plots = Vec::new();
    for (ending, data) in &series {
        let f = dir.join(format!("{ending}.dat"));
        std::fs::write(&f, data)?;
        plots.push(format!(
            "'{}' using 1:2 with points pointsize 1.6 title '{}'",
            f.display(),
            ending.replace('_', " ")
        ));
    }
    plots.push(
        "20 with lines dashtype 2 linecolor rgb '#888888' title 'middlebox idle timeout (20 s)'"
            .into(),
    );
    let script = format!(
        "set terminal pngcairo size 1000,560 font 'Sans,11'\nset output '{}'\n\
         set title 'Lab run: how each flow ended, and the silence before it (from monitor events --json)'\n\
         set xlabel 'time since the lab started (s)'\nset ylabel 'silence before the ending (s)'\n\
         set yrange [0:*]\nset offsets graph 0, graph 0, graph 0.1, 0\nset key below\nset grid\nplot {}\n",
        png.display(),
        plots.join(", ")
    );
    std::fs::write(dir.join("plot.gp"), script)?;
    let plotted = cmd::run(Command::new("gnuplot").arg(dir.join("plot.gp")))
        .context("gnuplot (Debian package gnuplot-nox)");
    let _ = std::fs::remove_dir_all(&dir);
    plotted?;
    println!("demo: plot written to {}", png.display());
    Ok(())
}

pub fn run(scenario: &Path, seconds: Option<u64>, png: Option<&Path>) -> Result<()> {
    crate::setup::setup()?;
    let mut s = Scenario::load(scenario)?;
    if let Some(secs) = seconds {
        s.duration_seconds = secs;
    }
    let bin = build_agent()?;
    catch_interrupts();
    print_plan(&s, scenario);
    let t0_ns = boot_ns();
    let lab = LabRun::start(&s, &bin)?;
    wait_with_progress(&lab, Duration::from_secs(s.duration_seconds));
    print_results(&lab)?;
    if let Some(png) = png {
        plot(&lab.agent().verdicts()?, png, t0_ns)?;
    }
    lab.stop()?;
    println!("\ndemo: lab torn down");
    Ok(())
}

/// What the lab will run: its paths, middleboxes and devices.
fn print_plan(s: &Scenario, scenario: &Path) {
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
}

/// Let the lab run for `total` (or until interrupted), with the agent's
/// counters every 30 s.
fn wait_with_progress(lab: &LabRun, total: Duration) {
    let start = Instant::now();
    let mut next_print = Duration::from_secs(30);
    while start.elapsed() < total && !interrupted() {
        std::thread::sleep(Duration::from_millis(200));
        if start.elapsed() >= next_print {
            if let Ok(st) = lab.agent().status() {
                println!(
                    "demo: {:>3} s: {} flows followed, {} events from the kernel",
                    start.elapsed().as_secs(),
                    st.flows_followed,
                    st.kernel_counters.get("events_sent").copied().unwrap_or(0)
                );
            }
            next_print += Duration::from_secs(30);
        }
    }
}

/// The agent's report, status and path metrics, and what each device saw.
fn print_results(lab: &LabRun) -> Result<()> {
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
    Ok(())
}
