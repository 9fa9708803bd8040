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
    Setup,
    /// Set up, then run every check and test: fmt, clippy, host unit tests
    /// and the kernel tests (as root, in network namespaces).
    Test,
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
        Cmd::Setup => xtask::setup::setup(),
        Cmd::Test => {
            xtask::setup::setup()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            // Default members: the user-space crates (the eBPF crate builds from monitor/build.rs).
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            cargo(&["build", "--bins"])?;
            cargo(&["test"])
        }
    }
}
