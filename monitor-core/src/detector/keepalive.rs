//! Where the box on a path cannot be changed (a carrier's NAT, another
//! team's load balancer), TCP keepalive from this host's end of each
//! connection keeps its state: a packet crosses it before its timer runs
//! out, and the device keeps its long heartbeat. This is the choice of
//! settings from the diagnosis: the report prints them for the operator
//! to set, and with `[remedy] keepalive` the agent applies them itself
//! (`crate::remedy`).

use serde::{Deserialize, Serialize};

use super::{Ending, Estimate};

/// TCP keepalive settings for the sockets on a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keepalive {
    /// TCP_KEEPIDLE: silence before the first probe.
    pub idle_seconds: u32,
    /// TCP_KEEPINTVL: between unanswered probes.
    pub interval_seconds: u32,
    /// TCP_KEEPCNT: unanswered probes that end the connection (a dead
    /// client is found within idle + interval x count).
    pub count: u32,
}

/// Never idle less than this: a probe every few seconds on every
/// connection is a cost of its own, and a box that forgets that fast is
/// better fixed than fed.
pub const FLOOR_SECONDS: f64 = 30.0;

/// Probes a dead client gets before its connection is reset.
const PROBES: u32 = 4;

/// Kills that a packet before the box's timer prevents: the box forgets an
/// idle flow (silently, or resetting the next packet or both ends at
/// expiry). Not a proxy's timeout: a TCP-terminating proxy answers the
/// probes itself and still times out the request.
pub fn remediable(how: Ending) -> bool {
    matches!(
        how,
        Ending::BlackHole | Ending::ResetOnNextPacket | Ending::InjectedReset
    )
}

/// A timeout the box certainly has not reached: the point, or the
/// bracket's low end (the longest silence that survived). None for a
/// bracket open below: no silence is known to be safe.
pub fn safe_timeout(e: &Estimate) -> Option<f64> {
    match e {
        Estimate::Point { seconds, .. } => Some(*seconds),
        Estimate::Bracket { low_seconds, .. } if *low_seconds > 0.0 => Some(*low_seconds),
        Estimate::Bracket { .. } => None,
        // Sounded to within a second: still only its low end is known safe.
        Estimate::Sounded { low_seconds, .. } => Some(*low_seconds),
    }
}

/// Keepalive for a box that forgets after `timeout_s`: idle safely under
/// it (by 10 %, at least 10 s); none where that falls under `floor_s`
/// (raising it to the floor would eat the margin).
pub fn keepalive_for(timeout_s: f64, floor_s: f64) -> Option<Keepalive> {
    let idle = (timeout_s - (timeout_s * 0.1).max(10.0)).floor();
    if !idle.is_finite() || idle < floor_s.max(1.0) {
        return None;
    }
    // A dead client found within about twice the idle time, probes at
    // least 5 s and at most 75 s (Linux's default interval) apart.
    // Linux's largest TCP_KEEPIDLE (MAX_TCP_KEEPIDLE): under it, still safe.
    let idle = idle.min(f64::from(monitor_common::remedy::MAX_KEEPIDLE));
    let interval = (idle / f64::from(PROBES)).clamp(5.0, 75.0).floor();
    Some(Keepalive {
        idle_seconds: idle as u32,
        interval_seconds: interval as u32,
        count: PROBES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_time_is_under_the_timeout_by_ten_percent_or_ten_seconds() {
        let k = keepalive_for(300.0, FLOOR_SECONDS).unwrap();
        assert_eq!((k.idle_seconds, k.interval_seconds, k.count), (270, 67, 4));
        let k = keepalive_for(60.0, FLOOR_SECONDS).unwrap();
        assert_eq!((k.idle_seconds, k.interval_seconds), (50, 12));
        // 3600 s: 10 % is 360 s; the interval stays at Linux's 75 s.
        let k = keepalive_for(3600.0, FLOOR_SECONDS).unwrap();
        assert_eq!((k.idle_seconds, k.interval_seconds), (3240, 75));
        // Twelve hours: Linux's largest idle time, 32767 s.
        assert_eq!(
            keepalive_for(43_200.0, FLOOR_SECONDS).unwrap().idle_seconds,
            32_767
        );
    }

    #[test]
    fn a_timeout_whose_safe_idle_falls_under_the_floor_gets_no_keepalive() {
        // 40 s: 30 s, at the floor. 35 s: 25 s, under it: none.
        assert_eq!(keepalive_for(40.0, FLOOR_SECONDS).unwrap().idle_seconds, 30);
        assert_eq!(keepalive_for(35.0, FLOOR_SECONDS), None);
        assert_eq!(keepalive_for(30.0, FLOOR_SECONDS), None);
        assert_eq!(keepalive_for(20.0, FLOOR_SECONDS), None);
        // A lower floor (the scaled lab's): 20 s gets 10 s.
        let k = keepalive_for(20.0, 5.0).unwrap();
        assert_eq!((k.idle_seconds, k.interval_seconds), (10, 5));
    }

    #[test]
    fn only_a_timeout_known_to_be_safe_is_used() {
        let point = Estimate::Point {
            seconds: 60.0,
            spread_seconds: 0.1,
            samples: 5,
        };
        assert_eq!(safe_timeout(&point), Some(60.0));
        let closed = Estimate::Bracket {
            low_seconds: 290.0,
            high_seconds: 310.0,
            samples: 3,
        };
        assert_eq!(safe_timeout(&closed), Some(290.0));
        let open = Estimate::Bracket {
            low_seconds: 0.0,
            high_seconds: 310.0,
            samples: 3,
        };
        assert_eq!(safe_timeout(&open), None);
    }

    #[test]
    fn a_proxy_timeout_is_not_cured_by_keepalives() {
        assert!(remediable(Ending::BlackHole));
        assert!(remediable(Ending::ResetOnNextPacket));
        assert!(remediable(Ending::InjectedReset));
        for e in [
            Ending::ProxyTimeout,
            Ending::LocalProxyTimeout,
            Ending::UpstreamTimeout,
            Ending::ClientFin,
            Ending::Vanished,
        ] {
            assert!(!remediable(e), "{e:?}");
        }
    }
}
