//! The command line: one binary, the agent and the commands that query it.
//! Every flag of `run` has a key in the configuration file; flags win.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{ConfigError, FileConfig, XdpModeSetting, DEFAULT_SOCKET},
    flows::{FlowQuery, FlowSort},
};

#[derive(Parser, Debug)]
#[command(
    name = "monitor",
    version,
    about = "Sees which firewall, NAT or load balancer kills long-lived TCP connections \
             (ActiveSync Direct Push) before the device's heartbeat, after how long, how, \
             and what to set it to.",
    long_about = None
)]
pub struct Cli {
    /// The agent's query socket (Unix socket, owner-only).
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: attach XDP (ingress) and TC (egress) to the client-facing
    /// interface(s), track TCP flows to the server ports, diagnose, serve
    /// /metrics and the query socket. Needs root or CAP_BPF, CAP_NET_ADMIN,
    /// CAP_PERFMON. Detaches cleanly on SIGINT/SIGTERM.
    Run(RunArgs),
    /// Programs attached (interface, mode), ports, uptime, flow table fill,
    /// events dropped, kernel counters.
    Status(JsonArg),
    /// Live flows: client, age, current silence, bytes each way, inferred
    /// heartbeat, state. Times in seconds.
    Flows(FlowsArgs),
    /// The diagnosis in plain words: which paths kill, after how long, how,
    /// the likely device, the recommended timeout, the Exchange 3033/1040-style
    /// alert state, and a histogram of silences before kills.
    Report(JsonArg),
    /// Flow endings with their verdicts (the most recent first, then live with --follow).
    Events(EventsArgs),
    /// The cure: TCP keepalive the agent gives the connections of paths
    /// whose box forgets idle flows (`[remedy] keepalive = true`), and the
    /// sounding of their exact timeout (`[remedy] sound = true`).
    #[command(subcommand)]
    Remedy(RemedyCommand),
    /// Analyse a capture (pcap or pcapng, e.g. from tcpdump on a firewall or a
    /// SPAN port) with the same state machine and detector as the live agent,
    /// packet timestamps as the clock, and print the same report. No root needed.
    Analyze(AnalyzeArgs),
    /// Remove everything a pinned agent left in bpffs: its links (which
    /// detaches its programs) and maps. For an agent run with `pin_path`.
    Uninstall {
        /// The agent's pin directory. Default: [agent] pin_path of --config,
        /// else /sys/fs/bpf/activesync-monitor.
        #[arg(long, value_name = "DIR")]
        pin_path: Option<PathBuf>,
        /// The agent's configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print shell completions for SHELL to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Manpage,
}

#[derive(Debug, clap::Subcommand)]
pub enum RemedyCommand {
    /// Per path: remedy on, lifted or not remediable (and why), the idle
    /// time in force, connections covered, kills since; the kernel's
    /// counts; the sounding's probe in flight and its budget.
    Status(JsonArg),
}

#[derive(Args, Debug)]
pub struct JsonArg {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FlowsArgs {
    #[arg(long)]
    pub json: bool,
    /// Sort order.
    #[arg(long, value_enum, default_value_t = FlowSort::Silence)]
    pub sort: FlowSort,
    /// Only flows on this path (as printed, e.g. 198.51.100.0/24:443).
    #[arg(long)]
    pub path: Option<String>,
    /// Only flows silent for at least this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub min_silence: Option<f64>,
    /// At most this many rows (0: all).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Wait for a walk of the table that starts now (about a second at a
    /// million entries) instead of answering from the latest one.
    #[arg(long)]
    pub fresh: bool,
}

impl FlowsArgs {
    pub fn query(&self) -> FlowQuery {
        FlowQuery {
            sort: self.sort,
            path: self.path.clone(),
            min_silence: self.min_silence,
            limit: self.limit,
            fresh: self.fresh,
        }
    }
}

/// The server's heartbeat bounds, as Exchange has them: `run` and `analyze` alike.
#[derive(Args, Debug, Default)]
pub struct HeartbeatArgs {
    /// Exchange MinHeartbeatInterval, seconds (1..max). Default 60. [detector] min_heartbeat
    #[arg(long, value_name = "SECONDS")]
    pub min_heartbeat: Option<f64>,
    /// Exchange MaxHeartbeatInterval, seconds (min..3540). Default 3540. [detector] max_heartbeat
    #[arg(long, value_name = "SECONDS")]
    pub max_heartbeat: Option<f64>,
}

impl HeartbeatArgs {
    fn apply(&self, d: &mut crate::detector::DetectorConfig) -> Result<(), ConfigError> {
        if let Some(v) = self.min_heartbeat {
            d.min_heartbeat = secs("min-heartbeat", v)?;
        }
        if let Some(v) = self.max_heartbeat {
            d.max_heartbeat = secs("max-heartbeat", v)?;
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// The capture file (pcap or pcapng; Ethernet, raw IP, Linux SLL/SLL2, loopback).
    pub file: PathBuf,
    /// Server port; repeat for several (at most 8). Default: the ports the
    /// capture's connection-opening SYNs went to.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Server port carrying plaintext HTTP (behind a TLS-terminating load
    /// balancer): its Pings are read for the exact heartbeat. Tracked too.
    #[arg(long = "plaintext-port", value_name = "PORT")]
    pub plaintext_ports: Vec<u16>,
    /// Server address; repeat for several. Default: any address on those ports.
    #[arg(long = "server", value_name = "ADDR")]
    pub servers: Vec<std::net::IpAddr>,
    /// A capture from a reverse proxy's host: the remote port of its
    /// connections to Exchange (repeat for more; tracked too). Needs
    /// --local-address.
    #[arg(
        long = "upstream-port",
        value_name = "PORT",
        requires = "local_addresses"
    )]
    pub upstream_ports: Vec<u16>,
    /// The proxy host's own address in the capture (repeat for more): its
    /// connections to an upstream port are its upstream legs.
    #[arg(long = "local-address", value_name = "ADDR")]
    pub local_addresses: Vec<std::net::IpAddr>,
    /// Only packets at least this many seconds after the capture's first.
    #[arg(long, value_name = "SECONDS")]
    pub from: Option<f64>,
    /// Only packets at most this many seconds after the capture's first.
    #[arg(long, value_name = "SECONDS")]
    pub to: Option<f64>,
    /// Seconds of silence that make an idle gap. Default 5 (as the agent).
    #[arg(long, value_name = "SECONDS")]
    pub gap_threshold_seconds: Option<f64>,
    /// Take [agent] ports and gap threshold and [detector] settings from this
    /// agent configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Print JSON (capture statistics, every verdict, the report).
    #[arg(long)]
    pub json: bool,
}

impl AnalyzeArgs {
    pub fn options(&self) -> Result<crate::analyze::AnalyzeOptions, ConfigError> {
        let c = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let gap = match self.gap_threshold_seconds {
            Some(v) => secs("gap-threshold-seconds", v)?,
            None => c.agent.gap_threshold,
        };
        let mut detector = c.detector.clone();
        detector.min_silence = gap;
        self.heartbeat.apply(&mut detector)?;
        detector.validate()?;
        // No port named anywhere: the analysis infers them from SYNs.
        let mut ports = match (&self.config, self.ports.is_empty()) {
            (_, false) => self.ports.clone(),
            (Some(_), true) => c.agent.ports.clone(),
            (None, true) => Vec::new(),
        };
        let mut plaintext_ports = c.agent.plaintext_ports.clone();
        for &p in &self.plaintext_ports {
            if !ports.contains(&p) {
                ports.push(p);
            }
            if !plaintext_ports.contains(&p) {
                plaintext_ports.push(p);
            }
        }
        let upstream_ports = if self.upstream_ports.is_empty() {
            c.agent.upstream_ports.clone()
        } else {
            self.upstream_ports.clone()
        };
        if !upstream_ports.is_empty() && self.local_addresses.is_empty() {
            return Err(ConfigError::File {
                path: "command line".into(),
                message: "upstream ports need --local-address: the proxy host's own address in the capture".into(),
            });
        }
        if !ports.is_empty() {
            for &p in &upstream_ports {
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        Ok(crate::analyze::AnalyzeOptions {
            ports,
            plaintext_ports,
            servers: self.servers.clone(),
            upstream_ports,
            local_addresses: self.local_addresses.clone(),
            from: self.from,
            to: self.to,
            gap_threshold: gap,
            detector,
        })
    }
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Keep printing new verdicts as flows end.
    #[arg(long)]
    pub follow: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// TOML configuration file (sections [agent], [detector], [metrics], [query]);
    /// flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Client-facing interface; repeat for several. [agent] interfaces
    #[arg(long = "iface", value_name = "IFACE")]
    pub interfaces: Vec<String>,
    /// Local TCP port to track; repeat for several, at most 8. Default 443. [agent] ports
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Local port carrying plaintext HTTP (behind a TLS-terminating load
    /// balancer): its ActiveSync Pings are read for the exact heartbeat;
    /// tracked too. [agent] plaintext_ports
    #[arg(long = "plaintext-port", value_name = "PORT")]
    pub plaintext_ports: Vec<u16>,
    /// Seconds of silence after which the next packet is an idle-gap event.
    /// Default 5. [agent] gap_threshold_seconds
    #[arg(long, value_name = "SECONDS")]
    pub gap_threshold_seconds: Option<f64>,
    /// Kernel flow table entries (~200 bytes each). Default 262144. [agent] flow_table_size
    #[arg(long, value_name = "N")]
    pub flow_table_size: Option<u32>,
    /// Ingress hook: xdp, or tc for veth and other virtual devices. Default xdp. [agent] ingress
    #[arg(long, value_enum)]
    pub ingress: Option<crate::config::IngressHook>,
    /// XDP attach mode. Default auto. [agent] xdp_mode
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeSetting>,
    /// Where the agent sits: server; tap (a mirror port: both directions on
    /// the interface's ingress); router (both hooks, direction by port).
    /// Default server. [agent] mode
    #[arg(long, value_enum)]
    pub mode: Option<crate::config::AgentMode>,
    /// Tap and router modes: a server address or prefix (repeat for more); without any,
    /// every address with a tracked port is a server. [agent] servers
    #[arg(long = "server", value_name = "ADDR[/LEN]")]
    pub servers: Vec<crate::config::ServerPrefix>,
    /// On a reverse proxy's host: the remote port of its connections to
    /// Exchange (repeat for more); those legs are followed too and the
    /// proxy's own timeout named. [agent] upstream_ports
    #[arg(long = "upstream-port", value_name = "PORT")]
    pub upstream_ports: Vec<u16>,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Address for /metrics. Default 0.0.0.0:19443. [metrics] listen
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Prometheus-style web configuration (web.yml: tls_server_config,
    /// basic_auth_users) for /metrics. [metrics] web_config_file
    #[arg(long, value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Do not serve /metrics. [metrics] enabled = false
    #[arg(long)]
    pub no_metrics: bool,
    /// Pin maps and links in this bpffs directory, so a restart (kill -9
    /// included) keeps the flow table and counters. [agent] pin_path
    #[arg(long, value_name = "DIR")]
    pub pin_path: Option<PathBuf>,
    /// At exit, remove the pins too (detach everything), as without pinning.
    /// [agent] detach_on_exit
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    pub print_config: bool,
}

fn secs(key: &str, v: f64) -> Result<std::time::Duration, ConfigError> {
    std::time::Duration::try_from_secs_f64(v).map_err(|_| ConfigError::File {
        path: "command line".into(),
        message: format!("--{key}: {v} is not a valid number of seconds"),
    })
}

impl RunArgs {
    /// The file (if any) with the flags applied on top, validated.
    pub fn effective(&self, socket: &std::path::Path) -> Result<FileConfig, ConfigError> {
        let mut c = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        if !self.interfaces.is_empty() {
            c.agent.interfaces = self.interfaces.clone();
        }
        if !self.ports.is_empty() {
            c.agent.ports = self.ports.clone();
        }
        for &p in &self.plaintext_ports {
            if !c.agent.ports.contains(&p) {
                c.agent.ports.push(p);
            }
            if !c.agent.plaintext_ports.contains(&p) {
                c.agent.plaintext_ports.push(p);
            }
        }
        if let Some(v) = self.gap_threshold_seconds {
            c.agent.gap_threshold = secs("gap-threshold-seconds", v)?;
        }
        if let Some(v) = self.flow_table_size {
            c.agent.flow_table_size = v;
        }
        if let Some(v) = self.ingress {
            c.agent.ingress = v;
        }
        if let Some(v) = self.xdp_mode {
            c.agent.xdp_mode = v;
        }
        if let Some(v) = self.mode {
            c.agent.mode = v;
        }
        if !self.servers.is_empty() {
            c.agent.servers = self.servers.clone();
        }
        if !self.upstream_ports.is_empty() {
            c.agent.upstream_ports = self.upstream_ports.clone();
        }
        self.heartbeat.apply(&mut c.detector)?;
        if let Some(v) = self.metrics_listen {
            c.metrics.listen = v;
        }
        if let Some(v) = &self.pin_path {
            c.agent.pin_path = Some(v.clone());
        }
        if self.detach_on_exit {
            c.agent.detach_on_exit = true;
        }
        if let Some(v) = &self.web_config_file {
            c.metrics.web_config_file = Some(v.clone());
        }
        if self.no_metrics {
            c.metrics.enabled = false;
        }
        if socket != std::path::Path::new(DEFAULT_SOCKET) {
            c.query.socket = socket.to_path_buf();
        }
        // The detector's notion of "after a silence" follows the kernel's.
        c.detector.min_silence = c.agent.gap_threshold;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_and_man_page_come_from_the_definition() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "monitor",
            &mut out,
        );
        let bash = String::from_utf8(out).unwrap();
        assert!(bash.contains("flows") && bash.contains("--min-silence"));
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        assert!(String::from_utf8(man).unwrap().contains(".TH monitor"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("monitor-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "[agent]\ninterfaces=[\"eth0\"]\nports=[8443]\n[detector]\nmax_heartbeat=1800\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "monitor",
            "run",
            "--config",
            f.to_str().unwrap(),
            "--port",
            "443",
            "--max-heartbeat",
            "900",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let c = args.effective(&cli.socket).unwrap();
        assert_eq!(c.agent.interfaces, ["eth0"]);
        assert_eq!(c.agent.ports, [443]);
        assert_eq!(c.detector.max_heartbeat.as_secs(), 900);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bad_flag_value_names_the_flag() {
        let cli = Cli::parse_from([
            "monitor",
            "run",
            "--iface",
            "eth0",
            "--max-heartbeat",
            "4000",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let e = args.effective(&cli.socket).unwrap_err().to_string();
        assert!(e.contains("max_heartbeat"), "{e}");
    }

    #[test]
    fn analyze_takes_the_servers_heartbeat_bounds_as_run_does() {
        let cli = Cli::parse_from([
            "monitor",
            "analyze",
            "x.pcap",
            "--min-heartbeat",
            "30",
            "--max-heartbeat",
            "1800",
        ]);
        let Command::Analyze(args) = cli.command else {
            panic!()
        };
        let o = args.options().unwrap();
        assert_eq!(o.detector.min_heartbeat.as_secs(), 30);
        assert_eq!(o.detector.max_heartbeat.as_secs(), 1800);
        let bad = Cli::parse_from(["monitor", "analyze", "x.pcap", "--max-heartbeat", "4000"]);
        let Command::Analyze(args) = bad.command else {
            panic!()
        };
        assert!(args
            .options()
            .unwrap_err()
            .to_string()
            .contains("max_heartbeat"));
    }
}
