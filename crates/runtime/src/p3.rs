//! Serving WASIp3 `wasi:http/handler` components. Such a guest is async inside: one instance
//! can work on several requests at once, each a component-model task, while the others wait
//! on I/O. So a p3 instance is a *worker*: a task on the guest threads that owns a store, runs
//! its event loop ([`wasmtime::Store::run_concurrent`]) and takes requests from the replica's
//! queue while it has room — up to `reuse.concurrent` at once and `reuse.requests` in its life —
//! then ends once idle for `reuse.idle`, as `wasmtime serve` does with its
//! `--max-instance-reuse-count`, `--max-instance-concurrent-reuse-count` and
//! `--idle-instance-timeout`, or as soon as it is idle while another instance waits for memory.
//! With the default reuse of 1 every request gets a fresh instance, as for p2 components.
//!
//! The loop follows wasmtime-wasi-http's `handler::ProxyHandler`, which cannot be used as is:
//! it spawns its workers itself, where Shoal must run them [`Metered`] for the app's CPU group.
//!
//! A client that goes away before its response head ([`Gone`]) takes its instance with it when
//! that instance has answered nothing yet (a fresh one, as every instance is without reuse)
//! and every request in it has lost its client: wasmtime cannot cancel one task of an
//! instance (its issue #11833), and an instance that answered before may still be writing a
//! body. Otherwise the instance takes no more requests and the request's timeout bounds it.

use std::collections::VecDeque;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Instant;

use futures::channel::oneshot;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use wasmtime::component::Accessor;
use wasmtime::{AsContextMut, Store};
use wasmtime_wasi_http::handler::{Prepared, Proxy};
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::{WasiBody, WasiHttpView};

use crate::cpu::{Metered, TaskMeter};
use crate::host::{Failure, Host, InstanceSettings, new_store, with_timeout};
use crate::runtime::Runtime;

/// What a worker sends back for a request: the guest's response, or why there is none.
pub(crate) type Reply = Result<http::Response<WasiBody>, wasmtime::Error>;

/// A request waiting for a worker.
pub(crate) struct Job {
    pub(crate) request: http::Request<WasiBody>,
    pub(crate) reply: oneshot::Sender<Reply>,
    /// Told how the worker that took the request ended, for a request whose reply was lost
    /// with its instance.
    pub(crate) ended: Arc<Ended>,
    /// Set when the client stops waiting for the response head.
    pub(crate) gone: Arc<Gone>,
    /// The caller's, kept until the worker that takes the request ends: the guest may
    /// write its body for as long as its instance runs.
    pub(crate) hold: Hold,
}

/// Something a caller keeps alive for as long as a guest may work on its request (see
/// [`crate::HttpService::handle_holding`]).
pub(crate) type Hold = Box<dyn std::any::Any + Send>;

/// Whether a request's client has stopped waiting for its response head, and who to wake
/// when it does.
#[derive(Default)]
pub(crate) struct Gone {
    flag: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl Gone {
    pub(crate) fn mark(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Whether the client is gone; if not, `cx` is woken when it goes.
    fn poll_gone(&self, cx: &mut std::task::Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.flag.load(Ordering::SeqCst)
    }
}

/// Marks its request [`Gone`] when dropped armed: the client's future went before its answer.
pub(crate) struct GoneOnDrop(Option<Arc<Gone>>);

impl GoneOnDrop {
    pub(crate) fn new(gone: Arc<Gone>) -> GoneOnDrop {
        GoneOnDrop(Some(gone))
    }

    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        if let Some(gone) = self.0.take() {
            gone.mark();
        }
    }
}

/// How the worker that took a request ended: `None` if cleanly.
#[derive(Default)]
pub(crate) struct Ended {
    failure: OnceLock<Option<Failure>>,
    notify: Notify,
}

impl Ended {
    fn set(&self, failure: Option<Failure>) {
        if self.failure.set(failure).is_ok() {
            self.notify.notify_waiters();
        }
    }

