//! `shoal logs`: the output of every replica of an app, read from the nodes that keep it.
//!
//! Each node keeps its replicas' output (in memory and on its disk) and serves it to the
//! cluster's members at `GET /_shoal/logs/{replica}` on its gateway, as NDJSON
//! [`LogEntry`]s numbered per replica. The control plane reads it there with its member
//! certificate, the same way whether the node is in its own process (`shoal up`) or not.
//!
//! Without `follow` the answer is every replica's lines (the last `tail` of each, written
//! since `since`), merged in time order. With it, one follower per replica then streams
//! what comes next, resuming from the next sequence number after its node restarts; the
//! replicas are listed again every second, so a rollout's new replicas and a replacement on
//! another node join the stream. It ends when the client goes, the app is deleted, or every
//! replica has finished (a job's runs) and said all it had; a job's follow that starts with
//! no run going waits for the next one.

use crate::error::ControlError;
use crate::state::{ControlPlane, blocking};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use shoal_core::logs::{LogEntry, LogStream};
use shoal_core::objects::keys;
use shoal_core::spec::AppKey;
use shoal_core::{Kind, Node, Replica};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a follow looks for the app's new and gone replicas, and retries a node it
/// lost.
const RELIST: Duration = Duration::from_secs(1);

/// How long the first read of one replica's lines may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `GET /v1/apps/{name}/logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub follow: bool,
    /// The last this many lines of each replica.
    pub tail: Option<usize>,
    /// Only this replica.
    pub replica: Option<String>,
    /// Only lines written at or after this time (ms since the epoch).
    pub since_time: Option<shoal_core::Millis>,
    /// Each line with its time (text only).
    pub timestamps: bool,
    /// NDJSON [`LogEntry`]s instead of text.
    pub json: bool,
}

impl LogQuery {
    fn render(&self, entry: &LogEntry) -> String {
        if self.json {
            let mut line = serde_json::to_string(entry).expect("a log entry serialises");
            line.push('\n');
            line
        } else {
            entry.text(self.timestamps)
        }
    }
}

/// One replica of the app, where its output is.
#[derive(Debug, Clone)]
struct Target {
    id: String,
    /// Its node and that node's gateway, if it is placed on a node that exists.
    at: Option<(String, String)>,
    /// It finished (a job's run): its output is complete.
    done: bool,
}

/// What a follow of an app's logs reads.
struct Targets {
    /// Whether the follow ends once every one of `list` is done: for a job's runs, or the
    /// one replica asked for.
    ends: bool,
    list: Vec<Target>,
}

impl ControlPlane {
    /// The replicas of `app` (only `only`, if given) and their nodes' gateways; `None` if
    /// the app does not exist.
    fn log_targets(
        &self,
        app: &AppKey,
        only: Option<&str>,
    ) -> Result<Option<Targets>, ControlError> {
        let Some((found, _)) = self.get::<shoal_core::App>(&keys::app(app))? else {
            return Ok(None);
        };
        let gateways: HashMap<String, String> = self
            .list::<Node>(&keys::NODES)?
            .into_iter()
            .map(|n| (n.name, n.gateway))
            .collect();
        let list = self
            .list::<Replica>(&keys::replicas_of(app))?
            .into_iter()
            .filter(|r| only.is_none_or(|id| id == r.id))
            .map(|r| Target {
                at: r
                    .node
                    .as_ref()
                    .and_then(|n| Some((n.clone(), gateways.get(n)?.clone()))),
                done: r.phase.is_terminal(),
                id: r.id,
            })
            .collect();
        Ok(Some(Targets {
            ends: only.is_some() || found.spec.component.kind == Kind::Job,
            list,
        }))
    }

