//! The node's memory budget. Every instance — a p2 request's store, a p3 worker, a command's
//! run, a probe's request — holds a [`Reservation`] of its whole memory limit for as long as its
//! store lives, taken before it is instantiated. So the linear memory guests can ever touch at
//! once is at most the budget, however many instances the pool has slots for and whatever each
//! replica's `max_concurrency`: without it, 1000 slots × 512 MiB could be promised on a node
//! with a few GiB of RAM, and a burst of memory-hungry requests would bring the whole node down
//! (the kernel's OOM killer takes the process, every app with it) instead of failing themselves.
//!
//! The budget is a semaphore of 64 KiB wasm pages. Waiting for room is first come, first
//! served among apps: of each app (its CPU group), one reservation at a time waits in the
//! budget's queue, its others behind it, so a burst of one app's memory-hungry requests waits
//! behind itself, not in front of every other app's. The wait is bounded: past its wait a request is answered `at_capacity` (503, `Retry-After`),
//! as when the pool has no slot. While anyone waits, instances kept idle for reuse give their
//! memory back instead of holding it until their idle time runs out.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

const PAGE: u64 = 64 << 10;

/// The share of the memory available to the process given to guests by default; the rest is the
/// host's: compiled code, wasmtime's stacks and tables, bodies in flight, the gateway, the agent.
const DEFAULT_BUDGET_PERCENT: u64 = 75;

/// What [`default_memory_budget`] assumes where the memory cannot be read (not Linux).
const FALLBACK_MEMORY: u64 = 4 << 30;

/// Guest memory a node may hand out at once.
pub(crate) struct MemoryBudget {
    pages: Arc<Semaphore>,
    total_pages: usize,
    /// Reservations waiting for room now.
    waiting: AtomicUsize,
    /// Reservations held now: one per instance alive.
    held: Arc<AtomicUsize>,
    /// Woken when a reservation starts waiting.
    pressure: Notify,
    /// Per app, the turn to wait in the queue; an app's entry goes once no one holds it.
    turns: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
}

/// Room for one instance's memory in the node's budget, given back when dropped.
pub(crate) struct Reservation {
    _pages: OwnedSemaphorePermit,
    held: Arc<AtomicUsize>,
}

