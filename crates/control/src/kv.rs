//! The cluster-wide key-value store behind guests' `wasi:keyvalue` (and `shoal kv`): buckets of
//! a namespace, kept in the control plane's store, so every replica on every node sees the same
//! data and it follows the store wherever the store goes.
//!
//! Each value is a key of its own (`/kv/{ns}/{bucket}/{key}`, the raw bytes), and each bucket
//! has a usage record (`/kv-usage/{ns}/{bucket}`) written in the same transaction as every
//! change, so the bucket's limit holds exactly. Writes go one at a time (the store commits one
//! transaction at a time anyway), which makes an increment atomic across nodes without retries.

use crate::error::ControlError;
use crate::state::{ControlPlane, encode};
use serde::{Deserialize, Serialize};
use shoal_core::kv::{KvAnswer, KvOp, LIST_PAGE, MAX_VALUE_BYTES, check_key};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::AppKey;
use shoal_core::{Replica, Revision};
use shoal_store::{Op, Txn};
use std::collections::BTreeMap;

/// Where bucket `bucket` of `ns` keeps its values.
fn bucket_prefix(ns: &str, bucket: &str) -> String {
    format!("/kv/{ns}/{bucket}/")
}

fn usage_key(ns: &str, bucket: &str) -> String {
    format!("/kv-usage/{ns}/{bucket}")
}

/// What a bucket holds, kept beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvUsage {
    pub keys: u64,
    pub bytes: u64,
}

fn invalid(message: String) -> ControlError {
    ControlError::invalid(ErrorCode::BadRequest, message)
}

