//! What the agent is told to do: a TOML file, overridden by flags, validated
//! before anything touches the kernel. Unknown keys and bad values are errors
//! that name the key.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use monitor_common::{
    Config, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_HALF_OPEN_TABLE_SIZE, MAX_PORTS, MAX_SERVER_PREFIXES,
};
use serde::{Deserialize, Serialize};

use crate::detector::{config::secs, DetectorConfig, DetectorConfigError};
pub use crate::placement::{AgentMode, ServerPrefix};

/// Largest flow table we accept: 16 Mi entries (~2.5 GiB of kernel memory).
pub const MAX_FLOW_TABLE_SIZE: u32 = 1 << 24;
/// Default /metrics address. 9100-9999 is fully allocated to other
/// exporters, so the default sits outside that range.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:19443";
pub const DEFAULT_SOCKET: &str = "/run/activesync-monitor/monitor.sock";

/// Which hook sees client-to-server packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressHook {
    /// XDP: cheapest on physical NICs (runs before the kernel builds an skb).
    #[default]
    Xdp,
    /// TC ingress: for veth and other virtual devices, where an XDP program
    /// makes the device give up GRO (measured: 0.15 of the throughput, see
    /// BENCHMARKS.md).
    Tc,
}

/// How to attach XDP. Our own enum so the configuration does not leak aya types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode if the driver supports it, else generic.
    #[default]
    Auto,
    /// Driver mode only; fail if unsupported.
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Skb,
}

/// `[agent]`: what to attach to and what to track.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Interfaces facing the clients: XDP on ingress, TC on egress.
    pub interfaces: Vec<String>,
    /// Local (server) TCP ports to track.
    pub ports: Vec<u16>,
    /// Those of `ports` that carry plaintext HTTP (behind a TLS-terminating
    /// load balancer): their ActiveSync Pings are read for the exact heartbeat.
    pub plaintext_ports: Vec<u16>,
    /// Silence after which the next packet is reported as ending an idle gap.
    #[serde(with = "secs", rename = "gap_threshold_seconds")]
    pub gap_threshold: Duration,
    /// Flow table entries (established connections).
    pub flow_table_size: u32,
    /// Half-open table entries (connections whose handshake is not complete:
    /// what a SYN flood fills, apart from the flow table).
    pub half_open_table_size: u32,
    pub xdp_mode: XdpModeSetting,
    /// The ingress hook: XDP (with `xdp_mode`) or TC.
    pub ingress: IngressHook,
    /// Pin maps and links here (a directory in bpffs) so a restart, even
    /// kill -9, loses nothing. None: everything goes with the process.
    pub pin_path: Option<PathBuf>,
    /// With `pin_path`: remove the pins at exit (detach everything).
    pub detach_on_exit: bool,
    /// Where the agent sits: `server`, `tap` (a mirror port), or `router`.
    pub mode: AgentMode,
    /// Tap and router modes: the servers' addresses or prefixes; empty: any
    /// address with a tracked port is a server.
    pub servers: Vec<ServerPrefix>,
    /// Remote ports of upstream legs: on a reverse proxy's host, its
    /// connections to Exchange (this host the client), e.g. 443. Followed
    /// with the same state machine, roles swapped; the proxy's own timeout
    /// shows there. Server and router modes.
    pub upstream_ports: Vec<u16>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            interfaces: Vec::new(),
            ports: vec![443],
            plaintext_ports: Vec::new(),
            gap_threshold: Duration::from_secs(5),
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            half_open_table_size: DEFAULT_HALF_OPEN_TABLE_SIZE,
            xdp_mode: XdpModeSetting::Auto,
            ingress: IngressHook::Xdp,
            pin_path: None,
            detach_on_exit: false,
            mode: AgentMode::Server,
            servers: Vec::new(),
            upstream_ports: Vec::new(),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address for /metrics; "off" is not an address: use `enabled = false`.
    pub listen: SocketAddr,
    pub enabled: bool,
    /// Paths that get their own `path` label (the most killing ones); the rest are "other".
    pub top_paths: usize,
    /// Expose client addresses (top killed clients) as labels. Off by default.
    pub client_addresses: bool,
    /// A Prometheus-style web configuration (exporter-toolkit's web.yml):
    /// TLS and basic auth for /metrics.
    pub web_config_file: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
            enabled: true,
            top_paths: 20,
            client_addresses: false,
            web_config_file: None,
        }
    }
}