impl Reservation {
    fn new(pages: OwnedSemaphorePermit, held: &Arc<AtomicUsize>) -> Reservation {
        held.fetch_add(1, Ordering::Relaxed);
        Reservation {
            _pages: pages,
            held: held.clone(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MemoryBudget {
    /// A budget of `bytes`, rounded down to whole wasm pages.
    pub(crate) fn new(bytes: u64) -> MemoryBudget {
        let total_pages = usize::try_from(bytes / PAGE)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        MemoryBudget {
            pages: Arc::new(Semaphore::new(total_pages)),
            total_pages,
            waiting: AtomicUsize::new(0),
            held: Arc::default(),
            pressure: Notify::new(),
            turns: Mutex::default(),
        }
    }

    /// Bytes the budget holds, whole pages only.
    pub(crate) fn total(&self) -> u64 {
        self.total_pages as u64 * PAGE
    }

    /// Bytes reserved by instances alive now.
    pub(crate) fn reserved(&self) -> u64 {
        (self.total_pages - self.pages.available_permits()) as u64 * PAGE
    }

    /// Reservations held now: the instances alive.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Room for `bytes` (rounded up to whole pages) for an instance of app `group`, waiting
    /// up to `wait` behind those who asked first (of this app, one at a time); `None` if there
    /// was none in time. Never more than the budget: asking for more than it holds fails at
    /// once.
    pub(crate) async fn reserve(
        &self,
        group: &Arc<str>,
        bytes: u64,
        wait: Duration,
    ) -> Option<Reservation> {
        let pages = u32::try_from(bytes.div_ceil(PAGE)).ok()?;
        if pages as usize > self.total_pages {
            return None;
        }
        if let Ok(permit) = self.pages.clone().try_acquire_many_owned(pages) {
            return Some(Reservation::new(permit, &self.held));
        }
        let _waiting = Waiting::start(self);
        let deadline = tokio::time::Instant::now() + wait;
        let turn = Turn::of(self, group);
        let _turn = tokio::time::timeout_at(deadline, turn.mutex.lock())
            .await
            .ok()?;
        let permit =
            tokio::time::timeout_at(deadline, self.pages.clone().acquire_many_owned(pages))
                .await
                .ok()?
                .ok()?;
        Some(Reservation::new(permit, &self.held))
    }

    /// Whether a reservation is waiting for room: an idle instance should let its memory go.
    pub(crate) fn under_pressure(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Returns once a reservation is waiting for room (at once if one is now).
    pub(crate) async fn pressed(&self) {
        loop {
            let mut notified = pin!(self.pressure.notified());
            notified.as_mut().enable();
            if self.under_pressure() {
                return;
            }
            notified.await;
        }
    }
}

/// An app's turn to wait in the budget's queue, held by those of its reservations that wait;
/// the last to let it go takes its entry out.
struct Turn<'a> {
    budget: &'a MemoryBudget,
    group: Arc<str>,
    mutex: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Turn<'a> {
    fn of(budget: &'a MemoryBudget, group: &Arc<str>) -> Turn<'a> {
        let mut turns = budget.turns.lock().unwrap_or_else(|p| p.into_inner());
        let mutex = turns.entry(group.clone()).or_default().clone();
        Turn {
            budget,
            group: group.clone(),
            mutex,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut turns = self.budget.turns.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this one's: no one else waits or will, until it is made again.
        if Arc::strong_count(&self.mutex) == 2 {
            turns.remove(&self.group);
        }
    }
}

/// Counts a reservation as waiting while it lives, so a cancelled wait stops counting too.
struct Waiting<'a>(&'a MemoryBudget);

impl<'a> Waiting<'a> {
    fn start(budget: &'a MemoryBudget) -> Waiting<'a> {
        budget.waiting.fetch_add(1, Ordering::AcqRel);
        budget.pressure.notify_waiters();
        Waiting(budget)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The default budget: three quarters of the memory available to this process
/// ([`available_memory`]), or of 4 GiB where that cannot be read.
pub fn default_memory_budget() -> u64 {
    available_memory().unwrap_or(FALLBACK_MEMORY) / 100 * DEFAULT_BUDGET_PERCENT
}

/// The memory this process may use: the machine's RAM, or less if its cgroup (v2, or v1)
/// limits it, as in a container. `None` where `/proc/meminfo` cannot be read.
pub fn available_memory() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let mut limits: Vec<String> = read("/proc/self/cgroup")
        .as_deref()
        .and_then(cgroup_v2_path)
        .map(memory_max_files)
        .unwrap_or_default()
        .iter()
        .filter_map(|file| read(file))
        .collect();
    limits.extend(read("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    memory_from(&read("/proc/meminfo")?, limits.iter().map(String::as_str))
}

/// The smaller of `MemTotal` in `meminfo` and every cgroup limit in `limits` (the contents of a
/// `memory.max` or `memory.limit_in_bytes` file; `max`, or v1's near-2⁶³ "unlimited", limit
/// nothing). `None` if `meminfo` has no `MemTotal`.
pub(crate) fn memory_from<'a>(
    meminfo: &str,
    limits: impl IntoIterator<Item = &'a str>,
) -> Option<u64> {
    let total = meminfo_total(meminfo)?;
    Some(
        limits
            .into_iter()
            .filter_map(|limit| limit.trim().parse::<u64>().ok())
            .fold(total, u64::min),
    )
}

/// `MemTotal` in bytes, from `/proc/meminfo` (which says it in kB, meaning KiB).
fn meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib = words.next()?.parse::<u64>().ok()?;
    match words.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

/// The process's cgroup v2 path (`/system.slice/shoal.service`) from `/proc/self/cgroup`: the
/// `0::` line, which only v2 has.
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// The `memory.max` files that bind a process in cgroup v2 group `path`: its own and each
/// parent's, up to the root of the mount (in a container, the container's own group).
fn memory_max_files(path: &str) -> Vec<String> {
    let mut files = Vec::new();
    let mut dir = path.trim_end_matches('/');
    loop {
        files.push(format!("/sys/fs/cgroup{dir}/memory.max"));
        match dir.rsplit_once('/') {
            Some((parent, _)) => dir = parent,
            None => return files,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24684096 kB\nMemFree:        21407300 kB\n\
                           MemAvailable:   24093816 kB\n";
    const TOTAL: u64 = 24_684_096 * 1024;

    #[test]
    fn ram_alone_is_memtotal() {
        assert_eq!(memory_from(MEMINFO, []), Some(TOTAL));
        assert_eq!(memory_from("MemFree: 1 kB\n", []), None);
        assert_eq!(memory_from("MemTotal: lots kB\n", []), None);
        assert_eq!(memory_from("MemTotal: 1 MB\n", []), None);
    }

    #[test]
    fn a_cgroup_limit_below_ram_wins() {
        // cgroup v2 `memory.max`: a number, or `max` for none.
        assert_eq!(memory_from(MEMINFO, ["2147483648\n"]), Some(2 << 30));
        assert_eq!(memory_from(MEMINFO, ["max\n"]), Some(TOTAL));
        // v1's "unlimited" is a number past any RAM.
        assert_eq!(memory_from(MEMINFO, ["9223372036854771712\n"]), Some(TOTAL));
        // The tightest of several (a group and its parent).
        assert_eq!(
            memory_from(MEMINFO, ["max", "1073741824", "2147483648"]),
            Some(1 << 30)
        );
        assert_eq!(memory_from(MEMINFO, ["", "garbage"]), Some(TOTAL));
    }

    #[test]
    fn the_v2_path_comes_from_the_unified_line() {
        assert_eq!(
            cgroup_v2_path("0::/system.slice/shoal.service\n"),
            Some("/system.slice/shoal.service")
        );
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        // cgroup v1 only: no unified line.
        assert_eq!(
            cgroup_v2_path("12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n"),
            None
        );
        assert_eq!(
            memory_max_files("/system.slice/shoal.service"),
            [
                "/sys/fs/cgroup/system.slice/shoal.service/memory.max",
                "/sys/fs/cgroup/system.slice/memory.max",
                "/sys/fs/cgroup/memory.max",
            ]
        );
        assert_eq!(memory_max_files("/"), ["/sys/fs/cgroup/memory.max"]);
    }

    fn app() -> Arc<str> {
        "default/app".into()
    }

    /// Each reservation counts as an instance alive until it is dropped.
    #[tokio::test]
    async fn reservations_held_are_counted_until_dropped() {
        let budget = MemoryBudget::new(4 * PAGE);
        let one = budget.reserve(&app(), PAGE, Duration::ZERO).await.unwrap();
        let two = budget
            .reserve(&app(), 2 * PAGE, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(budget.held(), 2);
        assert!(
            budget
                .reserve(&app(), 2 * PAGE, Duration::ZERO)
                .await
                .is_none()
        );
        assert_eq!(budget.held(), 2, "a reservation refused is not counted");
        drop(one);
        assert_eq!(budget.held(), 1);
        drop(two);
        assert_eq!(budget.held(), 0);
    }

    /// A burst of one app's reservations waits behind itself: another app's, asking after
    /// them all, gets the first room freed after the one of the burst that waits first.
    #[tokio::test]
    async fn one_apps_burst_waits_behind_itself_not_in_front_of_another_app() {
        let budget = Arc::new(MemoryBudget::new(2 * PAGE));
        let hog: Arc<str> = "default/hog".into();
        let held = budget
            .reserve(&hog, 2 * PAGE, Duration::ZERO)
            .await
            .unwrap();
        let burst: Vec<_> = (0..8)
            .map(|_| {
                let (budget, hog) = (budget.clone(), hog.clone());
                tokio::spawn(async move {
                    budget
                        .reserve(&hog, 2 * PAGE, Duration::from_secs(60))
                        .await
                })
            })
            .collect();
        // The burst is waiting: one of it in the queue, the others for their turn.
        while budget.waiting.load(Ordering::Acquire) < 8 {
            tokio::task::yield_now().await;
        }
        let neighbour = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(&app(), PAGE, Duration::from_secs(5)).await }
        });
        while budget.waiting.load(Ordering::Acquire) < 9 {
            tokio::task::yield_now().await;
        }
        // The room freed goes to the one of the burst in the queue; once it goes, to the
        // neighbour, though seven of the burst asked before it.
        drop(held);
        let mut first = None;
        while first.is_none() {
            tokio::task::yield_now().await;
            first = burst.iter().position(|b| b.is_finished());
        }
        // The others' handles stay: a finished one keeps its reservation in them.
        let mut burst = burst;
        let first = burst.swap_remove(first.unwrap());
        let first = first.await.unwrap().expect("room for the first");
        assert!(!neighbour.is_finished());
        drop(first);
        let neighbour = neighbour.await.unwrap();
        assert!(neighbour.is_some(), "the neighbour's turn came");
        drop(burst);
    }

    #[tokio::test]
    async fn reservations_never_exceed_the_budget() {
        let budget = MemoryBudget::new(4 * PAGE + 100);
        assert_eq!(budget.total(), 4 * PAGE);
        let a = budget
            .reserve(&app(), 3 * PAGE - 1, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(budget.reserved(), 3 * PAGE);
        // One page left: a two-page instance waits, then gives up.
        assert!(
            budget
                .reserve(&app(), 2 * PAGE, Duration::from_millis(10))
                .await
                .is_none()
        );
        assert!(!budget.under_pressure(), "a wait that ended stops counting");
        // More than the whole budget is refused at once, whatever the wait.
        assert!(
            budget
                .reserve(&app(), 5 * PAGE, Duration::from_secs(3600))
                .await
                .is_none()
        );
        let b = budget.reserve(&app(), PAGE, Duration::ZERO).await.unwrap();
        assert_eq!(budget.reserved(), 4 * PAGE);
        drop((a, b));
        assert_eq!(budget.reserved(), 0);
    }

    #[tokio::test]
    async fn a_waiting_reservation_is_pressure_and_gets_the_room_freed() {
        let budget = Arc::new(MemoryBudget::new(2 * PAGE));
        let held = budget
            .reserve(&app(), 2 * PAGE, Duration::ZERO)
            .await
            .unwrap();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move {
                budget
                    .reserve(&app(), PAGE, Duration::from_secs(60))
                    .await
                    .is_some()
            }
        });
        // What an idle instance does: waits for pressure, then lets its memory go.
        budget.pressed().await;
        assert!(budget.under_pressure());
        drop(held);
        assert!(waiter.await.unwrap());
        assert!(!budget.under_pressure());
    }
}
