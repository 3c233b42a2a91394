//! Compiles `proto/*.proto` with protox (pure Rust), so building needs no system `protoc`.
//!
//! - `xray.proto`: messages only; src/peers/xray builds the method paths itself.
//! - `admin.proto`: the daemon's admin API, client and server (src/admin).

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
