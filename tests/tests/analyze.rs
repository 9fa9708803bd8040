//! `monitor analyze` on a day of a busy server runs in flat memory: the real
//! binary over synthetic captures of 100,000 and 10,000,000 packets (the
//! first a prefix of the second: same seed), peak RSS of each compared.
//!
//! Needs the binary: `cargo build -p monitor --bin monitor` (or
//! `cargo build --bins`) before `cargo test -p monitor-tests --test analyze`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use monitor::analyze::synthetic::{self, Spec, Written};

/// The `monitor` binary `cargo build --bins` made.
fn monitor_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/monitor");
    assert!(
        bin.exists(),
        "build the binary first (cargo build -p monitor --bin monitor): {bin:?}"
    );
    bin
}

/// A directory removed with everything in it when the test ends, even by a panic.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the temp directory");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One run of `monitor analyze`: its peak resident set and wall time.
struct Run {
    peak_rss_kib: i64,
    seconds: f64,
    output: String,
}

/// Run `monitor analyze` on `capture` and wait for it with wait4(2): the
/// kernel's own account of that child's peak RSS (ru_maxrss), not a sample.
// Reaped by wait4, which std's wait cannot do: it gives no rusage.
#[allow(clippy::zombie_processes)]
fn analyze_measured(capture: &Path, out: &Path) -> Run {
    let started = Instant::now();
    let child = Command::new(monitor_bin())
        .args(["analyze", "--port", "443"])
        .arg(capture)
        .stdout(Stdio::from(
            std::fs::File::create(out).expect("output file"),
        ))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn monitor analyze");
    let mut status = 0;
    // SAFETY: plain syscall on our own child; both pointers are to locals.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(
        pid,
        child.id() as i32,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    let seconds = started.elapsed().as_secs_f64();
    let output = std::fs::read_to_string(out).expect("read the analysis");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "monitor analyze {capture:?} failed ({status:#x}):\n{output}"
    );
    Run {
        peak_rss_kib: ru.ru_maxrss,
        seconds,
        output,
    }
}

fn generate(dir: &Path, packets: u64) -> (PathBuf, Written, f64) {
    let path = dir.join(format!("busy-{packets}.pcap"));
    let started = Instant::now();
    let w = synthetic::write(&path, &Spec::busy(14, packets)).expect("write the capture");
    (path, w, started.elapsed().as_secs_f64())
}

#[test]
fn a_day_of_a_busy_server_is_analysed_in_the_memory_of_fifteen_minutes() {
    let dir = TempDir::new("analyze-rss");
    let mut runs = Vec::new();
    for packets in [100_000, 10_000_000] {
        let (capture, w, gen_s) = generate(&dir.0, packets);
        let run = analyze_measured(&capture, &dir.0.join(format!("out-{packets}.txt")));
        eprintln!(
            "{packets} packets ({} connections, {:.0} s of traffic, {:.0} MB): generated in {gen_s:.1} s; \
             analysed in {:.1} s, peak RSS {} KiB",
            w.connections,
            w.span_seconds,
            w.bytes as f64 / 1e6,
            run.seconds,
            run.peak_rss_kib
        );
        assert!(
            run.output
                .starts_with(&format!("capture: {packets} packets")),
            "{}",
            run.output
        );
        let _ = std::fs::remove_file(&capture);
        runs.push(run);
    }
    let (small, big) = (&runs[0], &runs[1]);
    eprintln!("10 M packets report:\n{}", big.output);
    assert!(
        big.output.contains("verdict(s) not listed"),
        "the verdict list is bounded: {}",
        big.output
    );
    assert!(
        big.peak_rss_kib <= 2 * small.peak_rss_kib,
        "peak RSS grew with the capture: {} KiB for 100 k packets, {} KiB for 10 M",
        small.peak_rss_kib,
        big.peak_rss_kib
    );
}
