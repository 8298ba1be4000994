//! Volumes: directories on the node given to guests as wasi:filesystem preopens, and the size
//! limit of the one a replica may write.
//!
//! The limit is kept by the host, not the filesystem: the functions through which a guest's data
//! reaches a file (`descriptor.write`, `write-via-stream`, `append-via-stream` and `set-size`),
//! and those that make a file, a directory or a symlink (`open-at` with `create` and
//! `create-directory-at`, [`BLOCK_BYTES`] each, and `symlink-at`, its target's length), are
//! linked again over wasmtime-wasi's own,
//! charge what they would add to the volume's [`VolumeQuota`] first, and fail with
//! `insufficient-space` (ENOSPC, "No space left on device" to the guest) past the limit. Charges are counted on the safe side (an overwrite is charged
//! like new data) and set right by measuring the directory when the count nears the limit, so a
//! guest never takes the volume, or the node's disk, past its size. What cannot escape the
//! directory is wasmtime-wasi's (cap-std): `..`, absolute paths and symlinks that lead out are
//! refused. A symlink whose target is absolute or has a `..` is not made at all
//! (`not-permitted`): on the node, tools that follow links would be led out by it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, ErrorCode, Host as _, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, Pollable, StreamError, StreamResult};

use crate::host::Host;

/// The interface whose functions are linked again (wasmtime-wasi's version of it).
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// What a new file or directory is charged, and the least a measure counts for one: a block on
/// the common filesystems (ext4, xfs), and an inode, which a guest making empty files or
/// directories in a loop would otherwise take from the node's disk for free.
pub const BLOCK_BYTES: u64 = 4096;

/// One volume a replica mounts.
#[derive(Clone)]
pub struct VolumeMount {
    /// The directory on the node.
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    pub read_only: bool,
    /// Its size limit, shared by every instance on the node that writes to it.
    pub quota: Arc<VolumeQuota>,
}

/// What a volume may hold and what it holds, as charged.
pub struct VolumeQuota {
    root: PathBuf,
    limit: AtomicU64,
    /// Bytes measured at the last measure plus every charge since.
    charged: AtomicU64,
    measuring: Mutex<()>,
}

impl VolumeQuota {
    /// The quota of the directory `root`, which holds what it holds now.
    pub fn new(root: &Path, limit: u64) -> Arc<VolumeQuota> {
        let quota = VolumeQuota {
            root: root.to_path_buf(),
            limit: AtomicU64::new(limit),
            charged: AtomicU64::new(0),
            measuring: Mutex::new(()),
        };
        quota.measure();
        Arc::new(quota)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Measures what the directory holds now (and counts from there): its files' sizes,
    /// symlinks not followed.
    pub fn measure(&self) -> u64 {
        let _one = self.measuring.lock().unwrap_or_else(|p| p.into_inner());
        let used = du(&self.root);
        self.charged.store(used, Ordering::Relaxed);
        used
    }

    /// Takes `bytes` of the limit, measuring first if the count says they would not fit.
    fn charge(&self, bytes: u64) -> io::Result<()> {
        let limit = self.limit();
        let fits = self
            .charged
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(bytes).filter(|n| *n <= limit)
            })
            .is_ok();
        if fits {
            return Ok(());
        }
        let used = self.measure();
        if used.saturating_add(bytes) > limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.charged.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// Bytes of the files and directories under `dir` (at least [`BLOCK_BYTES`] each), symlinks
/// not followed (their target's length): what a volume holds.
pub fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => m.len().max(BLOCK_BYTES) + du(&e.path()),
            Ok(m) if m.is_symlink() => m.len(),
            Ok(m) => m.len().max(BLOCK_BYTES),
            Err(_) => 0,
        })
        .sum()
}

/// A file's output stream that charges its writes to the volume first.
struct Charged {
    inner: DynOutputStream,
    quota: Arc<VolumeQuota>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Charged {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

impl OutputStream for Charged {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.quota
            .charge(bytes.len() as u64)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))?;
        self.inner.write(bytes)
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.quota
            .charge(nelem as u64)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))?;
        self.inner.write_zeroes(nelem)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }
}

