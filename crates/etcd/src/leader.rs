//! Leader election on an etcd lease: of the servers sharing a store, exactly one runs the
//! controller at a time, and when it dies another takes over within [`LEASE_TTL`] and a bit.
//!
//! Each candidate holds a lease of its own, kept alive while the process lives, with a key
//! under [`shoal_store::SERVERS_PREFIX`] bound to it (so the servers running are known), and tries to
//! create the leader key bound to it (a transaction: create if absent). Whoever creates it
//! leads; the others watch the key and try again when it is deleted, which etcd does when the
//! leader's lease runs out (a killed leader) or is revoked (a leader stepping down). A leader
//! counts itself deposed from the moment its lease may have run out in etcd's eyes: the time it
//! sent its last renewal that etcd answered, plus the TTL, which is never later than the
//! expiry etcd counts from receiving it. So two controllers never run at once, as far as the
//! two clocks' rates agree.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{EtcdStore, RETRY_FOR, Retry};

/// The leader key. It exists while a server runs on the store; its revision when a server
/// won it guards that server's controller writes (`ControlPlane::lead`).
pub const LEADER_KEY: &str = "/leader";

/// How long a lease outlives its holder's last renewal: a dead leader is replaced after this.
/// Short, as the takeover must come within 5 s; renewals go out every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

/// How soon a renewal that failed is sent again.
const RENEW_AGAIN: Duration = Duration::from_millis(50);

/// Held while this process leads. [`Leadership::lost`] resolves when the lease may have run out;
/// dropping it steps down (the lease is revoked, so another candidate takes over at once).
pub struct Leadership {
    /// The etcd revision at which the leader key was made this process's.
    revision: u64,
    lost: watch::Receiver<bool>,
    _keeper: tokio::task::JoinHandle<()>,
    revoke: Option<(Client, i64, tokio::runtime::Handle)>,
}

