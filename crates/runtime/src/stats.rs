//! What a replica's instances do, counted as they do it, for the node's metrics: relaxed
//! atomic adds only, so counting takes no lock (a request on a fresh instance costs five: its
//! count, the instance's start and end, and the instance's hold on the counters). The agent hands every replica of one app revision on the node the
//! same [`InstanceStats`] and reads it when the node's metrics are scraped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::IncidentKind;

/// Running counts of the instances of the replicas given it ([`crate::InstanceConfig::stats`]).
#[derive(Debug, Default)]
pub struct InstanceStats {
    requests: AtomicU64,
    /// Instances created; with `ended`, what is alive, so a store costs one add at each end.
    started: AtomicU64,
    ended: AtomicU64,
    reuses: AtomicU64,
    /// Changed under the lock of the service whose instances wait, so never below zero.
    idle: AtomicU64,
    timeouts: AtomicU64,
    out_of_memory: AtomicU64,
    traps: AtomicU64,
}

/// [`InstanceStats`] as read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceCounts {
    /// HTTP requests handed to the instances, health probes' included.
    pub requests: u64,
    /// Instances created (cold starts): for a request without reuse, a p3 worker, a
    /// command's run.
    pub cold_starts: u64,
    /// Requests served by an instance that had served one before.
    pub reuses: u64,
    /// Instances alive now, idle ones included: each holds its memory limit of the budget.
    pub live: u64,
    /// Instances kept for reuse, waiting for a request.
    pub idle: u64,
    pub timeouts: u64,
    pub out_of_memory: u64,
    pub traps: u64,
}

impl InstanceCounts {
    /// Requests killed, by kind.
    pub fn incidents(&self) -> [(IncidentKind, u64); 3] {
        [
            (IncidentKind::TimedOut, self.timeouts),
            (IncidentKind::OutOfMemory, self.out_of_memory),
            (IncidentKind::Trapped, self.traps),
        ]
    }
}

impl InstanceStats {
    pub fn read(&self) -> InstanceCounts {
        // `ended` first: every end counted was started before, so `live` stays whole; the
        // subtraction saturates all the same, as relaxed loads promise no order.
        let ended = self.ended.load(Relaxed);
        let started = self.started.load(Relaxed);
        InstanceCounts {
            requests: self.requests.load(Relaxed),
            cold_starts: started,
            reuses: self.reuses.load(Relaxed),
            live: started.saturating_sub(ended),
            idle: self.idle.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            out_of_memory: self.out_of_memory.load(Relaxed),
            traps: self.traps.load(Relaxed),
        }
    }

    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub(crate) fn reuse(&self) {
        self.reuses.fetch_add(1, Relaxed);
    }

    pub(crate) fn idle_more(&self, n: usize) {
        self.idle.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn idle_fewer(&self, n: usize) {
        self.idle.fetch_sub(n as u64, Relaxed);
    }

    pub(crate) fn incident(&self, kind: IncidentKind) {
        let counter = match kind {
            IncidentKind::TimedOut => &self.timeouts,
            IncidentKind::OutOfMemory => &self.out_of_memory,
            IncidentKind::Trapped => &self.traps,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Counts one instance alive from its store's creation to its drop (it lives in the store).
pub(crate) struct Alive(Arc<InstanceStats>);

impl Alive {
    pub(crate) fn new(stats: &Arc<InstanceStats>) -> Alive {
        stats.started.fetch_add(1, Relaxed);
        Alive(stats.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Relaxed);
    }
}

/// Components [`crate::Runtime::load`] found in the on-disk compile cache (hits) and had to
/// compile (misses), since the runtime started. Loads served from memory are neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompileCache {
    pub hits: u64,
    pub misses: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_alive_from_start_to_drop_and_idle_ones_counted_apart() {
        let stats = Arc::new(InstanceStats::default());
        let a = Alive::new(&stats);
        let b = Alive::new(&stats);
        stats.request();
        stats.request();
        stats.reuse();
        stats.idle_more(2);
        stats.idle_fewer(1);
        stats.incident(IncidentKind::Trapped);
        drop(a);
        let counts = stats.read();
        assert_eq!(
            (counts.requests, counts.cold_starts, counts.reuses),
            (2, 2, 1)
        );
        assert_eq!((counts.live, counts.idle), (1, 1));
        assert_eq!(counts.incidents()[2], (IncidentKind::Trapped, 1));
        drop(b);
        assert_eq!(stats.read().live, 0);
    }
}
