//! Volumes on real processes: a job writes to one and a daemon reads it back, also after the
//! node process is killed and started again; nothing outside a volume is reachable; a write
//! past its size fails for the guest and leaves the node's disk alone; a volume outlives its
//! apps until `shoal delete volume`, and replicas that mount it go to its node.

mod common;

use common::{Cluster, NodeProc, Server, examples, poll, write_spec};
use std::path::Path;
use std::time::Duration;

/// `examples/notes/FILE` with `replace` applied, written into `dir`.
fn notes_spec(dir: &Path, file: &str, replace: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(format!("{}/notes/{file}", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    for (from, to) in replace {
        assert!(text.contains(from), "{from} not in {file}");
        text = text.replace(from, to);
    }
    let name = format!("{}-{file}", replace.len());
    write_spec(dir, &name, &text).to_str().unwrap().to_string()
}

/// Whether `app`'s logs come to contain `needle` within 30 s.
fn logs_show(c: &Cluster, app: &str, needle: &str) -> bool {
    poll(Duration::from_secs(30), || {
        c.cli(&["logs", app])
            .stdout
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    })
}

fn succeeded(c: &Cluster, app: &str) -> bool {
    poll(Duration::from_secs(30), || {
        c.api_json(&format!("/v1/replicas?app={app}"))
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["phase"] == "Succeeded")
    })
}

#[test]
fn a_job_writes_a_volume_and_a_daemon_reads_it_after_a_restart_until_the_volume_is_deleted() {
    let mut c = Cluster::start();
    let d = c.dir.path().to_path_buf();
    c.cli_ok(&["apply", "-f", &notes_spec(&d, "app.toml", &[])]);
    assert!(
        succeeded(&c, "notes-writer"),
        "{}",
        c.cli_ok(&["logs", "notes-writer"])
    );
    c.cli_ok(&["apply", "-f", &notes_spec(&d, "reader.toml", &[])]);
    assert!(logs_show(&c, "notes-reader", "read \"hello from a job\""));
    let described = c.cli_ok(&["describe", "app", "notes-writer"]);
    assert!(
        described.contains("Args:         notes write \"hello from a job\"")
            && described.contains("  notes at /data (rw, 1Mi)"),
        "{described}"
    );

    // A directory of a volume the control plane does not know (a state restored from an
    // older backup knows nothing of volumes made since) is kept, data and all.
    let stray = d.join("data/volumes/default/stray/keep.txt");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, "made before the state was restored").unwrap();

    // Where it lives and what it holds: measured by its node, a block for the short note.
    assert!(
        poll(Duration::from_secs(30), || {
            let v = c.api_json("/v1/volumes");
            v[0]["node"] == "node-1"
                && v[0]["size_bytes"] == 1 << 20
                && v[0]["used_bytes"] == shoal_runtime::BLOCK_BYTES
        }),
        "{:#}",
        c.api_json("/v1/volumes")
    );
    let listed = c.cli_ok(&["get", "volumes"]);
    assert!(
        listed.contains("notes") && listed.contains("node-1") && listed.contains("notes-reader"),
        "{listed}"
    );

    // The data outlives the node process: the daemon, started again, reads the same note.
    c.kill_and_restart();
    assert!(logs_show(&c, "notes-reader", "read \"hello from a job\""));

    // Deleting the apps leaves the volume; deleting it while mounted is refused.
    c.cli_ok(&["delete", "app", "notes-writer"]);
    let err = c.cli_err(&["delete", "volume", "notes"]);
    assert!(err.contains("mounted by notes-reader"), "{err}");
    c.cli_ok(&["delete", "app", "notes-reader"]);
    assert!(c.cli_ok(&["get", "volumes"]).contains("notes"));
    let data = d.join("data/volumes/default/notes/notes.txt");
    assert!(data.is_file());
    c.cli_ok(&["delete", "volume", "notes"]);
    // Made again at once: the apply waits for the node to remove the old data (it reports
    // every 2 s), and the new volume starts empty.
    c.cli_ok(&["apply", "-f", &notes_spec(&d, "reader.toml", &[])]);
    assert!(!data.exists(), "the node kept a deleted volume's data");
    assert!(logs_show(&c, "notes-reader", "notes: nothing to read"));
    // The pass that removed it passed the unknown one by.
    assert!(
        stray.is_file(),
        "the node removed a volume it does not know of"
    );
}

