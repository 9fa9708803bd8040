//! `cargo xtask demo`: the lab with every kind of middlebox, the real agent,
//! a couple of minutes of Direct Push traffic, then the agent's diagnosis.

use std::{
    io::{BufRead, BufReader, IsTerminal, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};

use crate::{
    cmd::{self, workspace_root},
    elevate::{self, Elevation},
    lab::{LabRun, Scenario},
    progress::{self, Step},
    setup::{self, Needs},
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

/// The kernel's clock for events (CLOCK_MONOTONIC), to put verdicts on the run's timeline.
fn kernel_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Build the agent (release) and return its path, as one step: cargo's
/// output shown only if it fails; on a terminal, how many crates are built.
pub fn build_agent() -> Result<PathBuf> {
    let step = Step::start("build", "the agent, release (minutes the first time)");
    match build_agent_quietly(&step) {
        Ok(bin) => {
            step.finish("done");
            Ok(bin)
        }
        Err(e) => {
            step.fail();
            Err(e)
        }
    }
}

fn build_agent_quietly(step: &Step) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "build",
        "--release",
        "--package",
        "monitor",
        "--bin",
        "monitor",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(workspace_root())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let what = cmd::describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("running `{what}`"))?;
    // stderr (cargo's own messages) is kept for a failure, read aside so
    // neither pipe fills up.
    let mut stderr = child.stderr.take().context("cargo's stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let (mut built, mut bin) = (0u32, None);
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            built += 1;
            step.update(&format!("{built} crates"));
            if msg["target"]["name"] == "monitor" {
                if let Some(exe) = msg["executable"].as_str() {
                    bin = Some(PathBuf::from(exe));
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{what}`"))?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        progress::break_line();
        eprint!("{errors}");
        return Err(anyhow!("`{what}` failed ({status}): its output is above"));
    }
    bin.context("cargo built the agent but did not say where")
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
    give_back_to_sudo_user(png);
    println!("demo: plot written to {}", png.display());
    Ok(())
}

/// A file the root half wrote for a user who ran the demo through sudo
/// becomes theirs (sudo says who in SUDO_UID and SUDO_GID).
fn give_back_to_sudo_user(path: &Path) {
    let id = |var| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    if let (Some(uid), Some(gid)) = (id("SUDO_UID"), id("SUDO_GID")) {
        let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
    }
}

/// The demo. `agent` is set only for the root half of a user's run (set up
/// and built already, as the user); otherwise: check how root is had, set
/// up what the demo needs, build as whoever runs it, then the lab as root.
pub fn run(
    scenario: &Path,
    seconds: Option<u64>,
    png: Option<&Path>,
    agent: Option<&Path>,
) -> Result<()> {
    let mut s = Scenario::load(scenario)?;
    if let Some(secs) = seconds {
        s.duration_seconds = secs;
    }
    if let Some(bin) = agent {
        return run_lab(&s, scenario, png, bin);
    }
    let root = elevate::detect("the demo")?;
    root.ask_up_front("demo")?;
    let needs = if png.is_some() {
        Needs::DemoPlot
    } else {
        Needs::Demo
    };
    setup::setup_for(needs, &root)?;
    let bin = build_agent()?;
    if root.is_root() {
        return run_lab(&s, scenario, png, &bin);
    }
    run_lab_through_sudo(&root, scenario, seconds, png, &bin)
}

/// The lab as root: this program again under sudo, told where the agent is.
fn run_lab_through_sudo(
    root: &Elevation,
    scenario: &Path,
    seconds: Option<u64>,
    png: Option<&Path>,
    bin: &Path,
) -> Result<()> {
    let me = std::env::current_exe().context("finding this program to run it as root")?;
    let mut cmd = root.command(me);
    cmd.arg("demo")
        .arg("--agent")
        .arg(bin)
        .arg("--scenario")
        .arg(std::path::absolute(scenario)?);
    if let Some(secs) = seconds {
        cmd.arg("--seconds").arg(secs.to_string());
    }
    if let Some(png) = png {
        cmd.arg("--png").arg(std::path::absolute(png)?);
    }
    // Ctrl-C reaches the root half too; this half waits for its teardown.
    catch_interrupts();
    let status = cmd
        .status()
        .with_context(|| format!("running `{}`", cmd::describe(&cmd)))?;
    if !status.success() {
        // The root half has said why, in its one line.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn run_lab(s: &Scenario, scenario: &Path, png: Option<&Path>, bin: &Path) -> Result<()> {
    catch_interrupts();
    print_plan(s, scenario);
    let t0_ns = kernel_ns();
    let step = Step::start(
        "demo",
        "starting the lab: namespaces, middleboxes, agents (server, mirror, router, proxy hosts)",
    );
    let lab = match LabRun::start_with(s, bin, None, true) {
        Ok(lab) => {
            step.finish("up");
            lab
        }
        Err(e) => {
            step.fail();
            return Err(e);
        }
    };
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

/// Let the lab run for `total` (or until interrupted). On a terminal, one
/// line rewritten every second; in a log, a line every 30 s.
fn wait_with_progress(lab: &LabRun, total: Duration) {
    let start = Instant::now();
    let live = std::io::stdout().is_terminal();
    let every = if live {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    let mut counters = String::from("waiting for the agent");
    let mut next_status = if live { Duration::ZERO } else { every };
    let mut next_line = Duration::ZERO;
    while start.elapsed() < total && !interrupted() {
        std::thread::sleep(Duration::from_millis(200));
        let t = start.elapsed();
        if t >= next_status {
            if let Ok(st) = lab.agent().status() {
                counters = format!(
                    "{} flows followed, {} events from the kernel",
                    st.flows_followed,
                    st.kernel_counters.get("events_sent").copied().unwrap_or(0)
                );
                if !live {
                    println!(
                        "demo: lab {:>3} s of {} s: {counters}",
                        t.as_secs(),
                        total.as_secs()
                    );
                }
            }
            next_status += every;
        }
        if live && t >= next_line {
            print!(
                "\r\x1b[Kdemo: lab {:>3} s of {} s: {counters}",
                t.as_secs(),
                total.as_secs()
            );
            let _ = std::io::stdout().flush();
            next_line += Duration::from_secs(1);
        }
    }
    let how = if interrupted() { "interrupted" } else { "done" };
    let took = progress::human(start.elapsed());
    if live {
        println!("\r\x1b[Kdemo: lab {how} after {took}: {counters}");
    } else {
        println!("demo: lab {how} after {took}");
    }
}

/// The agent's report, status and path metrics, and what each device saw.
/// The other placements' reports: the reverse proxies' hosts (their own
/// timeout named), the mirror port, the router.
fn print_placements(lab: &LabRun) -> Result<()> {
    for p in &lab.proxy_agents {
        println!(
            "\n===== on {}'s proxy host (upstream legs followed) =====\n",
            p.name
        );
        print!("{}", p.agent.cli(&["report"])?);
    }
    if let Some(tap) = &lab.tap_agent {
        println!("\n===== on the switch's mirror port (tap mode) =====\n");
        print!("{}", tap.cli(&["report"])?);
    }
    if let Some((path, router)) = &lab.router_agent {
        println!("\n===== on {path}'s router (router mode) =====\n");
        print!("{}", router.cli(&["report"])?);
    }
    Ok(())
}

fn print_results(lab: &LabRun) -> Result<()> {
    println!("\n===== monitor report =====\n");
    print!("{}", lab.agent().cli(&["report"])?);
    print_placements(lab)?;
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
