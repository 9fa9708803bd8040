//! The remedy's loop: every 2 s, the diagnosis in, the kernel in step.

use std::time::{Duration, Instant};

use super::RemedyRuntime;

/// How often the remedy follows the diagnosis and lists connections.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

/// The remedy's loop on a thread of its own (its syscalls never hold up
/// the event loop); `stop` takes every keepalive back.
pub struct RemedyTask {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl RemedyTask {
    pub fn spawn(rt: RemedyRuntime, state: crate::shared::State) -> RemedyTask {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || run(rt, &state, &flag));
        RemedyTask { stop, thread }
    }

    /// Stop the loop and wait for it to undo what it did.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if self.thread.join().is_err() {
            log::error!("remedy: its thread panicked; keepalive may remain on some sockets until they close");
        }
    }
}

fn run(mut rt: RemedyRuntime, state: &crate::shared::State, stop: &std::sync::atomic::AtomicBool) {
    use crate::shared::lock;
    let rate = f64::from(lock(state).config.remedy.sockets_per_second);
    let mut last = Instant::now();
    let mut last_error = None::<String>;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < SYNC_EVERY {
            continue;
        }
        // The rate bound: sockets changed per second since the last sync.
        let budget = (last.elapsed().as_secs_f64() * rate).ceil() as usize;
        last = Instant::now();
        let wanted = {
            let mut s = lock(state);
            let report = s.pipeline.report();
            s.remedy.update(&report, crate::clock::now_ns());
            super::Wanted {
                paths: s.remedy.in_force(),
                probes: s.remedy.probes(),
                sounding: s.remedy.sounding_paths(),
            }
        };
        let outcome = rt.sync(&wanted, budget);
        let counters = rt.counters();
        let mut s = lock(state);
        s.remedy_kernel = counters;
        match outcome {
            Ok(o) => {
                s.remedy.set_coverage(&o.covered);
                s.remedy.set_candidates(o.candidates);
                s.remedy.synced(crate::clock::now_ns(), o.deferred == 0);
                s.remedy_sync_error = None;
                last_error = None;
                if o.swept > 0 || o.failed > 0 {
                    log::info!(
                        "remedy: {} sockets changed ({} failed, {} left for the next sync)",
                        o.swept,
                        o.failed,
                        o.deferred
                    );
                }
            }
            Err(e) => {
                let e = e.to_string();
                // Once per distinct error, not every two seconds.
                if last_error.as_ref() != Some(&e) {
                    log::warn!("remedy: {e}");
                }
                s.remedy_sync_error = Some(e.clone());
                last_error = Some(e);
            }
        }
    }
    match rt.undo_all() {
        Ok(n) => log::info!("remedy: keepalive taken back from {n} sockets"),
        Err(e) => log::warn!("remedy: taking keepalive back: {e}"),
    }
}
