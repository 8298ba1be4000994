//! Guests' `wasi:keyvalue` calls from a worker node, sent together. Each call is a request to
//! the control plane over mutual TLS, and that request, not the store, was most of what a call
//! cost a joined node. So a few requests per bucket go out at once ([`SENDING`]); calls made
//! while they are on their way queue, and the next request to go takes all of them (up to
//! [`MAX_BATCH`]) to `…/batch`, where each runs as if sent alone. One call at a time goes
//! alone, as before, with no wait: batching only happens when calls pile up.
//!
//! A call never waits longer than it would have alone (its timeout counts from when it was
//! made), a call whose guest gave up is not sent, and a bucket's queue is bounded: past
//! [`MAX_QUEUED`] calls are refused at once rather than pile up against a slow control plane.

use reqwest::StatusCode;
use shoal_api::{Client, ClientError, KvSent, LinkError, LinkResult, Resend};
use shoal_core::kv::{KvAnswer, KvOp, KvOutcome, MAX_BATCH};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Requests on their way to one bucket at once; calls made meanwhile queue for the next.
const SENDING: usize = 4;

/// Calls that may wait for one bucket: 16 requests' worth beyond those on their way.
const MAX_QUEUED: usize = 16 * MAX_BATCH;

/// The node's client to the control plane. Joining again replaces it with one carrying the
/// new credential, so every request takes the one in use when it goes.
pub(crate) type SharedClient = Arc<RwLock<Client>>;

