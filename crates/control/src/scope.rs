//! What one node reads of the cluster. Every gateway routes to every app, so
//! a node gets every app, revision, replica, node and rollout, but an app's
//! configuration (env values, `[config]` and its config sets' values,
//! arguments) only for the revisions it runs a replica of. The rest reaches it
//! with that configuration left out.
//!
//! Over a watch the node's replicas change: when one is placed on it, its
//! revision is handed over whole in the same delta, before the replica, so
//! the agent never starts a replica from a revision without its env.

use shoal_api::{Change, Delta, Object, ObjectKey, Snapshot};
use shoal_core::spec::AppKey;
use shoal_core::{App, Replica, Revision};
use std::collections::{HashMap, HashSet};

/// Leaves out what only the nodes running an app need.
fn redact_app(app: &mut App) {
    app.spec.env.clear();
    app.spec.config.clear();
    for set in &mut app.spec.config_sets {
        set.data = None;
    }
    app.spec.component.args.clear();
}

fn redact_revision(revision: &mut Revision) {
    revision.template.env.clear();
    revision.template.config.clear();
    for set in &mut revision.template.config_sets {
        set.data = None;
    }
    revision.template.component.args.clear();
}

/// The scope of one node's snapshot and watch.
pub(crate) struct NodeScope {
    node: String,
    /// The revision each replica on this node runs, by app and replica id.
    on_node: HashMap<(AppKey, String), u64>,
    /// Revisions this watch has handed over whole.
    whole: HashSet<(AppKey, u64)>,
}

impl NodeScope {
    /// A scope for `node`, whose replicas are among `replicas`.
    pub(crate) fn new(node: &str, replicas: &[Replica]) -> NodeScope {
        let on_node = replicas
            .iter()
            .filter(|r| r.node.as_deref() == Some(node))
            .map(|r| ((r.app.clone(), r.id.clone()), r.revision))
            .collect();
        NodeScope {
            node: node.to_string(),
            on_node,
            whole: HashSet::new(),
        }
    }

    fn runs(&self, app: &AppKey, number: u64) -> bool {
        self.whole.contains(&(app.clone(), number))
            || self
                .on_node
                .iter()
                .any(|((a, _), n)| a == app && *n == number)
    }

    /// The snapshot as this node may read it.
    pub(crate) fn snapshot(&self, snapshot: &mut Snapshot) {
        snapshot.apps.iter_mut().for_each(redact_app);
        // Once, not per revision: a snapshot holds every revision of the cluster.
        let runs: HashSet<(&AppKey, u64)> =
            self.on_node.iter().map(|((a, _), n)| (a, *n)).collect();
        for revision in &mut snapshot.revisions {
            if !runs.contains(&(&revision.app, revision.number)) {
                redact_revision(revision);
            }
        }
    }

