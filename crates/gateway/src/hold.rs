//! Requests for an app that scaled to zero are held, not refused: the gateway
//! counts them (what wakes the app, reported by the agent as soon as the count
//! changes) and lets them go as soon as an endpoint of the app arrives, as
//! Knative's activator does. Bounded both ways: at most
//! [`GatewayConfig::hold_limit`](crate::GatewayConfig) requests per app wait,
//! for at most `hold_timeout`; past either, a 503 with `Retry-After`.

use shoal_core::spec::AppKey;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct Holds {
    /// Apps that may be at zero replicas and wake on a request (`min = 0`).
    wake: RwLock<HashSet<AppKey>>,
    /// Requests held per app; an entry at zero stays until it is reported.
    waiting: Mutex<HashMap<AppKey, u32>>,
    /// Endpoints were added: held requests look again.
    pub(crate) arrivals: Notify,
    /// A count changed: the agent reports the counts.
    changed: Notify,
}

/// One held request; counts while it lives.
pub(crate) struct Held<'a> {
    holds: &'a Holds,
    app: AppKey,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut waiting = self.holds.waiting.lock().expect("holds lock");
        if let Some(n) = waiting.get_mut(&self.app) {
            *n = n.saturating_sub(1);
        }
        self.holds.changed.notify_one();
    }
}

impl Holds {
    pub(crate) fn set_wake(&self, apps: Vec<AppKey>) {
        *self.wake.write().expect("holds lock") = apps.into_iter().collect();
    }

    pub(crate) fn wakes(&self, app: &AppKey) -> bool {
        self.wake.read().expect("holds lock").contains(app)
    }

    /// Counts one more request waiting for `app`, unless `limit` already do.
    pub(crate) fn enter(&self, app: &AppKey, limit: u32) -> Option<Held<'_>> {
        let mut waiting = self.waiting.lock().expect("holds lock");
        let n = waiting.entry(app.clone()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        self.changed.notify_one();
        Some(Held {
            holds: self,
            app: app.clone(),
        })
    }

    /// Every app's count now, zeros included once (so the control plane hears
    /// that nobody waits any more); zeros are then forgotten.
    pub(crate) fn take(&self) -> Vec<(AppKey, u32)> {
        let mut waiting = self.waiting.lock().expect("holds lock");
        let mut out: Vec<(AppKey, u32)> = waiting.iter().map(|(a, n)| (a.clone(), *n)).collect();
        waiting.retain(|_, n| *n > 0);
        out.sort();
        out
    }

    /// Resolves once a count changed since the last call.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded_and_reported_until_zero() {
        let holds = Holds::default();
        let app = AppKey::new("default", "a");
        let first = holds.enter(&app, 2).unwrap();
        let second = holds.enter(&app, 2).unwrap();
        assert!(holds.enter(&app, 2).is_none(), "a third is over the limit");
        assert_eq!(holds.take(), [(app.clone(), 2)]);
        drop(first);
        drop(second);
        // Zero is reported once, then the entry is gone.
        assert_eq!(holds.take(), [(app.clone(), 0)]);
        assert!(holds.take().is_empty());
    }
}
