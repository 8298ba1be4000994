//! Shoal's cluster state on an etcd cluster: [`EtcdStore`] keeps the [`KvStore`] contract over
//! etcd's v3 API (the `etcd-client` crate), so several control planes can share one state.
//!
//! The contract was written after etcd, so most of it is etcd's own behaviour. What this crate
//! adds:
//!
//! - **Revisions count from 0.** An empty etcd is at revision 1; Shoal's empty store is at 0.
//!   Every revision crossing this crate is etcd's minus one (compares, key bookkeeping, watch
//!   starts, compaction), so a store migrated from redb and one started on etcd number alike.
//!   The etcd cluster is Shoal's alone: another writer's transactions would take revisions too.
//! - **Compaction as the contract says it.** `compact(r)` makes revision `r` unwatchable;
//!   etcd keeps its compaction revision watchable, so Shoal's `r` is etcd's `r + 1`, and the
//!   point is learnt back from etcd when another server compacted further.
//! - **Watches that outlive a server.** A watch runs as a task that resumes from the revision
//!   after the last one it delivered when its connection to an etcd member breaks, so a member
//!   dying loses and repeats no event.
//!
//! The trait is synchronous (redb blocks on fsync); this backend runs its client on a small
//! runtime of its own and blocks the calling thread until etcd answers, which is what callers
//! already expect of a store call (they make it from `spawn_blocking`).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use shoal_store::{
    CommitObserver, Compare, Event, EventKind, KeyValue, KvStore, Op, StoreError, Txn, TxnResponse,
    WatchStream,
};
use tokio::sync::mpsc;

mod leader;
#[cfg(feature = "testing")]
pub mod testing;

pub use leader::{LEADER_KEY, LEASE_TTL, Leadership};

/// Keys per page when [`KvStore::range`] reads a prefix: each page is one etcd request, all
/// read at the revision of the first so the whole range is one snapshot.
const RANGE_PAGE: i64 = 1000;

/// The largest range page or watch response the client decodes: any. A page is [`RANGE_PAGE`]
/// keys and a watch response many revisions, each key up to etcd's request limit, far past
/// gRPC's default of 4 MiB (1,000 keys of 4 KiB); the caller holds all of it anyway.
const MAX_RESPONSE: usize = usize::MAX;

/// Responses (each a batch of whole revisions) a watch may hold for a slow consumer before the
/// task stops reading from etcd (etcd then keeps the rest for it, or reports them compacted).
const WATCH_BUFFER: usize = 256;

/// How long a call keeps trying other members before its error reaches the caller: longer than
/// an etcd leader election takes.
const RETRY_FOR: Duration = Duration::from_secs(10);

/// etcd's `--max-txn-ops` unless configured: it caps the compares and each branch's operations
/// of a transaction, and those of a transaction nested in one at what the outer leaves (128 less
/// the outer's own), so it bounds how many transactions of one [`KvStore::txns`] call etcd
/// commits as one, each nested in one etcd transaction: one raft proposal and WAL fsync.
const TXN_OPS: usize = 128;

/// Bytes of keys and values past which no more transactions join a shared commit: etcd
/// refuses a request over `--max-request-bytes`, 1.5 MiB unless configured.
const BYTES_PER_COMMIT: usize = 512 * 1024;

/// Which failures a call may be sent again after, as etcd's Go client decides it.
#[derive(Clone, Copy)]
enum Retry {
    /// A read: after any failure to reach a member, a connection cut under it, or a member
    /// without a leader.
    Read,
    /// A write: only when it never reached a member (no connection), since a write cut off
    /// after it was sent may have committed, and sending it again would apply it twice.
    Write,
}

impl Retry {
    fn allows(self, e: &etcd_client::Error) -> bool {
        let status = match e {
            etcd_client::Error::TransportError(_) => return true,
            etcd_client::Error::GRpcStatus(status) => status,
            _ => return false,
        };
        // A member that dies mid-call may cut its connection under the call: tonic says
        // `Unknown: transport error` then (a reset), or `Cancelled` (the connection closed
        // before the answer), and a read may be sent again after either.
        let cut = (status.code() == tonic::Code::Unknown && status.message() == "transport error")
            || status.code() == tonic::Code::Cancelled;
        if status.code() != tonic::Code::Unavailable {
            return cut && matches!(self, Retry::Read);
        }
        match self {
            Retry::Read => true,
            Retry::Write => {
                let m = status.message();
                // Refused before it was proposed: no connection, or no leader to propose to.
                m.contains("tcp connect error")
                    || m.contains("error trying to connect")
                    || m.contains("etcdserver: no leader")
            }
        }
    }
}

