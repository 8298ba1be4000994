//! The `KvStore` contract (its doc comment in `backend.rs`) as functions over `dyn KvStore`, so
//! every backend runs the same checks: redb in `kv_store.rs`, etcd in `shoal-etcd`'s tests
//! (which include this file). Each expects a store no one has written to yet: revisions are
//! checked exactly.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shoal_store::{Event, EventKind, KvStore, Op, StoreError, Txn, TxnResponse, WatchStream};

pub fn put(kv: &dyn KvStore, key: &str, value: &str) -> u64 {
    let resp = kv
        .txn(Txn::new().then(Op::put(key, value.as_bytes())))
        .unwrap();
    assert!(resp.succeeded);
    resp.revision
}

pub async fn next(w: &mut WatchStream) -> Event {
    tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("timed out waiting for a watch event")
        .expect("watch ended")
        .expect("watch error")
}

pub fn seen(events: &[Event]) -> Vec<(EventKind, &str, u64)> {
    events
        .iter()
        .map(|e| (e.kind, e.kv.key.as_str(), e.kv.mod_revision))
        .collect()
}

/// CAS, bookkeeping and ranges, on a store with no writes yet.
pub fn compare_and_swap(kv: Arc<dyn KvStore>) {
    assert_eq!(kv.revision(), 0);

    // Create-if-absent succeeds once.
    let create = || {
        Txn::new()
            .when_absent("/apps/a")
            .then(Op::put("/apps/a", "v1"))
            .otherwise(Op::put("/conflicts/a", "lost"))
    };
    assert_eq!(
        kv.txn(create()).unwrap(),
        TxnResponse {
            succeeded: true,
            revision: 1
        }
    );
    let a = kv.get("/apps/a").unwrap().unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version),
        (1, 1, 1),
        "bookkeeping of a new key"
    );

    // The second time the compare fails and the failure branch runs, in a revision of its own.
    assert_eq!(
        kv.txn(create()).unwrap(),
        TxnResponse {
            succeeded: false,
            revision: 2
        }
    );
    assert_eq!(kv.get("/apps/a").unwrap().unwrap().value, b"v1");
    assert_eq!(kv.get("/conflicts/a").unwrap().unwrap().value, b"lost");

    // A guard on the mod revision read: a stale one loses, the current one wins.
    let update = |read: u64| {
        Txn::new()
            .when_mod_revision("/apps/a", read)
            .then(Op::put("/apps/a", "v2"))
            .then(Op::put("/apps/b", "new"))
    };
    let stale = kv.txn(update(7)).unwrap();
    assert!(!stale.succeeded);
    assert_eq!(
        stale.revision, 2,
        "a transaction that writes nothing makes no revision"
    );
    assert_eq!(kv.revision(), 2);
    let won = kv.txn(update(a.mod_revision)).unwrap();
    assert_eq!(
        won,
        TxnResponse {
            succeeded: true,
            revision: 3
        }
    );
    // Both writes of the transaction share its one revision.
    let a = kv.get("/apps/a").unwrap().unwrap();
    let b = kv.get("/apps/b").unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 3, 2));
    assert_eq!((b.create_revision, b.mod_revision, b.version), (3, 3, 1));

    // A version guard, and a delete that makes a key absent again (version 0).
    let del = Txn::new()
        .when_version("/apps/b", 1)
        .then(Op::delete("/apps/b"));
    assert!(kv.txn(del).unwrap().succeeded);
    assert_eq!(kv.get("/apps/b").unwrap(), None);
    assert!(
        kv.txn(
            Txn::new()
                .when_absent("/apps/b")
                .then(Op::put("/apps/b", "again"))
        )
        .unwrap()
        .succeeded
    );
    let b = kv.get("/apps/b").unwrap().unwrap();
    assert_eq!(
        (b.create_revision, b.version),
        (5, 1),
        "re-created key starts over"
    );

    // range: sorted by key, with the revision of its snapshot.
    let (kvs, revision) = kv.range("/apps/").unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["/apps/a", "/apps/b"]
    );
    assert_eq!(revision, 5);

    assert!(matches!(
        kv.txn(Txn::new().then(Op::put("", "x"))),
        Err(StoreError::EmptyKey)
    ));
    assert_eq!(kv.revision(), 5);
}

