//! The pure core: everything between "the kernel saw a packet" and "a
//! verdict was reached", with no aya and no build script, so it builds and
//! tests anywhere. The agent (`monitor`), offline analysis and the scenario
//! generators all go through [`pipeline::Pipeline`].

pub mod analyze;
pub mod api;
pub mod config;
pub mod counters;
pub mod detector;
pub mod event;
pub mod flows;
pub mod metrics;
pub mod ping;
pub mod pipeline;
pub mod placement;
pub mod query;
pub mod remedy;
pub mod render;
pub mod replay;
pub mod scenario;

pub use config::{AgentConfig, ConfigError, FileConfig, XdpModeSetting};
pub use event::FlowEvent;
pub use pipeline::Pipeline;
