//! Cluster objects for the agent's unit tests, built the way the control plane
//! builds them (apps from TOML), and deltas carrying them.

use shoal_api::{Change, Delta, Object, ReplicaReport, Snapshot};
use shoal_core::spec::parse_app;
use shoal_core::{App, Capacity, Node, NodeState, Phase, Replica, Revision};

/// An app of `kind` at `revision`; an http app routes `/{name}`. `extra` is
/// more TOML (`[rollout]`, `[scale]`…).
pub fn app(name: &str, kind: &str, revision: u64, extra: &str) -> App {
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

pub fn revision(a: &App, number: u64) -> Revision {
    Revision {
        app: a.spec.key(),
        number,
        template: a.spec.template(),
        hash: String::new(),
        created_at: 0,
        cause: "created".into(),
        undid: None,
        outcome: None,
    }
}

pub fn replica(a: &App, id: &str, revision: u64, node: &str, phase: Phase) -> Replica {
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
        moving_since: None,
        note: None,
        ready_since: None,
        created_at: 0,
        updated_at: 0,
    }
}

pub fn node(name: &str, state: NodeState) -> Node {
    Node {
        name: name.into(),
        gateway: format!("{name}:8080"),
        capacity: Capacity::default(),
        labels: Default::default(),
        state,
        schedulable: true,
        draining: false,
        leaving: None,
        joined_at: 0,
        label_overrides: Default::default(),
    }
}

/// What node `me` last said about `r`.
pub fn report(r: &Replica, phase: Phase) -> Option<ReplicaReport> {
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

/// A snapshot at revision 1 with each app's current revision.
pub fn snapshot(apps: Vec<App>, replicas: Vec<Replica>, nodes: Vec<Node>) -> Snapshot {
    Snapshot {
        revision: 1,
        store: 0,
        revisions: apps.iter().map(|a| revision(a, a.revision)).collect(),
        apps,
        replicas,
        nodes,
        rollouts: vec![],
    }
}

/// A delta at `revision` putting `objects`.
pub fn puts(revision: u64, objects: Vec<Object>) -> Delta {
    Delta {
        revision,
        changes: objects.into_iter().map(Change::Put).collect(),
    }
}
