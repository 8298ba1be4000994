//! The controller's copy of the cluster state. Loaded once from one read of
//! the store, then kept current from the store's watch, so a pass costs what
//! changed since the last one rather than a read and decode of every object;
//! and, since it sees each change, it knows which apps a pass must look at.
//! The store stays the truth: every write is still guarded by the revisions
//! the mirror says its decisions were made on.

use crate::error::ControlError;
use crate::link::key_of;
use crate::state::decode;
use shoal_api::ObjectKey;
use shoal_core::objects::keys;
use shoal_core::spec::AppKey;
use shoal_core::{App, Lease, Millis, Node, Quota, Replica, Revision, RolloutStatus, Volume};
use shoal_scheduler::Strategy;
use shoal_scheduler::plan::{Leases, Read, World, needs_look};
use shoal_store::{Event, EventKind, KeyValue};
use std::collections::{BTreeMap, BTreeSet};

/// The cluster as of store revision `revision`, and what changed in it
/// since the last [`Mirror::take_changes`].
pub(crate) struct Mirror {
    /// Its measurements and leases are left empty: a pass fills in those.
    pub(crate) world: World,
    pub(crate) revision: u64,
    /// Node name → the store revision of its lease's last renewal: each
    /// renewal is a new one, whatever the wall clock said when it was made.
    pub(crate) leases: BTreeMap<String, u64>,
    changes: Changes,
    /// Apps a pass looks at even when nothing of them changed
    /// ([`needs_look`]), kept up to date as their objects change.
    active: BTreeSet<AppKey>,
}

/// What changed since the last look.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Changes {
    /// Apps whose record, a revision, a replica or the rollout was written or deleted.
    pub(crate) apps: BTreeSet<AppKey>,
    /// A node was registered, changed or removed: placement and lost nodes
    /// concern every app.
    pub(crate) nodes: bool,
}

impl Mirror {
    /// The state in `kvs` (every key of the store, as one read returned them)
    /// at `revision`. Everything counts as changed.
    pub(crate) fn load(kvs: &[KeyValue], revision: u64) -> Result<Mirror, ControlError> {
        let mut mirror = Mirror {
            world: World {
                apps: BTreeMap::new(),
                revisions: BTreeMap::new(),
                replicas: BTreeMap::new(),
                nodes: BTreeMap::new(),
                leases: Leases::default(),
                rollouts: BTreeMap::new(),
                volumes: BTreeMap::new(),
                volume_usage: BTreeMap::new(),
                measurements: BTreeMap::new(),
                quotas: BTreeMap::new(),
                started_at: 0,
                node_grace_ms: 0,
                strategy: Strategy::default(),
                rebalance: true,
            },
            revision,
            leases: BTreeMap::new(),
            changes: Changes::default(),
            active: BTreeSet::new(),
        };
        for kv in kvs {
            mirror.put(kv)?;
        }
        mirror.changes.nodes = true;
        Ok(mirror)
    }

    /// Applies one event of the store's watch (of every key, in order).
    pub(crate) fn apply(&mut self, event: &Event) -> Result<(), ControlError> {
        self.revision = self.revision.max(event.kv.mod_revision);
        match event.kind {
            EventKind::Put => self.put(&event.kv),
            EventKind::Delete => {
                self.delete(&event.kv.key);
                Ok(())
            }
        }
    }

    /// What changed since the last call; `now` is the pass's clock, which settles apps
    /// whose replicas had only to serve a while ([`needs_look`]). An app settled by the
    /// clock alone counts as changed, so that the pass deciding at `now` still looks at it
    /// (its old replica goes now that the new one counts).
    pub(crate) fn take_changes(&mut self, now: Millis) -> Changes {
        let mut changes = std::mem::take(&mut self.changes);
        let world = &self.world;
        let settled: Vec<AppKey> = self
            .active
            .iter()
            .filter(|key| !needs_look(world, key, now))
            .cloned()
            .collect();
        for key in settled {
            self.active.remove(&key);
            changes.apps.insert(key);
        }
        for key in &changes.apps {
            if needs_look(&self.world, key, now) {
                self.active.insert(key.clone());
            } else {
                self.active.remove(key);
            }
        }
        changes
    }

