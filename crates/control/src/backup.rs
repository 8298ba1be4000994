//! Backups of a control plane's state (`shoal backup`, `shoal server restore`), as Nomad's
//! `operator snapshot save` and k3s's `etcd-snapshot`: taken from a running server through its
//! API, restored into the data dir of a stopped one.
//!
//! A backup is a tar file: `backup.json` (the [`Manifest`]) first, then `state.bin`, every key
//! of the state at one revision with its value byte for byte, then the bytes of every module
//! the state records, `modules/sha256/<hex>`. Its own format rather than a copy of redb's file:
//! it restores into a later Shoal whatever its store's file format, and a server on etcd backs
//! up the same way (its modules come whole from its blob cache; the store's chunks of them are
//! left out). A restore writes a redb state; `shoal server migrate` takes that on to etcd.
//!
//! Not in it: the data dir's keys and tokens (`token`, `join-token`, `ca.pem`, `ca-key.pem`,
//! `secret.key`), which a restored state needs beside it, as Kubernetes keeps its PKI apart
//! from etcd's snapshots, nor a shared store's join token (held there in clear). Secrets stay
//! sealed with `secret.key`, and a shared store's `cluster/identity` under the admin token: a
//! backup shows no secret.

use std::collections::BTreeSet;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::EventType;
use shoal_core::objects::keys;
use shoal_store::{BlobError, BlobStore, KeyValue, Op, Store, StoreError, Txn};

use crate::error::ControlError;
use crate::state::{ControlPlane, blocking};

/// The format this Shoal writes, and the newest it reads.
pub const FORMAT: u32 = 1;

/// The etcd backend's leader key (`shoal_etcd::LEADER_KEY`): a lease of whichever server
/// leads now, which a restored cluster must elect afresh.
pub(crate) const LEADER_KEY: &str = "/leader";

/// Keys written per transaction when restoring.
const BATCH: usize = 1000;

/// What a backup holds, its first entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The Shoal that wrote it.
    pub version: String,
    /// The store's revision the state is taken at.
    pub revision: u64,
    /// When it was taken, milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub keys: usize,
    pub modules: usize,
    /// Of the modules together.
    pub module_bytes: u64,
    /// SHA-256 of `state.bin`, hex: the modules are checked against their digests, the state
    /// against this.
    pub state_sha256: String,
}

/// Why a backup could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "{} holds a state already: restore into a data dir without one (a new one, or this one with state.redb moved away)",
        .0.display()
    )]
    Occupied(PathBuf),
    #[error("not a Shoal backup: {0}")]
    Malformed(String),
    #[error(
        "the backup is of format {0}, newer than this Shoal reads ({FORMAT}): restore it with the Shoal that wrote it or a later one"
    )]
    Unsupported(u32),
    #[error("module {0} is recorded in the state but its bytes are missing")]
    MissingModule(String),
    #[error("the bytes of {0} do not match its digest: the backup is damaged")]
    Damaged(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The control plane could not read what goes in (the store does not answer, say).
    #[error(transparent)]
    Control(ControlError),
}

/// Whether `key` goes into a backup: not a shared store's module chunks (the modules go in
/// whole), its leader's lease, or its join token (kept in clear, and a backup is copied
/// about; a server puts the one of its data dir when the store has none).
fn kept(key: &str) -> bool {
    !key.starts_with("blobs/") && key != LEADER_KEY && key != crate::nodes::SHARED_JOIN_TOKEN
}

impl ControlPlane {
    /// A backup of the state as it is now (`GET /v1/backup`): an unnamed temp file, read from
    /// its start, and what it holds. The state is read at one revision; writes go on meanwhile.
    pub(crate) async fn backup(&self) -> Result<(std::fs::File, Manifest), ControlError> {
        let tmp = self.inner.blobs.temp_dir();
        self.backup_to(&|| tempfile::tempfile_in(&tmp)).await
    }

