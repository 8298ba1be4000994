//! Secrets end to end on real processes: a control plane with two nodes, a secret read by
//! the `settings` example as an env value and through `wasi:config`, delivered only to the
//! node that runs it, changed and rotated without a failed request, and found in no file, API
//! answer, log line or event afterwards.

mod common;

use common::{Cluster, Load, NodeProc, Server, examples, poll, write_spec};
use std::path::Path;
use std::time::Duration;

const PASSWORD: &str = "pw-7f3a9c1e-first";
const ROTATED: &str = "pw-b2d4e6f8-second";

/// The `settings` example's `secret.toml` (secret `db`'s `password` as config key and env
/// `DB_PASSWORD`, its `user` as config key), with `DB_USER` from that config key, pinned to
/// nodes labelled `role=a`.
fn settings_with_secret(dir: &Path, replicas: u32) -> String {
    let text = std::fs::read_to_string(format!("{}/settings/secret.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    assert!(text.contains("DB_PASSWORD = { secret"), "{text}");
    let text = format!(
        "{text}DB_USER = \"$(config.user)\"\n\n[placement]\nnode_selector = {{ role = \"a\" }}\n\n[scale]\nreplicas = {replicas}\n"
    );
    write_spec(dir, "settings.toml", &text)
        .to_str()
        .unwrap()
        .to_string()
}

/// Whether `node`'s gateway answers `path` with `body` within 30 s.
fn serves(node: &NodeProc, path: &str, body: &str) -> bool {
    poll(Duration::from_secs(30), || {
        node.get(path)
            .is_ok_and(|(code, b)| code == 200 && b == body)
    })
}

/// Every file under `dir`, read whole (the store, key file, logs, node data).
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn secrets_reach_only_their_replicas_roll_their_users_and_leak_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(d);
    let runs = NodeProc::join(&server, "node-1", &["--label", "role=a"]);
    let other = NodeProc::join(&server, "node-2", &["--label", "role=b"]);
    let password_file = d.join("password.txt");
    std::fs::write(&password_file, PASSWORD).unwrap();
    let out = server.cli_ok(&[
        "secret",
        "create",
        "db",
        "--from-file",
        &format!("password={}", password_file.display()),
        "--from-literal",
        "user=app-user",
    ]);
    assert!(
        out.contains("secret db created: version 1 (2 keys)"),
        "{out}"
    );
    std::fs::remove_file(&password_file).unwrap();

    let spec = settings_with_secret(d, 2);
    server.cli_ok(&["apply", "-f", &spec]);
    // Read through wasi:config and as env, on the node that runs it and through the other.
    let password = format!("{PASSWORD}\n");
    assert!(serves(&runs, "/settings/password", &password));
    assert!(serves(&other, "/settings/password", &password));
    assert!(serves(&runs, "/settings/DB_PASSWORD?from=env", &password));
    assert!(serves(&runs, "/settings/DB_USER?from=env", "app-user\n"));

    // Only a node running a replica gets the values, and only for its own replicas.
    let replicas = server.replicas("settings");
    let id = replicas[0]["id"].as_str().unwrap();
    let path = format!("/v1/cluster/nodes/node-1/replicas/default/settings/{id}/secrets");
    let resp = server.as_node(&runs, &path);
    assert_eq!(resp.status(), 200);
    assert!(resp.text().unwrap().contains(PASSWORD));
    let theirs = format!("/v1/cluster/nodes/node-2/replicas/default/settings/{id}/secrets");
    let resp = server.as_node(&other, &theirs);
    assert_eq!(resp.status(), 403, "{:?}", resp.text());
    assert_eq!(server.as_node(&other, &path).status(), 403);

    // A new version rolls the app with no failed request; history names the keys only.
    let load = Load::start(format!("{}/settings/password", other.gateway));
    let out = server.cli_ok(&[
        "secret",
        "set",
        "db",
        "--from-literal",
        &format!("password={ROTATED}"),
    ]);
    assert!(
        out.contains("version 2") && out.contains("app settings applied again"),
        "{out}"
    );
    assert!(serves(
        &other,
        "/settings/password",
        &format!("{ROTATED}\n")
    ));
    let status = server.cli(&[
        "rollout",
        "status",
        "settings",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(status.status.success(), "{status:?}");
    let result = load.stop();
    assert_eq!(result.failed, 0, "{result:?}");
    let history = server.cli_ok(&["rollout", "history", "settings"]);
    assert!(
        history.contains("secret db (version 2) changed"),
        "{history}"
    );

    // The old version is kept while a revision names it: undo brings its value back.
    server.cli_ok(&["rollout", "undo", "settings"]);
    assert!(serves(&runs, "/settings/password", &password));
    server.cli_ok(&["apply", "-f", &spec]);
    assert!(serves(&runs, "/settings/password", &format!("{ROTATED}\n")));

    // A new key seals everything again; replicas started after it still get their values.
    let out = server.cli_ok(&["secret", "rotate-key"]);
    assert!(out.contains("1 secrets"), "{out}");
    server.cli_ok(&["scale", "settings", "--replicas", "3"]);
    assert!(poll(Duration::from_secs(30), || server
        .ready_nodes("settings")
        .len()
        == 3));
    assert!(serves(
        &runs,
        "/settings/DB_PASSWORD?from=env",
        &format!("{ROTATED}\n")
    ));

    // What the API shows: names, keys, versions, users.
    let listed = server.cli_ok(&["get", "secrets"]);
    assert!(
        listed.contains("db") && listed.contains("password,user") && listed.contains("settings"),
        "{listed}"
    );
    let err = server.cli(&["secret", "delete", "db"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("used by settings"),
        "{err:?}"
    );

    // Unknown secrets and keys are refused at apply, naming the line.
    let bad = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("key = \"user\"", "key = \"nope\"");
    let bad = write_spec(d, "bad.toml", &bad);
    let err = server.cli(&["apply", "-f", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        stderr.contains("bad.toml:") && stderr.contains("no key \"nope\""),
        "{stderr}"
    );

    // Then the leak check: the values appear in no API answer, event, log or file.
    let mut answers = String::new();
    for path in [
        "/v1/apps/settings",
        "/v1/apps",
        "/v1/secrets",
        "/v1/secrets/db",
        "/v1/events",
        "/v1/replicas",
        "/v1/apps/settings/rollout",
    ] {
        answers.push_str(&server.api_json(path).to_string());
    }
    for (name, args) in [
        ("describe", vec!["describe", "app", "settings"]),
        ("events", vec!["events"]),
        ("dry run", vec!["apply", "--dry-run", "-f", spec.as_str()]),
        ("secret get", vec!["secret", "get", "db", "-o", "json"]),
    ] {
        answers.push_str(name);
        // A dry run that would change something exits 1; its output counts all the same.
        let out = server.cli(&args);
        assert!(out.status.code().is_some_and(|c| c <= 1), "{name}: {out:?}");
        answers.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    for node in [&runs, &other] {
        answers.push_str(&server.as_node(node, "/v1/cluster/snapshot").text().unwrap());
    }
    assert!(
        answers.contains("DB_PASSWORD"),
        "the answers name the env value"
    );
    server.cli_ok(&["delete", "app", "settings"]);
    assert!(poll(Duration::from_secs(30), || server
        .replicas("settings")
        .is_empty()));
    server.cli_ok(&["secret", "delete", "db"]);
    for value in [PASSWORD, ROTATED, "app-user"] {
        assert!(
            !answers.contains(value),
            "{value} in an API answer: {answers}"
        );
        for (path, bytes) in files_under(d) {
            assert!(!contains(&bytes, value), "{value} in {}", path.display());
        }
    }
}

#[test]
fn a_missing_key_file_starts_nothing_that_needs_it_and_says_why() {
    let mut c = Cluster::start();
    c.cli_ok(&["secret", "create", "db", "--from-literal", "password=x-1"]);
    let spec = common::faulty_spec(
        c.dir.path(),
        "faulty.toml",
        1,
        "[env]\nPASSWORD = { secret = \"db\", key = \"password\" }\n",
    );
    c.cli_ok(&["apply", "-f", &spec]);
    c.wait_gw("/faulty/env/PASSWORD", 200, "x-1");
    let hello = format!("{}/hello/app.toml", examples());
    let text = std::fs::read_to_string(&hello)
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let hello = write_spec(c.dir.path(), "hello.toml", &text);
    c.cli_ok(&["apply", "-f", hello.to_str().unwrap()]);
    c.wait_gw("/hello", 200, "Hello");
    // A key the app does not read changes: it stays on the version it pins, and so it must
    // after a restart that cannot compare the values.
    c.cli_ok(&["secret", "set", "db", "--from-literal", "user=app"]);
    let revision = |c: &Cluster| c.api_json("/v1/apps/faulty")["app"]["revision"].as_u64();
    let before = revision(&c);
    assert!(before.is_some());

    std::fs::remove_file(c.dir.path().join("data/secret.key")).unwrap();
    c.kill_and_restart();
    // The app without secrets serves; the one with them waits, saying why.
    c.wait_gw("/hello", 200, "Hello");
    assert!(
        poll(Duration::from_secs(30), || {
            let replicas = c.api_json("/v1/replicas?app=faulty");
            replicas.as_array().unwrap().iter().any(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("secret key file") && m.contains("missing"))
            })
        }),
        "{:#}",
        c.api_json("/v1/replicas?app=faulty")
    );
    assert_eq!(c.gw("/faulty/env/PASSWORD").status(), 503);
    // Writing secrets is refused for the same reason; listing them still works.
    let err = c.cli_err(&["secret", "create", "other", "--from-literal", "k=v"]);
    assert!(
        err.contains("secret key file") && err.contains("missing"),
        "{err}"
    );
    assert!(c.cli_ok(&["get", "secrets"]).contains("db"));
    // No new key was made in its place, and no revision for values nobody could compare.
    assert!(!c.dir.path().join("data/secret.key").exists());
    assert_eq!(revision(&c), before);
}

/// A client trusting only `ca` (PEM), reaching `host` at `gateway`; a new connection per
/// request, so a renewed certificate shows at once.
fn https_client(ca: &str, host: &str, gateway: &str) -> reqwest::blocking::Client {
    let addr: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
    reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve(host, addr)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Whether GET `https://HOST:PORT/hello` through `node`'s gateway, trusting `ca` only,
/// answers hello's greeting.
fn greets_over_https(node: &NodeProc, ca: &str) -> bool {
    let host = "shop.example.test";
    let port = node.gateway.rsplit(':').next().unwrap();
    https_client(ca, host, &node.gateway)
        .get(format!("https://{host}:{port}/hello"))
        .send()
        .is_ok_and(|r| r.status() == 200 && r.text().is_ok_and(|t| t.contains("Hello from Shoal!")))
}

/// A certificate and key for `hosts`, from a CA of its own (returned, PEM), written to
/// `dir` as `cert.pem` and `key.pem`.
fn site_certificate(dir: &Path, hosts: &[&str]) -> (String, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let ca = shoal_tls::Authority::load_or_create(dir).unwrap();
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let issued = ca.issue_server(&hosts).unwrap().keyed_chain();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &issued.chain).unwrap();
    std::fs::write(&key, &issued.key).unwrap();
    (
        ca.pem().to_string(),
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

#[test]
fn an_apps_certificate_from_a_secret_is_served_by_every_gateway_and_renewed_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(d);
    let nodes = [
        NodeProc::join(&server, "node-1", &[]),
        NodeProc::join(&server, "node-2", &[]),
    ];
    let (site_ca, cert, key) = site_certificate(&d.join("site-1"), &["shop.example.test"]);
    let private_key = std::fs::read_to_string(&key).unwrap();
    let out = server.cli_ok(&[
        "secret",
        "create",
        "shop-tls",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert!(out.contains("version 1 (2 keys)"), "{out}");
    let hello = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let spec = |name: &str, route: &str, secret: &str| {
        let text = hello
            .replace("name = \"hello\"", &format!("name = \"{name}\""))
            .replace(
                "routes = [\"/hello\"]",
                &format!("routes = [\"{route}\"]\ntls = \"{secret}\""),
            );
        let path = write_spec(d, &format!("{name}.toml"), &text);
        path.to_str().unwrap().to_string()
    };
    server.cli_ok(&[
        "apply",
        "-f",
        &spec("shop", "shop.example.test/hello", "shop-tls"),
    ]);
    // Both gateways present it for the app's host, the one without the replica included.
    for node in &nodes {
        assert!(
            poll(Duration::from_secs(30), || greets_over_https(
                node, &site_ca
            )),
            "{} does not serve the app's certificate",
            node.name
        );
    }
    let described = server.cli_ok(&["describe", "app", "shop"]);
    assert!(
        described.contains("HTTPS:        secret shop-tls (version 1)"),
        "{described}"
    );
    // A node gets the certificates as itself only.
    let own = server.as_node(&nodes[0], "/v1/cluster/nodes/node-1/ingress");
    assert_eq!(own.status(), 200);
    assert!(own.text().unwrap().contains("shop.example.test"));
    assert_eq!(
        server
            .as_node(&nodes[1], "/v1/cluster/nodes/node-1/ingress")
            .status(),
        403
    );

    // Renewed (from another CA, to tell them apart): served from the next connections on
    // both gateways, and no replica is replaced for it.
    let ids = |server: &Server| {
        let mut ids: Vec<String> = server
            .replicas("shop")
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let before = ids(&server);
    let (renewed_ca, cert, key) = site_certificate(&d.join("site-2"), &["shop.example.test"]);
    let out = server.cli_ok(&[
        "secret",
        "set",
        "shop-tls",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert!(out.contains("version 2"), "{out}");
    for node in &nodes {
        assert!(
            poll(Duration::from_secs(30), || greets_over_https(
                node,
                &renewed_ca
            )),
            "{} does not serve the renewed certificate",
            node.name
        );
        assert!(
            !greets_over_https(node, &site_ca),
            "{} still serves the old one",
            node.name
        );
    }
    assert_eq!(ids(&server), before, "a new certificate replaced replicas");

    // Refused at apply, saying why: a certificate that does not name the app's host, a
    // secret without the TLS keys, a secret that does not exist.
    let (_, cert, key) = site_certificate(&d.join("site-3"), &["other.example.test"]);
    server.cli_ok(&[
        "secret",
        "create",
        "other-tls",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    server.cli_ok(&["secret", "create", "plain", "--from-literal", "a=b"]);
    for (secret, says) in [
        ("other-tls", "does not name wrong.example.test"),
        ("plain", "has no key tls.crt"),
        ("nosuch", "does not exist"),
    ] {
        let out = server.cli(&[
            "apply",
            "-f",
            &spec("wrong", "wrong.example.test/x", secret),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{secret}: {stderr}");
        assert!(
            stderr.contains(says) && stderr.contains("http.tls"),
            "{secret}: {stderr}"
        );
    }
    // A renewal with the wrong files is refused as it is written, changing nothing: a
    // certificate for another host (409), a certificate and key swapped (400).
    let refused = |args: &[&str], code: i32, says: &str| {
        let out = server.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    let set = ["secret", "set", "shop-tls", "--tls-cert"];
    refused(
        &[&set[..], &[cert.as_str(), "--tls-key", key.as_str()]].concat(),
        4,
        "app shop: the certificate does not name shop.example.test",
    );
    refused(
        &[&set[..], &[key.as_str(), "--tls-key", cert.as_str()]].concat(),
        1,
        "tls.crt and tls.key",
    );
    let out = server.cli_ok(&["get", "secrets"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("shop-tls ") && l.split_whitespace().nth(2) == Some("2")),
        "{out}"
    );
    let out = server.cli(&["secret", "delete", "shop-tls"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("used by shop"),
        "{out:?}"
    );

    // The private key is in no log line.
    let body: String = private_key
        .lines()
        .find(|l| !l.starts_with("-----"))
        .unwrap()
        .to_string();
    for (path, bytes) in files_under(d) {
        if path.extension().is_some_and(|e| e == "log") {
            assert!(!contains(&bytes, &body), "{} holds the key", path.display());
        }
    }
}
