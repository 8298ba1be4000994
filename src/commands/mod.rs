//! One module per verb.

pub mod apply;
pub mod config;
pub mod delete;
pub mod describe;
pub mod events;
pub mod get;
pub mod job;
pub mod kv;
pub mod logs;
pub mod node;
pub mod rollout;
pub mod scale;
pub mod secret;
pub mod server;
pub mod token;
pub mod top;
pub mod up;

use crate::client::Client;
use crate::output::Format;
use std::path::PathBuf;

/// Global flags every verb sees.
pub struct Context {
    pub server: Option<String>,
    pub token: Option<String>,
    pub config: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub output: Format,
    pub namespace: String,
    pub log_format: up::LogFormat,
    /// The CLI config's context to use instead of its current one.
    pub context: Option<String>,
}

impl Context {
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(
            self.server.clone(),
            self.token.clone(),
            self.config.clone(),
            self.ca_file.clone(),
            self.context.as_deref(),
        )
    }
}
