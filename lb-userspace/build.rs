//! Embeds the XDP object built by `cargo xtask build-ebpf` (nightly, bpf-linker).
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let obj = manifest.join("../lb-ebpf/target/bpfel-unknown-none/release/lb-ebpf");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    if let Err(e) = std::fs::copy(&obj, &out) {
        panic!(
            "the XDP program is not built ({}: {e}): run `cargo xtask build-ebpf` first \
             (`cargo xtask test`, `run` and `demo` do it for you)",
            obj.display()
        );
    }
}
