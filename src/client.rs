//! The CLI's view of the API: where it is and the token (the CLI config),
//! and the calls, made with [`shoal_api::Client`], their `{"error": …}`
//! bodies turned into readable errors.

use anyhow::{Context as _, Result, anyhow};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_api::{ClientError, Resend, Servers};
use std::path::{Path, PathBuf};

/// What `shoal up` and `shoal server` write so that other verbs find their cluster, as
/// kubeconfig does: one context per cluster (where the API is, the token, the cluster CA its
/// certificate is checked against) and the one in use. Starting a cluster adds or replaces its
/// own context and makes it current; the others stay.
#[derive(Default, Serialize, Deserialize)]
pub struct CliConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub contexts: std::collections::BTreeMap<String, ContextEntry>,
    /// A config written before contexts existed: its one cluster, read as context `default`.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    legacy: Option<ContextEntry>,
}

/// One cluster the CLI can talk to.
#[derive(Clone, Serialize, Deserialize)]
pub struct ContextEntry {
    /// The API's URL, or the URLs of several servers of the cluster, comma-separated (as
    /// `--server` takes them).
    pub server: String,
    pub token: String,
    /// The cluster CA's certificate, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// The namespace commands act in when -n is left out (none: `default`), as kubectl's
    /// context namespace: what a namespace-scoped token needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl ContextEntry {
    /// This context with `server` among its servers, after the others if it is new: what a
    /// server sharing the store of the servers already listed writes.
    pub fn with_server(&self, server: &str) -> ContextEntry {
        let mut servers: Vec<&str> = self.server.split(',').map(str::trim).collect();
        if !servers.contains(&server) {
            servers.push(server);
        }
        ContextEntry {
            server: servers.join(","),
            ..self.clone()
        }
    }
}

pub fn default_config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("shoal").join("config.toml")
}

impl CliConfig {
    pub fn load(path: &Path) -> Result<CliConfig> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the CLI config {} (start a cluster with `shoal up`, or pass --server and --token)",
                path.display()
            )
        })?;
        let mut config: CliConfig = toml::from_str(&text)
            .with_context(|| format!("invalid CLI config {}", path.display()))?;
        if let Some(old) = config.legacy.take() {
            config.contexts.entry("default".into()).or_insert(old);
            config.current.get_or_insert_with(|| "default".into());
        }
        Ok(config)
    }

    /// The config at `path`, or an empty one if there is none yet.
    pub fn load_or_new(path: &Path) -> Result<CliConfig> {
        if path.exists() {
            CliConfig::load(path)
        } else {
            Ok(CliConfig::default())
        }
    }

    /// Context `name` (the current one if `None`).
    pub fn context(&self, name: Option<&str>) -> Result<&ContextEntry> {
        let name = name.or(self.current.as_deref()).ok_or_else(|| {
            anyhow!("the CLI config names no current context: `shoal config use-context NAME`")
        })?;
        self.contexts.get(name).ok_or_else(|| {
            anyhow::Error::new(crate::exit::Classified {
                code: crate::exit::NOT_FOUND,
                message: format!(
                    "no context {name} in the CLI config (`shoal config get-contexts` lists them)"
                ),
            })
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = toml::to_string(self).expect("config serialises");
        write_private(path, text.as_bytes())
    }
}

/// Creates `dir` (and its parents) if needed and makes it readable by its owner only: a data
/// dir holds tokens, the state and modules.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("cannot create data dir {}", dir.display()))
}

/// Makes an existing file readable and writable by its owner only.
pub fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

