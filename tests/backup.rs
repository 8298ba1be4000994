//! Backups on real processes: `shoal backup` from a running cluster, `shoal server restore`
//! into its data dir once it is stopped and its state lost, and the cluster back as it was at
//! the backup.

mod common;

use common::{Cluster, example_spec, run_cli, write_spec};

#[test]
fn a_backup_brings_a_lost_state_back_as_it_was() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start();
    let spec = write_spec(
        c.dir.path(),
        "hello.toml",
        &example_spec("hello", 1, "Backed up"),
    );
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw("/hello", 200, "Backed up");
    c.cli_ok(&[
        "secret",
        "create",
        "db",
        "--from-literal",
        "password=hunter2",
    ]);

    let file = c.dir.path().join("shoal.tar");
    let file = file.to_str().unwrap();
    let said = c.cli_ok(&["backup", file]);
    assert!(said.starts_with("backup of revision "), "{said}");
    assert!(said.contains(", 1 modules, "), "{said}");
    let meta = std::fs::metadata(file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let bytes = std::fs::read(file).unwrap();
    assert!(
        bytes.starts_with(b"backup.json"),
        "a tar, its manifest first"
    );
    assert!(
        !bytes.windows(7).any(|w| w == b"hunter2"),
        "a secret's value stays sealed"
    );
    let piped = c.cli(&["backup", "-"]);
    assert!(piped.status.success(), "{piped:?}");
    assert!(piped.stdout.starts_with(b"backup.json"));

    // After the backup: the app goes.
    c.cli_ok(&["delete", "app", "hello"]);
    let data = c.dir.path().join("data");
    let restore = |c: &Cluster| {
        run_cli(
            &c.config(),
            &[
                "server",
                "restore",
                file,
                "--data-dir",
                data.to_str().unwrap(),
            ],
        )
    };
    // A data dir with a state is refused, and kept.
    let taken = restore(&c);
    assert_eq!(taken.status.code(), Some(4), "{taken:?}");
    assert!(String::from_utf8_lossy(&taken.stderr).contains("holds a state already"));

    // The machine loses its state and modules; its keys and tokens are left.
    c.kill();
    std::fs::rename(data.join("state.redb"), c.dir.path().join("lost.redb")).unwrap();
    std::fs::rename(data.join("modules"), c.dir.path().join("lost-modules")).unwrap();
    let restored = restore(&c);
    let out = String::from_utf8_lossy(&restored.stdout);
    assert!(restored.status.success(), "{restored:?}");
    assert!(out.contains("1 of them new here"), "{out}");
    assert!(out.contains("Next: shoal server --data-dir"), "{out}");

    c.restart();
    c.wait_gw("/hello", 200, "Backed up");
    let secrets = c.cli_ok(&["secret", "get"]);
    assert!(
        secrets
            .lines()
            .any(|l| l.starts_with("db ") && l.contains("password")),
        "{secrets}"
    );
}

/// Backups the control plane takes by itself every `--backup-every`, the newest
/// `--backups-kept` kept, each recorded as an event; one restores as `shoal backup`'s does.
#[test]
fn scheduled_backups_keep_the_newest_and_each_is_an_event() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start_with(&["--backup-every", "1s", "--backups-kept", "2"]);
    let dir = c.dir.path().join("data/backups");
    let listed = || -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    };
    let backed_up = || {
        c.api_json("/v1/events")
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "BackedUp")
            .count()
    };
    assert!(
        common::poll(std::time::Duration::from_secs(30), || backed_up() >= 3
            && listed().len() == 2),
        "{} BackedUp events, files {:?}",
        backed_up(),
        listed()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&dir).unwrap(), 0o700);
    // Copied at once: the next backups remove it a second or two later.
    let newest = listed().pop().unwrap();
    let newest_mode = mode(&newest);
    let copy = c.dir.path().join("newest.tar");
    std::fs::copy(&newest, &copy).unwrap();
    assert_eq!(newest_mode.unwrap(), 0o600);
    let name = newest.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("shoal-") && name.ends_with("Z.tar"),
        "{name}"
    );
    let newest = copy;

    let elsewhere = tempfile::tempdir().unwrap();
    let restored = run_cli(
        &c.config(),
        &[
            "server",
            "restore",
            newest.to_str().unwrap(),
            "--data-dir",
            elsewhere.path().to_str().unwrap(),
        ],
    );
    assert!(restored.status.success(), "{restored:?}");
    let said = String::from_utf8_lossy(&restored.stdout);
    assert!(
        said.contains("Next: copy token, join-token, ca.pem, ca-key.pem, secret.key"),
        "{said}"
    );
}
