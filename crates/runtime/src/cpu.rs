//! Sharing the node's CPU between apps, the way Linux shares it between cgroups (CFS
//! weights and quotas, EEVDF deadlines).
//!
//! Guests run on the runtime's own worker threads ([`crate::Runtime`]), never on the
//! gateway's, so a spinning guest cannot hold up accepting or proxying. Among guests, every
//! replica belongs to a **group** (one per app, [`CpuShare::group`]). Each guest task is
//! metered ([`Metered`]): the CPU its thread spends polling it is charged to its group, which
//! advances the group's *virtual runtime* by that CPU divided by the group's weight (the sum
//! of its replicas' `request_millis`), and the task counts as runnable from its wake-up to the
//! poll that leaves it with nothing to do.
//!
//! At every epoch tick (a time slice) a running guest asks [`Ledger::verdict`] whether to go
//! on, and waits (throttled, not runnable) while its group has spent its hard limit
//! (`limit_millis` per 100 ms period), or while another group needs the thread more: one
//! whose queued work has an earlier virtual deadline (virtual runtime plus its typical
//! task's CPU, so between groups about level the app answering short requests goes before
//! the spinning guest), or one already running elsewhere that is behind by more than a slice
//! of its own CPU. A group that wakes from idle is placed at most two such slices behind the
//! others, so idling does not bank credit. A wake that finds a group with a later deadline
//! running bumps the engine's epoch, so running guests reach their slice boundary at once
//! instead of up to a tick later; a charge or a stop that lets a waiting group run wakes its
//! guests at once instead of at their next tick.
//!
//! Short before long: the CPU shares are for guests that compete for the cores for more than
//! a moment. A task that has used less than [`BATCH_AFTER_NS`] (a request, as requests go) is
//! held to its group's hard limit only; past that, at its next suspension, it moves to the
//! batch threads ([`Metered::move_to`]), which run at a lower priority than the rest of the
//! process. So the gateway and short requests of every app get the cores first, and long
//! guests share what they leave by weight.
//!
//! [`Ledger`] is the arithmetic, pure and tested without wasmtime; [`CpuScheduler`] puts it
//! behind a lock and adds the clocks, the wake-ups and the epoch bumps; [`TaskMeter`] and
//! [`Metered`] attach one guest task to it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::sync::Notify;

use crate::runtime::Epochs;

/// The period a hard limit is counted over, as CFS's default `cpu.cfs_period_us`.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);
const PERIOD_NS: u64 = CPU_PERIOD.as_nanos() as u64;

/// Weight of a group whose replicas request one whole core: its virtual runtime advances at
/// the speed of the CPU it uses.
const UNIT_WEIGHT: u64 = 1000;

/// Least time between two epoch bumps made for a waking group: enough to cut a running slice
/// short, not so often that busy nodes spend their time switching.
const KICK_GAP_NS: u64 = 100_000;

/// What one replica may use of the node's CPU. Replicas with the same `group` (an app's) share
/// one account: their weights and limits add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuShare {
    /// The account the replica's guests are charged to; the agent uses `namespace/name`.
    pub group: Arc<str>,
    /// The relative weight under contention, in millicores (the spec's
    /// `resources.requests.cpu`): groups get CPU in proportion to it while they all have
    /// work, like CFS `cpu.weight`. 0 counts as 1, the smallest share.
    pub request_millis: u32,
    /// A hard ceiling in millicores (the spec's `resources.limits.cpu`), enforced per
    /// [`CPU_PERIOD`] even on an idle node, like CFS `cpu.max`; `None` for no ceiling. A
    /// group with any unlimited replica is unlimited.
    pub limit_millis: Option<u32>,
}

impl CpuShare {
    /// A share with a weight and no hard limit.
    pub fn new(group: impl Into<Arc<str>>, request_millis: u32) -> CpuShare {
        CpuShare {
            group: group.into(),
            request_millis,
            limit_millis: None,
        }
    }
}

impl Default for CpuShare {
    /// One core's weight in a group shared by every replica that names none, so code that
    /// does not care about sharing (tests, tools) behaves as one app.
    fn default() -> Self {
        CpuShare::new("unassigned", UNIT_WEIGHT as u32)
    }
}

/// What a group has consumed since its first replica on this node started (the account goes
/// when its last replica stops).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuUsage {
    /// CPU time the group's guests used, summed over guests: the guest thread's CPU clock
    /// read around each poll of a guest's task, so it covers the guest and the host calls
    /// it makes, not the gateway's work for its requests.
    pub used_ns: u64,
    /// Time the group's guests spent waiting for their share or their limit, summed over
    /// guests.
    pub throttled_ns: u64,
}

/// What a guest at a slice boundary should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Run,
    /// Wait, then ask again: until the period ends (`Some`, hard limit) or until the groups
    /// ahead have caught up (`None`, fair share).
    Wait {
        until: Option<u64>,
    },
}

/// One group's account; times are nanoseconds on the scheduler's clock.
#[derive(Debug)]
struct Account {
    key: Arc<str>,
    members: u32,
    weight: u64,
    unlimited_members: u32,
    limit_millis: u64,
    used: u64,
    throttled: u64,
    /// CPU used, scaled by `UNIT_WEIGHT / weight`: who is ahead.
    vruntime: u64,
    /// Tasks woken or being polled.
    runnable: u32,
    /// Tasks waiting at a slice boundary, to be woken when the group may run again.
    waiting: u32,
    /// What those tasks wait on: notified when the group may run again.
    signal: Arc<Notify>,
    /// Tasks being polled now, and the sum of the times their polls started: together they
    /// give the time in progress not charged yet, `running * now - started_sum`.
    running: u32,
    started_sum: u128,
    period_start: u64,
    period_used: u64,
    /// CPU a task of the group typically uses (a moving average over finished tasks), up to
    /// a slice: how long the group holds a thread once it gets one.
    request: u64,
}

impl Account {
    fn weight(&self) -> u64 {
        self.weight.max(1)
    }

