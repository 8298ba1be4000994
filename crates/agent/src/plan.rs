//! What a node should do about a change, as a pure function of its
//! [`ClusterView`] and what the change [`Touched`]: [`node_plan`] says which
//! replicas to start and stop, which reports to send again, and which apps'
//! gateway tables (routes, service, remote endpoints, canary split, wake)
//! differ from what the gateway was last given. It looks only at what was
//! touched, so its cost follows the change, not the size of the cluster; the
//! agent applies it, the tables first, in one gateway update.

use crate::view::{ClusterView, Touched};
use shoal_api::ReplicaReport;
use shoal_core::spec::{AppKey, Inbound};
use shoal_core::{Kind, NodeState, Phase, Replica, Revision, Route};
use shoal_gateway::{RemoteReplica, Split, Tables};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// One sync's work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePlan {
    /// Apps whose gateway tables changed, with their new ones (the default:
    /// the gateway forgets the app).
    pub tables: Vec<(AppKey, AppTables)>,
    /// Replicas placed here that this node does not run yet, with their revision.
    pub start: Vec<(Replica, Revision)>,
    /// Replicas this node runs that are no longer placed here.
    pub stop: Vec<String>,
    /// Replicas whose last report the cluster state does not reflect.
    pub resend: Vec<String>,
}

/// What the gateway routes by for one app. The agent keeps what it last gave
/// the gateway per app and hands over only the apps whose tables differ.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppTables {
    /// Its routes, if it is an http app.
    pub routes: Vec<Route>,
    /// Other apps may call it by name, those these admit (`[network] inbound`): every http
    /// app is a service.
    pub service: Option<Inbound>,
    /// Its Ready replicas on other Ready nodes, by id.
    pub remotes: Vec<RemoteReplica>,
    /// Its canary step's traffic split, while one is in progress.
    pub split: Option<Split>,
    /// It scales to zero: a request finding no endpoint waits for one.
    pub wake: bool,
}

/// `touched` is what to look at: the replicas of this node to check, the apps
/// whose tables to recompute. `running` holds those of the touched replicas
/// this node runs, each with the last report sent about it (`None` before the
/// first). `sent` is every app's tables as the gateway has them (an app
/// missing has none).
pub fn node_plan(
    view: &ClusterView,
    touched: &Touched,
    running: &BTreeMap<String, Option<ReplicaReport>>,
    sent: &HashMap<AppKey, AppTables>,
) -> NodePlan {
    let mut plan = NodePlan::default();
    for id in &touched.replicas {
        let placed = view
            .replica(id)
            .filter(|r| r.node.as_deref() == Some(view.me()));
        match (running.get(id), placed) {
            (Some(last), Some(replica)) => {
                if last.as_ref().is_some_and(|rep| stale(rep, replica)) {
                    plan.resend.push(id.clone());
                }
            }
            (Some(_), None) => plan.stop.push(id.clone()),
            (None, Some(replica)) if !replica.phase.is_terminal() => {
                if let Some(revision) = view.app_revision(&replica.app, replica.revision) {
                    plan.start.push((replica.clone(), revision.clone()));
                }
            }
            (None, _) => {}
        }
    }
    let none = AppTables::default();
    for app in &touched.apps {
        let tables = app_tables(view, app);
        if sent.get(app).unwrap_or(&none) != &tables {
            plan.tables.push((app.clone(), tables));
        }
    }
    plan
}

/// Whether the cluster state lost (or never got) what was last reported.
fn stale(report: &ReplicaReport, replica: &Replica) -> bool {
    report.phase != replica.phase
        || report.message != replica.message
        || report.exit_code != replica.exit_code
        || report.restarts != replica.restarts
        || report.reason != replica.reason
}