    /// Waits until the worker has ended.
    pub(crate) async fn wait(&self) -> Option<Failure> {
        loop {
            let notified = self.notify.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if let Some(failure) = self.failure.get() {
                return failure.clone();
            }
            notified.await;
        }
    }
}

/// The p3 workers of one replica and the queue they take requests from.
pub(crate) struct Workers {
    runtime: Runtime,
    pre: ServicePre<Host>,
    settings: Arc<InstanceSettings>,
    state: Mutex<Dispatch>,
    pushed: Notify,
}

#[derive(Default)]
struct Dispatch {
    queue: VecDeque<Job>,
    /// Workers with room for another request now.
    available: usize,
    /// Workers alive with no request in flight.
    idle: usize,
    /// The replica is gone: workers take no more requests.
    closed: bool,
}

impl Workers {
    pub(crate) fn new(
        runtime: Runtime,
        pre: ServicePre<Host>,
        settings: Arc<InstanceSettings>,
    ) -> Arc<Workers> {
        Arc::new(Workers {
            runtime,
            pre,
            settings,
            state: Mutex::default(),
            pushed: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Dispatch> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `job` to a worker with room, or to a new one.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let mut state = self.state();
        if state.available == 0 {
            drop(state);
            self.start(job);
        } else {
            state.queue.push_back(job);
            drop(state);
            self.pushed.notify_one();
        }
    }

    /// Workers alive with no request in flight.
    pub(crate) fn idle(&self) -> usize {
        self.state().idle
    }

    /// Workers with room for another request now.
    pub(crate) fn available(&self) -> usize {
        self.state().available
    }

    /// Ends the workers once their requests are answered; called when the replica goes.
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.pushed.notify_waiters();
    }

    fn start(self: &Arc<Self>, first: Job) {
        let meter = self.settings.cpu.meter();
        let worker = Worker {
            workers: self.clone(),
            available: false,
            idle: false,
        };
        self.runtime
            .guests()
            .spawn(Metered::new(meter.clone(), worker.run(meter, first)));
    }

    /// The next queued request, when one comes; `None` once the replica is gone.
    async fn pop(&self) -> Option<Job> {
        let mut notified = pin!(self.pushed.notified());
        loop {
            notified.as_mut().enable();
            {
                let mut state = self.state();
                if let Some(job) = state.queue.pop_front() {
                    return Some(job);
                }
                if state.closed {
                    return None;
                }
            }
            notified.as_mut().await;
            notified.set(self.pushed.notified());
        }
    }
}

/// One instance and the requests it takes. Dropped (ended, failed or cancelled), it is no
/// longer counted, and if it was the last worker with room while requests wait, it starts
/// another for them.
struct Worker {
    workers: Arc<Workers>,
    available: bool,
    idle: bool,
}

impl Worker {
    fn set(&mut self, available: bool, idle: bool) {
        if available == self.available && idle == self.idle {
            return;
        }
        let mut state = self.workers.state();
        if idle != self.idle {
            let stats = &self.workers.settings.stats;
            if idle {
                state.idle += 1;
                stats.idle_more(1);
            } else {
                state.idle -= 1;
                stats.idle_fewer(1);
            }
            self.idle = idle;
        }
        if available != self.available {
            self.available = available;
            if available {
                state.available += 1;
            } else {
                state.available -= 1;
                // A request queued for this worker goes to another: a new one if none has
                // room, else a waiting one is woken in case this one took the wake-up.
                if state.available == 0 {
                    if let Some(job) = state.queue.pop_front() {
                        drop(state);
                        self.workers.start(job);
                    }
                } else if !state.queue.is_empty() {
                    drop(state);
                    self.workers.pushed.notify_one();
                }
            }
        }
    }