    /// The body of `GET /v1/apps/{name}/logs`: text or NDJSON, as `query` says.
    pub async fn app_logs(
        &self,
        app: AppKey,
        query: LogQuery,
    ) -> Result<impl Stream<Item = Bytes> + Send + 'static, ControlError> {
        self.members()?;
        let (cp, key, only) = (self.clone(), app.clone(), query.replica.clone());
        let targets = blocking(move || cp.log_targets(&key, only.as_deref()))
            .await?
            .ok_or_else(|| ControlError::not_found(format!("app {app} does not exist")))?
            .list;
        if let Some(id) = &query.replica
            && targets.is_empty()
        {
            // One that stopped (a rollout replaced it, say) left its output on its node for
            // an hour: all of it there is, since nothing more will come.
            let Some(entries) = self.stopped_replica_logs(&app, id, &query).await? else {
                return Err(ControlError::not_found(format!(
                    "app {app} has no replica {id}, nor did one stop within the hour on a \
                     node (see `shoal get replicas --app {}`)",
                    app.name
                )));
            };
            let text: String = entries.iter().map(|e| query.render(e)).collect();
            return Ok(futures::stream::once(async move { Bytes::from(text) }).boxed());
        }
        // A replica not placed yet has written nothing.
        let placed = targets.iter().filter_map(|t| Some((t, t.at.as_ref()?)));
        let reads = placed.map(|(t, (node, gateway))| {
            let mut url = logs_url(gateway, &t.id, 0, &query);
            if let Some(n) = query.tail {
                url.push_str(&format!("&tail={n}"));
            }
            let (http, id) = (self.member_client(node), t.id.clone());
            async move {
                match http {
                    Ok(http) => read_all(&http, id, url).await,
                    Err(e) => vec![unreadable(id, e.to_string())],
                }
            }
        });
        let mut entries: Vec<LogEntry> = futures::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect();
        entries.sort_by(|a, b| (a.time, &a.replica, a.seq).cmp(&(b.time, &b.replica, b.seq)));
        // Where each replica's follower starts: after what was shown.
        let mut next: HashMap<String, u64> = HashMap::new();
        for e in entries.iter().filter(|e| e.seq != LogEntry::NOTICE) {
            let n = next.entry(e.replica.clone()).or_default();
            *n = (*n).max(e.seq.saturating_add(1));
        }
        let first: String = entries.iter().map(|e| query.render(e)).collect();
        let first = futures::stream::once(async move { Bytes::from(first) });
        if !query.follow {
            return Ok(first.boxed());
        }
        // Every replica listed now starts where its lines above ended; one that showed none
        // starts with the same `tail` (`--tail 0`: from now on).
        let known: HashMap<String, (u64, Option<usize>)> = targets
            .iter()
            .map(|t| match next.get(&t.id) {
                Some(n) => (t.id.clone(), (*n, None)),
                None => (t.id.clone(), (0, query.tail)),
            })
            .collect();
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(follow(self.clone(), app, query, known, tx));
        let rest =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        Ok(first.chain(rest).boxed())
    }

    /// The output of replica `id` of `app` that is no longer in the cluster, from the node
    /// that still keeps it (each node is asked; one keeps it); `None` if none does.
    async fn stopped_replica_logs(
        &self,
        app: &AppKey,
        id: &str,
        query: &LogQuery,
    ) -> Result<Option<Vec<LogEntry>>, ControlError> {
        let cp = self.clone();
        let nodes = blocking(move || cp.list::<Node>(&keys::NODES)).await?;
        let reads = nodes.into_iter().map(|node| {
            let mut url = logs_url(&node.gateway, id, 0, query);
            url.push_str(&format!("&app={app}"));
            if let Some(n) = query.tail {
                url.push_str(&format!("&tail={n}"));
            }
            let http = self.member_client(&node.name);
            async move {
                let response = http.ok()?.get(&url).timeout(READ_TIMEOUT).send().await;
                let text = response.ok().filter(|r| r.status().is_success())?;
                let text = text.text().await.ok()?;
                Some(
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<LogEntry>(l).ok())
                        .collect::<Vec<_>>(),
                )
            }
        });
        Ok(futures::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .next())
    }

    /// The control plane's certificate for reaching nodes, renewed first if it is due;
    /// unavailable without a cluster CA.
    pub(crate) fn members(&self) -> Result<&shoal_tls::Mutual, ControlError> {
        let (Some(members), Some(ca)) = (&self.inner.members, &self.config().authority) else {
            return Err(ControlError::Unavailable(
                "this control plane has no cluster CA to reach nodes with".into(),
            ));
        };
        if std::time::SystemTime::now() >= members.cert().renew_at() {
            let renewed = ca
                .issue_client(shoal_tls::CONTROL_PLANE)
                .and_then(|issued| members.cert().replace(&issued));
            match renewed {
                Ok(()) => tracing::info!("renewed the control plane's certificate for nodes"),
                // Still valid for a third of its time: the next read tries again.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the control plane's certificate for nodes")
                }
            }
        }
        Ok(members)
    }

    /// A client presenting the control plane's certificate to node `node`'s gateway, which
    /// must present that node's own (an address proves nothing: a node may be issued a
    /// certificate for any address it says it has). The same one each time, so requests to
    /// a node one after another (a port-forward's, a log follower's) share its connections
    /// instead of each making a TLS handshake; it presents the renewed certificate once the
    /// old one is replaced. Clients unused for [`MEMBER_CLIENT_IDLE`] go when one is made.
    pub(crate) fn member_client(&self, node: &str) -> Result<reqwest::Client, ControlError> {
        let members = self.members()?;
        let now = std::time::Instant::now();
        let mut clients = (self.inner.member_clients.lock()).unwrap_or_else(|p| p.into_inner());
        if let Some((client, used)) = clients.get_mut(node) {
            *used = now;
            return Ok(client.clone());
        }
        clients.retain(|_, (_, used)| now.duration_since(*used) < MEMBER_CLIENT_IDLE);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(members.client_for(node))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(ControlError::internal)?;
        clients.insert(node.to_string(), (client.clone(), now));
        Ok(client)
    }
}

