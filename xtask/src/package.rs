//! `cargo xtask package`: the static binary (musl: it runs on any Linux of
//! this architecture, whatever its libc) and the Debian package around it,
//! staged here and built with `dpkg-deb` (part of dpkg): the binary, the
//! systemd unit, the example configuration as a conffile, the man page and
//! shell completions the binary prints itself (`monitor manpage`,
//! `monitor completions`), the Prometheus rules and the Grafana dashboard.

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{cargo, output, quiet, workspace_root},
    setup::static_target,
};

/// The package's name, its unit's and its directories'.
pub const PACKAGE: &str = "activesync-monitor";

/// Where the binary is installed; the unit in `deploy/` names `/usr/local/bin`.
pub const BINARY: &str = "/usr/bin/monitor";

/// The conffile: dpkg keeps an operator's edits across upgrades.
pub const CONFFILE: &str = "/etc/activesync-monitor/monitor.toml";

/// Files copied as they are: (from the workspace, to under the root).
const COPIED: &[(&str, &str)] = &[
    ("deploy/monitor.toml", "etc/activesync-monitor/monitor.toml"),
    (
        "deploy/prometheus/rules.yml",
        "usr/share/activesync-monitor/prometheus/rules.yml",
    ),
    (
        "deploy/prometheus/rules.test.yml",
        "usr/share/activesync-monitor/prometheus/rules.test.yml",
    ),
    (
        "deploy/grafana/activesync-monitor.json",
        "usr/share/activesync-monitor/grafana/activesync-monitor.json",
    ),
    (
        "deploy/grafana/provisioning.yml",
        "usr/share/activesync-monitor/grafana/provisioning.yml",
    ),
    (
        "deploy/debian/copyright",
        "usr/share/doc/activesync-monitor/copyright",
    ),
];

/// Shell completions: (the shell as `monitor completions` names it, to).
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/monitor"),
    ("zsh", "usr/share/zsh/vendor-completions/_monitor"),
    ("fish", "usr/share/fish/vendor_completions.d/monitor.fish"),
];

const MAINTAINER_SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

const UNIT: &str = "usr/lib/systemd/system/activesync-monitor.service";

/// Where [`static_binary`] puts the release artefact.
pub fn dist_binary() -> PathBuf {
    workspace_root().join("target/dist/monitor")
}

/// The release artefact: the static binary, stripped, at [`dist_binary`].
pub fn static_binary() -> Result<PathBuf> {
    let target = static_target();
    cargo(&[
        "build",
        "--release",
        "--target",
        &target,
        "-p",
        "monitor",
        "--bin",
        "monitor",
    ])?;
    let ws = workspace_root();
    let dist = dist_binary();
    install(
        &ws.join("target").join(&target).join("release/monitor"),
        &dist,
        0o755,
    )?;
    quiet(Command::new("strip").arg("--strip-unneeded").arg(&dist))?;
    let headers = output(
        Command::new("readelf")
            .args(["--program-headers", "--wide"])
            .arg(&dist),
    )?;
    if !is_static(&headers) {
        bail!(
            "{} asks for a dynamic loader: it is not static",
            dist.display()
        );
    }
    Ok(dist)
}

/// An ELF executable without a program interpreter needs no dynamic loader
/// and no shared library: it is static.
pub fn is_static(readelf_program_headers: &str) -> bool {
    readelf_program_headers.contains("LOAD")
        && !readelf_program_headers
            .lines()
            .any(|l| l.trim_start().starts_with("INTERP"))
}