/// How to reach an etcd cluster: its members' client URLs and, for TLS, the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each member; the client spreads requests over them and skips dead ones.
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA its members' certificates chain to, and optionally a client identity
/// for members that require client certificates (`--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    /// Parses `etcd://host:port,host:port`: the form `shoal server --store` takes.
    pub fn parse(url: &str) -> Result<EtcdConfig, EtcdError> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| EtcdError::Config(format!("{url:?} does not start with etcd://")))?;
        let endpoints: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .map(String::from)
            .collect();
        for e in &endpoints {
            let port = e
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return Err(EtcdError::Config(format!(
                    "{e:?} in {url:?} is not host:port"
                )));
            }
        }
        Ok(EtcdConfig {
            endpoints,
            tls: None,
        })
    }

    /// The members' URLs for the client: `https://` when TLS is configured.
    fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }
}

/// Why the etcd backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd store address: {0}")]
    Config(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the etcd client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("connecting to etcd: {0}")]
    Connect(#[from] etcd_client::Error),
}

/// The [`KvStore`] contract on an etcd cluster. Cheap to share behind an `Arc`.
pub struct EtcdStore {
    runtime: Runtime,
    client: Client,
    /// The compaction point as far as this process knows it (Shoal's numbering): raised by its
    /// own compactions and by what etcd reports; read by watches to refuse compacted history.
    compacted: Arc<AtomicU64>,
    observer: Mutex<Option<Arc<CommitObserver>>>,
    /// The etcd cluster's id, as its first answer gave it: [`KvStore::id`].
    cluster: u64,
}

