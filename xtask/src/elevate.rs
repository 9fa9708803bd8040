//! Root for the steps that need it, and only those. The commands run as
//! whoever typed them; installing Debian packages, the lab and the kernel
//! tests run as root: in this process when it is root already, otherwise
//! through sudo with the user's PATH, HOME, CARGO_HOME and RUSTUP_HOME kept
//! (rustup's cargo is per user: `sudo cargo` does not find it). Building
//! never runs as root for a user, so `target/` and `~/.cargo` stay theirs.

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

use crate::cmd;

/// How this run gets root for the steps that need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Elevation {
    /// Already root: every step runs in this process.
    Root,
    /// A user with sudo: the root steps run through it.
    Sudo(PathBuf),
}

/// Directories of root's tools (`ip`, `nft`, `sysctl`, `haproxy`) that a
/// user's PATH often lacks; added after the user's own.
const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The variables the root steps keep from the user's environment, so that
/// rustup's cargo and its toolchains are found.
const KEPT_VARS: &[&str] = &["HOME", "CARGO_HOME", "RUSTUP_HOME"];

/// The decision, pure: root runs as is; a user needs sudo; without it the
/// one-line answer is to run as root. `what` names the command for that line.
pub fn decide(euid: u32, sudo: Option<PathBuf>, what: &str) -> Result<Elevation> {
    match (euid, sudo) {
        (0, _) => Ok(Elevation::Root),
        (_, Some(sudo)) => Ok(Elevation::Sudo(sudo)),
        (_, None) => bail!(
            "{what} needs root (network namespaces, eBPF, Debian packages) and there is no sudo here: run it as root"
        ),
    }
}

/// [`decide`] for this process and this PATH.
pub fn detect(what: &str) -> Result<Elevation> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    decide(euid, find_in_path("sudo"), what)
}

/// The first executable `name` on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The user's PATH with root's tool directories appended when missing.
pub fn kept_path(user_path: &OsStr) -> OsString {
    let mut dirs: Vec<PathBuf> = env::split_paths(user_path).collect();
    for d in SBIN_DIRS {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    env::join_paths(dirs).unwrap_or_else(|_| user_path.to_owned())
}

impl Elevation {
    pub fn is_root(&self) -> bool {
        *self == Elevation::Root
    }

    /// The words that run a program as root: nothing when root; otherwise
    /// `sudo env PATH=… HOME=… …` (`env` rather than `--preserve-env`, which
    /// sudo's `secure_path` overrides for PATH).
    pub fn prefix(&self) -> Vec<OsString> {
        let Elevation::Sudo(sudo) = self else {
            return Vec::new();
        };
        let mut words = vec![sudo.clone().into_os_string(), "env".into()];
        let mut path = OsString::from("PATH=");
        path.push(kept_path(&env::var_os("PATH").unwrap_or_default()));
        words.push(path);
        for var in KEPT_VARS {
            if let Some(v) = env::var_os(var) {
                let mut kv = OsString::from(format!("{var}="));
                kv.push(v);
                words.push(kv);
            }
        }
        words
    }

    /// `program` as root.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut words = self.prefix();
        words.push(program.as_ref().to_owned());
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd
    }

    /// Ask for sudo's password now, once, rather than after a build of
    /// several minutes; nothing to do as root or with passwordless sudo.
    pub fn ask_up_front(&self, what: &str) -> Result<()> {
        let Elevation::Sudo(sudo) = self else {
            return Ok(());
        };
        if cmd::output(Command::new(sudo).args(["-n", "true"])).is_ok() {
            return Ok(());
        }
        println!("{what}: the root steps run through sudo; it asks for your password now");
        if cmd::run(Command::new(sudo).arg("-v")).is_err() {
            bail!("sudo refused: {what} needs root for the lab and the Debian packages (or run it as root)");
        }
        Ok(())
    }
}

/// `cargo test`, whose test binaries run as root (the kernel tests need
/// it) while cargo builds them as the user: sudo as cargo's runner.
pub fn cargo_test(root: &Elevation) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.arg("test");
    if !root.is_root() {
        cmd.arg("--config")
            .arg(runner_config(&host_triple()?, root));
    }
    Ok(cmd)
}

/// `target.<host>.runner = ["sudo", "env", "PATH=…", …]`, for `--config`.
fn runner_config(host: &str, root: &Elevation) -> String {
    let words: Vec<String> = root
        .prefix()
        .iter()
        .map(|w| serde_json::Value::from(w.to_string_lossy()).to_string())
        .collect();
    format!("target.{host}.runner=[{}]", words.join(","))
}

fn host_triple() -> Result<String> {
    let vv = cmd::output(Command::new("rustc").arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("`rustc -vV` did not say the host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_never_goes_through_sudo() {
        let sudo = Some(PathBuf::from("/usr/bin/sudo"));
        assert_eq!(decide(0, sudo, "the demo").unwrap(), Elevation::Root);
        assert_eq!(decide(0, None, "the demo").unwrap(), Elevation::Root);
        assert!(Elevation::Root.prefix().is_empty());
    }

    #[test]
    fn a_user_with_sudo_elevates_through_it() {
        let sudo = PathBuf::from("/usr/bin/sudo");
        assert_eq!(
            decide(1000, Some(sudo.clone()), "the tests").unwrap(),
            Elevation::Sudo(sudo)
        );
    }

    #[test]
    fn a_user_without_sudo_is_told_in_one_line_to_run_as_root() {
        let e = decide(1000, None, "the demo").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("the demo needs root"), "{e}");
        assert!(e.ends_with("run it as root"), "{e}");
    }

    #[test]
    fn the_kept_path_is_the_users_then_roots_tools() {
        let kept = kept_path(OsStr::new("/home/u/.cargo/bin:/usr/bin:/sbin"));
        assert_eq!(
            kept,
            OsStr::new("/home/u/.cargo/bin:/usr/bin:/sbin:/usr/local/sbin:/usr/sbin")
        );
    }

    #[test]
    fn a_root_step_runs_under_sudo_with_the_users_path() {
        let words = Elevation::Sudo(PathBuf::from("/usr/bin/sudo")).prefix();
        assert_eq!(words[0], "/usr/bin/sudo");
        assert_eq!(words[1], "env");
        let path = words[2].to_string_lossy();
        let user_path = env::var("PATH").unwrap_or_default();
        assert!(path.starts_with(&format!("PATH={user_path}")), "{path}");
        assert_eq!(
            words
                .iter()
                .any(|w| w.to_string_lossy().starts_with("HOME=")),
            env::var_os("HOME").is_some()
        );
    }

    #[test]
    fn the_test_runner_is_sudo_with_the_users_path_as_a_toml_array() {
        let c = runner_config(
            "x86_64-unknown-linux-gnu",
            &Elevation::Sudo(PathBuf::from("/usr/bin/sudo")),
        );
        assert!(
            c.starts_with(
                r#"target.x86_64-unknown-linux-gnu.runner=["/usr/bin/sudo","env","PATH="#
            ),
            "{c}"
        );
        assert!(c.ends_with("\"]"), "{c}");
    }
}
