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