    /// A backup written into the empty file `open` gives, which is read from its start.
    async fn backup_to(
        &self,
        open: &(dyn Fn() -> std::io::Result<std::fs::File> + Sync),
    ) -> Result<(std::fs::File, Manifest), ControlError> {
        match self.backup_once(open).await {
            // The module collector took a module between the read and its copy: the next
            // read no longer names it.
            Err(BackupError::MissingModule(digest)) => {
                tracing::info!(%digest, "a module went during the backup; taking it again");
                self.backup_once(open).await.map_err(said)
            }
            taken => taken.map_err(said),
        }
    }

    async fn backup_once(
        &self,
        open: &(dyn Fn() -> std::io::Result<std::fs::File> + Sync),
    ) -> Result<(std::fs::File, Manifest), BackupError> {
        let store = Arc::clone(&self.inner.store);
        // The state under `/`, and the cluster's identity a shared store keeps under
        // `cluster/` (sealed under the admin token); not a shared store's join token (in
        // clear), module chunks (`blobs/`, read whole from the blob cache instead of into
        // memory here) or reports in flight (`reports/`).
        let (kvs, revision) = blocking(move || {
            let (mut kvs, revision) = store.range("/")?;
            kvs.extend(store.range("cluster/")?.0);
            Ok((kvs, revision))
        })
        .await
        .map_err(BackupError::Control)?;
        // A server on a shared store may not have every module on its disk yet.
        for digest in kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::MODULES.as_str()))
        {
            self.fetch_module(digest)
                .await
                .map_err(BackupError::Control)?;
        }
        let blobs = self.inner.blobs.clone();
        let mut file = open()?;
        tokio::task::spawn_blocking(move || {
            let manifest = write(&kvs, revision, &blobs, std::io::BufWriter::new(&mut file))?;
            file.rewind()?;
            tracing::info!(
                revision,
                keys = manifest.keys,
                modules = manifest.modules,
                "backup taken"
            );
            Ok((file, manifest))
        })
        .await
        .map_err(|e| BackupError::Control(ControlError::internal(e)))?
    }
}

/// A backup's failure as the API answers it: the control plane's own as it is (a store that
/// does not answer is 503), any other as internal (logged).
fn said(e: BackupError) -> ControlError {
    match e {
        BackupError::Control(e) => e,
        other => ControlError::internal(other),
    }
}

/// Backups the control plane takes by itself (`--backup-every`, `--backups-kept`), as k3s
/// snapshots etcd every 12 hours and keeps five.
#[derive(Debug, Clone)]
pub struct BackupSchedule {
    /// Where they go: `shoal-<UTC time>.tar` files, nothing else touched.
    pub dir: PathBuf,
    pub every: Duration,
    /// The newest this many are kept.
    pub keep: usize,
}

impl ControlPlane {
    /// Takes a backup every `schedule.every` (the first one that long after the newest one
    /// in its directory, or after the start), for ever, each recorded as an event, `BackedUp` or `BackupFailed`. Runs where the
    /// controller does: one server of several takes them.
    pub async fn run_backups(self, schedule: BackupSchedule) {
        let start = tokio::time::Instant::now() + first_due(&schedule);
        let mut tick = tokio::time::interval_at(start, schedule.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (kind, reason, message) = match self.scheduled_backup(&schedule).await {
                Ok((file, m)) => {
                    tracing::info!(file = %file.display(), revision = m.revision, "scheduled backup written");
                    (
                        EventType::Normal,
                        "BackedUp",
                        format!(
                            "backup of revision {} written to {} ({} keys, {} modules)",
                            m.revision,
                            file.display(),
                            m.keys,
                            m.modules
                        ),
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, dir = %schedule.dir.display(), "scheduled backup failed");
                    (
                        EventType::Warning,
                        "BackupFailed",
                        format!(
                            "the scheduled backup into {} failed: {e}",
                            schedule.dir.display()
                        ),
                    )
                }
            };
            let event = self.event_op(kind, reason, "cluster".into(), None, message);
            let store = Arc::clone(&self.inner.store);
            if let Err(e) = blocking(move || Ok(store.txn(Txn::new().then(event))?)).await {
                tracing::warn!(error = %e, "cannot record the backup's event");
            }
        }
    }

