//! A device's heartbeat choice over time: what it asks for next after an
//! answered Ping or a failed one.

use super::knobs::Profile;

/// AOSP Exchange's numbers (seconds, before scaling).
const ANDROID_START: f64 = 470.0;
const ANDROID_STEP: f64 = 180.0;
const ANDROID_MIN: f64 = 290.0;
const ANDROID_MAX: f64 = 1010.0;

/// The heartbeat state of one device.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    profile: Profile,
    scale: f64,
    current: f64,
    /// The last value that was answered (Windows Mobile reverts to it).
    last_good: Option<f64>,
    /// Android: a failure happened; never raise again.
    failed: bool,
}

impl Heartbeat {
    pub fn new(profile: Profile, scale: f64) -> Heartbeat {
        let current = match profile {
            Profile::IncrementRevert { start, .. } => start,
            Profile::Android => (ANDROID_START * scale).round(),
            Profile::IosLong(h) | Profile::Fixed(h) => h,
        };
        Heartbeat {
            profile,
            scale,
            current,
            last_good: None,
            failed: false,
        }
    }

    /// The heartbeat the next Ping asks for (seconds).
    pub fn current(&self) -> f64 {
        self.current
    }

    /// A Ping was answered (at its heartbeat or early).
    pub fn answered(&mut self) {
        self.last_good = Some(self.current);
        match self.profile {
            Profile::IncrementRevert { step, max, .. } => {
                self.current = (self.current + step).min(max);
            }
            Profile::Android if !self.failed => {
                let max = (ANDROID_MAX * self.scale).round();
                self.current = (self.current + (ANDROID_STEP * self.scale).round()).min(max);
            }
            _ => {}
        }
    }

    /// A Ping failed (reset, closed, or no answer by heartbeat + grace).
    pub fn failed(&mut self) {
        match self.profile {
            Profile::IncrementRevert { start, .. } => {
                self.current = self.last_good.unwrap_or(start).min(self.current);
            }
            Profile::Android => {
                self.failed = true;
                let min = (ANDROID_MIN * self.scale).round();
                self.current = (self.current - (ANDROID_STEP * self.scale).round()).max(min);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_mobile_raises_after_answers_and_reverts_to_the_last_good_value() {
        let mut h = Heartbeat::new(
            Profile::IncrementRevert {
                start: 60.0,
                step: 60.0,
                max: 600.0,
            },
            1.0,
        );
        h.answered();
        h.answered();
        assert_eq!(h.current(), 180.0);
        h.failed();
        assert_eq!(h.current(), 120.0);
        h.answered();
        assert_eq!(h.current(), 180.0);
    }

    #[test]
    fn android_lowers_by_a_step_after_a_failure_and_never_raises_again() {
        let mut h = Heartbeat::new(Profile::Android, 1.0);
        assert_eq!(h.current(), 470.0);
        h.answered();
        assert_eq!(h.current(), 650.0);
        h.failed();
        assert_eq!(h.current(), 470.0);
        h.answered();
        assert_eq!(h.current(), 470.0);
        for _ in 0..5 {
            h.failed();
        }
        assert_eq!(h.current(), 290.0);
    }
}
