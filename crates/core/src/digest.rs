//! Module digests: `sha256:` followed by 64 lowercase hex digits, checked once.
//!
//! A [`Digest`] can only hold a well-formed digest, so code that has one may use its
//! [`hex`](Digest::hex) part as a file name (it cannot escape a directory) and compare it with
//! a hash it computed (it is already in canonical, lowercase form). On the wire it is the plain
//! string, in JSON and TOML alike; deserialising one validates it.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// `sha256:<64 lowercase hex>`: the content address of an uploaded module.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// Why a string is not a [`Digest`]. Every message names the string and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    #[error(
        "{0:?} is not a module digest: expected \"sha256:\" followed by 64 lowercase hex digits"
    )]
    Prefix(String),
    #[error(
        "{digest:?} is not a module digest: expected 64 lowercase hex digits after \"sha256:\", found {len} characters"
    )]
    Length { digest: String, len: usize },
    #[error(
        "{0:?} is not a module digest: expected 64 lowercase hex digits (0-9, a-f) after \"sha256:\""
    )]
    NotLowercaseHex(String),
}

impl Digest {
    /// The algorithm prefix every digest starts with.
    pub const PREFIX: &'static str = "sha256:";
    /// Hex digits after the prefix.
    pub const HEX_LEN: usize = 64;

    /// Checks `s` and, if it is a digest, keeps it.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        check(s)?;
        Ok(Digest(s.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: impl AsRef<[u8]>) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes.as_ref()).into())
    }

    /// The digest with this SHA-256 output, for callers that hash incrementally.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(format!("{}{}", Digest::PREFIX, hex::encode(hash)))
    }

    /// The whole digest, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 lowercase hex digits after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[Digest::PREFIX.len()..]
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn check(s: &str) -> Result<(), DigestError> {
    let hex = s
        .strip_prefix(Digest::PREFIX)
        .ok_or_else(|| DigestError::Prefix(s.to_owned()))?;
    let len = hex.chars().count();
    if len != Digest::HEX_LEN {
        return Err(DigestError::Length {
            digest: s.to_owned(),
            len,
        });
    }
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(DigestError::NotLowercaseHex(s.to_owned()));
    }
    Ok(())
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl TryFrom<&str> for Digest {
    type Error = DigestError;
    fn try_from(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Digest, DigestError> {
        check(&s)?;
        Ok(Digest(s))
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Digest {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> String {
        format!("sha256:{}", "0123456789abcdef".repeat(4))
    }

    #[test]
    fn parses_a_valid_digest_once() {
        let d: Digest = good().parse().unwrap();
        assert_eq!(d.as_str(), good());
        assert_eq!(d.hex(), "0123456789abcdef".repeat(4));
        assert_eq!(d.to_string(), good());
        assert_eq!(format!("{d:?}"), format!("{:?}", good()));
        assert_eq!(Digest::try_from(good().as_str()).unwrap(), d);
        assert_eq!(Digest::try_from(good()).unwrap(), d);
        assert_eq!(d, good().as_str());
        assert_eq!(String::from(d.clone()), good());
    }

    #[test]
    fn of_hashes_bytes() {
        // sha256("") is well known.
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(Digest::of(b""), empty);
        assert_eq!(Digest::of(b"").hex(), &empty[7..]);
        assert_eq!(Digest::from_sha256([0xab; 32]).hex(), "ab".repeat(32));
        assert_ne!(Digest::of(b"a"), Digest::of(b"b"));
    }

    #[test]
    fn rejects_a_wrong_prefix() {
        let hex = "a".repeat(64);
        for bad in [
            hex.clone(),
            format!("sha512:{hex}"),
            format!("SHA256:{hex}"),
            format!("sha256{hex}"),
            format!(" sha256:{hex}"),
            String::new(),
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(DigestError::Prefix(bad.clone())));
        }
    }

    #[test]
    fn rejects_uppercase() {
        let bad = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(
            bad.parse::<Digest>(),
            Err(DigestError::NotLowercaseHex(bad.clone()))
        );
        let mixed = format!("sha256:{}A", "a".repeat(63));
        assert!(matches!(
            mixed.parse::<Digest>(),
            Err(DigestError::NotLowercaseHex(_))
        ));
    }

    #[test]
    fn rejects_a_wrong_length() {
        for (bad, len) in [
            ("sha256:".to_string(), 0),
            (format!("sha256:{}", "a".repeat(63)), 63),
            (format!("sha256:{}", "a".repeat(65)), 65),
            (format!("sha256:{}\n", "a".repeat(64)), 65),
        ] {
            assert_eq!(
                bad.parse::<Digest>(),
                Err(DigestError::Length {
                    digest: bad.clone(),
                    len
                })
            );
        }
    }

    #[test]
    fn rejects_non_hex() {
        for bad in [
            format!("sha256:{}g", "a".repeat(63)),
            format!("sha256:../{}", "a".repeat(61)),
            format!("sha256:{}/..", "a".repeat(61)),
            format!("sha256:{} ", "a".repeat(63)),
        ] {
            assert!(
                matches!(bad.parse::<Digest>(), Err(DigestError::NotLowercaseHex(_))),
                "{bad:?}"
            );
        }
        // Lengths count characters, so 64 of them with a multi-byte one is a hex problem.
        let accented = format!("sha256:{}é", "a".repeat(63));
        assert!(matches!(
            accented.parse::<Digest>(),
            Err(DigestError::NotLowercaseHex(_))
        ));
    }

    #[test]
    fn errors_say_what_was_expected() {
        let msg = "md5:abc".parse::<Digest>().unwrap_err().to_string();
        assert!(msg.contains("\"md5:abc\""), "{msg}");
        assert!(msg.contains("64 lowercase hex digits"), "{msg}");
        let msg = "sha256:abc".parse::<Digest>().unwrap_err().to_string();
        assert!(msg.contains("found 3 characters"), "{msg}");
    }

    #[test]
    fn serde_is_the_plain_string() {
        let d = Digest::parse(&good()).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{}\"", good()));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Component {
            digest: Digest,
        }
        let toml_text = toml::to_string(&Component { digest: d.clone() }).unwrap();
        assert_eq!(toml_text.trim(), format!("digest = \"{}\"", good()));
        assert_eq!(
            toml::from_str::<Component>(&toml_text).unwrap(),
            Component { digest: d }
        );
    }

    #[test]
    fn deserialising_validates() {
        for bad in [
            "\"md5:abc\"".to_string(),
            format!("\"sha256:{}\"", "A".repeat(64)),
            format!("\"sha256:{}\"", "a".repeat(63)),
            "42".to_string(),
        ] {
            assert!(serde_json::from_str::<Digest>(&bad).is_err(), "{bad}");
        }
        let err = serde_json::from_str::<Digest>("\"md5:abc\"").unwrap_err();
        assert!(err.to_string().contains("not a module digest"), "{err}");
        assert!(toml::from_str::<std::collections::BTreeMap<String, Digest>>("d = \"x\"").is_err());
    }
}