impl EtcdStore {
    /// Connects to the cluster and checks that it answers.
    pub fn connect(config: &EtcdConfig) -> Result<EtcdStore, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &config.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| EtcdError::Read {
                    path: path.clone(),
                    source,
                })
            };
            let mut opts = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                opts = opts.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(opts);
        }
        let runtime = Runtime::new()?;
        let urls = config.urls();
        let (client, cluster) = runtime
            .block_on(async move {
                let client = Client::connect(urls, Some(options)).await?;
                // `connect` does not talk to anyone yet: a first read shows the cluster answers,
                // tried again as any read is, as one member down may be the one it went to.
                let deadline = tokio::time::Instant::now() + RETRY_FOR;
                let first = loop {
                    let read = client
                        .clone()
                        .get("/", Some(GetOptions::new().with_count_only()))
                        .await;
                    match read {
                        Err(e)
                            if Retry::Read.allows(&e) && tokio::time::Instant::now() < deadline =>
                        {
                            tracing::debug!(error = %e, "etcd's first read failed; trying again");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        read => break read?,
                    }
                };
                let cluster = first.header().map_or(0, |h| h.cluster_id());
                Ok::<_, etcd_client::Error>((client, cluster))
            })
            .map_err(|e| EtcdError::Runtime(std::io::Error::other(e)))??;
        Ok(EtcdStore {
            runtime,
            client,
            compacted: Arc::new(AtomicU64::new(0)),
            observer: Mutex::new(None),
            cluster,
        })
    }

    /// How many keys the cluster holds, and the first of them, read without their values:
    /// whether someone's state is there already, before a copy into it.
    pub fn keys_held(&self) -> Result<(u64, Option<String>), StoreError> {
        let mut resp = self.call(Retry::Read, |mut c| async move {
            let options = GetOptions::new()
                .with_all_keys()
                .with_keys_only()
                .with_limit(1);
            c.get(vec![0], Some(options)).await
        })?;
        let count = resp.count().max(0) as u64;
        let first = resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned());
        Ok((count, first))
    }

    /// The client, for what the store contract does not cover (leader election on a lease).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `f` on this store's runtime and waits for it from any thread, inside an async
    /// context or not.
    pub fn block_on<F>(&self, f: F) -> Result<F::Output, StoreError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.block_on(f).map_err(|e| db(format!("{e}")))
    }

    /// Runs one etcd call, again while it fails in a way that allows it (see [`Retry`]) for up
    /// to [`RETRY_FOR`]: the client sends each request to one member, and a dead one refuses it.
    fn call<T, F>(
        &self,
        retry: Retry,
        f: impl Fn(Client) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        self.call_raw(retry, f)?.map_err(store_error)
    }

    /// [`EtcdStore::call`], with etcd's own error for the caller to judge.
    fn call_raw<T, F>(
        &self,
        retry: Retry,
        f: impl Fn(Client) -> F + Send + 'static,
    ) -> Result<Result<T, etcd_client::Error>, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let client = self.client.clone();
        self.block_on(async move {
            let deadline = tokio::time::Instant::now() + RETRY_FOR;
            let mut backoff = Duration::from_millis(20);
            loop {
                match f(client.clone()).await {
                    Err(e) if retry.allows(&e) && tokio::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, "etcd call failed; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                    outcome => return outcome,
                }
            }
        })
    }

    /// Tells the commit observer how long a commit that wrote took.
    fn observe(&self, took: Duration) {
        let observer = self.observer.lock().expect("observer lock").clone();
        if let Some(observe) = observer {
            observe(took);
        }
    }

    /// Commits `group` (transactions sharing no key, each with where its answer goes) as one
    /// etcd transaction with each nested in it; one alone goes as it is. If etcd refuses the
    /// whole as too large for its limits (it proposed nothing then), each goes alone.
    fn commit_together(
        &self,
        group: Vec<(usize, Txn)>,
    ) -> Vec<(usize, Result<TxnResponse, StoreError>)> {
        let alone = |group: Vec<(usize, Txn)>| -> Vec<_> {
            group
                .into_iter()
                .map(|(at, txn)| (at, self.txn(txn)))
                .collect()
        };
        if group.len() == 1 {
            return alone(group);
        }
        let (at, converted): (Vec<usize>, Vec<(EtcdTxn, [bool; 2])>) = group
            .iter()
            .map(|(at, txn)| (*at, etcd_txn(txn.clone())))
            .unzip();
        let outer = EtcdTxn::new().and_then(
            converted
                .iter()
                .map(|(t, _)| TxnOp::txn(t.clone()))
                .collect::<Vec<_>>(),
        );
        let started = Instant::now();
        let resp = self.call_raw(Retry::Write, move |mut c| {
            let txn = outer.clone();
            async move { c.txn(txn).await }
        });
        let resp = match resp {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if refused_as_too_large(&e) => {
                tracing::debug!(error = %e, transactions = group.len(), "etcd refused them together; sending each alone");
                return alone(group);
            }
            Ok(Err(e)) => {
                let e = store_error(e);
                return at.into_iter().map(|at| (at, Err(e.duplicate()))).collect();
            }
            Err(e) => return at.into_iter().map(|at| (at, Err(e.duplicate()))).collect(),
        };
        let revision = shoal_rev(header_revision(resp.header()));
        let nested: Vec<bool> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                etcd_client::TxnOpResponse::Txn(t) => Some(t.succeeded()),
                _ => None,
            })
            .collect();
        if nested.len() != at.len() {
            let e = db(format!(
                "etcd answered {} of {} transactions committed together",
                nested.len(),
                at.len()
            ));
            return at.into_iter().map(|at| (at, Err(e.duplicate()))).collect();
        }
        let wrote: Vec<bool> = converted
            .iter()
            .zip(&nested)
            .map(|((_, wrote), succeeded)| wrote[usize::from(!succeeded)])
            .collect();
        let any_wrote = wrote.iter().any(|w| *w);
        if any_wrote {
            self.observe(started.elapsed());
        }
        // One that wrote nothing was judged against the state before the commit.
        let judged_at = if any_wrote {
            revision.saturating_sub(1)
        } else {
            revision
        };
        at.into_iter()
            .zip(nested.into_iter().zip(wrote))
            .map(|(at, (succeeded, wrote))| {
                let revision = if wrote { revision } else { judged_at };
                (
                    at,
                    Ok(TxnResponse {
                        succeeded,
                        revision,
                    }),
                )
            })
            .collect()
    }

    /// The compaction point in etcd, read with a watch from its first revision: etcd answers
    /// one that starts in compacted history with the compaction revision and nothing else.
    fn read_compacted(&self) -> Result<u64, StoreError> {
        let compact = self.call(Retry::Read, |mut c| async move {
            let mut stream = c
                .watch(
                    "\0compaction-probe",
                    Some(WatchOptions::new().with_start_revision(1)),
                )
                .await?;
            while let Some(resp) = stream.message().await? {
                if resp.compact_revision() > 0 {
                    return Ok(resp.compact_revision());
                }
            }
            Err(etcd_client::Error::WatchError(
                "etcd ended the compaction probe without an answer".into(),
            ))
        })?;
        let compacted = shoal_rev(compact);
        Ok(self
            .compacted
            .fetch_max(compacted, Ordering::SeqCst)
            .max(compacted))
    }
}

