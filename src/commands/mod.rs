//! One module per verb.

pub mod apply;
pub mod backup;
pub mod config;
pub mod delete;
pub mod describe;
pub mod edit;
pub mod events;
pub mod get;
pub mod identity;
pub mod job;
pub mod kv;
pub mod logs;
pub mod node;
pub mod pool;
pub mod port_forward;
pub mod push;
pub mod quota;
pub mod rollout;
pub mod scale;
pub mod secret;
pub mod server;
pub mod token;
pub mod top;
pub mod up;
pub mod version;

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
    /// `-o toml`: `shoal get app NAME` writes the app's spec as a spec file.
    pub spec_toml: bool,
    pub namespace: String,
    /// Whether `-n` was given: commands on what belongs to no namespace refuse it.
    pub namespace_given: bool,
    pub log_format: up::LogFormat,
    /// The CLI config's context to use instead of its current one.
    pub context: Option<String>,
}

impl Context {
    /// Refuses `-n` for a command on `what`, which belongs to no namespace (exit 2).
    pub fn no_namespace(&self, what: &str) -> anyhow::Result<()> {
        if self.namespace_given {
            return Err(crate::exit::usage(format!(
                "-n/--namespace means nothing for {what}: they belong to no namespace"
            )));
        }
        Ok(())
    }

    /// Where spec files that name no namespace go: `-n`'s, the context's, or (none) their own.
    pub fn spec_namespace(&self) -> Option<apply::SpecNamespace<'_>> {
        (self.namespace_given || self.namespace != shoal_core::spec::DEFAULT_NAMESPACE).then_some(
            apply::SpecNamespace {
                name: &self.namespace,
                given: self.namespace_given,
            },
        )
    }

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

/// Reads the name of an app, namespace, node or other object for clap: what the API would
/// take (a DNS label), so a name never changes the path or query it goes into (exit 2).
pub fn object_name(text: &str) -> Result<String, String> {
    shoal_core::validate_name(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// Puts `key` in `values`, refusing a key given twice as kubectl does: the last one would
/// win without a word (exit 2).
pub fn insert_once<V>(
    values: &mut std::collections::BTreeMap<String, V>,
    key: String,
    value: V,
) -> anyhow::Result<()> {
    if values.contains_key(&key) {
        return Err(crate::exit::usage(format!("key {key:?} is given twice")));
    }
    values.insert(key, value);
    Ok(())
}

/// Reads `URL[,URL…]` for clap: the servers of one cluster.
pub fn parse_servers(text: &str) -> Result<shoal_api::Servers, String> {
    shoal_api::Servers::parse(text).map_err(|e| e.to_string())
}
