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

/// One member of three down leaves a quorum, and must change nothing: a leader keeps its lead
/// (its renewals that go to the dead member are sent again at once, to another), and a new
/// client connects (its first read, sent to the dead member, is tried again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_down_of_three_changes_no_leader_and_refuses_no_client() {
    let mut etcd = EtcdCluster::three();
    let a = Arc::new(EtcdStore::connect(&etcd.config()).unwrap());
    let mut leading = a.campaign("a").await.unwrap();
    etcd.kill(0);
    let lost = tokio::time::timeout(Duration::from_secs(8), leading.lost()).await;
    assert!(
        lost.is_err(),
        "a lost the lead with one member of three down"
    );
    assert_eq!(leader(&a).await.as_deref(), Some("a"));
    for _ in 0..5 {
        let config = etcd.config();
        let connected = tokio::task::spawn_blocking(move || EtcdStore::connect(&config).map(drop));
        connected.await.unwrap().expect("a client connects");
    }
}
