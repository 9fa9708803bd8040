//! The container image as an operator runs it: built by `cargo xtask image`
//! with podman, run with exactly what the DaemonSet grants (the three
//! capabilities, no privilege, a read-only root, the host's bpffs, the
//! configuration mounted read-only) in a test namespace standing for the
//! node's network, and scraped while real TCP crosses the interface.
//!
//! Three run options are this machine's, not the image's: `--runtime runc`
//! (crun refuses the hybrid cgroup hierarchy here), lowered `--ulimit`s
//! (the sandbox refuses podman's default rlimits), and `seccomp=unconfined`
//! (Debian's podman profile allows `bpf()` only with CAP_SYS_ADMIN, which
//! the DaemonSet does not grant; Kubernetes runs pods unconfined unless
//! told otherwise).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use xtask::netns::{http_get_in, require_root, sh, unique_tag, wait_for, Pair, SERVER_V4};

const METRICS: &str = "127.0.0.1:19443";
const CONNECTIONS: usize = 3;

/// `podman ARGS` (cargo xtask setup --all installs it).
fn podman(args: &[&str]) -> (bool, String) {
    monitor_tests::run_output(Command::new("podman").args(args))
}

/// A test directory: the configuration and a bpffs standing for the host's;
/// the container, the mount and the directory go on every way out.
struct Run {
    dir: PathBuf,
    container: String,
    bpffs: PathBuf,
}

impl Run {
    fn new() -> Run {
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("image-test-{tag}"));
        let bpffs = dir.join("bpffs");
        // The guard first: a failed mount still removes the directory.
        let run = Run {
            container: format!("asm-image-{tag}"),
            dir,
            bpffs,
        };
        std::fs::create_dir_all(&run.bpffs).expect("test directory");
        sh(&["mount", "-t", "bpf", "bpf", &run.bpffs.to_string_lossy()]);
        run
    }

    fn running(&self) -> bool {
        podman(&["inspect", "--format", "{{.State.Running}}", &self.container])
            .1
            .trim()
            == "true"
    }

    fn logs(&self) -> String {
        podman(&["logs", &self.container]).1
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "5", &self.container]);
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The DaemonSet's ConfigMap, but for the interface and the address of /metrics.
fn config(iface: &str) -> String {
    format!(
        "[agent]\n\
         interfaces = [\"{iface}\"]\n\
         ports = [443]\n\
         pin_path = \"/sys/fs/bpf/activesync-monitor\"\n\
         [metrics]\n\
         listen = \"{METRICS}\"\n\
         [query]\n\
         socket = \"/run/activesync-monitor/monitor.sock\"\n"
    )
}

fn start(run: &Run, image: &str, netns: &str, iface: &str) {
    std::fs::write(run.dir.join("monitor.toml"), config(iface)).expect("config");
    let conf = format!("{}:/etc/activesync-monitor:ro", run.dir.display());
    let bpffs = format!("{}:/sys/fs/bpf", run.bpffs.display());
    let network = format!("ns:/run/netns/{netns}");
    let (ok, out) = podman(&[
        "run",
        "--detach",
        "--name",
        &run.container,
        // This machine's (see the top of the file).
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
        "--security-opt",
        "seccomp=unconfined",
        // The DaemonSet's securityContext and volumes.
        "--cap-drop",
        "ALL",
        "--cap-add",
        "BPF,NET_ADMIN,PERFMON",
        "--security-opt",
        "no-new-privileges",
        "--read-only",
        "--network",
        &network,
        "--volume",
        &conf,
        "--volume",
        &bpffs,
        image,
    ]);
    assert!(ok, "podman run: {out}");
}

/// Connections from the client namespace to port 443, each sending a
/// request and closing: flows the agent must follow to their end.
fn traffic(pair: &Pair) {
    let server = pair.server.spawn(|| {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 443)).expect("bind 443");
        let mut got = 0;
        for _ in 0..CONNECTIONS {
            let (mut s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        got
    });
    std::thread::sleep(Duration::from_millis(200));
    let to: SocketAddr = format!("{SERVER_V4}:443").parse().expect("address");
    pair.client.run(move || {
        for _ in 0..CONNECTIONS {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
            s.write_all(b"POST /Microsoft-Server-ActiveSync?Cmd=Ping HTTP/1.1\r\n\r\n")
                .expect("send");
        }
    });
    assert!(server.join().expect("server thread") > 0);
}

/// The sum of a counter family's samples.
fn total(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_image_runs_with_the_daemonsets_capabilities_and_serves_metrics_of_real_flows() {
    require_root();
    let image = xtask::image::build().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "{}: {} KiB; {}: {} KiB",
        image.reference,
        image.bytes / 1024,
        image.archive.display(),
        std::fs::metadata(&image.archive)
            .map(|m| m.len())
            .unwrap_or(0)
            / 1024
    );
    let pair = Pair::new();
    let run = Run::new();
    start(&run, &image.reference, &pair.server.name, &pair.server_if);
    let metrics: SocketAddr = METRICS.parse().expect("address");
    let up = wait_for(Duration::from_secs(30), || {
        let got = http_get_in(&pair.server.name, metrics, "/metrics").ok();
        // An agent that exited will not come up: say why at once.
        got.or_else(|| (!run.running()).then(String::new))
    })
    .filter(|m| !m.is_empty());
    assert!(up.is_some(), "no /metrics within 30 s: {}", run.logs());
    traffic(&pair);
    let ended = wait_for(Duration::from_secs(20), || {
        let m = http_get_in(&pair.server.name, metrics, "/metrics").ok()?;
        let n = total(&m, "activesync_monitor_flows_ended_total");
        (n >= CONNECTIONS as f64).then_some(n)
    });
    assert!(
        ended.is_some(),
        "the image's agent did not count {CONNECTIONS} ended flows within 20 s: {}",
        run.logs()
    );
    assert!(
        run.bpffs.join("activesync-monitor").is_dir(),
        "the agent pinned nothing in the host's bpffs: {}",
        run.logs()
    );
    let (ok, out) = podman(&["stop", "--time", "10", &run.container]);
    assert!(ok, "podman stop: {out}");
    let (_, code) = podman(&["inspect", "--format", "{{.State.ExitCode}}", &run.container]);
    assert_eq!(
        code.trim(),
        "0",
        "the agent's exit on SIGTERM: {}",
        run.logs()
    );
}
