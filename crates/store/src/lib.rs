//! Shoal's cluster state.
//!
//! [`KvStore`] is the etcd-shaped key-value surface callers use: one cluster-wide revision
//! counter, per-key create/mod revisions and versions, compare-and-swap transactions and watches
//! that can resume from a past revision; its doc comment is the contract a backend keeps.
//! [`Store`] implements it on top of redb (the same idea as k3s's kine); an etcd backend can be
//! slotted in later without touching callers that hold an `Arc<dyn KvStore>`.
//!
//! [`blobs::BlobStore`] keeps uploaded wasm modules on disk, addressed by their SHA-256.
//! [`ReadOnlyStore`] reads a store file without writing to it, for copying it elsewhere.
//!
//! # Blocking
//! redb does blocking file I/O (every acknowledged write is fsync'd), so the [`Store`] methods
//! are synchronous. Async callers should wrap them in `tokio::task::spawn_blocking` (or
//! `block_in_place` on a multi-threaded runtime). [`Watcher::next`] is async and does its own
//! log reads on the blocking pool.

mod backend;
pub mod blobs;
mod kv;
pub mod tables;
mod watch;

pub use backend::{CommitObserver, KvStore, WatchStream};
pub use blobs::{BlobError, BlobStore, PutBlob};
pub use kv::{ReadOnlyStore, Store, StoreOptions};
pub use watch::Watcher;

/// On a store that several servers share, each running server keeps a key under this
/// prefix, bound to a lease of its own: it goes within seconds of the server. Outside `/`, so
/// no watch or snapshot of the cluster's objects carries it.
pub const SERVERS_PREFIX: &str = "cluster/servers/";

/// One key as stored, with etcd's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (since its last delete).
    pub create_revision: u64,
    /// Revision of the last write to the key.
    pub mod_revision: u64,
    /// Number of puts since the key was (re)created; 1 after the first put.
    pub version: u64,
}

/// A guard of a [`Txn`]. All compares must hold for the success branch to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals `revision`; 0 means "the key is absent".
    ModRevision { key: String, revision: u64 },
    /// The key's `version` equals `version`; 0 means "the key is absent".
    Version { key: String, version: u64 },
}

/// A write inside a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Deletes every key starting with `prefix` (all keys if it is empty).
    DeletePrefix {
        prefix: String,
    },
}

/// An etcd-style transaction: if every compare holds, `success` runs, otherwise `failure`.
/// Either way all its writes share one new revision and commit atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    /// What every backend refuses before running it: an empty key in a compare or an op
    /// ([`StoreError::EmptyKey`]).
    pub fn validate(&self) -> Result<(), StoreError> {
        let compare_keys = self.compares.iter().map(|c| match c {
            Compare::ModRevision { key, .. } | Compare::Version { key, .. } => key,
        });
        let op_keys = self
            .success
            .iter()
            .chain(&self.failure)
            .filter_map(|op| match op {
                Op::Put { key, .. } | Op::Delete { key } => Some(key),
                Op::DeletePrefix { .. } => None,
            });
        if compare_keys.chain(op_keys).any(|k| k.is_empty()) {
            return Err(StoreError::EmptyKey);
        }
        Ok(())
    }

    /// Adds a guard: `key`'s mod revision must equal `revision` (0 = absent).
    pub fn when_mod_revision(mut self, key: impl Into<String>, revision: u64) -> Txn {
        self.compares.push(Compare::ModRevision {
            key: key.into(),
            revision,
        });
        self
    }

    /// Adds a guard: `key`'s version must equal `version` (0 = absent).
    pub fn when_version(mut self, key: impl Into<String>, version: u64) -> Txn {
        self.compares.push(Compare::Version {
            key: key.into(),
            version,
        });
        self
    }

    /// Adds a guard: `key` must not exist (create-if-absent).
    pub fn when_absent(self, key: impl Into<String>) -> Txn {
        self.when_version(key, 0)
    }

    /// Adds an op to the success branch.
    pub fn then(mut self, op: Op) -> Txn {
        self.success.push(op);
        self
    }

    /// Adds an op to the failure branch.
    pub fn otherwise(mut self, op: Op) -> Txn {
        self.failure.push(op);
        self
    }
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }

    pub fn delete_prefix(prefix: impl Into<String>) -> Op {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }
}

/// Outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The transaction's revision if it wrote anything, else the store's current revision.
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a [`Watcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The key after the change. For a delete: empty value, `create_revision` and `version` 0,
    /// `mod_revision` = the delete's revision (as etcd reports it).
    pub kv: KeyValue,
    /// The value before the change, if the key existed.
    pub prev_value: Option<Vec<u8>>,
}

/// Errors from [`Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested history was dropped by [`Store::compact`]; re-list and watch again.
    #[error("revision history up to {compacted} has been compacted away")]
    Compacted { compacted: u64 },
    #[error("revision {revision} is in the future (current revision is {current})")]
    FutureRevision { revision: u64, current: u64 },
    #[error("keys must not be empty")]
    EmptyKey,
    /// Another process has the store file open (redb's file lock): a running server.
    #[error("the store file is open in another process")]
    InUse,
    /// One write larger than the store takes at once (etcd's `--max-request-bytes`, 1.5 MiB
    /// unless configured): the writer's to make smaller, not the store's to fix.
    #[error("the write is larger than the store takes at once: {0}")]
    TooLarge(String),
    /// The store cannot be reached, or cannot serve now (etcd without a quorum): nothing to
    /// fix in the request, and perhaps nothing written; asking again later may work.
    #[error("the store does not answer now: {0}")]
    Unavailable(String),
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("store database error: {0}")]
    Db(String),
}

impl StoreError {
    /// Whether the store failed to write because its disk is full (ENOSPC), as an I/O error
    /// or inside redb's.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io(e) => {
                e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
            }
            StoreError::Db(message) => {
                message.contains("No space left on device") || message.contains("os error 28")
            }
            _ => false,
        }
    }

    /// The same error again, for each of several transactions that one failed commit held.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Compacted { compacted } => StoreError::Compacted {
                compacted: *compacted,
            },
            StoreError::FutureRevision { revision, current } => StoreError::FutureRevision {
                revision: *revision,
                current: *current,
            },
            StoreError::EmptyKey => StoreError::EmptyKey,
            StoreError::InUse => StoreError::InUse,
            StoreError::TooLarge(why) => StoreError::TooLarge(why.clone()),
            StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
            StoreError::Io(io) => StoreError::Io(std::io::Error::new(io.kind(), io.to_string())),
            StoreError::Db(message) => StoreError::Db(message.clone()),
        }
    }
}

/// Maps redb's error types into [`StoreError::Db`], keeping redb's readable message (a
/// `DatabaseError` of a locked file is [`StoreError::InUse`], below).
macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(e: $ty) -> StoreError {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> StoreError {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse,
            other => StoreError::Db(other.to_string()),
        }
    }
}
