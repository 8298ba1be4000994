//! Node identity, as Kubernetes' node authorizer has it: the join token only
//! gets a node its own credential ([`ControlPlane::join_node`]); every later
//! call carries that credential, and a node may touch only its own record,
//! lease and replicas, and read only what it runs ([`crate::scope`]).

use crate::error::ControlError;
use crate::scope::NodeScope;
use crate::state::{ControlPlane, encode};
use shoal_api::{CertificateRequest, JoinResponse, Snapshot};
use shoal_core::auth::{Credential, constant_time_eq};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::{EventType, NodeCredential, Replica, Revision, Volume, VolumeDeletion};
use shoal_store::{Op, Txn};
use std::path::PathBuf;
use std::sync::Arc;

/// The most hosts a node's certificate names: its gateway's address, and a
/// few names it may also be reached by.
const MAX_CERTIFICATE_HOSTS: usize = 8;

/// 32 random bytes, for a secret.
pub(crate) fn random_secret() -> Result<[u8; 32], ControlError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ControlError::internal(format!("no system randomness: {e}")))?;
    Ok(bytes)
}

/// Where servers sharing a store keep the join token in force, so that one rotated at any of
/// them is the only one every one of them takes. Outside `/`: no watch or snapshot carries it.
pub(crate) const SHARED_JOIN_TOKEN: &str = "cluster/join-token";

