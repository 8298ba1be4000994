//! `shoal logs` on real processes: a control plane with two nodes, every replica's output
//! merged and followed through a kill -9 and restart of a node (whose replica's earlier
//! output its disk kept) and through a rollout whose new replicas join the stream.

mod common;

use common::{NodeProc, SHOAL, Server, example_spec, poll, read_lines, write_spec};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// Hello with two replicas, one on each node, answering under `/hello`.
fn hello_spec(dir: &std::path::Path, greeting: &str) -> String {
    let text = example_spec("hello", 2, greeting);
    let text = format!("{text}\n[placement]\nspread = \"required\"\n");
    let path = write_spec(dir, "hello.toml", &text);
    path.to_str().unwrap().to_string()
}

/// The ids of `app`'s Ready replicas, by node.
fn ready_by_node(server: &Server, app: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = server
        .replicas(app)
        .iter()
        .filter(|r| r["phase"] == "Ready")
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Sends GET `path` through `node`'s gateway until it answers 200; a gateway serves from
/// the replica on its own node when it has one.
fn request(node: &NodeProc, path: &str) {
    assert!(
        poll(Duration::from_secs(30), || node
            .get(path)
            .is_ok_and(|(code, _)| code == 200)),
        "{path} through {} never answered",
        node.name
    );
}

/// Reads what the follower printed until a line has both `replica` and `text`, or `wait`
/// passes; every line read is kept in `seen`.
fn follows(
    lines: &Receiver<String>,
    seen: &mut Vec<String>,
    replica: &str,
    text: &str,
    wait: Duration,
) -> bool {
    let deadline = std::time::Instant::now() + wait;
    if seen
        .iter()
        .any(|l| l.starts_with(replica) && l.contains(text))
    {
        return true;
    }
    while let Ok(line) =
        lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        let found = line.starts_with(replica) && line.contains(text);
        seen.push(line);
        if found {
            return true;
        }
    }
    false
}

