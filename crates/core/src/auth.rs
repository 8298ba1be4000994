//! The cluster's credentials: what they look like and how they are checked.
//! Making them (randomness) and keeping them (files, the store) is the
//! caller's: this crate does no I/O.

use sha2::{Digest, Sha256};
use std::fmt;

/// The header gateways of one cluster send each other on a hop (and the
/// control plane when it reads a node's logs), carrying the cluster's hop
/// secret. Nodes receive that secret when they join.
pub const HOP_AUTH_HEADER: &str = "x-shoal-hop-auth";

/// Where a node's gateway serves a local replica's output to holders of the
/// hop secret: `GET {NODE_LOGS_PATH}{replica}?tail=N`.
pub const NODE_LOGS_PATH: &str = "/_shoal/logs/";

/// A node's own credential, `NAME.SECRET`, as bootstrap tokens in Kubernetes
/// carry their id: the name says whose record to check the secret against,
/// and the control plane keeps only [`NodeToken::hash`] of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeToken {
    pub node: String,
    secret: String,
}

impl NodeToken {
    /// A credential for `node` with a secret the caller drew at random.
    pub fn new(node: &str, secret: &[u8; 32]) -> NodeToken {
        NodeToken {
            node: node.to_string(),
            secret: hex::encode(secret),
        }
    }

    /// Reads `NAME.SECRET`; anything else is not a node credential.
    pub fn parse(s: &str) -> Option<NodeToken> {
        let (node, secret) = s.trim().rsplit_once('.')?;
        let well_formed = crate::validate_name(node).is_ok()
            && secret.len() == 64
            && secret.bytes().all(|b| b.is_ascii_hexdigit());
        well_formed.then(|| NodeToken {
            node: node.to_string(),
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

    /// The credential as sent in `Authorization: Bearer …` and kept in the
    /// node's data dir.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.node, self.secret)
    }
}

/// Never prints the secret.
impl fmt::Debug for NodeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeToken({}.…)", self.node)
    }
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
    fn a_node_token_round_trips_and_checks_against_its_hash_only() {
        let token = NodeToken::new("node-1", &[7; 32]);
        let text = token.expose();
        assert!(text.starts_with("node-1."), "{text}");
        let read = NodeToken::parse(&text).unwrap();
        assert_eq!(read, token);
        assert!(read.matches(&token.hash()));
        assert!(!NodeToken::new("node-1", &[8; 32]).matches(&token.hash()));
        assert!(!read.matches(""));
        assert!(!format!("{token:?}").contains(&text[7..]), "{token:?}");
    }

    #[test]
    fn anything_but_name_dot_secret_is_not_a_node_token() {
        let secret = "a".repeat(64);
        for bad in [
            String::new(),
            "node-1".into(),
            format!("node-1.{}", &secret[1..]),
            format!("Node_1.{secret}"),
            format!(".{secret}"),
            format!("node-1.{}", "g".repeat(64)),
        ] {
            assert!(NodeToken::parse(&bad).is_none(), "{bad}");
        }
        assert!(NodeToken::parse(&format!("node-1.{secret}\n")).is_some());
    }

    #[test]
    fn secrets_compare_equal_only_when_equal_and_not_empty() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b""));
    }
}
