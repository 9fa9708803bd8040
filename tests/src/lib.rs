//! Kernel tests share the lab code with `cargo xtask` (see `xtask::netns`);
//! benchmarks live here because they load the monitor's programs.

pub mod bench;

pub use xtask::netns::*;
