//! The Debian package as an operator gets it: built by `cargo xtask package`,
//! installed with `apt-get install ./….deb`, its unit verified, its binary,
//! man page and completions in place, then purged without a trace. systemd is
//! not PID 1 on these machines, so the unit cannot be started: its ExecStart
//! runs instead under a uid of systemd's DynamicUser range with exactly the
//! unit's capabilities. Needs root; skipped (with a message) otherwise.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use monitor_tests::run_output as run;
use xtask::package::{BINARY, CONFFILE, PACKAGE};

const UNIT: &str = "/usr/lib/systemd/system/activesync-monitor.service";
const PIN_DIR: &str = "/sys/fs/bpf/activesync-monitor";
/// The first uid systemd hands out to a DynamicUser= service.
const DYNAMIC_UID: &str = "61184";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn must(cmd: &mut Command) -> String {
    let (ok, out) = run(cmd);
    assert!(ok, "{cmd:?} failed: {out}");
    out
}

fn apt_get(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-y"])
        .args(args);
    cmd
}

fn installed() -> bool {
    run(Command::new("dpkg").args(["-s", PACKAGE])).0
}

/// Purges the package on every way out of the test, a failed assertion too.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() {
            let _ = apt_get(&["purge", PACKAGE]).output();
        }
    }
}

/// The unit's `Key=` value, from the installed file.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

/// `-all,+bpf,+net_admin,+perfmon` from `CAP_BPF CAP_NET_ADMIN CAP_PERFMON`.
fn setpriv_caps(ambient: &str) -> String {
    let caps: Vec<String> = ambient
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all,{}", caps.join(","))
}

/// The unit's ExecStart (plus `--print-config`: load and validate the
/// conffile, then exit) as its dynamic user with only its capabilities.
fn exec_start_as_the_units_user(unit: &str) -> String {
    let exec: Vec<String> = unit_value(unit, "ExecStart")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(exec[0], BINARY, "ExecStart runs the packaged binary");
    let set = setpriv_caps(&unit_value(unit, "AmbientCapabilities"));
    assert_eq!(set, "-all,+bpf,+net_admin,+perfmon");
    must(
        Command::new("setpriv")
            .args([
                &format!("--reuid={DYNAMIC_UID}"),
                &format!("--regid={DYNAMIC_UID}"),
                "--clear-groups",
                "--no-new-privs",
                &format!("--inh-caps={set}"),
                &format!("--ambient-caps={set}"),
                &format!("--bounding-set={set}"),
            ])
            .args(&exec)
            .arg("--print-config"),
    )
}

/// What `dpkg -L` lists: every path the package owns.
fn owned_paths() -> Vec<PathBuf> {
    must(Command::new("dpkg").args(["-L", PACKAGE]))
        .lines()
        .filter(|l| l.starts_with('/') && *l != "/.")
        .map(PathBuf::from)
        .collect()
}

/// Paths of the package still there after the purge: a directory another
/// package owns too (`/usr/bin`) may stay; nothing else.
fn left_behind(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .filter(|p| !(p.is_dir() && run(Command::new("dpkg").arg("-S").arg(p)).0))
        .cloned()
        .collect()
}

/// dpkg's own records of the package (`/var/lib/dpkg/info/activesync-monitor.*`).
fn dpkg_records() -> Vec<String> {
    std::fs::read_dir("/var/lib/dpkg/info")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{PACKAGE}.")))
        .collect()
}

fn check_man_page() {
    if run(Command::new("man").arg("--version")).0 {
        let at = must(Command::new("man").args(["-w", PACKAGE]));
        // man resolves the link to the page it points at (monitor.1.gz).
        let page = Path::new(at.trim());
        assert!(
            page.is_file() && at.trim().ends_with("monitor.1.gz"),
            "{at}"
        );
    } else {
        eprintln!("no man(1) here: checking the file instead");
    }
    assert!(Path::new("/usr/share/man/man1/monitor.1.gz").is_file());
}

fn install(deb: &Path) -> Vec<PathBuf> {
    must(apt_get(&["install"]).arg(deb));
    let conffiles = must(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
    assert!(conffiles.contains(CONFFILE), "conffiles: {conffiles}");
    owned_paths()
}

fn check_installed(files: &[PathBuf]) {
    for f in [
        "/usr/share/activesync-monitor/prometheus/rules.yml",
        "/usr/share/activesync-monitor/grafana/activesync-monitor.json",
        "/usr/share/bash-completion/completions/monitor",
        UNIT,
        CONFFILE,
    ] {
        assert!(files.contains(&PathBuf::from(f)), "{f} not in dpkg -L");
    }
    let version = must(Command::new(BINARY).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("monitor {}", env!("CARGO_PKG_VERSION"))
    );
    let verify = must(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(verify.trim().is_empty(), "systemd-analyze verify: {verify}");
    let unit = std::fs::read_to_string(UNIT).expect("the installed unit");
    let config = exec_start_as_the_units_user(&unit);
    assert!(config.contains("interfaces"), "{config}");
    check_man_page();
}

#[test]
fn the_debian_package_installs_runs_and_purges_without_a_trace() {
    if !is_root() {
        eprintln!("skipped: installing a Debian package needs root (run the tests as root)");
        return;
    }
    assert!(
        !installed(),
        "{PACKAGE} is installed already: purge it first"
    );
    let pins_before = Path::new(PIN_DIR).exists();
    let deb = xtask::package::build().unwrap_or_else(|e| panic!("{e:#}"));
    let size = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
    eprintln!("{}: {} KiB", deb.display(), size / 1024);
    let _purge = Purge;
    let files = install(&deb);
    check_installed(&files);
    must(&mut apt_get(&["purge", PACKAGE]));
    let (still, status) = run(Command::new("dpkg").args(["-s", PACKAGE]));
    assert!(!still, "dpkg still knows the package: {status}");
    assert_eq!(dpkg_records(), Vec::<String>::new());
    assert_eq!(left_behind(&files), Vec::<PathBuf>::new());
    assert!(
        pins_before || !Path::new(PIN_DIR).exists(),
        "{PIN_DIR} left behind"
    );
}