    async fn run(mut self, meter: Arc<TaskMeter>, first: Job) {
        let workers = self.workers.clone();
        let settings = &workers.settings;
        let tick = workers.runtime.config().epoch_tick;
        let Some(memory) = workers.runtime.reserve_memory(settings).await else {
            first.ended.set(Some(Failure::NoMemory));
            return;
        };
        let mut store = new_store(workers.pre.engine(), settings, meter.clone(), memory);
        // A group over its share waits before it starts, not a slice later.
        meter.clone().admit(store.data().deadline(), false).await;
        let instantiated = with_timeout(
            settings.timeout,
            tick,
            workers.pre.instantiate_async(&mut store),
        )
        .await;
        let proxy = match instantiated {
            Some(Ok(service)) => Proxy::P3(service),
            Some(Err(e)) => {
                first.ended.set(Some(Failure::classify(store.data(), &e)));
                return;
            }
            None => {
                first.ended.set(Some(Failure::TimedOut));
                return;
            }
        };

        let mut ended = Vec::new();
        let result = self
            .serve(&mut store, &proxy, meter, first, &mut ended)
            .await;
        self.set(false, false);
        let failure = match result {
            Ok(()) => None,
            Err(e) => Some(Failure::classify(store.data(), &e)),
        };
        for (job, hold) in ended {
            job.set(failure.clone());
            drop(hold);
        }
    }

