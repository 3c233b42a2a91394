//! The messages of `proto/xray.proto`, generated at build time.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/connector.xray.rs"));
