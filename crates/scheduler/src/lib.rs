//! Decisions, not actions: where a replica goes ([`place`], or [`Cluster`]
//! for many at once), how many replicas an app runs now ([`autoscale`]), which
//! replicas it needs created or removed ([`reconcile`]), when a job runs
//! ([`cron`]), how a rollout advances ([`rollout`]) and which workers a node pool
//! starts and stops ([`pools`]). Everything here is a pure function of its inputs, so the
//! controllers that call it stay thin and these rules are tested directly, as
//! Nomad's scheduler and kube-rs reconcilers are.

pub mod autoscale;
pub mod cron;
mod placement;
pub mod plan;
pub mod pools;
mod reconcile;
pub mod rollout;
#[cfg(test)]
mod testing;

pub use placement::{Cluster, NodeInfo, Placement, Request, Strategy, Unschedulable, place};
pub use reconcile::{Mode, Plan, reconcile};
pub use shoal_core::spec::Spread;
