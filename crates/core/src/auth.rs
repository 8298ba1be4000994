//! The cluster's credentials: what they look like and how they are checked.
//! Making them (randomness) and keeping them (files, the store) is the
//! caller's: this crate does no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Where a node's gateway serves a local replica's output to the cluster's
/// members (over TLS with a certificate of the cluster CA), NDJSON:
/// `GET {NODE_LOGS_PATH}{replica}?since=SEQ&tail=N&since_time=MS&follow=true`.
pub const NODE_LOGS_PATH: &str = "/_shoal/logs/";

/// The sequence number a node's answer at [`NODE_LOGS_PATH`] starts from, past the lines
/// `tail` or `since` left out: where a follower that reconnects resumes.
pub const LOGS_FROM_HEADER: &str = "x-shoal-logs-from";

/// A hop between members of the cluster names the replica that must serve it, and its app
/// (`namespace/name`), with these headers, and marks itself as a hop: gateways forwarding
/// to another node, and the control plane's API proxy, send them; the node's gateway
/// serves such a request locally or refuses it.
pub const REPLICA_HEADER: &str = "x-shoal-replica";
pub const APP_HEADER: &str = "x-shoal-app";
pub const HOP_HEADER: &str = "x-shoal-hop";

/// A credential the control plane issued: a node's own (`NODE.SECRET`) or an
/// API token (`NAME.SECRET`). As bootstrap tokens in Kubernetes carry their
/// id, the name says whose record to check the secret against, and the
/// control plane keeps only [`Credential::hash`] of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The node's or the token's name.
    pub id: String,
    secret: String,
}

impl Credential {
    /// A credential for `id` with a secret the caller drew at random.
    pub fn new(id: &str, secret: &[u8; 32]) -> Credential {
        Credential {
            id: id.to_string(),
            secret: hex::encode(secret),
        }
    }

    /// Reads `NAME.SECRET`; anything else is not a credential.
    pub fn parse(s: &str) -> Option<Credential> {
        let (id, secret) = s.trim().rsplit_once('.')?;
        let well_formed = crate::validate_name(id).is_ok()
            && secret.len() == 64
            && secret.bytes().all(|b| b.is_ascii_hexdigit());
        well_formed.then(|| Credential {
            id: id.to_string(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    /// What the control plane stores: the secret's hex SHA-256.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether this credential's secret is the one `hash` was made from, in
    /// time that does not depend on where they differ.
    pub fn matches(&self, hash: &str) -> bool {
        constant_time_eq(self.hash().as_bytes(), hash.as_bytes())
    }

    /// The credential as sent in `Authorization: Bearer …` and kept in a
    /// file readable by its owner only.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// Never prints the secret.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}.…)", self.id)
    }
}

/// What an API token may do, each role everything the one before may:
/// read (`viewer`); also deploy: upload modules, apply, delete, scale, roll
/// back and drive rollouts, run jobs (`deployer`); also run the cluster:
/// nodes, tokens, the join token (`admin`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Deployer,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: viewer, deployer or admin"))
    }
}

/// A join token: the hash of the cluster's CA (so a node can check the server
/// it joins before it sends anything, as k3s tokens do) and a secret,
/// `CAHASH.SECRET`; the secret alone when there is no CA to check.
pub fn join_token(ca_hash: Option<&str>, secret: &[u8; 32]) -> String {
    match ca_hash {
        Some(hash) => format!("{hash}.{}", hex::encode(secret)),
        None => hex::encode(secret),
    }
}

/// The CA hash a join token carries, if it carries one.
pub fn join_token_ca_hash(token: &str) -> Option<&str> {
    let (hash, _) = token.trim().split_once('.')?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// Compares secrets in time that depends only on their length; an empty
/// secret matches nothing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && !b.is_empty()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_round_trips_and_checks_against_its_hash_only() {
        let token = Credential::new("node-1", &[7; 32]);
        let text = token.expose();
        assert!(text.starts_with("node-1."), "{text}");
        let read = Credential::parse(&text).unwrap();
        assert_eq!(read, token);
        assert!(read.matches(&token.hash()));
        assert!(!Credential::new("node-1", &[8; 32]).matches(&token.hash()));
        assert!(!read.matches(""));
        assert!(!format!("{token:?}").contains(&text[7..]), "{token:?}");
    }

    #[test]
    fn anything_but_name_dot_secret_is_not_a_credential() {
        let secret = "a".repeat(64);
        for bad in [
            String::new(),
            "node-1".into(),
            format!("node-1.{}", &secret[1..]),
            format!("Node_1.{secret}"),
            format!(".{secret}"),
            format!("node-1.{}", "g".repeat(64)),
        ] {
            assert!(Credential::parse(&bad).is_none(), "{bad}");
        }
        assert!(Credential::parse(&format!("node-1.{secret}\n")).is_some());
    }

    #[test]
    fn roles_read_as_they_print_and_rank_viewer_deployer_admin() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        assert!(Role::Viewer < Role::Deployer && Role::Deployer < Role::Admin);
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .contains("viewer, deployer or admin")
        );
    }

    #[test]
    fn a_join_token_carries_the_ca_hash_it_was_made_with() {
        let hash = "ab".repeat(32);
        let token = join_token(Some(&hash), &[1; 32]);
        assert_eq!(join_token_ca_hash(&token), Some(hash.as_str()));
        let bare = join_token(None, &[1; 32]);
        assert_eq!(join_token_ca_hash(&bare), None);
        assert!(token.ends_with(&bare));
    }

    #[test]
    fn secrets_compare_equal_only_when_equal_and_not_empty() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b""));
    }
}
