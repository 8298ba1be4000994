use std::time::Duration;

use shoal_store::{Event, EventKind, KeyValue, Op, Store, StoreError, StoreOptions, Txn, Watcher};
use tempfile::TempDir;

fn open() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    (dir, store)
}

/// The next event, failing the test instead of hanging if none comes.
async fn next(w: &mut Watcher) -> Event {
    tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("timed out waiting for a watch event")
        .expect("watcher ended")
        .expect("watch error")
}

/// Collects `n` events, failing on a deadline.
async fn collect(w: &mut Watcher, n: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next(w).await);
    }
    out
}

fn summary(events: &[Event]) -> Vec<(EventKind, String, u64)> {
    events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
        .collect()
}

#[test]
fn revisions_are_monotonic_and_track_versions() {
    let (_dir, s) = open();
    assert_eq!(s.revision(), 0);
    assert_eq!(s.put("/a", b"1".to_vec()).unwrap(), 1);
    assert_eq!(s.put("/a", b"2".to_vec()).unwrap(), 2);
    assert_eq!(s.put("/b", b"x".to_vec()).unwrap(), 3);
    assert_eq!(
        s.get("/a").unwrap(),
        Some(KeyValue {
            key: "/a".into(),
            value: b"2".to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 2,
        })
    );
    assert_eq!(s.delete("/a").unwrap(), Some(4));
    // Deleting an absent key writes nothing and does not bump the revision.
    assert_eq!(s.delete("/a").unwrap(), None);
    assert_eq!(s.revision(), 4);
    assert_eq!(s.get("/a").unwrap(), None);
    // Re-creating starts a new lifetime.
    assert_eq!(s.put("/a", b"3".to_vec()).unwrap(), 5);
    let a = s.get("/a").unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
    assert_eq!(s.get("/b").unwrap().unwrap().mod_revision, 3);
}

#[test]
fn empty_keys_are_rejected() {
    let (_dir, s) = open();
    assert!(matches!(s.put("", vec![]), Err(StoreError::EmptyKey)));
    let txn = Txn::new().then(Op::put("/ok", "v")).then(Op::delete(""));
    assert!(matches!(s.txn(txn), Err(StoreError::EmptyKey)));
    assert_eq!(s.get("/ok").unwrap(), None);
    assert_eq!(s.revision(), 0);
}

#[test]
fn compare_and_swap() {
    let (_dir, s) = open();
    // Create-if-absent succeeds once.
    let create = || Txn::new().when_absent("/k").then(Op::put("/k", "v1"));
    let r = s.txn(create()).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 1);
    let r = s.txn(create()).unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 1, "a txn that writes nothing makes no revision");
    assert_eq!(s.revision(), 1);

    // Swap on the right mod revision.
    let r = s
        .txn(
            Txn::new()
                .when_mod_revision("/k", 1)
                .then(Op::put("/k", "v2")),
        )
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 2);

    // A stale mod revision fails and runs the failure branch, which does make a revision.
    let r = s
        .txn(
            Txn::new()
                .when_mod_revision("/k", 1)
                .then(Op::put("/k", "lost"))
                .otherwise(Op::put("/conflicts", "1")),
        )
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 3);
    assert_eq!(s.get("/k").unwrap().unwrap().value, b"v2");
    assert_eq!(s.get("/conflicts").unwrap().unwrap().mod_revision, 3);

    // Version compares.
    assert!(
        !s.txn(Txn::new().when_version("/k", 1).then(Op::delete("/k")))
            .unwrap()
            .succeeded
    );
    let r = s
        .txn(Txn::new().when_version("/k", 2).then(Op::delete("/k")))
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(s.get("/k").unwrap(), None);
    // mod_revision 0 means absent.
    assert!(
        s.txn(Txn::new().when_mod_revision("/k", 0))
            .unwrap()
            .succeeded
    );
}

#[test]
fn txn_is_atomic_with_one_revision() {
    let (_dir, s) = open();
    s.put("/apps/a", b"a".to_vec()).unwrap();
    s.put("/apps/b", b"b".to_vec()).unwrap();
    s.put("/other", b"o".to_vec()).unwrap();
    let r = s
        .txn(Txn {
            compares: vec![],
            success: vec![
                Op::delete_prefix("/apps/"),
                Op::put("/apps/c", "c"),
                Op::put("/x", "1"),
                Op::put("/x", "2"),
            ],
            failure: vec![],
        })
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 4);
    assert_eq!(s.revision(), 4);
    let (kvs, rev) = s.range("/").unwrap();
    assert_eq!(rev, 4);
    let keys: Vec<_> = kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.mod_revision))
        .collect();
    assert_eq!(keys, [("/apps/c", 4), ("/other", 3), ("/x", 4)]);
    let x = s.get("/x").unwrap().unwrap();
    assert_eq!((x.value.as_slice(), x.version), (&b"2"[..], 2));
}

