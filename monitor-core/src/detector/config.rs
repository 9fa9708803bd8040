//! Detector settings, validated like Exchange validates its own, except that
//! an out-of-range value is an error here, not a silent fallback.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exchange's upper bound for MaxHeartbeatInterval.
pub const EXCHANGE_MAX_HEARTBEAT: Duration = Duration::from_secs(3540);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Exchange MinHeartbeatInterval (seconds): shortest heartbeat a device may ask for.
    #[serde(with = "secs")]
    pub min_heartbeat: Duration,
    /// Exchange MaxHeartbeatInterval (seconds): longest heartbeat the server allows.
    #[serde(with = "secs")]
    pub max_heartbeat: Duration,
    /// HbiSampleSize: heartbeat samples in the 3033/1040-style window.
    pub hbi_sample_size: usize,
    /// HbiAlertThreshold (seconds): alert when the full window's mean is at or below it.
    #[serde(with = "secs")]
    pub hbi_alert_threshold: Duration,
    /// How far (hops) an RST's TTL may be from the client's baseline and still be the client's.
    pub ttl_tolerance: u8,
    /// An RST this soon after the server's first send following a silence is
    /// "reset on the next packet" (a few round trips).
    #[serde(with = "secs")]
    pub next_packet_window: Duration,
    /// A server retransmission unanswered this long is a black hole.
    #[serde(with = "secs")]
    pub black_hole_after: Duration,
    /// A client reconnecting this soon after a kill is churn.
    #[serde(with = "secs")]
    pub churn_window: Duration,
    /// Shortest silence that counts as "after a silence" (the kernel's gap threshold).
    #[serde(with = "secs")]
    pub min_silence: Duration,
    /// Client network prefix that makes a path, IPv4.
    pub ipv4_prefix: u8,
    /// Client network prefix that makes a path, IPv6.
    pub ipv6_prefix: u8,
    /// Paths kept; the least recently seen is evicted (and counted) beyond this.
    pub max_paths: usize,
    /// Flows followed at once (beyond this the oldest is dropped and counted).
    pub max_flows: usize,
    /// A path's estimate names a known middlebox within this relative distance.
    pub device_match_tolerance: f64,
    /// The report's keepalive cure never idles less than this (seconds).
    /// Not a `[detector]` key: `[remedy] floor_seconds` sets it, so the
    /// cure the report prints and the one the agent applies agree.
    #[serde(skip)]
    pub keepalive_floor_seconds: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            min_heartbeat: Duration::from_secs(60),
            max_heartbeat: EXCHANGE_MAX_HEARTBEAT,
            hbi_sample_size: 200,
            hbi_alert_threshold: Duration::from_secs(540),
            ttl_tolerance: 2,
            next_packet_window: Duration::from_secs(1),
            black_hole_after: Duration::from_secs(60),
            churn_window: Duration::from_secs(120),
            min_silence: Duration::from_secs(5),
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            max_paths: 4096,
            max_flows: 1 << 20,
            device_match_tolerance: 0.05,
            keepalive_floor_seconds: super::keepalive::FLOOR_SECONDS,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DetectorConfigError {
    #[error("min_heartbeat: must be between 1 s and max_heartbeat ({max:?}), got {got:?}")]
    MinHeartbeat { got: Duration, max: Duration },
    #[error("max_heartbeat: must be between min_heartbeat ({min:?}) and 3540 s, got {got:?}")]
    MaxHeartbeat { got: Duration, min: Duration },
    #[error("hbi_sample_size: must be between 1 and 100000, got {0}")]
    SampleSize(usize),
    #[error("hbi_alert_threshold: must be between 1 s and 3540 s, got {0:?}")]
    AlertThreshold(Duration),
    #[error("ipv4_prefix: must be between 8 and 32, got {0}")]
    Ipv4Prefix(u8),
    #[error("ipv6_prefix: must be between 16 and 128, got {0}")]
    Ipv6Prefix(u8),
    #[error("{key}: must be greater than zero")]
    Zero { key: &'static str },
    #[error("device_match_tolerance: must be between 0 and 0.5, got {0}")]
    MatchTolerance(f64),
}

impl DetectorConfig {
    pub fn validate(&self) -> Result<(), DetectorConfigError> {
        use DetectorConfigError as E;
        if self.max_heartbeat < Duration::from_secs(1)
            || self.max_heartbeat > EXCHANGE_MAX_HEARTBEAT
        {
            return Err(E::MaxHeartbeat {
                got: self.max_heartbeat,
                min: self.min_heartbeat,
            });
        }
        if self.min_heartbeat < Duration::from_secs(1) || self.min_heartbeat > self.max_heartbeat {
            return Err(E::MinHeartbeat {
                got: self.min_heartbeat,
                max: self.max_heartbeat,
            });
        }
        if self.hbi_sample_size == 0 || self.hbi_sample_size > 100_000 {
            return Err(E::SampleSize(self.hbi_sample_size));
        }
        if self.hbi_alert_threshold < Duration::from_secs(1)
            || self.hbi_alert_threshold > EXCHANGE_MAX_HEARTBEAT
        {
            return Err(E::AlertThreshold(self.hbi_alert_threshold));
        }
        if !(8..=32).contains(&self.ipv4_prefix) {
            return Err(E::Ipv4Prefix(self.ipv4_prefix));
        }
        if !(16..=128).contains(&self.ipv6_prefix) {
            return Err(E::Ipv6Prefix(self.ipv6_prefix));
        }
        for (key, zero) in [
            ("next_packet_window", self.next_packet_window.is_zero()),
            ("black_hole_after", self.black_hole_after.is_zero()),
            ("churn_window", self.churn_window.is_zero()),
            ("min_silence", self.min_silence.is_zero()),
            ("max_paths", self.max_paths == 0),
            ("max_flows", self.max_flows == 0),
        ] {
            if zero {
                return Err(E::Zero { key });
            }
        }
        if !(0.0..=0.5).contains(&self.device_match_tolerance) {
            return Err(E::MatchTolerance(self.device_match_tolerance));
        }
        Ok(())
    }
}

/// Durations as (fractional) seconds in configuration files.
pub mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v)
            .map_err(|_| serde::de::Error::custom(format!("{v} is not a valid number of seconds")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_exchanges_and_valid() {
        let c = DetectorConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.min_heartbeat, Duration::from_secs(60));
        assert_eq!(c.max_heartbeat, Duration::from_secs(3540));
        assert_eq!(c.hbi_sample_size, 200);
        assert_eq!(c.hbi_alert_threshold, Duration::from_secs(540));
    }

    #[test]
    fn heartbeat_bounds_out_of_range_are_errors_not_defaults() {
        let s = Duration::from_secs;
        for (min, max, needle) in [
            (s(0), s(3540), "min_heartbeat"),
            (s(600), s(300), "min_heartbeat"),
            (s(60), s(3541), "max_heartbeat"),
            (s(60), s(0), "max_heartbeat"),
        ] {
            let c = DetectorConfig {
                min_heartbeat: min,
                max_heartbeat: max,
                ..DetectorConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(needle), "{e}");
        }
        let edge = DetectorConfig {
            min_heartbeat: s(3540),
            max_heartbeat: s(3540),
            ..DetectorConfig::default()
        };
        assert_eq!(edge.validate(), Ok(()));
    }
}
