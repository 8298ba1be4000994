//! The agent's own copy of the cluster state: loaded from a [`Snapshot`], then
//! kept current by applying the watch's [`Delta`]s, never re-read while the
//! watch lasts. Indexed the way node planning asks (apps by key, revisions by
//! app and number, replicas by id, by app and by node, nodes by name, rollouts
//! by app), and each delta says what it [`Touched`], so a change costs what it
//! changed, not a pass over the whole cluster.

use shoal_api::{Change, Delta, Object, ObjectKey, Snapshot};
use shoal_core::spec::AppKey;
use shoal_core::{App, Node, Replica, Revision, RolloutStatus};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What applied deltas changed that this node may have to act on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Touched {
    /// Replicas placed on this node whose record changed, appeared or went
    /// away, or whose revision arrived: to start, stop or report again.
    pub replicas: BTreeSet<String>,
    /// Apps whose gateway tables may differ: their record, rollout or a
    /// replica changed, or the state of a node one of their replicas is on.
    pub apps: BTreeSet<AppKey>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty() && self.apps.is_empty()
    }
}

/// Per app serving HTTPS: its TLS secret, the version pinned, and its route hosts.
pub type IngressWanted = BTreeMap<AppKey, (String, u64, BTreeSet<String>)>;

/// The cluster as this node knows it, at [`ClusterView::revision`].
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// This node's name: its replicas are the ones it runs.
    me: String,
    revision: u64,
    apps: HashMap<AppKey, App>,
    revisions: HashMap<AppKey, BTreeMap<u64, Revision>>,
    replicas: HashMap<String, Replica>,
    /// Replica ids per app: where an app's remote endpoints come from.
    by_app: HashMap<AppKey, BTreeSet<String>>,
    /// Replica ids per node: this node's own, and whose endpoints a node's state changes.
    by_node: HashMap<String, BTreeSet<String>>,
    nodes: HashMap<String, Node>,
    rollouts: HashMap<AppKey, RolloutStatus>,
}

impl ClusterView {
    /// The view of node `me` from a snapshot; deltas after its revision follow.
    pub fn new(me: &str, snapshot: Snapshot) -> Self {
        let mut view = ClusterView {
            me: me.to_string(),
            revision: snapshot.revision,
            ..ClusterView::default()
        };
        let mut ignored = Touched::default();
        // Revisions before replicas: no replica is yet waiting for one.
        let objects = (snapshot.apps.into_iter().map(|a| Object::App(a.into())))
            .chain(
                snapshot
                    .revisions
                    .into_iter()
                    .map(|r| Object::Revision(r.into())),
            )
            .chain(
                snapshot
                    .replicas
                    .into_iter()
                    .map(|r| Object::Replica(r.into())),
            )
            .chain(snapshot.nodes.into_iter().map(Object::Node))
            .chain(snapshot.rollouts.into_iter().map(Object::Rollout));
        for object in objects {
            view.put(object, &mut ignored);
        }
        view
    }

    /// The HTTPS certificates the gateway should serve: per app with `[http] tls`, the
    /// secret version pinned and the route hosts. When this changes, they are fetched again.
    pub fn ingress(&self) -> IngressWanted {
        self.apps
            .iter()
            .filter_map(|(key, app)| {
                let http = app.spec.http.as_ref()?;
                let tls = http.tls.as_ref()?;
                let hosts: BTreeSet<String> =
                    http.routes.iter().filter_map(|r| r.host.clone()).collect();
                Some((key.clone(), (tls.secret.clone(), tls.version?, hosts)))
            })
            .collect()
    }

    /// The store revision of the last change applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Applies one delta and adds what it touched to `touched`, unless it is
    /// not newer than the view (a duplicate or a replay): then it changes
    /// nothing and says so.
    pub fn apply(&mut self, delta: Delta, touched: &mut Touched) -> bool {
        if delta.revision <= self.revision {
            return false;
        }
        self.revision = delta.revision;
        for change in delta.changes {
            match change {
                Change::Put(object) => self.put(object, touched),
                Change::Delete(key) => self.delete(key, touched),
            }
        }
        true
    }

    pub fn app(&self, key: &AppKey) -> Option<&App> {
        self.apps.get(key)
    }

    /// Revision `number` of `app`: what its replicas of that number run.
    pub fn app_revision(&self, app: &AppKey, number: u64) -> Option<&Revision> {
        self.revisions.get(app)?.get(&number)
    }

    pub fn replica(&self, id: &str) -> Option<&Replica> {
        self.replicas.get(id)
    }

    /// The replicas placed on this node.
    pub fn mine(&self) -> impl Iterator<Item = &Replica> {
        self.on_node(&self.me)
    }

    /// An app's replicas, by id.
    pub fn replicas_of(&self, app: &AppKey) -> impl Iterator<Item = &Replica> {
        self.by_app
            .get(app)
            .into_iter()
            .flatten()
            .filter_map(|id| self.replicas.get(id))
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Every node of the cluster, whatever its state.
    pub fn node_names(&self) -> impl Iterator<Item = String> + '_ {
        self.nodes.keys().cloned()
    }