    /// One scheduled backup, written into `schedule.dir` and the oldest past `keep` removed.
    /// Its error is the event's reason: a file system's error is said, not only logged, as no
    /// caller's request is there to be answered instead.
    async fn scheduled_backup(
        &self,
        schedule: &BackupSchedule,
    ) -> Result<(PathBuf, Manifest), String> {
        let io = |e: std::io::Error| format!("{}: {e}", schedule.dir.display());
        let (dir, keep) = (schedule.dir.clone(), schedule.keep);
        let names = move || -> Vec<String> {
            std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&schedule.dir)
                .map_err(io)?;
        }
        // Whole copies of the state a crash left half written.
        for left in names().iter().filter(|n| n.starts_with(".tmp")) {
            if let Err(e) = std::fs::remove_file(schedule.dir.join(left)) {
                tracing::warn!(file = left, error = %e, "cannot remove a backup left half written");
            }
        }
        // Written in place, beside its name, and renamed to it once whole.
        let temp = tempfile::NamedTempFile::new_in(&schedule.dir).map_err(io)?;
        let (taken, manifest) = self
            .backup_to(&|| {
                let file = temp.reopen()?;
                file.set_len(0)?;
                Ok(file)
            })
            .await
            .map_err(|e| e.to_string())?;
        let name = scheduled_name(std::time::SystemTime::now());
        let dir = schedule.dir.clone();
        let file = dir.join(&name);
        let written = tokio::task::spawn_blocking(move || {
            let io = |e: std::io::Error| format!("{}: {e}", dir.display());
            taken.sync_all().map_err(io)?;
            temp.persist(&file).map_err(|e| io(e.error))?;
            for gone in pruned(names(), &name, keep) {
                if let Err(e) = std::fs::remove_file(dir.join(&gone)) {
                    tracing::warn!(file = gone, error = %e, "cannot remove an old backup");
                }
            }
            Ok((file, manifest))
        })
        .await;
        written.map_err(|e| e.to_string())?
    }
}

/// How long after the start the first scheduled backup is due: `every` after the newest one
/// in the directory, so that a server restarted (or a leadership moved) more often than that
/// still takes them.
fn first_due(schedule: &BackupSchedule) -> Duration {
    let newest = std::fs::read_dir(&schedule.dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_scheduled))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    let age = newest.and_then(|t| t.elapsed().ok());
    match age {
        Some(age) => schedule.every.saturating_sub(age),
        None => schedule.every,
    }
}

/// The scheduled backups among `names` to remove so that `keep` stay: the newest by name,
/// and always `written`, the one just written (a clock set back makes it sort first).
/// Nothing but scheduled backups' names is touched.
fn pruned(mut names: Vec<String>, written: &str, keep: usize) -> Vec<String> {
    names.retain(|n| is_scheduled(n) && n != written);
    names.sort();
    let old = names.len().saturating_sub(keep.saturating_sub(1));
    names.truncate(old);
    names
}

/// Whether `name` is one [`scheduled_name`] makes.
fn is_scheduled(name: &str) -> bool {
    let Some(stamp) = name
        .strip_prefix("shoal-")
        .and_then(|n| n.strip_suffix("Z.tar"))
    else {
        return false;
    };
    stamp.len() == 15
        && stamp
            .char_indices()
            .all(|(i, c)| if i == 8 { c == 'T' } else { c.is_ascii_digit() })
}

/// `shoal-20261204T071758Z.tar`: sorts by time, and has no `:` to trip a shell or a copy.
fn scheduled_name(at: std::time::SystemTime) -> String {
    let stamp: String = humantime::format_rfc3339_seconds(at)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    format!("shoal-{stamp}.tar")
}

