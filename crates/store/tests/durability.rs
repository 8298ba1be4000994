//! Every acknowledged write survives `kill -9`.
//!
//! The test binary re-runs itself as a child in "writer" mode (selected by an env var): the child
//! writes keys and prints each acknowledged revision; the parent SIGKILLs it mid-stream and
//! checks every acknowledged write after reopening.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shoal_store::Store;

const WRITER_ENV: &str = "SHOAL_STORE_WRITER_PATH";
/// Acks the parent waits for before killing; the child keeps writing past them.
const ACKS_BEFORE_KILL: usize = 40;

fn key(i: u64) -> String {
    format!("/durable/{i:06}")
}

/// Child mode. Without the env var (a normal test run) it does nothing.
#[test]
fn writer_child() {
    let Some(path) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let store = Store::open(&PathBuf::from(path)).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0..1_000_000u64 {
        let revision = store.put(&key(i), i.to_le_bytes().to_vec()).unwrap();
        // A closed pipe means the parent is gone: stop rather than write forever.
        if writeln!(out, "ACK {i} {revision}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["writer_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(WRITER_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    // Read acks on a thread so the parent can enforce a deadline.
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut parts = rest.split(' ').map(|p| p.parse::<u64>().unwrap());
                let ack = (parts.next().unwrap(), parts.next().unwrap());
                if tx.send(ack).is_err() {
                    break;
                }
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acked = Vec::new();
    while acked.len() < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ack) => acked.push(ack),
            Err(e) => {
                let _ = child.kill();
                panic!("writer produced {} acks before {e:?}", acked.len());
            }
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap();
    // Acks that arrived between our last read and the kill count too.
    acked.extend(rx.try_iter());

    let store = Store::open(&path).unwrap();
    let &(_, last_revision) = acked.last().unwrap();
    assert!(
        store.revision() >= last_revision,
        "revision {} < last acked {last_revision}",
        store.revision()
    );
    for &(i, revision) in &acked {
        let kv = store
            .get(&key(i))
            .unwrap()
            .unwrap_or_else(|| panic!("acked key {} lost", key(i)));
        assert_eq!(kv.value, i.to_le_bytes());
        assert_eq!(kv.mod_revision, revision);
    }
    // The store is writable after recovery.
    assert_eq!(store.put("/after", vec![]).unwrap(), store.revision());
}