/// The modules to forget now: held (`cached`) but run by no replica here (`in_use`) since at
/// least `grace` ago. `unused_since` remembers when each went unused, across calls; a module
/// run again is dropped from it.
pub fn unused_modules(
    cached: &BTreeSet<String>,
    in_use: &HashSet<String>,
    unused_since: &mut HashMap<String, Instant>,
    now: Instant,
    grace: Duration,
) -> Vec<String> {
    unused_since.retain(|d, _| cached.contains(d) && !in_use.contains(d));
    let mut forget = Vec::new();
    for digest in cached.iter().filter(|d| !in_use.contains(*d)) {
        let since = *unused_since.entry(digest.clone()).or_insert(now);
        if now.duration_since(since) >= grace {
            forget.push(digest.clone());
            unused_since.remove(digest);
        }
    }
    forget
}

/// One app's tables from the view: its record, its rollout, and its replicas
/// (never those of this node, which the agent adds as local endpoints).
pub fn app_tables(view: &ClusterView, key: &AppKey) -> AppTables {
    let app = view.app(key);
    // A node that stops heartbeating drops out of every gateway at once.
    let gateway_of = |node: &str| {
        view.node(node)
            .filter(|n| n.state == NodeState::Ready && n.name != view.me())
            .map(|n| n.gateway.clone())
    };
    let remotes = view
        .replicas_of(key)
        .filter(|r| r.phase == Phase::Ready)
        .filter_map(|r| {
            let node = r.node.as_deref()?;
            Some(RemoteReplica {
                replica: r.id.clone(),
                revision: r.revision,
                node: node.to_string(),
                gateway: gateway_of(node)?,
                timeout: view
                    .app_revision(key, r.revision)
                    .map(|rev| rev.template.timeout_ms)
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis),
            })
        })
        .collect();
    let Some(app) = app else {
        return AppTables {
            remotes,
            ..AppTables::default()
        };
    };
    let split = view
        .rollout(key)
        .and_then(|s| s.traffic(&app.spec.rollout))
        .map(|(canary, weight)| Split { canary, weight });
    AppTables {
        routes: app
            .spec
            .http
            .as_ref()
            .map(|h| h.routes.clone())
            .unwrap_or_default(),
        service: (app.spec.component.kind == Kind::Http).then(|| app.spec.inbound()),
        remotes,
        split,
        // Only an autoscaled app that may idle to zero wakes on a request; one a schedule
        // window sized to zero stays at zero until the window closes.
        wake: app.spec.scale.may_idle_to_zero(),
    }
}

/// Every app's tables, for a gateway starting over from a fresh snapshot;
/// apps with none are left out.
pub fn all_tables(view: &ClusterView) -> HashMap<AppKey, AppTables> {
    let none = AppTables::default();
    view.app_keys()
        .into_iter()
        .map(|key| (key.clone(), app_tables(view, key)))
        .filter(|(_, tables)| tables != &none)
        .collect()
}

