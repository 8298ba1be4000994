//! Secrets at rest: the control plane's key file and the sealing of each value with
//! XChaCha20-Poly1305 under it.
//!
//! The key file holds one or more 256-bit keys, each named by a hash of it; the first,
//! the primary, seals new values, and every sealed value names the key that sealed it.
//! Rotating adds a new primary to the file before anything is sealed with it and drops the
//! old keys only after every value was sealed again, so a crash at any step leaves a file
//! that opens everything the store holds. A value is bound to where it belongs (see
//! [`binding`]): moved to another secret, version or key, it does not open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_core::Sealed;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret key file {path} is not usable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("sealed with key {0}, which the secret key file does not hold")]
    UnknownKey(String),
    #[error("does not open with its key: the stored value is damaged or was moved")]
    Damaged,
}

fn seal_with(key: &Key, id: &str, binding: &[u8], plaintext: &[u8]) -> Sealed {
    let cipher = XChaCha20Poly1305::new(key.as_ref().into());
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).expect("the OS gives random bytes");
    let data = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: binding,
            },
        )
        .expect("sealing a value in memory cannot fail");
    Sealed {
        key: id.to_string(),
        nonce: hex::encode(nonce),
        data: hex::encode(data),
    }
}

fn open_with(
    key: &Key,
    binding: &[u8],
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let nonce = hex::decode(&sealed.nonce).map_err(|_| SecretError::Damaged)?;
    let data = hex::decode(&sealed.data).map_err(|_| SecretError::Damaged)?;
    if nonce.len() != 24 {
        return Err(SecretError::Damaged);
    }
    XChaCha20Poly1305::new(key.as_ref().into())
        .decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &data,
                aad: binding,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SecretError::Damaged)
}

/// The key a passphrase stands for. Only for passphrases as strong as a key (Shoal's admin
/// token is 32 random bytes): one hash, no stretching.
fn passphrase_key(passphrase: &str) -> Key {
    let mut hash = Sha256::new();
    hash.update(b"shoal passphrase key v1\0");
    hash.update(passphrase.as_bytes());
    Zeroizing::new(hash.finalize().into())
}

/// `plaintext` sealed under a key derived from `passphrase` (a random token, not a word a
/// person chose), bound to `binding`: for what must travel through a shared store to whoever
/// holds the same token, as servers joining a cluster do.
pub fn seal_with_passphrase(passphrase: &str, binding: &[u8], plaintext: &[u8]) -> Sealed {
    seal_with(
        &passphrase_key(passphrase),
        "passphrase",
        binding,
        plaintext,
    )
}

/// The plaintext of what [`seal_with_passphrase`] sealed, if `passphrase` and `binding` are
/// those it was sealed with and it was not changed since.
pub fn open_with_passphrase(
    passphrase: &str,
    binding: &[u8],
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    open_with(&passphrase_key(passphrase), binding, sealed)
}

/// The file's content: keys by id, hex.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    primary: String,
    keys: BTreeMap<String, String>,
}

type Key = Zeroizing<[u8; 32]>;

/// The keys that seal and open secrets, as kept in their file.
pub struct Keyring {
    path: PathBuf,
    primary: String,
    keys: BTreeMap<String, Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("primary", &self.primary)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a sealed value is bound to: its namespace, secret, version and key.
pub fn binding(namespace: &str, secret: &str, version: u64, key: &str) -> Vec<u8> {
    format!("shoal-secret/v1\0{namespace}\0{secret}\0{version}\0{key}").into_bytes()
}

fn key_id(key: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(key))[..16].to_string()
}

fn new_key() -> Key {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).expect("the OS gives random bytes");
    key
}

