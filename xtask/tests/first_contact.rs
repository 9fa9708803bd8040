//! The README's two commands as a newcomer meets them: `cargo xtask demo`
//! and `cargo xtask test`, run by root and by an unprivileged user (nobody,
//! through setpriv), with and without sudo. The real binary, stopped at its
//! first root step: what it asks of sudo, and its one-line errors.
//! Run as root (setpriv needs it), as `cargo xtask test` does.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use xtask::elevate::find_in_path;

const NOBODY: &str = "65534";

/// A scratch directory nobody can write to; removed on every exit path.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xtask-first-contact-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        Scratch(dir)
    }

    /// A `sudo` that writes its arguments to `sudo.log` and refuses
    /// (as a wrong password would), so the run stops at its first use.
    fn fake_sudo(&self) -> PathBuf {
        let sudo = self.0.join("bin/sudo");
        fs::create_dir_all(sudo.parent().unwrap()).unwrap();
        let log = self.0.join("sudo.log");
        fs::write(
            &sudo,
            format!("#!/bin/sh\necho \"$*\" >> '{}'\nexit 1\n", log.display()),
        )
        .unwrap();
        fs::set_permissions(&sudo, fs::Permissions::from_mode(0o755)).unwrap();
        sudo
    }

    fn sudo_log(&self) -> String {
        fs::read_to_string(self.0.join("sudo.log")).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests switch to the user nobody with setpriv: run them as root"
    );
}

/// `xtask <args>` as nobody, with only `path` on PATH.
fn as_nobody(args: &[&str], path: &Path, home: &Path) -> Output {
    let setpriv = find_in_path("setpriv").expect("setpriv (util-linux)");
    Command::new(setpriv)
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .output()
        .unwrap()
}

/// The run failed with exactly one line on stderr, `error: …`; that line.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn a_user_without_sudo_is_told_in_one_line_to_run_as_root() {
    require_root();
    let scratch = Scratch::new();
    let empty = scratch.0.join("bin");
    fs::create_dir_all(&empty).unwrap();
    for (cmd, what) in [("demo", "the demo"), ("test", "the tests")] {
        let out = as_nobody(&[cmd], &empty, &scratch.0);
        let e = one_line_error(&out);
        assert!(e.starts_with(&format!("error: {what} needs root")), "{e}");
        assert!(e.trim_end().ends_with("run it as root"), "{e}");
        assert!(out.stdout.is_empty(), "nothing done before the error");
    }
}

#[test]
fn a_user_with_sudo_is_asked_for_the_password_before_anything_else() {
    require_root();
    for cmd in ["demo", "test"] {
        let scratch = Scratch::new();
        let sudo = scratch.fake_sudo();
        let out = as_nobody(&[cmd], sudo.parent().unwrap(), &scratch.0);
        let e = one_line_error(&out);
        assert!(e.starts_with("error: sudo refused"), "{e}");
        // Passwordless first, then the prompt: nothing built or installed yet.
        assert_eq!(scratch.sudo_log(), "-n true\n-v\n", "{cmd}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout,
            format!("{cmd}: the root steps run through sudo; it asks for your password now\n")
        );
    }
}

/// Root runs every step itself: a sudo on PATH is never called. `setup`
/// (the demo's set-up, the same decision as both commands) on a machine
/// set up already: one line per step, each with its duration.
#[test]
fn root_never_calls_sudo_and_sees_one_line_per_step() {
    require_root();
    let scratch = Scratch::new();
    let sudo = scratch.fake_sudo();
    let path = std::env::join_paths(
        std::iter::once(sudo.parent().unwrap().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("setup")
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(scratch.sudo_log(), "");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for l in lines {
        assert!(l.starts_with("setup: "), "{l}");
        assert!(l.ends_with(" s)"), "a duration: {l}");
    }
}
