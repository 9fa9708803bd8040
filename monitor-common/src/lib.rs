//! Types shared by the kernel programs and user space, and the flow state
//! machine itself: one source of truth for "what a packet means", used by the
//! eBPF programs, by offline analysis and by host unit tests.
#![no_std]

#[cfg(any(test, feature = "craft", feature = "host"))]
extern crate std;

#[cfg(any(test, feature = "craft"))]
pub mod craft;

pub mod flow;
pub mod parse;
pub mod remedy;
#[cfg(any(test, feature = "host"))]
pub mod tables;
pub mod types;

pub use flow::{on_packet, step, FlowTables};
pub use parse::{glance, parse_ethernet, quick, Frame, Glance, Packet, ParseError, Quick};
pub use types::*;
