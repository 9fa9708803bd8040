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
    pub devices: Vec<DeviceGroup>,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// How long devices run.
    pub duration_seconds: u64,
    /// Chance that new mail ends a Ping early (Status 2).
    #[serde(default)]
    pub mail_probability: f64,
    /// How long past its heartbeat a device waits before giving up.
    #[serde(default = "grace")]
    pub device_grace_seconds: u64,
    /// Detector settings for the agent, scaled to the lab ([detector] keys).
    #[serde(default)]
    pub detector: monitor_core::detector::DetectorConfig,
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
            if p.middlebox != Middlebox::Control && p.timeout_seconds == 0 {
                bail!(
                    "path {:?}: timeout_seconds is needed for {:?}",
                    p.name,
                    p.middlebox
                );
            }
            let n: u32 = p.devices.iter().map(|d| d.count).sum();
            if n == 0 || n > 200 {
                bail!("path {:?}: 1 to 200 devices, got {n}", p.name);
            }
            if p.middlebox == Middlebox::Injector && p.devices.iter().any(|d| d.ipv6) {
                bail!("path {:?}: the injector is IPv4 only", p.name);
            }
        }
        if !(0.0..=1.0).contains(&self.mail_probability) {
            bail!("mail_probability must be between 0 and 1");
        }
        Ok(())
    }
}
