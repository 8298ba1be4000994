//! Copying a redb state into a shared store (`shoal server migrate`): how a cluster that
//! started on `shoal up`'s embedded redb moves onto etcd, as k3s moves from SQLite to etcd.
//!
//! Every key is copied with its value byte for byte, and the bytes of every module the state
//! records go in as servers on a shared store keep them ([`shared_modules`]), chunks first, so
//! whoever reads a record finds its chunks. Revisions are not carried over (etcd numbers its
//! own writes): the keys go in key order, batch after batch, so the events, which are ordered
//! by the revision that created them and keyed in the order they were recorded, keep their
//! order. Nothing stored holds a store revision; nodes and watchers re-read the state after
//! their server restarts in any case.
//!
//! The copy only creates: every put is guarded on the key being absent, so a key the target
//! holds already stops it instead of being overwritten. Whoever calls it has made sure the
//! target is Shoal's and empty, and that no server uses either side.

use std::path::PathBuf;

use shoal_core::objects::keys;
use shoal_store::{BlobError, BlobStore, KeyValue, KvStore, Op, ReadOnlyStore, StoreError, Txn};

use crate::shared_modules;

/// Writes per transaction: etcd's default `--max-txn-ops`.
const MAX_OPS: usize = 128;

/// Bytes of keys and values per transaction, leaving room under etcd's default
/// `--max-request-bytes` (1.5 MiB) for the request's own framing.
const MAX_BYTES: usize = 1024 * 1024;

/// The largest key and value one request can carry to an etcd with default limits.
const LARGEST: usize = 1536 * 1024 - 4096;

/// Why a state could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The state records a module whose bytes are not in the blob directory beside it.
    #[error("module {digest} is recorded in the state but {} is missing", path.display())]
    MissingModule { digest: String, path: PathBuf },
    /// A key and value that no etcd request with default limits can carry.
    #[error("key {key} holds {bytes} bytes, more than etcd takes in one request ({LARGEST} bytes)")]
    TooLarge { key: String, bytes: usize },
    /// A key the copy was about to create exists in the target: someone else writes to it.
    #[error("key {0} appeared in the target during the copy: another writer is using it")]
    Exists(String),
    #[error("reading module {digest}: {source}")]
    Module { digest: String, source: BlobError },
    /// A write failed after `after` transactions had been written, which stay.
    #[error("writing to the target failed after {after} transactions: {source}")]
    Interrupted { after: usize, source: StoreError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`copy_state`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// The source's revision: the copy is the state as of it.
    pub revision: u64,
    pub keys: usize,
    /// Of the keys and their values together.
    pub key_bytes: u64,
    pub modules: usize,
    pub module_bytes: u64,
    /// Transactions written, each a revision of the target: module chunks and key batches.
    pub txns: usize,
    /// Apps copied whose record is too big to be applied again on an etcd with default
    /// limits, with its size: an apply writes it twice in one request (the app and its new
    /// revision), and etcd refuses that whole. They run, and scale; a change needs them smaller.
    pub too_big_to_apply: Vec<(String, usize)>,
}

