//! Namespace quotas (`shoal quota`): kept at `/quotas/{namespace}`, checked when an apply, a
//! scale or a rollback would grow an app ([`shoal_core::quota`] decides).
//!
//! Admission is atomic: a change that grows an app rewrites the namespace's quota record in
//! its transaction, guarded on the revision it was read at (or, without a quota, on there
//! being none), so two changes in one namespace cannot both pass against the same usage; the
//! second is `Raced`, judged again. A change that grows nothing needs no guard: whatever
//! passes beside it is judged against as much as it leaves, or more.

use shoal_api::{Cap, QuotaPatch, QuotaView};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::quota::{QuotaLimits, Usage, refusal};
use shoal_core::spec::AppSpec;
use shoal_core::{App, EventType, Quota};
use shoal_store::{Op, Txn};

use crate::error::ControlError;
use crate::state::{ControlPlane, encode};

/// Reads of a quota a patch makes before another change to it meanwhile is a conflict:
/// every growing apply in its namespace rewrites it.
const PATCH_TRIES: usize = 20;

/// What a growing change was admitted against, for its transaction to guard on.
pub(crate) enum Admitted {
    /// The namespace's quota record as read (its bytes, so a field this server does not know
    /// survives the rewrite) and the revision it was read at.
    Quota {
        namespace: String,
        value: Vec<u8>,
        at: u64,
    },
    /// No quota: none may appear before the change lands.
    NoQuota { namespace: String },
}

impl Admitted {
    /// `txn` guarded on the quota as read, and rewriting it, so that another change admitted
    /// against the same usage fails; or on there being no quota still.
    pub(crate) fn guard(self, txn: Txn) -> Txn {
        match self {
            Admitted::Quota {
                namespace,
                value,
                at,
            } => {
                let key = keys::quota(&namespace);
                txn.when_mod_revision(key.clone(), at)
                    .then(Op::put(key, value))
            }
            Admitted::NoQuota { namespace } => txn.when_absent(keys::quota(&namespace)),
        }
    }
}

impl ControlPlane {
    /// Whether app `spec`, replacing `before` (none: a new app), fits its namespace's quota:
    /// `Ok(None)` if it grows on no cap, what to guard its change on if it grows and fits,
    /// and a `quota_exceeded` refusal saying which cap if it does not fit.
    pub(crate) fn admit(
        &self,
        before: Option<&AppSpec>,
        spec: &AppSpec,
    ) -> Result<Option<Admitted>, ControlError> {
        let (before, after) = (before.map(Usage::of).unwrap_or_default(), Usage::of(spec));
        if !after.grows_from(&before) {
            return Ok(None);
        }
        let namespace = spec.namespace.clone();
        let Some(read) = self.inner.store.get(keys::quota(&namespace).as_str())? else {
            return Ok(Some(Admitted::NoQuota { namespace }));
        };
        let quota: Quota = crate::state::decode(&read)?;
        let others = self
            .list::<App>(&keys::apps_in(&spec.namespace))?
            .iter()
            .filter(|a| a.spec.name != spec.name)
            .fold(Usage::default(), |used, a| used.plus(Usage::of(&a.spec)));
        if let Some(why) = refusal(&quota.limits, others, before, after) {
            return Err(ControlError::invalid(
                ErrorCode::QuotaExceeded,
                format!(
                    "app {} does not fit the quota of namespace {}: {why} (`shoal quota get` shows it)",
                    spec.key(),
                    spec.namespace
                ),
            ));
        }
        Ok(Some(Admitted::Quota {
            namespace,
            value: read.value,
            at: read.mod_revision,
        }))
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
        quotas.into_iter().map(|q| self.view(q)).collect()
    }

    /// Quota `q` with what its namespace's apps use.
    fn view(&self, q: Quota) -> Result<QuotaView, ControlError> {
        let used = self
            .list::<App>(&keys::apps_in(&q.namespace))?
            .iter()
            .fold(Usage::default(), |used, a| used.plus(Usage::of(&a.spec)));
        Ok(QuotaView {
            namespace: q.namespace,
            limits: q.limits,
            used,
        })
    }