/// `[query]`: the local socket the CLI talks to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    pub socket: PathBuf,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub agent: AgentConfig,
    pub detector: DetectorConfig,
    pub metrics: MetricsConfig,
    pub query: QueryConfig,
    pub remedy: crate::remedy::RemedyConfig,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error(
        "agent.interfaces: no interface given: name the interface(s) facing the clients (--iface)"
    )]
    NoInterface,
    #[error("agent.interfaces: {name:?} is not a valid Linux interface name (1..15 bytes, no '/', no whitespace)")]
    BadInterfaceName { name: String },
    #[error("agent.ports: at least one port is needed")]
    NoPort,
    #[error("agent.ports: at most {max} ports can be tracked, {given} given")]
    TooManyPorts { given: usize, max: usize },
    #[error("agent.ports: port 0 cannot be tracked")]
    PortZero,
    #[error("agent.ports: port {port} is listed twice")]
    DuplicatePort { port: u16 },
    #[error(
        "agent.plaintext_ports: port {port} is not one of agent.ports or agent.upstream_ports"
    )]
    PlaintextNotTracked { port: u16 },
    #[error("agent.gap_threshold_seconds: must be between 0.05 and 3600, got {got:?}")]
    GapThreshold { got: Duration },
    #[error("agent.flow_table_size: must be between 1 and {max}, got {got}")]
    FlowTableSize { got: u32, max: u32 },
    #[error("agent.half_open_table_size: must be between 1 and {max}, got {got}")]
    HalfOpenTableSize { got: u32, max: u32 },
    #[error("agent.servers: only tap and router modes (agent.mode = \"tap\" or \"router\") tell servers by address")]
    ServersWithoutTap,
    #[error("agent.servers: at most {max} addresses or prefixes, {given} given")]
    TooManyServers { given: usize, max: u32 },
    #[error(
        "agent.upstream_ports: a mirror port (tap mode) has no host of its own to be a client"
    )]
    UpstreamInTap,
    #[error("agent.upstream_ports: port 0 cannot be tracked")]
    UpstreamPortZero,
    #[error("metrics.top_paths: must be between 1 and 1000, got {0}")]
    TopPaths(usize),
    #[error("detector.{0}")]
    Detector(#[from] DetectorConfigError),
    #[error("remedy.{0}")]
    Remedy(#[from] crate::remedy::RemedyConfigError),
    #[error("remedy.keepalive and remedy.sound: only an agent on the connections' endpoint (agent.mode = \"server\": the ActiveSync server or its reverse proxy) owns the sockets to give keepalive")]
    RemedyNotOnEndpoint,
    #[error("remedy.deny: {net} is narrower than a path (/{path_prefix}, detector.ipv4_prefix or ipv6_prefix): the remedy applies to whole paths, so deny the path's prefix")]
    RemedyDenyNarrow { net: String, path_prefix: u8 },
    #[error("reading the configuration file {path}: {message}")]
    File { path: String, message: String },
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(ConfigError::NoInterface);
        }
        if !self.servers.is_empty() && !self.mode.by_port() {
            return Err(ConfigError::ServersWithoutTap);
        }
        if self.servers.len() > MAX_SERVER_PREFIXES as usize {
            return Err(ConfigError::TooManyServers {
                given: self.servers.len(),
                max: MAX_SERVER_PREFIXES,
            });
        }
        for name in &self.interfaces {
            let bad = name.is_empty()
                || name.len() > 15
                || name.contains('/')
                || name.chars().any(|c| c.is_whitespace() || c == '\0');
            if bad {
                return Err(ConfigError::BadInterfaceName { name: name.clone() });
            }
        }
        if self.ports.is_empty() {
            return Err(ConfigError::NoPort);
        }
        if !self.upstream_ports.is_empty() && self.mode == AgentMode::Tap {
            return Err(ConfigError::UpstreamInTap);
        }
        if self.upstream_ports.contains(&0) {
            return Err(ConfigError::UpstreamPortZero);
        }
        let tracked = self.tracked_ports().len();
        if tracked > MAX_PORTS {
            return Err(ConfigError::TooManyPorts {
                given: tracked,
                max: MAX_PORTS,
            });
        }
        for (i, &port) in self.ports.iter().enumerate() {
            if port == 0 {
                return Err(ConfigError::PortZero);
            }
            if self.ports[..i].contains(&port) {
                return Err(ConfigError::DuplicatePort { port });
            }
        }
        let tracked = self.tracked_ports();
        if let Some(&port) = self.plaintext_ports.iter().find(|p| !tracked.contains(p)) {
            return Err(ConfigError::PlaintextNotTracked { port });
        }
        // Above a few ticks of the coarse packet clock (4 ms at HZ=250,
        // 10 ms at HZ=100): a shorter silence is not measured, it is rounded.
        if self.gap_threshold < Duration::from_millis(50)
            || self.gap_threshold > Duration::from_secs(3600)
        {
            return Err(ConfigError::GapThreshold {
                got: self.gap_threshold,
            });
        }
        if self.flow_table_size == 0 || self.flow_table_size > MAX_FLOW_TABLE_SIZE {
            return Err(ConfigError::FlowTableSize {
                got: self.flow_table_size,
                max: MAX_FLOW_TABLE_SIZE,
            });
        }
        if self.half_open_table_size == 0 || self.half_open_table_size > MAX_FLOW_TABLE_SIZE {
            return Err(ConfigError::HalfOpenTableSize {
                got: self.half_open_table_size,
                max: MAX_FLOW_TABLE_SIZE,
            });
        }
        Ok(())
    }

    /// The ports the kernel tracks: the local ones, then the upstream ones.
    pub fn tracked_ports(&self) -> Vec<u16> {
        let mut ports = self.ports.clone();
        for p in &self.upstream_ports {
            if !ports.contains(p) {
                ports.push(*p);
            }
        }
        ports
    }

    /// Direction from the ports, not the hook: away from the server (tap,
    /// router), or with upstream legs (this host is then a client too:
    /// its own packets to an upstream port go out on egress).
    pub fn by_port(&self) -> bool {
        self.mode.by_port() || !self.upstream_ports.is_empty()
    }

    /// The settings the kernel programs read.
    pub fn kernel_config(&self) -> Config {
        let mut c = kernel_config(
            &self.tracked_ports(),
            &self.plaintext_ports,
            self.gap_threshold,
        );
        c.server_filter = u32::from(!self.servers.is_empty());
        c
    }
}

