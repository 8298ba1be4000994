//! On-disk cache of precompiled components.
//!
//! Deserializing precompiled code means running whatever machine code the file holds, so a file
//! is only loaded if it provably is one this runtime wrote for this digest: it lives under a
//! directory named after the engine's compatibility hash, starts with our magic and the digest
//! it was compiled from, and its payload matches the SHA-256 recorded next to it. A truncated,
//! corrupted or foreign file fails these checks and is recompiled over.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"SHOALCW1";
const SHA_LEN: usize = 32;

/// Hex name of the directory holding artifacts this engine can load: same wasmtime version,
/// same compiler settings, same tunables (memory reservation etc.).
pub(crate) fn engine_dir_name(engine: &Engine) -> String {
    struct ShaHasher(Sha256);
    impl Hasher for ShaHasher {
        fn finish(&self) -> u64 {
            let digest = self.0.clone().finalize();
            u64::from_le_bytes(digest[..8].try_into().expect("sha256 is 32 bytes"))
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = ShaHasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    let digest = hasher.0.finalize();
    hex::encode(&digest[..16])
}

/// File name for a digest: its hex when it is a valid module digest (readable when browsing
/// the cache), otherwise a hash of the string (the runtime also loads by other names), so no
/// digest string can escape the directory.
pub(crate) fn artifact_path(dir: &Path, digest: &str) -> PathBuf {
    let name = match digest.parse::<shoal_core::Digest>() {
        Ok(d) => d.hex().to_owned(),
        Err(_) => hex::encode(Sha256::digest(digest.as_bytes())),
    };
    dir.join(format!("{name}.cwasm"))
}

/// Every compiled artifact under `cache_dir`, in any engine's directory.
pub(crate) fn artifacts(cache_dir: &Path) -> Vec<PathBuf> {
    let Ok(engines) = std::fs::read_dir(cache_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for engine in engines.flatten() {
        let Ok(files) = std::fs::read_dir(engine.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "cwasm") {
                found.push(path);
            }
        }
    }
    found
}

/// The module digest an artifact was named after (see [`artifact_path`]), if it was.
pub(crate) fn digest_of(file: &Path) -> Option<String> {
    let stem = file.file_stem()?.to_str()?;
    let digest = format!("sha256:{stem}");
    digest.parse::<shoal_core::Digest>().ok().map(|_| digest)
}

/// Why a cache file was not used. Never fatal: the component is compiled instead.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unusable {
    #[error("cannot read it: {0}")]
    Io(std::io::Error),
    #[error("it was not written by this runtime")]
    Foreign,
    #[error("it was compiled from a different digest")]
    OtherDigest,
    #[error("its checksum does not match (truncated or corrupted)")]
    Corrupt,
    #[error("wasmtime refused it: {0}")]
    Rejected(String),
}

/// Loads `path` if it exists and passes every check; `Ok(None)` when there is no file.
pub(crate) fn read(
    engine: &Engine,
    path: &Path,
    digest: &str,
) -> Result<Option<Component>, Unusable> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Unusable::Io(e)),
    };
    let payload = verify(&bytes, digest)?;
    // SAFETY: `verify` established that these bytes are exactly what `write` stored for this
    // digest after compiling it with an engine of the same compatibility hash (the directory),
    // i.e. artifacts this runtime produced itself; wasmtime additionally checks the engine
    // settings recorded inside.
    let component = unsafe { Component::deserialize(engine, payload) }
        .map_err(|e| Unusable::Rejected(format!("{e:#}")))?;
    Ok(Some(component))
}

fn verify<'a>(bytes: &'a [u8], digest: &str) -> Result<&'a [u8], Unusable> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(Unusable::Foreign)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(Unusable::Corrupt)?;
    let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| Unusable::Corrupt)?;
    if len
        .checked_add(SHA_LEN)
        .is_none_or(|needed| rest.len() < needed)
    {
        return Err(Unusable::Corrupt);
    }
    let (stored_digest, rest) = rest.split_at(len);
    if stored_digest != digest.as_bytes() {
        return Err(Unusable::OtherDigest);
    }
    let (sha, payload) = rest.split_at(SHA_LEN);
    if Sha256::digest(payload).as_slice() != sha {
        return Err(Unusable::Corrupt);
    }
    Ok(payload)
}

/// Stores an artifact atomically: written to a temporary file in the same directory, then
/// renamed over the final name, so readers see the old file, the new one, or none.
pub(crate) fn write(path: &Path, digest: &str, payload: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact"),
    ));
    let digest_len = u32::try_from(digest.len())
        .map_err(|_| std::io::Error::other("digest too long to record"))?;
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(MAGIC)?;
        file.write_all(&digest_len.to_le_bytes())?;
        file.write_all(digest.as_bytes())?;
        file.write_all(&Sha256::digest(payload))?;
        file.write_all(payload)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_names_stay_inside_the_directory() {
        let dir = Path::new("/cache/abc");
        let hex = "ab".repeat(32);
        assert_eq!(
            artifact_path(dir, &format!("sha256:{hex}")),
            dir.join(format!("{hex}.cwasm"))
        );
        for odd in [
            "../../etc/passwd".to_string(),
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}/..", "a".repeat(61)),
        ] {
            let path = artifact_path(dir, &odd);
            assert_eq!(path.parent(), Some(dir), "{odd:?}");
            assert!(path.to_str().unwrap().ends_with(".cwasm"));
            assert_ne!(path, artifact_path(dir, &format!("sha256:{hex}")));
        }
    }

    #[test]
    fn verify_rejects_anything_but_our_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cwasm");
        write(&path, "sha256:1", b"payload").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(verify(&bytes, "sha256:1").unwrap(), b"payload");
        assert!(matches!(
            verify(&bytes, "sha256:2"),
            Err(Unusable::OtherDigest)
        ));
        assert!(matches!(
            verify(&bytes[..bytes.len() - 1], "sha256:1"),
            Err(Unusable::Corrupt)
        ));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            verify(&flipped, "sha256:1"),
            Err(Unusable::Corrupt)
        ));
        assert!(matches!(
            verify(b"\x7fELF garbage", "sha256:1"),
            Err(Unusable::Foreign)
        ));
        assert!(matches!(verify(MAGIC, "sha256:1"), Err(Unusable::Corrupt)));
    }
}
