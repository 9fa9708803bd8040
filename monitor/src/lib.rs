//! The user-space agent: loading and attaching the kernel programs, reading
//! their events and counters. `main.rs` only dispatches the CLI.

pub mod agent;
pub mod analyze;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod counters;
pub mod detector;
pub mod event;
pub mod exporter;
pub mod loader;
pub mod metrics;
pub mod monitor;
pub mod ping;
pub mod pins;
pub mod privilege;
pub mod query;
pub mod render;
pub mod replay;
pub mod web_config;

pub use config::{AgentConfig, ConfigError, FileConfig, XdpModeSetting};
pub use event::FlowEvent;
pub use monitor::Monitor;

/// The compiled kernel programs, built by `build.rs` (aya-build).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