pub(crate) fn current(api: &SharedClient) -> Client {
    api.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// A call bigger than this (its keys and values) goes alone, and a batch stops short of
/// [`BATCH_BYTES`]: the control plane takes a node's request up to its body limit, and one
/// refused for size would fail every call in it.
const ALONE_BYTES: usize = 64 << 10;
const BATCH_BYTES: usize = 1 << 20;

/// What a call weighs in a request: its keys and values, and room for the JSON around them.
fn weight(op: &KvOp) -> usize {
    64 + match op {
        KvOp::Get { keys } | KvOp::Delete { keys } => keys.iter().map(|k| k.len() + 8).sum(),
        // JSON writes each byte of a value as a number and a comma.
        KvOp::Set { entries } => entries.iter().map(|(k, v)| k.len() + 4 * v.len() + 8).sum(),
        KvOp::Exists { key } | KvOp::Increment { key, .. } => key.len(),
        KvOp::List { .. } => 0,
    }
}

type Waiter = oneshot::Sender<LinkResult<KvAnswer>>;

/// The calls of each bucket on their way and waiting, by the bucket's request path.
#[derive(Default)]
pub(crate) struct KvBatches {
    buckets: Mutex<HashMap<String, Bucket>>,
    sent: Sent,
}

/// Calls sent and the requests that carried them, for the node's metrics.
#[derive(Default)]
struct Sent {
    calls: AtomicU64,
    requests: AtomicU64,
}

impl Sent {
    fn count(&self, calls: usize) {
        self.calls.fetch_add(calls as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Bucket {
    /// Senders running for it, each sending one request at a time.
    sending: usize,
    queued: VecDeque<(KvOp, Waiter)>,
}

impl KvBatches {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Bucket>> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The calls sent so far and the requests that carried them.
    pub(crate) fn sent(&self) -> KvSent {
        KvSent {
            calls: self.sent.calls.load(Ordering::Relaxed),
            requests: self.sent.requests.load(Ordering::Relaxed),
        }
    }

    /// `op` on the bucket whose calls go to `path`, sent through `api` alone or with the calls
    /// queued beside it, answered within `timeout`. A sender runs as a task of its own, so a
    /// guest that gives up on its call (its request timed out) does not cut the others' short.
    pub(crate) async fn call(
        self: &Arc<Self>,
        api: &SharedClient,
        path: String,
        op: KvOp,
        timeout: Duration,
    ) -> LinkResult<KvAnswer> {
        if weight(&op) > ALONE_BYTES {
            return send_alone(&self.sent, &current(api), &path, op, timeout).await;
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut buckets = self.lock();
            let bucket = buckets.entry(path.clone()).or_default();
            if bucket.queued.len() >= MAX_QUEUED {
                return Err(LinkError::Failed(format!(
                    "{MAX_QUEUED} key-value calls already wait for this bucket on this node: \
                     the cluster's key-value store is slow to answer"
                )));
            }
            bucket.queued.push_back((op, tx));
            let start = bucket.sending < SENDING;
            bucket.sending += usize::from(start);
            start
        };
        if start {
            let sender = Sender {
                batches: self.clone(),
                path,
                done: false,
            };
            tokio::spawn(sender.run(api.clone(), timeout));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(LinkError::Failed(
                "the key-value call was lost on this node".into(),
            )),
            // Dropping `rx` tells a sender that has not taken the call yet to leave it.
            Err(_) => Err(LinkError::Failed(format!(
                "the cluster's key-value store did not answer within {}s",
                timeout.as_secs()
            ))),
        }
    }
}

/// One of a bucket's senders: sends what is queued until nothing is.
struct Sender {
    batches: Arc<KvBatches>,
    path: String,
    /// It stopped on an empty queue, having counted itself out.
    done: bool,
}

impl Sender {
    async fn run(mut self, api: SharedClient, timeout: Duration) {
        while let Some(batch) = self.next() {
            let api = current(&api);
            let (ops, waiters): (Vec<KvOp>, Vec<Waiter>) = batch.into_iter().unzip();
            let sent = &self.batches.sent;
            let answers = match <[KvOp; 1]>::try_from(ops) {
                Ok([op]) => vec![send_alone(sent, &api, &self.path, op, timeout).await],
                Err(ops) => send_batch(sent, &api, &self.path, ops, timeout).await,
            };
            for (waiter, answer) in waiters.into_iter().zip(answers) {
                // A guest that gave up no longer waits for its answer.
                let _ = waiter.send(answer);
            }
        }
    }

    /// The calls to send next, or `None` (counted out) if none wait. Calls whose guest gave
    /// up are dropped unsent.
    fn next(&mut self) -> Option<Vec<(KvOp, Waiter)>> {
        let mut buckets = self.batches.lock();
        let bucket = buckets.get_mut(&self.path)?;
        bucket.queued.retain(|(_, waiter)| !waiter.is_closed());
        if bucket.queued.is_empty() {
            bucket.sending -= 1;
            if bucket.sending == 0 {
                buckets.remove(&self.path);
            }
            self.done = true;
            return None;
        }
        let mut bytes = 0;
        let mut batch = Vec::new();
        while let Some((op, _)) = bucket.queued.front() {
            bytes += weight(op);
            if !batch.is_empty() && (batch.len() == MAX_BATCH || bytes > BATCH_BYTES) {
                break;
            }
            batch.extend(bucket.queued.pop_front());
        }
        Some(batch)
    }
}

impl Drop for Sender {
    /// A sender that panicked counts itself out, so its bucket is not left one short: what
    /// it held is answered as failed (its waiters' channels close). What still queues goes
    /// with the other senders, or, if it was the last, is answered as failed too rather than
    /// wait for a sender that no call may start.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut buckets = self.batches.lock();
        if let Some(bucket) = buckets.get_mut(&self.path) {
            bucket.sending = bucket.sending.saturating_sub(1);
            if bucket.sending == 0 {
                buckets.remove(&self.path);
            }
        }
    }
}

/// What the guest is told when the call did not get through: the store's own word on a refused
/// call, but not where the control plane is or why it is not there.
fn unanswered(e: ClientError) -> LinkError {
    match e {
        ClientError::Api { message, .. } => LinkError::Failed(message),
        other => {
            let admitted = UNREACHED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .admit(Instant::now());
            if let Some(more) = admitted {
                tracing::warn!(
                    error = %other,
                    more,
                    "a guest's key-value call failed (and `more` since the last such warning)"
                );
            }
            LinkError::Failed("the cluster's key-value store cannot be reached".into())
        }
    }
}

/// How often a failure to reach the store is logged: while the control plane is away every
/// guest call fails, and a line each (a thousand a second under load) would bury the log.
const WARN_EVERY: Duration = Duration::from_secs(10);

static UNREACHED: Mutex<Sparse> = Mutex::new(Sparse {
    last: None,
    left_out: 0,
});

/// Lets one of a kind of warning through every [`WARN_EVERY`], counting those left out.
struct Sparse {
    last: Option<Instant>,
    left_out: u64,
}

impl Sparse {
    /// Whether one more at `now` is logged, and if so how many were left out before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY)
        {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

/// Every call but an increment does the same the second time: only those may go to another
/// server after one that may have received them.
fn resend(ops: &[KvOp]) -> Resend {
    if ops.iter().any(|op| matches!(op, KvOp::Increment { .. })) {
        Resend::IfUnsent
    } else {
        Resend::Idempotent
    }
}

async fn send_alone(
    sent: &Sent,
    api: &Client,
    path: &str,
    op: KvOp,
    timeout: Duration,
) -> LinkResult<KvAnswer> {
    sent.count(1);
    let how = resend(std::slice::from_ref(&op));
    let req = api
        .request(reqwest::Method::POST, path)
        .json(&op)
        .timeout(timeout);
    api.send_as(req, how).await.map_err(unanswered)
}

/// One answer per call of `ops`, in their order.
async fn send_batch(
    sent: &Sent,
    api: &Client,
    path: &str,
    ops: Vec<KvOp>,
    timeout: Duration,
) -> Vec<LinkResult<KvAnswer>> {
    let (count, how) = (ops.len(), resend(&ops));
    sent.count(count);
    let req = api
        .request(reqwest::Method::POST, &format!("{path}/batch"))
        .json(&ops)
        .timeout(timeout);
    let failed = |message: &str| {
        (0..count)
            .map(|_| Err(LinkError::Failed(message.to_string())))
            .collect()
    };
    match api.send_as::<Vec<KvOutcome>>(req, how).await {
        Ok(outcomes) if outcomes.len() == count => {
            let calls = ops
                .into_iter()
                .zip(outcomes)
                .map(|(op, outcome)| async move {
                    match outcome {
                        KvOutcome::Answered { answer } => Ok(answer),
                        KvOutcome::Refused { message } => Err(LinkError::Failed(message)),
                        // The server failed it, not the store's rules: what does the same the
                        // second time goes again, alone, and on to the next server if this one
                        // fails it again, as it would have gone alone in the first place.
                        KvOutcome::Failed { message } => match resend(std::slice::from_ref(&op)) {
                            Resend::Idempotent => send_alone(sent, api, path, op, timeout).await,
                            Resend::IfUnsent => Err(LinkError::Failed(message)),
                        },
                    }
                });
            futures::future::join_all(calls).await
        }
        // A control plane from before batches (a rolling upgrade): each call goes alone.
        Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
            let calls = ops
                .into_iter()
                .map(|op| send_alone(sent, api, path, op, timeout));
            futures::future::join_all(calls).await
        }
        Ok(outcomes) => {
            tracing::warn!(
                sent = count,
                answered = outcomes.len(),
                "the control plane answered a different number of key-value calls"
            );
            failed("the cluster's key-value store answered out of turn")
        }
        Err(e) => match unanswered(e) {
            LinkError::Failed(message) => failed(&message),
            other => failed(&other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Json;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use shoal_api::Servers;

    /// Sizes of the requests a stand-in control plane took: 1 for a call alone.
    type Seen = Arc<Mutex<Vec<usize>>>;

    /// An increment answered with its own delta, after a while (so that calls pile up); a
    /// delta of 0 refused, as the store refuses.
    async fn answer(op: &KvOp) -> Result<KvAnswer, String> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match op {
            KvOp::Increment { delta: 0, .. } => Err("no zero here".into()),
            KvOp::Increment { delta, .. } => Ok(KvAnswer::Count { value: *delta }),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    async fn alone(State(seen): State<Seen>, Json(op): Json<KvOp>) -> Response {
        seen.lock().unwrap().push(1);
        match answer(&op).await {
            Ok(a) => Json(a).into_response(),
            Err(message) => (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": {"code": "bad_request", "message": message}})),
            )
                .into_response(),
        }
    }

    async fn together(State(seen): State<Seen>, Json(ops): Json<Vec<KvOp>>) -> Response {
        seen.lock().unwrap().push(ops.len());
        let mut outcomes = Vec::new();
        for op in &ops {
            outcomes.push(match answer(op).await {
                Ok(answer) => KvOutcome::Answered { answer },
                Err(message) => KvOutcome::Refused { message },
            });
        }
        Json(outcomes).into_response()
    }

    /// A client of a stand-in control plane serving `router`.
    async fn stand_in(router: axum::Router) -> SharedClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let servers = Servers::parse(&format!("http://{addr}")).unwrap();
        Arc::new(RwLock::new(Client::new(servers, "t")))
    }

    fn increment(delta: u64) -> KvOp {
        KvOp::Increment {
            key: "k".into(),
            delta,
        }
    }

    /// `ops` all at once, each answered or refused with the refusal's text.
    async fn call_all(
        batches: &Arc<KvBatches>,
        api: &SharedClient,
        ops: Vec<KvOp>,
        timeout: Duration,
    ) -> Vec<Result<KvAnswer, String>> {
        let calls = ops.into_iter().map(|op| async move {
            let answer = batches.call(api, "/kv/b".into(), op, timeout).await;
            answer.map_err(|e| e.to_string())
        });
        futures::future::join_all(calls).await
    }

    /// Whether every bucket's senders have counted themselves out within `within`.
    async fn counted_out(batches: &KvBatches, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut every = tokio::time::interval(Duration::from_millis(5));
        while !batches.lock().is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            every.tick().await;
        }
        true
    }

    /// 40 calls at once: a few requests carry them all, each call gets its own answer (or its
    /// own refusal), and nothing stays counted as on its way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_pile_up_go_together_and_each_gets_its_own_answer() {
        let seen = Seen::default();
        let router = axum::Router::new()
            .route("/kv/b", axum::routing::post(alone))
            .route("/kv/b/batch", axum::routing::post(together))
            .with_state(seen.clone());
        let api = stand_in(router).await;
        let batches = Arc::new(KvBatches::default());
        let ops = (0..40).map(increment).collect();
        let answers = call_all(&batches, &api, ops, Duration::from_secs(10)).await;
        assert_eq!(answers[0], Err("no zero here".into()));
        for (delta, answer) in answers.into_iter().enumerate().skip(1) {
            assert_eq!(
                answer,
                Ok(KvAnswer::Count {
                    value: delta as u64
                })
            );
        }
        let sizes = seen.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40, "{sizes:?}");
        let sent = batches.sent();
        assert_eq!((sent.calls, sent.requests), (40, sizes.len() as u64));
        assert!(
            sizes.len() <= 20 && sizes.iter().any(|&n| n > 1),
            "40 calls went in {} requests: {sizes:?}",
            sizes.len()
        );
        // The sender counts itself out just after it has answered the last calls.
        assert!(
            counted_out(&batches, Duration::from_secs(5)).await,
            "a bucket left counted as sending"
        );

        // One call at a time goes alone.
        seen.lock().unwrap().clear();
        for delta in 1..=3 {
            let answer = batches.call(
                &api,
                "/kv/b".into(),
                increment(delta),
                Duration::from_secs(10),
            );
            assert_eq!(answer.await.unwrap(), KvAnswer::Count { value: delta });
        }
        assert_eq!(*seen.lock().unwrap(), [1, 1, 1]);
    }

    /// The credentials of the batches a stand-in control plane took, in turn.
    type Credentials = Arc<Mutex<Vec<String>>>;

    async fn slow_batch(
        State(seen): State<Credentials>,
        headers: axum::http::HeaderMap,
        Json(ops): Json<Vec<KvOp>>,
    ) -> Response {
        let credential = headers[axum::http::header::AUTHORIZATION].to_str().unwrap();
        seen.lock().unwrap().push(credential.to_string());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let outcomes: Vec<_> = (ops.iter())
            .map(|_| KvOutcome::Answered {
                answer: KvAnswer::Done,
            })
            .collect();
        Json(outcomes).into_response()
    }

    /// A node that joined again sends with its new credential from the next request on, even
    /// from a bucket whose senders never went idle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_carry_the_credential_in_use_when_they_go() {
        let seen = Credentials::default();
        let router = axum::Router::new()
            .route(
                "/kv/b",
                axum::routing::post(|| async { Json(KvAnswer::Done) }),
            )
            .route("/kv/b/batch", axum::routing::post(slow_batch))
            .with_state(seen.clone());
        let api = stand_in(router).await;
        let servers = current(&api).servers().clone();
        let batches = Arc::new(KvBatches::default());
        let get = || KvOp::Exists { key: "k".into() };
        let first = call_all(
            &batches,
            &api,
            vec![get(); 2 * MAX_BATCH],
            Duration::from_secs(10),
        );
        let rejoined = async {
            // Swapped while the first requests are on their way and calls still queue.
            while seen.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            *api.write().unwrap() = Client::new(servers, "new");
            call_all(
                &batches,
                &api,
                vec![get(); 2 * MAX_BATCH],
                Duration::from_secs(10),
            )
            .await
        };
        let (first, then) = tokio::join!(first, rejoined);
        let answered = first.iter().chain(&then);
        assert_eq!(answered.filter(|a| **a != Ok(KvAnswer::Done)).count(), 0);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0], "Bearer t");
        assert_eq!(seen.last().unwrap(), "Bearer new", "{seen:?}");
    }

    /// A batch that the control plane failed in part: what may go twice goes again alone and
    /// is answered; an increment is not sent again. A control plane without `…/batch` takes
    /// each call alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_the_server_failed_go_again_alone_and_an_old_server_takes_them_one_by_one() {
        async fn failing(Json(ops): Json<Vec<KvOp>>) -> Response {
            let outcomes: Vec<_> = (ops.iter())
                .map(|_| KvOutcome::Failed {
                    message: "internal error".into(),
                })
                .collect();
            Json(outcomes).into_response()
        }
        async fn exists(Json(_): Json<KvOp>) -> Response {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Json(KvAnswer::Exists { exists: true }).into_response()
        }
        let exists_op = || KvOp::Exists { key: "k".into() };
        let ops = || {
            let mut ops = vec![exists_op(); 20];
            ops.push(increment(1));
            ops
        };
        for with_batches in [true, false] {
            let router = axum::Router::new().route("/kv/b", axum::routing::post(exists));
            let router = match with_batches {
                true => router.route("/kv/b/batch", axum::routing::post(failing)),
                false => router,
            };
            let api = stand_in(router).await;
            let batches = Arc::new(KvBatches::default());
            let answers = call_all(&batches, &api, ops(), Duration::from_secs(10)).await;
            let (last, rest) = answers.split_last().unwrap();
            assert!(
                rest.iter()
                    .all(|a| *a == Ok(KvAnswer::Exists { exists: true })),
                "{rest:?}"
            );
            match with_batches {
                true => assert_eq!(*last, Err("internal error".into())),
                // The stand-in answers an increment sent alone as it answers anything.
                false => assert_eq!(*last, Ok(KvAnswer::Exists { exists: true })),
            }
        }
    }

    /// Against a control plane that does not answer: each call gives up within its own
    /// timeout, calls past the queue's bound are refused at once, and calls whose guest gave up
    /// are never sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_wait_no_longer_than_alone_and_the_queue_is_bounded() {
        let seen = Seen::default();
        let hang = |State(seen): State<Seen>, Json(ops): Json<Vec<KvOp>>| async move {
            seen.lock().unwrap().push(ops.len());
            std::future::pending::<()>().await;
        };
        let router = axum::Router::new()
            .route("/kv/b", axum::routing::post(std::future::pending::<()>))
            .route("/kv/b/batch", axum::routing::post(hang))
            .with_state(seen.clone());
        let api = stand_in(router).await;
        let batches = Arc::new(KvBatches::default());
        // However many senders have taken meanwhile, at least 10 find the queue full.
        let calls = SENDING * MAX_BATCH + MAX_QUEUED + 10;
        let ops = (1..=calls as u64).map(increment).collect();
        let since = std::time::Instant::now();
        let answers = call_all(&batches, &api, ops, Duration::from_secs(1)).await;
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "{:?}",
            since.elapsed()
        );
        let said = |what: &str| {
            (answers.iter())
                .filter(|a| a.as_ref().is_err_and(|e| e.contains(what)))
                .count()
        };
        // A call is said to time out, or, if its request timed out first, to find the store
        // unreachable.
        let timed_out = said("within 1s") + said("cannot be reached");
        let refused = said("already wait");
        assert!(refused >= 10, "{refused} refused");
        assert_eq!(refused + timed_out, calls);
        // The senders find the queue's calls given up, and stop without sending them.
        assert!(
            counted_out(&batches, Duration::from_secs(10)).await,
            "senders never stopped"
        );
        // One round of batches may go before their calls time out, but not the whole queue.
        let sent: usize = seen.lock().unwrap().iter().sum();
        assert!(
            sent <= 2 * SENDING * MAX_BATCH,
            "{sent} calls sent after their guests gave up"
        );
    }

    #[test]
    fn a_call_weighs_its_keys_and_values() {
        let small = KvOp::Increment {
            key: "hits".into(),
            delta: 1,
        };
        assert!(weight(&small) < 100);
        let big = KvOp::Set {
            entries: vec![("k".into(), vec![7; 20 << 10])],
        };
        assert!(
            weight(&big) > ALONE_BYTES,
            "a 20 KiB value is 80 KiB of JSON"
        );
        let many = KvOp::Get {
            keys: vec!["x".repeat(1000); 100],
        };
        assert!(weight(&many) > 100_000);
    }

    /// The first failure is logged, the next ones within [`WARN_EVERY`] only counted, and
    /// the first one past it is logged saying how many were left out.
    #[test]
    fn a_failure_to_reach_the_store_is_logged_once_a_while_with_a_count() {
        let mut sparse = Sparse {
            last: None,
            left_out: 0,
        };
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(sparse.admit(at(0)), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(sparse.admit(at(ms)), None);
        }
        assert_eq!(sparse.admit(at(10_000)), Some(3));
        assert_eq!(sparse.admit(at(10_001)), None);
        assert_eq!(sparse.admit(at(30_000)), Some(1));
    }
}