#[test]
fn range_by_prefix_with_snapshot_revision() {
    let (_dir, s) = open();
    for key in ["/nodes/n1", "/apps/b", "/apps2/x", "/apps/a", "/apps"] {
        s.put(key, key.as_bytes().to_vec()).unwrap();
    }
    let (kvs, rev) = s.range("/apps/").unwrap();
    assert_eq!(rev, 5);
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/apps/a", "/apps/b"]);
    assert_eq!(kvs[0].value, b"/apps/a");
    assert_eq!(s.range("").unwrap().0.len(), 5);
    assert_eq!(s.range("/zzz").unwrap(), (vec![], 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_history_then_streams_live() {
    let (_dir, s) = open();
    s.put("/a", b"1".to_vec()).unwrap();
    s.put("/a", b"2".to_vec()).unwrap();
    s.put("/b", b"x".to_vec()).unwrap();
    let mut w = s.watch("", 2).unwrap();
    let replayed = collect(&mut w, 2).await;
    assert_eq!(
        summary(&replayed),
        [
            (EventKind::Put, "/a".into(), 2),
            (EventKind::Put, "/b".into(), 3)
        ]
    );
    assert_eq!(replayed[0].prev_value.as_deref(), Some(&b"1"[..]));
    assert_eq!(replayed[0].kv.version, 2);
    assert_eq!(replayed[1].prev_value, None);

    s.delete("/a").unwrap();
    let e = next(&mut w).await;
    assert_eq!(e.kind, EventKind::Delete);
    assert_eq!(
        e.kv,
        KeyValue {
            key: "/a".into(),
            value: vec![],
            create_revision: 0,
            mod_revision: 4,
            version: 0
        }
    );
    assert_eq!(e.prev_value.as_deref(), Some(&b"2"[..]));

    // A "from now" watch sees only later changes.
    let mut now = s.watch("", 0).unwrap();
    s.put("/c", b"c".to_vec()).unwrap();
    assert_eq!(next(&mut now).await.kv.mod_revision, 5);
    assert_eq!(next(&mut w).await.kv.mod_revision, 5);

    // Replayed and live events of a multi-op txn carry the same revision.
    let txn = Txn::new().then(Op::put("/d", "d")).then(Op::delete("/b"));
    s.txn(txn).unwrap();
    let live = summary(&collect(&mut w, 2).await);
    let mut again = s.watch("", 6).unwrap();
    let replayed = summary(&collect(&mut again, 2).await);
    assert_eq!(live, replayed);
    assert_eq!(
        live,
        [
            (EventKind::Put, "/d".into(), 6),
            (EventKind::Delete, "/b".into(), 6)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_filters_by_prefix() {
    let (_dir, s) = open();
    s.put("/apps/a", b"1".to_vec()).unwrap();
    s.put("/nodes/n", b"1".to_vec()).unwrap();
    let mut w = s.watch("/apps/", 1).unwrap();
    s.put("/apps2/x", b"1".to_vec()).unwrap();
    s.put("/apps/b", b"1".to_vec()).unwrap();
    s.delete("/nodes/n").unwrap();
    s.txn(Txn::new().then(Op::delete_prefix("/"))).unwrap();
    let events = collect(&mut w, 4).await;
    assert_eq!(
        summary(&events),
        [
            (EventKind::Put, "/apps/a".into(), 1),
            (EventKind::Put, "/apps/b".into(), 4),
            (EventKind::Delete, "/apps/a".into(), 6),
            (EventKind::Delete, "/apps/b".into(), 6),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_after_compaction_is_refused() {
    let (_dir, s) = open();
    for i in 1..=5u64 {
        s.put(&format!("/k{i}"), vec![]).unwrap();
    }
    let mut behind = s.watch("", 1).unwrap();
    s.compact(3).unwrap();
    assert_eq!(s.compacted_revision(), 3);
    assert!(matches!(
        s.watch("", 3),
        Err(StoreError::Compacted { compacted: 3 })
    ));
    assert!(matches!(
        s.watch("", 1),
        Err(StoreError::Compacted { compacted: 3 })
    ));
    // A watcher that still needed the dropped history gets the error instead of a gap.
    for _ in 0..2 {
        let got = tokio::time::timeout(Duration::from_secs(30), behind.next())
            .await
            .unwrap();
        assert!(matches!(
            got,
            Some(Err(StoreError::Compacted { compacted: 3 }))
        ));
    }
    // History after the compaction point is still there; keys are untouched.
    let mut w = s.watch("", 4).unwrap();
    assert_eq!(
        collect(&mut w, 2)
            .await
            .iter()
            .map(|e| e.kv.mod_revision)
            .collect::<Vec<_>>(),
        [4, 5]
    );
    assert_eq!(s.range("/k").unwrap().0.len(), 5);
    assert_eq!(s.get("/k1").unwrap().unwrap().mod_revision, 1);
    // Compaction cannot run ahead of the revision, and going backwards is a no-op.
    assert!(matches!(
        s.compact(6),
        Err(StoreError::FutureRevision {
            revision: 6,
            current: 5
        })
    ));
    s.compact(2).unwrap();
    assert_eq!(s.compacted_revision(), 3);
    assert!(s.watch("", 0).is_ok());
}

/// A watcher whose broadcast buffer overflows must recover from the log, not fail or skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_recovers_from_log() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        watch_capacity: 4,
        ..StoreOptions::default()
    };
    let s = Store::open_with(&dir.path().join("s.redb"), options).unwrap();
    let mut w = s.watch("", 0).unwrap();
    for i in 0..50 {
        s.put(&format!("/k{}", i % 7), vec![i]).unwrap();
    }
    let revisions: Vec<u64> = collect(&mut w, 50)
        .await
        .iter()
        .map(|e| e.kv.mod_revision)
        .collect();
    assert_eq!(revisions, (1..=50).collect::<Vec<_>>());
    s.put("/after", vec![]).unwrap();
    assert_eq!(next(&mut w).await.kv.mod_revision, 51);
}

/// 4 writer threads × 200 puts while watchers read: each watcher sees every revision exactly
/// once, in order. A small broadcast buffer makes lag recovery part of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_no_missed_or_duplicated_events() {
    const THREADS: usize = 4;
    const PUTS: usize = 200;
    const TOTAL: usize = THREADS * PUTS;
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        watch_capacity: 16,
        ..StoreOptions::default()
    };
    let s = Store::open_with(&dir.path().join("s.redb"), options).unwrap();
    let live = s.watch("", 0).unwrap();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::with_capacity(PUTS);
                for i in 0..PUTS {
                    acked.push(s.put(&format!("/t{t}/{}", i % 10), vec![t as u8]).unwrap());
                }
                acked
            })
        })
        .collect();
    // Created while writes are under way: starts in replay and must hand over to live cleanly.
    let replaying = s.watch("", 1).unwrap();
    let readers: Vec<_> = [live, replaying]
        .into_iter()
        .map(|mut w| tokio::spawn(async move { collect(&mut w, TOTAL).await }))
        .collect();
    let mut acked: Vec<u64> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    acked.sort_unstable();
    let expected: Vec<u64> = (1..=TOTAL as u64).collect();
    assert_eq!(acked, expected, "every put got its own revision");
    for reader in readers {
        let events = reader.await.unwrap();
        let revisions: Vec<u64> = events.iter().map(|e| e.kv.mod_revision).collect();
        assert_eq!(revisions, expected);
    }
}

/// Concurrent writers share durable commits (group commit), and each write still gets its own
/// dense, unique revision and has its compare checked against the writes before it.
#[test]
fn concurrent_writers_share_commits() {
    const THREADS: u64 = 32;
    const WRITES: u64 = 40;
    let (_dir, store) = open();
    let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = commits.clone();
    store.observe_commits(Box::new(move |_| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let key = format!("/own/{t}");
                let mut last = 0;
                let mut acked = Vec::new();
                for i in 0..WRITES {
                    // Guarded on this writer's own last write, acknowledged in an earlier commit.
                    let txn = Txn::new()
                        .when_mod_revision(&key, last)
                        .then(Op::put(&key, i.to_le_bytes()));
                    let resp = store.txn(txn).unwrap();
                    assert!(resp.succeeded, "{key} changed under its only writer");
                    last = resp.revision;
                    acked.push(resp.revision);
                }
                acked
            })
        })
        .collect();
    let mut acked: Vec<u64> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    acked.sort_unstable();
    let total = THREADS * WRITES;
    assert_eq!(acked, (1..=total).collect::<Vec<u64>>());
    assert_eq!(store.revision(), total);
    for t in 0..THREADS {
        let kv = store.get(&format!("/own/{t}")).unwrap().unwrap();
        assert_eq!(
            (kv.version, kv.value),
            (WRITES, (WRITES - 1).to_le_bytes().to_vec())
        );
    }
    let commits = commits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        commits < total,
        "{commits} commits for {total} writes: none shared"
    );
}

