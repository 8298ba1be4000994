//! Harness for end-to-end tests: a real `shoal up` process on ephemeral
//! ports with its own data dir and CLI config, killed when dropped.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

pub struct Cluster {
    child: Child,
    pub dir: tempfile::TempDir,
    pub api: String,
    pub gateway: String,
    pub token: String,
    /// The cluster CA, PEM: what the API's certificate is checked against.
    pub ca: String,
    extra_args: Vec<String>,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, api, gateway) = spawn(dir.path(), &extra_args);
        let token = std::fs::read_to_string(dir.path().join("data/token")).expect("token file");
        let ca = std::fs::read_to_string(dir.path().join("data/ca.pem")).expect("CA file");
        Cluster {
            child,
            dir,
            api,
            gateway,
            token,
            ca,
            extra_args,
        }
    }

    /// An HTTP client for this cluster's API: it trusts the cluster's CA.
    pub fn http(&self) -> reqwest::blocking::Client {
        api_client(&self.ca)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The `shoal up` process's id, to read its memory.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(&self.config(), args)
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        expect_ok(args, self.cli(args))
    }

    /// Runs the CLI with `input` on its standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_CONFIG", self.config())
            .env_remove("SHOAL_SERVER")
            .env_remove("SHOAL_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run shoal");
        let mut stdin = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, input.as_bytes()).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("run shoal")
    }

    /// Runs the CLI and insists it fails; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "shoal {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    pub fn api_get(&self, path: &str) -> reqwest::blocking::Response {
        self.http()
            .get(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .send()
            .expect("API request")
    }

    pub fn api_json(&self, path: &str) -> serde_json::Value {
        let resp = self.api_get(path);
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().expect("JSON body")
    }

    pub fn gw(&self, path: &str) -> reqwest::blocking::Response {
        client()
            .get(format!("{}{path}", self.gateway))
            .send()
            .expect("gateway request")
    }

    /// Polls the gateway until `path` answers `status` with a body containing `needle`.
    pub fn wait_gw(&self, path: &str, status: u16, needle: &str) -> String {
        let mut last = String::new();
        let ok = poll(Duration::from_secs(30), || {
            let resp = match client().get(format!("{}{path}", self.gateway)).send() {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    return false;
                }
            };
            let code = resp.status().as_u16();
            let body = resp.text().unwrap_or_default();
            last = format!("{code} {body}");
            code == status && body.contains(needle)
        });
        assert!(
            ok,
            "GET {path} never answered {status} with {needle:?}; last: {last}"
        );
        last
    }

    /// kill -9, then start again on the same data dir (new ports).
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// kill -9, leaving the data dir as it is.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// Starts again on the same data dir (new ports), after [`Cluster::kill`].
    pub fn restart(&mut self) {
        let (child, api, gateway) = spawn(self.dir.path(), &self.extra_args);
        self.child = child;
        self.api = api;
        self.gateway = gateway;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, extra: &[String]) -> (Child, String, String) {
    let mut child = Command::new(SHOAL)
        .arg("up")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--api",
            "127.0.0.1:0",
            "--gateway",
            "127.0.0.1:0",
            "--node-name",
            "node-1",
        ])
        .args(extra)
        .env("SHOAL_CONFIG", dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn shoal up");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                // Keep draining so the child never blocks on a full pipe.
                continue;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut api, mut gateway) = (None, None);
    while api.is_none() || gateway.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("shoal up did not report its addresses in time");
        if let Some(a) = line.trim().strip_prefix("API:") {
            api = Some(a.trim().to_string());
        }
        if let Some(g) = line.trim().strip_prefix("gateway:") {
            gateway = Some(g.trim().to_string());
        }
    }
    (child, api.unwrap(), gateway.unwrap())
}

/// The CLI with the given config file and nothing from the environment.
pub fn run_cli(config: &Path, args: &[&str]) -> Output {
    Command::new(SHOAL)
        .args(args)
        .env("SHOAL_CONFIG", config)
        .env_remove("SHOAL_SERVER")
        .env_remove("SHOAL_TOKEN")
        .output()
        .expect("run shoal")
}