/// Writes the backup of `kvs`, the state at `revision`, and of the modules it records, read
/// from `blobs`, to `out`. Every module must be in `blobs`.
pub fn write(
    kvs: &[KeyValue],
    revision: u64,
    blobs: &BlobStore,
    out: impl Write,
) -> Result<Manifest, BackupError> {
    let kvs: Vec<&KeyValue> = kvs.iter().filter(|kv| kept(&kv.key)).collect();
    let digests: Vec<&str> = kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::MODULES.as_str()))
        .collect();
    let mut module_bytes = 0;
    for digest in &digests {
        let path = blobs.try_path(digest)?;
        match std::fs::metadata(&path) {
            Ok(meta) => module_bytes += meta.len(),
            Err(_) => return Err(BackupError::MissingModule(digest.to_string())),
        }
    }
    let mut state = Vec::new();
    for kv in &kvs {
        state.extend_from_slice(&len32(kv.key.len())?.to_le_bytes());
        state.extend_from_slice(&len32(kv.value.len())?.to_le_bytes());
        state.extend_from_slice(kv.key.as_bytes());
        state.extend_from_slice(&kv.value);
    }
    let manifest = Manifest {
        format: FORMAT,
        version: env!("CARGO_PKG_VERSION").to_string(),
        revision,
        created_ms: shoal_core::clock::now_ms(),
        keys: kvs.len(),
        modules: digests.len(),
        module_bytes,
        state_sha256: sha256_hex(&state),
    };
    let mut tar = tar::Builder::new(out);
    let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    append(&mut tar, "backup.json", &json)?;
    append(&mut tar, "state.bin", &state)?;
    for digest in digests {
        let mut file = std::fs::File::open(blobs.try_path(digest)?)?;
        tar.append_file(module_entry(digest), &mut file)?;
    }
    tar.into_inner()?.flush()?;
    Ok(manifest)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn len32(n: usize) -> Result<u32, BackupError> {
    u32::try_from(n).map_err(|_| BackupError::Malformed(format!("a key or value of {n} bytes")))
}

/// A module's entry: `modules/sha256/<hex>`.
fn module_entry(digest: &str) -> String {
    format!("modules/{}", digest.replacen(':', "/", 1))
}

fn append(tar: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(shoal_core::clock::now_ms() / 1000);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)?;
    Ok(())
}

/// What [`restore`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub manifest: Manifest,
    /// Modules whose bytes the blob store did not have yet.
    pub modules_written: usize,
}

