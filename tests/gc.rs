//! Modules nobody uses do not pile up: the control plane collects modules no revision uses
//! after a grace (or at once with `shoal delete module`, refused while one does), and nodes
//! forget the compiled components and fetched files of modules they no longer run.

mod common;

use common::{NodeProc, Server, examples, poll, write_spec};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every compiled artifact of `hex` under a node's cache, in any engine's directory.
fn compiled(node_dir: &Path, hex: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for engine in std::fs::read_dir(node_dir.join("cache"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let file = engine.path().join(format!("{hex}.cwasm"));
        if file.exists() {
            found.push(file);
        }
    }
    found
}

#[test]
fn unused_modules_are_collected_on_the_control_plane_and_forgotten_on_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--module-gc-grace", "1s"]);
    let node = NodeProc::join(&server, "node-1", &["--module-cache-grace", "1s"]);
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = write_spec(dir.path(), "hello.toml", &text);
    let spec = spec.to_str().unwrap();
    server.cli_ok(&["apply", "-f", spec]);
    assert!(poll(Duration::from_secs(30), || {
        node.get("/hello").is_ok_and(|(code, _)| code == 200)
    }));
    let app = server.api_json("/v1/apps/hello");
    let digest = app["app"]["spec"]["component"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let hex = digest.strip_prefix("sha256:").unwrap().to_string();
    let blob = dir.path().join("server/modules/sha256").join(&hex);
    let fetched = node.dir.join("modules").join(&hex);
    assert!(blob.is_file() && fetched.is_file());
    assert!(!compiled(&node.dir, &hex).is_empty());

    // In use: kept past the grace, and not deleted by request.
    let out = server.cli(&["delete", "module", &digest]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by app default/hello revision 1"),
        "{err}"
    );
    assert!(!poll(Duration::from_secs(3), || !blob.is_file()
        || !fetched.is_file()));

    // Unused: gone from the control plane and from the node.
    server.cli_ok(&["delete", "app", "hello"]);
    assert!(
        poll(Duration::from_secs(30), || {
            !blob.exists() && !fetched.exists() && compiled(&node.dir, &hex).is_empty()
        }),
        "blob {} fetched {} compiled {:?}",
        blob.exists(),
        fetched.exists(),
        compiled(&node.dir, &hex)
    );
    let modules = server.cli_ok(&["get", "modules"]);
    assert!(!modules.contains(&hex), "{modules}");
    assert!(server.cli_ok(&["events"]).contains("ModuleDeleted"));

    // Applied again, it is uploaded, fetched and compiled again, and serves.
    server.cli_ok(&["apply", "-f", spec]);
    assert!(poll(Duration::from_secs(30), || {
        node.get("/hello").is_ok_and(|(code, _)| code == 200)
    }));
    assert!(blob.is_file() && fetched.is_file());
}

#[test]
fn a_module_is_deleted_by_request_only_when_no_revision_uses_it() {
    let c = common::Cluster::start();
    c.cli_ok(&["apply", "-f", &format!("{}/hello/app.toml", examples())]);
    let app = c.api_json("/v1/apps/hello");
    let digest = app["app"]["spec"]["component"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let blob = c.dir.path().join("data/modules/sha256").join(hex);
    assert!(blob.is_file());
    let refused = c.cli_err(&["delete", "module", &digest]);
    assert!(
        refused.contains("in use by app default/hello revision 1"),
        "{refused}"
    );
    assert!(blob.is_file());

    c.cli_ok(&["delete", "app", "hello"]);
    c.cli_ok(&["delete", "module", &digest]);
    assert!(!blob.exists());
    assert!(!c.cli_ok(&["get", "modules"]).contains(hex));
    let gone = c.cli_err(&["delete", "module", &digest]);
    assert!(gone.contains("has not been uploaded"), "{gone}");
}