/// Insists a CLI run succeeded; returns its stdout.
pub fn expect_ok(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "shoal {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A plain HTTP client, for gateways.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A client of an API served with a certificate from the cluster CA `ca` (PEM).
pub fn api_client(ca: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA PEM"))
        .build()
        .expect("http client")
}

/// `127.0.0.1:PORT` with a port free now: for a process that must listen on the same
/// address again after a restart.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// The value of the sample line starting with `series ` in Prometheus text `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Insists `promtool check metrics` (Debian's prometheus package; `make test` installs it)
/// finds nothing to say about the exposition `text`.
pub fn promtool_check(text: &str) {
    use std::io::Write as _;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `make test` installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(checked.status.success(), "{checked:?}\n{text}");
}

/// Calls `f` until it returns true or the deadline passes.
pub fn poll(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Applies `count` copies of `base` (an applied app's spec, as JSON) through the API from 4
/// clients, as a deploy tool would: `{prefix}-{i}` with the route `/{prefix}/{i}`.
pub fn apply_copies(
    c: &Cluster,
    base: &serde_json::Value,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (api, token, base) = (c.api.clone(), c.token.clone(), base.clone());
            let (prefix, range) = (prefix.to_string(), range.clone());
            let http = c.http();
            std::thread::spawn(move || {
                for i in range.filter(|i| i % 4 == t) {
                    let mut spec = base.clone();
                    spec["name"] = format!("{prefix}-{i}").into();
                    spec["http"]["routes"] =
                        serde_json::json!([{ "path": format!("/{prefix}/{i}") }]);
                    let resp = http
                        .post(format!("{api}/v1/apps"))
                        .bearer_auth(&token)
                        .json(&spec)
                        .send()
                        .expect("apply");
                    assert!(
                        resp.status().is_success(),
                        "apply {prefix}-{i}: {}",
                        resp.text().unwrap_or_default()
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("apply thread");
    }
}

/// Writes an app spec into the test's temp dir, with the module path made absolute.
pub fn write_spec(dir: &Path, file: &str, body: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, body).expect("write spec");
    path
}

pub fn examples() -> &'static str {
    shoal_fixtures::EXAMPLES_DIR
}

/// The `faulty` example with its `[scale]` section replaced by `scale`, written in `dir`.
pub fn faulty_scaled(dir: &Path, scale: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("[scale]\nreplicas = 1\n", scale);
    write_spec(dir, "faulty.toml", &text)
        .to_str()
        .unwrap()
        .to_string()
}

/// `app`'s row of `GET /v1/apps`.
pub fn app_row(apps: &serde_json::Value, app: &str) -> serde_json::Value {
    apps.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == app)
        .cloned()
        .unwrap_or_else(|| panic!("{app} is listed"))
}

/// Example `name`'s `app.toml`, its component path made absolute so the text works from any
/// directory, with `replicas` replicas and `GREETING` set to `greeting` (for hello).
pub fn example_spec(name: &str, replicas: u32, greeting: &str) -> String {
    std::fs::read_to_string(format!("{}/{name}/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("replicas = 1", &format!("replicas = {replicas}"))
        .replace("Hello from Shoal!", greeting)
}

/// A `shoal server` with `nodes` workers (`node-1`…), all Ready.
pub fn cluster(nodes: usize, extra: &[&str]) -> (tempfile::TempDir, Server, Vec<NodeProc>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let nodes: Vec<NodeProc> = (1..=nodes)
        .map(|i| NodeProc::join(&server, &format!("node-{i}"), extra))
        .collect();
    assert!(
        poll(Duration::from_secs(20), || server.nodes_ready()
            == nodes.len()),
        "nodes never all Ready"
    );
    (dir, server, nodes)
}

/// The `faulty` example's spec with `replicas` and `extra` appended (an `[env]`
/// table, probes…), written into `dir`; returns its path.
pub fn faulty_spec(dir: &Path, file: &str, replicas: u32, extra: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace("replicas = 1", &format!("replicas = {replicas}"));
    write_spec(dir, file, &format!("{text}\n{extra}"))
        .to_str()
        .unwrap()
        .to_string()
}

/// A client sending GETs to one URL back to back until stopped: what users of
/// an app see while the cluster changes under it.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<LoadResult>,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: usize,
    pub failed: usize,
    /// The first few failures, status and body, for the assertion message.
    pub failures: Vec<String>,
    /// How many successful responses carried each body.
    pub bodies: std::collections::BTreeMap<String, usize>,
}

impl Load {
    pub fn start(url: String) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let http = client();
                let mut result = LoadResult::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let outcome = http
                        .get(&url)
                        .send()
                        .map_err(|e| e.to_string())
                        .and_then(|r| {
                            let status = r.status();
                            let body = r.text().map_err(|e| e.to_string())?;
                            if status == 200 {
                                Ok(body)
                            } else {
                                Err(format!("{status}: {body}"))
                            }
                        });
                    match outcome {
                        Ok(body) => {
                            result.ok += 1;
                            *result.bodies.entry(body).or_default() += 1;
                        }
                        Err(e) => {
                            result.failed += 1;
                            if result.failures.len() < 5 {
                                result.failures.push(e);
                            }
                        }
                    }
                }
                result
            })
        };
        Load { stop, thread }
    }

    pub fn stop(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("load thread")
    }
}