/// Restores the backup read from `input` into data dir `data`: its state as `state.redb`,
/// its modules into `modules/`. A data dir with a state is refused. The state file appears
/// only once all of it is written and every module it records is in place, so a restore
/// that fails leaves no state behind (modules it wrote stay, content-addressed).
pub fn restore(input: impl Read, data: &Path) -> Result<Restored, BackupError> {
    let target = data.join("state.redb");
    if target.exists() {
        return Err(BackupError::Occupied(target));
    }
    // `shoal backup - | gzip` is how its help suggests compressing one.
    let mut input = std::io::BufReader::new(input);
    if std::io::BufRead::fill_buf(&mut input)?.starts_with(&[0x1f, 0x8b]) {
        return Err(BackupError::Malformed(
            "it is gzip-compressed: restore it with `gunzip -c FILE | shoal server restore - --data-dir DIR`".into(),
        ));
    }
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries()?;
    let manifest: Manifest = {
        let mut first = entries
            .next()
            .ok_or_else(|| BackupError::Malformed("an empty archive".into()))??;
        if first.path()?.as_os_str() != "backup.json" {
            return Err(BackupError::Malformed(
                "its first entry is not backup.json".into(),
            ));
        }
        let mut json = Vec::new();
        first.by_ref().take(1 << 20).read_to_end(&mut json)?;
        serde_json::from_slice(&json)
            .map_err(|e| BackupError::Malformed(format!("backup.json: {e}")))?
    };
    if manifest.format > FORMAT {
        return Err(BackupError::Unsupported(manifest.format));
    }
    let blobs = BlobStore::open(&data.join("modules"))?;
    let mut state = None;
    let mut modules = BTreeSet::new();
    let mut modules_written = 0;
    for entry in entries {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        if name == "state.bin" {
            if sha256_hex(&bytes) != manifest.state_sha256 {
                return Err(BackupError::Damaged(name));
            }
            state = Some(parse_state(&bytes)?);
        } else if let Some(hex) = name.strip_prefix("modules/sha256/") {
            let named = format!("sha256:{hex}");
            let put = blobs.put(&bytes)?;
            if put.digest != named {
                if !put.existed {
                    blobs.delete(&put.digest)?;
                }
                return Err(BackupError::Damaged(name));
            }
            modules_written += usize::from(!put.existed);
            modules.insert(named);
        } else {
            return Err(BackupError::Malformed(format!("an unknown entry {name}")));
        }
    }
    let kvs = state.ok_or_else(|| BackupError::Malformed("no state.bin".into()))?;
    if kvs.len() != manifest.keys {
        return Err(BackupError::Malformed(format!(
            "state.bin holds {} keys, backup.json says {}",
            kvs.len(),
            manifest.keys
        )));
    }
    for (key, _) in &kvs {
        if let Some(digest) = key.strip_prefix(keys::MODULES.as_str())
            && !modules.contains(digest)
            && !blobs.contains(digest)
        {
            return Err(BackupError::MissingModule(digest.to_string()));
        }
    }
    let staging = data.join("state.redb.restoring");
    // What an interrupted restore left.
    match std::fs::remove_file(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    {
        let store = Store::open(&staging)?;
        for batch in kvs.chunks(BATCH) {
            let txn = batch.iter().fold(Txn::new(), |txn, (key, value)| {
                txn.then(Op::put(key.clone(), value.clone()))
            });
            store.txn(txn)?;
        }
    }
    // Private from the start, as a server keeps it: it holds sealed secrets and tokens' hashes.
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    // A link, not a rename: it fails where a state appeared meanwhile (a server started on
    // this data dir) instead of replacing it.
    let linked = std::fs::hard_link(&staging, &target);
    std::fs::remove_file(&staging)?;
    match linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(BackupError::Occupied(target));
        }
        linked => linked?,
    }
    std::fs::File::open(data)?.sync_all()?;
    Ok(Restored {
        manifest,
        modules_written,
    })
}

