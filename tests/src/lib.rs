//! Kernel tests share the lab code with `cargo xtask` (see `xtask::netns`);
//! benchmarks live here because they load the monitor's programs.

pub mod bench;

pub use xtask::netns::*;

/// The agent binary `cargo build --bins` put next to the test binaries.
pub fn agent_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("monitor");
    assert!(
        bin.exists(),
        "build the agent first (cargo build --bins): {bin:?}"
    );
    bin
}

/// Run `cmd` to its end: whether it succeeded, and its stdout then stderr.
pub fn run_output(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A scenario shipped in `xtask/scenarios`.
pub fn shipped_scenario(file: &str) -> xtask::lab::Scenario {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    xtask::lab::Scenario::load(&root.join("xtask/scenarios").join(file))
        .unwrap_or_else(|e| panic!("scenario {file}: {e:#}"))
}

/// `monitor remedy status --json` from a lab's agent.
pub fn remedy_status(lab: &xtask::lab::LabRun) -> monitor_core::remedy::RemedyStatus {
    let text = lab
        .agent()
        .cli(&["remedy", "status", "--json"])
        .expect("monitor remedy status --json");
    serde_json::from_str(&text).expect("a remedy status")
}