impl ControlPlane {
    /// `op` on bucket `bucket` of namespace `ns`.
    pub fn kv(&self, ns: &str, bucket: &str, op: KvOp) -> Result<KvAnswer, ControlError> {
        shoal_core::validate_name(ns).map_err(|e| invalid(format!("namespace: {e}")))?;
        shoal_core::validate_name(bucket).map_err(|e| invalid(format!("bucket: {e}")))?;
        let prefix = bucket_prefix(ns, bucket);
        let store = &*self.inner.store;
        let value_of = |key: &str| -> Result<Option<Vec<u8>>, ControlError> {
            check_key(key).map_err(invalid)?;
            Ok(store.get(&format!("{prefix}{key}"))?.map(|kv| kv.value))
        };
        match op {
            KvOp::Get { keys } => Ok(KvAnswer::Values {
                values: keys.iter().map(|k| value_of(k)).collect::<Result<_, _>>()?,
            }),
            KvOp::Exists { key } => Ok(KvAnswer::Exists {
                exists: value_of(&key)?.is_some(),
            }),
            KvOp::List { cursor } => {
                let (all, _) = store.range(&prefix)?;
                let from = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
                let page: Vec<String> = all
                    .iter()
                    .skip(from)
                    .take(LIST_PAGE)
                    .map(|kv| kv.key[prefix.len()..].to_string())
                    .collect();
                let next = from.saturating_add(page.len());
                Ok(KvAnswer::Keys {
                    cursor: (next < all.len()).then_some(next as u64),
                    keys: page,
                })
            }
            KvOp::Set { entries } => {
                for (k, v) in &entries {
                    check_key(k).map_err(invalid)?;
                    if v.len() > MAX_VALUE_BYTES {
                        return Err(invalid(format!(
                            "the value of {k:?} is {} bytes: at most {MAX_VALUE_BYTES}",
                            v.len()
                        )));
                    }
                }
                let changes = entries.into_iter().map(|(k, v)| (k, Some(v))).collect();
                self.kv_write(ns, bucket, changes).map(|_| KvAnswer::Done)
            }
            KvOp::Delete { keys } => {
                for k in &keys {
                    check_key(k).map_err(invalid)?;
                }
                let changes = keys.into_iter().map(|k| (k, None)).collect();
                self.kv_write(ns, bucket, changes).map(|_| KvAnswer::Done)
            }
            KvOp::Increment { key, delta } => {
                check_key(&key).map_err(invalid)?;
                let _one_writer = self
                    .inner
                    .kv_writer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let now = match store.get(&format!("{prefix}{key}"))? {
                    Some(kv) => std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| {
                            invalid(format!("the value of {key:?} is not a decimal number"))
                        })?,
                    None => 0,
                };
                let value = now
                    .checked_add(delta)
                    .ok_or_else(|| invalid(format!("incrementing {key:?} overflows")))?;
                let changes = BTreeMap::from([(key, Some(value.to_string().into_bytes()))]);
                self.kv_write_locked(ns, bucket, changes)?;
                Ok(KvAnswer::Count { value })
            }
        }
    }

    fn kv_write(
        &self,
        ns: &str,
        bucket: &str,
        changes: BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), ControlError> {
        let _one_writer = self
            .inner
            .kv_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.kv_write_locked(ns, bucket, changes)
    }

    /// Writes `changes` (a value, or `None` to delete) and the bucket's new usage in one
    /// transaction, refusing what would take the bucket past its limit. The caller holds the
    /// writer lock, so what was read is what is replaced.
    fn kv_write_locked(
        &self,
        ns: &str,
        bucket: &str,
        changes: BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), ControlError> {
        let store = &*self.inner.store;
        let prefix = bucket_prefix(ns, bucket);
        let usage_at = usage_key(ns, bucket);
        let mut usage: KvUsage = match store.get(&usage_at)? {
            Some(kv) => serde_json::from_slice(&kv.value).map_err(ControlError::internal)?,
            None => KvUsage::default(),
        };
        let mut txn = Txn::new();
        for (key, value) in changes {
            let at = format!("{prefix}{key}");
            if let Some(old) = store.get(&at)? {
                // Saturating: a usage record out of step with its bucket must not panic here.
                usage.keys = usage.keys.saturating_sub(1);
                usage.bytes = usage
                    .bytes
                    .saturating_sub((key.len() + old.value.len()) as u64);
            }
            match value {
                Some(v) => {
                    usage.keys += 1;
                    usage.bytes += (key.len() + v.len()) as u64;
                    txn = txn.then(Op::put(at, v));
                }
                None => txn = txn.then(Op::delete(at)),
            }
        }
        let limit = self.inner.config.kv_bucket_bytes;
        if usage.bytes > limit {
            return Err(ControlError::invalid(
                ErrorCode::TooLarge,
                format!(
                    "bucket {bucket} of namespace {ns} would hold {} bytes: its limit is {limit}",
                    usage.bytes
                ),
            ));
        }
        let txn = if usage.keys == 0 {
            txn.then(Op::delete(usage_at))
        } else {
            txn.then(Op::put(usage_at, encode(&usage)))
        };
        store.txn(txn)?;
        Ok(())
    }

    /// The buckets of `ns` (of all namespaces if `None`) and what each holds.
    pub fn kv_buckets(
        &self,
        ns: Option<&str>,
    ) -> Result<Vec<(String, String, KvUsage)>, ControlError> {
        let prefix = match ns {
            Some(ns) => format!("/kv-usage/{ns}/"),
            None => "/kv-usage/".to_string(),
        };
        let (all, _) = self.inner.store.range(&prefix)?;
        all.iter()
            .map(|kv| {
                let rest = &kv.key["/kv-usage/".len()..];
                let (ns, bucket) = rest.split_once('/').unwrap_or((rest, ""));
                let usage = serde_json::from_slice(&kv.value).map_err(ControlError::internal)?;
                Ok((ns.to_string(), bucket.to_string(), usage))
            })
            .collect()
    }

    /// `op` for a guest of `app` on `node`: allowed only if a replica placed there runs a
    /// revision of `app` that grants `bucket`.
    pub fn kv_for_node(
        &self,
        node: &str,
        app: &AppKey,
        bucket: &str,
        op: KvOp,
    ) -> Result<KvAnswer, ControlError> {
        if !self.node_may_open(node, app, bucket)? {
            return Err(ControlError::invalid(
                ErrorCode::Forbidden,
                format!("no replica of {app} on node {node} is granted bucket {bucket}"),
            ));
        }
        self.kv(&app.namespace, bucket, op)
    }

    fn node_may_open(&self, node: &str, app: &AppKey, bucket: &str) -> Result<bool, ControlError> {
        let grant = (node.to_string(), app.clone(), bucket.to_string());
        let now = std::time::Instant::now();
        let mut granted = self
            .inner
            .kv_grants
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A grant seen recently stands: a guest's every call would otherwise read the replicas.
        if granted
            .get(&grant)
            .is_some_and(|seen| now.duration_since(*seen) < std::time::Duration::from_secs(2))
        {
            return Ok(true);
        }
        let replicas: Vec<Replica> = self.list(&keys::replicas_of(app))?;
        let mut revisions = replicas
            .iter()
            .filter(|r| r.node.as_deref() == Some(node))
            .map(|r| r.revision)
            .collect::<Vec<_>>();
        revisions.dedup();
        for number in revisions {
            if let Some((revision, _)) = self.get::<Revision>(&keys::revision(app, number))?
                && revision.template.keyvalue.iter().any(|b| b == bucket)
            {
                if granted.len() > 10_000 {
                    granted.clear();
                }
                granted.insert(grant, now);
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ControlConfig;
    use crate::state::tests::control_plane_with;

    /// A control plane whose buckets hold 4 KiB.
    fn control_plane(dir: &std::path::Path) -> ControlPlane {
        let config = ControlConfig {
            kv_bucket_bytes: 4096,
            ..ControlConfig::default()
        };
        control_plane_with(dir, config)
    }

    fn set(cp: &ControlPlane, key: &str, value: &str) -> Result<KvAnswer, ControlError> {
        let entries = vec![(key.to_string(), value.as_bytes().to_vec())];
        cp.kv("default", "b", KvOp::Set { entries })
    }

    #[test]
    fn a_bucket_counts_what_it_holds_keeps_its_limit_and_pages_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        set(&cp, "a", "12345").unwrap();
        set(&cp, "a", "1").unwrap();
        set(&cp, "b", "22").unwrap();
        let usage = |cp: &ControlPlane| cp.kv_buckets(Some("default")).unwrap();
        assert_eq!(
            usage(&cp),
            [("default".into(), "b".into(), KvUsage { keys: 2, bytes: 5 })]
        );
        let inc = |key: &str| match cp.kv(
            "default",
            "b",
            KvOp::Increment {
                key: key.into(),
                delta: 2,
            },
        ) {
            Ok(KvAnswer::Count { value }) => value,
            other => panic!("{other:?}"),
        };
        assert_eq!((inc("n"), inc("n")), (2, 4));
        assert!(increments(&cp, "b"), "22 is a number");
        set(&cp, "text", "not a number").unwrap();
        assert!(!increments(&cp, "text"));

        // Past the limit: refused whole, usage unchanged.
        let before = usage(&cp);
        let e = set(&cp, "big", &"x".repeat(4096)).unwrap_err().to_string();
        assert!(e.contains("its limit is 4096"), "{e}");
        assert_eq!(usage(&cp), before);
        let e = set(&cp, "", "x").unwrap_err().to_string();
        assert!(e.contains("1 to 1024 bytes"), "{e}");

        // Pages of keys; a batch is one write.
        cp.kv(
            "default",
            "b",
            KvOp::Delete {
                keys: vec!["text".into()],
            },
        )
        .unwrap();
        let entries = (0..(LIST_PAGE + 5))
            .map(|i| (format!("k{i}"), Vec::new()))
            .collect();
        cp.kv("default", "b", KvOp::Set { entries }).unwrap();
        let page = |cursor| match cp.kv("default", "b", KvOp::List { cursor }).unwrap() {
            KvAnswer::Keys { keys, cursor } => (keys, cursor),
            other => panic!("{other:?}"),
        };
        let (first, next) = page(None);
        assert_eq!(first.len(), LIST_PAGE);
        let (rest, end) = page(next);
        assert_eq!(end, None);
        assert_eq!(first.len() + rest.len(), LIST_PAGE + 5 + 3);

        cp.kv(
            "default",
            "b",
            KvOp::Delete {
                keys: vec!["a".into(), "absent".into()],
            },
        )
        .unwrap();
        let Ok(KvAnswer::Values { values }) = cp.kv(
            "default",
            "b",
            KvOp::Get {
                keys: vec!["a".into(), "b".into()],
            },
        ) else {
            panic!()
        };
        assert_eq!(values, [None, Some(b"23".to_vec())]);
    }

    /// Whether incrementing `key` works (its value is a decimal number).
    fn increments(cp: &ControlPlane, key: &str) -> bool {
        cp.kv(
            "default",
            "b",
            KvOp::Increment {
                key: key.into(),
                delta: 1,
            },
        )
        .is_ok()
    }
}
