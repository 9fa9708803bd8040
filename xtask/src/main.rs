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
    /// Install what the demo needs on a fresh machine: rust-src for nightly,
    /// bpf-linker, the lab's Debian packages. Idempotent; checks the kernel.
    Setup {
        /// Only what building needs (rust-src, bpf-linker): no kernel checks,
        /// no lab packages. For building from source.
        #[arg(long)]
        build_only: bool,
        /// Everything the tests, benchmark and fuzzer need too: all Debian
        /// packages, cargo-fuzz, kubernetes-validate.
        #[arg(long, conflicts_with = "build_only")]
        all: bool,
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
        /// The agent, built already: the lab half of a user's demo, run as root.
        #[arg(long, hide = true)]
        agent: Option<PathBuf>,
    },
    /// Set up, then measure per-packet cost (BPF_PROG_TEST_RUN), throughput
    /// against tcpdump, a million flows and the event rate; write BENCHMARKS.md.
    Bench,
    /// Generated scenarios with ground truth (devices, middleboxes, paths
    /// drawn from a seed), analysed as `monitor analyze` would, scored;
    /// writes the accuracy table. No root needed.
    Scenarios {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Where to write the table (e.g. ACCURACY.md).
        #[arg(long)]
        out: Option<PathBuf>,
        /// List every miss (the table lists the first of each figure).
        #[arg(long)]
        all_misses: bool,
        /// Instead of scoring: one client (`addr:port`, as ACCURACY.md lists
        /// it) of scenario `--seed`, packet by packet, with its truth and verdicts.
        #[arg(long, value_name = "ADDR:PORT")]
        explain: Option<String>,
    },
    /// Set up, then build the static binary (target/dist/monitor) and the
    /// Debian package around it (systemd unit, conffile, man page,
    /// completions, rules, dashboard) into target/debian/.
    Package,
    /// Set up, then build the container image with podman (the static binary
    /// on an empty base) and save it to target/image/ for `docker load`.
    Image,
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

/// Errors on one line (their causes joined), for the person at the terminal.
fn main() -> std::process::ExitCode {
    match dispatch() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only, all } => setup(build_only, all),
        Cmd::Test => test(),
        Cmd::Soak { seconds } => xtask::soak::run_and_check(seconds),
        Cmd::Fuzz { seconds } => fuzz(seconds),
        Cmd::Demo {
            scenario,
            seconds,
            png,
            agent,
        } => demo(scenario, seconds, png, agent),
        Cmd::Bench => xtask::bench::run(),
        Cmd::Scenarios {
            seed,
            explain: Some(client),
            ..
        } => xtask::scenarios::explain(seed, &client),
        Cmd::Scenarios {
            seed,
            count,
            out,
            all_misses,
            explain: None,
        } => xtask::scenarios::run(seed, count, out.as_deref(), all_misses),
        Cmd::Package => package(),
        Cmd::Image => image(),
        Cmd::Lab { cmd: LabCmd::Down } => lab_down(),
    }
}

fn setup(build_only: bool, all: bool) -> Result<()> {
    use xtask::setup::{setup_build, setup_for, Needs};
    if build_only {
        return setup_build();
    }
    let needs = if all { Needs::Everything } else { Needs::Demo };
    setup_for(needs, &xtask::elevate::detect("setup")?)
}

fn test() -> Result<()> {
    let root = xtask::elevate::detect("the tests")?;
    root.ask_up_front("test")?;
    xtask::setup::setup_for(xtask::setup::Needs::Everything, &root)?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    // Default members: the user-space crates (the eBPF crate builds from monitor/build.rs).
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["build", "--bins"])?;
    // Only the test binaries run as root (the kernel tests), through sudo for a user.
    xtask::cmd::run(&mut xtask::elevate::cargo_test(&root)?)?;
    xtask::contract::check_ebpf_rebuilds_on_shared_change()?;
    xtask::setup::fuzz(60)
}

fn fuzz(seconds: u64) -> Result<()> {
    xtask::setup::setup()?;
    xtask::setup::fuzz(seconds)
}

fn demo(
    scenario: Option<PathBuf>,
    seconds: Option<u64>,
    png: Option<PathBuf>,
    agent: Option<PathBuf>,
) -> Result<()> {
    let s = scenario.unwrap_or_else(xtask::demo::default_scenario);
    xtask::demo::run(&s, seconds, png.as_deref(), agent.as_deref())
}

/// Set up what `needs` asks for; root (or sudo) only if Debian packages
/// are missing.
fn setup_to_build(needs: xtask::setup::Needs, what: &str) -> Result<()> {
    use xtask::setup::{debian_packages, missing_packages};
    let root = if missing_packages(&debian_packages(needs)).is_empty() {
        // Nothing to install: nothing runs as root.
        xtask::elevate::Elevation::Root
    } else {
        xtask::elevate::detect(what)?
    };
    xtask::setup::setup_for(needs, &root)
}

fn kib(path: &std::path::Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.len() / 1024)
}

fn package() -> Result<()> {
    setup_to_build(xtask::setup::Needs::Package, "the package")?;
    let deb = xtask::package::build()?;
    let bin = xtask::package::dist_binary();
    println!("{} ({} KiB, static)", bin.display(), kib(&bin)?);
    println!("{} ({} KiB)", deb.display(), kib(&deb)?);
    Ok(())
}

fn image() -> Result<()> {
    setup_to_build(xtask::setup::Needs::Image, "the image")?;
    let image = xtask::image::build()?;
    println!("{} ({} KiB)", image.reference, image.bytes / 1024);
    println!("{} ({} KiB)", image.archive.display(), kib(&image.archive)?);
    Ok(())
}

fn lab_down() -> Result<()> {
    let n = xtask::lab::down_all()?;
    println!("removed {n} lab namespaces");
    Ok(())
}