impl KvStore for EtcdStore {
    fn id(&self) -> u64 {
        self.cluster
    }

    fn revision(&self) -> u64 {
        // The trait cannot fail here; a store that does not answer is caught by the next call
        // that can, and 0 is no revision a caller acts on.
        self.call(Retry::Read, |mut c| async move {
            c.get("/", Some(GetOptions::new().with_count_only())).await
        })
        .map(|r| shoal_rev(header_revision(r.header())))
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading etcd's revision");
            0
        })
    }

    fn compacted_revision(&self) -> u64 {
        let known = self.compacted.load(Ordering::SeqCst);
        // A read at the etcd revision we compacted at fails only if someone compacted further.
        let probe = etcd_rev(known).max(1);
        let moved = self.call(Retry::Read, move |mut c| async move {
            c.get(
                "\0compaction-probe",
                Some(GetOptions::new().with_revision(probe)),
            )
            .await
        });
        match moved {
            Ok(_) => known,
            Err(StoreError::Compacted { .. }) => self.read_compacted().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading etcd's compaction point");
                known
            }),
            Err(e) => {
                tracing::warn!(error = %e, "reading etcd's compaction point");
                known
            }
        }
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        let mut resp = self.call(Retry::Read, move |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        resp.take_kvs()
            .into_iter()
            .next()
            .map(key_value)
            .transpose()
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut start = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE)
                .with_revision(at);
            let key = start.clone();
            let mut resp = self.call(Retry::Read, move |c| {
                let (key, options) = (key.clone(), options.clone());
                let mut kv = c.kv_client().max_decoding_message_size(MAX_RESPONSE);
                async move { kv.get(key, Some(options)).await }
            })?;
            if at == 0 {
                at = header_revision(resp.header());
            }
            let more = resp.more();
            for kv in resp.take_kvs() {
                start = kv.key().to_vec();
                out.push(key_value(kv)?);
            }
            if !more {
                return Ok((out, shoal_rev(at)));
            }
            // The next page starts just after the last key read.
            start.push(0);
        }
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        txn.validate()?;
        let (etcd_txn, wrote) = etcd_txn(txn);
        let started = Instant::now();
        let resp = self.call(Retry::Write, move |mut c| {
            let txn = etcd_txn.clone();
            async move { c.txn(txn).await }
        })?;
        if wrote[usize::from(!resp.succeeded())] {
            self.observe(started.elapsed());
        }
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: shoal_rev(header_revision(resp.header())),
        })
    }

    /// Commits transactions that share no key as one etcd transaction, each nested in it
    /// (within [`TXN_OPS`] and [`BYTES_PER_COMMIT`]): a controller pass of many batches
    /// pays a few raft proposals and WAL fsyncs, not one each. The nested compares are all
    /// judged before any of their writes, which is what one after another would see since
    /// they share no key; those that write share the new revision. A transaction touching a
    /// key of an earlier one goes in a later commit, so it sees it.
    fn txns(&self, txns: Vec<Txn>) -> Vec<Result<TxnResponse, StoreError>> {
        let mut answers: Vec<Option<Result<TxnResponse, StoreError>>> = Vec::new();
        let mut valid = Vec::new();
        for txn in txns {
            match txn.validate() {
                Err(e) => answers.push(Some(Err(e))),
                Ok(()) => {
                    valid.push((answers.len(), txn));
                    answers.push(None);
                }
            }
        }
        let runs = independent_runs(valid.iter().map(|(_, t)| t));
        let mut valid = valid.into_iter();
        for run in runs {
            let mut run: Vec<(usize, Txn)> = valid.by_ref().take(run).collect();
            while !run.is_empty() {
                let (mut bytes, mut widest) = (0, 0);
                let together = (run.iter().enumerate())
                    .take_while(|(n, (_, t))| {
                        bytes += txn_bytes(t);
                        widest = widest.max(txn_ops(t));
                        n + 1 + widest <= TXN_OPS && bytes <= BYTES_PER_COMMIT
                    })
                    .count()
                    .max(1);
                let group: Vec<(usize, Txn)> = run.drain(..together).collect();
                for (at, answer) in self.commit_together(group) {
                    answers[at] = Some(answer);
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every transaction is answered"))
            .collect()
    }

    fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        let compacted = self.compacted.load(Ordering::SeqCst);
        if from_revision > 0 && from_revision <= compacted {
            return Err(StoreError::Compacted { compacted });
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let task = WatchTask {
            client: self.client.clone(),
            prefix: prefix.to_owned(),
            // "From now" is now, when this is called: the task's watch starts later, and a
            // write in between would be lost if etcd chose the start.
            next: match from_revision {
                0 => match self.revision() {
                    0 => 0,
                    now => etcd_rev(now + 1),
                },
                from => etcd_rev(from),
            },
            compacted: Arc::clone(&self.compacted),
            tx,
        };
        self.runtime.spawn(task.run());
        Ok(watch_stream(rx, Arc::clone(&self.compacted)))
    }

    fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let current = self.revision();
        if revision > current {
            return Err(StoreError::FutureRevision { revision, current });
        }
        if revision <= self.compacted.load(Ordering::SeqCst) {
            return Ok(());
        }
        let at = etcd_rev(revision);
        match self.call(Retry::Write, move |mut c| async move {
            c.compact(at, None).await
        }) {
            Ok(_) => {
                self.compacted.fetch_max(revision, Ordering::SeqCst);
                Ok(())
            }
            // Another server compacted at least this far.
            Err(StoreError::Compacted { .. }) => self.read_compacted().map(drop),
            Err(e) => Err(e),
        }
    }

    fn observe_commits(&self, observer: CommitObserver) {
        *self.observer.lock().expect("observer lock") = Some(Arc::new(observer));
    }

    /// One linearizable read (it needs a quorum, as a write does), tried once, within
    /// [`CHECK_WITHIN`].
    fn check(&self) -> Result<(), StoreError> {
        let client = self.client.clone();
        let answered = self.block_on(async move {
            let read = async move {
                let mut client = client;
                client
                    .get("/", Some(GetOptions::new().with_count_only()))
                    .await
            };
            tokio::time::timeout(CHECK_WITHIN, read).await
        })?;
        match answered {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(store_error(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd did not answer a read within {CHECK_WITHIN:?}"
            ))),
        }
    }
}