    fn quota(&self) -> Option<u64> {
        (self.unlimited_members == 0).then(|| self.limit_millis * PERIOD_NS / UNIT_WEIGHT)
    }

    fn in_progress(&self, now: u64) -> u64 {
        (u128::from(self.running) * u128::from(now)).saturating_sub(self.started_sum) as u64
    }

    fn scaled(&self, ns: u64) -> u64 {
        (u128::from(ns) * u128::from(UNIT_WEIGHT) / u128::from(self.weight())) as u64
    }

    /// How far another group may run ahead of this one (in virtual runtime) while this one
    /// has work waiting: one slice of *this* group's CPU. Scaled by the weight of the group
    /// behind, as CFS scales its wake-up granularity by the waking task's weight, so that a
    /// group of any weight waits at most about a slice of its own CPU for its turn.
    fn lead(&self, slice: u64) -> u64 {
        self.scaled(slice)
    }

    /// Virtual runtime with the polls in progress counted.
    fn effective(&self, now: u64) -> u64 {
        self.vruntime + self.scaled(self.in_progress(now))
    }

    /// EEVDF's virtual deadline: where the group's virtual runtime will be once its next
    /// task has had its usual CPU. Between groups about level, the one whose tasks are short
    /// (an app answering requests) goes before the one whose tasks are long (a spinning
    /// guest): the same shares, with latency for the short.
    fn deadline(&self, now: u64, slice: u64) -> u64 {
        self.effective(now) + self.scaled(self.request.min(slice))
    }

    /// Starts the period `now` falls in; what was used past the quota stays as debt.
    fn roll(&mut self, now: u64) {
        if now < self.period_start + PERIOD_NS {
            return;
        }
        let periods = (now - self.period_start) / PERIOD_NS;
        self.period_start += periods * PERIOD_NS;
        self.period_used = match self.quota() {
            Some(quota) => self
                .period_used
                .saturating_sub(quota.saturating_mul(periods)),
            None => 0,
        };
    }

    fn charge(&mut self, ns: u64, now: u64) {
        self.roll(now);
        self.used += ns;
        self.period_used += ns;
        self.vruntime += self.scaled(ns);
    }
}

/// The accounts of every group on the node and the decisions made from them. Pure: time is
/// an argument (nanoseconds from any fixed origin), so tests drive it step by step.
#[derive(Debug)]
pub(crate) struct Ledger {
    accounts: Vec<Option<Account>>,
    index: HashMap<Arc<str>, usize>,
    /// The time slice, an epoch tick: see [`Account::lead`].
    slice: u64,
    last_kick: Option<u64>,
}

