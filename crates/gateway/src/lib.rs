//! The gateway: every node runs one. It maps a request's host and path to an
//! app ([`RoutingTable`]), picks one of the app's ready endpoints
//! (power of two choices on in-flight requests) and calls it, holding one of
//! the replica's concurrency permits for as long as the response streams.

mod routing;
mod server;

pub use routing::RoutingTable;
pub use server::{Endpoint, Gateway, GatewayConfig, serve};
