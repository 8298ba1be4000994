//! Every acknowledged write survives `kill -9`, whether it had its own commit or shared a
//! group commit with concurrent writers.
//!
//! The test binary re-runs itself as a child in "writer" mode (selected by an env var): the
//! child's writer threads write keys and print each acknowledged revision; the parent SIGKILLs
//! it mid-stream and checks every acknowledged write after reopening.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shoal_store::Store;

const WRITER_ENV: &str = "SHOAL_STORE_WRITER_PATH";
const THREADS_ENV: &str = "SHOAL_STORE_WRITER_THREADS";

fn key(thread: u64, i: u64) -> String {
    format!("/durable/{thread:02}/{i:06}")
}

/// Child mode. Without the env var (a normal test run) it does nothing.
#[test]
fn writer_child() {
    let Some(path) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let threads: u64 = std::env::var(THREADS_ENV).unwrap().parse().unwrap();
    let store = Store::open(&PathBuf::from(path)).unwrap();
    std::thread::scope(|s| {
        for thread in 0..threads {
            let store = &store;
            s.spawn(move || {
                for i in 0..1_000_000u64 {
                    let revision = store
                        .put(&key(thread, i), i.to_le_bytes().to_vec())
                        .unwrap();
                    // One line per ack, whole: the stdout lock is held for the write.
                    let mut out = std::io::stdout().lock();
                    // A closed pipe means the parent is gone: stop rather than write forever.
                    if writeln!(out, "ACK {thread} {i} {revision}")
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

/// An acknowledged write: (thread, i, revision).
type Ack = (u64, u64, u64);

/// Runs a writer child with `threads` writers on `path`, SIGKILLs it once `acks` writes are
/// acknowledged, and returns every ack it printed.
fn write_then_kill(path: &Path, threads: u64, acks: usize) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["writer_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(WRITER_ENV, path)
        .env(THREADS_ENV, threads.to_string())
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
                let ack = (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                );
                if tx.send(ack).is_err() {
                    break;
                }
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acked = Vec::new();
    while acked.len() < acks {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ack) => acked.push(ack),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("writers produced {} acks before {e:?}", acked.len());
            }
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap();
    // Acks that arrived between our last read and the kill count too.
    acked.extend(rx.try_iter());
    acked
}

/// Every ack is in the reopened store with its value and revision, and the store is writable.
fn check_after_reopen(path: &Path, acked: &[Ack]) {
    let store = Store::open(path).unwrap();
    let revisions: HashSet<u64> = acked.iter().map(|&(_, _, revision)| revision).collect();
    assert_eq!(revisions.len(), acked.len(), "two acks share a revision");
    let last = *revisions.iter().max().unwrap();
    assert!(
        store.revision() >= last,
        "revision {} < last acked {last}",
        store.revision()
    );
    for &(thread, i, revision) in acked {
        let kv = store
            .get(&key(thread, i))
            .unwrap()
            .unwrap_or_else(|| panic!("acked key {} lost", key(thread, i)));
        assert_eq!(kv.value, i.to_le_bytes());
        assert_eq!(kv.mod_revision, revision);
    }
    assert_eq!(store.put("/after", vec![]).unwrap(), store.revision());
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let acked = write_then_kill(&path, 1, 40);
    check_after_reopen(&path, &acked);
}

#[test]
fn group_committed_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let threads = 32;
    let acked = write_then_kill(&path, threads, 2_000);
    // Killed mid-stream with every writer still going.
    let writers: HashSet<u64> = acked.iter().map(|&(thread, _, _)| thread).collect();
    assert_eq!(writers.len() as u64, threads, "some writers never wrote");
    check_after_reopen(&path, &acked);
}