    /// One watch delta as this node may read it. `revision` reads a revision
    /// as stored now, for a replica placed on this node whose revision the
    /// node has only seen without its configuration.
    pub(crate) fn delta(
        &mut self,
        delta: Delta,
        mut revision: impl FnMut(&AppKey, u64) -> Option<Revision>,
    ) -> Delta {
        let mut changes = Vec::with_capacity(delta.changes.len());
        for change in delta.changes {
            match change {
                Change::Put(Object::App(mut app)) => {
                    redact_app(&mut app);
                    changes.push(Change::Put(Object::App(app)));
                }
                Change::Put(Object::Revision(mut r)) => {
                    if self.runs(&r.app, r.number) {
                        self.whole.insert((r.app.clone(), r.number));
                    } else {
                        redact_revision(&mut r);
                    }
                    changes.push(Change::Put(Object::Revision(r)));
                }
                Change::Put(Object::Replica(r)) => {
                    let key = (r.app.clone(), r.id.clone());
                    if r.node.as_deref() == Some(self.node.as_str()) {
                        let wanted = (r.app.clone(), r.revision);
                        if !self.whole.contains(&wanted)
                            && let Some(whole) = revision(&r.app, r.revision)
                        {
                            changes.push(Change::Put(Object::Revision(Box::new(whole))));
                            self.whole.insert(wanted);
                        }
                        self.on_node.insert(key, r.revision);
                    } else {
                        self.on_node.remove(&key);
                    }
                    changes.push(Change::Put(Object::Replica(r)));
                }
                Change::Delete(ObjectKey::Replica { app, id }) => {
                    self.on_node.remove(&(app.clone(), id.clone()));
                    changes.push(Change::Delete(ObjectKey::Replica { app, id }));
                }
                Change::Delete(ObjectKey::Revision { app, number }) => {
                    self.whole.remove(&(app.clone(), number));
                    changes.push(Change::Delete(ObjectKey::Revision { app, number }));
                }
                other => changes.push(other),
            }
        }
        Delta {
            revision: delta.revision,
            changes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::Phase;
    use shoal_core::spec::parse_app;

    fn app() -> App {
        let digest = format!("sha256:{}", "a".repeat(64));
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"job\"\n\
             args = [\"--password\", \"hunter2\"]\n[env]\nPASSWORD = \"hunter2\"\n\
             [config]\ndsn = \"db://hunter2\"\n"
        );
        let mut spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        spec.config_sets = vec![shoal_core::spec::ConfigSetRef {
            name: "db".into(),
            data: Some([("user".to_string(), "admin".to_string())].into()),
        }];
        App {
            spec,
            revision: 2,
            created_at: 0,
            updated_at: 0,
            scale: Default::default(),
            job: Default::default(),
        }
    }

    fn revision(number: u64) -> Revision {
        let spec = app().spec;
        Revision {
            app: spec.key(),
            number,
            template: spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            undid: None,
            outcome: None,
        }
    }

    fn replica(id: &str, node: &str, number: u64) -> Replica {
        crate::state::tests::replica_of(&app().spec, id, number, node, Phase::Ready)
    }

    fn configured(r: &Revision) -> bool {
        r.template.env.contains_key("PASSWORD")
            && r.template.config.contains_key("dsn")
            && r.template.effective_config().contains_key("user")
            && !r.template.component.args.is_empty()
    }

    fn revisions(delta: &Delta) -> Vec<(u64, bool)> {
        delta
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Put(Object::Revision(r)) => Some((r.number, configured(r))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_snapshot_keeps_configuration_only_for_what_the_node_runs() {
        let mut snapshot = Snapshot {
            revision: 9,
            store: 0,
            apps: vec![app()],
            revisions: vec![revision(1), revision(2)],
            replicas: vec![replica("a", "n1", 1), replica("b", "n2", 2)],
            nodes: vec![],
            rollouts: vec![],
        };
        NodeScope::new("n1", &snapshot.replicas).snapshot(&mut snapshot);
        assert!(configured(&snapshot.revisions[0]), "n1 runs revision 1");
        assert!(!configured(&snapshot.revisions[1]), "n2's revision 2");
        assert_eq!(snapshot.revisions[1].template.config_sets[0].data, None);
        assert!(snapshot.apps[0].spec.env.is_empty());
        assert!(snapshot.apps[0].spec.config.is_empty());
        assert!(snapshot.apps[0].spec.component.args.is_empty());
        // What gateways route by stays.
        assert_eq!(snapshot.apps[0].spec, {
            let mut a = app().spec;
            a.env.clear();
            a.config.clear();
            a.config_sets[0].data = None;
            a.component.args.clear();
            a
        });
    }

    #[test]
    fn a_replica_placed_on_the_node_brings_its_revision_whole_first() {
        let mut scope = NodeScope::new("n1", &[]);
        let put = |o| Change::Put(o);
        // A new revision, run nowhere yet: without its configuration.
        let d = scope.delta(
            Delta {
                revision: 1,
                changes: vec![put(Object::Revision(Box::new(revision(2))))],
            },
            |_, _| panic!("nothing to fetch"),
        );
        assert_eq!(revisions(&d), [(2, false)]);
        // Placed elsewhere: still without.
        let d = scope.delta(
            Delta {
                revision: 2,
                changes: vec![put(Object::Replica(Box::new(replica("b", "n2", 2))))],
            },
            |_, _| panic!("not this node's"),
        );
        assert_eq!(revisions(&d), []);
        // Placed here: the revision comes whole, before the replica, once.
        let mut fetched = 0;
        let d = scope.delta(
            Delta {
                revision: 3,
                changes: vec![
                    put(Object::Replica(Box::new(replica("a", "n1", 2)))),
                    put(Object::Replica(Box::new(replica("c", "n1", 2)))),
                ],
            },
            |_, n| {
                fetched += 1;
                Some(revision(n))
            },
        );
        assert_eq!(fetched, 1);
        assert_eq!(revisions(&d), [(2, true)]);
        assert!(matches!(d.changes[0], Change::Put(Object::Revision(_))));
        // Later writes of that revision stay whole while the node runs it…
        let d = scope.delta(
            Delta {
                revision: 4,
                changes: vec![put(Object::Revision(Box::new(revision(2))))],
            },
            |_, _| None,
        );
        assert_eq!(revisions(&d), [(2, true)]);
        // …and an app always comes without its configuration.
        let d = scope.delta(
            Delta {
                revision: 5,
                changes: vec![put(Object::App(Box::new(app())))],
            },
            |_, _| None,
        );
        let Change::Put(Object::App(app)) = &d.changes[0] else {
            panic!("{d:?}")
        };
        assert!(
            app.spec.env.is_empty()
                && app.spec.config.is_empty()
                && app.spec.component.args.is_empty()
        );
    }
}
