//! Module bytes in the state store, for control planes that share one (`shoal server --store
//! etcd://…`): any of them may be asked by a node for any module, whichever one took the upload.
//!
//! Why the store and not servers fetching from each other: a module is then exactly as durable
//! and as available as the record that names it (etcd's quorum), no server has to be up for
//! another to serve it, and servers need no addresses or credentials for each other. The cost is
//! size in etcd (modules are at most `--max-module-size`, 64 MiB by default; raise etcd's
//! `--quota-backend-bytes` for many large ones). Each server keeps its local [`BlobStore`] as
//! the cache it serves from; the store holds the copy every server can fill it from.
//!
//! Layout: `blobs/{digest}/{n:06}`, chunks of [`CHUNK`] bytes (under etcd's 1.5 MiB request
//! limit), written one per transaction before the module's record, so whoever reads the
//! record finds every chunk. The keys are outside `/`, so the watches of the cluster state
//! never carry module bytes.

use std::sync::Arc;

use shoal_core::Module;
use shoal_core::objects::keys;
use shoal_store::{BlobStore, KvStore, Op, Txn};

use crate::error::ControlError;
use crate::state::ControlPlane;

/// Bytes per chunk key.
const CHUNK: usize = 512 * 1024;

/// Where a module's chunks live; what a deletion removes with the module's record.
pub(crate) fn prefix(digest: &str) -> String {
    format!("blobs/{digest}/")
}

fn chunk_key(digest: &str, n: usize) -> String {
    format!("{}{n:06}", prefix(digest))
}

/// Copies the local blob `digest` into the store, chunk by chunk.
pub(crate) fn copy_in(
    store: &dyn KvStore,
    blobs: &BlobStore,
    digest: &str,
) -> Result<(), ControlError> {
    let bytes = blobs.read(digest).map_err(ControlError::internal)?;
    for txn in chunk_writes(digest, &bytes) {
        store.txn(txn)?;
    }
    Ok(())
}

/// The transactions that put module `digest`'s `bytes` into the store: one per chunk, each
/// a third of etcd's request limit. Whoever writes them writes the module's record after.
pub(crate) fn chunk_writes<'a>(digest: &'a str, bytes: &'a [u8]) -> impl Iterator<Item = Txn> + 'a {
    bytes
        .chunks(CHUNK)
        .enumerate()
        .map(move |(n, chunk)| Txn::new().then(Op::put(chunk_key(digest, n), chunk)))
}

impl ControlPlane {
    /// Makes sure this server's disk has module `digest` when modules are kept in the store:
    /// a node may ask any server for one another server took the upload of. A module with no
    /// record is left for the caller to find missing.
    pub(crate) async fn fetch_module(&self, digest: &str) -> Result<(), ControlError> {
        if !self.inner.config.shared_store || self.inner.blobs.contains(digest) {
            return Ok(());
        }
        let (cp, key) = (self.clone(), keys::module(digest));
        let module = tokio::task::spawn_blocking(move || cp.get::<Module>(&key))
            .await
            .map_err(ControlError::internal)??;
        match module {
            Some((module, _)) => {
                copy_out(
                    Arc::clone(&self.inner.store),
                    &self.inner.blobs,
                    digest,
                    module.size,
                )
                .await
            }
            None => Ok(()),
        }
    }
}

/// Fills the local blob store with `digest` from the store's chunks of a module of `size`
/// bytes. The bytes are hashed on the way in, so a damaged copy is refused.
async fn copy_out(
    store: Arc<dyn KvStore>,
    blobs: &BlobStore,
    digest: &str,
    size: u64,
) -> Result<(), ControlError> {
    let chunks = (size as usize).div_ceil(CHUNK);
    let wanted = digest.to_owned();
    let bytes = tokio::task::spawn_blocking(move || {
        (0..chunks)
            .map(|n| {
                let key = chunk_key(&wanted, n);
                store.get(&key)?.map(|kv| kv.value).ok_or_else(|| {
                    ControlError::internal(format!("module chunk {key} is missing from the store"))
                })
            })
            .collect::<Result<Vec<_>, ControlError>>()
    })
    .await
    .map_err(ControlError::internal)??;
    let stream = futures::stream::iter(
        bytes
            .into_iter()
            .map(|b| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(b))),
    );
    let put = blobs
        .put_stream(stream, size)
        .await
        .map_err(ControlError::internal)?;
    if put.digest != digest {
        if !put.existed {
            blobs.delete(&put.digest).map_err(ControlError::internal)?;
        }
        return Err(ControlError::internal(format!(
            "the store's copy of module {digest} hashes to {}",
            put.digest
        )));
    }
    Ok(())
}
