fn main() {
    // Rebuild when the linker changes; bpf-linker must be on PATH.
    println!("cargo:rerun-if-env-changed=PATH");
}
