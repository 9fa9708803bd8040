//! Throughput kept: iperf3 over a veth pair to port 443, with no monitor,
//! with ours attached, and with tcpdump capturing the same traffic; rounds
//! interleaved so drift hits all three alike.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use xtask::{
    lab::{Agent, AgentOptions},
    netns::{die_with_parent, Pair, SERVER_V4},
};

use super::events::cpu_seconds;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    None,
    /// XDP native on the veth (the agent's `auto`).
    Ours,
    /// XDP generic (`xdp_mode = "skb"`).
    OursGeneric,
    /// TC ingress instead of XDP (`ingress = "tc"`).
    OursTc,
    Tcpdump,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::None,
        Mode::Ours,
        Mode::OursGeneric,
        Mode::OursTc,
        Mode::Tcpdump,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "no monitor",
            Mode::Ours => "this monitor, XDP native (auto)",
            Mode::OursGeneric => "this monitor, XDP generic (xdp_mode = \"skb\")",
            Mode::OursTc => "this monitor, TC ingress (ingress = \"tc\")",
            Mode::Tcpdump => "tcpdump -w /dev/null port 443",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Round {
    pub mode: Mode,
    pub bits_per_second: f64,
    /// The monitor's own process CPU (user + system) during the transfer.
    pub process_cpu_seconds: f64,
    /// Time spent in our BPF programs (kernel.bpf_stats_enabled), seconds.
    pub bpf_seconds: f64,
    /// Runs of our BPF programs (packets seen, both hooks).
    pub bpf_runs: u64,
    /// All CPUs' busy time during the transfer (iperf3, softirq, monitor), seconds.
    pub system_cpu_seconds: f64,
}

/// Busy jiffies of all CPUs (everything but idle and iowait), in seconds.
fn system_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / hz
}

/// (run_time_ns, run_cnt) summed over the BPF programs a process holds open.
fn bpf_stats(pid: u32) -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    let field = |s: &str, k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|s| s.contains("prog_type:"))
        .fold((0, 0), |(t, n), s| {
            (t + field(&s, "run_time_ns:"), n + field(&s, "run_cnt:"))
        })
}

fn iperf(pair: &Pair, seconds: u32) -> f64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.client.name,
            "iperf3",
            "-c",
            SERVER_V4,
            "-p",
            "443",
            "-J",
        ])
        .args(["-t", &seconds.to_string()])
        .output()
        .expect("iperf3 (Debian package iperf3)");
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 gave no result: {v}"))
}

fn tcpdump(pair: &Pair) -> Child {
    use std::io::BufRead;
    let mut c = die_with_parent(&mut Command::new("ip"))
        .args([
            "netns",
            "exec",
            &pair.server.name,
            "tcpdump",
            "-Z",
            "root",
            "-i",
        ])
        .arg(&pair.server_if)
        .args(["-w", "/dev/null", "port 443"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (Debian package tcpdump)");
    let err = c.stderr.take().expect("tcpdump stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if l.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("tcpdump listening");
    c
}

/// `rounds` rounds of each mode, `seconds` of iperf3 each.
pub fn run(agent_bin: &Path, rounds: usize, seconds: u32) -> Vec<Round> {
    let pair = Pair::new();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let mut server = die_with_parent(&mut Command::new("ip"))
        .args([
            "netns",
            "exec",
            &pair.server.name,
            "iperf3",
            "-s",
            "-p",
            "443",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let workdir = std::env::temp_dir().join(format!("bench-tput-{}", std::process::id()));
    let mut out = Vec::new();
    for _ in 0..rounds {
        for mode in Mode::ALL {
            let (pid, guard): (Option<u32>, Box<dyn FnOnce()>) = match mode {
                Mode::None => (None, Box::new(|| {})),
                Mode::Ours | Mode::OursGeneric | Mode::OursTc => {
                    let mut o = AgentOptions::new(&pair.server_if, workdir.clone());
                    if mode == Mode::OursGeneric {
                        o.config.agent.xdp_mode = monitor::XdpModeSetting::Skb;
                    }
                    if mode == Mode::OursTc {
                        o.config.agent.ingress = monitor::config::IngressHook::Tc;
                    }
                    let a = Agent::start_in(agent_bin, &pair.server, o).expect("agent starts");
                    (
                        Some(a.pid()),
                        Box::new(move || {
                            let _ = a.stop();
                        }),
                    )
                }
                Mode::Tcpdump => {
                    let mut c = tcpdump(&pair);
                    (
                        Some(c.id()),
                        Box::new(move || xtask::cmd::kill_and_reap(&mut c)),
                    )
                }
            };
            let cpu0 = pid.map_or(0.0, cpu_seconds);
            let bpf0 = pid.map_or((0, 0), bpf_stats);
            let sys0 = system_busy_seconds();
            let bps = iperf(&pair, seconds);
            let sys1 = system_busy_seconds();
            let bpf1 = pid.map_or((0, 0), bpf_stats);
            let round = Round {
                mode,
                bits_per_second: bps,
                process_cpu_seconds: pid.map_or(0.0, cpu_seconds) - cpu0,
                bpf_seconds: bpf1.0.saturating_sub(bpf0.0) as f64 / 1e9,
                bpf_runs: bpf1.1.saturating_sub(bpf0.1),
                system_cpu_seconds: sys1 - sys0,
            };
            guard();
            out.push(round);
        }
    }
    xtask::cmd::kill_and_reap(&mut server);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    let _ = std::fs::remove_dir_all(&workdir);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Per mode: median throughput, its ratio to no monitor, median CPU figures.
pub fn summary(rounds: &[Round]) -> Vec<(Mode, f64, f64, f64, f64, f64)> {
    let med = |m: Mode, f: &dyn Fn(&Round) -> f64| {
        median(rounds.iter().filter(|r| r.mode == m).map(f).collect())
    };
    let base = med(Mode::None, &|r| r.bits_per_second);
    Mode::ALL
        .into_iter()
        .map(|m| {
            let bps = med(m, &|r| r.bits_per_second);
            (
                m,
                bps,
                bps / base.max(1.0),
                med(m, &|r| r.process_cpu_seconds),
                med(m, &|r| r.bpf_seconds),
                med(m, &|r| r.system_cpu_seconds),
            )
        })
        .collect()
}

pub fn markdown(rounds: &[Round], seconds: u32) -> String {
    let mut s = format!(
        "| mode | Gbit/s (median) | of unmonitored | monitor process CPU s | in our BPF programs s | all CPUs busy s (per {seconds} s run) |\n|---|---|---|---|---|---|\n"
    );
    for (m, bps, ratio, cpu, bpf, sys) in summary(rounds) {
        s.push_str(&format!(
            "| {} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} |\n",
            m.name(),
            bps / 1e9,
            ratio,
            cpu,
            bpf,
            sys
        ));
    }
    s
}
