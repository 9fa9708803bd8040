//! The agent under test: the real `monitor run` binary in a namespace,
//! configured through a file, queried through its CLI and /metrics.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use monitor_core::{
    api::Status,
    detector::{report::Report, Verdict},
    FileConfig,
};

use super::{addressing::*, Scenario, Topology};
use crate::{
    cmd::{self, Ended},
    netns::Netns,
};

/// How long the agent may take to open its socket.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGINT for a clean detach.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long a dropped agent gets after SIGINT before SIGKILL.
const DROP_LIMIT: Duration = Duration::from_secs(5);

/// The agent under test: the real `monitor run` binary in the server namespace.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    /// The configuration file the agent runs with.
    pub config: PathBuf,
    pub bin: PathBuf,
    pub log: PathBuf,
    pub metrics: SocketAddr,
    pub ns: String,
}

/// Where and how to run the agent.
pub struct AgentOptions {
    pub interfaces: Vec<String>,
    pub workdir: PathBuf,
    /// The agent's configuration; interfaces, ports, the /metrics address
    /// and the socket are set from the lab's.
    pub config: FileConfig,
}

impl AgentOptions {
    /// Defaults but for the interface and working directory.
    pub fn new(iface: &str, workdir: PathBuf) -> AgentOptions {
        AgentOptions {
            interfaces: vec![iface.to_string()],
            workdir,
            config: FileConfig::default(),
        }
    }
}

impl Agent {
    pub fn start(bin: &Path, topo: &Topology, s: &Scenario) -> Result<Agent> {
        Agent::start_in(
            bin,
            &topo.server,
            AgentOptions {
                interfaces: vec![topo.server_if.clone()],
                workdir: topo.workdir.clone(),
                config: FileConfig {
                    detector: s.detector.clone(),
                    remedy: s.remedy.clone(),
                    ..FileConfig::default()
                },
            },
        )
    }

    /// Start `monitor run` in namespace `ns`, configured through a file.
    pub fn start_in(bin: &Path, ns: &Netns, o: AgentOptions) -> Result<Agent> {
        std::fs::create_dir_all(&o.workdir)?;
        let socket = o.workdir.join("monitor.sock");
        let log = o.workdir.join("agent.log");
        let cfg_path = o.workdir.join("agent.toml");
        let metrics: SocketAddr = "127.0.0.1:19443".parse().expect("address");
        let cfg = config(&o, &socket, metrics);
        std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
        let mut command = cmd::child_in_netns(&ns.name);
        if cfg.remedy.keepalive {
            // `ip netns exec` mounts a fresh /sys in a mount namespace of its
            // own (a slave: nothing goes back to the host): the remedy's
            // sock_ops program needs the cgroup v2 root there.
            command.args([
                "sh",
                "-c",
                "mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" \"$@\"",
            ]);
        }
        let child = command
            .arg(bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut a = Agent {
            child,
            socket,
            config: cfg_path,
            bin: bin.to_path_buf(),
            log,
            metrics,
            ns: ns.name.clone(),
        };
        a.wait_for_socket()?;
        Ok(a)
    }

    /// Until the agent's query socket exists; fails if it exits or takes too long.
    fn wait_for_socket(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        while !self.socket.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("the agent exited ({st}): {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not open its socket within {} s: {}",
                    START_LIMIT.as_secs(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The agent's log so far (its stderr).
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, and reap: the agent gets no chance to clean up.
    pub fn kill9(mut self) {
        cmd::kill_and_reap(&mut self.child);
    }

    /// The agent's process id (`ip netns exec` execs into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run a CLI command against this agent and return its stdout.
    /// `monitor status --json`, as the type the agent answers with.
    pub fn status(&self) -> Result<Status> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }

    /// `monitor report --json`.
    pub fn report(&self) -> Result<Report> {
        Ok(serde_json::from_str(&self.cli(&["report", "--json"])?)?)
    }

    /// `monitor events --json`: the recent verdicts.
    pub fn verdicts(&self) -> Result<Vec<Verdict>> {
        self.cli(&["events", "--json"])?
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    }

    pub fn cli(&self, args: &[&str]) -> Result<String> {
        cmd::output(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
        )
    }

    /// GET /metrics from inside the agent's namespace.
    pub fn scrape(&self) -> Result<String> {
        crate::netns::http_get_in(&self.ns, self.metrics, "/metrics").map_err(anyhow::Error::msg)
    }

    /// SIGINT, and wait (bounded) for a clean detach; the agent's log.
    pub fn stop(mut self) -> Result<String> {
        match cmd::signal_then_wait(&mut self.child, libc::SIGINT, STOP_LIMIT) {
            Ended::Exited(st) if st.success() => Ok(self.log_text()),
            Ended::Exited(st) => bail!("the agent exited with {st}: {}", self.log_text()),
            Ended::Killed => bail!(
                "the agent did not stop within {} s of SIGINT",
                STOP_LIMIT.as_secs()
            ),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        cmd::signal_then_wait(&mut self.child, libc::SIGINT, DROP_LIMIT);
    }
}

/// The agent's configuration: `o`'s tables, with the interface, the lab's
/// ports, the metrics address and the query socket filled in.
fn config(o: &AgentOptions, socket: &Path, metrics: SocketAddr) -> FileConfig {
    let mut c = o.config.clone();
    c.agent.interfaces = o.interfaces.clone();
    c.agent.ports = vec![SERVER_PORT, PLAINTEXT_PORT];
    c.agent.plaintext_ports = vec![PLAINTEXT_PORT];
    c.metrics.listen = metrics;
    c.query.socket = socket.to_path_buf();
    c
}
