//! Exchange's event 3033 (2003 SP2) / 1040 (2007+) logic: a sliding window of
//! the last `HbiSampleSize` heartbeat samples; alert when the window is full
//! and its mean is at or below `HbiAlertThreshold`, at most once an hour.
//! Each sample remembers its path so the alert can name the culprits.

use std::collections::{HashMap, VecDeque};

use super::path::PathKey;

const ALERT_INTERVAL_NS: u64 = 3600 * 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    seconds: f64,
    path: PathKey,
    /// The sample came from a kill (the device got no answer).
    killed: bool,
}

#[derive(Debug)]
pub struct HbiWindow {
    size: usize,
    threshold: f64,
    samples: VecDeque<Sample>,
    sum: f64,
    last_alert_ns: Option<u64>,
    pub alerts_raised: u64,
}

/// An alert, with the paths whose kills pulled the mean down (most first).
#[derive(Clone, Debug, PartialEq)]
pub struct HbiAlert {
    pub mean_seconds: f64,
    pub samples: usize,
    pub culprits: Vec<(PathKey, usize)>,
}

impl std::fmt::Display for HbiAlert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .culprits
            .iter()
            .map(|(p, n)| format!("{p} ({n})"))
            .collect();
        write!(
            f,
            "heartbeat window alert (Exchange 3033/1040 logic): mean {:.0} s over {} samples; pulled down by {}",
            self.mean_seconds,
            self.samples,
            if names.is_empty() { "no single path".into() } else { names.join(", ") }
        )
    }
}

impl HbiWindow {
    pub fn new(size: usize, threshold_seconds: f64) -> Self {
        HbiWindow {
            size,
            threshold: threshold_seconds,
            samples: VecDeque::with_capacity(size),
            sum: 0.0,
            last_alert_ns: None,
            alerts_raised: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.samples.len() >= self.size
    }

    pub fn mean(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| self.sum / self.samples.len() as f64)
    }

    /// The alert condition, regardless of rate limiting.
    pub fn alerting(&self) -> bool {
        self.is_full() && self.mean().is_some_and(|m| m <= self.threshold)
    }

    pub fn culprits(&self) -> Vec<(PathKey, usize)> {
        let mut by_path: HashMap<PathKey, usize> = HashMap::new();
        for s in self.samples.iter().filter(|s| s.killed) {
            *by_path.entry(s.path).or_default() += 1;
        }
        let mut v: Vec<_> = by_path.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Add a sample at `now_ns`; returns an alert when one is due (at most hourly).
    pub fn push(
        &mut self,
        seconds: f64,
        path: PathKey,
        killed: bool,
        now_ns: u64,
    ) -> Option<HbiAlert> {
        if self.samples.len() >= self.size {
            if let Some(old) = self.samples.pop_front() {
                self.sum -= old.seconds;
            }
        }
        self.samples.push_back(Sample {
            seconds,
            path,
            killed,
        });
        self.sum += seconds;
        if !self.alerting() {
            return None;
        }
        if let Some(last) = self.last_alert_ns {
            if now_ns.saturating_sub(last) < ALERT_INTERVAL_NS {
                return None;
            }
        }
        self.last_alert_ns = Some(now_ns);
        self.alerts_raised += 1;
        Some(HbiAlert {
            mean_seconds: self.mean().unwrap_or(0.0),
            samples: self.samples.len(),
            culprits: self.culprits(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn path(n: u8) -> PathKey {
        PathKey::test(n)
    }

    #[test]
    fn no_alert_until_the_window_is_full() {
        let mut w = HbiWindow::new(3, 540.0);
        assert!(w.push(100.0, path(1), true, 0).is_none());
        assert!(w.push(100.0, path(1), true, S).is_none());
        let a = w.push(100.0, path(1), true, 2 * S).expect("full and low");
        assert_eq!(a.samples, 3);
        assert_eq!(a.mean_seconds, 100.0);
    }

    #[test]
    fn mean_exactly_at_threshold_alerts_and_just_above_does_not() {
        let mut w = HbiWindow::new(2, 540.0);
        w.push(540.0, path(1), false, 0);
        assert!(w.push(540.0, path(1), false, 0).is_some());
        let mut w = HbiWindow::new(2, 540.0);
        w.push(540.0, path(1), false, 0);
        assert!(w.push(541.0, path(1), false, 0).is_none());
    }

    #[test]
    fn alerts_are_rate_limited_to_one_an_hour() {
        let mut w = HbiWindow::new(1, 540.0);
        assert!(w.push(60.0, path(1), true, 0).is_some());
        assert!(w.push(60.0, path(1), true, 3599 * S).is_none());
        assert!(w.push(60.0, path(1), true, 3600 * S).is_some());
        assert_eq!(w.alerts_raised, 2);
    }

    #[test]
    fn window_slides_and_the_alert_names_the_killing_paths_most_first() {
        // Threshold 400: [1800, 100, 100, 100] (mean 525) is fine, four 100s are not.
        let mut w = HbiWindow::new(4, 400.0);
        for _ in 0..10 {
            w.push(1800.0, path(9), false, 0);
        }
        assert!(!w.alerting());
        assert!(w.push(100.0, path(1), true, 0).is_none());
        assert!(w.push(100.0, path(2), true, 0).is_none());
        assert!(w.push(100.0, path(1), true, 0).is_none());
        let a = w.push(100.0, path(1), true, 0).expect("alert");
        assert_eq!(a.culprits, vec![(path(1), 3), (path(2), 1)]);
        assert_eq!(w.len(), 4);
    }
}
