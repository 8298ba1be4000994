//! The redb backend driven only through `dyn KvStore`, as the control plane holds it: the
//! contract in `KvStore`'s doc comment (`contract/`, shared with the etcd backend's tests).

mod contract;

use std::sync::Arc;

use shoal_store::{KvStore, Store, WatchStream};
use tempfile::TempDir;

fn open() -> (TempDir, Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    (dir, Arc::new(store))
}

#[test]
fn the_store_is_shareable_as_a_trait_object() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_clone<T: Clone>() {}
    assert_send_sync::<Arc<dyn KvStore>>();
    fn assert_send<T: Send + 'static>() {}
    assert_send::<WatchStream>();
    assert_clone::<Store>();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let shared: Arc<dyn KvStore> = Arc::new(store.clone());
    contract::put(&*shared, "/a", "1");
    // Both handles are the same database.
    assert_eq!(store.get("/a").unwrap().unwrap().value, b"1");
    assert_eq!(shared.revision(), store.revision());
}

#[test]
fn compare_and_swap_through_the_trait() {
    let (_dir, kv) = open();
    contract::compare_and_swap(kv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_from_a_past_revision_then_streams_live() {
    let (_dir, kv) = open();
    contract::watch_replays_then_streams_live(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_loses_no_event() {
    let (_dir, kv) = open();
    contract::a_cancelled_next_loses_no_event(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_cannot_be_watched() {
    let (_dir, kv) = open();
    contract::compacted_history_cannot_be_watched(kv).await;
}
