//! A lab scenario, described in one small TOML file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::device::Profile;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Middlebox {
    /// A plain router: no short timeout.
    Control,
    /// conntrack forgets after `timeout_seconds`; the next packet is answered
    /// with an RST (AWS NAT gateway-like).
    ConntrackReset,
    /// conntrack forgets after `timeout_seconds`; later packets are dropped
    /// (Azure-like black hole).
    ConntrackDrop,
    /// Resets both ends after `timeout_seconds` of silence (F5 FastL4-like).
    Injector,
    /// HAProxy in TCP mode with idle timeouts of `timeout_seconds`.
    Proxy,
    /// A reverse proxy's host: nginx terminating the devices' TLS and
    /// proxying to the server over HTTPS (IPv6), `proxy_read_timeout` of
    /// `timeout_seconds` (nginx's default is 60).
    Nginx,
    /// A reverse proxy's host: HAProxy in HTTP mode terminating the
    /// devices' TLS, plain HTTP to the server's plaintext port (IPv6),
    /// `timeout server` of `timeout_seconds`.
    HaproxyHttp,
}

impl Middlebox {
    /// Devices connect to the router itself (a proxy), not through it.
    pub fn terminates(self) -> bool {
        matches!(
            self,
            Middlebox::Proxy | Middlebox::Nginx | Middlebox::HaproxyHttp
        )
    }

    /// A reverse proxy's host, where an agent follows the upstream legs.
    pub fn is_proxy_host(self) -> bool {
        matches!(self, Middlebox::Nginx | Middlebox::HaproxyHttp)
    }
}

/// (Not strict about unknown keys: serde cannot be, with a flattened profile.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceGroup {
    #[serde(flatten)]
    pub profile: Profile,
    #[serde(default = "one")]
    pub count: u32,
    /// Use the path's IPv6 addresses.
    #[serde(default)]
    pub ipv6: bool,
    /// Name the command in the base64 query form (ActiveSync 12.1+).
    #[serde(default)]
    pub base64_query: bool,
    /// Initial TTL / hop limit; [`super::DEVICE_TTL`] (a device ~15 hops
    /// away) unless set. 65 or 66 puts the devices one or two hops behind
    /// their router: their packets reach the server with about the TTL of
    /// the router's own RSTs (64).
    #[serde(default)]
    pub ttl: Option<u32>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    pub name: String,
    pub middlebox: Middlebox,
    #[serde(default)]
    pub timeout_seconds: u32,
    /// Devices reach the endpoint's plaintext port, as the server sees
    /// traffic behind a TLS-terminating load balancer.
    #[serde(default)]
    pub plaintext: bool,
    /// Chance that new mail ends a Ping early on this path, instead of the
    /// scenario's.
    #[serde(default)]
    pub mail_probability: Option<f64>,
    /// The router source-NATs its clients (IPv4) to one address with a
    /// random port for each new connection, as a carrier-grade NAT does:
    /// a device that reconnects comes from a new port.
    #[serde(default)]
    pub nat_random_ports: bool,
    pub devices: Vec<DeviceGroup>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// How long devices run.
    pub duration_seconds: u64,
    /// Chance that new mail ends a Ping early (Status 2), where a path does
    /// not set its own.
    #[serde(default)]
    pub mail_probability: f64,
    /// How long past its heartbeat a device waits before giving up.
    #[serde(default = "grace")]
    pub device_grace_seconds: u64,
    /// Detector settings for the agent, scaled to the lab ([detector] keys).
    #[serde(default)]
    pub detector: monitor_core::detector::DetectorConfig,
    /// The server agent's [remedy] settings (the cure; off unless set).
    #[serde(default)]
    pub remedy: monitor_core::remedy::RemedyConfig,
    #[serde(rename = "path")]
    pub paths: Vec<PathSpec>,
}

fn grace() -> u64 {
    5
}

impl Scenario {
    pub fn parse(text: &str, origin: &str) -> Result<Scenario> {
        let s: Scenario =
            toml::from_str(text).with_context(|| format!("parsing the scenario {origin}"))?;
        s.validate().with_context(|| format!("scenario {origin}"))?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Scenario::parse(&text, &path.display().to_string())
    }

    pub fn validate(&self) -> Result<()> {
        if self.paths.is_empty() || self.paths.len() > 32 {
            bail!("1 to 32 paths, got {}", self.paths.len());
        }
        for p in &self.paths {
            p.validate().with_context(|| format!("path {:?}", p.name))?;
        }
        if !(0.0..=1.0).contains(&self.mail_probability) {
            bail!("mail_probability must be between 0 and 1");
        }
        Ok(())
    }