impl Ledger {
    pub(crate) fn new(slice: Duration) -> Ledger {
        Ledger {
            accounts: Vec::new(),
            index: HashMap::new(),
            slice: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX).max(1),
            last_kick: None,
        }
    }

    fn account(&mut self, id: usize) -> &mut Account {
        self.accounts[id]
            .as_mut()
            .expect("a member's account lives as long as the member")
    }

    /// Adds a replica to its group, opening the account if it is the first; returns the id
    /// the replica's guests are charged under.
    pub(crate) fn join(&mut self, share: &CpuShare, now: u64) -> usize {
        let id = match self.index.get(&share.group) {
            Some(&id) => id,
            None => {
                let account = Account {
                    key: share.group.clone(),
                    members: 0,
                    weight: 0,
                    unlimited_members: 0,
                    limit_millis: 0,
                    used: 0,
                    throttled: 0,
                    vruntime: self.newcomer_vruntime(),
                    runnable: 0,
                    waiting: 0,
                    signal: Arc::new(Notify::new()),
                    running: 0,
                    started_sum: 0,
                    period_start: now,
                    period_used: 0,
                    request: self.slice,
                };
                let id = match self.accounts.iter().position(Option::is_none) {
                    Some(free) => {
                        self.accounts[free] = Some(account);
                        free
                    }
                    None => {
                        self.accounts.push(Some(account));
                        self.accounts.len() - 1
                    }
                };
                self.index.insert(share.group.clone(), id);
                id
            }
        };
        let account = self.account(id);
        account.members += 1;
        account.weight += u64::from(share.request_millis);
        match share.limit_millis {
            Some(limit) => account.limit_millis += u64::from(limit),
            None => account.unlimited_members += 1,
        }
        id
    }

    /// Takes a replica out of its group; the account closes with its last member.
    pub(crate) fn leave(&mut self, id: usize, share: &CpuShare) {
        let account = self.account(id);
        account.members -= 1;
        account.weight -= u64::from(share.request_millis);
        match share.limit_millis {
            Some(limit) => account.limit_millis -= u64::from(limit),
            None => account.unlimited_members -= 1,
        }
        if account.members == 0 {
            let key = account.key.clone();
            self.index.remove(&key);
            self.accounts[id] = None;
        }
    }

    /// A new group starts level with the furthest one, so it cannot claim CPU for the time
    /// before it existed.
    fn newcomer_vruntime(&self) -> u64 {
        self.accounts
            .iter()
            .flatten()
            .map(|a| a.vruntime)
            .max()
            .unwrap_or(0)
    }

    /// A task of group `id` became runnable. Returns whether running guests should be sent to
    /// their slice boundary now (bump the epoch): another group is running with a later
    /// deadline than this one, so it should give way to this task (see [`Ledger::verdict`])
    /// now rather than at the next tick.
    pub(crate) fn wake(&mut self, id: usize, now: u64) -> bool {
        let account = self.account(id);
        account.runnable += 1;
        if account.runnable == 1 {
            self.place(id, now);
        }
        let slice = self.slice;
        let mine = self.account(id).deadline(now, slice);
        let ahead = self.accounts.iter().enumerate().any(|(other, a)| {
            other != id
                && a.as_ref()
                    .is_some_and(|a| a.running > 0 && a.deadline(now, slice) > mine)
        });
        let may_kick = self.last_kick.is_none_or(|last| now >= last + KICK_GAP_NS);
        if ahead && may_kick {
            self.last_kick = Some(now);
            true
        } else {
            false
        }
    }

    /// CFS's placement of a waking task: no further behind the others than two of its leads,
    /// so a group that idled runs first but cannot make up for all the time it did not use.
    fn place(&mut self, id: usize, now: u64) {
        let others = || {
            self.accounts
                .iter()
                .enumerate()
                .filter(move |&(other, _)| other != id)
                .filter_map(|(_, a)| a.as_ref())
        };
        let base = others()
            .filter(|a| a.runnable > 0)
            .map(|a| a.effective(now))
            .min()
            .or_else(|| others().map(|a| a.vruntime).max());
        if let Some(base) = base {
            let slice = self.slice;
            let account = self.account(id);
            let floor = base.saturating_sub(2 * account.lead(slice));
            account.vruntime = account.vruntime.max(floor);
        }
    }

    /// A task of group `id` stopped being runnable (waiting on I/O, throttled, or done).
    /// Returns whether the group has no runnable task left, so that groups waiting for it to
    /// catch up should look again.
    pub(crate) fn sleep(&mut self, id: usize) -> bool {
        let account = self.account(id);
        account.runnable = account.runnable.saturating_sub(1);
        account.runnable == 0
    }

    /// A poll of one of the group's tasks started at `now`.
    pub(crate) fn start(&mut self, id: usize, now: u64) {
        let account = self.account(id);
        account.running += 1;
        account.started_sum += u128::from(now);
    }

    /// The poll that started at `started` ended at `now`, having used `cpu` of its thread's
    /// CPU: charge that.
    pub(crate) fn stop(&mut self, id: usize, started: u64, now: u64, cpu: u64) {
        let account = self.account(id);
        account.running -= 1;
        account.started_sum -= u128::from(started);
        account.charge(cpu, now);
    }

    /// Charges the `cpu` a poll that started at `started` used up to `now` without ending it
    /// (a slice boundary inside a poll); the caller's poll now counts from `now`.
    pub(crate) fn mark(&mut self, id: usize, started: u64, now: u64, cpu: u64) {
        let account = self.account(id);
        account.started_sum += u128::from(now.saturating_sub(started));
        account.charge(cpu, now);
    }

    /// Whether a guest of group `id` may run on at `now`: not while its group is over its
    /// limit for this period, nor while another group needs the thread more: one with work
    /// waiting for a thread (woken tasks not being polled) and an earlier virtual deadline
    /// (EEVDF's pick: [`Account::deadline`]), or one with work running on other threads and
    /// behind by more than its lead.
    ///
    /// The second case keeps a group within its share even where the guest threads could
    /// run both: the work behind is an app's requests, whose CPU is also the gateway's and
    /// its clients' on the same cores, so a spinning guest taking "free" guest threads still
    /// slows its neighbours. The group with the earliest deadline never waits, so someone
    /// always runs.
    pub(crate) fn verdict(&mut self, id: usize, now: u64) -> Verdict {
        if let verdict @ Verdict::Wait { .. } = self.limit_verdict(id, now) {
            return verdict;
        }
        let slice = self.slice;
        let account = self.account(id);
        let (mine, my_deadline) = (account.effective(now), account.deadline(now, slice));
        let behind = self.accounts.iter().enumerate().any(|(other, a)| {
            other != id
                && a.as_ref().is_some_and(|a| {
                    (a.runnable > a.running && a.deadline(now, slice) < my_deadline)
                        || (a.runnable > 0 && a.effective(now) + a.lead(slice) < mine)
                })
        });
        if behind {
            Verdict::Wait { until: None }
        } else {
            Verdict::Run
        }
    }

    /// Whether a guest of group `id` may go on as far as its hard limit is concerned: what a
    /// short task is held to. Sharing (the rest of [`Ledger::verdict`]) is for long ones.
    pub(crate) fn limit_verdict(&mut self, id: usize, now: u64) -> Verdict {
        let account = self.account(id);
        account.roll(now);
        match account.quota() {
            Some(quota) if account.period_used + account.in_progress(now) >= quota => {
                Verdict::Wait {
                    until: Some(account.period_start + PERIOD_NS),
                }
            }
            _ => Verdict::Run,
        }
    }

    /// A task of group `id` finished, having used `cpu`: a sample of the group's request.
    pub(crate) fn finished(&mut self, id: usize, cpu: u64) {
        let account = self.account(id);
        account.request = (account.request * 7 + cpu) / 8;
    }

    /// A guest of group `id` starts waiting at a slice boundary.
    pub(crate) fn hold(&mut self, id: usize) {
        self.account(id).waiting += 1;
    }

    /// What guests of group `id` waiting at a slice boundary wait on.
    pub(crate) fn signal(&mut self, id: usize) -> Arc<Notify> {
        self.account(id).signal.clone()
    }

    /// The signals of groups with guests waiting that may now run: to be notified after a
    /// change that can let them (a group charged or out of work).
    pub(crate) fn releasable(&mut self, now: u64) -> Vec<Arc<Notify>> {
        let mut released = Vec::new();
        for id in 0..self.accounts.len() {
            let held = self.accounts[id].as_ref().is_some_and(|a| a.waiting > 0);
            if held && self.verdict(id, now) == Verdict::Run {
                released.push(self.account(id).signal.clone());
            }
        }
        released
    }

    /// A guest of group `id` waited `ns` at a slice boundary and goes on.
    pub(crate) fn release(&mut self, id: usize, ns: u64) {
        let account = self.account(id);
        account.waiting = account.waiting.saturating_sub(1);
        account.throttled += ns;
    }

    /// Every open account, by group.
    pub(crate) fn usage(&self) -> Vec<(Arc<str>, CpuUsage)> {
        let mut usage: Vec<_> = self
            .accounts
            .iter()
            .flatten()
            .map(|a| {
                (
                    a.key.clone(),
                    CpuUsage {
                        used_ns: a.used,
                        throttled_ns: a.throttled,
                    },
                )
            })
            .collect();
        usage.sort_by(|a, b| a.0.cmp(&b.0));
        usage
    }
}