/// What the kernel programs are told (the agent's, and offline replay's).
pub fn kernel_config(ports: &[u16], plaintext_ports: &[u16], gap_threshold: Duration) -> Config {
    let mut c = Config::DEFAULT;
    c.ports = [0; MAX_PORTS];
    for (slot, &port) in c.ports.iter_mut().zip(ports) {
        *slot = port;
    }
    c.port_count = ports.len().min(MAX_PORTS) as u32;
    c.plaintext_mask = 0;
    for (i, port) in ports.iter().take(MAX_PORTS).enumerate() {
        if plaintext_ports.contains(port) {
            c.plaintext_mask |= 1 << i;
        }
    }
    c.gap_threshold_ns = gap_threshold.as_nanos().min(u64::MAX as u128) as u64;
    c
}

impl FileConfig {
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.agent.validate()?;
        self.detector.validate()?;
        self.remedy.validate()?;
        if self.remedy.runs() && self.agent.mode != crate::placement::AgentMode::Server {
            return Err(ConfigError::RemedyNotOnEndpoint);
        }
        for net in &self.remedy.deny {
            let path_prefix = match net {
                ipnet::IpNet::V4(_) => self.detector.ipv4_prefix,
                ipnet::IpNet::V6(_) => self.detector.ipv6_prefix,
            };
            if net.prefix_len() > path_prefix {
                return Err(ConfigError::RemedyDenyNarrow {
                    net: net.to_string(),
                    path_prefix,
                });
            }
        }
        if self.metrics.top_paths == 0 || self.metrics.top_paths > 1000 {
            return Err(ConfigError::TopPaths(self.metrics.top_paths));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AgentConfig {
        AgentConfig {
            interfaces: vec!["eth0".into()],
            ..AgentConfig::default()
        }
    }

    #[test]
    fn defaults_with_an_interface_are_valid() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn bad_values_are_rejected_naming_the_setting() {
        let cases: Vec<(AgentConfig, &str)> = vec![
            (AgentConfig::default(), "agent.interfaces"),
            (
                AgentConfig {
                    interfaces: vec!["a-very-long-interface-name".into()],
                    ..valid()
                },
                "agent.interfaces",
            ),
            (
                AgentConfig {
                    ports: vec![],
                    ..valid()
                },
                "agent.ports",
            ),
            (
                AgentConfig {
                    ports: (1..=9).collect(),
                    ..valid()
                },
                "at most 8",
            ),
            (
                AgentConfig {
                    ports: vec![443, 443],
                    ..valid()
                },
                "twice",
            ),
            (
                AgentConfig {
                    ports: vec![0],
                    ..valid()
                },
                "port 0",
            ),
            (
                AgentConfig {
                    gap_threshold: Duration::ZERO,
                    ..valid()
                },
                "agent.gap_threshold_seconds",
            ),
            (
                AgentConfig {
                    flow_table_size: 0,
                    ..valid()
                },
                "agent.flow_table_size",
            ),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().expect_err("must be rejected").to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn kernel_config_carries_ports_and_threshold() {
        let cfg = AgentConfig {
            ports: vec![443, 8443],
            gap_threshold: Duration::from_millis(1500),
            ..valid()
        };
        let k = cfg.kernel_config();
        assert_eq!(k.port_count, 2);
        assert_eq!(&k.ports[..3], &[443, 8443, 0]);
        assert_eq!(k.gap_threshold_ns, 1_500_000_000);
        assert!(k.tracks(8443) && !k.tracks(80));
    }

    #[test]
    fn tap_mode_takes_server_prefixes_and_server_mode_refuses_them() {
        let f = FileConfig::parse(
            "[agent]\ninterfaces = [\"span0\"]\nmode = \"tap\"\nservers = [\"192.0.2.1\", \"2001:db8::/64\"]\n",
            "test",
        )
        .expect("a tap configuration");
        assert_eq!(f.agent.mode, AgentMode::Tap);
        assert_eq!(f.agent.servers.len(), 2);
        assert_eq!(f.agent.kernel_config().server_filter, 1);
        let server = AgentConfig {
            servers: f.agent.servers.clone(),
            ..valid()
        };
        assert_eq!(server.validate(), Err(ConfigError::ServersWithoutTap));
        let bad = FileConfig::parse(
            "[agent]\ninterfaces = [\"span0\"]\nmode = \"tap\"\nservers = [\"192.0.2.0/40\"]\n",
            "test",
        );
        assert!(bad.unwrap_err().to_string().contains("prefix length"));
    }

    #[test]
    fn upstream_ports_are_tracked_beside_the_local_ones_and_need_a_host() {
        let f = FileConfig::parse(
            "[agent]\ninterfaces = [\"eth0\"]\nports = [443]\nupstream_ports = [443, 8443]\n",
            "test",
        )
        .expect("a proxy host's configuration");
        f.validate().expect("valid");
        assert!(
            f.agent.by_port(),
            "its own packets to Exchange go out on egress"
        );
        assert_eq!(f.agent.tracked_ports(), [443, 8443]);
        let k = f.agent.kernel_config();
        assert_eq!((k.port_count, &k.ports[..2]), (2, &[443, 8443][..]));
        // A plain-HTTP upstream port: its Pings are read on the legs.
        let plain = AgentConfig {
            plaintext_ports: vec![8443],
            ..f.agent.clone()
        };
        assert_eq!(plain.validate(), Ok(()));
        let tap = AgentConfig {
            mode: AgentMode::Tap,
            ..f.agent.clone()
        };
        assert_eq!(tap.validate(), Err(ConfigError::UpstreamInTap));
        let many = AgentConfig {
            ports: (1..=6).collect(),
            upstream_ports: vec![7, 8, 9],
            ..valid()
        };
        assert_eq!(
            many.validate(),
            Err(ConfigError::TooManyPorts { given: 9, max: 8 })
        );
    }

    #[test]
    fn a_full_file_parses() {
        let f = FileConfig::parse(
            r#"
[agent]
interfaces = ["eth0"]
ports = [443, 8443]
gap_threshold_seconds = 2.5
xdp_mode = "skb"
[detector]
min_heartbeat = 30
max_heartbeat = 1800
[metrics]
listen = "127.0.0.1:19443"
top_paths = 5
[query]
socket = "/tmp/m.sock"
"#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(f.agent.gap_threshold, Duration::from_millis(2500));
        assert_eq!(f.agent.xdp_mode, XdpModeSetting::Skb);
        assert_eq!(f.detector.max_heartbeat, Duration::from_secs(1800));
        assert_eq!(f.metrics.top_paths, 5);
        assert_eq!(f.validate(), Ok(()));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        for (text, needle) in [
            ("[agent]\ninterface = [\"eth0\"]\n", "interface"),
            ("[agent]\nports = [70000]\n", "ports"),
            ("[detector]\nmax_heartbeat = \"long\"\n", "max_heartbeat"),
            ("[metrics]\nlisten = \"nowhere\"\n", "listen"),
            ("[nonsense]\n", "nonsense"),
        ] {
            let e = FileConfig::parse(text, "t.toml").unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let f = FileConfig::parse(
            "[agent]\ninterfaces=[\"eth0\"]\n[detector]\nmax_heartbeat = 4000\n",
            "t",
        )
        .unwrap();
        assert!(f
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("detector.max_heartbeat"));
    }
}