#[test]
fn nothing_outside_a_volume_is_reachable_and_a_full_one_fails_the_write() {
    let c = Cluster::start();
    let d = c.dir.path().to_path_buf();
    let escape = notes_spec(
        &d,
        "app.toml",
        &[
            ("name = \"notes-writer\"", "name = \"escape\""),
            ("\"write\", \"hello from a job\"", "\"escape\""),
        ],
    );
    c.cli_ok(&["apply", "-f", &escape]);
    assert!(succeeded(&c, "escape"));
    let logs = String::from_utf8(c.cli(&["logs", "escape"]).stdout).unwrap();
    for what in ["parent", "absolute", "symlink"] {
        assert!(
            logs.contains(&format!("escape {what}: refused")),
            "{what}: {logs}"
        );
    }
    assert!(!logs.contains("READ"), "{logs}");
    // The link that would lead out was not made at all: on the node, a tool that follows
    // links would go where the guest could not.
    let link = d.join("data/volumes/default/notes/out");
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "{link:?} was made"
    );

    // 3 MiB into a 1 MiB volume: the write fails for the guest once the volume is full
    // (wasi-libc reports a failed stream write as EIO, whatever its cause), and the volume
    // holds no more than its size.
    let fill = notes_spec(
        &d,
        "app.toml",
        &[
            ("name = \"notes-writer\"", "name = \"fill\""),
            ("\"write\", \"hello from a job\"", "\"fill\", \"3145728\""),
        ],
    );
    c.cli_ok(&["apply", "-f", &fill]);
    assert!(succeeded(&c, "fill"));
    let logs = String::from_utf8(c.cli(&["logs", "fill"]).stdout).unwrap();
    // The whole volume, 16 chunks of 64 KiB, and not one byte more.
    assert!(logs.contains("fill stopped after 1048576 bytes"), "{logs}");
    let held = std::fs::metadata(d.join("data/volumes/default/notes/fill.bin"))
        .unwrap()
        .len();
    assert!(held <= 1 << 20, "the volume holds {held} bytes");
    // Empty files and directories take room too, a block each: in the full volume not one
    // of the 1,000 a guest asks for is made (it made as many as it liked, each an inode of
    // the node's disk).
    for (what, made) in [("files", "0 files"), ("dirs", "0 directories")] {
        let job = notes_spec(
            &d,
            "app.toml",
            &[
                ("name = \"notes-writer\"", &format!("name = \"{what}\"")),
                (
                    "\"write\", \"hello from a job\"",
                    &format!("\"{what}\", \"1000\""),
                ),
            ],
        );
        c.cli_ok(&["apply", "-f", &job]);
        assert!(succeeded(&c, what));
        let logs = String::from_utf8(c.cli(&["logs", what]).stdout).unwrap();
        assert!(
            logs.contains(&format!(
                "{what} stopped after {made}: No space left on device"
            )),
            "{logs}"
        );
    }

    // Made smaller than what it holds, its writers would fail: refused, as a conflict. It
    // holds what was charged: the fill.
    let held = 1 << 20;
    assert!(poll(Duration::from_secs(30), || {
        c.api_json("/v1/volumes")[0]["used_bytes"].as_u64() == Some(held)
    }));
    let smaller = notes_spec(
        &d,
        "app.toml",
        &[
            ("name = \"notes-writer\"", "name = \"shrinker\""),
            ("size = \"1Mi\"", "size = \"512Ki\""),
        ],
    );
    let out = c.cli(&["apply", "-f", &smaller]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("volume notes holds"), "{said}");
    assert!(!c.cli_ok(&["get", "apps"]).contains("shrinker"));

    // In the full volume, opening a file that is there with create (to truncate it and make
    // room) costs nothing new, and frees what it held.
    let truncate = notes_spec(
        &d,
        "app.toml",
        &[
            ("name = \"notes-writer\"", "name = \"truncate\""),
            ("\"write\", \"hello from a job\"", "\"fill\", \"0\""),
        ],
    );
    c.cli_ok(&["apply", "-f", &truncate]);
    assert!(succeeded(&c, "truncate"));
    let logs = String::from_utf8(c.cli(&["logs", "truncate"]).stdout).unwrap();
    assert!(logs.contains("notes: filled 0 bytes"), "{logs}");
    let fill = d.join("data/volumes/default/notes/fill.bin");
    assert_eq!(std::fs::metadata(&fill).unwrap().len(), 0);
}

#[test]
fn replicas_that_mount_a_volume_go_to_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--scheduling", "spread"]);
    let _nodes = [
        NodeProc::join(&server, "node-1", &[]),
        NodeProc::join(&server, "node-2", &[]),
    ];
    assert!(poll(Duration::from_secs(20), || {
        server.api_json("/v1/nodes").as_array().unwrap().len() == 2
    }));
    // `[[volumes]]` is the file's last table: `[scale]` goes after it.
    let reader = notes_spec(
        dir.path(),
        "reader.toml",
        &[(
            "read_only = true",
            "read_only = true\n\n[scale]\nreplicas = 3",
        )],
    );
    server.cli_ok(&["apply", "-f", &reader]);
    // Spread would put them on both nodes; the volume keeps them on one.
    let running = || -> Vec<String> {
        server
            .replicas("notes-reader")
            .iter()
            .filter(|r| r["phase"] == "Running")
            .map(|r| r["node"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        poll(Duration::from_secs(30), || {
            let on = running();
            on.len() == 3 && on.iter().all(|n| *n == on[0])
        }),
        "{:#}",
        server.api_json("/v1/replicas?app=notes-reader")
    );
    let bound = server.api_json("/v1/volumes")[0]["node"].clone();
    assert_eq!(bound, running()[0].as_str());
    // With its node cordoned, a new replica waits, saying why.
    let node = bound.as_str().unwrap().to_string();
    server.cli_ok(&["node", "cordon", &node]);
    server.cli_ok(&["scale", "notes-reader", "--replicas", "4"]);
    assert!(
        poll(Duration::from_secs(30), || {
            server.replicas("notes-reader").iter().any(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("not the node its volume is bound to"))
            })
        }),
        "{:#}",
        server.api_json("/v1/replicas?app=notes-reader")
    );
    // Deleting the node says the volume's data stays on its machine, and so does its event.
    let out = server.cli(&["node", "delete", &node]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("volumes default/notes were bound to node"),
        "{stderr}"
    );
    let events = server.cli_ok(&["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("NodeDeleted") && l.contains("volumes default/notes")),
        "{events}"
    );
}
