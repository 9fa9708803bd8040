//! Project tasks that run before and around the monitor: machine set-up,
//! network-namespace labs, the demo. A library too, so the kernel tests and
//! the benchmarks build their labs with the same code.

pub mod bench;
pub mod cmd;
pub mod contract;
pub mod demo;
pub mod elevate;
pub mod image;
pub mod lab;
pub mod netns;
pub mod package;
pub mod progress;
pub mod scenarios;
pub mod setup;
pub mod soak;