/// How soon a server sharing a store finds a join token rotated at another one.
const JOIN_TOKEN_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the list of servers running is told to nodes as read: a server that joins the
/// store is known to them this much later, at most.
const SERVERS_READ_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl ControlPlane {
    /// On a shared store, for ever: keeps this server's join token, in memory and in its
    /// `join-token` file, the one in force, within [`JOIN_TOKEN_PERIOD`] of a rotation at
    /// another server. Else a file an operator copies for `shoal node join` (the one this
    /// server's own join command names) held a token refused since, until a join reached
    /// this server.
    pub async fn follow_join_token(self) {
        if !self.inner.config.shared_store {
            return;
        }
        let mut tick = tokio::time::interval(JOIN_TOKEN_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let cp = self.clone();
            if let Err(e) = crate::state::blocking(move || cp.join_token().map(drop)).await {
                tracing::debug!(error = %e, "cannot read the join token in force");
            }
        }
    }

    /// Whether `presented` is the join token in force. It reads the store when servers share
    /// one (joins are rare), so a token rotated at another server stops working here at once.
    pub fn join_token_matches(&self, presented: &str) -> bool {
        match self.join_token() {
            Ok(current) => constant_time_eq(presented.as_bytes(), current.as_bytes()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the join token in force");
                false
            }
        }
    }

    /// The API URLs of the servers running on a shared store (each registers while it
    /// runs, `shoal_store::SERVERS_PREFIX`), in key order; none on a store of its own.
    pub(crate) fn servers_running(&self) -> Result<Vec<String>, ControlError> {
        if !self.inner.config.shared_store {
            return Ok(Vec::new());
        }
        let (running, _) = self.inner.store.range(shoal_store::SERVERS_PREFIX)?;
        Ok(running
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .collect())
    }

    /// The servers of the control plane (`shoal get servers`): on a shared store those
    /// running there, the leader marked (its id in the leader key is its URL); else this one.
    pub fn servers(&self) -> Result<Vec<shoal_api::ServerSummary>, ControlError> {
        if !self.inner.config.shared_store {
            let url = self.inner.api_url.get().cloned().unwrap_or_default();
            return Ok(vec![shoal_api::ServerSummary { url, leader: true }]);
        }
        let leader = self
            .inner
            .store
            .get(crate::backup::LEADER_KEY)?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        Ok(self
            .servers_running()?
            .into_iter()
            .map(|url| shoal_api::ServerSummary {
                leader: leader.as_deref() == Some(url.as_str()),
                url,
            })
            .collect())
    }

    /// [`Self::servers_running`], comma-separated, read at most every [`SERVERS_READ_EVERY`]:
    /// a heartbeat's answer tells its node, and nodes heartbeat every second.
    pub(crate) fn servers_told(&self) -> Option<Arc<str>> {
        if !self.inner.config.shared_store {
            return None;
        }
        let mut read = self
            .inner
            .servers_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, list)) = &*read
            && at.elapsed() < SERVERS_READ_EVERY
        {
            return Some(Arc::clone(list));
        }
        match self.servers_running() {
            Ok(running) if !running.is_empty() => {
                let list: Arc<str> = running.join(",").into();
                *read = Some((std::time::Instant::now(), Arc::clone(&list)));
                Some(list)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the servers running, for a node");
                read.as_ref().map(|(_, list)| Arc::clone(list))
            }
        }
    }

    /// The join token in force: this server's, or on a shared store the one stored there,
    /// which this server then keeps (in memory and in its join-token file, for its pools'
    /// workers) if it had another.
    pub(crate) fn join_token(&self) -> Result<String, ControlError> {
        let held = self
            .inner
            .join_token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !self.inner.config.shared_store {
            return Ok(held);
        }
        let stored = match self.inner.store.get(SHARED_JOIN_TOKEN)? {
            Some(kv) => String::from_utf8(kv.value)
                .map_err(|_| ControlError::internal("the stored join token is not text"))?,
            None => {
                // The first server on the store puts its own; a race is settled by the store.
                let put = Txn::new()
                    .when_absent(SHARED_JOIN_TOKEN)
                    .then(Op::put(SHARED_JOIN_TOKEN, held.as_bytes()));
                if self.inner.store.txn(put)?.succeeded {
                    return Ok(held);
                }
                return self.join_token();
            }
        };
        if stored != held {
            self.keep_join_token(&stored)?;
        }
        Ok(stored)
    }

    /// Makes `token` this server's join token, in its file first (a restart must not bring an
    /// old one back), then in memory.
    fn keep_join_token(&self, token: &str) -> Result<(), ControlError> {
        if let Some(path) = &self.config().join_token_file {
            shoal_tls::write_private(path, token.as_bytes()).map_err(|e| {
                ControlError::internal(format!("cannot write {}: {e}", path.display()))
            })?;
        }
        *self
            .inner
            .join_token
            .write()
            .unwrap_or_else(|p| p.into_inner()) = token.to_string();
        Ok(())
    }

    /// A node presenting the join token gets its own credential, once per
    /// name: a name already joined (registered, or holding a credential) is
    /// refused, so the join token cannot be used to take over a node.
    pub fn join_node(&self, name: &str) -> Result<JoinResponse, ControlError> {
        shoal_core::validate_name(name).map_err(|e| {
            ControlError::invalid(ErrorCode::InvalidNode, format!("node name: {e}"))
        })?;
        let token = Credential::new(name, &random_secret()?);
        let record = NodeCredential {
            node: name.to_string(),
            hash: token.hash(),
            issued_at: self.now(),
        };
        let txn = Txn::new()
            .when_absent(keys::node(name))
            .when_absent(keys::credential(name))
            .then(Op::put(keys::credential(name), encode(&record)))
            .then(self.event_op(
                EventType::Normal,
                "NodeJoined",
                format!("node/{name}"),
                None,
                format!("node {name} joined with the join token and got its own credential"),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "node {name} has joined already: a node that restarts uses the credential in its data dir; \
                 if {name} is gone for good, `shoal node delete {name}` and join again"
            )));
        }
        Ok(JoinResponse {
            credential: token.expose(),
        })
    }

    /// Signs node `node`'s certificate request for the hosts its gateway is
    /// reached at (see [`CertificateRequest`]). A node names its own hosts,
    /// as it registers its own gateway address: the certificate only lets it
    /// be what it already says it is.
    pub fn issue_certificate(
        &self,
        node: &str,
        request: &CertificateRequest,
    ) -> Result<String, ControlError> {
        let Some(ca) = &self.config().authority else {
            return Err(ControlError::invalid(
                ErrorCode::BadRequest,
                "this control plane has no cluster CA to sign with",
            ));
        };
        let bad = |why: String| ControlError::invalid(ErrorCode::BadRequest, why);
        if request.hosts.is_empty() || request.hosts.len() > MAX_CERTIFICATE_HOSTS {
            return Err(bad(format!(
                "a node certificate names 1 to {MAX_CERTIFICATE_HOSTS} hosts, not {}",
                request.hosts.len()
            )));
        }
        ca.issue_node(&request.csr, node, &request.hosts)
            .map_err(|e| {
                bad(format!(
                    "cannot sign node {node}'s certificate request: {e}"
                ))
            })
    }

    /// The node a bearer credential belongs to, if it is one the control
    /// plane issued and has not revoked.
    pub fn authenticate_node(&self, bearer: &str) -> Result<Option<String>, ControlError> {
        let Some(token) = Credential::parse(bearer) else {
            return Ok(None);
        };
        Ok(self
            .get(&keys::credential(&token.id))?
            .filter(|(record, _)| token.matches(&record.hash))
            .map(|_| token.id))
    }

    /// Removes a node: its record, lease and credential. The controller then
    /// treats its replicas as lost and replaces them elsewhere; the node, if
    /// it still runs, is refused from now on and must join again. Answers the volumes bound
    /// to it (`namespace/name`): their data stays on its machine, so the replicas mounting
    /// them wait for a node of that name to join again, or for the volumes to be deleted.
    pub fn delete_node(&self, name: &str) -> Result<Vec<String>, ControlError> {
        let node = self.get(&keys::node(name))?;
        let credential = self.get(&keys::credential(name))?;
        if node.is_none() && credential.is_none() {
            return Err(ControlError::not_found(format!(
                "node {name} does not exist"
            )));
        }
        let mut txn = Txn::new()
            .then(Op::delete(keys::node(name)))
            .then(Op::delete(keys::lease(name)))
            .then(Op::delete(keys::credential(name)));
        // The data of volumes deleted while it was away goes with the machine: their names
        // are free again.
        for d in self.list::<VolumeDeletion>(&keys::VOLUME_DELETIONS)? {
            if d.node == name {
                txn = txn.then(Op::delete(keys::volume_deletion(&d.namespace, &d.name)));
            }
        }
        let volumes: Vec<String> = self
            .list::<Volume>(&keys::VOLUMES)?
            .into_iter()
            .filter(|v| v.node.as_deref() == Some(name))
            .map(|v| format!("{}/{}", v.namespace, v.name))
            .collect();
        let mut message =
            format!("node {name} was deleted; its replicas will be replaced elsewhere");
        if !volumes.is_empty() {
            message.push_str(&format!(
                ", but not those mounting volumes {}, whose data stays on its machine: they wait for a node {name} to join again with its data dir, or for the volumes to be deleted",
                volumes.join(", ")
            ));
        }
        let txn = txn.then(self.event_op(
            EventType::Normal,
            "NodeDeleted",
            format!("node/{name}"),
            None,
            message,
        ));
        self.inner.store.txn(txn)?;
        self.inner.kick.notify_one();
        Ok(volumes)
    }

    /// A new join token; the old one stops working at once. Nodes that have
    /// joined keep their own credentials and are not affected. The token is
    /// written to the join-token file first, so a restart cannot bring the
    /// old one back.
    pub fn rotate_join_token(&self) -> Result<(String, Option<PathBuf>), ControlError> {
        let ca_hash = match &self.config().authority {
            Some(ca) => Some(ca.hash().map_err(ControlError::internal)?),
            None => None,
        };
        let token = shoal_core::auth::join_token(ca_hash.as_deref(), &random_secret()?);
        let file = self.config().join_token_file.clone();
        if self.inner.config.shared_store {
            // Every server takes the stored one from its next join on.
            self.inner
                .store
                .txn(Txn::new().then(Op::put(SHARED_JOIN_TOKEN, token.as_bytes())))?;
        }
        self.keep_join_token(&token)?;
        self.inner.store.txn(Txn::new().then(self.event_op(
            EventType::Normal,
            "JoinTokenRotated",
            "cluster".into(),
            None,
            "the join token was rotated; joined nodes keep their credentials".into(),
        )))?;
        Ok((token, file))
    }

    /// What node `node` may read: every object it routes by, with other
    /// apps' configuration left out (see [`crate::scope`]).
    pub fn snapshot_for(&self, node: &str) -> Result<Snapshot, ControlError> {
        let mut snapshot = self.snapshot()?;
        NodeScope::new(node, &snapshot.replicas).snapshot(&mut snapshot);
        Ok(snapshot)
    }

    /// A scope for node `node`'s watch, starting from its replicas now.
    pub(crate) fn scope_for(&self, node: &str) -> Result<NodeScope, ControlError> {
        let replicas = self.list::<Replica>(&keys::REPLICAS)?;
        Ok(NodeScope::new(node, &replicas))
    }

    /// A revision as stored now, for a node's watch to hand over whole.
    pub(crate) fn revision_now(
        &self,
        app: &shoal_core::spec::AppKey,
        number: u64,
    ) -> Option<Revision> {
        self.get(&keys::revision(app, number))
            .ok()
            .flatten()
            .map(|(r, _)| r)
    }

    /// Whether a replica placed on `node` runs the module `digest`: what a
    /// node may download.
    pub fn node_runs_module(&self, node: &str, digest: &str) -> Result<bool, ControlError> {
        for replica in self.list::<Replica>(&keys::REPLICAS)? {
            if replica.node.as_deref() != Some(node) {
                continue;
            }
            if let Some((revision, _)) =
                self.get(&keys::revision(&replica.app, replica.revision))?
                && revision.template.component.digest == digest
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