/// The keys and values of `state.bin`.
fn parse_state(mut bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    let cut = || BackupError::Malformed("state.bin is cut short".into());
    let mut kvs = Vec::new();
    while !bytes.is_empty() {
        let (lens, rest) = bytes.split_at_checked(8).ok_or_else(cut)?;
        let key_len = u32::from_le_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
        let value_len = u32::from_le_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
        let (key, rest) = rest.split_at_checked(key_len).ok_or_else(cut)?;
        let (value, rest) = rest.split_at_checked(value_len).ok_or_else(cut)?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| {
            BackupError::Malformed("state.bin holds a key that is not UTF-8".into())
        })?;
        kvs.push((key, value.to_vec()));
        bytes = rest;
    }
    Ok(kvs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_store::ReadOnlyStore;

    #[test]
    fn the_leader_key_is_the_etcd_backends() {
        assert_eq!(LEADER_KEY, shoal_etcd::LEADER_KEY);
    }

    /// A store with a module record and two other keys (one of them binary), the module's
    /// bytes in a blob store beside it, a shared store's chunk, leader and join token keys.
    fn source() -> (tempfile::TempDir, Vec<KeyValue>, u64, BlobStore, String) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&dir.path().join("modules")).unwrap();
        let digest = blobs.put(b"\0asm module bytes").unwrap().digest;
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        for (key, value) in [
            (
                format!("{}{digest}", keys::MODULES.as_str()),
                b"{}".to_vec(),
            ),
            ("/apps/default/hello".to_string(), b"{\"a\":1}".to_vec()),
            ("/kv/default/b/k".to_string(), vec![0, 159, 255]),
            (format!("blobs/{digest}/000000"), b"chunk".to_vec()),
            (LEADER_KEY.to_string(), b"server-1".to_vec()),
            (
                crate::nodes::SHARED_JOIN_TOKEN.to_string(),
                b"join-in-clear".to_vec(),
            ),
        ] {
            store.put(&key, value).unwrap();
        }
        let (kvs, revision) = store.range("").unwrap();
        (dir, kvs, revision, blobs, digest)
    }

    #[test]
    fn a_backup_restores_every_key_and_module_but_chunks_the_leader_and_the_join_token() {
        let (_src, kvs, revision, blobs, digest) = source();
        let mut tar = Vec::new();
        let manifest = write(&kvs, revision, &blobs, &mut tar).unwrap();
        assert_eq!((manifest.keys, manifest.modules), (3, 1));
        assert_eq!(manifest.revision, revision);

        let data = tempfile::tempdir().unwrap();
        let restored = restore(tar.as_slice(), data.path()).unwrap();
        assert_eq!(restored.manifest, manifest);
        assert_eq!(restored.modules_written, 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(data.path().join("state.redb"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the state is private: {mode:o}");
        let (back, _) = ReadOnlyStore::open(&data.path().join("state.redb"))
            .unwrap()
            .range("")
            .unwrap();
        let pairs = |kvs: &[KeyValue]| -> Vec<(String, Vec<u8>)> {
            kvs.iter()
                .filter(|kv| kept(&kv.key))
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect()
        };
        assert_eq!(pairs(&back), pairs(&kvs));
        assert_eq!(back.len(), 3, "no chunk, no leader, no join token");
        assert!(!tar.windows(13).any(|w| w == b"join-in-clear"));
        let restored_blobs = BlobStore::at(&data.path().join("modules"));
        assert_eq!(restored_blobs.read(&digest).unwrap(), b"\0asm module bytes");

        // Once restored, the data dir is taken.
        let again = restore(tar.as_slice(), data.path()).unwrap_err();
        assert!(matches!(again, BackupError::Occupied(_)), "{again}");
    }

    #[test]
    fn a_damaged_or_foreign_backup_is_refused_and_leaves_no_state() {
        let (_src, kvs, revision, blobs, _) = source();
        let mut tar = Vec::new();
        write(&kvs, revision, &blobs, &mut tar).unwrap();

        // A module's bytes changed on the way.
        let at = tar
            .windows(b"module bytes".len())
            .position(|w| w == b"module bytes")
            .unwrap();
        let mut damaged = tar.clone();
        damaged[at] ^= 1;
        let data = tempfile::tempdir().unwrap();
        let e = restore(damaged.as_slice(), data.path()).unwrap_err();
        assert!(matches!(e, BackupError::Damaged(_)), "{e}");
        assert!(!data.path().join("state.redb").exists());

        // A byte of the state changed on the way.
        let at = tar
            .windows(b"/apps/default/hello".len())
            .position(|w| w == b"/apps/default/hello")
            .unwrap();
        let mut damaged = tar.clone();
        damaged[at + 1] = b'b';
        let e = restore(damaged.as_slice(), data.path()).unwrap_err();
        assert!(
            matches!(e, BackupError::Damaged(ref n) if n == "state.bin"),
            "{e}"
        );
        assert!(!data.path().join("state.redb").exists());

        // Cut before its modules: the state names one it lacks.
        let mut cut = tar::Builder::new(Vec::new());
        let mut archive = tar::Archive::new(tar.as_slice());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().starts_with("modules") {
                continue;
            }
            let mut header = entry.header().clone();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            cut.append_data(&mut header, entry.path().unwrap(), bytes.as_slice())
                .unwrap();
        }
        let cut = cut.into_inner().unwrap();
        let e = restore(cut.as_slice(), tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(matches!(e, BackupError::MissingModule(_)), "{e}");

        // Not a backup at all, and one from a later Shoal.
        let e = restore(&b"not a tar"[..], data.path()).unwrap_err();
        assert!(
            matches!(e, BackupError::Io(_) | BackupError::Malformed(_)),
            "{e}"
        );
        let mut later = tar::Builder::new(Vec::new());
        let manifest = serde_json::json!({
            "format": FORMAT + 1, "version": "9.0.0", "revision": 1, "created_ms": 0,
            "keys": 0, "modules": 0, "module_bytes": 0, "state_sha256": ""
        });
        append(&mut later, "backup.json", manifest.to_string().as_bytes()).unwrap();
        let later = later.into_inner().unwrap();
        let e = restore(later.as_slice(), data.path()).unwrap_err();
        assert!(matches!(e, BackupError::Unsupported(2)), "{e}");
        assert!(!data.path().join("state.redb").exists());
    }

    /// A gzip-compressed backup is named as such, not as a tar that does not parse.
    #[test]
    fn a_gzipped_backup_is_refused_as_one() {
        let data = tempfile::tempdir().unwrap();
        let gzipped: &[u8] = &[0x1f, 0x8b, 0x08, 0x00, 0x00];
        let e = restore(gzipped, data.path()).unwrap_err().to_string();
        assert!(
            e.contains("gzip-compressed") && e.contains("gunzip -c"),
            "{e}"
        );
        assert!(!data.path().join("state.redb").exists());
    }

    /// A store that does not answer makes a backup a 503, as any other request, not an
    /// internal error; the backup's own failures stay internal.
    #[test]
    fn a_backup_the_store_cannot_serve_now_is_unavailable() {
        let down = ControlError::Unavailable("the store does not answer now".into());
        assert!(matches!(
            said(BackupError::Control(down)),
            ControlError::Unavailable(m) if m.contains("does not answer")
        ));
        assert!(matches!(
            said(BackupError::Malformed("x".into())),
            ControlError::Internal
        ));
    }

    /// A scheduled backup that cannot be written says why (its event's reason), not only
    /// that something failed.
    #[tokio::test]
    async fn a_scheduled_backup_that_fails_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let cp = crate::state::tests::control_plane(dir.path());
        let backups = dir.path().join("backups");
        std::fs::write(&backups, "a file where the directory goes").unwrap();
        let schedule = BackupSchedule {
            dir: backups.clone(),
            every: Duration::from_secs(3600),
            keep: 2,
        };
        let e = cp.scheduled_backup(&schedule).await.unwrap_err();
        assert!(e.starts_with(&backups.display().to_string()), "{e}");
        assert!(e.contains("os error"), "{e}");
    }

    #[test]
    fn scheduled_backups_are_named_to_sort_by_time() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_796_368_678);
        assert_eq!(scheduled_name(at), "shoal-20261204T071758Z.tar");
        assert!(is_scheduled(&scheduled_name(at)));
        for other in [
            "shoal-2026-12-04.tar",
            "shoal-20261204X071758Z.tar",
            "shoal-20261204T071758Z.tar.gz",
            ".tmpAbc",
            "notes.txt",
        ] {
            assert!(!is_scheduled(other), "{other}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_one_just_written_and_nothing_else_is_touched() {
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let dir = names(&[
            "shoal-20261201T000000Z.tar",
            "shoal-20261202T000000Z.tar",
            "shoal-20261203T000000Z.tar",
            "shoal-20261204T000000Z.tar",
            "shoal-manual.tar",
            "notes.txt",
        ]);
        assert_eq!(
            pruned(dir.clone(), "shoal-20261204T000000Z.tar", 2),
            names(&["shoal-20261201T000000Z.tar", "shoal-20261202T000000Z.tar"])
        );
        // The clock was set back: the new one sorts first, and stays.
        let mut back = dir.clone();
        back.push("shoal-20250101T000000Z.tar".into());
        assert_eq!(
            pruned(back, "shoal-20250101T000000Z.tar", 2),
            names(&[
                "shoal-20261201T000000Z.tar",
                "shoal-20261202T000000Z.tar",
                "shoal-20261203T000000Z.tar"
            ])
        );
        assert!(pruned(dir, "shoal-20261204T000000Z.tar", 10).is_empty());
    }

    #[test]
    fn a_state_cut_short_is_malformed() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&5u32.to_le_bytes());
        bytes.extend_from_slice(b"/k1hel");
        assert!(matches!(
            parse_state(&bytes),
            Err(BackupError::Malformed(_))
        ));
        bytes.extend_from_slice(b"lo");
        assert_eq!(
            parse_state(&bytes).unwrap(),
            [("/k1".to_string(), b"hello".to_vec())]
        );
    }
}
