//! Embeds the eBPF objects built by `cargo xtask build-ebpf` (the allocator probes and the
//! inspector guard). A host build without them still succeeds (with a warning); the binary then
//! refuses to trace (or to open a Node.js inspector) with a clear message.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os("MEMSCOPE_EBPF_OBJECT").map(PathBuf::from).unwrap_or_else(|| {
        let target = env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("../target"));
        target.join("bpfel-unknown-none/release/profiler-ebpf")
    });
    println!("cargo:rerun-if-env-changed=MEMSCOPE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("profiler-ebpf.o");
    embed(&object, &out, "trace");
    // The inspector guard is a second binary of the same package, beside the probes' object.
    let guard = object.with_file_name("inspector-guard");
    println!("cargo:rerun-if-changed={}", guard.display());
    let guard_out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("inspector-guard.o");
    embed(&guard, &guard_out, "open a Node.js inspector");
}

fn embed(object: &std::path::Path, out: &std::path::Path, what: &str) {
    match fs::read(object) {
        Ok(bytes) => fs::write(out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: run `cargo xtask build-ebpf`; \
                 this memscope build cannot {what}",
                object.display()
            );
            fs::write(out, []).unwrap();
        }
    }
}