    /// Sets the quota of `namespace`. What runs past a lowered one keeps running; only what
    /// would grow past it is refused.
    pub(crate) fn set_quota(
        &self,
        namespace: &str,
        limits: QuotaLimits,
    ) -> Result<QuotaView, ControlError> {
        let whole = |cap: Option<u64>| cap.map_or(Cap::Remove, Cap::Set);
        let patch = QuotaPatch {
            apps: whole(limits.apps),
            replicas: whole(limits.replicas),
            cpu_millis: whole(limits.cpu_millis),
            memory_bytes: whole(limits.memory_bytes),
        };
        self.patch_quota(namespace, patch)
    }

    /// Changes some caps of the quota of `namespace` (made if it has none), merged into the
    /// quota as stored, guarded on it: another change to it meanwhile is read again.
    pub(crate) fn patch_quota(
        &self,
        namespace: &str,
        patch: QuotaPatch,
    ) -> Result<QuotaView, ControlError> {
        shoal_core::name::validate_name(namespace)
            .map_err(|e| ControlError::invalid(ErrorCode::BadRequest, format!("namespace: {e}")))?;
        let key = keys::quota(namespace);
        for _ in 0..PATCH_TRIES {
            let (limits, at) = match self.get(&key)? {
                Some((quota, at)) => (quota.limits, at),
                None => (QuotaLimits::default(), 0),
            };
            let limits = QuotaLimits {
                apps: patch.apps.applied(limits.apps),
                replicas: patch.replicas.applied(limits.replicas),
                cpu_millis: patch.cpu_millis.applied(limits.cpu_millis),
                memory_bytes: patch.memory_bytes.applied(limits.memory_bytes),
            };
            let quota = Quota {
                namespace: namespace.to_string(),
                limits,
                updated_at: self.now(),
            };
            let txn = Txn::new()
                .when_mod_revision(key.clone(), at)
                .then(Op::put(key.clone(), encode(&quota)))
                .then(self.set_event(&quota));
            if self.inner.store.txn(txn)?.succeeded {
                return self.view(quota);
            }
        }
        Err(ControlError::conflict(format!(
            "the quota of namespace {namespace} kept changing; try again"
        )))
    }

    fn set_event(&self, quota: &Quota) -> Op {
        let namespace = &quota.namespace;
        self.event_op(
            EventType::Normal,
            "QuotaSet",
            format!("quota/{namespace}"),
            None,
            format!(
                "quota of namespace {namespace} set: {}",
                describe(&quota.limits)
            ),
        )
    }

    /// Deletes the quota of `namespace`. Unguarded: every growing change rewrites the record,
    /// and those in flight are guarded on it, so they are judged again without it.
    pub(crate) fn delete_quota(&self, namespace: &str) -> Result<(), ControlError> {
        let key = keys::quota(namespace);
        if self.get(&key)?.is_none() {
            return Err(ControlError::not_found(format!(
                "namespace {namespace} has no quota"
            )));
        }
        let txn = Txn::new().then(Op::delete(key)).then(self.event_op(
            EventType::Normal,
            "QuotaDeleted",
            format!("quota/{namespace}"),
            None,
            format!("quota of namespace {namespace} deleted"),
        ));
        self.inner.store.txn(txn)?;
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
        let admitted = || Admitted::NoQuota {
            namespace: "team-a".into(),
        };
        // Admitted without a quota: one set meanwhile fails the change.
        let unquoted = admitted().guard(Txn::new());
        let at = store.put(key.as_str(), encode(&quota)).unwrap();
        assert!(!KvStore::txn(&store, unquoted).unwrap().succeeded);
        // Two changes read the quota at the same revision; the first one's rewrite of it
        // makes the second one's guard fail.
        let read = || Admitted::Quota {
            namespace: "team-a".into(),
            value: encode(&quota),
            at,
        };
        let (first, second) = (read().guard(Txn::new()), read().guard(Txn::new()));
        assert!(KvStore::txn(&store, first).unwrap().succeeded);
        assert!(!KvStore::txn(&store, second).unwrap().succeeded);
        let after_set = admitted().guard(Txn::new());
        assert!(!KvStore::txn(&store, after_set).unwrap().succeeded);
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