    /// The apps a pass looks at whatever changed, as of the last [`Mirror::take_changes`].
    pub(crate) fn active(&self) -> &BTreeSet<AppKey> {
        &self.active
    }

    fn put(&mut self, kv: &KeyValue) -> Result<(), ControlError> {
        let (w, at) = (&mut self.world, kv.mod_revision);
        let key = kv.key.as_str();
        if keys::APPS.contains(key) {
            let app: App = decode(kv)?;
            let k = app.spec.key();
            self.changes.apps.insert(k.clone());
            w.apps.insert(k, Read::new(app, at));
        } else if keys::REVISIONS.contains(key) {
            let r: Revision = decode(kv)?;
            self.changes.apps.insert(r.app.clone());
            w.revisions
                .insert((r.app.clone(), r.number), Read::new(r, at));
        } else if keys::REPLICAS.contains(key) {
            let r: Replica = decode(kv)?;
            self.changes.apps.insert(r.app.clone());
            w.replicas
                .entry(r.app.clone())
                .or_default()
                .insert(r.id.clone(), Read::new(r, at));
        } else if keys::ROLLOUTS.contains(key) {
            let s: RolloutStatus = decode(kv)?;
            self.changes.apps.insert(s.app.clone());
            w.rollouts.insert(s.app.clone(), Read::new(s, at));
        } else if keys::NODES.contains(key) {
            let n: Node = decode(kv)?;
            self.changes.nodes = true;
            w.nodes.insert(n.name.clone(), Read::new(n, at));
        } else if keys::LEASES.contains(key) {
            let l: Lease = decode(kv)?;
            self.leases.insert(l.node, at);
        } else if keys::QUOTAS.contains(key) {
            let q: Quota = decode(kv)?;
            w.quotas.insert(q.namespace, q.limits);
        } else if keys::VOLUMES.contains(key) {
            let v: Volume = decode(kv)?;
            // Where replicas that mount it may go: placement concerns its users.
            self.changes.nodes = true;
            w.volumes
                .insert((v.namespace.clone(), v.name.clone()), Read::new(v, at));
        }
        Ok(())
    }

    /// Forgets the object at store key `key`, named by its key alone (a
    /// delete carries no value).
    fn delete(&mut self, key: &str) {
        if let Some(node) = key.strip_prefix(keys::LEASES.as_str()) {
            self.leases.remove(node);
            return;
        }
        if let Some(namespace) = key.strip_prefix(keys::QUOTAS.as_str()) {
            self.world.quotas.remove(namespace);
            return;
        }
        if let Some(rest) = key.strip_prefix(keys::VOLUMES.as_str()) {
            if let Some((ns, name)) = rest.split_once('/') {
                self.world
                    .volumes
                    .remove(&(ns.to_string(), name.to_string()));
                self.changes.nodes = true;
            }
            return;
        }
        let w = &mut self.world;
        let app = match key_of(key) {
            None => return,
            Some(ObjectKey::Node(name)) => {
                w.nodes.remove(&name);
                self.changes.nodes = true;
                return;
            }
            Some(ObjectKey::App(app)) => {
                w.apps.remove(&app);
                app
            }
            Some(ObjectKey::Revision { app, number }) => {
                w.revisions.remove(&(app.clone(), number));
                app
            }
            Some(ObjectKey::Replica { app, id }) => {
                if let Some(replicas) = w.replicas.get_mut(&app) {
                    replicas.remove(&id);
                    if replicas.is_empty() {
                        w.replicas.remove(&app);
                    }
                }
                app
            }
            Some(ObjectKey::Rollout(app)) => {
                w.rollouts.remove(&app);
                app
            }
        };
        self.changes.apps.insert(app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::encode;
    use shoal_core::Phase;
    use shoal_core::spec::parse_app;

    fn kv(key: String, value: Vec<u8>, at: u64) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: at,
            mod_revision: at,
            version: 1,
        }
    }

