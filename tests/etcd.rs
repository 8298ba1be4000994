//! `shoal server --store etcd://…`: the control plane's state and modules in a real etcd
//! cluster (three members on loopback, `shoal_etcd::testing`), with real server and node
//! processes.

mod common;

use common::{NodeProc, Server, example_spec, poll, write_spec};
use shoal_etcd::testing::EtcdCluster;
use std::path::Path;
use std::time::Duration;

/// The files that make a server the cluster's: a second server on the same store is given
/// copies, as a second Kubernetes control plane is given the first one's certificates.
const IDENTITY: [&str; 4] = ["token", "join-token", "ca.pem", "ca-key.pem"];

fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in IDENTITY {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn wait_greeting(node: &NodeProc, greeting: &str) {
    assert!(
        poll(Duration::from_secs(60), || {
            matches!(node.get("/hello"), Ok((200, body)) if body.contains(greeting))
        }),
        "{} never served {greeting:?}: {:?}",
        node.name,
        node.get("/hello")
    );
}

/// A server on etcd runs an app end to end; then it dies for good and a server that never saw
/// the upload, on a data dir of its own, takes over the same store: the app, its revision and
/// its module are there, and a new node gets the module from it.
#[test]
fn a_server_on_etcd_serves_an_app_and_another_takes_over_its_state() {
    let etcd = EtcdCluster::three();
    let store = etcd.url();
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = Server::start_with(first_dir.path(), &["--store", &store]);
    assert!(
        !first_dir.path().join("server/state.redb").exists(),
        "the state is in etcd, not in the data dir"
    );
    let mut node1 = NodeProc::join(&first, "node-1", &[]);
    let spec = write_spec(
        first_dir.path(),
        "hello.toml",
        &example_spec("hello", 1, "Hello from etcd"),
    );
    first.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait_greeting(&node1, "Hello from etcd");

    first.kill();
    node1.kill();
    let second_dir = tempfile::tempdir().unwrap();
    copy_identity(
        &first_dir.path().join("server"),
        &second_dir.path().join("server"),
    );
    let second = Server::start_with(second_dir.path(), &["--store", &store]);
    assert!(
        !second_dir
            .path()
            .join("server/modules/sha256")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "the second server starts without the module on disk"
    );
    let apps = second.cli_ok(&["get", "apps"]);
    assert!(apps.contains("hello"), "{apps}");
    // node-1 is silent: its replica is replaced on node-2, which fetches the module from
    // the second server.
    let node2 = NodeProc::join(&second, "node-2", &[]);
    wait_greeting(&node2, "Hello from etcd");
    let describe = second.cli_ok(&["describe", "app", "hello"]);
    assert!(describe.contains("node-2"), "{describe}");
}
