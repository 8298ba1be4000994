//! What Shoal's parts say to each other, and nothing of how any of them works:
//! the types of the `/v1` API (what the CLI sends and reads), what a node and
//! its control plane exchange ([`Snapshot`] and the [`Delta`]s that follow it,
//! [`ReplicaReport`], [`ReplicaIncident`]) and the [`Link`] they exchange it over, and the one HTTP
//! [`Client`] the CLI and remote nodes both call the API with (errors come in
//! the one shape of `shoal_core::problem`), over the [`Servers`] of a cluster,
//! failing over between them.
//!
//! **Architecture Invariant:** this crate depends on `shoal-core` and nothing
//! else of Shoal, so a worker node or the CLI can speak to the control plane
//! without linking it (axum, redb, the scheduler), and the control plane can
//! read logs without linking the wasm runtime.

mod client;
mod link;
mod servers;
mod types;

pub use client::{Client, ClientError, Resend, seg};
pub use link::{Changes, KvSent, Link, LinkError, LinkResult, WatchBroken};
pub use servers::{SERVERS_HEADER, Servers, ServersError};
pub use types::{
    AppCpu, AppSummary, AppTop, ApplyOutcome, ApplyResult, BucketView, Cap, CertificateRequest,
    Change, ConfigSetRequest, ConfigSetView, ConfigSetWritten, CpuView, CreatedToken, Deleted,
    Delta, Describe, INCIDENT_REASONS, IngressCertificate, IssuedCertificate, JobRun, JobSummary,
    JoinRequest, JoinResponse, KeyRotated, ModuleUploaded, NodeAction, NodeDeleted, NodeDescribe,
    NodeLabels, NodeSummary, NodeTop, NodeUsage, Object, ObjectKey, PoolWrite, QuotaPatch,
    QuotaView, Registered, ReplicaIncident, ReplicaReport, ReplicaSecrets, RevisionCount,
    RolloutAction, RolloutView, RotatedJoinToken, RunView, ScaleView, SecretView, SecretWrite,
    SecretWritten, ServerSummary, ServerVersion, Service, ServiceEndpoint, Snapshot, TokenRequest,
    TokenView, VolumeUsage, VolumeView, Waiting,
};
