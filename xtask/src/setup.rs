//! `cargo xtask setup`: what a fresh machine of this kind lacks, per command
//! (the demo needs less than the tests), done idempotently: each step checks
//! first, so a second run takes a second. One line per step, with its
//! duration; an installer's output only when it fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{output, quiet, run},
    elevate::Elevation,
    progress::step,
};

/// What a command needs set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Building the agent: the nightly's rust-src and bpf-linker (from source).
    Build,
    /// The demo: building, and the lab's packages.
    Demo,
    /// The demo with `--png`: also gnuplot.
    DemoPlot,
    /// The Debian package and the static binary: building for the musl
    /// target (its C compiler for `ring`), strip and readelf.
    Package,
    /// The container image: the package's needs and podman.
    Image,
    /// The tests, the benchmark, the soak, the fuzzer: everything.
    Everything,
}

/// Who needs a Debian package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// The demo's lab (and the kernel tests).
    Lab,
    /// The demo's `--png` plot.
    Plot,
    /// The static binary and the Debian package.
    Package,
    /// Building and running the container image.
    Image,
    /// Only the tests, the benchmark and the soak.
    Tests,
}

/// Debian packages and who uses them.
const PACKAGES: &[(&str, Use)] = &[
    ("iproute2", Use::Lab),       // ip netns, veth
    ("nftables", Use::Lab),       // lab middleboxes
    ("conntrack", Use::Lab),      // lab middleboxes (inspection)
    ("haproxy", Use::Lab),        // lab full-proxy path, a proxy host
    ("nginx", Use::Lab),          // lab proxy host (reverse proxy)
    ("procps", Use::Lab),         // sysctl
    ("tcpdump", Use::Tests),      // captures for offline analysis
    ("iperf3", Use::Tests),       // throughput benchmark
    ("prometheus", Use::Tests),   // promtool check metrics; the server for the alerting lab
    ("gnuplot-nox", Use::Plot),   // the demo's --png plot
    ("curl", Use::Tests),         // the /metrics TLS and basic-auth test
    ("python3-venv", Use::Tests), // kubernetes-validate's virtualenv
    ("binutils", Use::Package),   // strip, readelf (the binary is static)
    ("musl-tools", Use::Package), // musl-gcc: ring's C for the static binary
    ("man-db", Use::Tests),       // the package test: man -w
    ("podman", Use::Image),       // builds the image (no registry, no daemon)
    ("runc", Use::Tests),         // runs it here (crun refuses this machine's hybrid cgroups)
];

impl Needs {
    fn uses(self, u: Use) -> bool {
        match self {
            Needs::Build => false,
            Needs::Demo => u == Use::Lab,
            Needs::DemoPlot => matches!(u, Use::Lab | Use::Plot),
            Needs::Package => u == Use::Package,
            Needs::Image => matches!(u, Use::Package | Use::Image),
            Needs::Everything => true,
        }
    }

    /// The static binary is part of what these build.
    fn builds_static(self) -> bool {
        matches!(self, Needs::Package | Needs::Image | Needs::Everything)
    }
}

/// The Debian packages `needs` asks for.
pub fn debian_packages(needs: Needs) -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(_, u)| needs.uses(*u))
        .map(|(name, _)| *name)
        .collect()
}

pub const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn check_root() -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: it loads eBPF programs and creates network namespaces (try sudo)");
    }
    Ok(())
}

/// The kernel must have BTF, bpffs and be recent enough for what we use;
/// its release, when it does.
pub fn check_kernel() -> Result<String> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("the kernel has no BTF (/sys/kernel/btf/vmlinux missing): a kernel built with CONFIG_DEBUG_INFO_BTF=y is needed");
    }
    let release =
        fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel release")?;
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    // The agent's floor (README: Kernel support); the kernel tests of TCX need 6.6.
    if (major, minor) < (5, 8) {
        bail!(
            "kernel {} is too old: Linux 5.8 or newer is needed",
            release.trim()
        );
    }
    if !Path::new("/sys/fs/bpf").exists() {
        bail!("/sys/fs/bpf is missing: the kernel lacks BPF filesystem support");
    }
    Ok(format!("Linux {}", release.trim()))
}

