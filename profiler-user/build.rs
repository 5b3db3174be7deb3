//! Embeds the eBPF object built by `cargo xtask build-ebpf`. A host build without it still
//! succeeds (with a warning); the binary then refuses to trace with a clear message.
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
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: run `cargo xtask build-ebpf`; \
                 this memscope build cannot trace",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
