//! Namespace quotas (`shoal quota`): kept at `/quotas/{namespace}`, checked when an apply, a
//! scale or a rollback would grow an app ([`shoal_core::quota`] decides).
//!
//! Admission is atomic: the change's transaction rewrites the namespace's quota record,
//! guarded on the revision it was read at, so two changes in one namespace cannot both pass
//! against the same usage; the second is a conflict, to send again.

use shoal_api::QuotaView;
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::quota::{QuotaLimits, Usage, refusal};
use shoal_core::spec::AppSpec;
use shoal_core::{App, EventType, Quota};
use shoal_store::{Op, Txn};

use crate::error::ControlError;
use crate::state::{ControlPlane, encode};

/// A quota an app was admitted under, and the revision it was read at.
pub(crate) struct Admitted(Quota, u64);

impl Admitted {
    /// `txn` guarded on the quota as read, and rewriting it, so that another change admitted
    /// against the same usage fails.
    pub(crate) fn guard(self, txn: Txn) -> Txn {
        let key = keys::quota(&self.0.namespace);
        txn.when_mod_revision(key.clone(), self.1)
            .then(Op::put(key, encode(&self.0)))
    }
}

impl ControlPlane {
    /// Whether app `spec`, replacing `before` (none: a new app), fits its namespace's quota:
    /// `Ok(None)` without a quota, the quota to guard the change on if it fits, and a
    /// `quota_exceeded` refusal saying which cap if it does not.
    pub(crate) fn admit(
        &self,
        before: Option<&AppSpec>,
        spec: &AppSpec,
    ) -> Result<Option<Admitted>, ControlError> {
        let Some((quota, at)) = self.get(&keys::quota(&spec.namespace))? else {
            return Ok(None);
        };
        let others = self
            .list::<App>(&keys::apps_in(&spec.namespace))?
            .iter()
            .filter(|a| a.spec.name != spec.name)
            .fold(Usage::default(), |used, a| used.plus(Usage::of(&a.spec)));
        let before = before.map(Usage::of).unwrap_or_default();
        if let Some(why) = refusal(&quota.limits, others, before, Usage::of(spec)) {
            return Err(ControlError::invalid(
                ErrorCode::QuotaExceeded,
                format!(
                    "app {} does not fit the quota of namespace {}: {why} (`shoal quota get` shows it)",
                    spec.key(),
                    spec.namespace
                ),
            ));
        }
        Ok(Some(Admitted(quota, at)))
    }

    /// The quotas of `namespace` (all: every namespace's), with what their apps use.
    pub(crate) fn quotas(&self, namespace: Option<&str>) -> Result<Vec<QuotaView>, ControlError> {
        let quotas = match namespace {
            Some(ns) => self
                .get(&keys::quota(ns))?
                .map(|(q, _)| q)
                .into_iter()
                .collect(),
            None => self.list::<Quota>(&keys::QUOTAS)?,
        };
        quotas
            .into_iter()
            .map(|q| {
                let used = self
                    .list::<App>(&keys::apps_in(&q.namespace))?
                    .iter()
                    .fold(Usage::default(), |used, a| used.plus(Usage::of(&a.spec)));
                Ok(QuotaView {
                    namespace: q.namespace,
                    limits: q.limits,
                    used,
                })
            })
            .collect()
    }

    /// Sets the quota of `namespace`. What runs past a lowered one keeps running; only what
    /// would grow past it is refused.
    pub(crate) fn set_quota(
        &self,
        namespace: &str,
        limits: QuotaLimits,
    ) -> Result<QuotaView, ControlError> {
        shoal_core::name::validate_name(namespace)
            .map_err(|e| ControlError::invalid(ErrorCode::BadRequest, format!("namespace: {e}")))?;
        let key = keys::quota(namespace);
        let quota = Quota {
            namespace: namespace.to_string(),
            limits,
            updated_at: self.now(),
        };
        let txn = Txn::new()
            .then(Op::put(key, encode(&quota)))
            .then(self.event_op(
                EventType::Normal,
                "QuotaSet",
                format!("quota/{namespace}"),
                None,
                format!(
                    "quota of namespace {namespace} set: {}",
                    describe(&quota.limits)
                ),
            ));
        self.inner.store.txn(txn)?;
        Ok(self
            .quotas(Some(namespace))?
            .pop()
            .expect("the quota was just written"))
    }

    pub(crate) fn delete_quota(&self, namespace: &str) -> Result<(), ControlError> {
        let key = keys::quota(namespace);
        let Some((_, at)) = self.get(&key)? else {
            return Err(ControlError::not_found(format!(
                "namespace {namespace} has no quota"
            )));
        };
        let txn = Txn::new()
            .when_mod_revision(key.clone(), at)
            .then(Op::delete(key))
            .then(self.event_op(
                EventType::Normal,
                "QuotaDeleted",
                format!("quota/{namespace}"),
                None,
                format!("quota of namespace {namespace} deleted"),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "the quota of namespace {namespace} changed meanwhile; try again"
            )));
        }
        Ok(())
    }
}

/// `apps 20, replicas 50, cpu 4000m, memory 8Gi`, the caps that are set.
fn describe(limits: &QuotaLimits) -> String {
    let caps: Vec<String> = [
        limits.apps.map(|n| format!("apps {n}")),
        limits.replicas.map(|n| format!("replicas {n}")),
        limits.cpu_millis.map(|n| format!("cpu {n}m")),
        limits
            .memory_bytes
            .map(|n| format!("memory {}", shoal_core::quantity::format_memory(n))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if caps.is_empty() {
        "no caps".into()
    } else {
        caps.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_store::KvStore;

    #[test]
    fn a_change_admitted_against_a_quota_fails_once_another_was_admitted_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = shoal_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let quota = Quota {
            namespace: "team-a".into(),
            limits: QuotaLimits {
                replicas: Some(3),
                ..QuotaLimits::default()
            },
            updated_at: 0,
        };
        let key = keys::quota("team-a");
        let at = store.put(key.as_str(), encode(&quota)).unwrap();
        // Two changes read the quota at the same revision; the first one's rewrite of it
        // makes the second one's guard fail.
        let first = Admitted(quota.clone(), at).guard(Txn::new());
        let second = Admitted(quota, at).guard(Txn::new());
        assert!(KvStore::txn(&store, first).unwrap().succeeded);
        assert!(!KvStore::txn(&store, second).unwrap().succeeded);
        assert_eq!(
            describe(&QuotaLimits {
                cpu_millis: Some(4000),
                memory_bytes: Some(8 << 30),
                ..QuotaLimits::default()
            }),
            "cpu 4000m, memory 8Gi"
        );
        assert_eq!(describe(&QuotaLimits::default()), "no caps");
    }
}
