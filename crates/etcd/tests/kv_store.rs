//! The `KvStore` contract (shoal-store's `tests/contract`) on real etcd: a fresh single member
//! for each check, since the checks count revisions from an empty store, then what only etcd
//! can show: a second client learning the compaction point, and a watch and writes that go on
//! while the member they used is killed.

#[path = "../../store/tests/contract/mod.rs"]
mod contract;

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_etcd::EtcdStore;
use shoal_etcd::testing::EtcdCluster;
use shoal_store::{EventKind, KvStore, Op, StoreError, Txn};

fn open(etcd: &EtcdCluster) -> Arc<dyn KvStore> {
    Arc::new(EtcdStore::connect(&etcd.config()).expect("connect to etcd"))
}

#[test]
fn compare_and_swap_through_the_trait() {
    let etcd = EtcdCluster::single();
    contract::compare_and_swap(open(&etcd));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_from_a_past_revision_then_streams_live() {
    let etcd = EtcdCluster::single();
    contract::watch_replays_then_streams_live(open(&etcd)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_loses_no_event() {
    let etcd = EtcdCluster::single();
    contract::a_cancelled_next_loses_no_event(open(&etcd)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_cannot_be_watched() {
    let etcd = EtcdCluster::single();
    contract::compacted_history_cannot_be_watched(open(&etcd)).await;
}

#[test]
fn the_contract_holds_on_a_three_member_cluster() {
    let etcd = EtcdCluster::three();
    contract::compare_and_swap(open(&etcd));
}

#[test]
fn another_client_sees_the_compaction_point() {
    let etcd = EtcdCluster::single();
    let (a, b) = (open(&etcd), open(&etcd));
    for i in 0..5 {
        contract::put(&*a, "/k", &i.to_string());
    }
    a.compact(3).unwrap();
    assert_eq!(
        b.compacted_revision(),
        3,
        "learnt from etcd, not from b's own compactions"
    );
    // Compacting below the point is a no-op; beyond it, etcd's point moves for everyone.
    b.compact(2).unwrap();
    b.compact(4).unwrap();
    assert_eq!(a.compacted_revision(), 4);
    assert!(matches!(
        a.watch("/", 4),
        Err(StoreError::Compacted { compacted: 4 })
    ));
}

/// Members die under a watcher and a writer: every write acknowledged before and after reaches
/// the watcher, once and in order.
///
/// A write cut off by its leader's death is ambiguous (etcd may have committed it), and the
/// store says so with an error rather than send it twice; so the writer creates each key only
/// if absent and, after an error, tries again: a second try that finds the key tells it that
/// the first one committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_when_its_member_dies() {
    let mut etcd = EtcdCluster::three();
    let kv = open(&etcd);
    let mut watch = kv.watch("/w/", 1).unwrap();
    let writes = |kv: &Arc<dyn KvStore>, base: usize| {
        let writer = Arc::clone(kv);
        tokio::task::spawn_blocking(move || {
            (base..base + 10)
                .map(|i| create(&*writer, &format!("/w/{i:03}")))
                .collect::<Vec<_>>()
        })
    };
    let mut acked = writes(&kv, 0).await.unwrap();
    // Every member in turn is killed and brought back, so whichever one the watch and the
    // writes used has died at least once.
    for member in 0..3 {
        etcd.kill(member);
        acked.extend(writes(&kv, 100 * (member + 1)).await.unwrap());
        etcd.restart(member);
    }
    for expected in &acked {
        let event = contract::next(&mut watch).await;
        assert_eq!(
            (event.kind, event.kv.mod_revision),
            (EventKind::Put, *expected)
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), watch.next())
            .await
            .is_err(),
        "no event repeated after a resumption"
    );
}

/// A range page and a watch's catch-up batch may each be far bigger than gRPC's default 4 MiB
/// message (a page is 1,000 keys, each up to etcd's request limit): 8 MiB of keys read back
/// whole, from a range and from a watch of their history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_watches_carry_more_than_four_mib() {
    let etcd = EtcdCluster::single();
    let kv = open(&etcd);
    let writer = Arc::clone(&kv);
    tokio::task::spawn_blocking(move || {
        for t in 0..16 {
            let txn = (0..64).fold(Txn::new(), |txn, i| {
                txn.then(Op::put(format!("/big/{t:02}/{i:02}"), vec![t as u8; 8192]))
            });
            writer.txn(txn).unwrap();
        }
    })
    .await
    .unwrap();
    let reader = Arc::clone(&kv);
    let (kvs, _) = tokio::task::spawn_blocking(move || reader.range("/big/"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kvs.len(), 16 * 64);
    let mut watch = kv.watch("/big/", 1).unwrap();
    for expected in &kvs {
        let event = contract::next(&mut watch).await;
        assert_eq!(event.kv.key, expected.key);
    }
}

/// Creates `key` and returns the revision that did, trying again (for up to a minute) after
/// failures, which a dying leader may cause.
fn create(kv: &dyn KvStore, key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match kv.txn(Txn::new().when_absent(key).then(Op::put(key, "x"))) {
            Ok(done) if done.succeeded => return done.revision,
            Ok(_) => return kv.get(key).unwrap().expect("key created").mod_revision,
            Err(e) if Instant::now() < deadline => {
                eprintln!("creating {key}: {e}; trying again");
            }
            Err(e) => panic!("creating {key}: {e}"),
        }
    }
}

/// etcd's WAL fsyncs so far, from the member's `/metrics` (plain HTTP on its client port).
fn wal_fsyncs(endpoint: &str) -> u64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(endpoint).expect("connect to etcd's metrics");
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_disk_wal_fsync_duration_seconds_count "))
        .expect("etcd reports its WAL fsyncs")
        .trim()
        .parse::<f64>()
        .expect("a count") as u64
}

/// 200 creations, one that must see the first of them, and a malformed one.
fn many_then_one_that_sees_the_first() -> Vec<Txn> {
    let mut txns: Vec<Txn> = (0..200)
        .map(|i| {
            let key = format!("/many/{i}");
            Txn::new().when_absent(&key).then(Op::put(&key, "1"))
        })
        .collect();
    // Sees the first: its key exists by then, so the failure branch runs.
    txns.push(
        Txn::new()
            .when_absent("/many/0")
            .then(Op::put("/after", "no"))
            .otherwise(Op::put("/after", "saw /many/0")),
    );
    // Its compare fails, and it writes nothing: judged against the state before it.
    txns.push(
        Txn::new()
            .when_absent("/many/1")
            .then(Op::put("/never", "x")),
    );
    txns.push(Txn::new().then(Op::put("", "malformed")));
    txns
}

/// What [`many_then_one_that_sees_the_first`] must leave and answer, however etcd took it.
fn check_many(kv: &dyn KvStore, answers: &[Result<shoal_store::TxnResponse, StoreError>]) {
    assert_eq!(answers.len(), 203);
    assert!(matches!(answers[202], Err(StoreError::EmptyKey)));
    let done: Vec<_> = answers[..202].iter().map(|a| a.as_ref().unwrap()).collect();
    assert!(done[..200].iter().all(|d| d.succeeded));
    assert!(!done[200].succeeded && !done[201].succeeded);
    let first_200 = done[..200].iter().map(|d| d.revision).max().unwrap();
    assert!(done[200].revision > first_200, "it came after them");
    assert!(done[201].revision >= first_200, "it saw them");
    assert!(done[201].revision <= kv.revision());
    assert_eq!(kv.get("/after").unwrap().unwrap().value, b"saw /many/0");
    assert!(kv.get("/never").unwrap().is_none());
    assert_eq!(kv.range("/many/").unwrap().0.len(), 200);
}

#[test]
fn transactions_given_together_share_commits_and_see_the_earlier_ones() {
    let etcd = EtcdCluster::single();
    let kv = open(&etcd);
    let endpoint = &etcd.endpoints()[0];
    let before = wal_fsyncs(endpoint);
    let answers = kv.txns(many_then_one_that_sees_the_first());
    let fsyncs = wal_fsyncs(endpoint) - before;
    check_many(&*kv, &answers);
    // One by one, each would be a commit of its own: 201 fsyncs at least. Together: the 200
    // in two commits (127 at most in one, each nested one counting as an operation of the
    // outer and the most a nested one has taken from what etcd allows), then the two that
    // touch their keys.
    assert!(fsyncs <= 10, "{fsyncs} WAL fsyncs for 201 transactions");
    let revisions: std::collections::BTreeSet<u64> = answers[..200]
        .iter()
        .map(|a| a.as_ref().unwrap().revision)
        .collect();
    assert_eq!(
        revisions.len(),
        2,
        "the 200 share two commits: {revisions:?}"
    );
}

#[test]
fn transactions_too_many_for_one_etcd_transaction_go_one_by_one() {
    // etcd refuses a transaction of more than 16 operations here, nested ones included.
    let etcd = EtcdCluster::start_with(1, &["--max-txn-ops", "16"]);
    let kv = open(&etcd);
    let answers = kv.txns(many_then_one_that_sees_the_first());
    check_many(&*kv, &answers);
}
