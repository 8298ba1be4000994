//! Content-addressed storage for uploaded wasm modules.
//!
//! Layout: `<dir>/sha256/<64 hex>` for blobs, `<dir>/tmp/` for uploads in progress. An upload is
//! hashed while it streams into a temp file, fsync'd, then renamed into place, so a blob file
//! either is complete and matches its name or does not exist.

use std::fmt::Display;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use sha2::Digest as _;
use sha2::Sha256;
use shoal_core::Digest;
use shoal_core::digest::DigestError;
use tokio::io::AsyncWriteExt;

use crate::StoreError;

/// Errors from [`BlobStore`].
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("module is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// Not `sha256:` + 64 lowercase hex (the message says which part is wrong).
    #[error(transparent)]
    BadDigest(#[from] DigestError),
    #[error("blob {0} not found")]
    NotFound(String),
    #[error("upload stream failed: {0}")]
    Stream(String),
    #[error("blob store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of [`BlobStore::put_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutBlob {
    /// `"sha256:<64 lowercase hex>"`.
    pub digest: String,
    pub size: u64,
    /// The same bytes were already stored; nothing was written.
    pub existed: bool,
    pub path: PathBuf,
}

/// Content-addressed blob directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: Arc<PathBuf>,
}

impl BlobStore {
    /// Opens (creating if needed) the blob directory and removes temp files left by a crash.
    /// Open it once per directory: cleanup would remove uploads in progress of another opener.
    pub fn open(dir: &Path) -> Result<BlobStore, StoreError> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let path = entry?.path();
            tracing::debug!(path = %path.display(), "removing leftover blob upload");
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(BlobStore::at(dir))
    }

    /// The blob directory `dir` as it is, to read from: nothing is created or cleaned up, so
    /// a copy of another server's modules (`shoal server migrate`) leaves them untouched.
    pub fn at(dir: &Path) -> BlobStore {
        BlobStore {
            dir: Arc::new(dir.to_owned()),
        }
    }

    /// Streams a blob into the store, hashing it on the way, and fails with
    /// [`BlobError::TooLarge`] as soon as it exceeds `limit` bytes. Storing the same bytes
    /// twice keeps one copy (the second call reports `existed: true`). Nothing is left behind
    /// on failure or cancellation.
    pub async fn put_stream<S, E>(&self, mut stream: S, limit: u64) -> Result<PutBlob, BlobError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: Display,
    {
        let (mut file, mut temp) = self.create_temp().await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Stream(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(BlobError::TooLarge { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);

        let digest = Digest::from_sha256(hasher.finalize().into());
        let path = self.blob_path(&digest);
        let existed = tokio::fs::try_exists(&path).await?;
        if !existed {
            tokio::fs::rename(&temp.0, &path).await?;
            temp.disarm();
            // Make the rename itself durable.
            tokio::fs::File::open(self.dir.join("sha256"))
                .await?
                .sync_all()
                .await?;
        }
        Ok(PutBlob {
            digest: digest.into_string(),
            size,
            existed,
            path,
        })
    }

    /// Stores `bytes` as [`BlobStore::put_stream`] does, for a caller that may block
    /// (`shoal server restore`).
    pub fn put(&self, bytes: &[u8]) -> Result<PutBlob, BlobError> {
        use std::io::Write as _;
        let digest = Digest::from_sha256(Sha256::digest(bytes).into());
        let path = self.blob_path(&digest);
        let existed = path.is_file();
        if !existed {
            let mut temp = tempfile::NamedTempFile::new_in(self.temp_dir())?;
            temp.write_all(bytes)?;
            temp.as_file().sync_all()?;
            temp.persist(&path).map_err(|e| e.error)?;
            std::fs::File::open(self.dir.join("sha256"))?.sync_all()?;
        }
        Ok(PutBlob {
            digest: digest.into_string(),
            size: bytes.len() as u64,
            existed,
            path,
        })
    }

    /// Where temp files go: on the blobs' file system, so a rename moves them in, and emptied
    /// by [`BlobStore::open`] of what a crash left.
    pub fn temp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Where the blob with `digest` lives (whether or not it exists). An invalid digest maps to
    /// `<dir>/sha256/invalid-digest`, a name never written, so it can't escape the directory;
    /// use [`BlobStore::try_path`] to get the error instead.
    pub fn path(&self, digest: &str) -> PathBuf {
        self.try_path(digest)
            .unwrap_or_else(|_| self.dir.join("sha256").join("invalid-digest"))
    }

    /// Like [`BlobStore::path`], but rejects invalid digests.
    pub fn try_path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        Ok(self.blob_path(&digest.parse()?))
    }

    /// Where the blob with `digest` lives; a [`Digest`]'s hex can't escape the directory.
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.try_path(digest).is_ok_and(|p| p.is_file())
    }

    pub fn read(&self, digest: &str) -> Result<Vec<u8>, BlobError> {
        std::fs::read(self.try_path(digest)?).map_err(|e| not_found(e, digest))
    }

    /// Removes a blob. Removing an absent blob is not an error (deletion is idempotent).
    pub fn delete(&self, digest: &str) -> Result<(), BlobError> {
        match std::fs::remove_file(self.try_path(digest)?) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn create_temp(&self) -> Result<(tokio::fs::File, TempFile), BlobError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        loop {
            let name = format!(
                "{}-{}-{nanos}.part",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let path = self.temp_dir().join(name);
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => return Ok((file, TempFile(path, true))),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn not_found(e: std::io::Error, digest: &str) -> BlobError {
    if e.kind() == ErrorKind::NotFound {
        BlobError::NotFound(digest.to_owned())
    } else {
        e.into()
    }
}

/// An upload's temp file, removed on drop unless it was renamed into place.
struct TempFile(PathBuf, bool);

impl TempFile {
    fn disarm(&mut self) {
        self.1 = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
