//! Builds the eBPF programs (nightly, bpf-linker) and puts the object in OUT_DIR
//! for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it for quick checks.
//!
//! aya-build relays every line of its nested cargo as a `cargo:warning`,
//! which buries a newcomer's first screen under sixty lines of someone
//! else's progress. So this script runs aya-build in a copy of itself with
//! the output captured: on success only cargo's instructions pass through
//! (rerun-if-changed and the like, so the rebuild contract holds); on
//! failure all of it, so the error is readable. `MONITOR_EBPF_VERBOSE=1`
//! shows it always (and cargo's `-vv` shows this script's stderr).
use std::{
    env,
    io::Write,
    process::{Command, Output},
};

use anyhow::{bail, Context};
use aya_build::{Package, Toolchain};

/// Set in the copy of this script that does the build.
const CHILD: &str = "MONITOR_EBPF_BUILD_CHILD";
const VERBOSE: &str = "MONITOR_EBPF_VERBOSE";

fn main() -> anyhow::Result<()> {
    if env::var_os(CHILD).is_some() {
        return build();
    }
    println!("cargo:rerun-if-env-changed={VERBOSE}");
    let me = env::current_exe().context("finding the build script to run it again")?;
    let out = Command::new(me)
        .env(CHILD, "1")
        // The nested cargo's error says it all; no backtrace of this script.
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .context("running the eBPF build")?;
    let verbose = env::var_os(VERBOSE).is_some_and(|v| v == "1");
    relay(&out, verbose);
    if !out.status.success() {
        bail!(
            "the eBPF build failed ({}): its output is above",
            out.status
        );
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}

/// Pass cargo's instructions on; the nested build's own lines go to stderr
/// (which cargo shows in full on failure, and under `-vv`), and also as
/// warnings when `loud`.
fn relay(out: &Output, loud: bool) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut err = std::io::stderr().lock();
    for line in stdout.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(text) => {
                let _ = writeln!(err, "{text}");
                if loud {
                    println!("cargo:warning={text}");
                }
            }
            None => println!("{line}"),
        }
    }
    let _ = err.write_all(&out.stderr);
}