/// How long a health check waits for etcd.
const CHECK_WITHIN: Duration = Duration::from_secs(1);

/// One watch's reader: follows etcd's watch and resumes it, from the revision after the last
/// one delivered, whenever the connection to the member serving it breaks.
struct WatchTask {
    client: Client,
    prefix: String,
    /// The etcd revision to (re)start from; 0 until the first watch says where "now" is.
    next: i64,
    compacted: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
}

impl WatchTask {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let tx = self.tx.clone();
            let outcome = tokio::select! {
                outcome = self.follow() => outcome,
                () = tx.closed() => return,
            };
            match outcome {
                Ok(Flow::Stop) => return,
                Ok(Flow::Resume) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, next = self.next, error = %e,
                        "etcd watch broke; resuming");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Follows one etcd watch until it ends or fails.
    async fn follow(&mut self) -> Result<Flow, etcd_client::Error> {
        let mut options = WatchOptions::new()
            .with_prev_key()
            .with_start_revision(self.next);
        options = if self.prefix.is_empty() {
            options.with_all_keys()
        } else {
            options.with_prefix()
        };
        let mut stream = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE)
            .watch(self.prefix.as_str(), Some(options))
            .await?;
        while let Some(resp) = stream.message().await? {
            if resp.compact_revision() > 0 {
                let compacted = shoal_rev(resp.compact_revision());
                self.compacted.fetch_max(compacted, Ordering::SeqCst);
                let _ = self.tx.send(Err(StoreError::Compacted { compacted })).await;
                return Ok(Flow::Stop);
            }
            if resp.created() && self.next == 0 {
                self.next = header_revision(resp.header()) + 1;
            }
            if resp.canceled() {
                return Err(etcd_client::Error::WatchError(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            if resp.events().is_empty() {
                continue;
            }
            let batch = match resp
                .events()
                .iter()
                .map(event)
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Ok(Flow::Stop);
                }
            };
            let last = batch.last().map_or(0, |e| e.kv.mod_revision);
            // One response holds whole revisions (etcd does not split one), and it is passed on
            // whole, so a consumer finds the rest of a transaction's events ready once it has
            // the first, as with redb.
            if self.tx.send(Ok(batch)).await.is_err() {
                return Ok(Flow::Stop);
            }
            self.next = etcd_rev(last) + 1;
        }
        Ok(Flow::Resume)
    }
}

