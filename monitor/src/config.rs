//! What the agent is told to do, validated before anything touches the kernel.

use std::time::Duration;

use monitor_common::{Config, DEFAULT_FLOW_TABLE_SIZE, MAX_PORTS};

/// Largest flow table we accept: 16 Mi entries (~2.5 GiB of kernel memory).
pub const MAX_FLOW_TABLE_SIZE: u32 = 1 << 24;

/// How to attach XDP. Our own enum so the configuration does not leak aya types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeSetting {
    /// Native (driver) mode if the driver supports it, else generic.
    #[default]
    Auto,
    /// Driver mode only; fail if unsupported.
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Skb,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// Interfaces facing the clients: XDP on ingress, TC on egress.
    pub interfaces: Vec<String>,
    /// Local (server) TCP ports to track.
    pub ports: Vec<u16>,
    /// Silence after which the next packet is reported as ending an idle gap.
    pub gap_threshold: Duration,
    /// Flow table entries.
    pub flow_table_size: u32,
    pub xdp_mode: XdpModeSetting,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            interfaces: Vec::new(),
            ports: vec![443],
            gap_threshold: Duration::from_secs(5),
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            xdp_mode: XdpModeSetting::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("no interface given: name the interface(s) facing the clients with --iface")]
    NoInterface,
    #[error("interface name {name:?} is not a valid Linux interface name (1..15 bytes, no '/', no whitespace)")]
    BadInterfaceName { name: String },
    #[error("ports: at least one port is needed")]
    NoPort,
    #[error("ports: at most {max} ports can be tracked, {given} given")]
    TooManyPorts { given: usize, max: usize },
    #[error("ports: port 0 cannot be tracked")]
    PortZero,
    #[error("ports: port {port} is listed twice")]
    DuplicatePort { port: u16 },
    #[error("gap_threshold: must be between 1 ms and 1 hour, got {got:?}")]
    GapThreshold { got: Duration },
    #[error("flow_table_size: must be between 1 and {max}, got {got}")]
    FlowTableSize { got: u32, max: u32 },
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(ConfigError::NoInterface);
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
        if self.ports.len() > MAX_PORTS {
            return Err(ConfigError::TooManyPorts {
                given: self.ports.len(),
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
        if self.gap_threshold < Duration::from_millis(1)
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
        Ok(())
    }

    /// The settings the kernel programs read.
    pub fn kernel_config(&self) -> Config {
        let mut c = Config::DEFAULT;
        c.ports = [0; MAX_PORTS];
        for (slot, &port) in c.ports.iter_mut().zip(&self.ports) {
            *slot = port;
        }
        c.port_count = self.ports.len().min(MAX_PORTS) as u32;
        c.gap_threshold_ns = self.gap_threshold.as_nanos().min(u64::MAX as u128) as u64;
        c
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
            (AgentConfig::default(), "--iface"),
            (
                AgentConfig {
                    interfaces: vec!["a-very-long-interface-name".into()],
                    ..valid()
                },
                "interface name",
            ),
            (
                AgentConfig {
                    ports: vec![],
                    ..valid()
                },
                "ports",
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
                "gap_threshold",
            ),
            (
                AgentConfig {
                    flow_table_size: 0,
                    ..valid()
                },
                "flow_table_size",
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
}