    pub fn rollout(&self, app: &AppKey) -> Option<&RolloutStatus> {
        self.rollouts.get(app)
    }

    /// Every app the view knows of, by its record or by a replica.
    pub fn app_keys(&self) -> BTreeSet<&AppKey> {
        self.apps.keys().chain(self.by_app.keys()).collect()
    }

    fn on_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Replica> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.replicas.get(id))
    }

    fn put(&mut self, object: Object, touched: &mut Touched) {
        match object {
            Object::App(app) => {
                let key = app.spec.key();
                touched.apps.insert(key.clone());
                self.apps.insert(key, *app);
            }
            Object::Revision(revision) => {
                // A replica placed before its revision arrived starts now.
                let waiting = self
                    .mine()
                    .filter(|r| r.app == revision.app && r.revision == revision.number);
                touched.replicas.extend(waiting.map(|r| r.id.clone()));
                self.revisions
                    .entry(revision.app.clone())
                    .or_default()
                    .insert(revision.number, *revision);
            }
            Object::Replica(replica) => {
                if let Some(old) = self.remove_replica(&replica.id) {
                    self.touch(&old, touched);
                }
                self.touch(&replica, touched);
                self.by_app
                    .entry(replica.app.clone())
                    .or_default()
                    .insert(replica.id.clone());
                if let Some(node) = &replica.node {
                    self.by_node
                        .entry(node.clone())
                        .or_default()
                        .insert(replica.id.clone());
                }
                self.replicas.insert(replica.id.clone(), *replica);
            }
            Object::Node(node) => {
                let same = self
                    .nodes
                    .get(&node.name)
                    .is_some_and(|old| old.state == node.state && old.gateway == node.gateway);
                if !same {
                    self.touch_node(&node.name, touched);
                }
                self.nodes.insert(node.name.clone(), node);
            }
            Object::Rollout(status) => {
                touched.apps.insert(status.app.clone());
                self.rollouts.insert(status.app.clone(), status);
            }
        }
    }

    fn delete(&mut self, key: ObjectKey, touched: &mut Touched) {
        match key {
            ObjectKey::App(app) => {
                self.apps.remove(&app);
                touched.apps.insert(app);
            }
            // Replicas already running keep running: only placement stops them.
            ObjectKey::Revision { app, number } => {
                if let Some(numbers) = self.revisions.get_mut(&app) {
                    numbers.remove(&number);
                    if numbers.is_empty() {
                        self.revisions.remove(&app);
                    }
                }
            }
            ObjectKey::Replica { id, .. } => {
                if let Some(old) = self.remove_replica(&id) {
                    self.touch(&old, touched);
                }
            }
            ObjectKey::Node(name) => {
                if self.nodes.remove(&name).is_some() {
                    self.touch_node(&name, touched);
                }
            }
            ObjectKey::Rollout(app) => {
                self.rollouts.remove(&app);
                touched.apps.insert(app);
            }
        }
    }

    /// A replica changed: its app's endpoints may have, and if it is (or was)
    /// placed here, whether this node runs it.
    fn touch(&self, replica: &Replica, touched: &mut Touched) {
        touched.apps.insert(replica.app.clone());
        if replica.node.as_deref() == Some(self.me.as_str()) {
            touched.replicas.insert(replica.id.clone());
        }
    }

    /// Another node's state or address changed: so did the endpoints of the
    /// apps with replicas there. This node's own are never remote endpoints.
    fn touch_node(&self, name: &str, touched: &mut Touched) {
        if name != self.me {
            touched
                .apps
                .extend(self.on_node(name).map(|r| r.app.clone()));
        }
    }

    fn remove_replica(&mut self, id: &str) -> Option<Replica> {
        let old = self.replicas.remove(id)?;
        if let Some(ids) = self.by_app.get_mut(&old.app) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_app.remove(&old.app);
            }
        }
        if let Some(node) = &old.node
            && let Some(ids) = self.by_node.get_mut(node)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.by_node.remove(node);
            }
        }
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{app, node, puts, replica, revision, snapshot};
    use shoal_core::{NodeState, Phase};

    fn ids<'a>(replicas: impl Iterator<Item = &'a Replica>) -> Vec<&'a str> {
        let mut ids: Vec<&str> = replicas.map(|r| r.id.as_str()).collect();
        ids.sort();
        ids
    }

    fn web_view() -> (App, ClusterView) {
        let web = app("web", "http", 1, "");
        let view = ClusterView::new(
            "me",
            snapshot(
                vec![web.clone()],
                vec![
                    replica(&web, "w1", 1, "me", Phase::Ready),
                    replica(&web, "w2", 1, "b", Phase::Ready),
                ],
                vec![node("me", NodeState::Ready), node("b", NodeState::Ready)],
            ),
        );
        (web, view)
    }

    #[test]
    fn a_snapshot_is_indexed() {
        let (web, view) = web_view();
        assert_eq!(view.revision(), 1);
        assert_eq!(ids(view.mine()), ["w1"]);
        assert_eq!(ids(view.replicas_of(&web.spec.key())), ["w1", "w2"]);
        assert_eq!(view.app_revision(&web.spec.key(), 1).unwrap().number, 1);
        assert!(view.app_revision(&web.spec.key(), 2).is_none());
        assert_eq!(
            view.app_keys().into_iter().collect::<Vec<_>>(),
            [&web.spec.key()]
        );
    }

    #[test]
    fn puts_add_and_replace_deletes_remove() {
        let (web, mut view) = web_view();
        let mut touched = Touched::default();
        let w3 = replica(&web, "w3", 1, "me", Phase::Pending);
        assert!(view.apply(
            puts(2, vec![Object::Replica(Box::new(w3.clone()))]),
            &mut touched
        ));
        assert_eq!(ids(view.mine()), ["w1", "w3"]);
        assert_eq!(touched.replicas, BTreeSet::from(["w3".to_string()]));
        assert_eq!(touched.apps, BTreeSet::from([web.spec.key()]));

        let ready = Replica {
            phase: Phase::Ready,
            ..w3
        };
        view.apply(
            puts(3, vec![Object::Replica(Box::new(ready))]),
            &mut touched,
        );
        assert_eq!(view.replica("w3").unwrap().phase, Phase::Ready);
        assert_eq!(ids(view.replicas_of(&web.spec.key())), ["w1", "w2", "w3"]);

        let mut touched = Touched::default();
        let delete = Delta {
            revision: 4,
            changes: vec![Change::Delete(ObjectKey::Replica {
                app: web.spec.key(),
                id: "w1".into(),
            })],
        };
        view.apply(delete, &mut touched);
        assert!(view.replica("w1").is_none());
        assert_eq!(ids(view.mine()), ["w3"]);
        assert_eq!(touched.replicas, BTreeSet::from(["w1".to_string()]));
        assert_eq!(view.revision(), 4);
    }

    #[test]
    fn duplicate_and_older_revisions_change_nothing() {
        let (web, mut view) = web_view();
        let mut touched = Touched::default();
        let w3 = replica(&web, "w3", 1, "me", Phase::Pending);
        view.apply(
            puts(5, vec![Object::Replica(Box::new(w3.clone()))]),
            &mut touched,
        );
        let gone = |revision| Delta {
            revision,
            changes: vec![Change::Delete(ObjectKey::Replica {
                app: web.spec.key(),
                id: "w3".into(),
            })],
        };
        let mut touched = Touched::default();
        assert!(!view.apply(gone(5), &mut touched), "a duplicate");
        assert!(!view.apply(gone(3), &mut touched), "from before");
        assert!(touched.is_empty());
        assert_eq!(view.replica("w3"), Some(&w3));
        assert_eq!(view.revision(), 5);
    }

    #[test]
    fn elsewhere_replicas_touch_their_app_only() {
        let (web, mut view) = web_view();
        let mut touched = Touched::default();
        let w2 = replica(&web, "w2", 1, "b", Phase::Unready);
        view.apply(puts(2, vec![Object::Replica(Box::new(w2))]), &mut touched);
        assert!(touched.replicas.is_empty());
        assert_eq!(touched.apps, BTreeSet::from([web.spec.key()]));
    }

    #[test]
    fn a_node_touches_its_replicas_apps_when_its_state_or_address_changes() {
        let (web, mut view) = web_view();
        let mut cordoned = node("b", NodeState::Ready);
        cordoned.schedulable = false;
        let mut touched = Touched::default();
        view.apply(puts(2, vec![Object::Node(cordoned)]), &mut touched);
        assert!(touched.is_empty(), "cordoning changes no endpoint");
        view.apply(
            puts(3, vec![Object::Node(node("b", NodeState::NotReady))]),
            &mut touched,
        );
        assert_eq!(touched.apps, BTreeSet::from([web.spec.key()]));
        let mut touched = Touched::default();
        view.apply(
            puts(4, vec![Object::Node(node("me", NodeState::NotReady))]),
            &mut touched,
        );
        assert!(
            touched.is_empty(),
            "this node's replicas are local endpoints"
        );
    }

    #[test]
    fn a_revision_touches_the_replicas_here_that_wait_for_it() {
        let (web, mut view) = web_view();
        let mut touched = Touched::default();
        view.apply(
            puts(
                2,
                vec![
                    Object::Replica(Box::new(replica(&web, "w9", 2, "me", Phase::Pending))),
                    Object::Replica(Box::new(replica(&web, "w8", 2, "b", Phase::Pending))),
                ],
            ),
            &mut touched,
        );
        let mut touched = Touched::default();
        view.apply(
            puts(3, vec![Object::Revision(revision(&web, 2).into())]),
            &mut touched,
        );
        assert_eq!(touched.replicas, BTreeSet::from(["w9".to_string()]));
        assert!(view.app_revision(&web.spec.key(), 2).is_some());
    }
}
