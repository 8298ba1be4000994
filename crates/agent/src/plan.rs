//! What a node should look like, as a pure function of the cluster state:
//! [`node_plan`] says which routes, services, remote endpoints and canary
//! splits its gateway should have, which replicas to start and stop, and
//! which reports to send again. The agent applies it: the gateway's tables in
//! one swap, then the starts and stops.

use shoal_api::{ReplicaReport, Snapshot};
use shoal_core::spec::AppKey;
use shoal_core::{Kind, NodeState, Phase, Replica, Revision};
use shoal_gateway::{RemoteReplica, Split, Tables};
use std::collections::{BTreeMap, HashMap};

/// One sync's work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePlan {
    pub tables: Tables,
    /// Replicas placed here that this node does not run yet, with their revision.
    pub start: Vec<(Replica, Revision)>,
    /// Replicas this node runs that are no longer placed here.
    pub stop: Vec<String>,
    /// Replicas whose last report the cluster state does not reflect.
    pub resend: Vec<String>,
}

/// `running` is what this node runs: each replica id with the last report
/// sent about it (`None` before the first).
pub fn node_plan(
    snapshot: &Snapshot,
    node: &str,
    running: &BTreeMap<String, Option<ReplicaReport>>,
) -> NodePlan {
    let mine: BTreeMap<&str, &Replica> = snapshot
        .replicas
        .iter()
        .filter(|r| r.node.as_deref() == Some(node))
        .map(|r| (r.id.as_str(), r))
        .collect();
    let stop = running
        .keys()
        .filter(|id| !mine.contains_key(id.as_str()))
        .cloned()
        .collect();
    let mut start = Vec::new();
    let mut resend = Vec::new();
    for (id, replica) in mine {
        match running.get(id) {
            Some(last) => {
                if last.as_ref().is_some_and(|rep| stale(rep, replica)) {
                    resend.push(id.to_string());
                }
            }
            None if replica.phase.is_terminal() => {}
            None => {
                if let Some(revision) = snapshot
                    .revisions
                    .iter()
                    .find(|r| r.app == replica.app && r.number == replica.revision)
                {
                    start.push((replica.clone(), revision.clone()));
                }
            }
        }
    }
    NodePlan {
        tables: tables(snapshot, node),
        start,
        stop,
        resend,
    }
}

/// Whether the cluster state lost (or never got) what was last reported.
fn stale(report: &ReplicaReport, replica: &Replica) -> bool {
    report.phase != replica.phase
        || report.message != replica.message
        || report.exit_code != replica.exit_code
        || report.restarts != replica.restarts
        || report.reason != replica.reason
}