/// Replay from a past revision, then live events, with no gap or repeat; on an empty store.
pub async fn watch_replays_then_streams_live(kv: Arc<dyn KvStore>) {
    put(&*kv, "/apps/a", "1"); // 1
    put(&*kv, "/nodes/n", "1"); // 2, not under the prefix
    put(&*kv, "/apps/b", "1"); // 3
    put(&*kv, "/apps/a", "2"); // 4

    let mut w = kv.watch("/apps/", 3).unwrap();
    let replayed = [next(&mut w).await, next(&mut w).await];
    assert_eq!(
        seen(&replayed),
        [
            (EventKind::Put, "/apps/b", 3),
            (EventKind::Put, "/apps/a", 4)
        ]
    );
    assert_eq!(replayed[1].prev_value.as_deref(), Some(&b"1"[..]));

    // Nothing more until a write commits; then live events follow with no gap or repeat.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), w.next())
            .await
            .is_err(),
        "no event replayed twice"
    );
    let writer = Arc::clone(&kv);
    tokio::task::spawn_blocking(move || {
        put(&*writer, "/apps/c", "1"); // 5
        put(&*writer, "/nodes/n", "2"); // 6, filtered out
        let del = Txn::new()
            .then(Op::delete("/apps/a"))
            .then(Op::delete("/apps/b"));
        assert_eq!(writer.txn(del).unwrap().revision, 7);
    })
    .await
    .unwrap();
    let live = [next(&mut w).await, next(&mut w).await, next(&mut w).await];
    assert_eq!(
        seen(&live),
        [
            (EventKind::Put, "/apps/c", 5),
            (EventKind::Delete, "/apps/a", 7),
            (EventKind::Delete, "/apps/b", 7)
        ]
    );
    let deleted = &live[1];
    assert!(deleted.kv.value.is_empty());
    assert_eq!((deleted.kv.create_revision, deleted.kv.version), (0, 0));
    assert_eq!(deleted.prev_value.as_deref(), Some(&b"2"[..]));

    // From 0: only what comes after now. Also usable as a plain `Stream`.
    let mut after_now = kv.watch("/", 0).unwrap();
    put(&*kv, "/apps/d", "1"); // 8
    let ev = tokio::time::timeout(Duration::from_secs(30), StreamExt::next(&mut after_now))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((ev.kv.key.as_str(), ev.kv.mod_revision), ("/apps/d", 8));
    assert_eq!(
        seen(&[next(&mut w).await]),
        [(EventKind::Put, "/apps/d", 8)]
    );
}

/// Dropping a `next()` future mid-wait loses nothing; on an empty store.
pub async fn a_cancelled_next_loses_no_event(kv: Arc<dyn KvStore>) {
    let mut w = kv.watch("/", 0).unwrap();
    for i in 1..=3u64 {
        // Give up waiting once (the future is dropped mid-wait), then write.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), w.next())
                .await
                .is_err()
        );
        assert_eq!(put(&*kv, &format!("/k{i}"), "x"), i);
        assert_eq!(next(&mut w).await.kv.mod_revision, i);
    }
}

/// Compaction: its point, refused watches, and a behind watcher told; on an empty store.
pub async fn compacted_history_cannot_be_watched(kv: Arc<dyn KvStore>) {
    for i in 1..=5 {
        put(&*kv, "/a", &i.to_string());
    }
    put(&*kv, "/b", "x"); // 6
    assert_eq!(kv.compacted_revision(), 0);
    kv.compact(4).unwrap();
    assert_eq!(kv.compacted_revision(), 4);
    kv.compact(2).unwrap(); // at or below the compaction point: nothing to do
    assert_eq!(kv.compacted_revision(), 4);
    assert!(matches!(
        kv.compact(7),
        Err(StoreError::FutureRevision {
            revision: 7,
            current: 6
        })
    ));

    for from in [1, 4] {
        assert!(
            matches!(
                kv.watch("/", from),
                Err(StoreError::Compacted { compacted: 4 })
            ),
            "watch from {from}"
        );
    }
    // Current keys survive compaction; history after it can still be watched.
    assert_eq!(kv.get("/a").unwrap().unwrap().value, b"5");
    assert_eq!(kv.range("/").unwrap().0.len(), 2);
    let mut w = kv.watch("/", 5).unwrap();
    assert_eq!(
        seen(&[next(&mut w).await, next(&mut w).await]),
        [(EventKind::Put, "/a", 5), (EventKind::Put, "/b", 6)]
    );

    // A watcher that is behind when its history goes reports it instead of skipping.
    let mut behind = kv.watch("/", 5).unwrap();
    kv.compact(6).unwrap();
    match tokio::time::timeout(Duration::from_secs(30), behind.next())
        .await
        .unwrap()
    {
        Some(Err(StoreError::Compacted { compacted: 6 })) => {}
        other => panic!("expected Compacted, got {other:?}"),
    }
}
