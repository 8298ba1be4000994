//! Shoal's domain model: the app spec users write, the objects the control
//! plane stores, and the pure rules that validate them.
//!
//! This crate does no I/O and knows nothing of tokio, redb or wasmtime, so
//! every rule here is tested directly and shared by the CLI and the server.

pub mod auth;
pub mod metrics;
pub mod name;
pub mod objects;
pub mod quantity;
pub mod spec;
pub mod wasm;

pub use name::{NameError, validate_name};
pub use objects::*;
pub use spec::{AppManifest, AppSpec, Kind, ModuleRef, Route, SpecError, parse_app};