/// Copies the state in `source`, and the modules it records from `blobs`, into `target`.
/// Everything that could refuse the copy (a missing module, an oversized key) is checked
/// before anything is written.
pub fn copy_state(
    source: &ReadOnlyStore,
    blobs: &BlobStore,
    target: &dyn KvStore,
) -> Result<Copied, MigrateError> {
    let (kvs, revision) = source.range("")?;
    let mut digests = Vec::new();
    let mut too_big = Vec::new();
    for kv in &kvs {
        let bytes = kv.key.len() + kv.value.len();
        if bytes > LARGEST {
            return Err(MigrateError::TooLarge {
                key: kv.key.clone(),
                bytes,
            });
        }
        if kv.key.starts_with(keys::APPS.as_str()) && 2 * bytes > LARGEST {
            too_big.push((kv.key.clone(), bytes));
        }
        if let Some(digest) = kv.key.strip_prefix(keys::MODULES.as_str()) {
            if !blobs.contains(digest) {
                return Err(MigrateError::MissingModule {
                    digest: digest.to_owned(),
                    path: blobs.path(digest),
                });
            }
            digests.push(digest);
        }
    }
    let mut copied = Copied {
        revision,
        too_big_to_apply: too_big,
        ..Copied::default()
    };
    for digest in digests {
        let bytes = blobs.read(digest).map_err(|source| MigrateError::Module {
            digest: digest.to_owned(),
            source,
        })?;
        for txn in shared_modules::chunk_writes(digest, &bytes) {
            write(target, txn, copied.txns)?;
            copied.txns += 1;
        }
        copied.modules += 1;
        copied.module_bytes += bytes.len() as u64;
    }
    for batch in batches(&kvs) {
        let first = batch[0].key.clone();
        let txn = batch.iter().fold(Txn::new(), |txn, kv| {
            txn.when_absent(kv.key.clone())
                .then(Op::put(kv.key.clone(), kv.value.clone()))
        });
        if !write(target, txn, copied.txns)? {
            return Err(MigrateError::Exists(first));
        }
        copied.txns += 1;
        copied.keys += batch.len();
        copied.key_bytes += batch
            .iter()
            .map(|kv| (kv.key.len() + kv.value.len()) as u64)
            .sum::<u64>();
    }
    Ok(copied)
}

/// Runs `txn` on `target`, the `after`-th write of the copy; whether its compares held.
fn write(target: &dyn KvStore, txn: Txn, after: usize) -> Result<bool, MigrateError> {
    target
        .txn(txn)
        .map(|done| done.succeeded)
        .map_err(|source| MigrateError::Interrupted { after, source })
}

