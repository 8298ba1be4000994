//! Events as followers see them: `shoal events --follow` asks for what came
//! after the last event it saw, and must never skip one, however many writers
//! commit at once.

use shoal_control::{ControlConfig, ControlPlane};
use shoal_core::{Capacity, Node, NodeState};
use shoal_store::{BlobStore, Store};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn node(name: String) -> Node {
    Node {
        name,
        gateway: "127.0.0.1:1".into(),
        capacity: Capacity::default(),
        labels: Default::default(),
        state: NodeState::Ready,
        schedulable: true,
        draining: false,
        leaving: None,
        joined_at: 0,
        label_overrides: Default::default(),
    }
}

#[test]
fn a_follower_sees_every_event_of_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let blobs = BlobStore::open(&dir.path().join("modules")).unwrap();
    let cp = ControlPlane::new(store, blobs, ControlConfig::default()).unwrap();

    const WRITERS: usize = 4;
    const EACH: usize = 50;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let cp = cp.clone();
            std::thread::spawn(move || {
                // Every registration records a NodeReady event in its transaction.
                for i in 0..EACH {
                    cp.register_node(node(format!("n{w}-{i}"))).unwrap();
                }
            })
        })
        .collect();

    // Follow with small pages while they write, as `shoal events --follow`
    // does, until the writers are done and nothing more comes.
    let mut seen: Vec<String> = Vec::new();
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "saw only {} events", seen.len());
        let done = writers.iter().all(|w| w.is_finished());
        let page = cp.events_after(None, after, 7).unwrap();
        for e in &page {
            assert!(e.seq > after, "events come in order");
            seen.push(e.object.clone());
        }
        match page.last() {
            Some(last) => after = last.seq,
            None if done => break,
            None => std::thread::yield_now(),
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "none twice");
    assert_eq!(seen.len(), WRITERS * EACH, "none skipped");
}
