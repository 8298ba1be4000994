//! Leadership on a real etcd: a leader that steps down hands over at once, not after its
//! lease's TTL.

use std::sync::Arc;
use std::time::Duration;

use shoal_etcd::testing::EtcdCluster;
use shoal_etcd::{EtcdStore, LEADER_KEY};
use shoal_store::KvStore;

async fn leader(store: &Arc<EtcdStore>) -> Option<String> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.get(LEADER_KEY).unwrap())
        .await
        .unwrap()
        .map(|kv| String::from_utf8(kv.value).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stepping_down_hands_over_at_once() {
    let etcd = EtcdCluster::single();
    let a = Arc::new(EtcdStore::connect(&etcd.config()).unwrap());
    let b = Arc::new(EtcdStore::connect(&etcd.config()).unwrap());
    // One store, whichever client: what a node's watch names.
    assert_ne!(a.id(), 0);
    assert_eq!(a.id(), b.id());
    let leading = a.campaign("a").await.unwrap();
    let waiting = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.campaign("b").await })
    };
    assert_eq!(leader(&a).await.as_deref(), Some("a"));
    leading.step_down().await;
    // The key went with the lease as it was revoked: b may have taken it already.
    let now = leader(&a).await;
    assert_ne!(now.as_deref(), Some("a"), "still a's after stepping down");
    let _b_leads = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("b leads")
        .unwrap()
        .unwrap();
    assert_eq!(leader(&a).await.as_deref(), Some("b"));
}