/// `kvs` cut, in order, into runs that fit one etcd transaction each: at most [`MAX_OPS`]
/// keys and [`MAX_BYTES`] (each key counted twice, for its put and its guard); a key bigger
/// than that goes alone.
fn batches(kvs: &[KeyValue]) -> Vec<&[KeyValue]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, kv) in kvs.iter().enumerate() {
        let size = 2 * kv.key.len() + kv.value.len();
        if i > start && (i - start == MAX_OPS || bytes + size > MAX_BYTES) {
            out.push(&kvs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < kvs.len() {
        out.push(&kvs[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_store::Store;

    fn kv(key: &str, value_len: usize) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: vec![7; value_len],
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        }
    }

    #[test]
    fn batches_keep_to_etcds_op_count_and_request_size_in_key_order() {
        let many: Vec<KeyValue> = (0..300).map(|i| kv(&format!("/k/{i:03}"), 10)).collect();
        let cut = batches(&many);
        assert_eq!(
            cut.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [128, 128, 44]
        );
        assert_eq!(cut.concat(), many, "every key once, in order");

        let big = vec![kv("/a", 600_000), kv("/b", 600_000), kv("/c", 1_200_000)];
        let cut = batches(&big);
        assert_eq!(cut.iter().map(|b| b.len()).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(batches(&[]).is_empty());
    }

    /// A redb state in a temp dir recording one module, `module`, whose bytes are in the blob
    /// store beside it: the dir, the state's path, the blobs and the module's digest.
    fn source_with_module(module: &[u8]) -> (tempfile::TempDir, PathBuf, BlobStore, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let blobs = BlobStore::open(&dir.path().join("modules")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let bytes = bytes::Bytes::from(module.to_vec());
        let digest = rt
            .block_on(blobs.put_stream(
                futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes)]),
                u64::MAX,
            ))
            .unwrap()
            .digest;
        Store::open(&path)
            .unwrap()
            .put(keys::module(&digest).as_str(), b"{}".to_vec())
            .unwrap();
        (dir, path, blobs, digest)
    }

    /// A state with a module copied into another store, then again into the same one: every
    /// key arrives byte for byte and the chunks read back as the module; the second copy is
    /// stopped by the first key it finds there, and the source file is not changed.
    #[test]
    fn a_copy_carries_every_key_and_module_and_never_overwrites() {
        let module = vec![3u8; 1_300_000];
        let (dir, path, blobs, digest) = source_with_module(&module);
        {
            let store = Store::open(&path).unwrap();
            for i in 0..199 {
                store
                    .put(&format!("/apps/default/a{i:03}"), vec![i as u8; 100])
                    .unwrap();
            }
            // One that fits one etcd request, but not twice in one as an apply sends it.
            store.put("/apps/default/big", vec![1; 800 * 1024]).unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let source = ReadOnlyStore::open(&path).unwrap();
        let target = Store::open(&dir.path().join("target.redb")).unwrap();

        let copied = copy_state(&source, &blobs, &target).unwrap();
        assert_eq!(copied.revision, 201);
        assert_eq!((copied.keys, copied.modules), (201, 1));
        assert_eq!(copied.module_bytes, module.len() as u64);
        assert_eq!(copied.txns, 3 + 2, "three chunks, two batches of keys");
        assert_eq!(
            copied.too_big_to_apply,
            [(
                "/apps/default/big".to_string(),
                "/apps/default/big".len() + 800 * 1024
            )]
        );
        let (from, _) = source.range("").unwrap();
        let (to, _) = target.range("/").unwrap();
        let pairs = |kvs: &[KeyValue]| {
            kvs.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(pairs(&to), pairs(&from));
        let (chunks, _) = target.range(&shared_modules::prefix(&digest)).unwrap();
        let stored: Vec<u8> = chunks.into_iter().flat_map(|kv| kv.value).collect();
        assert_eq!(stored, module);

        let again = copy_state(&source, &blobs, &target).unwrap_err();
        assert!(
            matches!(&again, MigrateError::Exists(k) if k == "/apps/default/a000"),
            "{again}"
        );
        drop(source);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the source is unchanged"
        );
    }

    /// A held file is refused as in use, and a module without its bytes before anything is
    /// written.
    #[test]
    fn a_store_in_use_and_a_missing_module_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).unwrap();
        store
            .put(
                keys::module(&format!("sha256:{}", "ab".repeat(32))).as_str(),
                vec![],
            )
            .unwrap();
        assert!(matches!(ReadOnlyStore::open(&path), Err(StoreError::InUse)));
        drop(store);

        let source = ReadOnlyStore::open(&path).unwrap();
        let blobs = BlobStore::at(&dir.path().join("modules"));
        let target = Store::open(&dir.path().join("target.redb")).unwrap();
        let e = copy_state(&source, &blobs, &target).unwrap_err();
        assert!(matches!(e, MigrateError::MissingModule { .. }), "{e}");
        assert_eq!(target.revision(), 0, "nothing written");
    }

    /// Into a real etcd with its default limits: more keys than one transaction takes, more
    /// bytes than one request carries, a value as big as one request can carry and a module
    /// of several chunks all arrive, and read back as they were.
    #[test]
    fn a_copy_into_etcd_keeps_within_its_limits() {
        let etcd = shoal_etcd::testing::EtcdCluster::single();
        let module: Vec<u8> = (0..1_300_000u32).map(|i| i as u8).collect();
        let (_dir, path, blobs, digest) = source_with_module(&module);
        {
            let store = Store::open(&path).unwrap();
            let biggest = "/kv/default/big/one";
            store
                .put(biggest, vec![1; LARGEST - biggest.len()])
                .unwrap();
            let txn = (0..1000).fold(Txn::new(), |txn, i| {
                txn.then(Op::put(
                    format!("/kv/default/many/{i:04}"),
                    vec![i as u8; 3000],
                ))
            });
            store.txn(txn).unwrap();
        }
        let source = ReadOnlyStore::open(&path).unwrap();
        let target = shoal_etcd::EtcdStore::connect(&etcd.config()).unwrap();

        let copied = copy_state(&source, &blobs, &target).unwrap();
        assert_eq!(copied.keys, 1002);
        let (from, _) = source.range("").unwrap();
        let (to, _) = target.range("/").unwrap();
        assert_eq!(to.len(), from.len());
        assert!(
            from.iter()
                .zip(&to)
                .all(|(a, b)| a.key == b.key && a.value == b.value)
        );
        let (chunks, _) = target.range(&shared_modules::prefix(&digest)).unwrap();
        assert_eq!(chunks.len(), 3);
        let stored: Vec<u8> = chunks.into_iter().flat_map(|kv| kv.value).collect();
        assert_eq!(stored, module);
    }
}
