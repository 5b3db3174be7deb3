//! Builds tests/fixtures/rust_usdt (a Rust service with `libdd-profiling-heap-allocator`'s
//! sampled allocator, crates from crates.io) with cargo, copied out of the checkout into its
//! own workspace under /tmp, one target directory per feature set there: a second run, and
//! `cargo xtask bench`, reuse the build (cargo's cache holds while the copied sources do not
//! change).
use std::{path::PathBuf, process::Command};

/// Where the fixture's workspace and builds live (outside the checkout, under /tmp).
pub fn root() -> PathBuf {
    std::env::temp_dir().join("memscope-fixtures/rust_usdt")
}

/// The fixture built with `features` (`[]`: the default, live-heap over the system
/// allocator; `["--no-default-features"]`: alloc-only), as a private copy of the executable
/// (see `build_fixture` for why a copy per test process and thread).
pub fn usdt_service(name: &str, features: &[&str]) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rust_usdt");
    let root = root();
    std::fs::create_dir_all(root.join("src")).unwrap();
    for file in ["Cargo.toml", "src/main.rs", "src/plugin.rs"] {
        let text = std::fs::read(src.join(file)).unwrap();
        if std::fs::read(root.join(file)).ok().as_deref() != Some(&text[..]) {
            let tmp = root.join(format!("{file}.{}", std::process::id()));
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, root.join(file)).unwrap();
        }
    }
    let target = root.join(format!("target-{name}"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "--quiet"])
        .args(features)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .unwrap_or_else(|e| panic!("running cargo: {e}"));
    assert!(status.success(), "building the rust_usdt fixture ({name}; crates.io must be reachable the first time)");
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let copy = root.join(format!("rust_usdt-{name}.{}.{thread}", std::process::id()));
    std::fs::copy(target.join("release/rust_usdt_fixture"), &copy).unwrap();
    copy
}

/// The plugin built beside [`usdt_service`]`(name, ..)` (call that first), as a private copy
/// of `libusdt_plugin.so`.
pub fn usdt_plugin(name: &str) -> PathBuf {
    let root = root();
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let copy = root.join(format!("libusdt_plugin-{name}.{}.{thread}.so", std::process::id()));
    std::fs::copy(root.join(format!("target-{name}/release/libusdt_plugin.so")), &copy).unwrap();
    copy
}
