//! The control plane: the only writer of cluster state. It serves the `/v1`
//! API, keeps apps, revisions, replicas, nodes, modules and events in the
//! store, and runs the controller that turns apps into placed replicas.
//!
//! Node agents talk to it through [`ControlPlane`]'s node-facing methods
//! (`register_node`, `heartbeat`, `report_replica`, `snapshot`): in process
//! through [`LocalLink`], over HTTP through the `/v1/cluster` API. What is
//! said is typed in `shoal-api`.

mod access;
mod api;
mod api_error;
mod audit;
mod backup;
mod configs;
mod controller;
mod dashboard;
mod error;
mod jobs;
mod kv;
mod link;
mod logs;
mod measurements;
mod migrate;
mod mirror;
mod modules;
mod nodes;
mod oci;
mod openapi;
mod pools;
mod prometheus;
mod proxy;
mod quotas;
mod rollouts;
mod scope;
mod secrets;
mod serve;
mod shared_modules;
mod shared_reports;
mod state;
mod top;
mod volumes;

pub use api::router;
pub use api_error::ApiError;
pub use backup::{
    BackupError, BackupSchedule, Manifest as BackupManifest, Restored, restore as restore_backup,
};
pub use error::{ControlError, ControlResult};
pub use link::LocalLink;
pub use migrate::{Copied, MigrateError, copy_state};
pub use pools::PoolHost;
pub use serve::{ServeLimits, serve};
pub use shoal_core::POOL_LABEL;
pub use state::{ControlConfig, ControlPlane};