fn nightly_has_rust_src() -> Result<bool> {
    let out = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    Ok(out.lines().any(|l| l.starts_with("rust-src")))
}

/// The nightly toolchain with rust-src (the eBPF programs build with
/// `-Z build-std=core`); installed with it when rustup lacks it.
pub fn ensure_rust_src() -> Result<&'static str> {
    match nightly_has_rust_src() {
        Ok(true) => return Ok("already there"),
        Ok(false) => quiet(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ])),
        // No nightly at all: a fresh rustup.
        Err(_) => quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])),
    }
    .context("the eBPF programs build with nightly and -Z build-std=core, which needs rust-src")?;
    Ok("installed")
}

/// The target of the static binary: musl, this machine's architecture.
pub fn static_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// The musl target's standard library for the workspace's toolchain.
pub fn ensure_static_target() -> Result<&'static str> {
    let target = static_target();
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == target) {
        return Ok("already there");
    }
    quiet(Command::new("rustup").args(["target", "add", &target]))
        .with_context(|| format!("adding the {target} target (the static binary)"))?;
    Ok("installed")
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// bpf-linker, built against the nightly toolchain's own libLLVM (there is no
/// prebuilt binary to download here).
pub fn ensure_bpf_linker() -> Result<&'static str> {
    if bpf_linker_ok() {
        return Ok("already there");
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("reading the nightly's LLVM version from rustc -vV")?
        .to_string();
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| format!("no libLLVM.so.{llvm_major}* in {}", lib.display()))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".cache/monitor-setup/llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    // bpf-linker's build links `libLLVM.so`; the binary then needs the
    // library under its soname in its RUNPATH (the prefix), so link both.
    let soname = libllvm.file_name().context("libLLVM file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = prefix.join("lib").join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    }
    quiet(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    Ok("built")
}

/// Those of `wanted` not installed.
pub fn missing_packages(wanted: &[&'static str]) -> Vec<&'static str> {
    wanted
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", p]))
                .is_ok_and(|st| st.starts_with("ii"))
        })
        .collect()
}

/// Install what `wanted` lacks, as root (through sudo for a user).
pub fn ensure_packages(wanted: &[&'static str], root: &Elevation) -> Result<String> {
    let missing = missing_packages(wanted);
    if missing.is_empty() {
        return Ok("already there".into());
    }
    quiet(root.command("apt-get").args(["update", "-q"]))?;
    // Packages with a service (nginx, haproxy, prometheus) must not start
    // it on the host: the lab runs its own in namespaces. A policy denying
    // starts, for the install only, unless the machine has one already.
    let script = format!(
        "if [ ! -e {POLICY} ]; then trap 'rm -f {POLICY}' EXIT; trap 'exit 130' INT TERM HUP; \
         printf '#!/bin/sh\\nexit 101\\n' > {POLICY} && chmod 755 {POLICY}; fi; \
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}",
        missing.join(" ")
    );
    quiet(root.command("sh").args(["-c", &script]))?;
    Ok(format!("installed {}", missing.join(" ")))
}

/// Debian's hook that may deny a package's service start (invoke-rc.d).
const POLICY: &str = "/usr/sbin/policy-rc.d";

/// Only what building the agent needs (from source).
pub fn setup_build() -> Result<()> {
    setup_for(Needs::Build, &Elevation::Root)
}

/// Python packages the deployment checks use (manifest validation).
pub const PYTHON_PACKAGES: &[&str] = &["kubernetes-validate"];

/// Our own virtualenv: Debian's Python refuses pip outside one (PEP 668).
fn python_venv() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/monitor-setup/venv")
}

/// Put the virtualenv's programs on this process's PATH, so the tests find
/// `kubernetes-validate` (cargo passes PATH on; so does the sudo runner).
fn put_venv_on_path() {
    let bin = python_venv().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d == bin) {
        return;
    }
    let dirs = std::iter::once(bin).chain(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(dirs) {
        // Single-threaded here: set-up runs before anything is spawned.
        std::env::set_var("PATH", joined);
    }
}

/// `kubernetes-validate` on PATH (a Python of the user's own) or in our virtualenv.
pub fn ensure_python_packages() -> Result<&'static str> {
    put_venv_on_path();
    if output(Command::new("kubernetes-validate").arg("--version")).is_ok() {
        return Ok("already there");
    }
    let venv = python_venv();
    quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("making a Python virtualenv (Debian package python3-venv)")?;
    quiet(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(PYTHON_PACKAGES),
    )?;
    Ok("installed")
}

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for the fuzz target (`fuzz/`).
pub fn ensure_cargo_fuzz() -> Result<&'static str> {
    let ok = output(Command::new("cargo").args(["fuzz", "--version"])).is_ok();
    if !ok {
        quiet(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
        return Ok("installed");
    }
    Ok("already there")
}

