//! One controller pass, as the pure `plan` makes it: how long a pass takes
//! for 1,000 and 10,000 one-replica apps on 10 nodes, both when every app
//! needs its replica created and placed (a burst of applies) and when nothing
//! is to be done (the steady state, a full pass), and the pass the controller
//! makes when it knows what changed (`plan_apps`: one app changed among
//! them), whose cost should not grow with the cluster.
//! Run with `cargo bench -p shoal-scheduler --bench plan`.

use shoal_core::spec::{AppKey, parse_app};
use shoal_core::{
    App, Capacity, Node, NodeState, Phase, Replica, Revision, RolloutPhase, RolloutStatus,
};
use shoal_scheduler::Strategy;
use shoal_scheduler::plan::{Ids, Leases, Plan, Read, World, plan, plan_apps};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const NODES: usize = 10;
const RUNS: usize = 5;

struct Counter(u64);

impl Ids for Counter {
    fn next_id(&mut self) -> String {
        self.0 += 1;
        format!("{:05}", self.0)
    }
}

fn world(apps: usize, placed: bool) -> World {
    let digest = format!("sha256:{}", "a".repeat(64));
    let mut w = World {
        apps: BTreeMap::new(),
        revisions: BTreeMap::new(),
        replicas: BTreeMap::new(),
        nodes: (0..NODES)
            .map(|i| {
                let node = Node {
                    name: format!("node-{i}"),
                    gateway: format!("127.0.0.1:{}", 8080 + i),
                    capacity: Capacity {
                        cpu_millis: 1 << 40,
                        memory_bytes: 1 << 50,
                        instances: 1 << 40,
                    },
                    labels: BTreeMap::new(),
                    state: NodeState::Ready,
                    schedulable: true,
                    draining: false,
                    leaving: None,
                    joined_at: 0,
                    label_overrides: Default::default(),
                };
                (node.name.clone(), Read::new(node, 1))
            })
            .collect(),
        leases: Leases::default(),
        rollouts: BTreeMap::new(),
        volumes: BTreeMap::new(),
        volume_usage: BTreeMap::new(),
        measurements: BTreeMap::new(),
        quotas: BTreeMap::new(),
        started_at: 0,
        node_grace_ms: 3_000,
        strategy: Strategy::BinPack,
        rebalance: true,
    };
    for i in 0..apps {
        let src = format!(
            "name = \"app{i}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/app{i}\"]\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        let key = AppKey::new("default", &format!("app{i}"));
        let revision = Revision {
            app: key.clone(),
            number: 1,
            template: spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            undid: None,
            outcome: None,
        };
        if placed {
            let id = format!("app{i}-1-x");
            let replica = Read::new(
                Replica {
                    id: id.clone(),
                    app: key.clone(),
                    revision: 1,
                    kind: spec.component.kind,
                    resources: spec.resources.clone(),
                    node: Some(format!("node-{}", i % NODES)),
                    phase: Phase::Ready,
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
                },
                10,
            );
            w.replicas
                .entry(key.clone())
                .or_default()
                .insert(id, replica);
            let status = RolloutStatus {
                app: key.clone(),
                revision: 1,
                stable: Some(1),
                strategy: spec.rollout.strategy,
                phase: RolloutPhase::Complete,
                paused: false,
                step: 0,
                step_started_at: None,
                ready: 1,
                progressed_at: 0,
                started_at: 0,
                rolled_back_from: None,
                previous_stable: None,
                message: String::new(),
            };
            w.rollouts.insert(key.clone(), Read::new(status, 10));
        }
        w.revisions.insert((key.clone(), 1), Read::new(revision, 5));
        w.apps.insert(
            key.clone(),
            Read::new(
                App {
                    spec,
                    revision: 1,
                    created_at: 0,
                    updated_at: 0,
                    scale: Default::default(),
                    job: Default::default(),
                },
                5,
            ),
        );
    }
    w
}

fn measure(label: &str, w: &World, pass: impl Fn(&World) -> Plan) {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let p = pass(w);
            let t = start.elapsed();
            std::hint::black_box(p);
            t
        })
        .collect();
    times.sort();
    let batches = pass(w).batches.len();
    println!(
        "  {label:<46} median {:>8.2} ms  best {:>8.2} ms  ({batches} batches)",
        times[RUNS / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
}

fn main() {
    println!("plan: one controller pass, {NODES} nodes, one thread, {RUNS} runs");
    let full = |w: &World| plan(w, 2_000, &mut Counter(0));
    for apps in [1_000, 10_000] {
        measure(
            &format!("{apps} new apps (create + place each)"),
            &world(apps, false),
            full,
        );
        let mut steady = world(apps, true);
        measure(
            &format!("{apps} apps, steady (nothing to do)"),
            &steady,
            full,
        );
        // One app scaled to 2: the focused pass creates and places its replica.
        let one = AppKey::new("default", "app7");
        steady.apps.get_mut(&one).expect("app7").value.spec.replicas = 2;
        let focus = BTreeSet::from([one]);
        measure(
            &format!("{apps} apps, one changed (plan_apps)"),
            &steady,
            |w| plan_apps(w, &focus, 2_000, &mut Counter(0)),
        );
    }
}
