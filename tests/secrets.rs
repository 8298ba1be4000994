//! Secrets stay where they belong: data dirs readable by their owner only, token and state
//! files 0600, no token printed, and nodes joining with the token in a file (every multi-node
//! test joins with `--token-file`: see `tests/common`).

mod common;

use common::{Cluster, SHOAL};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn data_dirs_tokens_and_state_are_private() {
    let c = Cluster::start();
    let data = c.dir.path().join("data");
    assert_eq!(mode(&data), 0o700);
    for file in [
        "token",
        "join-token",
        "ca-key.pem",
        "secret.key",
        "state.redb",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
}

#[test]
fn the_server_says_where_the_join_token_is_not_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = common::Killed::new(
        Command::new(SHOAL)
            .args(["server", "--data-dir"])
            .arg(dir.path().join("server"))
            .args(["--api", &format!("127.0.0.1:{port}")])
            .env("SHOAL_CONFIG", dir.path().join("config.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut printed = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("join:") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let join_token = std::fs::read_to_string(dir.path().join("server/join-token")).unwrap();
    let token = std::fs::read_to_string(dir.path().join("server/token")).unwrap();
    assert!(!printed.contains(join_token.trim()), "{printed}");
    assert!(!printed.contains(token.trim()), "{printed}");
    assert!(printed.contains("--token-file"), "{printed}");
    assert_eq!(mode(&dir.path().join("server")), 0o700);
}
