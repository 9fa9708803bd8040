//! tcpdump on an interface of a namespace, writing a pcap file.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::addressing::{PLAINTEXT_PORT, SERVER_PORT};
use crate::cmd::{self, Ended};

/// How long tcpdump may take to listen, and to flush and exit on SIGINT.
const START_LIMIT: Duration = Duration::from_secs(10);
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// tcpdump on an interface of a namespace, writing a pcap file.
pub struct Capture {
    child: Child,
    pub path: PathBuf,
}

impl Capture {
    /// Start and wait until tcpdump listens. A 400-byte snaplen keeps every
    /// header and a plaintext Ping's head, and cuts longer payloads (TLS
    /// certificates), like a capture on a busy firewall. `-Z root`:
    /// dropping to tcpdump's own user would clear the parent-death signal.
    pub fn start(ns: &str, iface: &str, path: &Path) -> Result<Capture> {
        let mut child = cmd::child_in_netns(ns)
            .args([
                "tcpdump", "-Z", "root", "-i", iface, "-s", "400", "-U", "-w",
            ])
            .arg(path)
            .arg(format!(
                "tcp port {SERVER_PORT} or tcp port {PLAINTEXT_PORT}"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (Debian package tcpdump)")?;
        if let Err(e) = wait_listening(&mut child) {
            cmd::kill_and_reap(&mut child);
            return Err(e.context(format!(
                "tcpdump did not start listening on {iface} within {} s",
                START_LIMIT.as_secs()
            )));
        }
        Ok(Capture {
            child,
            path: path.to_path_buf(),
        })
    }

    /// SIGINT: tcpdump flushes and closes the file.
    pub fn stop(mut self) -> Result<PathBuf> {
        match cmd::signal_then_wait(&mut self.child, libc::SIGINT, STOP_LIMIT) {
            // tcpdump ends with 0 on SIGINT, after flushing the file.
            Ended::Exited(st) if st.success() => Ok(self.path.clone()),
            Ended::Exited(st) => bail!("tcpdump exited with {st}"),
            Ended::Killed => bail!("tcpdump did not stop within {} s", STOP_LIMIT.as_secs()),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        cmd::kill_and_reap(&mut self.child);
    }
}

/// Until tcpdump says it is listening (on stderr, read by a thread that
/// drains it for the rest of the capture).
fn wait_listening(child: &mut Child) -> Result<()> {
    let stderr = child.stderr.take().context("tcpdump's stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(START_LIMIT)
        .context("no \"listening on\" from tcpdump")
}