/// How long a node's client ([`ControlPlane::member_client`]) is kept unused: past a
/// follower's poll and a port-forward's pauses, short of keeping every node ever reached.
const MEMBER_CLIENT_IDLE: Duration = Duration::from_secs(300);

/// The URL of replica `id`'s output at `gateway` from sequence number `since`, with
/// `query`'s time filter.
fn logs_url(gateway: &str, id: &str, since: u64, query: &LogQuery) -> String {
    let mut url = format!(
        "https://{gateway}{}{id}?since={since}",
        shoal_core::auth::NODE_LOGS_PATH,
    );
    if let Some(t) = query.since_time {
        url.push_str(&format!("&since_time={t}"));
    }
    url
}

/// A line saying why a replica's output could not be read, in its place.
fn unreadable(replica: String, why: String) -> LogEntry {
    LogEntry {
        replica,
        seq: LogEntry::NOTICE,
        time: shoal_core::now_ms(),
        stream: LogStream::Stderr,
        line: format!("[shoal] cannot read this replica's output: {why}"),
    }
}

/// A line saying `count` of a replica's lines were lost to a follower: its node keeps a
/// bounded amount of each replica's output, and a replica writing faster than the follower
/// reads (or a follower away long enough) finds the oldest overwritten.
fn lost_lines(replica: &str, count: u64) -> LogEntry {
    LogEntry {
        replica: replica.to_string(),
        seq: LogEntry::NOTICE,
        time: shoal_core::now_ms(),
        stream: LogStream::Stderr,
        line: format!(
            "[shoal] {count} lines of this replica's output were lost: it wrote them faster \
             than they were read, and its node keeps only its latest output"
        ),
    }
}

/// Every entry at `url`, or one saying why there are none.
async fn read_all(http: &reqwest::Client, replica: String, url: String) -> Vec<LogEntry> {
    let response = match http.get(&url).timeout(READ_TIMEOUT).send().await {
        Ok(r) => r,
        Err(e) => return vec![unreadable(replica, format!("its node is unreachable: {e}"))],
    };
    match response.status() {
        s if s.is_success() => {}
        // Not started on its node yet: nothing written.
        reqwest::StatusCode::NOT_FOUND => return Vec::new(),
        s => return vec![unreadable(replica, format!("its node answered {s}"))],
    }
    match response.text().await {
        Ok(text) => text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Err(e) => vec![unreadable(replica, format!("reading it failed: {e}"))],
    }
}