/// Writes a file only its owner can read: tokens live in these.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    shoal_tls::write_private(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Fails, before the server is asked for anything, if `path` could not be written as
/// [`write_private`] writes it (a file beside it, renamed over it, so its directory must take
/// a new file): a token made or rotated only for its file to be lost is of no use, and its
/// name stays taken. `-` is refused: a token is never printed, where terminals and logs
/// would keep it.
pub fn check_writable(path: &Path) -> Result<()> {
    if path.as_os_str() == "-" {
        return Err(crate::exit::usage(
            "a token is written to a file (readable by its owner only), never to standard output"
                .into(),
        ));
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    // A new file of a random name, removed as it is dropped: as `write_private` makes one.
    let probe = tempfile::Builder::new()
        .prefix(".shoal-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map(drop);
    probe.map_err(|e| crate::exit::usage(format!("cannot write {}: {e}", path.display())))
}

/// The CLI's API client: [`shoal_api::Client`] with the server and token
/// from flags or the CLI config, and its errors said for a person at a terminal.
pub struct Client {
    api: shoal_api::Client,
}

impl Client {
    /// The servers and token from the flags, or else from the CLI config; the CA from
    /// `--ca-file`, or else the config's (when there is one).
    pub fn new(
        server: Option<String>,
        token: Option<String>,
        config: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        context: Option<&str>,
    ) -> Result<Client> {
        let path = config.unwrap_or_else(default_config_path);
        if let Some(given) = &server {
            Servers::parse(given)
                .map_err(|e| crate::exit::usage(format!("--server/SHOAL_SERVER: {e}")))?;
        }
        let (server, token, ca) = match (server, token) {
            (Some(s), Some(t)) => {
                let ca = CliConfig::load(&path)
                    .ok()
                    .and_then(|c| c.context(context).ok().and_then(|e| e.ca.clone()));
                (s, t, ca)
            }
            (s, t) => {
                let cfg = CliConfig::load(&path)?;
                let entry = cfg.context(context)?.clone();
                (
                    s.unwrap_or(entry.server),
                    t.unwrap_or(entry.token),
                    entry.ca,
                )
            }
        };
        let ca = match ca_file {
            Some(file) => Some(
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read the CA from {}", file.display()))?,
            ),
            None => ca,
        };
        Client::connect(&server, &token, ca.as_deref())
    }

    /// A client of the API at `server` (one URL, or several of one cluster, comma-separated)
    /// with `token`, trusting the cluster CA `ca` (PEM).
    pub fn connect(server: &str, token: &str, ca: Option<&str>) -> Result<Client> {
        let servers = Servers::parse(server).with_context(|| format!("the server {server:?}"))?;
        static WARNED: std::sync::Once = std::sync::Once::new();
        let urls = servers.urls();
        if let Some(url) = in_plain_text(&urls).first() {
            WARNED.call_once(|| {
                eprintln!(
                    "Warning: {url} is plain HTTP to another machine: the API token goes over the network in clear text, for anyone on the path to take (a server started with --plain-http; use https)"
                );
            });
        }
        // A server that does not take a connection within this is left for the next one.
        let mut http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(pem) = ca {
            let tls = shoal_tls::api_client(pem).context("the cluster CA")?;
            http = http.use_preconfigured_tls(tls);
        }
        let http = http.build().context("cannot set up the HTTP client")?;
        Ok(Client {
            api: shoal_api::Client::with_http(http, servers, token),
        })
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.api.request(method, path)
    }

    /// The server calls go to now: the one that last answered.
    pub fn base(&self) -> String {
        self.api.base()
    }

    /// Whether a request that cannot reach one server may go to another.
    pub fn fails_over(&self) -> bool {
        self.api.servers().urls().len() > 1
    }

    /// Sends and decodes JSON, or fails with the server's error message.
    pub async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        self.api.send(req).await.map_err(said)
    }

    /// [`Client::send`] for a request that does the same sent twice (an apply, a
    /// content-addressed upload): sent on to the next server even after one received it
    /// and did not answer.
    pub async fn send_idempotent<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T> {
        self.api
            .send_as(req, Resend::Idempotent)
            .await
            .map_err(said)
    }

    /// Sends and fails on a non-2xx status with the server's error message.
    pub async fn checked(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        self.api.checked(req).await.map_err(said)
    }

    /// Sends and hands back the answer whatever its status, for a caller that reads a 4xx
    /// itself.
    pub async fn answer(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        self.api.answer(req).await.map_err(said)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.api.get(path).await.map_err(said)
    }
}

/// How long the CLI waits for a server to take a connection before it counts as down.
/// The servers of `urls` that a token would reach in clear text over a network: `http://` to a
/// host other than this machine's loopback.
fn in_plain_text(urls: &[String]) -> Vec<&str> {
    urls.iter()
        .filter(|u| {
            let Ok(url) = reqwest::Url::parse(u) else {
                return false;
            };
            let host = url.host_str().unwrap_or_default();
            let ip = host.trim_start_matches('[').trim_end_matches(']');
            let local = host.eq_ignore_ascii_case("localhost")
                || ip
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            url.scheme() == "http" && !local
        })
        .map(String::as_str)
        .collect()
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A failed call, said for a person at a terminal, classified for the exit code.
fn said(e: ClientError) -> anyhow::Error {
    let classified =
        |code: u8, message: String| anyhow::Error::new(crate::exit::Classified { code, message });
    match e {
        ClientError::Send { base, source } if untrusted(&source) => anyhow::Error::new(source)
            .context(format!(
                "the Shoal API at {base} presents a certificate this CLI does not trust: check --ca-file, or the CA of the CLI config's context"
            )),
        ClientError::Send { base, source } if source.is_connect() || source.is_timeout() => {
            classified(
                crate::exit::UNAVAILABLE,
                format!(
                    "cannot reach the Shoal API at {base} (is its server up? It also closes new connections from an address that holds --api-client-connections of them): {}",
                    shoal_core::causes(&source)
                ),
            )
        }
        // Kept as the cause, so a follower can tell a broken connection from an answer.
        ClientError::Send { base, source } => {
            let hint = if base.starts_with("http://") {
                " (the API speaks TLS unless started with --plain-http: https://?)"
            } else {
                ""
            };
            anyhow::Error::new(source)
                .context(format!("request to the Shoal API at {base} failed{hint}"))
        }
        ClientError::Decode(source) => {
            anyhow::Error::new(source).context("the server sent a response this CLI cannot read")
        }
        // "{message} ({status}, {code})", or "the API answered {status}: {body}".
        api => match api
            .status()
            .and_then(|s| crate::exit::for_status(s.as_u16()))
        {
            Some(code) => classified(code, api.to_string()),
            None => anyhow!("{api}"),
        },
    }
}

/// Whether `e` failed because the server's certificate was refused. rustls's error sits in
/// an `io::Error`, whose `source` skips it, so those are opened.
fn untrusted(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if matches!(
            c.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        ) {
            return true;
        }
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

impl Client {
    /// For a command that follows (`--follow`, `-w`): calls `call` again while the API cannot
    /// be reached or a connection breaks (a server restarting, all of them down), after a
    /// pause growing to 5 s, saying so once; an answer, even an error, ends the wait.
    pub async fn patiently<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut pause = std::time::Duration::from_millis(250);
        let mut waiting = false;
        loop {
            match call().await {
                Err(e) if unreachable(&e) => {
                    if !waiting {
                        eprintln!("shoal: {e:#}; trying again");
                        waiting = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
                answered => {
                    if waiting && answered.is_ok() {
                        eprintln!("shoal: the API at {} answers again", self.base());
                    }
                    return answered;
                }
            }
        }
    }
}

/// Whether `e` says the API could not be reached, or a connection to it broke (not that
/// its certificate is refused: asking again would not change that).
fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<reqwest::Error>()
            .is_some_and(|e| !untrusted(e))
            || c.downcast_ref::<crate::exit::Classified>()
                .is_some_and(|c| c.code == crate::exit::UNAVAILABLE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain HTTP is warned of only where the token leaves this machine.
    #[test]
    fn plain_http_off_this_machine_is_found() {
        let urls: Vec<String> = [
            "http://127.0.0.1:7700",
            "http://localhost:7700",
            "http://[::1]:7700",
            "https://cp.example.com:7700",
            "http://cp.example.com:7700",
            "http://10.0.0.5:7700",
            "http://[2001:db8::1]:7700",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            in_plain_text(&urls),
            [
                "http://cp.example.com:7700",
                "http://10.0.0.5:7700",
                "http://[2001:db8::1]:7700"
            ]
        );
    }

    /// A token goes to a file that can be written, never to standard output as `-`.
    #[test]
    fn a_token_file_must_be_writable_and_is_never_standard_output() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(&dir.path().join("t.token")).is_ok());
        assert!(check_writable(&dir.path().join("no/such/dir/t.token")).is_err());
        let e = check_writable(Path::new("-")).unwrap_err();
        assert!(e.to_string().contains("never to standard output"), "{e}");
    }

    #[test]
    fn a_config_from_before_contexts_is_read_as_context_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "server = \"https://127.0.0.1:7700\"\ntoken = \"t\"\n",
        )
        .unwrap();
        let config = CliConfig::load(&path).unwrap();
        assert_eq!(config.current.as_deref(), Some("default"));
        assert_eq!(
            config.context(None).unwrap().server,
            "https://127.0.0.1:7700"
        );
        // Saved again, it has contexts only.
        config.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("current = \"default\""), "{text}");
        assert_eq!(CliConfig::load(&path).unwrap().contexts.len(), 1);
    }

    #[test]
    fn servers_of_one_store_add_themselves_to_their_context_once() {
        let first = ContextEntry {
            server: "https://10.0.0.1:7700".into(),
            token: "t".into(),
            ca: None,
            namespace: None,
        };
        let two = first.with_server("https://10.0.0.2:7700");
        assert_eq!(two.server, "https://10.0.0.1:7700,https://10.0.0.2:7700");
        // A server starting again on its address is listed once, where it was.
        let again = two.with_server("https://10.0.0.1:7700");
        assert_eq!(again.server, two.server);
        assert_eq!(
            Servers::parse(&again.server).unwrap().urls().len(),
            2,
            "what the CLI reads back"
        );
    }
}
