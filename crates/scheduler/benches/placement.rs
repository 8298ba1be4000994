//! Placements per second: 10,000 replicas of 100 apps onto 5,000 simulated
//! nodes, on one thread, through the same `Cluster` API the controller uses.
//! Run with `cargo bench -p shoal-scheduler`. For scale: kube-scheduler does
//! about 680–810 pods/s at 5,000 nodes, Nomad about 1,500/s.
//!
//! Nodes vary in size, sit in zones a/b/c, a few carry `gpu=true`, and a few
//! are cordoned or NotReady. Apps vary in size and request; some select a
//! zone or gpu nodes, some require spread. The gpu apps ask for more spread
//! replicas than there are gpu nodes, so the failure path is measured too.

use shoal_core::spec::{AppKey, Placement as AppPlacement, Spread};
use shoal_core::{Capacity, Node, NodeState};
use shoal_scheduler::{Cluster, Request, Strategy};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const NODES: usize = 5_000;
const APPS: usize = 100;
const RUNS: usize = 7;

/// A fixed-seed generator, so every run and every machine places the same cluster.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn nodes(rng: &mut Lcg) -> Vec<Node> {
    (0..NODES)
        .map(|i| {
            let size = rng.below(4);
            let mut labels =
                BTreeMap::from([("zone".to_string(), ["a", "b", "c"][i % 3].to_string())]);
            if i % 50 == 0 {
                labels.insert("gpu".into(), "true".into());
            }
            let roll = rng.below(100);
            Node {
                name: format!("node-{i:05}"),
                gateway: format!("10.0.{}.{}:8080", i / 256, i % 256),
                capacity: Capacity {
                    cpu_millis: 4_000 << size,
                    memory_bytes: (8u64 << 30) << size,
                    instances: 512 << size,
                },
                labels,
                state: if roll == 0 {
                    NodeState::NotReady
                } else {
                    NodeState::Ready
                },
                schedulable: roll != 1,
                draining: false,
                leaving: None,
                joined_at: 0,
                label_overrides: Default::default(),
            }
        })
        .collect()
}

/// Per app: its key, how many replicas, what each reserves, and its placement.
fn apps(rng: &mut Lcg) -> Vec<(AppKey, usize, Capacity, AppPlacement)> {
    (0..APPS)
        .map(|i| {
            let mut placement = AppPlacement::default();
            if i % 5 == 1 {
                let zone = ["a", "b", "c"][i % 3];
                placement.node_selector.insert("zone".into(), zone.into());
            }
            if i % 40 == 4 {
                placement.node_selector.insert("gpu".into(), "true".into());
                placement.spread = Spread::Required;
            } else if i % 7 == 0 {
                placement.spread = Spread::Required;
            }
            let resources = Capacity {
                cpu_millis: 100 * (1 + rng.below(20)),
                memory_bytes: (64 << 20) << rng.below(6),
                // Replicas reserve no instance slots (see `Capacity::of`).
                instances: 0,
            };
            // 20, 60, 100, 140, 180: 10,000 replicas in all.
            let replicas = 20 + (i % 5) * 40;
            (
                AppKey::new("default", &format!("app-{i:03}")),
                replicas,
                resources,
                placement,
            )
        })
        .collect()
}

fn main() {
    let mut rng = Lcg(42);
    let nodes = nodes(&mut rng);
    let apps = apps(&mut rng);
    let requests: Vec<(&AppKey, Request<'_>)> = apps
        .iter()
        .flat_map(|(key, n, resources, placement)| {
            (0..*n).map(move |_| {
                let request = Request {
                    resources: resources.clone(),
                    // Limits as large as requests: every instance fits a node it is placed on.
                    instance_memory: resources.memory_bytes,
                    node_selector: &placement.node_selector,
                    spread: placement.spread,
                };
                (key, request)
            })
        })
        .collect();
    let replicas = requests.len();

    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    let mut first: Option<Vec<Option<usize>>> = None;
    let mut unschedulable = (0, String::new());
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut cluster = Cluster::new(&nodes, Strategy::BinPack);
        let results = cluster.place_all(requests.iter().map(|(k, r)| (*k, r)));
        times.push(start.elapsed());

        let chosen: Vec<Option<usize>> = results
            .iter()
            .map(|r| r.as_ref().ok().map(|p| p.index))
            .collect();
        match &first {
            None => {
                let failed: Vec<String> = results
                    .iter()
                    .filter_map(|r| r.as_ref().err().map(ToString::to_string))
                    .collect();
                unschedulable = (failed.len(), failed.first().cloned().unwrap_or_default());
                first = Some(chosen);
            }
            Some(f) => assert_eq!(f, &chosen, "placement is deterministic"),
        }
    }
    times.sort();
    let (best, median) = (times[0], times[RUNS / 2]);
    let rate = |d: Duration| replicas as f64 / d.as_secs_f64();

    let open = nodes
        .iter()
        .filter(|n| n.state == NodeState::Ready && n.schedulable)
        .count();
    println!(
        "placement: {replicas} replicas of {APPS} apps onto {NODES} nodes ({open} open), bin-pack, one thread, {RUNS} runs"
    );
    println!(
        "  placed {}, unschedulable {}",
        replicas - unschedulable.0,
        unschedulable.0
    );
    if unschedulable.0 > 0 {
        println!("  e.g. {}", unschedulable.1);
    }
    println!(
        "  best   {:>8.1} ms  {:>9.0} placements/s",
        best.as_secs_f64() * 1e3,
        rate(best)
    );
    println!(
        "  median {:>8.1} ms  {:>9.0} placements/s",
        median.as_secs_f64() * 1e3,
        rate(median)
    );
}
