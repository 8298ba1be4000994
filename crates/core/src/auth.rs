//! Secrets derived from the cluster's tokens.

use sha2::{Digest, Sha256};

/// What gateways of one cluster send each other on a hop (and the control
/// plane when it reads a node's logs): derived from the join token every
/// node and the control plane hold, never the token itself.
pub fn hop_secret(join_token: &str) -> String {
    hex::encode(Sha256::digest(format!("shoal-hop\0{join_token}")))
}

/// The header that carries it.
pub const HOP_AUTH_HEADER: &str = "x-shoal-hop-auth";

/// Where a node's gateway serves a local replica's output to holders of the
/// hop secret: `GET {NODE_LOGS_PATH}{replica}?tail=N`.
pub const NODE_LOGS_PATH: &str = "/_shoal/logs/";