/// Build the static binary and the package; the .deb's path
/// (`target/debian/activesync-monitor_<version>_<arch>.deb`).
pub fn build() -> Result<PathBuf> {
    let bin = static_binary()?;
    let ws = workspace_root();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("{PACKAGE}_{}_{}", env!("CARGO_PKG_VERSION"), arch.trim());
    let out = ws.join("target/debian");
    let stage = Stage::new(out.join(&name))?;
    fill(&ws, &bin, &stage.0, arch.trim())?;
    let deb = out.join(format!("{name}.deb"));
    quiet(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage.0)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The staging directory, removed on every way out.
struct Stage(PathBuf);

impl Stage {
    fn new(dir: PathBuf) -> Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        mkdir(&dir)?;
        Ok(Stage(dir))
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fill(ws: &Path, built: &Path, root: &Path, arch: &str) -> Result<()> {
    let bin = root.join(BINARY.trim_start_matches('/'));
    install(built, &bin, 0o755)?;
    for (from, to) in COPIED {
        install(&ws.join(from), &root.join(to), 0o644)?;
    }
    let unit = read(&ws.join("deploy/systemd/activesync-monitor.service"))?;
    write(&root.join(UNIT), &packaged_unit(&unit)?, 0o644)?;
    man_page(&bin, root)?;
    for (shell, to) in COMPLETIONS {
        let text = output(Command::new(&bin).args(["completions", shell]))?;
        write(&root.join(to), &text, 0o644)?;
    }
    control(ws, root, arch)
}

/// `monitor manpage`, compressed as Debian wants, and under the package's
/// name too (`man activesync-monitor`).
fn man_page(bin: &Path, root: &Path) -> Result<()> {
    let dir = root.join("usr/share/man/man1");
    let page = dir.join("monitor.1");
    write(&page, &output(Command::new(bin).arg("manpage"))?, 0o644)?;
    quiet(Command::new("gzip").args(["-9n"]).arg(&page))?;
    symlink("monitor.1.gz", dir.join(format!("{PACKAGE}.1.gz")))
        .context("linking the man page under the package's name")
}

/// The unit as shipped: the packaged binary's path in place of `/usr/local/bin`.
pub fn packaged_unit(unit: &str) -> Result<String> {
    const FROM: &str = "/usr/local/bin/monitor";
    if !unit.contains(&format!("ExecStart={FROM} ")) {
        bail!("the unit's ExecStart no longer runs {FROM}: update the packaging");
    }
    Ok(unit.replace(FROM, BINARY))
}

fn control(ws: &Path, root: &Path, arch: &str) -> Result<()> {
    let debian = root.join("DEBIAN");
    mkdir(&debian)?;
    let kib = installed_size_kib(root)?;
    write(&debian.join("control"), &control_text(arch, kib), 0o644)?;
    write(&debian.join("conffiles"), &format!("{CONFFILE}\n"), 0o644)?;
    for s in MAINTAINER_SCRIPTS {
        install(&ws.join("deploy/debian").join(s), &debian.join(s), 0o755)?;
    }
    Ok(())
}

/// No `Depends:`: the binary is static.
fn control_text(arch: &str, kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {}\n\
         Architecture: {arch}\n\
         Maintainer: activesync-monitor maintainers <root@localhost>\n\
         Installed-Size: {kib}\n\
         Section: net\n\
         Priority: optional\n\
         Description: eBPF agent that finds middleboxes killing ActiveSync connections\n \
         Sees which firewall, NAT or load balancer kills long-lived TCP\n \
         connections (ActiveSync Direct Push) before the device's heartbeat,\n \
         after how long, how, and what to set it to. Exports Prometheus metrics.\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn installed_size_kib(root: &Path) -> Result<u64> {
    let du = output(
        Command::new("du")
            .args(["-sk", "--apparent-size"])
            .arg(root),
    )?;
    du.split_whitespace()
        .next()
        .and_then(|k| k.parse().ok())
        .context("reading du's size")
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    mkdirs_to(to)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    chmod(to, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    mkdirs_to(to)?;
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    chmod(to, mode)
}

/// Every directory above `file`, each 0755 whatever the umask.
fn mkdirs_to(file: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut dir = file.parent();
    while let Some(d) = dir.filter(|d| !d.exists()) {
        missing.push(d.to_path_buf());
        dir = d.parent();
    }
    missing.iter().rev().try_for_each(|d| mkdir(d))
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_with_a_program_interpreter_is_not_static() {
        let dynamic = "Program Headers:\n  PHDR 0x40\n  INTERP 0x318\n      \
                       [Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]\n  LOAD 0x0\n";
        let static_ = "Program Headers:\n  LOAD 0x0\n  LOAD 0x1000\n  TLS 0x2000\n";
        assert!(!is_static(dynamic));
        assert!(is_static(static_));
        assert!(!is_static("not an ELF file"));
    }

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary() {
        let unit = read(&workspace_root().join("deploy/systemd/activesync-monitor.service"))
            .expect("the unit");
        let packaged = packaged_unit(&unit).expect("the unit's ExecStart");
        assert!(packaged.contains(&format!("ExecStart={BINARY} run --config {CONFFILE}")));
        assert!(!packaged.contains("/usr/local"));
        assert!(packaged_unit("ExecStart=/opt/monitor run").is_err());
    }
}
