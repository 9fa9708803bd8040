//! `cargo xtask soak`: the lab under constant churn for a long time, the
//! agent's memory sampled, every kernel event accounted for.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::{LabRun, Scenario};

#[derive(Clone, Debug)]
pub struct Sample {
    pub at_seconds: f64,
    pub rss_bytes: u64,
    pub events_sent: u64,
    pub events_dropped: u64,
    pub flows_followed: u64,
    pub flows_ended: u64,
}

#[derive(Clone, Debug)]
pub struct Soak {
    pub samples: Vec<Sample>,
    pub decode_errors: u64,
    pub devices: usize,
    pub pings: u64,
    pub connections: u64,
    pub log_panicked: bool,
}

/// Resident memory of a process (VmRSS), in bytes; 0 if unreadable.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `cargo xtask soak`: the soak scenario (xtask/scenarios/soak.toml) for
/// `seconds`, sampled every 30 s; its table on stdout. Fails if the kernel
/// dropped events, events did not decode, or the agent panicked.
pub fn run_and_check(seconds: u64) -> Result<()> {
    crate::setup::setup()?;
    crate::demo::catch_interrupts();
    let bin = crate::demo::build_agent()?;
    let s = Scenario::load(&crate::cmd::workspace_root().join("xtask/scenarios/soak.toml"))?;
    let soak = run(&s, &bin, seconds, Duration::from_secs(30))?;
    print!("{}", soak.markdown());
    let dropped = soak.samples.last().map_or(0, |x| x.events_dropped);
    if dropped > 0 || soak.decode_errors > 0 || soak.log_panicked {
        bail!("the soak lost events or the agent panicked");
    }
    Ok(())
}

/// Run `s` for `seconds`, sampling every `every`.
pub fn run(s: &Scenario, bin: &Path, seconds: u64, every: Duration) -> Result<Soak> {
    let mut s = s.clone();
    s.duration_seconds = seconds;
    let lab = LabRun::start(&s, bin)?;
    let pid = lab.agent().pid();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut decode_errors = 0;
    while started.elapsed() < Duration::from_secs(seconds) && !crate::demo::interrupted() {
        std::thread::sleep(
            every.min(Duration::from_secs(seconds).saturating_sub(started.elapsed())),
        );
        let st = lab.agent().status().context("the agent's status")?;
        let report = lab.report()?;
        decode_errors = st.event_decode_errors;
        let counter = |name: &str| st.kernel_counters.get(name).copied().unwrap_or(0);
        samples.push(Sample {
            at_seconds: started.elapsed().as_secs_f64(),
            rss_bytes: rss_bytes(pid),
            events_sent: counter("events_sent"),
            events_dropped: st.events_dropped,
            flows_followed: st.flows_followed as u64,
            flows_ended: report.endings.values().sum(),
        });
    }
    let devices = lab.devices();
    let log = lab.stop()?;
    Ok(Soak {
        samples,
        decode_errors,
        devices: devices.len(),
        pings: devices.iter().map(|d| d.pings_ok + d.pings_failed).sum(),
        connections: devices.iter().map(|d| d.connections).sum(),
        log_panicked: log.contains("panicked"),
    })
}

impl Soak {
    /// RSS growth from the end of the warm-up (the first third) to the end.
    pub fn rss_growth_after_warmup(&self) -> i64 {
        let n = self.samples.len();
        if n < 3 {
            return 0;
        }
        let warm = &self.samples[n / 3];
        let last = &self.samples[n - 1];
        last.rss_bytes as i64 - warm.rss_bytes as i64
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "{} devices, {} Pings, {} connections; event decode errors {}\n\n\
             | t (s) | agent RSS (MiB) | events sent | dropped | flows followed | flows ended |\n|---|---|---|---|---|---|\n",
            self.devices, self.pings, self.connections, self.decode_errors
        );
        for x in &self.samples {
            s.push_str(&format!(
                "| {:.0} | {:.1} | {} | {} | {} | {} |\n",
                x.at_seconds,
                x.rss_bytes as f64 / 1048576.0,
                x.events_sent,
                x.events_dropped,
                x.flows_followed,
                x.flows_ended
            ));
        }
        s.push_str(&format!(
            "\nRSS growth after the warm-up (first third): {:+.2} MiB\n",
            self.rss_growth_after_warmup() as f64 / 1048576.0
        ));
        s
    }
}
