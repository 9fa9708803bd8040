//! `cargo xtask`: set-up, tests, demo. Each command does its own set-up.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::cmd::cargo;

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks: setup, test, demo")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: rust-src for nightly, bpf-linker,
    /// Debian packages. Idempotent; checks root and the kernel first.
    Setup {
        /// Only what building needs (rust-src, bpf-linker): no kernel checks,
        /// no lab packages. For container builds.
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, then run every check and test: fmt, clippy, host unit tests,
    /// the kernel tests (as root, in network namespaces), and the fuzz
    /// target for a bounded time.
    Test,
    /// The soak: 200 devices under constant churn and kills (xtask/scenarios/soak.toml)
    /// for 10 minutes; the agent's memory and every event accounted for.
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Fuzz the shared parser and state machine (cargo fuzz) for a while.
    Fuzz {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Set up, build the agent, run the lab with every kind of middlebox for a
    /// couple of minutes, print the agent's report and metrics, tear down.
    Demo {
        /// Scenario file (default: xtask/scenarios/demo.toml).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Override the scenario's duration, in seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// Also plot every verdict (silence before the ending, over time) to this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Set up, then measure per-packet cost (BPF_PROG_TEST_RUN), throughput
    /// against tcpdump, a million flows and the event rate; write BENCHMARKS.md.
    Bench,
    /// Lab housekeeping.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Remove lab namespaces left behind by a run that was killed.
    Down,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only } => setup(build_only),
        Cmd::Test => test(),
        Cmd::Soak { seconds } => xtask::soak::run_and_check(seconds),
        Cmd::Fuzz { seconds } => fuzz(seconds),
        Cmd::Demo {
            scenario,
            seconds,
            png,
        } => demo(scenario, seconds, png),
        Cmd::Bench => xtask::bench::run(),
        Cmd::Lab { cmd: LabCmd::Down } => lab_down(),
    }
}

fn setup(build_only: bool) -> Result<()> {
    if build_only {
        xtask::setup::setup_build()
    } else {
        xtask::setup::setup()
    }
}

fn test() -> Result<()> {
    xtask::setup::setup()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    // Default members: the user-space crates (the eBPF crate builds from monitor/build.rs).
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["build", "--bins"])?;
    cargo(&["test"])?;
    xtask::contract::check_ebpf_rebuilds_on_shared_change()?;
    xtask::setup::fuzz(60)
}

fn fuzz(seconds: u64) -> Result<()> {
    xtask::setup::setup()?;
    xtask::setup::fuzz(seconds)
}

fn demo(scenario: Option<PathBuf>, seconds: Option<u64>, png: Option<PathBuf>) -> Result<()> {
    let s = scenario.unwrap_or_else(xtask::demo::default_scenario);
    xtask::demo::run(&s, seconds, png.as_deref())
}

fn lab_down() -> Result<()> {
    let n = xtask::lab::down_all()?;
    println!("removed {n} lab namespaces");
    Ok(())
}
