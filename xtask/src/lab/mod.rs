//! The lab: real middleboxes between simulated devices and an ActiveSync-like
//! server, in network namespaces this code creates and removes.
//!
//! - [`topology`]: the namespaces, links, routes and middleboxes
//!   ([`addressing`] is the address plan);
//! - [`traffic`]: the endpoint, the devices and the injectors on threads in
//!   those namespaces ([`server`], [`device`], [`injector`]);
//! - [`agent`]: the monitor under test; [`capture`]: tcpdump;
//!   [`placement`]: a SPAN port on the switch with an agent in tap mode,
//!   an agent in router mode on a path's router, and agents on the
//!   reverse proxies' hosts (nginx, HAProxy) following upstream legs;
//! - [`run`]: all of them together, torn down in order.
//!
//! Path i's clients live in 100.64.i.0/24 and 2001:db8:i::/64 and start at
//! TTL 50 (a device ~15 hops away), so a router's own packets (TTL 64) stand
//! out as they do in the wild; a device group's `ttl` (65, 66) puts devices
//! one or two hops behind their router instead, where its packets do not.

pub mod addressing;
pub mod agent;
pub mod capture;
pub mod placement;
pub mod run;
pub mod topology;
pub mod traffic;

pub mod device;
pub mod http;
pub mod injector;
pub mod scenario;
pub mod server;
pub mod tls;
pub mod wbxml;

pub use addressing::{DEVICE_TTL, PLAINTEXT_PORT, SERVER_PORT, SERVER_V4, SERVER_V6};
pub use agent::{Agent, AgentOptions};
pub use capture::Capture;
pub use placement::Mirror;
pub use run::LabRun;
pub use scenario::{Middlebox, Scenario};
pub use topology::{down_all, PathRuntime, Topology};
pub use traffic::Traffic;
