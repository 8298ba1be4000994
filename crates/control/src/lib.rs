//! The control plane: the only writer of cluster state. It serves the `/v1`
//! API, keeps apps, revisions, replicas, nodes, modules and events in the
//! store, and runs the controller that turns apps into placed replicas.
//!
//! Node agents talk to it through [`ControlPlane`]'s node-facing methods
//! (`register_node`, `heartbeat`, `report_replica`, `watch`), the seam that
//! becomes HTTP when agents run in other processes.

mod api;
mod controller;
mod error;
mod rollouts;
mod state;

pub use api::router;
pub use error::ApiError;
pub use rollouts::{INCIDENT_REASONS, ReplicaIncident, RevisionCount, RolloutAction, RolloutView};
pub use state::{
    AppSummary, ApplyOutcome, ApplyResult, ControlConfig, ControlPlane, Describe, LogSource,
    NodeAction, NodeSummary, ReplicaReport, Service, ServiceEndpoint, Snapshot, now_ms,
};
