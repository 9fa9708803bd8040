//! Builds the eBPF programs (nightly, bpf-linker) and puts the object in OUT_DIR
//! for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it for quick checks.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
