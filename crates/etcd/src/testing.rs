//! Real etcd for tests (the `testing` feature): one member or a three-member cluster of
//! Debian's `etcd` binary on free loopback ports, each member with a temporary data dir, killed
//! when dropped. Members can be killed (SIGKILL) and started again on the same data and ports.
//!
//! Members keep their data in memory (`/dev/shm`) where the machine has room there: tests kill
//! processes, never the machine, so what a member acknowledged survives its kill in memory as on
//! a disk. On a disk busy with a parallel test run, one WAL fsync was seen to take 6 s, and the
//! whole cluster stopped answering meanwhile: a stall no test is about. Benchmarks that measure
//! etcd's commits start [`EtcdCluster::on_disk`].

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::EtcdConfig;

/// How long a member may take to say it serves clients.
const READY: Duration = Duration::from_secs(30);

/// How many of each member's notable log lines a failing test shows.
const SHOWN_LINES: usize = 60;

/// A running etcd cluster of one or more members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    /// Flags every member gets besides its own: a limit a test wants to meet.
    flags: Vec<String>,
    _dir: tempfile::TempDir,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// Its log, beside its data dir, appended to across restarts.
    fn log(&self) -> PathBuf {
        self.data.with_extension("log")
    }
}

impl EtcdCluster {
    /// One member.
    pub fn single() -> EtcdCluster {
        EtcdCluster::start(1)
    }

    /// Three members: a quorum survives one of them dying.
    pub fn three() -> EtcdCluster {
        EtcdCluster::start(3)
    }

    /// Starts `n` members and returns once every one serves clients.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(n, &[])
    }

    /// Starts `n` members, each also given `flags` (such as `--max-txn-ops 16`).
    pub fn start_with(n: usize, flags: &[&str]) -> EtcdCluster {
        EtcdCluster::start_where(n, flags, true)
    }

    /// Three members keeping their data on disk, each fsyncing its writes there as in
    /// production: for benchmarks of what a commit costs.
    pub fn on_disk() -> EtcdCluster {
        EtcdCluster::start_where(3, &[], false)
    }

    /// A port is free when picked but can be taken before etcd binds it (by anything on the
    /// machine, an outgoing connection's ephemeral port included): then the cluster starts
    /// again on new ports, a few times. A `/dev/shm` without room for the members' WAL files
    /// (64 MiB each, as in a container's default) sends them to disk.
    fn start_where(n: usize, flags: &[&str], in_memory: bool) -> EtcdCluster {
        let mut attempts = 1;
        let mut in_memory = in_memory;
        loop {
            match EtcdCluster::try_start(n, flags, in_memory) {
                Ok(cluster) => return cluster,
                Err(log) if attempts < 5 && log.contains("address already in use") => attempts += 1,
                Err(log) if in_memory && log.contains("no space left on device") => {
                    in_memory = false;
                }
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// One attempt of [`EtcdCluster::start_where`]; `Err` holds the log of the member that
    /// did not become ready.
    fn try_start(n: usize, flags: &[&str], in_memory: bool) -> Result<EtcdCluster, String> {
        let dir = match in_memory {
            true => tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()),
            false => tempfile::tempdir(),
        }
        .expect("temp dir for etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            _dir: dir,
        };
        // Members of a new cluster wait for each other before they serve: start all, then wait.
        let ready: Vec<_> = (0..n).map(|i| cluster.spawn(i)).collect();
        for (i, lines) in ready.into_iter().enumerate() {
            wait_ready(&cluster.members[i].name, &lines)?;
        }
        Ok(cluster)
    }

    /// The `etcd://` address `shoal server --store` takes.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Every member's `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    pub fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints(),
            tls: None,
        }
    }

    /// Kills member `i` with SIGKILL and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir and waits until it serves.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let lines = self.spawn(i);
        if let Err(log) = wait_ready(&self.members[i].name, &lines) {
            panic!("{log}");
        }
    }

    fn spawn(&mut self, i: usize) -> mpsc::Receiver<String> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "shoal-test"])
            // As the README advises: an etcd election must end within Shoal's 2 s leadership
            // lease, and with etcd's defaults (100 ms, 1 s) it may not.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start etcd (Debian's etcd-server package)");
        let stderr = child.stderr.take().expect("etcd's stderr");
        let (tx, rx) = mpsc::channel();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log())
            .expect("open the member's log file");
        // Drains the log for the member's life, so it never blocks on a full pipe, and keeps it
        // in a file for a failing test to show.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                let _ = tx.send(line);
            }
        });
        self.members[i].child = Some(child);
        rx
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // A failing test shows what etcd warned of: slow disks, elections, timeouts.
        if std::thread::panicking() {
            for m in &self.members {
                let log = std::fs::read_to_string(m.log()).unwrap_or_default();
                let notable: Vec<&str> = log.lines().filter(|l| notable(l)).collect();
                let shown = &notable[notable.len().saturating_sub(SHOWN_LINES)..];
                eprintln!(
                    "---- etcd member {} (warnings and leader changes, last {}) ----\n{}",
                    m.name,
                    shown.len(),
                    shown.join("\n")
                );
            }
        }
    }
}

/// Whether a line of a member's log says something a failing test may hinge on: a warning or
/// an error (etcd 3.4's ` W | `, or JSON's `"level":"warn"`) or a change of leader.
fn notable(line: &str) -> bool {
    [
        " W | ",
        " E | ",
        " C | ",
        "\"level\":\"warn\"",
        "\"level\":\"error\"",
        "leader",
    ]
    .iter()
    .any(|mark| line.contains(mark))
}

/// Waits until member `name` serves clients; `Err` says it did not, with its log.
fn wait_ready(name: &str, lines: &mpsc::Receiver<String>) -> Result<(), String> {
    let deadline = Instant::now() + READY;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("ready to serve client requests") => return Ok(()),
            Ok(line) => seen.push(line),
            Err(_) => {
                return Err(format!(
                    "etcd member {name} did not become ready; its log:\n{}",
                    seen.join("\n")
                ));
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

#[cfg(test)]
mod tests {
    #[test]
    fn warnings_and_leader_changes_are_notable_and_the_rest_is_not() {
        for line in [
            "2026-12-06 14:06:27.009478 W | wal: sync duration of 6.381319384s, expected less than 1s",
            "raft2026/12/06 14:11:57 INFO: raft.node: 499316c8dccc3eb4 elected leader 5baa19faa61adf57 at term 4",
            r#"{"level":"warn","msg":"slow fdatasync"}"#,
        ] {
            assert!(super::notable(line), "{line}");
        }
        for line in [
            "2026-12-06 14:11:46.792159 I | rafthttp: established a TCP streaming connection",
            r#"{"level":"info","msg":"ready to serve client requests"}"#,
        ] {
            assert!(!super::notable(line), "{line}");
        }
    }
}
