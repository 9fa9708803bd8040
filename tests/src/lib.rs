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
