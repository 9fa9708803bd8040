//! `cargo xtask setup`: everything a fresh machine of this kind lacks, done
//! idempotently (each step checks first, so a second run takes a second).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::cmd::{output, run};

/// Debian packages the tests, the lab and the demo use.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",    // ip netns, veth
    "nftables",    // lab middleboxes
    "conntrack",   // lab middleboxes (inspection)
    "haproxy",     // lab full-proxy path
    "tcpdump",     // captures for offline analysis
    "iperf3",      // throughput benchmark
    "procps",      // sysctl
    "prometheus",  // promtool check metrics; the server for the alerting lab
    "gnuplot-nox", // the demo's --png plot
    "curl",        // the /metrics TLS and basic-auth test
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn check_root() -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: it loads eBPF programs and creates network namespaces (try sudo)");
    }
    Ok(())
}

/// The kernel must have BTF, bpffs and be recent enough for what we use.
pub fn check_kernel() -> Result<()> {
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
    Ok(())
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

pub fn ensure_rust_src() -> Result<()> {
    if !nightly_has_rust_src().unwrap_or(false) {
        println!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context(
            "the eBPF programs build with nightly and -Z build-std=core, which needs rust-src",
        )?;
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// bpf-linker, built against the nightly toolchain's own libLLVM (there is no
/// prebuilt binary to download here).
pub fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_ok() {
        return Ok(());
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
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );
    run(Command::new("cargo")
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
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

fn missing_packages() -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", p]))
                .is_ok_and(|st| st.starts_with("ii"))
        })
        .collect()
}

pub fn ensure_packages() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// Only what building the agent needs (container builds).
pub fn setup_build() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// Python packages the deployment checks use (manifest validation).
pub const PYTHON_PACKAGES: &[&str] = &["kubernetes-validate"];

pub fn ensure_python_packages() -> Result<()> {
    for p in PYTHON_PACKAGES {
        let present = output(Command::new("python3").args(["-m", "pip", "show", "-q", p])).is_ok();
        if !present {
            println!("setup: installing the Python package {p}");
            run(Command::new("python3").args(["-m", "pip", "install", "-q", p]))?;
        }
    }
    Ok(())
}

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for the fuzz target (`fuzz/`).
pub fn ensure_cargo_fuzz() -> Result<()> {
    let ok = output(Command::new("cargo").args(["fuzz", "--version"])).is_ok();
    if !ok {
        println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }
    Ok(())
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

/// Everything, in order. Fast when already done.
pub fn setup() -> Result<()> {
    check_root()?;
    check_kernel()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_packages()?;
    ensure_python_packages()?;
    Ok(())
}