enum Flow {
    Stop,
    Resume,
}

/// The consumer's side of a watch. An event at or below the compaction point this process knows
/// of is history compacted while the consumer was behind: it reports that, as the contract asks,
/// rather than hand out history a re-list would not agree with.
fn watch_stream(
    rx: mpsc::Receiver<Result<Vec<Event>, StoreError>>,
    compacted: Arc<AtomicU64>,
) -> WatchStream {
    let state = Some((rx, VecDeque::new()));
    WatchStream::new(futures::stream::unfold(state, move |state| {
        let compacted = Arc::clone(&compacted);
        async move {
            let (mut rx, mut ready) = state?;
            if ready.is_empty() {
                match rx.recv().await? {
                    Ok(batch) => ready.extend(batch),
                    Err(e) => return Some((Err(e), None)),
                }
            }
            let event: Event = ready.pop_front()?;
            let point = compacted.load(Ordering::SeqCst);
            if event.kv.mod_revision <= point {
                return Some((Err(StoreError::Compacted { compacted: point }), None));
            }
            Some((Ok(event), Some((rx, ready))))
        }
    }))
}

/// The client's own runtime: two threads, shut down without waiting when the store is dropped
/// (which may happen inside another runtime, where a blocking shutdown would panic).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn new() -> Result<Runtime, EtcdError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map(|rt| Runtime(Some(rt)))
            .map_err(EtcdError::Runtime)
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime lives until drop").handle()
    }

    fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle().spawn(f);
    }

    /// Waits for `f` on the calling thread without entering a runtime, so it works from a
    /// blocking thread and from inside another runtime's task. On a worker of a multi-threaded
    /// runtime it first hands the worker's queued tasks to another thread (`block_in_place`):
    /// a task the worker had just woken, which tokio does not let other workers steal, would
    /// otherwise wait for as long as the call, and the call may be waiting for that task (a
    /// node's watch stream hung for good that way after a leader change).
    fn block_on<F>(&self, f: F) -> Result<F::Output, tokio::task::JoinError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.handle().spawn(f);
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_worker {
            tokio::task::block_in_place(|| futures::executor::block_on(task))
        } else {
            futures::executor::block_on(task)
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A store transaction as etcd's, and whether each branch writes: `[success, failure]`.
fn etcd_txn(txn: Txn) -> (EtcdTxn, [bool; 2]) {
    let compares: Vec<EtcdCompare> = txn
        .compares
        .iter()
        .map(|c| match c {
            Compare::ModRevision { key, revision } => EtcdCompare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                if *revision == 0 {
                    0
                } else {
                    etcd_rev(*revision)
                },
            ),
            Compare::Version { key, version } => {
                EtcdCompare::version(key.as_str(), CompareOp::Equal, *version as i64)
            }
        })
        .collect();
    let wrote = [!txn.success.is_empty(), !txn.failure.is_empty()];
    let etcd_txn = EtcdTxn::new()
        .when(compares)
        .and_then(etcd_ops(txn.success))
        .or_else(etcd_ops(txn.failure));
    (etcd_txn, wrote)
}

/// What etcd counts of a transaction against `--max-txn-ops`: its compares or the operations
/// of its longer branch, whichever are more.
fn txn_ops(txn: &Txn) -> usize {
    (txn.compares.len())
        .max(txn.success.len())
        .max(txn.failure.len())
}

