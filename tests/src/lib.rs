//! Kernel tests share the lab code with `cargo xtask` (see `xtask::netns`).
pub use xtask::netns::*;