/// `shoal logs hello -f` with the cluster's config in `d`, and the lines it prints.
fn follow_hello(d: &std::path::Path) -> (common::Killed, Receiver<String>) {
    let mut follower = common::Killed::new(
        Command::new(SHOAL)
            .args(["logs", "hello", "-f"])
            .env("SHOAL_CONFIG", d.join("config.toml"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = read_lines(&mut follower);
    (follower, lines)
}

#[test]
fn logs_follow_every_replica_across_nodes_through_a_node_restart_and_a_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A long grace: node-2's replica waits for it to come back rather than move.
    let server = Server::start_with(d, &["--node-grace", "60s"]);
    let node1 = NodeProc::join(&server, "node-1", &[]);
    let mut node2 = NodeProc::join(&server, "node-2", &[]);
    server.cli_ok(&["apply", "-f", &hello_spec(d, "Hello from Shoal!")]);
    assert!(poll(Duration::from_secs(30), || ready_by_node(
        &server, "hello"
    )
    .len()
        == 2));
    let replicas = ready_by_node(&server, "hello");
    let (on1, on2) = (replicas[0].1.clone(), replicas[1].1.clone());
    assert_eq!(
        (replicas[0].0.as_str(), replicas[1].0.as_str()),
        ("node-1", "node-2")
    );

    for i in 0..5 {
        request(&node1, &format!("/hello/before-{i}"));
        request(&node2, &format!("/hello/before-{i}"));
    }
    let merged = server.cli_ok(&["logs", "hello", "--timestamps"]);
    for id in [&on1, &on2] {
        assert!(
            merged
                .lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("before-")),
            "{id} missing:\n{merged}"
        );
    }
    // In time order, each with its time after the replica's id.
    let times: Vec<String> = merged
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{merged}");
    assert!(times.iter().all(|t| t.ends_with('Z')), "{merged}");
    // --tail is per replica; -o json gives one object per line.
    let tail = server.cli_ok(&["logs", "hello", "--tail", "1", "-o", "json"]);
    let entries: Vec<serde_json::Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2, "{tail}");
    for e in &entries {
        assert!(
            e["seq"].is_u64() && e["time"].is_u64() && e["stream"] == "stdout",
            "{e}"
        );
    }
    let recent = server.cli_ok(&["logs", "hello", "--since", "1h", "--replica", &on2]);
    assert!(
        recent.lines().all(|l| l.starts_with(on2.as_str())),
        "{recent}"
    );
    assert!(recent.contains("before-"), "{recent}");

    // Follow: every replica, from now on.
    let (mut follower, lines) = follow_hello(d);
    let mut seen = Vec::new();
    // Requests through each node reach the replica there once it is ready (until then the
    // gateway sends them on to the other): the follower shows each replica's.
    let mut n = 0;
    let mut both = |seen: &mut Vec<String>, nodes: [&NodeProc; 2], mark: &str, ids: [&str; 2]| {
        for (node, id) in nodes.into_iter().zip(ids) {
            let shown = poll(Duration::from_secs(60), || {
                n += 1;
                request(node, &format!("/hello/{mark}-{n}"));
                follows(
                    &lines,
                    seen,
                    id,
                    &format!("/hello/{mark}-"),
                    Duration::from_secs(2),
                )
            });
            assert!(
                shown,
                "the follower never showed {id}'s {mark} line:\n{}",
                seen.join("\n")
            );
        }
    };
    both(&mut seen, [&node1, &node2], "followed", [&on1, &on2]);

    // kill -9 node-2 and start it again: its replica comes back with the same id, the
    // follower picks it up where it was, and what it wrote before is still there. Lines reach
    // the disk within 50 ms (a kill loses what is younger): the kill waits for them.
    let on_disk = node2.dir.join(format!("logs/default/hello/{on2}.log"));
    assert!(
        poll(Duration::from_secs(10), || std::fs::read_to_string(
            &on_disk
        )
        .is_ok_and(|l| l.contains("/hello/followed-"))),
        "{} never held the followed lines",
        on_disk.display()
    );
    node2.kill();
    // A follower started meanwhile says node-2's replica cannot be read, and goes on (it
    // panicked on the notice's number).
    let (late, late_lines) = follow_hello(d);
    let mut late_seen = Vec::new();
    assert!(
        follows(
            &late_lines,
            &mut late_seen,
            &on2,
            "cannot read this replica's output",
            Duration::from_secs(30),
        ),
        "{late_seen:?}"
    );
    node2.restart();
    both(&mut seen, [&node1, &node2], "restarted", [&on1, &on2]);
    assert!(
        follows(
            &late_lines,
            &mut late_seen,
            &on1,
            "/hello/restarted",
            Duration::from_secs(30),
        ),
        "{late_seen:?}"
    );
    drop(late);
    let kept = server.cli_ok(&["logs", "hello", "--replica", &on2]);
    assert!(
        kept.contains("before-") && kept.contains("/hello/restarted"),
        "node-2's disk lost its replica's output:\n{kept}"
    );

    // A rollout: the new replicas join the same stream.
    server.cli_ok(&["apply", "-f", &hello_spec(d, "Hello again")]);
    assert!(poll(Duration::from_secs(60), || {
        let now = ready_by_node(&server, "hello");
        now.len() == 2 && now.iter().all(|(_, id)| *id != on1 && *id != on2)
    }));
    let rolled = ready_by_node(&server, "hello");
    both(
        &mut seen,
        [&node1, &node2],
        "rolled",
        [&rolled[0].1, &rolled[1].1],
    );
    // A replica the rollout stopped is no longer the cluster's, but its node keeps its
    // output for an hour: asked for by its id, it is all there.
    assert!(poll(Duration::from_secs(30), || server
        .replicas("hello")
        .iter()
        .all(|r| r["id"] != on2.as_str())));
    let stopped = server.cli_ok(&["logs", "hello", "--replica", &on2, "--tail", "1"]);
    assert!(
        stopped.lines().count() == 1 && stopped.contains(&on2),
        "the stopped replica's output:\n{stopped}"
    );
    let stopped = server.cli_ok(&["logs", "hello", "--replica", &on2]);
    assert!(
        stopped.contains("before-") && stopped.contains("/hello/restarted"),
        "the stopped replica's output:\n{stopped}"
    );
    // Scaled to zero and back: the follow waits through the time with no replica, and the
    // new one joins it.
    server.cli_ok(&["scale", "hello", "--replicas", "0"]);
    assert!(poll(Duration::from_secs(30), || server
        .replicas("hello")
        .is_empty()));
    // Three of the follow's relists (one a second) with no replica: it must not end.
    let quiet = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < quiet {
        assert_eq!(
            follower.try_wait().unwrap(),
            None,
            "the follow ended at zero replicas"
        );
        let _ = lines.recv_timeout(Duration::from_millis(100));
    }
    server.cli_ok(&["scale", "hello", "--replicas", "1"]);
    assert!(poll(Duration::from_secs(60), || ready_by_node(
        &server, "hello"
    )
    .len()
        == 1));
    let woken = ready_by_node(&server, "hello")[0].1.clone();
    request(&node1, "/hello/woken");
    assert!(
        follows(
            &lines,
            &mut seen,
            &woken,
            "/hello/woken",
            Duration::from_secs(30)
        ),
        "the follow did not go on past zero replicas: {seen:#?}"
    );
    assert_eq!(follower.try_wait().unwrap(), None, "still following");
    let _ = follower.kill();
    let _ = follower.wait();

    // Unknown replica: not found (exit 3); a bad duration: refused before asking.
    let out = server.cli(&["logs", "hello", "--replica", "hello-9-nope"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = server.cli(&["logs", "hello", "--since", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
}

/// A follower that falls further behind a chatty replica than its node keeps output for is
/// told, in the stream and where they were, how many lines it lost: none vanish in silence.
#[test]
fn a_follower_that_falls_behind_is_told_how_many_lines_it_lost() {
    use std::io::BufRead;
    let c = common::Cluster::start();
    let spec = common::faulty_scaled(c.dir.path(), "[scale]\nreplicas = 1\n");
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/faulty/log?msg=attached", 200, "logged");
    let mut follower = common::Killed::new(
        Command::new(SHOAL)
            .args(["-o", "json", "logs", "faulty", "-f", "--tail", "1"])
            .env("SHOAL_CONFIG", c.config())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(follower.stdout.take().expect("stdout"));
    // Read up to the line it starts with, and then nothing more for now.
    let mut line = String::new();
    while !line.contains("attached") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the follower ended");
    }
    // 80 MiB while the follower reads nothing: its pipe, the sockets and the server's buffer
    // fill, and the node keeps about 17 MiB of a replica's output (1 MiB in memory, two
    // 8 MiB files), so most of it is gone by the time the follower reads on.
    let floods = 4;
    for _ in 0..floods {
        c.wait_gw("/faulty/flood/20", 200, "");
    }
    let total = floods * 20 * 1024 * 1024 / 100;
    // Now read on, to the flood's end or a minute.
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut flood, mut lost) = (0u64, 0u64);
    while flood + lost < total {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        let text = entry["line"].as_str().unwrap();
        if text.contains("flood line") {
            flood += 1;
        } else if let Some(n) = text
            .strip_prefix("[shoal] ")
            .and_then(|t| t.split_once(" lines of this replica's output were lost"))
        {
            lost += n.0.parse::<u64>().unwrap();
        }
    }
    assert!(lost > 0, "nothing said lost; {flood} flood lines read");
    assert_eq!(flood + lost, total, "{flood} read, {lost} said lost");
}