    /// The chance of new mail during a Ping on path `index` (from 1, as
    /// the topology numbers paths).
    pub fn mail_probability_of(&self, index: usize) -> f64 {
        index
            .checked_sub(1)
            .and_then(|i| self.paths.get(i))
            .and_then(|p| p.mail_probability)
            .unwrap_or(self.mail_probability)
    }
}

impl PathSpec {
    /// The server port this path's devices reach.
    pub fn port(&self) -> u16 {
        if self.plaintext {
            super::PLAINTEXT_PORT
        } else {
            super::SERVER_PORT
        }
    }

    fn validate(&self) -> Result<()> {
        if self.middlebox != Middlebox::Control && self.timeout_seconds == 0 {
            bail!("timeout_seconds is needed for {:?}", self.middlebox);
        }
        let n: u32 = self.devices.iter().map(|d| d.count).sum();
        if n == 0 || n > 200 {
            bail!("1 to 200 devices, got {n}");
        }
        let ipv6 = self.devices.iter().any(|d| d.ipv6);
        if self.middlebox == Middlebox::Injector && ipv6 {
            bail!("the injector is IPv4 only");
        }
        if self.middlebox.is_proxy_host() && self.plaintext {
            bail!("the proxy host terminates the devices' TLS: no plaintext");
        }
        if self.nat_random_ports {
            // The injector and the proxies see the clients' own addresses.
            if self.middlebox == Middlebox::Injector || self.middlebox.terminates() {
                bail!("nat_random_ports goes with a conntrack or control router");
            }
            if ipv6 {
                bail!("nat_random_ports is IPv4 only");
            }
        }
        if let Some(ttl) = self
            .devices
            .iter()
            .filter_map(|d| d.ttl)
            .find(|t| !(1..=255).contains(t))
        {
            bail!("ttl must be between 1 and 255, got {ttl}");
        }
        if self
            .mail_probability
            .is_some_and(|m| !(0.0..=1.0).contains(&m))
        {
            bail!("mail_probability must be between 0 and 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: [(&str, &str); 4] = [
        ("demo.toml", include_str!("../../scenarios/demo.toml")),
        ("soak.toml", include_str!("../../scenarios/soak.toml")),
        ("cure.toml", include_str!("../../scenarios/cure.toml")),
        ("sound.toml", include_str!("../../scenarios/sound.toml")),
    ];

    fn one_path(path: &str) -> Result<Scenario> {
        Scenario::parse(
            &format!("duration_seconds = 10\nmail_probability = 0.1\n[[path]]\n{path}"),
            "test",
        )
    }

    #[test]
    fn shipped_scenarios_parse_and_validate() {
        for (name, text) in SHIPPED {
            Scenario::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn a_paths_mail_probability_overrides_the_scenarios() {
        let s = one_path(
            "name = \"p\"\nmiddlebox = \"control\"\nmail_probability = 0.4\n\
             devices = [{ profile = \"fixed\", heartbeat = 40, ttl = 65 }]",
        )
        .expect("valid");
        assert_eq!(s.mail_probability_of(1), 0.4);
        // Connections from no known path get the scenario's.
        assert_eq!(s.mail_probability_of(0), 0.1);
        assert_eq!(s.mail_probability_of(2), 0.1);
        assert_eq!(s.paths[0].devices[0].ttl, Some(65));
    }

    #[test]
    fn a_nat_with_random_ports_is_refused_where_it_cannot_apply() {
        let injector = one_path(
            "name = \"p\"\nmiddlebox = \"injector\"\ntimeout_seconds = 5\nnat_random_ports = true\n\
             devices = [{ profile = \"fixed\", heartbeat = 40 }]",
        );
        assert!(injector.is_err());
        let ipv6 = one_path(
            "name = \"p\"\nmiddlebox = \"conntrack-reset\"\ntimeout_seconds = 5\nnat_random_ports = true\n\
             devices = [{ profile = \"fixed\", heartbeat = 40, ipv6 = true }]",
        );
        assert!(ipv6.is_err());
    }

    #[test]
    fn a_device_ttl_out_of_range_is_refused() {
        let s = one_path(
            "name = \"p\"\nmiddlebox = \"control\"\n\
             devices = [{ profile = \"fixed\", heartbeat = 40, ttl = 300 }]",
        );
        assert!(s.is_err());
    }
}