impl Leadership {
    /// The leader key's revision while this process leads: writes guarded on it (its
    /// mod revision) fail once the key has gone with the lease, or is another's.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Resolves once this process may no longer be the leader.
    pub async fn lost(&mut self) {
        // An error means the keeper is gone, which only happens once it has said so.
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Steps down and returns once etcd has revoked the lease (or refused to): the leader
    /// key is gone with it, so another candidate takes over at once rather than after the
    /// lease's TTL. For a server that stops; dropping steps down too, without waiting.
    pub async fn step_down(mut self) {
        self._keeper.abort();
        if let Some((mut client, lease, handle)) = self.revoke.take() {
            let _ = handle
                .spawn(async move { client.lease_revoke(lease).await })
                .await;
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self._keeper.abort();
        if let Some((mut client, lease, handle)) = self.revoke.take() {
            handle.spawn(async move {
                let _ = client.lease_revoke(lease).await;
            });
        }
    }
}

impl EtcdStore {
    /// Waits until this process leads, as `id` (a name for the logs and `etcdctl get`), and
    /// returns its leadership. Errors are etcd's, on the way; the caller tries again.
    pub async fn campaign(&self, id: &str) -> Result<Leadership, etcd_client::Error> {
        let client = self.client();
        let handle = self.runtime.handle().clone();
        let id = id.to_owned();
        // The whole campaign runs on the client's runtime, where its connections live.
        handle
            .clone()
            .spawn(async move {
                let mut c = client.clone();
                // A lease granted twice is one more that runs out unused.
                let lease = again(Retry::Read, || {
                    let mut c = client.clone();
                    async move { c.lease_grant(LEASE_TTL.as_secs() as i64, None).await }
                })
                .await?
                .id();
                // Who runs on the store, while it does (`shoal secret rotate-key` asks).
                again(Retry::Read, || {
                    let (mut c, id) = (client.clone(), id.clone());
                    async move {
                        c.put(
                            format!("{}{id}", shoal_store::SERVERS_PREFIX),
                            id.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await
                    }
                })
                .await?;
                let (lost_tx, lost) = watch::channel(false);
                let keeper = tokio::spawn(keep_alive(client.clone(), lease, lost_tx));
                let mut leadership = Leadership {
                    revision: 0,
                    lost,
                    _keeper: keeper,
                    revoke: Some((client.clone(), lease, tokio::runtime::Handle::current())),
                };
                loop {
                    if *leadership.lost.borrow() {
                        return Err(etcd_client::Error::LeaseKeepAliveError(
                            "the lease ran out while campaigning".into(),
                        ));
                    }
                    let txn = Txn::new()
                        .when([Compare::version(LEADER_KEY, CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            LEADER_KEY,
                            id.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    // Sent again only if it never reached a member: one that won and was
                    // not told would then wait for its own key to go. One cut off after it
                    // was sent (its member died) is judged by the key as it stands: ours,
                    // it won; another's, it lost; none, it is tried again.
                    let sent = again(Retry::Write, || {
                        let (mut c, txn) = (client.clone(), txn.clone());
                        async move { c.txn(txn).await }
                    })
                    .await;
                    let (won, at) = match sent {
                        Ok(resp) => (resp.succeeded(), resp.header().map_or(0, |h| h.revision())),
                        Err(e) if Retry::Read.allows(&e) => {
                            let read = again(Retry::Read, || {
                                let mut c = client.clone();
                                async move { c.get(LEADER_KEY, None).await }
                            })
                            .await?;
                            match read.kvs().first() {
                                Some(kv) => (
                                    kv.value() == id.as_bytes() && kv.lease() == lease,
                                    kv.mod_revision(),
                                ),
                                None => continue,
                            }
                        }
                        Err(e) => return Err(e),
                    };
                    if won {
                        // Shoal counts revisions from etcd's minus one (see the crate's doc).
                        leadership.revision = u64::try_from(at - 1).unwrap_or(0);
                        return Ok(leadership);
                    }
                    wait_for_delete(&mut c, at + 1).await?;
                }
            })
            .await
            .map_err(|e| etcd_client::Error::ElectError(e.to_string()))?
    }
}

/// Waits until the leader key is deleted at or after etcd revision `from`. A watch that breaks
/// (its member died) is made again, from the same revision, at another.
async fn wait_for_delete(c: &mut Client, from: i64) -> Result<(), etcd_client::Error> {
    loop {
        let mut stream = again(Retry::Read, || {
            let mut c = c.clone();
            async move {
                c.watch(
                    LEADER_KEY,
                    Some(WatchOptions::new().with_start_revision(from)),
                )
                .await
            }
        })
        .await?;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(());
                    }
                    if resp.canceled() {
                        return Err(etcd_client::Error::WatchError(
                            "the watch of the leader key was cancelled".into(),
                        ));
                    }
                }
                // A member that dies cuts its streams (as `Unknown`, a broken pipe, as often
                // as `Unavailable`): reading again is safe whatever the cause, and a cluster
                // that cannot be watched at all fails the watch's making.
                Err(e) => {
                    tracing::debug!(error = %e, "the watch of the leader key broke; watching again");
                    break;
                }
                Ok(None) => break,
            }
        }
        tokio::time::sleep(RENEW_AGAIN).await;
    }
}

/// Runs `f` again while it fails in a way `retry` allows, for up to [`RETRY_FOR`]: the client
/// sends each call to one member, and one that is down refuses it.
async fn again<T, F, Fut>(retry: Retry, mut f: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        match f().await {
            Err(e) if retry.allows(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, "etcd call failed; trying again");
                tokio::time::sleep(RENEW_AGAIN).await;
            }
            outcome => return outcome,
        }
    }
}

/// Renews `lease` every third of its TTL and says `lost` once a renewal has not been answered
/// for a whole TTL since it was sent, or etcd says the lease is gone.
async fn keep_alive(mut client: Client, lease: i64, lost: watch::Sender<bool>) {
    let mut valid_until = Instant::now() + LEASE_TTL;
    let every = LEASE_TTL / 3;
    loop {
        let sent = Instant::now();
        let renewed = tokio::time::timeout_at(valid_until, async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map_or(0, |r| r.ttl()))
        })
        .await;
        match renewed {
            Ok(Ok(ttl)) if ttl > 0 => valid_until = sent + LEASE_TTL,
            Ok(Ok(_)) => {
                tracing::warn!(lease, "etcd says the leadership lease is gone");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => {
                // The client picks a member per call: one down refuses it, and the next try
                // most likely goes to another, at once rather than a third of the TTL later.
                tracing::warn!(lease, error = %e, "renewing the leadership lease");
                if Instant::now() < valid_until {
                    tokio::time::sleep(RENEW_AGAIN.min(valid_until - Instant::now())).await;
                    continue;
                }
            }
            Err(_) => {}
        }
        if Instant::now() >= valid_until {
            tracing::warn!(lease, "the leadership lease may have run out");
            let _ = lost.send(true);
            return;
        }
        tokio::time::sleep_until((sent + every).min(valid_until)).await;
    }
}