/// The [`Ledger`] of a runtime, with its clock, the wake-up of waiting guests and the engines
/// whose epoch it bumps.
pub(crate) struct CpuScheduler {
    ledger: Mutex<Ledger>,
    /// The batch threads a task moves to once it has used [`BATCH_AFTER_NS`] of CPU; `None`
    /// keeps every task where it started.
    batch: Option<tokio::runtime::Handle>,
    /// The guest threads: how many waiting guests of a group that may run again are woken.
    threads: usize,
    epochs: Arc<Epochs>,
    origin: Instant,
    tick: Duration,
}

impl CpuScheduler {
    pub(crate) fn new(
        epochs: Arc<Epochs>,
        tick: Duration,
        threads: usize,
        batch: Option<tokio::runtime::Handle>,
    ) -> CpuScheduler {
        CpuScheduler {
            batch,
            threads,
            ledger: Mutex::new(Ledger::new(tick)),
            epochs,
            origin: Instant::now(),
            tick,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens (or joins) the replica's group account; leaving is dropping the member.
    pub(crate) fn join(self: &Arc<Self>, share: CpuShare) -> Arc<Member> {
        let id = self.ledger().join(&share, self.now());
        Arc::new(Member {
            scheduler: self.clone(),
            id,
            share,
        })
    }

    pub(crate) fn usage(&self) -> Vec<(Arc<str>, CpuUsage)> {
        self.ledger().usage()
    }

    fn kick(&self) {
        self.epochs.increment();
    }

    /// Groups that may run again: wake as many of each one's waiting guests as there are
    /// threads to run them (the others look again at their next tick), not all of them,
    /// which would cost a poll each, many times a second, for every guest of a busy group.
    fn release(&self, signals: Vec<Arc<Notify>>) {
        for signal in signals {
            for _ in 0..self.threads {
                signal.notify_one();
            }
        }
    }
}

/// CPU time the calling thread has used, in nanoseconds: what a poll is charged. About half
/// a microsecond a read here (a system call), twice per poll; the monotonic clock would be
/// twenty times cheaper but counts time the OS gave the thread's core to someone else, which
/// under load tripled what guests were charged and made the quiet app look like the greedy
/// one.
#[cfg(unix)]
fn thread_cpu() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the current time into the timespec it is given.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0;
    if ok {
        (now.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(now.tv_nsec as u64)
    } else {
        0
    }
}

/// Without a per-thread CPU clock, the time the poll took.
#[cfg(not(unix))]
fn thread_cpu() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One replica's membership of its group.
pub(crate) struct Member {
    scheduler: Arc<CpuScheduler>,
    id: usize,
    share: CpuShare,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.scheduler.ledger().leave(self.id, &self.share);
    }
}

impl Member {
    /// The group it counts in: its app.
    pub(crate) fn group(&self) -> &Arc<str> {
        &self.share.group
    }

    /// The meter of one guest task (a request, a command run), idle until [`Metered`] runs it.
    pub(crate) fn meter(self: &Arc<Self>) -> Arc<TaskMeter> {
        Arc::new(TaskMeter {
            member: self.clone(),
            state: AtomicU8::new(IDLE),
            waker: AtomicWaker::new(),
            poll_start: AtomicU64::new(0),
            poll_cpu_start: AtomicU64::new(0),
            cpu: AtomicU64::new(0),
        })
    }
}

const IDLE: u8 = 0;
/// Woken, waiting to be polled.
const QUEUED: u8 = 1;
const RUNNING: u8 = 2;
/// Woken while being polled (or yielding): stays runnable when the poll returns.
const RUNNING_WOKEN: u8 = 3;
const DONE: u8 = 4;
/// Waiting at a slice boundary for its group's turn: not runnable, whatever wakes it to look
/// again, so that looking again moves no count and wakes no one.
const THROTTLED: u8 = 5;
/// Polled while throttled.
const THROTTLED_POLL: u8 = 6;

/// Follows one guest task: whether it is runnable (for its group's count) and when its
/// current poll started (for charging). The store's epoch callback reaches it through the
/// store's data.
pub(crate) struct TaskMeter {
    member: Arc<Member>,
    state: AtomicU8,
    /// The executor's waker of the task; ours wraps it.
    waker: AtomicWaker,
    /// When the current poll started on the scheduler's clock, and on its thread's CPU
    /// clock: a poll runs on one thread, so the difference of the second is its CPU.
    poll_start: AtomicU64,
    poll_cpu_start: AtomicU64,
    /// CPU charged so far, for the group's typical request when the task finishes.
    cpu: AtomicU64,
}

impl TaskMeter {
    /// Starts counting a poll (or the rest of one) from `now`.
    fn begin(&self, now: u64) {
        self.poll_start.store(now, Ordering::Relaxed);
        self.poll_cpu_start.store(thread_cpu(), Ordering::Relaxed);
    }

    /// The current poll's start on the scheduler's clock, and the CPU it used so far; with
    /// `restart`, counting starts again from here.
    fn so_far(&self, now: u64, restart: bool) -> (u64, u64) {
        let cpu = thread_cpu();
        let (started, cpu_started) = if restart {
            (
                self.poll_start.swap(now, Ordering::Relaxed),
                self.poll_cpu_start.swap(cpu, Ordering::Relaxed),
            )
        } else {
            (
                self.poll_start.load(Ordering::Relaxed),
                self.poll_cpu_start.load(Ordering::Relaxed),
            )
        };
        (started, cpu.saturating_sub(cpu_started))
    }

    /// Adds a charged part of a poll to the task's total.
    fn charged(&self, cpu: u64) -> u64 {
        self.cpu.fetch_add(cpu, Ordering::Relaxed) + cpu
    }

    fn scheduler(&self) -> &CpuScheduler {
        &self.member.scheduler
    }