/// Compare-and-swap increments of one counter from many threads lose no update: of the
/// increments that read the same value, the first in a batch wins and the rest see its write.
#[test]
fn contended_compare_and_swap_loses_no_update() {
    const THREADS: u64 = 16;
    const INCREMENTS: u64 = 20;
    let (_dir, store) = open();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                while done < INCREMENTS {
                    let (n, at) = match store.get("/counter").unwrap() {
                        Some(kv) => (
                            u64::from_le_bytes(kv.value.try_into().unwrap()),
                            kv.mod_revision,
                        ),
                        None => (0, 0),
                    };
                    // Records which value each increment saw: each must see a different one.
                    let txn = Txn::new()
                        .when_mod_revision("/counter", at)
                        .then(Op::put("/counter", (n + 1).to_le_bytes()))
                        .then(Op::put(format!("/saw/{n:06}"), [t as u8]));
                    let resp = store.txn(txn).unwrap();
                    if resp.succeeded {
                        done += 1;
                    } else {
                        // A lost race writes nothing and costs no revision.
                        assert!(resp.revision > at);
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let total = THREADS * INCREMENTS;
    let counter = store.get("/counter").unwrap().unwrap();
    assert_eq!(counter.value, total.to_le_bytes());
    assert_eq!((counter.version, counter.mod_revision), (total, total));
    let (saw, _) = store.range("/saw/").unwrap();
    assert_eq!(saw.len() as u64, total);
    assert!(
        saw.iter().all(|kv| kv.version == 1),
        "two increments saw one value"
    );
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let s = Store::open(&path).unwrap();
        s.put("/a", b"1".to_vec()).unwrap();
        s.put("/b", b"2".to_vec()).unwrap();
        s.put("/a", b"3".to_vec()).unwrap();
        s.delete("/b").unwrap();
        s.compact(2).unwrap();
        assert!(
            matches!(Store::open(&path), Err(StoreError::InUse)),
            "a second open of the same file is refused"
        );
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.revision(), 4);
    assert_eq!(s.compacted_revision(), 2);
    let a = s.get("/a").unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"3"[..], 1, 3, 2)
    );
    assert_eq!(s.get("/b").unwrap(), None);
    assert!(matches!(
        s.watch("", 2),
        Err(StoreError::Compacted { compacted: 2 })
    ));
    assert_eq!(s.put("/c", vec![]).unwrap(), 5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut w = s.watch("", 3).unwrap();
    let events = rt.block_on(collect(&mut w, 3));
    assert_eq!(
        summary(&events),
        [
            (EventKind::Put, "/a".into(), 3),
            (EventKind::Delete, "/b".into(), 4),
            (EventKind::Put, "/c".into(), 5)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_ends_when_store_is_dropped() {
    let (_dir, s) = open();
    let mut w = s.watch("", 0).unwrap();
    s.put("/a", vec![]).unwrap();
    let clone = s.clone();
    drop(s);
    // Still open through the clone.
    assert_eq!(next(&mut w).await.kv.key, "/a");
    drop(clone);
    let end = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .unwrap();
    assert!(end.is_none());
}

#[test]
fn each_commit_is_timed_and_a_write_of_nothing_is_no_commit() {
    let (_dir, store) = open();
    let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = times.clone();
    store.observe_commits(Box::new(move |took| seen.lock().unwrap().push(took)));
    store.put("/a", b"1".to_vec()).unwrap();
    store
        .txn(
            Txn::new()
                .when_absent("/a")
                .then(Op::put("/a", b"2".to_vec())),
        )
        .unwrap();
    store.delete("/absent").unwrap();
    store.put("/b", b"1".to_vec()).unwrap();
    let times = times.lock().unwrap();
    assert_eq!(times.len(), 2, "two transactions wrote: {times:?}");
    assert!(
        times
            .iter()
            .all(|t| *t > Duration::ZERO && *t < Duration::from_secs(10))
    );
}

#[test]
fn transactions_given_together_share_one_commit_and_are_answered_in_order() {
    let (_dir, store) = open();
    let commits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = commits.clone();
    store.observe_commits(Box::new(move |_| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let answers = store.txns(vec![
        Txn::new().when_absent("a").then(Op::put("a", "1")),
        Txn::new().then(Op::put("", "malformed")),
        // Sees the first: "a" exists now, so its failure branch runs.
        Txn::new()
            .when_absent("a")
            .then(Op::put("b", "no"))
            .otherwise(Op::put("b", "a was there")),
        Txn::new().then(Op::put("c", "3")),
    ]);
    assert_eq!(answers.len(), 4);
    let revisions: Vec<_> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .map(|a| (a.succeeded, a.revision))
        .collect();
    assert_eq!(revisions, [(true, 1), (false, 2), (true, 3)]);
    assert!(matches!(answers[1], Err(StoreError::EmptyKey)));
    assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(store.get("b").unwrap().unwrap().value, b"a was there");
    assert!(store.txns(Vec::new()).is_empty());
}
