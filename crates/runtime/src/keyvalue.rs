//! `wasi:keyvalue` (store, atomics, batch; `0.2.0-draft`, as `wasmtime serve -Skeyvalue`
//! links it) over a [`KeyValue`] backend that the node provides: the cluster's store, reached
//! through the control plane. A guest opens only the buckets its replica was granted; any other
//! name is `access-denied`.

use std::sync::Arc;

use futures::future::BoxFuture;
use shoal_core::kv::{KvAnswer, KvOp};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable, ResourceTableError};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/keyvalue",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::KvFailure,
        },
    });
}

use generated::wasi::keyvalue::{atomics, batch, store};

/// Where a replica's `wasi:keyvalue` calls go: one bucket's operation at a time.
pub trait KeyValue: Send + Sync + 'static {
    fn call(&self, bucket: &str, op: KvOp) -> BoxFuture<'static, Result<KvAnswer, String>>;
}

/// What one replica may open, and where its calls go.
#[derive(Clone)]
pub struct KvGrant {
    pub backend: Arc<dyn KeyValue>,
    pub buckets: Vec<String>,
}

/// An open bucket, by name.
pub struct Bucket {
    name: String,
}

/// A failed call, as the guest sees it.
pub enum KvFailure {
    AccessDenied,
    Other(String),
}

impl From<ResourceTableError> for KvFailure {
    fn from(e: ResourceTableError) -> Self {
        KvFailure::Other(e.to_string())
    }
}

/// The store's part of a `Host` that `wasi:keyvalue` works on.
pub struct KvView<'a> {
    pub(crate) grant: Option<&'a KvGrant>,
    pub(crate) table: &'a mut ResourceTable,
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<_, HasKv>(linker, view)?;
    atomics::add_to_linker::<_, HasKv>(linker, view)?;
    batch::add_to_linker::<_, HasKv>(linker, view)?;
    Ok(())
}

impl KvView<'_> {
    async fn call(&mut self, bucket: &Resource<Bucket>, op: KvOp) -> Result<KvAnswer, KvFailure> {
        let name = self.table.get(bucket)?.name.clone();
        let Some(grant) = self.grant else {
            return Err(KvFailure::AccessDenied);
        };
        grant
            .backend
            .call(&name, op)
            .await
            .map_err(KvFailure::Other)
    }
}

fn unexpected(answer: KvAnswer) -> KvFailure {
    KvFailure::Other(format!("unexpected answer from the store: {answer:?}"))
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvFailure> {
        let granted = self.grant.is_some_and(|g| g.buckets.contains(&identifier));
        if !granted {
            return Err(KvFailure::AccessDenied);
        }
        Ok(self.table.push(Bucket { name: identifier })?)
    }

    fn convert_error(&mut self, err: KvFailure) -> wasmtime::Result<store::Error> {
        Ok(match err {
            KvFailure::AccessDenied => store::Error::AccessDenied,
            KvFailure::Other(m) => store::Error::Other(m),
        })
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvFailure> {
        match self.call(&bucket, KvOp::Get { keys: vec![key] }).await? {
            KvAnswer::Values { mut values } if values.len() == 1 => Ok(values.remove(0)),
            other => Err(unexpected(other)),
        }
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvFailure> {
        let entries = vec![(key, value)];
        shoal_core::kv::check_set(&entries).map_err(KvFailure::Other)?;
        let op = KvOp::Set { entries };
        match self.call(&bucket, op).await? {
            KvAnswer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvFailure> {
        match self.call(&bucket, KvOp::Delete { keys: vec![key] }).await? {
            KvAnswer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvFailure> {
        match self.call(&bucket, KvOp::Exists { key }).await? {
            KvAnswer::Exists { exists } => Ok(exists),
            other => Err(unexpected(other)),
        }
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvFailure> {
        match self.call(&bucket, KvOp::List { cursor }).await? {
            KvAnswer::Keys { keys, cursor } => Ok(store::KeyResponse { keys, cursor }),
            other => Err(unexpected(other)),
        }
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvFailure> {
        match self.call(&bucket, KvOp::Increment { key, delta }).await? {
            KvAnswer::Count { value } => Ok(value),
            other => Err(unexpected(other)),
        }
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvFailure> {
        let op = KvOp::Get { keys: keys.clone() };
        match self.call(&bucket, op).await? {
            KvAnswer::Values { values } if values.len() == keys.len() => Ok(keys
                .into_iter()
                .zip(values)
                .map(|(k, v)| v.map(|v| (k, v)))
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvFailure> {
        // Refused here as the control plane would refuse it, before it goes anywhere: too
        // big for a node's request, it would be refused for its size on the wire.
        shoal_core::kv::check_set(&key_values).map_err(KvFailure::Other)?;
        let op = KvOp::Set {
            entries: key_values,
        };
        match self.call(&bucket, op).await? {
            KvAnswer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvFailure> {
        match self.call(&bucket, KvOp::Delete { keys }).await? {
            KvAnswer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}