    fn put(key: String, value: Vec<u8>, at: u64) -> Event {
        Event {
            kind: EventKind::Put,
            kv: kv(key, value, at),
            prev_value: None,
        }
    }

    fn delete(key: String, at: u64) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: kv(key, Vec::new(), at),
            prev_value: None,
        }
    }

    fn replica(id: &str) -> Replica {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!(
            "name = \"a\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/a\"]\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        crate::state::tests::replica_of(&spec, id, 1, "n", Phase::Ready)
    }

    fn node(name: &str) -> Node {
        crate::state::tests::ready_node(name)
    }

    /// An app whose replica only had to serve for its `min_ready` is looked at once more by
    /// the pass whose clock says it has: it counts as changed then, and leaves the active set.
    #[test]
    fn an_app_settled_by_the_clock_counts_as_changed_once() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!(
            "name = \"a\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/a\"]\n[rollout]\nmin_ready = \"10s\"\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        let a = spec.key();
        let app = App {
            spec,
            revision: 1,
            created_at: 0,
            updated_at: 0,
            scale: Default::default(),
            job: Default::default(),
        };
        let mut r = replica("x");
        r.ready_since = Some(1_000);
        let mut m = Mirror::load(
            &[
                kv(keys::app(&a).to_string(), encode(&app), 1),
                kv(keys::replica(&a, "x").to_string(), encode(&r), 2),
            ],
            2,
        )
        .expect("loads");
        m.changes.apps.insert(a.clone());
        assert!(m.take_changes(5_000).apps.contains(&a));
        assert!(m.active().contains(&a), "ready for less than its min_ready");
        assert!(m.take_changes(8_000).apps.is_empty());
        assert!(
            m.take_changes(11_000).apps.contains(&a),
            "settled by the clock: one more look"
        );
        assert!(!m.active().contains(&a));
        assert!(m.take_changes(12_000).apps.is_empty());
    }

    #[test]
    fn events_keep_it_current_and_name_the_apps_they_touch() {
        let a = AppKey::new("default", "a");
        let mut m = Mirror::load(&[kv(keys::node("n").to_string(), encode(&node("n")), 1)], 1)
            .expect("loads");
        assert!(m.take_changes(0).nodes, "a load is a change to everything");

        let key = keys::replica(&a, "x").to_string();
        m.apply(&put(key.clone(), encode(&replica("x")), 2))
            .unwrap();
        let lease = Lease {
            node: "n".into(),
            renewed_at: 42,
        };
        m.apply(&put(keys::lease("n").to_string(), encode(&lease), 3))
            .unwrap();
        assert_eq!(m.revision, 3);
        assert_eq!(m.world.replicas[&a]["x"].mod_revision, 2);
        assert_eq!(m.leases["n"], 3, "a renewal is known by its revision");
        assert_eq!(
            m.take_changes(0),
            Changes {
                apps: BTreeSet::from([a.clone()]),
                nodes: false
            },
            "a lease renewal is nobody's change"
        );

        let mut ready = replica("x");
        ready.phase = Phase::Failed;
        m.apply(&put(key.clone(), encode(&ready), 4)).unwrap();
        assert_eq!(m.world.replicas[&a]["x"].value.phase, Phase::Failed);
        m.apply(&delete(key, 5)).unwrap();
        assert!(
            m.world.replicas.is_empty(),
            "an app without replicas leaves no entry"
        );
        m.apply(&delete(keys::node("n").to_string(), 6)).unwrap();
        assert!(m.world.nodes.is_empty());
        let changes = m.take_changes(0);
        assert!(changes.nodes && changes.apps.contains(&a));
        assert_eq!(m.take_changes(0), Changes::default(), "taken once");
    }

    #[test]
    fn an_unreadable_object_is_an_error_not_a_gap() {
        let mut m = Mirror::load(&[], 0).expect("loads");
        let bad = put(keys::node("n").to_string(), b"{".to_vec(), 1);
        assert!(m.apply(&bad).is_err());
    }
}
