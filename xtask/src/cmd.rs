//! Running external programs, the one way every task does it: run and fail
//! with a one-line error that names the command, capture output, run inside
//! a network namespace, and stop a child (signal, bounded wait, SIGKILL).

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};

/// How many lines of a failed command's stderr its error quotes.
const STDERR_TAIL_LINES: usize = 3;

/// The command as a shell line, for messages: `ip netns exec lab1-r1 sh -c 'nft …'`.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c)) {
        s.into_owned()
    } else if !s.contains('\'') {
        format!("'{s}'")
    } else {
        format!("{s:?}")
    }
}

/// The last lines of `stderr`, on one line.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join(" | ")
}

/// Run `cmd` with the terminal's stdin, stdout and stderr; fail unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running `{}`", describe(cmd)))?;
    if !status.success() {
        return Err(anyhow!("`{}` failed: {status}", describe(cmd)));
    }
    Ok(())
}

/// Run `cmd` and return its stdout; fail unless it succeeds, quoting the tail of its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running `{}`", describe(cmd)))?;
    if !out.status.success() {
        return Err(anyhow!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            tail(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `cmd` with its output kept back: nothing shown when it succeeds; all
/// of it (stdout, then stderr) when it fails, so the error is readable.
/// `XTASK_VERBOSE=1` shows it as it comes.
pub fn quiet(cmd: &mut Command) -> Result<()> {
    if std::env::var_os("XTASK_VERBOSE").is_some_and(|v| v == "1") {
        return run(cmd);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running `{}`", describe(cmd)))?;
    if !out.status.success() {
        use std::io::Write;
        crate::progress::break_line();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&out.stdout);
        let _ = err.write_all(&out.stderr);
        return Err(anyhow!(
            "`{}` failed ({}): its output is above",
            describe(cmd),
            out.status
        ));
    }
    Ok(())
}

/// `cargo <args>` in the current directory, with the terminal's output.
pub fn cargo(args: &[&str]) -> Result<()> {
    run(&mut clean_cargo(args))
}

/// Variables cargo sets for the package it runs (a test, xtask): build
/// scripts that watch them (ring's `CARGO_PKG_NAME`) would rebuild whenever
/// a nested build is started from another package.
const PER_PACKAGE_VARS: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
];

/// `cargo <args>` without the calling package's variables: the same build
/// from `cargo xtask` and from a test is the same build.
fn clean_cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if PER_PACKAGE_VARS.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&*k);
        }
    }
    cmd.args(args);
    cmd
}

/// Run `args` (program first); panic with the error if it fails. For set-up
/// steps whose failure leaves nothing sensible to do (tests, lab wiring).
pub fn sh(args: &[&str]) {
    if let Err(e) = output(Command::new(args[0]).args(&args[1..])) {
        panic!("{e:#}");
    }
}

/// `ip netns exec <ns>`: add the program and its arguments.
pub fn in_netns(ns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    cmd
}

/// `ip netns exec <ns>` for a long-running child (a middlebox, the agent,
/// tcpdump): it dies with the thread that starts it ([`die_with_parent`]).
pub fn child_in_netns(ns: &str) -> Command {
    let mut cmd = in_netns(ns);
    die_with_parent(&mut cmd);
    cmd
}

/// Run the shell `script` inside namespace `ns`; its stdout.
pub fn sh_in(ns: &str, script: &str) -> Result<String> {
    output(in_netns(ns).args(["sh", "-c", script]))
}

/// Make a child die with the thread that starts it (SIGTERM), so a lab whose
/// process is killed leaves no middlebox or agent running. The setting
/// survives the exec of `ip netns exec`.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// How a child ended under [`signal_then_wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself, or on the signal, within the bound.
    Exited(ExitStatus),
    /// It outlived the bound: killed with SIGKILL and reaped.
    Killed,
}

/// Send `signal` to `child` (unless it has already exited), wait up to
/// `limit` for it to exit, then SIGKILL and reap it. The child is always
/// reaped when this returns.
pub fn signal_then_wait(child: &mut Child, signal: libc::c_int, limit: Duration) -> Ended {
    if let Ok(Some(st)) = child.try_wait() {
        return Ended::Exited(st);
    }
    // SAFETY: signalling our own child, which has not been reaped (so its pid is still its own).
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Ended::Exited(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ended::Killed
}

/// SIGKILL `child` at once and reap it (no chance to clean up).
pub fn kill_and_reap(child: &mut Child) {
    signal_then_wait(child, libc::SIGKILL, Duration::ZERO);
}

/// The repository's top directory (the parent of xtask's).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_what_a_shell_would_split() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo it's", "plain", ""]);
        assert_eq!(describe(&c), r#"sh -c "echo it's" plain ''"#);
    }

    #[test]
    fn a_failure_names_the_command_status_and_stderr_tail() {
        let e = output(Command::new("sh").args(["-c", "echo a >&2; echo b >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "`sh -c 'echo a >&2; echo b >&2; exit 3'` failed (exit status: 3): a | b"
        );
        assert!(run(&mut Command::new("false")).is_err());
        assert_eq!(output(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }

    #[test]
    fn a_quiet_command_says_nothing_unless_it_fails() {
        assert!(quiet(Command::new("sh").args(["-c", "echo chatter"])).is_ok());
        let e = quiet(Command::new("sh").args(["-c", "echo why >&2; exit 2"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("failed (exit status: 2): its output is above"),
            "{e}"
        );
    }

    #[test]
    fn signal_then_wait_stops_and_reaps() {
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        let ended = signal_then_wait(&mut c, libc::SIGTERM, Duration::from_secs(5));
        assert!(matches!(ended, Ended::Exited(st) if !st.success()));
        // A shell that ignores SIGTERM is killed at the bound.
        let mut c = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let ended = signal_then_wait(&mut c, libc::SIGTERM, Duration::from_millis(300));
        assert_eq!(ended, Ended::Killed);
        assert!(c.try_wait().unwrap().is_some(), "reaped");
    }
}
