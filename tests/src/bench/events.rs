//! The event path: how many events per second the agent takes from the ring
//! buffer with none dropped, under a churn of short flows (each flow: a
//! handshake, then a FIN: two events, Opened and Closed), offered at rising
//! rates.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use monitor_common::{TCP_ACK, TCP_FIN};
use serde_json::Value;
use xtask::{
    lab::{Agent, AgentOptions},
    netns::{Pair, SERVER_V4},
};

use super::frames::{establish, flow_frame, sender_in};

#[derive(Clone, Debug)]
pub struct Step {
    /// Events per second offered (flows per second x 2).
    pub offered: f64,
    /// Events per second actually sent (the sender may fall short).
    pub achieved: f64,
    pub events_sent: u64,
    pub events_dropped: u64,
    /// Agent CPU seconds (user + system) over the step.
    pub agent_cpu_seconds: f64,
}

fn counters(agent: &Agent) -> (u64, u64) {
    let s = agent.cli(&["status", "--json"]).expect("monitor status");
    let v: Value = serde_json::from_str(&s).expect("status JSON");
    let c = &v["kernel_counters"];
    (
        c["events_sent"].as_u64().unwrap_or(0),
        c["events_dropped"].as_u64().unwrap_or(0),
    )
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Offer each rate (events per second) for `seconds`.
pub fn run(agent_bin: &Path, rates: &[u32], seconds: f64) -> Vec<Step> {
    let pair = Pair::new();
    let workdir = std::env::temp_dir().join(format!("bench-events-{}", std::process::id()));
    let o = AgentOptions::new(&pair.server_if, workdir.clone());
    let agent = Agent::start_in(agent_bin, &pair.server, o).expect("agent starts");
    let server: IpAddr = SERVER_V4.parse().expect("address");
    let client = sender_in(&pair.client, &pair.client_if);
    let server_side = sender_in(&pair.server, &pair.server_if);
    let mut out = Vec::new();
    let mut next_flow = 0u32;
    for &rate in rates {
        let flows = ((f64::from(rate) / 2.0) * seconds) as u32;
        let (s0, d0) = counters(&agent);
        let cpu0 = cpu_seconds(agent.pid());
        let first = next_flow;
        next_flow = next_flow.wrapping_add(flows);
        let t = Instant::now();
        let per_ms = (f64::from(rate) / 2.0 / 1000.0).max(1.0);
        let mut sent = 0u32;
        while sent < flows {
            // Pace per millisecond: a burst of flows, then wait for the clock.
            let due = ((t.elapsed().as_secs_f64() * 1000.0 + 1.0) * per_ms) as u32;
            let n = flows.min(due).saturating_sub(sent);
            // Each flow: handshake (Opened), then the client's FIN (Closed).
            establish(&client, &server_side, server, first.wrapping_add(sent), n);
            for i in sent..sent + n {
                client
                    .send(&flow_frame(
                        first.wrapping_add(i),
                        server,
                        443,
                        TCP_FIN | TCP_ACK,
                    ))
                    .expect("send");
            }
            sent += n;
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = t.elapsed().as_secs_f64();
        // Let the agent drain what is in the ring.
        std::thread::sleep(Duration::from_secs(1));
        let (s1, d1) = counters(&agent);
        out.push(Step {
            offered: f64::from(rate),
            achieved: f64::from(flows) * 2.0 / elapsed,
            events_sent: s1 - s0,
            events_dropped: d1 - d0,
            agent_cpu_seconds: cpu_seconds(agent.pid()) - cpu0,
        });
    }
    let _ = agent.stop();
    let _ = std::fs::remove_dir_all(&workdir);
    out
}

pub fn markdown(steps: &[Step]) -> String {
    let mut s = String::from(
        "| offered events/s | achieved events/s | events sent | dropped | agent CPU s | agent CPU per 1,000 events |\n|---|---|---|---|---|---|\n",
    );
    for st in steps {
        s.push_str(&format!(
            "| {:.0} | {:.0} | {} | {} | {:.2} | {:.2} ms |\n",
            st.offered,
            st.achieved,
            st.events_sent,
            st.events_dropped,
            st.agent_cpu_seconds,
            st.agent_cpu_seconds * 1e6 / st.events_sent.max(1) as f64,
        ));
    }
    s
}

/// The highest achieved rate with nothing dropped.
pub fn sustained(steps: &[Step]) -> Option<f64> {
    steps
        .iter()
        .filter(|s| s.events_dropped == 0 && s.events_sent > 0)
        .map(|s| s.achieved)
        .fold(None, |m, v| Some(m.map_or(v, |m: f64| m.max(v))))
}
