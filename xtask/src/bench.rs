//! `cargo xtask bench`: per-packet cost, throughput against tcpdump, a
//! million flows and the event rate, measured by the `bench` binary of the
//! kernel tests crate, written to BENCHMARKS.md.

use anyhow::Result;

use crate::cmd::cargo;

pub fn run() -> Result<()> {
    crate::setup::setup()?;
    let out = crate::cmd::workspace_root().join("BENCHMARKS.md");
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