    /// Moves the task's state and tells the ledger, under the ledger's lock so the runnable
    /// count follows transitions in the order they happen. With `settle`, the time of a
    /// change that can let waiting groups run (a charge, a task stopping), those are woken.
    fn transition(
        &self,
        settle: Option<u64>,
        update: impl FnOnce(&mut Ledger, usize, u8) -> Option<u8>,
    ) {
        let scheduler = self.scheduler();
        let released = {
            let mut ledger = scheduler.ledger();
            let state = self.state.load(Ordering::Acquire);
            if let Some(next) = update(&mut ledger, self.member.id, state) {
                self.state.store(next, Ordering::Release);
            }
            settle.map(|now| ledger.releasable(now))
        };
        if let Some(released) = released {
            scheduler.release(released);
        }
    }

    /// Runnable from now: the task was spawned or woken.
    fn woken(&self) {
        let now = self.scheduler().now();
        let mut kick = false;
        self.transition(None, |ledger, id, state| match state {
            IDLE => {
                kick = ledger.wake(id, now);
                Some(QUEUED)
            }
            RUNNING => Some(RUNNING_WOKEN),
            _ => None,
        });
        if kick {
            self.scheduler().kick();
        }
    }

    fn poll_started(&self) {
        let now = self.scheduler().now();
        self.begin(now);
        let mut kick = false;
        self.transition(None, |ledger, id, state| match state {
            THROTTLED => Some(THROTTLED_POLL),
            _ => {
                if state == IDLE {
                    kick = ledger.wake(id, now);
                }
                ledger.start(id, now);
                Some(RUNNING)
            }
        });
        if kick {
            self.scheduler().kick();
        }
    }

    fn poll_ended(&self, ready: bool) {
        let now = self.scheduler().now();
        let (started, cpu) = self.so_far(now, false);
        self.transition(Some(now), |ledger, id, state| match state {
            THROTTLED_POLL => Some(if ready { DONE } else { THROTTLED }),
            RUNNING_WOKEN if !ready => {
                ledger.stop(id, started, now, cpu);
                self.charged(cpu);
                Some(QUEUED)
            }
            _ => {
                ledger.stop(id, started, now, cpu);
                let total = self.charged(cpu);
                ledger.sleep(id);
                if ready {
                    ledger.finished(id, total);
                }
                Some(if ready { DONE } else { IDLE })
            }
        });
    }

    /// Forgets the CPU used so far for the move to the batch threads: a p3 worker serving one
    /// request after another is as short as its requests, not as long as its life.
    pub(crate) fn reset_cpu(&self) {
        self.cpu.store(0, Ordering::Relaxed);
    }

    /// Charges the current poll up to now: called by the epoch callback at a slice boundary.
    pub(crate) fn mark_slice(&self) {
        let scheduler = self.scheduler();
        let now = scheduler.now();
        let (started, cpu) = self.so_far(now, true);
        self.charged(cpu);
        let released = {
            let mut ledger = scheduler.ledger();
            ledger.mark(self.member.id, started, now, cpu);
            ledger.releasable(now)
        };
        scheduler.release(released);
    }

    /// Waits until the group may run: at a slice boundary (`yield_first`: after letting the
    /// executor run other tasks once, as a plain yield would, staying runnable) or before a
    /// guest starts. Gives up at `deadline`, which the caller then enforces.
    pub(crate) async fn admit(self: Arc<Self>, deadline: Option<Instant>, yield_first: bool) {
        let scheduler = self.scheduler();
        if yield_first {
            // The wake is already on its way (deferred by the executor), so the task stays
            // runnable across the yield, as a yielding thread stays on its run queue.
            self.state
                .compare_exchange(RUNNING, RUNNING_WOKEN, Ordering::AcqRel, Ordering::Acquire)
                .ok();
            tokio::task::yield_now().await;
        }
        // A task that has used less CPU than a request takes is held to its group's limit
        // only: short requests go first, and sharing is between the long guests that
        // compete for the cores for more than a moment.
        let short = self.cpu.load(Ordering::Relaxed) < BATCH_AFTER_NS;
        let verdict = |ledger: &mut Ledger, now| {
            if short {
                ledger.limit_verdict(self.member.id, now)
            } else {
                ledger.verdict(self.member.id, now)
            }
        };
        if verdict(&mut scheduler.ledger(), scheduler.now()) == Verdict::Run {
            return;
        }
        let _throttled = Throttled::start(&self);
        let signal = scheduler.ledger().signal(self.member.id);
        loop {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = scheduler.now();
            let until = match verdict(&mut scheduler.ledger(), now) {
                Verdict::Run => return,
                Verdict::Wait { until } => until,
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return;
            }
            // Woken when the ledger sees the group may run (see `Ledger::releasable`); and
            // every tick regardless, as not every guest waiting is woken.
            let mut wake_at = now + scheduler.tick;
            if let Some(until) = until {
                wake_at = wake_at.min(scheduler.origin + Duration::from_nanos(until));
            }
            if let Some(deadline) = deadline {
                wake_at = wake_at.min(deadline);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }
}

/// A guest waiting at a slice boundary. Made inside a poll of its task, it takes the task
/// out of its group's runnable count; dropped — allowed to run, out of time, or cancelled —
/// it puts the task back (if a poll is still under way) and records the time waited.
struct Throttled<'a> {
    meter: &'a TaskMeter,
    since: Instant,
}

impl<'a> Throttled<'a> {
    fn start(meter: &'a TaskMeter) -> Throttled<'a> {
        let now = meter.scheduler().now();
        let (started, cpu) = meter.so_far(now, false);
        meter.transition(Some(now), |ledger, id, state| match state {
            RUNNING | RUNNING_WOKEN => {
                ledger.stop(id, started, now, cpu);
                meter.charged(cpu);
                ledger.hold(id);
                ledger.sleep(id);
                Some(THROTTLED_POLL)
            }
            _ => None,
        });
        Throttled {
            meter,
            since: Instant::now(),
        }
    }
}

impl Drop for Throttled<'_> {
    fn drop(&mut self) {
        let meter = self.meter;
        let scheduler = meter.scheduler();
        let now = scheduler.now();
        let waited = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut kick = false;
        meter.transition(None, |ledger, id, state| {
            let next = match state {
                THROTTLED_POLL => {
                    kick = ledger.wake(id, now);
                    ledger.start(id, now);
                    meter.begin(now);
                    Some(RUNNING)
                }
                _ => None,
            };
            if matches!(state, THROTTLED_POLL | THROTTLED | DONE) {
                ledger.release(id, waited);
            }
            next
        });
        if kick {
            scheduler.kick();
        }
    }
}

impl Wake for TaskMeter {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken();
        self.waker.wake();
    }
}

/// A guest task's future, metered: each poll is charged to the task's group, and the task
/// counts as runnable from its wake-up to the end of the poll that finds nothing to do.
pub(crate) struct Metered<F: Future> {
    stage: Stage<F>,
    meter: Arc<TaskMeter>,
    waker: Waker,
    /// Whether this is the batch threads' half of a moved task.
    batch: bool,
}

enum Stage<F: Future> {
    Here(Pin<Box<F>>),
    /// For a moment, while the future changes threads.
    Moving,
    /// Moved to the batch threads: the rest runs there, its output comes back here.
    Moved(tokio::task::JoinHandle<F::Output>),
}

impl<F: Future> Metered<F> {
    /// Wraps `future`; the task counts as runnable from now.
    pub(crate) fn new(meter: Arc<TaskMeter>, future: F) -> Metered<F> {
        meter.woken();
        Metered {
            stage: Stage::Here(Box::pin(future)),
            waker: Waker::from(meter.clone()),
            meter,
            batch: false,
        }
    }
}

impl<F> Future for Metered<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Stage::Here(future) = &mut this.stage else {
            return this.poll_moved(cx);
        };
        this.meter.waker.register(cx.waker());
        this.meter.poll_started();
        let result = future.as_mut().poll(&mut Context::from_waker(&this.waker));
        this.meter.poll_ended(result.is_ready());
        if result.is_pending()
            && !this.batch
            && this.meter.cpu.load(Ordering::Relaxed) >= BATCH_AFTER_NS
            && let Some(batch) = this.meter.scheduler().batch.clone()
        {
            this.move_to(&batch);
            return this.poll_moved(cx);
        }
        result
    }
}