fn tables(snapshot: &Snapshot, me: &str) -> Tables {
    let routes = snapshot
        .apps
        .iter()
        .filter_map(|a| a.spec.http.as_ref().map(|h| (a.spec.key(), h)))
        .flat_map(|(key, h)| h.routes.iter().map(move |r| (r.clone(), key.clone())))
        .collect();
    let services = snapshot
        .apps
        .iter()
        .filter(|a| a.spec.component.kind == Kind::Http)
        .map(|a| a.spec.key())
        .collect();
    // A node that stops heartbeating drops out of every gateway at once.
    let ready_nodes: HashMap<&str, &str> = snapshot
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Ready && n.name != me)
        .map(|n| (n.name.as_str(), n.gateway.as_str()))
        .collect();
    let mut remotes: HashMap<AppKey, Vec<RemoteReplica>> = HashMap::new();
    for r in snapshot.replicas.iter().filter(|r| r.phase == Phase::Ready) {
        if let Some(gw) = r.node.as_deref().and_then(|n| ready_nodes.get(n)) {
            remotes
                .entry(r.app.clone())
                .or_default()
                .push(RemoteReplica {
                    replica: r.id.clone(),
                    revision: r.revision,
                    gateway: gw.to_string(),
                });
        }
    }
    let splits = snapshot
        .rollouts
        .iter()
        .filter_map(|s| {
            let app = snapshot.apps.iter().find(|a| a.spec.key() == s.app)?;
            let (canary, weight) = s.split(&app.spec.rollout)?;
            Some((s.app.clone(), Split { canary, weight }))
        })
        .collect();
    // Only an autoscaled app with min = 0 wakes on a request; one a schedule
    // window sized to zero stays at zero until the window closes.
    let wake = snapshot
        .apps
        .iter()
        .filter(|a| a.spec.scale.autoscale.as_ref().is_some_and(|s| s.min == 0))
        .map(|a| a.spec.key())
        .collect();
    Tables {
        routes,
        services,
        remotes,
        splits,
        wake,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::spec::parse_app;
    use shoal_core::{App, Capacity, Node, RolloutPhase, RolloutStatus};

    fn app(name: &str, kind: &str, revision: u64, extra: &str) -> App {
        let http = if kind == "http" {
            format!("[http]\nroutes = [\"/{name}\"]\n")
        } else {
            String::new()
        };
        let src = format!(
            "name = \"{name}\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"{kind}\"\n{http}{extra}",
            "a".repeat(64)
        );
        let spec = parse_app(&src)
            .unwrap()
            .resolve(format!("sha256:{}", "a".repeat(64)))
            .unwrap();
        App {
            spec,
            revision,
            created_at: 0,
            updated_at: 0,
            scale: Default::default(),
            job: Default::default(),
        }
    }

    fn revision(a: &App, number: u64) -> Revision {
        Revision {
            app: a.spec.key(),
            number,
            template: a.spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            outcome: None,
        }
    }

    fn replica(a: &App, id: &str, revision: u64, node: &str, phase: Phase) -> Replica {
        Replica {
            id: id.into(),
            app: a.spec.key(),
            revision,
            kind: a.spec.component.kind,
            resources: a.spec.resources.clone(),
            node: Some(node.into()),
            phase,
            message: None,
            exit_code: None,
            restarts: 0,
            reason: None,
            avoid: vec![],
            scheduled_at: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn node(name: &str, state: NodeState) -> Node {
        Node {
            name: name.into(),
            gateway: format!("{name}:8080"),
            capacity: Capacity::default(),
            labels: Default::default(),
            state,
            schedulable: true,
            draining: false,
            joined_at: 0,
        }
    }

    fn report(r: &Replica, phase: Phase) -> Option<ReplicaReport> {
        Some(ReplicaReport {
            app: r.app.clone(),
            replica: r.id.clone(),
            node: "me".into(),
            phase,
            message: None,
            exit_code: None,
            restarts: 0,
            reason: None,
        })
    }

    fn snapshot(apps: Vec<App>, replicas: Vec<Replica>, nodes: Vec<Node>) -> Snapshot {
        Snapshot {
            revision: 1,
            revisions: apps.iter().map(|a| revision(a, a.revision)).collect(),
            apps,
            replicas,
            nodes,
            rollouts: vec![],
        }
    }

    #[test]
    fn starts_what_is_placed_here_and_stops_what_is_not() {
        let web = app("web", "http", 1, "");
        let job = app("job", "job", 1, "");
        let s = snapshot(
            vec![web.clone(), job.clone()],
            vec![
                replica(&web, "w1", 1, "me", Phase::Pending),
                replica(&web, "w2", 1, "other", Phase::Pending),
                replica(&job, "j1", 1, "me", Phase::Succeeded),
                replica(&web, "w3", 7, "me", Phase::Pending), // no such revision
            ],
            vec![node("me", NodeState::Ready)],
        );
        let running = BTreeMap::from([("gone".to_string(), None)]);
        let p = node_plan(&s, "me", &running);
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
        assert!(p.resend.is_empty());
    }

    #[test]
    fn resends_reports_the_cluster_lost() {
        let web = app("web", "http", 1, "");
        let w1 = replica(&web, "w1", 1, "me", Phase::Starting);
        let w2 = replica(&web, "w2", 1, "me", Phase::Ready);
        let s = snapshot(
            vec![web],
            vec![w1.clone(), w2.clone()],
            vec![node("me", NodeState::Ready)],
        );
        let running = BTreeMap::from([
            ("w1".to_string(), report(&w1, Phase::Ready)),
            ("w2".to_string(), report(&w2, Phase::Ready)),
        ]);
        let p = node_plan(&s, "me", &running);
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
        let mut s = snapshot(
            vec![web.clone(), daemon],
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
            message: String::new(),
        });
        let t = node_plan(&s, "me", &BTreeMap::new()).tables;
        assert_eq!(t.routes.len(), 1);
        assert_eq!(t.routes[0].1, web.spec.key());
        assert_eq!(t.services, [web.spec.key()], "http apps only");
        assert_eq!(
            t.remotes[&web.spec.key()],
            [RemoteReplica {
                replica: "there".into(),
                revision: 1,
                gateway: "b:8080".into()
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
    }
}
