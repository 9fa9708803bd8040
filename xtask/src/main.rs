//! `cargo xtask`: set-up, tests, demo. Each command does its own set-up.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
        scenario: Option<std::path::PathBuf>,
        /// Override the scenario's duration, in seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// Also plot every verdict (silence before the ending, over time) to this PNG.
        #[arg(long)]
        png: Option<std::path::PathBuf>,
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

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new("cargo")
        .args(args)
        .status()
        .with_context(|| format!("running cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only: false } => xtask::setup::setup(),
        Cmd::Setup { build_only: true } => xtask::setup::setup_build(),
        Cmd::Test => {
            xtask::setup::setup()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            // Default members: the user-space crates (the eBPF crate builds from monitor/build.rs).
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            cargo(&["build", "--bins"])?;
            cargo(&["test"])?;
            xtask::setup::fuzz(60)
        }
        Cmd::Soak { seconds } => {
            xtask::setup::setup()?;
            xtask::demo::catch_interrupts();
            let bin = xtask::demo::build_agent()?;
            let s = xtask::lab::Scenario::load(
                &xtask::demo::workspace_root().join("xtask/scenarios/soak.toml"),
            )?;
            let soak = xtask::soak::run(&s, &bin, seconds, std::time::Duration::from_secs(30))?;
            print!("{}", soak.markdown());
            let dropped = soak.samples.last().map_or(0, |x| x.events_dropped);
            if dropped > 0 || soak.decode_errors > 0 || soak.log_panicked {
                anyhow::bail!("the soak lost events or the agent panicked");
            }
            Ok(())
        }
        Cmd::Fuzz { seconds } => {
            xtask::setup::setup()?;
            xtask::setup::fuzz(seconds)
        }
        Cmd::Demo {
            scenario,
            seconds,
            png,
        } => {
            let s = scenario.unwrap_or_else(xtask::demo::default_scenario);
            xtask::demo::run(&s, seconds, png.as_deref())
        }
        Cmd::Bench => {
            xtask::setup::setup()?;
            let out = xtask::demo::workspace_root().join("BENCHMARKS.md");
            let out = out.to_string_lossy();
            // The agent binary the throughput, scale and event benchmarks run.
            cargo(&["build", "--release", "--bins"])?;
            cargo(&[
                "run",
                "--release",
                "--package",
                "monitor-tests",
                "--bin",
                "bench",
                "--",
                &out,
            ])
        }
        Cmd::Lab { cmd: LabCmd::Down } => {
            let n = xtask::lab::down_all()?;
            println!("removed {n} lab namespaces");
            Ok(())
        }
    }
}