/// Apps' tables in the gateway's shape.
pub fn gateway_tables<'a>(apps: impl IntoIterator<Item = (&'a AppKey, &'a AppTables)>) -> Tables {
    let mut out = Tables::default();
    for (key, t) in apps {
        out.routes
            .extend(t.routes.iter().map(|r| (r.clone(), key.clone())));
        if let Some(inbound) = &t.service {
            out.services.push((key.clone(), inbound.clone()));
        }
        if !t.remotes.is_empty() {
            out.remotes.insert(key.clone(), t.remotes.clone());
        }
        if let Some(split) = t.split {
            out.splits.insert(key.clone(), split);
        }
        if t.wake {
            out.wake.push(key.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{app, node, puts, replica, report, revision, snapshot};
    use shoal_api::Object;
    use shoal_core::{RolloutPhase, RolloutStatus};

    #[test]
    fn a_module_is_forgotten_once_unused_for_the_grace_and_kept_while_run() {
        let set = |ds: &[&str]| ds.iter().map(|d| d.to_string()).collect::<BTreeSet<_>>();
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let cached = set(&["a", "b"]);
        let mut since = HashMap::new();
        let in_use: HashSet<String> = ["a".to_string()].into();
        assert!(unused_modules(&cached, &in_use, &mut since, t0, grace).is_empty());
        let later = t0 + Duration::from_secs(59);
        assert!(unused_modules(&cached, &in_use, &mut since, later, grace).is_empty());
        let due = t0 + grace;
        assert_eq!(
            unused_modules(&cached, &in_use, &mut since, due, grace),
            ["b"]
        );
        // Run again meanwhile: the clock starts over when it stops.
        let cached = set(&["a", "c"]);
        assert!(unused_modules(&cached, &HashSet::new(), &mut since, due, grace).is_empty());
        let both = unused_modules(&cached, &HashSet::new(), &mut since, due + grace, grace);
        assert_eq!(both, ["a", "c"]);
        assert!(since.is_empty());
    }

    /// What the periodic resync looks at: every replica here or running.
    fn everything(
        view: &ClusterView,
        running: &BTreeMap<String, Option<ReplicaReport>>,
    ) -> Touched {
        Touched {
            replicas: view
                .mine()
                .map(|r| r.id.clone())
                .chain(running.keys().cloned())
                .collect(),
            apps: Default::default(),
        }
    }

    fn route(path: &str) -> Route {
        Route::parse(path).unwrap()
    }

    #[test]
    fn starts_what_is_placed_here_and_stops_what_is_not() {
        let web = app("web", "http", 1, "");
        let job = app("job", "job", 1, "");
        let view = ClusterView::new(
            "me",
            snapshot(
                vec![web.clone(), job.clone()],
                vec![
                    replica(&web, "w1", 1, "me", Phase::Pending),
                    replica(&web, "w2", 1, "other", Phase::Pending),
                    replica(&job, "j1", 1, "me", Phase::Succeeded),
                    replica(&web, "w3", 7, "me", Phase::Pending), // no such revision
                ],
                vec![node("me", NodeState::Ready)],
            ),
        );
        let running = BTreeMap::from([("gone".to_string(), None)]);
        let p = node_plan(
            &view,
            &everything(&view, &running),
            &running,
            &HashMap::new(),
        );
        let started: Vec<(&str, u64)> = p
            .start
            .iter()
            .map(|(r, rev)| (r.id.as_str(), rev.number))
            .collect();
        assert_eq!(
            started,
            [("w1", 1)],
            "not elsewhere, not finished, not revisionless"
        );
        assert_eq!(p.stop, ["gone"]);
        assert!(p.resend.is_empty() && p.tables.is_empty());
    }

    #[test]
    fn looks_only_at_the_replicas_touched() {
        let web = app("web", "http", 1, "");
        let view = ClusterView::new(
            "me",
            snapshot(
                vec![web.clone()],
                vec![
                    replica(&web, "w1", 1, "me", Phase::Pending),
                    replica(&web, "w2", 1, "me", Phase::Pending),
                ],
                vec![node("me", NodeState::Ready)],
            ),
        );
        let touched = Touched {
            replicas: ["w2".to_string()].into(),
            apps: Default::default(),
        };
        let p = node_plan(&view, &touched, &BTreeMap::new(), &HashMap::new());
        assert_eq!(p.start.len(), 1);
        assert_eq!(p.start[0].0.id, "w2");
    }

    #[test]
    fn resends_reports_the_cluster_lost() {
        let web = app("web", "http", 1, "");
        let w1 = replica(&web, "w1", 1, "me", Phase::Starting);
        let w2 = replica(&web, "w2", 1, "me", Phase::Ready);
        let view = ClusterView::new(
            "me",
            snapshot(
                vec![web],
                vec![w1.clone(), w2.clone()],
                vec![node("me", NodeState::Ready)],
            ),
        );
        let running = BTreeMap::from([
            ("w1".to_string(), report(&w1, Phase::Ready)),
            ("w2".to_string(), report(&w2, Phase::Ready)),
        ]);
        let p = node_plan(
            &view,
            &everything(&view, &running),
            &running,
            &HashMap::new(),
        );
        assert_eq!(p.resend, ["w1"]);
        assert!(p.start.is_empty() && p.stop.is_empty());
    }

    #[test]
    fn gateway_tables_cover_every_app_and_ready_remote_replicas() {
        let web = app(
            "web",
            "http",
            2,
            "[rollout]\nstrategy = \"canary\"\nsteps = [{ weight = 25, pause = \"1m\" }]\n",
        );
        let daemon = app("tick", "daemon", 1, "");
        let lazy = app(
            "lazy",
            "http",
            1,
            "[scale]\nmin = 0\nmax = 3\ntarget_concurrency = 10\n[network]\ninbound = [\"*.ops\"]\n",
        );
        let mut s = snapshot(
            vec![web.clone(), daemon, lazy.clone()],
            vec![
                replica(&web, "here", 1, "me", Phase::Ready),
                replica(&web, "there", 1, "b", Phase::Ready),
                replica(&web, "starting", 2, "b", Phase::Starting),
                replica(&web, "lost", 1, "c", Phase::Ready),
            ],
            vec![
                node("me", NodeState::Ready),
                node("b", NodeState::Ready),
                node("c", NodeState::NotReady),
            ],
        );
        // The remote replica's revision is known: its timeout bounds the hop.
        s.revisions
            .retain(|r| !(r.app == web.spec.key() && r.number == 1));
        s.revisions.push(revision(&web, 1));
        s.rollouts.push(RolloutStatus {
            app: web.spec.key(),
            revision: 2,
            stable: Some(1),
            strategy: web.spec.rollout.strategy,
            phase: RolloutPhase::Progressing,
            paused: false,
            step: 0,
            step_started_at: Some(5),
            ready: 1,
            progressed_at: 5,
            started_at: 0,
            rolled_back_from: None,
            previous_stable: None,
            message: String::new(),
        });
        let all = all_tables(&ClusterView::new("me", s));
        assert_eq!(all.len(), 2, "the daemon has nothing to route");
        let mut t = gateway_tables(&all);
        t.routes.sort();
        t.services.sort();
        assert_eq!(
            t.routes,
            [
                (route("/lazy"), lazy.spec.key()),
                (route("/web"), web.spec.key())
            ]
        );
        assert_eq!(
            t.services,
            [
                (lazy.spec.key(), lazy.spec.inbound()),
                (web.spec.key(), Inbound::namespace("default"))
            ],
            "http apps only, each with who may call it"
        );
        assert!(t.services[0].1.admits(&AppKey::new("ops", "cron")));
        assert_eq!(
            t.remotes[&web.spec.key()],
            [RemoteReplica {
                replica: "there".into(),
                revision: 1,
                node: "b".into(),
                gateway: "b:8080".into(),
                timeout: Some(Duration::from_millis(web.spec.template().timeout_ms)),
            }],
            "not local, not starting, not on a NotReady node"
        );
        assert_eq!(
            t.splits[&web.spec.key()],
            Split {
                canary: 2,
                weight: 25
            }
        );
        assert_eq!(t.wake, [lazy.spec.key()], "min = 0 only");
    }

    /// A node with `web` (a replica here, one on node b) and `other` (one on b),
    /// whose gateway has every app's tables.
    fn two_apps() -> (ClusterView, HashMap<AppKey, AppTables>) {
        let web = app("web", "http", 1, "");
        let other = app("other", "http", 1, "");
        let view = ClusterView::new(
            "me",
            snapshot(
                vec![web.clone(), other.clone()],
                vec![
                    replica(&web, "w1", 1, "me", Phase::Ready),
                    replica(&web, "w2", 1, "b", Phase::Ready),
                    replica(&other, "o1", 1, "b", Phase::Ready),
                ],
                vec![node("me", NodeState::Ready), node("b", NodeState::Ready)],
            ),
        );
        let sent = all_tables(&view);
        (view, sent)
    }

    #[test]
    fn a_change_to_another_app_does_nothing_here() {
        let (mut view, sent) = two_apps();
        let w1 = view.replica("w1").unwrap().clone();
        let mut other = view.app(&AppKey::new("default", "other")).unwrap().clone();
        other.spec.replicas = 2;
        let starting = replica(&other, "o2", 1, "b", Phase::Starting);
        let mut touched = Touched::default();
        view.apply(
            puts(
                2,
                vec![
                    Object::App(other.into()),
                    Object::Replica(Box::new(starting)),
                ],
            ),
            &mut touched,
        );
        let running = BTreeMap::from([("w1".to_string(), report(&w1, Phase::Ready))]);
        let p = node_plan(&view, &touched, &running, &sent);
        assert_eq!(p, NodePlan::default(), "{touched:?}");
    }

    #[test]
    fn tables_are_recomputed_when_a_route_changes() {
        let (mut view, sent) = two_apps();
        let mut web = view.app(&AppKey::new("default", "web")).unwrap().clone();
        web.spec.http.as_mut().unwrap().routes = vec![route("/shop")];
        let mut touched = Touched::default();
        view.apply(puts(2, vec![Object::App(web.clone().into())]), &mut touched);
        let p = node_plan(&view, &touched, &BTreeMap::new(), &sent);
        let key = web.spec.key();
        assert_eq!(
            p.tables,
            [(
                key.clone(),
                AppTables {
                    routes: vec![route("/shop")],
                    ..sent[&key].clone()
                }
            )]
        );
        assert!(p.start.is_empty() && p.stop.is_empty() && p.resend.is_empty());
    }

    #[test]
    fn a_node_going_away_takes_only_its_apps_endpoints() {
        let (mut view, sent) = two_apps();
        let mut touched = Touched::default();
        view.apply(
            puts(2, vec![Object::Node(node("b", NodeState::NotReady))]),
            &mut touched,
        );
        let p = node_plan(&view, &touched, &BTreeMap::new(), &sent);
        let apps: Vec<(&str, usize)> = p
            .tables
            .iter()
            .map(|(k, t)| (k.name.as_str(), t.remotes.len()))
            .collect();
        assert_eq!(apps, [("other", 0), ("web", 0)]);
    }

    #[test]
    fn a_deleted_app_is_forgotten_and_its_replicas_here_stopped() {
        let (mut view, sent) = two_apps();
        let web = AppKey::new("default", "web");
        let mut touched = Touched::default();
        let gone = |id: &str| {
            shoal_api::Change::Delete(shoal_api::ObjectKey::Replica {
                app: web.clone(),
                id: id.into(),
            })
        };
        view.apply(
            shoal_api::Delta {
                revision: 2,
                changes: vec![
                    shoal_api::Change::Delete(shoal_api::ObjectKey::App(web.clone())),
                    gone("w1"),
                    gone("w2"),
                ],
            },
            &mut touched,
        );
        let running = BTreeMap::from([("w1".to_string(), None)]);
        let p = node_plan(&view, &touched, &running, &sent);
        assert_eq!(p.stop, ["w1"]);
        assert_eq!(p.tables, [(web, AppTables::default())]);
    }

    #[test]
    fn a_revision_arriving_after_its_replica_starts_it() {
        let web = app("web", "http", 1, "");
        let mut view = ClusterView::new(
            "me",
            snapshot(
                vec![web.clone()],
                vec![],
                vec![node("me", NodeState::Ready)],
            ),
        );
        let mut touched = Touched::default();
        view.apply(
            puts(
                2,
                vec![Object::Replica(Box::new(replica(
                    &web,
                    "w5",
                    5,
                    "me",
                    Phase::Pending,
                )))],
            ),
            &mut touched,
        );
        let p = node_plan(&view, &touched, &BTreeMap::new(), &all_tables(&view));
        assert!(p.start.is_empty(), "no revision 5 yet");
        let mut touched = Touched::default();
        view.apply(
            puts(3, vec![Object::Revision(revision(&web, 5).into())]),
            &mut touched,
        );
        let p = node_plan(&view, &touched, &BTreeMap::new(), &all_tables(&view));
        assert_eq!(p.start.len(), 1);
        assert_eq!(p.start[0].1.number, 5);
    }
}