/// About how many bytes a transaction sends: its keys and values.
fn txn_bytes(txn: &Txn) -> usize {
    let compared = txn.compares.iter().map(|c| match c {
        Compare::ModRevision { key, .. } | Compare::Version { key, .. } => key.len(),
    });
    let written = txn.success.iter().chain(&txn.failure).map(|op| match op {
        Op::Put { key, value } => key.len() + value.len(),
        Op::Delete { key } => key.len(),
        Op::DeletePrefix { prefix } => prefix.len(),
    });
    compared.chain(written).sum()
}

/// The lengths of the runs `txns` split into, in order, such that no transaction of a run
/// writes a key another of the run compares or writes (a deleted prefix touching every key
/// under it): a run can be committed at once without changing what any of them sees, and
/// etcd refuses one transaction writing a key twice. Keys only compared (a controller's
/// guard on the leader key, in every one of its writes) keep no two apart.
fn independent_runs<'a>(txns: impl Iterator<Item = &'a Txn>) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut len = 0;
    let (mut read, mut written): (HashSet<&str>, HashSet<&str>) = Default::default();
    let mut prefixes: Vec<&str> = Vec::new();
    for txn in txns {
        let mut own_read = Vec::new();
        let mut own_written = Vec::new();
        let mut own_prefixes = Vec::new();
        for c in &txn.compares {
            match c {
                Compare::ModRevision { key, .. } | Compare::Version { key, .. } => {
                    own_read.push(key.as_str())
                }
            }
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match op {
                Op::Put { key, .. } | Op::Delete { key } => own_written.push(key.as_str()),
                Op::DeletePrefix { prefix } => own_prefixes.push(prefix.as_str()),
            }
        }
        let under = |k: &str| prefixes.iter().any(|p| k.starts_with(p));
        let clash = own_written
            .iter()
            .any(|k| read.contains(k) || written.contains(k) || under(k))
            || own_read.iter().any(|k| written.contains(k) || under(k))
            || own_prefixes.iter().any(|p| {
                read.iter().chain(&written).any(|k| k.starts_with(p))
                    || prefixes
                        .iter()
                        .any(|q| p.starts_with(q) || q.starts_with(p))
            });
        if clash {
            runs.push(len);
            len = 0;
            read.clear();
            written.clear();
            prefixes.clear();
        }
        len += 1;
        read.extend(own_read);
        written.extend(own_written);
        prefixes.extend(own_prefixes);
    }
    if len > 0 {
        runs.push(len);
    }
    runs
}

/// Whether etcd refused a request for its size or number of operations, before proposing it.
fn refused_as_too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
        ),
        _ => false,
    }
}

fn etcd_ops(ops: Vec<Op>) -> Vec<TxnOp> {
    // etcd refuses a transaction that writes one key twice; the contract lets the later write
    // win, so only that one is sent.
    let mut last: Vec<Op> = Vec::with_capacity(ops.len());
    for op in ops {
        if let Op::Put { key, .. } | Op::Delete { key } = &op {
            last.retain(
                |o| !matches!(o, Op::Put { key: k, .. } | Op::Delete { key: k } if k == key),
            );
        }
        last.push(op);
    }
    last.into_iter()
        .map(|op| match op {
            Op::Put { key, value } => TxnOp::put(key, value, None),
            Op::Delete { key } => TxnOp::delete(key, None),
            Op::DeletePrefix { prefix } if prefix.is_empty() => {
                TxnOp::delete(vec![0], Some(DeleteOptions::new().with_all_keys()))
            }
            Op::DeletePrefix { prefix } => {
                TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()))
            }
        })
        .collect()
}

/// The end of the key range holding every key that starts with `prefix`; `[0]` (etcd's "to the
/// end") for the empty prefix or one of only 0xff bytes.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Shoal's revision for etcd's: etcd starts at 1 where Shoal starts at 0.
fn shoal_rev(etcd: i64) -> u64 {
    (etcd - 1).max(0) as u64
}

