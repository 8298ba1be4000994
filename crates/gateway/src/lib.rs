//! The gateway: every node runs one. It maps a request's host and path to an
//! app ([`RoutingTable`]), picks one of the app's ready endpoints (power of two
//! choices on in-flight requests, wherever they run) and calls it: in process,
//! holding one of the replica's concurrency permits for as long as the response
//! streams, or through the gateway of the node that runs it, one hop at most.
//!
//! An app may split its traffic between a canary revision and the rest ([`Split`]); the
//! gateway that routes a request counts its outcome for the revision that served it
//! ([`Gateway::take_metrics`]), so canaries can be judged on what clients saw.
//!
//! Guests reach other apps by name through the same picking
//! ([`Gateway::outbound`]): that is service discovery.

mod body;
mod egress;
mod endpoint;
mod hold;
mod metrics;
mod outbound;
mod proxy;
mod routing;
mod server;
mod stalls;

pub use endpoint::{Endpoint, EndpointStatus, RemoteReplica, Split};
pub use routing::RoutingTable;
pub use server::{Gateway, GatewayConfig, LogLookup, READY_PATH, Tables, serve};
pub use shoal_core::clients::ConnectionStats;