impl<F> Metered<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Hands the rest of the task to the batch threads: a guest that has used more CPU than a
    /// request takes (a spinning or batch one) goes on there, at a lower priority than the
    /// gateway and than the short requests of every app, which keep the guest threads and get
    /// the cores first when both want them. The batch half still gets every cycle nobody
    /// else wants, and sharing among guests stays the [`Ledger`]'s. It happens where the
    /// guest is suspended (a slice boundary, a wait), so nothing runs on two threads.
    fn move_to(&mut self, batch: &tokio::runtime::Handle) {
        let Stage::Here(future) = std::mem::replace(&mut self.stage, Stage::Moving) else {
            unreachable!("only a task still here moves");
        };
        let rest = Metered {
            stage: Stage::Here(future),
            waker: Waker::from(self.meter.clone()),
            meter: self.meter.clone(),
            batch: true,
        };
        self.stage = Stage::Moved(batch.spawn(rest));
    }

    /// The moved task's output, when its batch half has it.
    fn poll_moved(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Stage::Moved(task) = &mut self.stage else {
            unreachable!("a task is polled here or moved, never while moving");
        };
        Pin::new(task).poll(cx).map(|joined| match joined {
            Ok(output) => output,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("the batch threads stopped under a running guest"),
        })
    }
}

impl<F: Future> Drop for Metered<F> {
    /// A task cancelled (aborted, or its runtime shut down) before it finished stops counting
    /// as runnable; a moved one takes its batch half with it (which counts itself out).
    fn drop(&mut self) {
        match &self.stage {
            Stage::Here(_) => {}
            Stage::Moving => return,
            Stage::Moved(task) => {
                task.abort();
                return;
            }
        }
        let meter = &self.meter;
        let now = meter.scheduler().now();
        meter.transition(Some(now), |ledger, id, state| match state {
            QUEUED | RUNNING | RUNNING_WOKEN => {
                ledger.sleep(id);
                Some(DONE)
            }
            THROTTLED | THROTTLED_POLL => Some(DONE),
            _ => None,
        });
    }
}

/// CPU a guest task may use on the guest threads before it moves to the batch threads: far
/// more than a request that answers takes, far less than a time slice.
const BATCH_AFTER_NS: u64 = 2_000_000;

/// The nice value of the batch threads: CFS weight 110 against the 1024 of the rest of the
/// process, so when the cores are busy the kernel runs the gateway's accepting, parsing and
/// proxying, and short requests of any app, before another slice of a long guest.
pub(crate) const BATCH_NICE: i32 = 10;

/// Sets the calling thread's nice value (on Linux a thread's own, not the process's); a
/// failure only costs the priority, so it is logged, not returned.
#[cfg(target_os = "linux")]
pub(crate) fn set_thread_nice(nice: i32) {
    // SAFETY: gettid and setpriority read and write no memory of ours.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        tracing::debug!(nice, error = %std::io::Error::last_os_error(), "cannot lower the batch threads' priority");
    }
}

