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

/// The servers that campaign, as their keys say.
async fn servers(store: &Arc<EtcdStore>) -> Vec<String> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.range(shoal_store::SERVERS_PREFIX).unwrap().0)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| String::from_utf8(kv.value).unwrap())
        .collect()
}

/// One member of three down leaves a quorum, and must change nothing: a leader keeps its lead
/// (its renewals that go to the dead member are sent again at once, to another), a server
/// waiting for the lead keeps waiting (and is listed), and a new client connects (its first
/// read, sent to the dead member, is tried again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_down_of_three_changes_no_leader_and_refuses_no_client() {
    let mut etcd = EtcdCluster::three();
    let a = Arc::new(EtcdStore::connect(&etcd.config()).unwrap());
    let b = Arc::new(EtcdStore::connect(&etcd.config()).unwrap());
    let mut leading = a.campaign("a").await.unwrap();
    let mut waiting = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.campaign("b").await.map(drop) })
    };
    let both = || async { servers(&a).await == ["a", "b"] };
    let mut every = tokio::time::interval(Duration::from_millis(50));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !both().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            servers(&a).await
        );
        every.tick().await;
    }
    etcd.kill(0);
    // Sampled for a while: the leader keeps its lead, and both stay listed throughout.
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        tokio::select! {
            () = leading.lost() => panic!("a lost the lead with one member of three down"),
            ended = &mut waiting => panic!("b's campaign ended: {ended:?}"),
            _ = every.tick() => {}
        }
        assert!(both().await, "{:?}", servers(&a).await);
    }
    assert_eq!(leader(&a).await.as_deref(), Some("a"));
    for _ in 0..5 {
        let config = etcd.config();
        let connected = tokio::task::spawn_blocking(move || EtcdStore::connect(&config).map(drop));
        connected.await.unwrap().expect("a client connects");
    }
}