fn etcd_rev(shoal: u64) -> i64 {
    shoal as i64 + 1
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

fn key_value(kv: etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let (create, modified, version) = (kv.create_revision(), kv.mod_revision(), kv.version());
    let (key, value) = kv.into_key_value();
    Ok(KeyValue {
        key: String::from_utf8(key).map_err(|_| db("etcd holds a key that is not UTF-8"))?,
        value,
        create_revision: if create == 0 { 0 } else { shoal_rev(create) },
        mod_revision: shoal_rev(modified),
        version: version as u64,
    })
}

fn event(ev: &etcd_client::Event) -> Result<Event, StoreError> {
    let kv = ev
        .kv()
        .cloned()
        .ok_or_else(|| db("etcd sent an event without its key"))?;
    let kind = match ev.event_type() {
        EventType::Put => EventKind::Put,
        EventType::Delete => EventKind::Delete,
    };
    Ok(Event {
        kind,
        kv: key_value(kv)?,
        prev_value: ev.prev_kv().map(|p| p.value().to_vec()),
    })
}

fn db(message: impl Into<String>) -> StoreError {
    StoreError::Db(message.into())
}

/// etcd's errors as the store's: its compaction and size refusals by their text (that is all
/// gRPC carries of them); no member reached, or none able to serve (no leader, a request
/// timed out: a lost quorum), as unavailable; everything else as a database error.
fn store_error(e: etcd_client::Error) -> StoreError {
    let text = e.to_string();
    let unavailable = match &e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    };
    if text.contains("required revision has been compacted") {
        StoreError::Compacted { compacted: 0 }
    } else if text.contains("request is too large") || text.contains("message larger than max") {
        StoreError::TooLarge(format!("etcd: {text}"))
    } else if unavailable {
        StoreError::Unavailable(format!("etcd: {text}"))
    } else {
        db(format!("etcd: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Txn {
        Txn::new().then(Op::put(key, "v"))
    }

    #[test]
    fn a_call_cut_under_it_is_read_again_but_never_written_again() {
        for cut in [
            tonic::Status::unknown("transport error"),
            tonic::Status::cancelled("operation was canceled"),
        ] {
            let e = etcd_client::Error::GRpcStatus(cut);
            assert!(Retry::Read.allows(&e), "{e}");
            assert!(!Retry::Write.allows(&e), "{e}");
        }
        let refused = etcd_client::Error::GRpcStatus(tonic::Status::unknown("something else"));
        assert!(!Retry::Read.allows(&refused));
    }

    #[test]
    fn a_write_etcd_finds_too_large_is_said_so() {
        for refusal in [
            tonic::Status::invalid_argument("etcdserver: request is too large"),
            tonic::Status::resource_exhausted("grpc: received message larger than max (2 vs. 1)"),
        ] {
            let e = store_error(etcd_client::Error::GRpcStatus(refusal));
            assert!(matches!(e, StoreError::TooLarge(_)), "{e}");
        }
        let other = tonic::Status::internal("etcdserver: corrupt cluster");
        let e = store_error(etcd_client::Error::GRpcStatus(other));
        assert!(matches!(e, StoreError::Db(_)), "{e}");
        // A lost quorum: nothing the request can change, asked again later it may work.
        for lost in [
            tonic::Status::unavailable("etcdserver: request timed out"),
            tonic::Status::unavailable("etcdserver: no leader"),
            tonic::Status::deadline_exceeded("context deadline exceeded"),
        ] {
            let e = store_error(etcd_client::Error::GRpcStatus(lost));
            assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        }
    }

    #[test]
    fn transactions_touching_a_key_of_an_earlier_one_start_a_new_run() {
        let txns = [
            put("/apps/a"),
            put("/apps/b"),
            // Compares a key the first writes: it must see that write.
            Txn::new()
                .when_absent("/apps/a")
                .then(Op::put("/apps/c", "v")),
            put("/apps/d"),
            // Deletes under a prefix the run before holds keys of.
            Txn::new().then(Op::delete_prefix("/apps/")),
            put("/nodes/n1"),
            // Written under the prefix deleted in its run.
            put("/apps/e"),
        ];
        assert_eq!(independent_runs(txns.iter()), [2, 2, 2, 1]);
        assert!(independent_runs([].iter()).is_empty());
        let apart: Vec<Txn> = (0..5).map(|i| put(&format!("/k{i}"))).collect();
        assert_eq!(independent_runs(apart.iter()), [5]);
        // A key every one only compares (the controller's leader key) keeps none apart; one
        // that writes it does.
        let fenced: Vec<Txn> = (0..5)
            .map(|i| put(&format!("/k{i}")).when_mod_revision("/leader", 7))
            .collect();
        assert_eq!(independent_runs(fenced.iter()), [5]);
        let mut taken = fenced.clone();
        taken.insert(2, put("/leader"));
        assert_eq!(independent_runs(taken.iter()), [2, 1, 3]);
    }
}
