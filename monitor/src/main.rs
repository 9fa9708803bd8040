//! `monitor`: the agent and its CLI. This file only dispatches.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use monitor::{AgentConfig, XdpModeSetting};

#[derive(Parser)]
#[command(
    name = "monitor",
    version,
    about = "Sees which middlebox kills long-lived TCP connections (ActiveSync Direct Push) before the heartbeat"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach XDP (ingress) and TC (egress) to the client-facing
    /// interface(s) and track TCP flows to the server ports. Needs root
    /// (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON). Detaches on SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Client-facing interface; repeat for several.
    #[arg(long = "iface", required = true)]
    interfaces: Vec<String>,
    /// Local TCP port to track; repeat for several (at most 8).
    #[arg(long = "port", default_values_t = [443u16])]
    ports: Vec<u16>,
    /// Silence, in seconds, after which the next packet is reported as ending
    /// an idle gap.
    #[arg(long, default_value_t = 5.0)]
    gap_threshold_seconds: f64,
    /// Flow table entries (each ~200 bytes of kernel memory).
    #[arg(long, default_value_t = monitor_common::DEFAULT_FLOW_TABLE_SIZE)]
    flow_table_size: u32,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeSetting::Auto)]
    xdp_mode: XdpModeSetting,
}

fn seconds(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{what}: {s} is not a valid number of seconds"))
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let cfg = AgentConfig {
                interfaces: args.interfaces,
                ports: args.ports,
                gap_threshold: seconds(args.gap_threshold_seconds, "--gap-threshold-seconds")?,
                flow_table_size: args.flow_table_size,
                xdp_mode: args.xdp_mode,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(monitor::agent::run(cfg))
        }
    }
}