/// Follows every replica of `app`, those that appear later included, into `tx` until the
/// client goes, the app is deleted or every replica has finished and said all it had.
async fn follow(
    cp: ControlPlane,
    app: AppKey,
    query: LogQuery,
    mut start: HashMap<String, (u64, Option<usize>)>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut followers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    // Whether a run that had not finished was seen, or one that came after the follow
    // began (a quick one may finish between two looks): a job's follow that began with
    // only finished runs (or none) waits for the next one rather than end at once.
    let mut saw_running = query.replica.is_some();
    let initial: HashSet<String> = start.keys().cloned().collect();
    let mut tick = tokio::time::interval(RELIST);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tx.closed() => break,
        }
        let (c, key, only) = (cp.clone(), app.clone(), query.replica.clone());
        let Targets {
            ends,
            list: targets,
        } = match blocking(move || c.log_targets(&key, only.as_deref())).await {
            Ok(Some(t)) => t,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(app = %app, error = %e, "cannot list the replicas to follow");
                continue;
            }
        };
        let listed: HashSet<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        // A replica gone from the cluster: its follower has nothing more to wait for.
        followers.retain(|id, task| {
            let keep = listed.contains(id.as_str());
            if !keep {
                task.abort();
            }
            keep
        });
        for t in &targets {
            if followers.contains_key(&t.id) {
                continue;
            }
            let (since, tail) = start.remove(&t.id).unwrap_or((0, None));
            let task = tokio::spawn(follow_one(
                cp.clone(),
                app.clone(),
                (t.id.clone(), since, tail),
                query.clone(),
                tx.clone(),
            ));
            followers.insert(t.id.clone(), task);
        }
        // A job's runs, or the one replica asked for, end; an app that serves or runs on
        // gets new replicas (a rollout, a restart, a wake from zero), so its follow goes on.
        saw_running |= targets.iter().any(|t| !t.done || !initial.contains(&t.id));
        let finished = ends
            && saw_running
            && targets
                .iter()
                .all(|t| t.done && followers.get(&t.id).is_none_or(|f| f.is_finished()));
        if finished {
            break;
        }
    }
    for task in followers.into_values() {
        task.abort();
    }
}

/// Streams replica `id`'s output from sequence number `since` (the last `tail` lines of it,
/// the first time, if given) into `tx`, reconnecting from where it got to while its node is
/// away, until the node says the replica stopped.
async fn follow_one(
    cp: ControlPlane,
    app: AppKey,
    (id, mut since, mut tail): (String, u64, Option<usize>),
    query: LogQuery,
    tx: mpsc::Sender<Bytes>,
) {
    // Whether `since` is the line after one shown (or after where a read started), so that
    // lines numbered past it were lost rather than never asked for.
    let mut positioned = tail.is_none() && since > 0;
    loop {
        let (c, key, only) = (cp.clone(), app.clone(), id.clone());
        let target = match blocking(move || c.log_targets(&key, Some(&only))).await {
            Ok(Some(mut t)) if !t.list.is_empty() => t.list.remove(0),
            // The replica or its app is gone.
            Ok(_) => return,
            Err(_) => {
                tokio::time::sleep(RELIST).await;
                continue;
            }
        };
        let Some((node, gateway)) = &target.at else {
            tokio::time::sleep(RELIST).await;
            continue;
        };
        let Ok(http) = cp.member_client(node) else {
            tokio::time::sleep(RELIST).await;
            continue;
        };
        let mut url = format!("{}&follow=true", logs_url(gateway, &id, since, &query));
        if let Some(n) = tail {
            url.push_str(&format!("&tail={n}"));
        }
        let response = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r,
            // Its node is away, or has not started it yet.
            _ => {
                tokio::time::sleep(RELIST).await;
                continue;
            }
        };
        let from = response
            .headers()
            .get(shoal_core::auth::LOGS_FROM_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // Resuming after lines shown, the node starting later means it no longer had those
        // between: said, not skipped in silence. A first read starts where it starts.
        let mut lost = match (positioned, from) {
            (true, Some(from)) => from.saturating_sub(since),
            _ => 0,
        };
        tail = None;
        since = since.max(from.unwrap_or(0));
        let mut body = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut broken = false;
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else {
                broken = true;
                break;
            };
            pending.extend_from_slice(&chunk);
            let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let mut out = String::new();
            for line in pending[..end].split(|&b| b == b'\n') {
                if let Ok(entry) = serde_json::from_slice::<LogEntry>(line) {
                    // The first line of a first read may come after lines the time
                    // filter left out.
                    if positioned {
                        lost += entry.seq.saturating_sub(since);
                    }
                    positioned = true;
                    if lost > 0 {
                        out.push_str(&query.render(&lost_lines(&id, lost)));
                        lost = 0;
                    }
                    since = since.max(entry.seq.saturating_add(1));
                    out.push_str(&query.render(&entry));
                }
            }
            pending.drain(..=end);
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
        }
        if !broken {
            // The node says the replica stopped: it has said all it had.
            return;
        }
        tokio::time::sleep(RELIST).await;
    }
}