impl Keyring {
    /// The key file at `path`; `None` if there is none. A file others may read, or one
    /// that does not parse, is an error: it is never replaced by a new key here, since the
    /// store's secrets would then no longer open.
    pub fn load(path: &Path) -> Result<Option<Keyring>, SecretError> {
        let io = |source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| SecretError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let text = match std::fs::read(path) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(corrupt(format!(
                "others may read it (mode {:o}): `chmod 600` it",
                mode & 0o777
            )));
        }
        let file: KeyFile =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("does not parse: {e}")))?;
        let mut keys = BTreeMap::new();
        for (id, hex_key) in &file.keys {
            let mut key = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(hex_key, key.as_mut())
                .map_err(|_| corrupt(format!("key {id} is not 32 bytes of hex")))?;
            if key_id(&key) != *id {
                return Err(corrupt(format!("key {id} does not match its id")));
            }
            keys.insert(id.clone(), key);
        }
        if !keys.contains_key(&file.primary) {
            return Err(corrupt(format!(
                "its primary key {} is not in it",
                file.primary
            )));
        }
        Ok(Some(Keyring {
            path: path.to_path_buf(),
            primary: file.primary,
            keys,
        }))
    }

    /// A new key file at `path`, with one key.
    pub fn create(path: &Path) -> Result<Keyring, SecretError> {
        let key = new_key();
        let id = key_id(&key);
        let ring = Keyring {
            path: path.to_path_buf(),
            primary: id.clone(),
            keys: BTreeMap::from([(id, key)]),
        };
        ring.save()?;
        Ok(ring)
    }

    fn save(&self) -> Result<(), SecretError> {
        let file = KeyFile {
            primary: self.primary.clone(),
            keys: self
                .keys
                .iter()
                .map(|(id, k)| (id.clone(), hex::encode(k.as_ref())))
                .collect(),
        };
        let text = Zeroizing::new(serde_json::to_vec_pretty(&file).expect("key file serialises"));
        shoal_tls::write_private(&self.path, &text).map_err(|source| SecretError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The id of the key that seals new values.
    pub fn primary(&self) -> &str {
        &self.primary
    }

    /// How many keys the file holds: more than one while a rotation is unfinished.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `plaintext` sealed with the primary key, bound to `binding`.
    pub fn seal(&self, binding: &[u8], plaintext: &[u8]) -> Sealed {
        seal_with(&self.keys[&self.primary], &self.primary, binding, plaintext)
    }

    /// The plaintext of `sealed`, if it was sealed with one of these keys for `binding` and
    /// not changed since.
    pub fn open(&self, binding: &[u8], sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let key = self
            .keys
            .get(&sealed.key)
            .ok_or_else(|| SecretError::UnknownKey(sealed.key.clone()))?;
        open_with(key, binding, sealed)
    }

    /// First step of a rotation: a new primary key, written to the file beside the old
    /// ones before anything is sealed with it.
    pub fn add_primary(&mut self) -> Result<(), SecretError> {
        let key = new_key();
        let id = key_id(&key);
        let before = std::mem::replace(&mut self.primary, id.clone());
        self.keys.insert(id.clone(), key);
        if let Err(e) = self.save() {
            self.keys.remove(&id);
            self.primary = before;
            return Err(e);
        }
        Ok(())
    }

    /// Last step of a rotation, once every value is sealed with the primary key: the
    /// other keys leave the file.
    pub fn retire_others(&mut self) -> Result<(), SecretError> {
        let primary = self.primary.clone();
        self.keys.retain(|id, _| *id == primary);
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_passphrase_sealed_opens_only_with_it_and_its_binding() {
        let sealed = seal_with_passphrase("token-a", b"identity", b"ca key");
        assert_eq!(
            &*open_with_passphrase("token-a", b"identity", &sealed).unwrap(),
            b"ca key"
        );
        assert!(open_with_passphrase("token-b", b"identity", &sealed).is_err());
        assert!(open_with_passphrase("token-a", b"other", &sealed).is_err());
        assert!(!sealed.data.contains(&hex::encode(b"ca key")));
    }

    #[test]
    fn values_open_only_where_they_were_sealed_and_a_rotation_keeps_them_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        assert!(Keyring::load(&path).unwrap().is_none());
        let mut ring = Keyring::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let here = binding("default", "db", 1, "password");
        let sealed = ring.seal(&here, b"hunter2");
        assert!(!sealed.data.contains(&hex::encode("hunter2")));
        assert_eq!(ring.open(&here, &sealed).unwrap().as_slice(), b"hunter2");
        // Moved to another key, version, secret or namespace: it does not open.
        for elsewhere in [
            binding("default", "db", 1, "user"),
            binding("default", "db", 2, "password"),
            binding("default", "cache", 1, "password"),
            binding("other", "db", 1, "password"),
        ] {
            assert!(matches!(
                ring.open(&elsewhere, &sealed),
                Err(SecretError::Damaged)
            ));
        }
        let mut flipped = sealed.clone();
        flipped.data.replace_range(0..2, "00");
        if flipped.data == sealed.data {
            flipped.data.replace_range(0..2, "ff");
        }
        assert!(matches!(
            ring.open(&here, &flipped),
            Err(SecretError::Damaged)
        ));

        // Mid-rotation (the new key written, the old one kept): both open, from the file too.
        let old = ring.primary().to_string();
        ring.add_primary().unwrap();
        assert_ne!(ring.primary(), old);
        let reloaded = Keyring::load(&path).unwrap().unwrap();
        assert_eq!(reloaded.len(), 2);
        assert_eq!(
            reloaded.open(&here, &sealed).unwrap().as_slice(),
            b"hunter2"
        );
        let resealed = ring.seal(&here, b"hunter2");
        assert_eq!(resealed.key, ring.primary());
        ring.retire_others().unwrap();
        let reloaded = Keyring::load(&path).unwrap().unwrap();
        assert_eq!(reloaded.len(), 1);
        assert_eq!(
            reloaded.open(&here, &resealed).unwrap().as_slice(),
            b"hunter2"
        );
        assert!(matches!(
            reloaded.open(&here, &sealed),
            Err(SecretError::UnknownKey(k)) if k == old
        ));
    }

    #[test]
    fn a_key_file_others_may_read_or_that_is_damaged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        Keyring::create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        shoal_tls::write_private(&path, b"{\"primary\":\"x\",\"keys\":{}}").unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.contains("primary key x is not in it"), "{e}");
        shoal_tls::write_private(&path, b"garbage").unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.contains("does not parse"), "{e}");
    }
}
