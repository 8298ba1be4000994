//! Shoal's domain model: the app spec users write, the objects the control
//! plane stores, and the pure rules that validate them.
//!
//! This crate does no I/O and knows nothing of tokio, redb or wasmtime, so
//! every rule here is tested directly and shared by the CLI and the server.
//! Time comes in as an argument; [`Clock`] and [`now_ms`] are how the edges
//! read it.

pub mod auth;
mod causes;
pub mod clients;
pub mod clock;
pub mod digest;
pub mod kv;
pub mod logs;
pub mod metrics;
pub mod name;
pub mod objects;
pub mod oci;
pub mod problem;
pub mod quantity;
pub mod quota;
pub mod schedule;
pub mod spec;
mod spec_file;
pub mod wasm;

pub use causes::causes;
pub use clock::{Clock, SystemClock, now_ms};
pub use digest::Digest;
pub use name::{NameError, validate_name};
pub use objects::*;
pub use spec::{AppManifest, AppSpec, Kind, ModuleRef, Route, SpecError, parse_app};

/// `n` and `noun`, plural unless `n` is 1: "1 replica", "3 replicas", "0 keys".
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(super::counted(1u32, "replica"), "1 replica");
        assert_eq!(super::counted(0u32, "key"), "0 keys");
        assert_eq!(super::counted(3u64, "node"), "3 nodes");
    }
}
