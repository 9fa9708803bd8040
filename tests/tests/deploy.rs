//! The deployment files, checked with the operators' own tools: systemd's
//! verifier, promtool, a Kubernetes schema validator, and the real agent run
//! with exactly the capabilities the unit grants.

use std::{path::PathBuf, process::Command, time::Duration};

use monitor_tests::{agent_bin, run_output as run};
use xtask::netns::{require_root, Pair};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const UNIT: &str = "deploy/systemd/activesync-monitor.service";

#[test]
fn systemd_unit_verifies_clean() {
    let unit = std::fs::read_to_string(root().join(UNIT)).unwrap();
    // The unit names the installed path; verify it against the built binary.
    let dir = std::env::temp_dir().join(format!("unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("activesync-monitor.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/monitor", agent_bin().to_str().unwrap()),
    )
    .unwrap();
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
}

#[test]
fn prometheus_rules_pass_promtool_check_and_unit_tests() {
    let dir = root().join("deploy/prometheus");
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules", "rules.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("promtool")
        .args(["test", "rules", "rules.test.yml"])
        .current_dir(&dir));
    assert!(ok && out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(dir.join("rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("rules.test.yml")).unwrap();
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "no promtool test for {line}"
        );
    }
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let (ok, out) = run(Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(root().join("deploy/kubernetes/activesync-monitor.yaml")));
    assert!(ok, "{out}");
    assert!(!out.contains("ERROR") && !out.contains("FAIL"), "{out}");
}

/// The capabilities the unit grants, as Linux capability names.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(root().join(UNIT)).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// CapPrm, CapEff, CapInh and CapAmb of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in st.lines() {
            if ["CapPrm:", "CapEff:", "CapInh:", "CapAmb:"]
                .iter()
                .any(|k| l.starts_with(k))
            {
                out.push(l.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    out
}

/// Start the agent as `nobody` with only `caps`; once it serves status, the
/// capability sets of its threads.
fn start_with(pair: &Pair, caps: &[String]) -> Result<Vec<String>, String> {
    start_with_args(pair, caps, &[])
}

fn start_with_args(pair: &Pair, caps: &[String], extra: &[&str]) -> Result<Vec<String>, String> {
    let dir = std::env::temp_dir().join(format!("caps-{}-{}", pair.server.name, caps.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = Command::new("chown")
        .args(["nobody", dir.to_str().unwrap()])
        .status();
    let socket = dir.join("m.sock");
    let set = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.server.name,
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ])
        .args([
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
        ])
        .arg(agent_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["run", "--iface", &pair.server_if, "--no-metrics"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut result = Err("did not start within 20 s".to_string());
    for _ in 0..400 {
        if let Ok(Some(_)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            result = Err(err);
            break;
        }
        if socket.exists() {
            let (ok, out) = run(Command::new(agent_bin())
                .arg("--socket")
                .arg(&socket)
                .args(["status", "--json"]));
            result = if ok {
                Ok(thread_caps(child.id()))
            } else {
                Err(out)
            };
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    xtask::cmd::signal_then_wait(&mut child, libc::SIGINT, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn the_agent_runs_unprivileged_with_exactly_the_units_capabilities() {
    require_root();
    let caps = unit_capabilities();
    assert_eq!(caps, ["bpf", "net_admin", "perfmon"]);
    let pair = Pair::new();
    let running = start_with(&pair, &caps).unwrap_or_else(|e| panic!("with {caps:?}: {e}"));
    // Once attached, the agent holds no capability at all, in any thread.
    assert!(!running.is_empty());
    for l in &running {
        assert!(
            l.ends_with(" 0000000000000000"),
            "after attach: {running:?}"
        );
    }
    // Each one is needed: without it, loading fails with a clear error.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| c != &missing).cloned().collect();
        let err = start_with(&pair, &fewer).expect_err(&format!("must fail without {missing}"));
        assert!(
            err.starts_with("monitor: starting the monitor") && err.trim_end().lines().count() == 1,
            "without {missing}: {err}"
        );
        assert!(!err.contains("panicked"), "without {missing}: {err}");
    }
}

#[test]
fn the_unprivileged_agent_pins_its_state_in_a_directory_it_owns() {
    require_root();
    let caps = unit_capabilities();
    let pair = Pair::new();
    // A bpffs of the test's own (`ip netns exec` hides /sys/fs/bpf), its pin
    // directory given to `nobody`, as the unit's ExecStartPre does.
    let mnt = format!("/run/dt-bpffs-{}", pair.server.name);
    std::fs::create_dir_all(&mnt).unwrap();
    let (ok, out) = run(Command::new("mount").args(["-t", "bpf", "bpf", &mnt]));
    assert!(ok, "{out}");
    let dir = format!("{mnt}/activesync-monitor");
    std::fs::create_dir_all(&dir).unwrap();
    let _ = Command::new("chown").args(["nobody", &dir]).status();
    let started = start_with_args(&pair, &caps, &["--pin-path", &dir]);
    let pinned: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let (un, un_out) = run(Command::new(agent_bin()).args(["uninstall", "--pin-path", &dir]));
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(&mnt);
    started.unwrap_or_else(|e| panic!("as nobody with a pin path: {e}"));
    for want in ["FLOWS", "HALF_OPEN", "EVENTS", "COUNTERS"] {
        assert!(
            pinned.iter().any(|p| p == want),
            "{want} pinned: {pinned:?}"
        );
    }
    assert_eq!(
        pinned.iter().filter(|p| p.starts_with("link-")).count(),
        2,
        "{pinned:?}"
    );
    assert!(un, "{un_out}");
}
