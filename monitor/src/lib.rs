//! The agent shell: loading and attaching the kernel programs, pinning,
//! privileges, the exporter and the query socket. What events mean is
//! `monitor-core`'s; its modules are re-exported here so the shell and its
//! users name one path. `main.rs` only dispatches the CLI.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod counters;
pub mod exporter;
pub mod loader;
pub mod local_addrs;
pub mod monitor;
pub mod pins;
pub mod privilege;
pub mod remedy;
pub mod shared;
pub mod sock_diag;
pub mod web_config;

pub use monitor::Monitor;
pub use monitor_core::{
    analyze, api, config, detector, event, flows, metrics, ping, pipeline, query, render, replay,
};
pub use monitor_core::{AgentConfig, ConfigError, FileConfig, FlowEvent, XdpModeSetting};

/// The compiled kernel programs, built by `build.rs` (aya-build).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
/// The cure's programs (sock_ops and the TCP iterator): loaded only with
/// `[remedy] keepalive = true`.
pub static REMEDY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/remedy"));