    /// Runs the store's event loop, taking requests while there is room, until the worker
    /// has served its count, stayed idle for its idle time, timed out or failed.
    async fn serve(
        &mut self,
        store: &mut Store<Host>,
        proxy: &Proxy,
        meter: Arc<TaskMeter>,
        first: Job,
        ended: &mut Vec<(Arc<Ended>, Hold)>,
    ) -> wasmtime::Result<()> {
        let workers = self.workers.clone();
        let settings = &workers.settings;
        let reuse = settings.reuse;
        let timeout = settings.timeout;
        let tick = workers.runtime.config().epoch_tick;
        // The latest deadline of a request in flight: past it (and a tick) every request has
        // run out of time, whatever the event loop is stuck on.
        let hard_deadline = Mutex::new(store.data().deadline());
        // Cleared when a request starts, set when the event loop next has nothing to run: a
        // new task counts as busy until then, so a worker takes on one CPU-bound request at
        // a time rather than queue others behind it.
        let accept_concurrent = AtomicBool::new(true);
        // The requests in flight without an answer yet, and whether any request was answered:
        // when every one of the former has lost its client and none of the latter may still
        // be writing a body, the instance goes (see the module's doc).
        let unanswered: Mutex<Vec<Arc<Gone>>> = Mutex::new(Vec::new());
        let answered_any = AtomicBool::new(false);
        let (unanswered, answered_any) = (&unanswered, &answered_any);
        let Proxy::P3(guest) = proxy else {
            unreachable!("p3 workers serve p3 instances");
        };
        let func = *guest.wasi_http_handler().func_handle().func();

        let event_loop = async |accessor: &Accessor<Host>| -> wasmtime::Result<()> {
            let mut in_flight = FuturesUnordered::new();
            let mut served: u32 = 0;
            let mut may_accept = true;
            let mut idle_since: Option<Pin<Box<tokio::time::Sleep>>> = None;
            // An idle worker gives its memory back when another instance waits for some.
            let mut memory_wanted = pin!(workers.runtime.memory().pressed());
            let mut incoming = pin!(futures::stream::unfold(&*workers, |w| async move {
                w.pop().await.map(|job| (job, w))
            }));

            let mut accept = |job: Job, in_flight: &mut FuturesUnordered<_>| {
                accept_concurrent.store(false, Ordering::Relaxed);
                ended.push((job.ended, job.hold));
                let gone = job.gone;
                lock(unanswered).push(gone.clone());
                let deadline = timeout.map(|t| Instant::now() + t);
                let prepared = accessor.with(|mut access| {
                    let mut context = access.as_context_mut();
                    let host = context.data_mut();
                    host.extend_deadline(deadline);
                    *hard_deadline.lock().unwrap_or_else(|p| p.into_inner()) = host.deadline();
                    Prepared::new(
                        access.as_context_mut(),
                        proxy,
                        job.request,
                        <Host as WasiHttpView>::http,
                        job.reply,
                    )
                });
                in_flight.push(async move {
                    let expiry = async move {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    let answered = prepared?.run(accessor, expiry).await;
                    lock(unanswered).retain(|g| !Arc::ptr_eq(g, &gone));
                    if matches!(answered, Ok(true)) {
                        answered_any.store(true, Ordering::Relaxed);
                    }
                    answered
                });
            };
            served += 1;
            accept(first, &mut in_flight);

            std::future::poll_fn(|cx| {
                loop {
                    // Requests finishing first: one that ran out of time stops the worker
                    // taking more, before it could take one.
                    match in_flight.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(answered))) => {
                            // Progress: the worker is not a long guest for answering many.
                            meter.reset_cpu();
                            if !answered {
                                may_accept = false;
                            }
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) | Poll::Pending => {}
                    }
                    if served >= reuse.requests {
                        may_accept = false;
                    }
                    let ready = accessor.poll_ready_for_concurrent_call(func, cx).is_ready();
                    let room = may_accept
                        && ready
                        && in_flight.len() < reuse.concurrent as usize
                        && (in_flight.is_empty() || accept_concurrent.load(Ordering::Relaxed));
                    self.set(room, in_flight.is_empty());
                    if room {
                        match incoming.poll_next_unpin(cx) {
                            Poll::Ready(Some(job)) => {
                                idle_since = None;
                                served += 1;
                                settings.stats.reuse();
                                accept(job, &mut in_flight);
                                continue;
                            }
                            Poll::Ready(None) => {
                                may_accept = false;
                                continue;
                            }
                            Poll::Pending => {}
                        }
                    }
                    if !in_flight.is_empty() {
                        return Poll::Pending;
                    }
                    // Nothing in flight; the guest may still finish a body or other work.
                    if accessor.poll_no_interesting_tasks(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if !(may_accept && ready) {
                        return Poll::Ready(Ok(()));
                    }
                    // Idle: no request's deadline holds it any more, only its idle time (a
                    // request timeout shorter than that would end every kept instance).
                    *hard_deadline.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let idle =
                        idle_since.get_or_insert_with(|| Box::pin(tokio::time::sleep(reuse.idle)));
                    if idle.as_mut().poll(cx).is_ready()
                        || memory_wanted.as_mut().poll(cx).is_ready()
                    {
                        self.set(false, true);
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            })
            .await
        };

        let result = {
            let mut run = pin!(store.run_concurrent(event_loop));
            let mut guard: Option<(Instant, Pin<Box<tokio::time::Sleep>>)> = None;
            std::future::poll_fn(|cx| {
                let poll = run.as_mut().poll(cx);
                if poll.is_ready() {
                    return poll.map(|r| r.and_then(|r| r));
                }
                // Checked from out here too, as a busy guest holds the event loop.
                if !answered_any.load(Ordering::Relaxed) {
                    let waiting = lock(unanswered);
                    let mut gone = waiting.iter().map(|g| g.poll_gone(cx));
                    if !waiting.is_empty() && gone.all(|g| g) {
                        tracing::debug!("every client of the instance went away: it goes too");
                        return Poll::Ready(Ok(()));
                    }
                }
                // A guest busy in a loop or a blocking host call holds the store, so the event
                // loop cannot see its requests expire: time them out from out here.
                let deadline = *hard_deadline.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(deadline) = deadline {
                    let at = deadline + tick;
                    if guard.as_ref().is_none_or(|(set, _)| *set != at) {
                        guard = Some((at, Box::pin(tokio::time::sleep_until(at.into()))));
                    }
                    if let Some((_, sleep)) = &mut guard
                        && sleep.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(wasmtime::format_err!("guest timed out")));
                    }
                }
                if !accept_concurrent.swap(true, Ordering::Relaxed) {
                    return run.as_mut().poll(cx).map(|r| r.and_then(|r| r));
                }
                Poll::Pending
            })
            .await
        };
        if result.is_err()
            && let Some(deadline) = store.data().deadline()
            && Instant::now() >= deadline
        {
            store.data_mut().mark_timed_out();
        }
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.set(false, false);
    }
}
