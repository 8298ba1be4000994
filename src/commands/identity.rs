//! A server's identity on a shared store: the cluster CA (`ca.pem`, `ca-key.pem`) and the
//! secrets' key file (`secret.key`), which every server sharing an etcd cluster must hold the
//! same copies of. The first server on the store seals its own under its admin token and puts
//! them there; a server started with an empty data dir and that admin token (`--token-file`)
//! takes them from there, as k3s servers join with the cluster's token. So only the token
//! travels by hand, and it is what an operator holds anyway.

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use shoal_core::Sealed;
use shoal_core::objects::keys;
use shoal_store::{KvStore, Op, Txn};
use std::collections::BTreeMap;
use std::path::Path;

/// Where the sealed identity lives: outside `/`, so no watch or snapshot carries it.
const KEY: &str = "cluster/identity";
/// What the seal is bound to: it opens as nothing else.
const BINDING: &[u8] = b"shoal cluster identity v1";
/// The files of the data dir that make a server the cluster's, besides the admin token.
const FILES: [&str; 3] = ["ca.pem", "ca-key.pem", "secret.key"];

#[derive(Serialize, Deserialize)]
struct Bundle {
    /// File name to content.
    files: BTreeMap<String, String>,
}

/// Makes `data` hold the identity of the cluster in `store`: taken from the store with the
/// admin token in `token_file` for an empty data dir, checked against it for a data dir that
/// has one, or put there (sealed under this server's admin token) by the first server.
pub fn settle(store: &dyn KvStore, data: &Path, token_file: Option<&Path>) -> Result<()> {
    let has_identity = data.join("ca.pem").exists();
    let given = token_file
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.trim().to_string())
                .with_context(|| format!("cannot read the admin token in {}", f.display()))
        })
        .transpose()?;
    let Some(kv) = store.get(KEY)? else {
        if !has_identity && given.is_some() {
            bail!(
                "the store holds no cluster yet, so there is no identity to take with \
                 --token-file: start the first server without it"
            );
        }
        return put_own(store, data);
    };
    let sealed: Sealed = serde_json::from_slice(&kv.value)
        .map_err(|e| anyhow!("the cluster identity in the store is damaged: {e}"))?;
    let token = match (&given, has_identity) {
        (Some(t), _) => t.clone(),
        (None, true) => read(data, "token")?,
        (None, false) => bail!(
            "the store already serves a cluster: give this server its admin token \
             (--token-file, the `token` file of a server of that cluster) to join it"
        ),
    };
    let plain = shoal_secrets::open_with_passphrase(&token, BINDING, &sealed).map_err(|_| {
        if given.is_some() {
            anyhow!("the admin token does not open the identity of the cluster in the store: it is another cluster's")
        } else {
            another_cluster(data)
        }
    })?;
    let bundle: Bundle = serde_json::from_slice(&plain)
        .map_err(|e| anyhow!("the cluster identity in the store is damaged: {e}"))?;
    if has_identity {
        if read(data, "ca.pem")? != bundle.files.get("ca.pem").map_or("", |s| s.trim()) {
            return Err(another_cluster(data));
        }
        return Ok(());
    }
    for (name, content) in &bundle.files {
        if !FILES.contains(&name.as_str()) {
            bail!("the cluster identity in the store names an unknown file {name:?}");
        }
        write(data, name, content)?;
    }
    write(data, "token", &token)
}

/// The first server: its identity (made now where it has none) sealed under its admin token,
/// put unless another server put one first; then that one is checked against this one.
fn put_own(store: &dyn KvStore, data: &Path) -> Result<()> {
    let token = super::up::load_or_create_secret(&data.join("token"))?;
    shoal_tls::Authority::load_or_create(data)
        .with_context(|| format!("cannot make or read the cluster CA in {}", data.display()))?;
    let key_file = data.join("secret.key");
    // As the control plane would make it, unless secrets are stored that a new key would not
    // open (then it says so when it starts).
    if shoal_secrets::Keyring::load(&key_file)?.is_none()
        && store.range(keys::SECRETS.as_str())?.0.is_empty()
    {
        shoal_secrets::Keyring::create(&key_file)?;
    }
    let mut files = BTreeMap::new();
    for name in FILES {
        if let Ok(content) = std::fs::read_to_string(data.join(name)) {
            files.insert(name.to_string(), content);
        }
    }
    let plain = serde_json::to_vec(&Bundle { files })?;
    let sealed = shoal_secrets::seal_with_passphrase(&token, BINDING, &plain);
    let put = Txn::new()
        .when_absent(KEY)
        .then(Op::put(KEY, serde_json::to_vec(&sealed)?));
    if !store.txn(put)?.succeeded {
        // Another server was first: this data dir must then be that cluster's.
        return settle(store, data, None);
    }
    Ok(())
}

fn another_cluster(data: &Path) -> anyhow::Error {
    anyhow!(
        "the data dir {} belongs to another cluster than the one in the store; give this \
         server an empty data dir and --token-file to join this one",
        data.display()
    )
}

fn read(data: &Path, name: &str) -> Result<String> {
    let path = data.join(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("cannot read {}", path.display()))
}

fn write(data: &Path, name: &str, content: &str) -> Result<()> {
    let path = data.join(name);
    shoal_tls::write_private(&path, content.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