/// Links the writing functions of `wasi:filesystem/types` again over wasmtime-wasi's, charging
/// the store's writable volume (if it has one) first.
pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap(
        "[method]descriptor.write-via-stream",
        |mut store, (fd, offset): (Resource<Descriptor>, u64)| {
            let host = store.data_mut();
            let quota = host.volume_quota();
            let mut fs = host.filesystem();
            let stream = match HostDescriptor::write_via_stream(&mut fs, fd, offset) {
                Ok(s) => s,
                Err(e) => return Ok((Err(fs.convert_error_code(e)?),)),
            };
            Ok((Ok(charged(&mut fs, stream, quota)?),))
        },
    )?;
    types.func_wrap(
        "[method]descriptor.append-via-stream",
        |mut store, (fd,): (Resource<Descriptor>,)| {
            let host = store.data_mut();
            let quota = host.volume_quota();
            let mut fs = host.filesystem();
            let stream = match HostDescriptor::append_via_stream(&mut fs, fd) {
                Ok(s) => s,
                Err(e) => return Ok((Err(fs.convert_error_code(e)?),)),
            };
            Ok((Ok(charged(&mut fs, stream, quota)?),))
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.write",
        |mut store, (fd, buffer, offset): (Resource<Descriptor>, Vec<u8>, u64)| {
            Box::new(async move {
                let host = store.data_mut();
                if let Some(quota) = host.volume_quota()
                    && quota.charge(buffer.len() as u64).is_err()
                {
                    return Ok((Err(ErrorCode::InsufficientSpace),));
                }
                let mut fs = host.filesystem();
                match HostDescriptor::write(&mut fs, fd, buffer, offset).await {
                    Ok(n) => Ok((Ok(n),)),
                    Err(e) => Ok((Err(fs.convert_error_code(e)?),)),
                }
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.set-size",
        |mut store, (fd, size): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                let host = store.data_mut();
                let quota = host.volume_quota();
                let mut fs = host.filesystem();
                if let Some(quota) = quota {
                    let fd2 = Resource::<Descriptor>::new_borrow(fd.rep());
                    let now = match HostDescriptor::stat(&mut fs, fd2).await {
                        Ok(stat) => stat.size,
                        Err(e) => return Ok((Err(fs.convert_error_code(e)?),)),
                    };
                    if size > now && quota.charge(size - now).is_err() {
                        return Ok((Err(ErrorCode::InsufficientSpace),));
                    }
                }
                match HostDescriptor::set_size(&mut fs, fd, size).await {
                    Ok(()) => Ok((Ok(()),)),
                    Err(e) => Ok((Err(fs.convert_error_code(e)?),)),
                }
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store,
         (fd, path_flags, path, oflags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let host = store.data_mut();
                let quota = host.volume_quota();
                let mut fs = host.filesystem();
                // Charged only if the file is not there: opening one that is, to truncate
                // it in a full volume, must not fail for want of room.
                if oflags.contains(OpenFlags::CREATE)
                    && let Some(quota) = quota
                {
                    let dir = Resource::<Descriptor>::new_borrow(fd.rep());
                    let there = HostDescriptor::stat_at(&mut fs, dir, path_flags, path.clone())
                        .await
                        .is_ok();
                    if !there && quota.charge(BLOCK_BYTES).is_err() {
                        return Ok((Err(ErrorCode::InsufficientSpace),));
                    }
                }
                match HostDescriptor::open_at(&mut fs, fd, path_flags, path, oflags, flags).await {
                    Ok(opened) => Ok((Ok(opened),)),
                    Err(e) => Ok((Err(fs.convert_error_code(e)?),)),
                }
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.create-directory-at",
        |mut store, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                let host = store.data_mut();
                if let Some(quota) = host.volume_quota()
                    && quota.charge(BLOCK_BYTES).is_err()
                {
                    return Ok((Err(ErrorCode::InsufficientSpace),));
                }
                let mut fs = host.filesystem();
                match HostDescriptor::create_directory_at(&mut fs, fd, path).await {
                    Ok(()) => Ok((Ok(()),)),
                    Err(e) => Ok((Err(fs.convert_error_code(e)?),)),
                }
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store, (fd, target, path): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                // A link that could lead out of the volume is refused, not only its use:
                // on the node, a tool that follows links (`cp -L`, `tar -h`) would go there.
                if leads_up(&target) {
                    return Ok((Err(ErrorCode::NotPermitted),));
                }
                let host = store.data_mut();
                if let Some(quota) = host.volume_quota()
                    && quota.charge(target.len() as u64).is_err()
                {
                    return Ok((Err(ErrorCode::InsufficientSpace),));
                }
                let mut fs = host.filesystem();
                match HostDescriptor::symlink_at(&mut fs, fd, target, path).await {
                    Ok(()) => Ok((Ok(()),)),
                    Err(e) => Ok((Err(fs.convert_error_code(e)?),)),
                }
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Whether a symlink to `target` could lead above the directory it is made in: an absolute
/// path, or one with a `..`.
fn leads_up(target: &str) -> bool {
    Path::new(target).components().any(|c| {
        matches!(
            c,
            std::path::Component::RootDir
                | std::path::Component::Prefix(_)
                | std::path::Component::ParentDir
        )
    })
}

/// `stream`, in the table, replaced by one that charges `quota` (if any) for what it writes.
fn charged(
    fs: &mut wasmtime_wasi::filesystem::WasiFilesystemCtxView<'_>,
    stream: Resource<DynOutputStream>,
    quota: Option<Arc<VolumeQuota>>,
) -> wasmtime::Result<Resource<DynOutputStream>> {
    let Some(quota) = quota else {
        return Ok(stream);
    };
    let inner = fs.table.delete(stream)?;
    let wrapped: DynOutputStream = Box::new(Charged { inner, quota });
    Ok(fs.table.push(wrapped)?)
}
