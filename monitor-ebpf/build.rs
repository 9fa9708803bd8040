//! Rebuild the programs when the linker changes (a new bpf-linker may
//! generate other code): cargo watches the binary itself, not PATH.
fn main() {
    // Wide loads of unaligned packet fields instead of assembling every
    // 16- and 32-bit field from bytes. aya-build sets this crate's rustflags
    // itself, but a link argument reaches bpf-linker, which generates the
    // code. x86 has no strict-alignment requirement for packet access, and
    // aya does not set BPF_F_STRICT_ALIGNMENT.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        // Only the bpf target links; the host build of the empty lib does not.
        Err(_) => println!("cargo:rerun-if-env-changed=PATH"),
    }
}
