//! What a newcomer sees: one line per step with what it did and how long it
//! took; on a terminal the line shows the step's progress while it runs.

use std::{
    io::{IsTerminal, Write},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;

/// Width the step names are padded to, so the outcomes line up.
const NAME_WIDTH: usize = 44;

fn on_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// A step's line is on the screen without its end yet.
static LINE_OPEN: AtomicBool = AtomicBool::new(false);

/// End an open step line, so what is printed next (a failed command's
/// output) starts on a line of its own.
pub fn break_line() {
    if LINE_OPEN.swap(false, Ordering::Relaxed) {
        println!();
    }
}

/// `3.2 s`, `2 min 05 s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// One step in progress: `prefix: name ....`; [`Step::update`] rewrites the
/// line on a terminal (and is silent elsewhere, where logs want one line).
pub struct Step {
    line: String,
    start: Instant,
}

impl Step {
    pub fn start(prefix: &str, name: &str) -> Step {
        let line = format!("{prefix}: {name:<NAME_WIDTH$}");
        print!("{line}");
        let _ = std::io::stdout().flush();
        LINE_OPEN.store(true, Ordering::Relaxed);
        Step {
            line,
            start: Instant::now(),
        }
    }

    pub fn update(&self, msg: &str) {
        if on_terminal() && LINE_OPEN.load(Ordering::Relaxed) {
            print!("\r\x1b[K{} {msg}", self.line);
            let _ = std::io::stdout().flush();
        }
    }

    /// End the line with the outcome and the step's duration.
    pub fn finish(self, outcome: &str) {
        LINE_OPEN.store(false, Ordering::Relaxed);
        let took = human(self.start.elapsed());
        if on_terminal() {
            println!("\r\x1b[K{} {outcome} ({took})", self.line);
        } else {
            println!(" {outcome} ({took})");
        }
    }

    /// End the line on failure; after a failed command's output, say the
    /// step's name again, so the error line follows its step.
    pub fn fail(self) {
        let took = human(self.start.elapsed());
        if LINE_OPEN.swap(false, Ordering::Relaxed) {
            println!(" failed ({took})");
        } else {
            println!("{} failed ({took})", self.line);
        }
    }
}

/// Run `f` as one step; it returns the outcome word(s) (`already there`, `installed`).
pub fn step<T: AsRef<str>>(
    prefix: &str,
    name: &str,
    f: impl FnOnce(&Step) -> Result<T>,
) -> Result<()> {
    let s = Step::start(prefix, name);
    match f(&s) {
        Ok(outcome) => {
            s.finish(outcome.as_ref());
            Ok(())
        }
        Err(e) => {
            s.fail();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(human(Duration::from_millis(3240)), "3.2 s");
        assert_eq!(human(Duration::from_secs(125)), "2 min 05 s");
    }
}
