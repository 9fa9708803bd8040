//! Rebuild the programs when the linker changes (a new bpf-linker may
//! generate other code): cargo watches the binary itself, not PATH.
fn main() {
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        // Only the bpf target links; the host build of the empty lib does not.
        Err(_) => println!("cargo:rerun-if-env-changed=PATH"),
    }
}
