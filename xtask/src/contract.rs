//! The eBPF build contract, checked: a change to the shared state machine
//! (`monitor-common`) must rebuild the kernel object that `monitor` embeds,
//! or the kernel and the host replay could silently run different code.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, workspace_root};

/// The file whose change must reach the kernel object.
const SHARED: &str = "monitor-common/src/flow.rs";

/// Build `monitor` and return the OUT_DIR its build script wrote the object to.
fn build_monitor(root: &Path) -> Result<PathBuf> {
    let out = cmd::output(Command::new("cargo").current_dir(root).args([
        "build",
        "--package",
        "monitor",
        "--message-format=json",
    ]))?;
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "build-script-executed")
        .filter(|m| {
            m["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("/monitor#") || id.contains("/monitor "))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("cargo did not say where monitor's build script wrote the eBPF object")
}

fn modified(p: &Path) -> Result<SystemTime> {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the time of {}", p.display()))
}

/// Touch the shared state machine, rebuild, and check the object was rebuilt.
pub fn check_ebpf_rebuilds_on_shared_change() -> Result<()> {
    let root = workspace_root();
    let before = build_monitor(&root)?.join("monitor");
    let then = modified(&before)?;
    let shared = root.join(SHARED);
    fs::File::options()
        .write(true)
        .open(&shared)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .with_context(|| format!("touching {}", shared.display()))?;
    let after = build_monitor(&root)?.join("monitor");
    if modified(&after)? <= then {
        bail!(
            "changing {SHARED} did not rebuild the kernel object ({}): \
             monitor-ebpf must stay a build-dependency of monitor",
            after.display()
        );
    }
    println!("eBPF build contract: a change to {SHARED} rebuilt the kernel object");
    Ok(())
}