/// Elsewhere the batch threads keep the process's priority.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_thread_nice(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn share(group: &str, request: u32, limit: Option<u32>) -> CpuShare {
        CpuShare {
            group: group.into(),
            request_millis: request,
            limit_millis: limit,
        }
    }

    /// Two groups with work all the time; every millisecond, one guest of each group that the
    /// ledger lets run runs for 1 ms (one core's worth of scheduling, simplified).
    fn contend(ledger: &mut Ledger, a: usize, b: usize, millis: u64) -> (u64, u64) {
        ledger.wake(a, 0);
        ledger.wake(b, 0);
        let (mut ran_a, mut ran_b) = (0, 0);
        for step in 0..millis {
            let now = step * MS;
            // Alternate who asks first, as slice boundaries would.
            let order = if step % 2 == 0 { [a, b] } else { [b, a] };
            let runner = order
                .into_iter()
                .find(|&g| ledger.verdict(g, now) == Verdict::Run)
                .expect("someone may always run");
            ledger.start(runner, now);
            ledger.stop(runner, now, now + MS, MS);
            if runner == a {
                ran_a += 1;
            } else {
                ran_b += 1;
            }
        }
        (ran_a, ran_b)
    }

    #[test]
    fn contending_groups_share_by_weight() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let a = ledger.join(&share("a", 100, None), 0);
        let b = ledger.join(&share("b", 300, None), 0);
        let (ran_a, ran_b) = contend(&mut ledger, a, b, 4000);
        // 1:3 by weight, give or take a couple of slices.
        assert!(
            (950..=1050).contains(&ran_a),
            "a ran {ran_a} ms, b {ran_b} ms"
        );
        assert_eq!(ran_a + ran_b, 4000);

        let usage = ledger.usage();
        assert_eq!(usage[0].0.as_ref(), "a");
        assert_eq!(usage[0].1.used_ns, ran_a * MS);
        assert_eq!(usage[1].1.used_ns, ran_b * MS);
    }

    #[test]
    fn replicas_of_one_app_add_their_weights() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let a = ledger.join(&share("a", 100, None), 0);
        let b = ledger.join(&share("b", 100, None), 0);
        assert_eq!(ledger.join(&share("b", 100, None), 0), b);
        let (ran_a, ran_b) = contend(&mut ledger, a, b, 3000);
        assert!(
            (950..=1050).contains(&ran_a),
            "a ran {ran_a} ms, b {ran_b} ms"
        );

        // The account closes with its last replica.
        ledger.leave(b, &share("b", 100, None));
        assert_eq!(ledger.usage().len(), 2);
        ledger.leave(b, &share("b", 100, None));
        assert_eq!(ledger.usage().len(), 1);
    }

    #[test]
    fn a_group_ahead_runs_while_no_other_has_work() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let spinner = ledger.join(&share("spinner", 50, None), 0);
        let quiet = ledger.join(&share("quiet", 50, None), 0);
        ledger.wake(spinner, 0);
        ledger.start(spinner, 0);
        ledger.stop(spinner, 0, 500 * MS, 500 * MS);
        assert_eq!(ledger.verdict(spinner, 500 * MS), Verdict::Run);

        // The quiet group wakes: it is placed just behind, not 500 ms behind, and the
        // spinner, running ahead of it, is sent to its slice boundary and waits there.
        ledger.start(spinner, 500 * MS);
        assert!(
            ledger.wake(quiet, 501 * MS),
            "the waking group asks for a kick"
        );
        assert_eq!(
            ledger.verdict(spinner, 501 * MS),
            Verdict::Wait { until: None }
        );
        ledger.stop(spinner, 500 * MS, 501 * MS, MS);
        // Its work done, the quiet group sleeps and the spinner goes on.
        ledger.start(quiet, 501 * MS);
        ledger.stop(quiet, 501 * MS, 502 * MS, MS);
        assert!(ledger.sleep(quiet));
        assert_eq!(ledger.verdict(spinner, 502 * MS), Verdict::Run);

        // Having idled for 500 ms did not bank credit: under contention the quiet group gets
        // its half, not the whole CPU for the next 500 ms.
        let (ran_spinner, ran_quiet) = contend(&mut ledger, spinner, quiet, 200);
        assert!(
            ran_spinner >= 80,
            "spinner {ran_spinner} ms, quiet {ran_quiet} ms"
        );
    }

    #[test]
    fn work_waiting_for_a_thread_goes_first_and_running_work_within_a_lead() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        // Weight 1000: virtual runtime is CPU time, and a lead is one 10 ms slice.
        let ahead = ledger.join(&share("ahead", 1000, None), 0);
        let behind = ledger.join(&share("behind", 1000, None), 0);
        ledger.wake(ahead, 0);
        ledger.start(ahead, 0);
        ledger.stop(ahead, 0, 15 * MS, 15 * MS);
        // 15 ms behind (within two leads, so not moved up) and waiting for a thread: the
        // group ahead gives way.
        ledger.wake(behind, 15 * MS);
        assert_eq!(
            ledger.verdict(ahead, 15 * MS),
            Verdict::Wait { until: None }
        );
        // Running on another thread and more than a lead behind: still ahead's turn to wait.
        ledger.start(behind, 15 * MS);
        assert_eq!(
            ledger.verdict(ahead, 15 * MS),
            Verdict::Wait { until: None }
        );
        // Within a lead, both run.
        ledger.mark(behind, 15 * MS, 25 * MS, 10 * MS);
        assert_eq!(ledger.verdict(ahead, 25 * MS), Verdict::Run);
        // ... unless more of the group behind is waiting for a thread.
        ledger.wake(behind, 25 * MS);
        assert_eq!(
            ledger.verdict(ahead, 25 * MS),
            Verdict::Wait { until: None }
        );
        // The group behind never waits for the one ahead.
        assert_eq!(ledger.verdict(behind, 25 * MS), Verdict::Run);
    }

    #[test]
    fn between_level_groups_the_short_tasks_go_first() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let spinner = ledger.join(&share("spinner", 100, None), 0);
        let quick = ledger.join(&share("quick", 100, None), 0);
        // Its requests take 0.1 ms; the spinner's run for whole slices.
        for _ in 0..40 {
            ledger.finished(quick, MS / 10);
        }
        for group in [spinner, quick] {
            ledger.wake(group, 0);
            ledger.start(group, 0);
            ledger.stop(group, 0, MS, MS);
        }
        // Level, both with work waiting for a thread: the quick one goes first.
        assert_eq!(ledger.verdict(spinner, MS), Verdict::Wait { until: None });
        assert_eq!(ledger.verdict(quick, MS), Verdict::Run);
        // Until it is more than a slice of the spinner's ahead.
        ledger.start(quick, MS);
        ledger.stop(quick, MS, 12 * MS, 11 * MS);
        assert_eq!(ledger.verdict(spinner, 12 * MS), Verdict::Run);
        assert_eq!(
            ledger.verdict(quick, 12 * MS),
            Verdict::Wait { until: None }
        );
    }

    #[test]
    fn waiting_groups_are_released_when_they_may_run() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let ahead = ledger.join(&share("ahead", 1000, None), 0);
        let behind = ledger.join(&share("behind", 1000, None), 0);
        ledger.wake(ahead, 0);
        ledger.start(ahead, 0);
        ledger.stop(ahead, 0, 15 * MS, 15 * MS);
        ledger.wake(behind, 15 * MS);
        assert_eq!(
            ledger.verdict(ahead, 15 * MS),
            Verdict::Wait { until: None }
        );
        ledger.sleep(ahead);
        ledger.hold(ahead);
        assert!(ledger.releasable(15 * MS).is_empty());
        // The work behind done, the group ahead may go on: its waiters are to be woken.
        ledger.start(behind, 15 * MS);
        ledger.stop(behind, 15 * MS, 16 * MS, MS);
        ledger.sleep(behind);
        let released = ledger.releasable(16 * MS);
        assert_eq!(released.len(), 1);
        assert!(Arc::ptr_eq(&released[0], &ledger.signal(ahead)));
    }

    #[test]
    fn kicks_are_spaced() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let spinner = ledger.join(&share("spinner", 100, None), 0);
        let quiet = ledger.join(&share("quiet", 100, None), 0);
        ledger.wake(spinner, 0);
        ledger.start(spinner, 0);
        ledger.mark(spinner, 0, 100 * MS, 100 * MS);
        assert!(ledger.wake(quiet, 100 * MS));
        ledger.sleep(quiet);
        assert!(!ledger.wake(quiet, 100 * MS + 1), "too soon after the last");
        ledger.sleep(quiet);
        assert!(ledger.wake(quiet, 101 * MS));
    }

    #[test]
    fn a_short_task_is_held_to_its_limit_not_to_its_share() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        let quick = ledger.join(&share("quick", 50, Some(100)), 0);
        let long = ledger.join(&share("long", 50, None), 0);
        // The quick group ran 5 ms; the long one is behind and waits for a thread.
        ledger.wake(quick, 0);
        ledger.start(quick, 0);
        ledger.stop(quick, 0, 5 * MS, 5 * MS);
        ledger.wake(quick, 5 * MS);
        ledger.wake(long, 5 * MS);
        assert_eq!(
            ledger.verdict(quick, 6 * MS),
            Verdict::Wait { until: None },
            "a long task of the quick group waits for its share"
        );
        assert_eq!(
            ledger.limit_verdict(quick, 6 * MS),
            Verdict::Run,
            "a short one does not"
        );
        // Past its 10 ms per period, even a short task waits.
        ledger.start(quick, 6 * MS);
        ledger.mark(quick, 6 * MS, 11 * MS, 5 * MS);
        assert_eq!(
            ledger.limit_verdict(quick, 11 * MS),
            Verdict::Wait {
                until: Some(100 * MS)
            }
        );
    }

    /// CPU burnt on the calling thread for `ns` nanoseconds of its clock.
    fn burn(ns: u64) {
        let start = thread_cpu();
        while thread_cpu() - start < ns {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    fn a_task_past_a_requests_cpu_moves_to_the_batch_threads_and_returns_from_there() {
        let threads = |name: &'static str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(name)
                .enable_all()
                .build()
                .unwrap()
        };
        let (guests, batch) = (threads("test-guest"), threads("test-batch"));
        let scheduler = Arc::new(CpuScheduler::new(
            Arc::new(Epochs::default()),
            Duration::from_millis(10),
            1,
            Some(batch.handle().clone()),
        ));
        let member = scheduler.join(CpuShare::new("app", 100));
        let name = || std::thread::current().name().map(str::to_string);
        let run = |cpu_per_poll: u64| {
            let meter = member.meter();
            guests.block_on(guests.spawn(Metered::new(meter, async move {
                let mut seen = Vec::new();
                for _ in 0..3 {
                    seen.push(name());
                    burn(cpu_per_poll);
                    tokio::task::yield_now().await;
                }
                seen
            })))
        };
        let short = run(100_000).unwrap();
        assert!(
            short.iter().all(|t| t.as_deref() == Some("test-guest")),
            "{short:?}"
        );
        let long = run(BATCH_AFTER_NS).unwrap();
        assert_eq!(long[0].as_deref(), Some("test-guest"));
        assert!(
            long[1..].iter().all(|t| t.as_deref() == Some("test-batch")),
            "{long:?}"
        );
        assert!(
            scheduler
                .usage()
                .iter()
                .all(|(_, u)| u.used_ns >= 3 * BATCH_AFTER_NS),
            "both halves are charged to the group"
        );
    }

    #[test]
    fn a_hard_limit_throttles_without_contention() {
        let mut ledger = Ledger::new(Duration::from_millis(10));
        // 100m: 10 ms per 100 ms period.
        let id = ledger.join(&share("limited", 100, Some(100)), 0);
        ledger.wake(id, 0);
        ledger.start(id, 0);
        assert_eq!(ledger.verdict(id, 5 * MS), Verdict::Run);
        ledger.mark(id, 0, 10 * MS, 10 * MS);
        assert_eq!(
            ledger.verdict(id, 10 * MS),
            Verdict::Wait {
                until: Some(100 * MS)
            }
        );
        // Overrunning by a slice is paid back in the next period.
        ledger.stop(id, 10 * MS, 20 * MS, 10 * MS);
        assert_eq!(
            ledger.verdict(id, 100 * MS),
            Verdict::Wait {
                until: Some(200 * MS)
            }
        );
        assert_eq!(ledger.verdict(id, 200 * MS), Verdict::Run);
        ledger.hold(id);
        ledger.release(id, 180 * MS);
        assert_eq!(
            ledger.usage()[0].1,
            CpuUsage {
                used_ns: 20 * MS,
                throttled_ns: 180 * MS
            }
        );

        // An unlimited replica makes the group unlimited.
        ledger.join(&share("limited", 100, None), 0);
        ledger.start(id, 200 * MS);
        ledger.stop(id, 200 * MS, 290 * MS, 90 * MS);
        assert_eq!(ledger.verdict(id, 290 * MS), Verdict::Run);
    }
}