/// A `shoal server` process: control plane only.
pub struct Server {
    child: Child,
    pub dir: PathBuf,
    pub api: String,
    pub token: String,
    pub join_token: String,
    /// The cluster CA, PEM.
    pub ca: String,
    api_addr: String,
    extra: Vec<String>,
}

impl Server {
    /// Starts a control plane in `dir`, on a fixed port so nodes can find it
    /// again after a restart.
    pub fn start(dir: &Path) -> Server {
        Self::start_with(dir, &[])
    }

    /// [`Server::start`] with more `shoal server` flags.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_at(dir, &free_addr(), extra)
    }

    fn start_at(dir: &Path, api_addr: &str, extra: Vec<String>) -> Server {
        let mut child = Command::new(SHOAL)
            .args(["server", "--data-dir"])
            .arg(dir.join("server"))
            .args(["--api", api_addr])
            .args(&extra)
            .env("SHOAL_CONFIG", dir.join("config.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file(&dir.join("server.log")))
            .spawn()
            .expect("spawn shoal server");
        let lines = read_lines(&mut child);
        wait_line(&lines, "API:");
        let token = std::fs::read_to_string(dir.join("server/token")).unwrap();
        let join_token = std::fs::read_to_string(dir.join("server/join-token")).unwrap();
        let ca = std::fs::read_to_string(dir.join("server/ca.pem")).unwrap();
        Server {
            child,
            dir: dir.to_path_buf(),
            api: format!("https://{api_addr}"),
            token,
            join_token,
            ca,
            api_addr: api_addr.to_string(),
            extra,
        }
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// [`Server::restart`] with more `shoal server` flags, kept for later restarts.
    pub fn restart_with(&mut self, more: &[&str]) {
        self.extra.extend(more.iter().map(|s| s.to_string()));
        self.restart();
    }

    /// Starts again on the same data dir and address.
    pub fn restart(&mut self) {
        let (dir, addr, extra) = (self.dir.clone(), self.api_addr.clone(), self.extra.clone());
        // The port may linger briefly after the kill; retry binding for a while.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = std::panic::catch_unwind(|| Server::start_at(&dir, &addr, extra.clone()));
            match attempt {
                Ok(s) => {
                    let old = std::mem::replace(self, s);
                    std::mem::forget(old);
                    return;
                }
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(&self.dir.join("config.toml"), args)
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        expect_ok(args, self.cli(args))
    }

    /// An HTTP client for the API: it trusts the cluster's CA.
    pub fn http(&self) -> reqwest::blocking::Client {
        api_client(&self.ca)
    }

    pub fn api_json(&self, path: &str) -> serde_json::Value {
        let resp = self
            .http()
            .get(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .send()
            .expect("API request");
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().expect("JSON body")
    }

    /// Replicas of `app` by phase, and the nodes they are on.
    pub fn replicas(&self, app: &str) -> Vec<serde_json::Value> {
        self.api_json(&format!("/v1/replicas?app={app}"))
            .as_array()
            .unwrap()
            .clone()
    }

    /// GET `path` as `node`, with its own credential.
    pub fn as_node(&self, node: &NodeProc, path: &str) -> reqwest::blocking::Response {
        self.http()
            .get(format!("{}{path}", self.api))
            .bearer_auth(node.credential())
            .send()
            .expect("API request")
    }

    /// How many nodes are Ready.
    pub fn nodes_ready(&self) -> usize {
        let nodes = self.api_json("/v1/nodes");
        let nodes = nodes.as_array().unwrap();
        nodes.iter().filter(|n| n["state"] == "Ready").count()
    }

    /// The nodes of `app`'s Ready replicas.
    pub fn ready_nodes(&self, app: &str) -> Vec<String> {
        self.replicas(app)
            .iter()
            .filter(|r| r["phase"] == "Ready")
            .map(|r| r["node"].as_str().unwrap().to_string())
            .collect()
    }

    /// How many Ready replicas of `app` each node runs.
    pub fn placement(&self, app: &str) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for node in self.ready_nodes(app) {
            *out.entry(node).or_default() += 1;
        }
        out
    }

    /// The ids of `app`'s replicas, whatever their phase.
    pub fn replica_ids(&self, app: &str) -> std::collections::BTreeSet<String> {
        self.replicas(app)
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        print_log_if_failing(&self.dir.join("server.log"));
    }
}

/// Where a server's or node's log goes: a file beside its data dir, appended to across
/// restarts, so a test can read what it logged.
fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the log file")
        .into()
}

/// A failing test shows the log of each process it ran.
fn print_log_if_failing(path: &Path) {
    if std::thread::panicking() {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        eprintln!("---- {} ----\n{log}", path.display());
    }
}

/// A `shoal node join` process: a worker with its own gateway and data dir.
pub struct NodeProc {
    child: Child,
    pub name: String,
    pub gateway: String,
    /// Its data dir (its credential lives there).
    pub dir: PathBuf,
    extra: Vec<String>,
    api: String,
    token: String,
    gw_addr: String,
}

impl NodeProc {
    /// The node's process id, to read its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn join(server: &Server, name: &str, extra: &[&str]) -> NodeProc {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            &server.dir.join(name),
            name,
            &server.api,
            &server.join_token,
            &free_addr(),
            extra,
        )
    }

    /// A worker joining the servers `servers` of one cluster (sharing a store) with the URLs
    /// of all of them, in that order: `shoal node join URL,URL…`.
    pub fn join_servers(servers: &[&Server], name: &str, extra: &[&str]) -> NodeProc {
        let urls: Vec<&str> = servers.iter().map(|s| s.api.as_str()).collect();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            &servers[0].dir.join(name),
            name,
            &urls.join(","),
            &servers[0].join_token,
            &free_addr(),
            extra,
        )
    }

    /// A worker joining the control plane of `shoal up` cluster `c`, beside its own node.
    pub fn join_up(c: &Cluster, name: &str, extra: &[&str]) -> NodeProc {
        let join_token =
            std::fs::read_to_string(c.dir.path().join("data/join-token")).expect("join token file");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            &c.dir.path().join(name),
            name,
            &c.api,
            &join_token,
            &free_addr(),
            extra,
        )
    }

    /// A worker named `name` with data dir `dir`, joining the control plane at `api` with
    /// `token`, its gateway on `gw`.
    pub fn spawn(
        dir: &Path,
        name: &str,
        api: &str,
        token: &str,
        gw: &str,
        extra: Vec<String>,
    ) -> NodeProc {
        // The token goes in a file, as a real node is told to keep it: not on the command line.
        let token_file = dir.with_extension("join-token");
        std::fs::write(&token_file, token).expect("write the join token");
        let mut child = Command::new(SHOAL)
            .args(["node", "join", api, "--token-file"])
            .arg(&token_file)
            .arg("--data-dir")
            .arg(dir)
            .args(["--node-name", name, "--gateway", gw])
            .args(&extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file(&dir.with_extension("log")))
            .spawn()
            .expect("spawn shoal node join");
        let lines = read_lines(&mut child);
        // A node that does not start is stopped, and its log shown.
        let started = std::panic::catch_unwind(|| wait_line(&lines, "gateway:"));
        if let Err(e) = started {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
            eprintln!("---- {} did not start ----\n{log}", name);
            std::panic::resume_unwind(e);
        }
        NodeProc {
            child,
            name: name.to_string(),
            gateway: format!("http://{gw}"),
            dir: dir.to_path_buf(),
            extra,
            api: api.to_string(),
            token: token.to_string(),
            gw_addr: gw.to_string(),
        }
    }

    /// The credential it keeps in its data dir.
    pub fn credential(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("node-identity.json")).unwrap();
        let identity: serde_json::Value = serde_json::from_str(&text).unwrap();
        identity["credential"].as_str().unwrap().to_string()
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// Sends SIGTERM, as `systemctl stop` does, and waits up to `within` for the process to
    /// exit: its exit status, or `None` if it still runs.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal_term();
        self.exit_within(within)
    }

    /// Sends SIGTERM, as `systemctl stop` does, and returns at once.
    pub fn signal_term(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: a plain kill(2) of our own child, which has not been reaped yet.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGTERM) },
            0,
            "SIGTERM {pid}"
        );
    }

    /// Waits up to `within` for the process to exit: its exit status, or `None` if it runs.
    pub fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        poll(within, || {
            status = self.child.try_wait().expect("wait for the node");
            status.is_some()
        });
        status
    }

    /// Starts the same node again (same name, data dir and gateway address).
    pub fn restart(&mut self) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = std::panic::catch_unwind(|| {
                NodeProc::spawn(
                    &self.dir,
                    &self.name,
                    &self.api,
                    &self.token,
                    &self.gw_addr,
                    self.extra.clone(),
                )
            });
            match attempt {
                Ok(n) => {
                    let old = std::mem::replace(self, n);
                    std::mem::forget(old);
                    return;
                }
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        client()
            .get(format!("{}{path}", self.gateway))
            .send()
            .map_err(|e| e.to_string())
            .map(|r| {
                let code = r.status().as_u16();
                (code, r.text().unwrap_or_default())
            })
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        print_log_if_failing(&self.dir.with_extension("log"));
    }
}

/// A spawned process that is killed and reaped when the test is done with it, or when an
/// assertion fails first: a follower or watcher never outlives its test.
pub struct Killed(Option<Child>);

impl Killed {
    pub fn new(child: Child) -> Killed {
        Killed(Some(child))
    }

    /// Waits for it to end and collects what it printed, as [`Child::wait_with_output`].
    pub fn wait_with_output(mut self) -> Output {
        let child = self.0.take().expect("a child until dropped");
        child.wait_with_output().expect("wait for the child")
    }
}

impl std::ops::Deref for Killed {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a child until dropped")
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a child until dropped")
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn read_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

pub fn wait_line(lines: &mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("process did not print {prefix:?} in time"));
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
}

/// Kills what a test's provider script started in the background (the pids it wrote to
/// `*.pid` files in this dir), whatever the test did.
pub struct Started(pub PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        let Ok(dir) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in dir.flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Ok(pid) = std::fs::read_to_string(entry.path())
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                // SAFETY: a plain kill(2) of a process the test's provider started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