/// Fuzz the shared parser and state machine for `seconds` (libFuzzer under
/// AddressSanitizer, from the committed seeds). A crash fails with its input
/// saved under `fuzz/artifacts/`.
pub fn fuzz(seconds: u64) -> Result<()> {
    let dir = crate::cmd::workspace_root().join("fuzz");
    std::fs::create_dir_all(dir.join("corpus/packets"))?;
    println!("fuzz: the packets target for {seconds} s");
    run(Command::new("cargo")
        .current_dir(&dir)
        .args([
            "+nightly",
            "fuzz",
            "run",
            "packets",
            "corpus/packets",
            "seeds",
            "--",
        ])
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1"))
}

/// What `needs` asks for, in order, one line per step. The per-user tools
/// (rustup's, cargo's) install as the user; Debian packages as root.
pub fn setup_for(needs: Needs, root: &Elevation) -> Result<()> {
    const P: &str = "setup";
    if !matches!(needs, Needs::Build | Needs::Package | Needs::Image) {
        step(P, "kernel: BTF, bpffs, Linux 5.8 or newer", |_| {
            check_kernel()
        })?;
    }
    step(P, "nightly toolchain with rust-src", |s| {
        s.update("installing");
        ensure_rust_src()
    })?;
    step(P, &format!("bpf-linker {BPF_LINKER_VERSION}"), |s| {
        s.update("building (about a minute)");
        ensure_bpf_linker()
    })?;
    let packages = debian_packages(needs);
    if !packages.is_empty() {
        let name = format!("{} Debian packages", packages.len());
        step(P, &name, |s| {
            s.update("checking, installing what is missing");
            ensure_packages(&packages, root)
        })?;
    }
    if needs.builds_static() {
        step(P, &format!("Rust target {}", static_target()), |s| {
            s.update("adding");
            ensure_static_target()
        })?;
    }
    if needs == Needs::Everything {
        step(P, &format!("cargo-fuzz {CARGO_FUZZ_VERSION}"), |s| {
            s.update("checking, building if missing (about a minute)");
            ensure_cargo_fuzz()
        })?;
        step(P, "kubernetes-validate (Python)", |s| {
            s.update("checking, installing if missing");
            ensure_python_packages()
        })?;
    }
    Ok(())
}

/// Everything, as root (the benchmark, the soak, the fuzzer).
pub fn setup() -> Result<()> {
    check_root()?;
    setup_for(Needs::Everything, &Elevation::Root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_installs_neither_the_test_tools_nor_gnuplot() {
        let demo = debian_packages(Needs::Demo);
        for p in ["iproute2", "nftables", "haproxy"] {
            assert!(demo.contains(&p), "{p}");
        }
        for p in ["gnuplot-nox", "prometheus", "iperf3", "curl", "tcpdump"] {
            assert!(!demo.contains(&p), "{p}");
        }
        assert!(debian_packages(Needs::DemoPlot).contains(&"gnuplot-nox"));
        assert_eq!(debian_packages(Needs::Everything).len(), PACKAGES.len());
        assert!(debian_packages(Needs::Build).is_empty());
        assert!(debian_packages(Needs::Image).contains(&"musl-tools"));
        assert!(!debian_packages(Needs::Package).contains(&"podman"));
    }
}
