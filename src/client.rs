//! The CLI's view of the API: where it is, the token, and JSON calls that
//! turn `{"error": …}` bodies into readable errors.

use anyhow::{Context as _, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What `shoal up` writes so that other verbs find the cluster.
#[derive(Debug, Serialize, Deserialize)]
pub struct CliConfig {
    pub server: String,
    pub token: String,
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
        toml::from_str(&text).with_context(|| format!("invalid CLI config {}", path.display()))
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

/// Writes a file only its owner can read: tokens live in these.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl Client {
    pub fn new(
        server: Option<String>,
        token: Option<String>,
        config: Option<PathBuf>,
    ) -> Result<Client> {
        let (server, token) = match (server, token) {
            (Some(s), Some(t)) => (s, t),
            (s, t) => {
                let path = config.unwrap_or_else(default_config_path);
                let cfg = CliConfig::load(&path)?;
                (s.unwrap_or(cfg.server), t.unwrap_or(cfg.token))
            }
        };
        Ok(Client {
            http: reqwest::Client::new(),
            base: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends and decodes JSON, or fails with the server's error message.
    pub async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.checked(req).await?;
        resp.json()
            .await
            .context("the server sent a response this CLI cannot read")
    }

    /// Sends and fails on a non-2xx status with the server's error message.
    pub async fn checked(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the Shoal API at {} (is `shoal up` running?): {e}",
                    self.base
                )
            } else {
                anyhow!("request to the Shoal API at {} failed: {e:#}", self.base)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => bail!(
                "{} ({}, {})",
                b.error.message,
                status.as_u16(),
                b.error.code
            ),
            Err(_) => bail!("the API answered {status}: {}", text.trim()),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }
}
