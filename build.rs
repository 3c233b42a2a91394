//! Compiles `proto/*.proto` with protox (pure Rust), so building needs no system `protoc`.
//!
//! - `xray.proto`: messages only; src/peers/xray builds the method paths itself.
//! - `admin.proto`: the daemon's admin API, client and server (src/admin).
//!
//! It also tells the tests which real cores were found, so that `cargo test` reports a
//! test whose core is missing as *ignored* (with the reason) instead of a silent pass:
//! `cfg(no_xray)` / `cfg(no_v2ray)`. Never under `CI=true`, where a missing core must
//! fail its tests (they also check at run time, and skip loudly or fail there).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    peers();
    let xray = "proto/xray.proto";
    let admin = "proto/admin.proto";
    for f in [xray, admin] {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(protox::compile([xray], ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile([admin], ["proto"])?)?;
    Ok(())
}

/// `cfg(no_xray)` / `cfg(no_v2ray)` when that core is not installed (and not on CI).
///
/// Only paths that exist are watched: cargo re-runs a build script on every build while
/// a watched path is missing. Installing a core is followed by `scripts/test.sh`, which
/// sets `CONNECTOR_XRAY_PYTHON`, and that variable is watched.
fn peers() {
    println!("cargo::rustc-check-cfg=cfg(no_xray)");
    println!("cargo::rustc-check-cfg=cfg(no_v2ray)");
    for var in ["CI", "CONNECTOR_XRAY_PYTHON"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        return;
    }
    let python = match std::env::var_os("CONNECTOR_XRAY_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/venv/bin/python"),
    };
    if python.exists() {
        println!("cargo:rerun-if-changed={}", python.display());
    } else {
        println!("cargo:rustc-cfg=no_xray");
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("v2ray").is_file()));
    if !on_path && !Path::new("/usr/bin/v2ray").is_file() {
        println!("cargo:rustc-cfg=no_v2ray");
    }
}
