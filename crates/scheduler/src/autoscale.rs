//! How many replicas an app runs now, from its load and the clock: Knative's
//! pod autoscaler (KPA) as a pure function.
//!
//! An autoscaled app aims at `target_concurrency` in-flight requests (and
//! `target_rps`, if set) per replica, averaged over its stable window. A tenth
//! of that window, the panic window, catches bursts: when it asks for twice
//! the ready replicas the app panics, scales up at once and does not scale
//! down until a whole window has passed without such a burst. Scaling down
//! also waits until the stable window is covered by samples, so a control
//! plane that just started (with no history) shrinks nothing. With `min = 0`
//! an app without requests for `idle` goes to zero, and requests held at a
//! gateway bring it back at once.
//!
//! Open schedule windows set the bounds ([`Scale::bounds`]). An autoscaled
//! app's `spec.replicas` is its live size, which the controller writes, as an
//! HPA writes a Deployment's. A fixed-size app keeps the user's
//! `spec.replicas`: a window only changes the count in effect, so the user's
//! count is back when it closes.

use shoal_core::spec::{Autoscale, Bounds, Scale};
use shoal_core::{App, Millis, ScaleStatus};

/// One second of an app's traffic, summed over every gateway.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSample {
    pub at: Millis,
    /// Time-averaged in-flight requests over that second.
    pub concurrency: f64,
    pub requests: u64,
}

/// What the gateways measured of an app's load lately.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    /// Ascending `at`, covering at least the stable window once the control
    /// plane has been up that long. A second since `since` without a sample
    /// had no traffic.
    pub samples: Vec<LoadSample>,
    /// Requests held right now at some gateway because the app has no ready
    /// replica (scale from zero).
    pub waiting: u32,
    /// Last time any gateway saw a request for the app.
    pub last_request: Option<Millis>,
    /// Since when samples have been collected (the control plane's start): a
    /// window not yet covered must not scale down.
    pub since: Millis,
}

/// What [`decide`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to run now: what reconcile and the rollout count with.
    pub replicas: u32,
    /// The app's [`ScaleStatus`] after this decision.
    pub status: ScaleStatus,
    /// Events to record with the decision: (reason, message).
    pub events: Vec<(&'static str, String)>,
}

impl Decision {
    /// Whether `app`'s record must be written: its status changed, or the
    /// size of an autoscaled app did.
    pub fn changes(&self, app: &App) -> bool {
        self.status != app.scale
            || (app.spec.scale.autoscale.is_some() && self.replicas != app.spec.replicas)
    }

    /// `app` as it is stored after this decision. A fixed-size app keeps its
    /// own `spec.replicas`, whatever a window makes it run.
    pub fn record(&self, app: &App) -> App {
        let mut app = app.clone();
        if app.spec.scale.autoscale.is_some() {
            app.spec.replicas = self.replicas;
        }
        app.scale = self.status.clone();
        app
    }
}

/// Knative's panic threshold: the panic window asks for this many times the
/// replicas that are ready.
const PANIC_THRESHOLD: f64 = 2.0;

/// Stable concurrency below this is no load: a request of half a second in a
/// minute's window is about 0.008.
const IDLE_CONCURRENCY: f64 = 0.01;

/// The size `app` runs at `now`: its bounds at `now` (schedule windows
/// included) and, if it autoscales, its `load`; `ready` (its Ready replicas)
/// is what a burst is measured against. Pure: the status it reads and returns
/// carries everything it remembers between passes.
pub fn decide(app: &App, load: &Load, ready: u32, now: Millis) -> Decision {
    decide_within(app, load, ready, now, || None)
}

/// The replicas `app` runs now: an autoscaled app its size, a fixed one its `replicas` as the
/// schedule windows open for it last pass make them.
pub fn running(app: &App) -> u32 {
    let spec = &app.spec;
    match spec.scale.autoscale {
        Some(_) => spec.replicas,
        None => spec
            .scale
            .bounds_with(spec.replicas, |w| app.scale.windows.contains(&w.name))
            .clamp(spec.replicas),
    }
}

/// [`decide`], growing the app no further than `room` says its namespace's quota leaves it
/// (asked only when it would grow): a quota lowered below what the namespace runs stops
/// nothing that runs, and lets nothing grow past it, the autoscaler and schedule windows
/// included, as Kubernetes' refuses the pods a scale-up would add.
pub fn decide_within(
    app: &App,
    load: &Load,
    ready: u32,
    now: Millis,
    room: impl FnOnce() -> Option<u32>,
) -> Decision {
    let spec = &app.spec;
    let bounds = spec.scale.bounds(spec.replicas, now);
    let mut status = app.scale.clone();
    let mut events = window_events(&spec.scale, &status.windows, &bounds);
    let (before, want, why) = match &spec.scale.autoscale {
        None => {
            status.panic_until = None;
            (running(app), spec.replicas, None)
        }
        Some(a) => {
            let current = spec.replicas;
            let at = Moment {
                now,
                created_at: app.created_at,
            };
            let (want, why) = autoscaled(a, load, ready, current, bounds.min, &mut status, at);
            (current, want, Some(why))
        }
    };
    let mut replicas = bounds.clamp(want);
    let mut held = None;
    if replicas > before
        && let Some(room) = room()
        && replicas > before.max(room)
    {
        held = Some(format!(
            "at most {} replicas under namespace {}'s quota",
            before.max(room),
            spec.namespace
        ));
        replicas = before.max(room);
    }
    if replicas == before
        && let Some(held) = held
    {
        // Said once, not at every pass while it lasts: the status keeps it.
        let why = format!("held at {before} replicas: {held}");
        if status.reason.as_ref() != Some(&why) {
            events.push(("ScaleHeld", why.clone()));
            status.reason = Some(why);
        }
    } else if replicas != before {
        let why = why.unwrap_or_else(|| format!("replicas = {} from the spec", spec.replicas));
        let why = if let Some(held) = held {
            format!("{why}, {held}")
        } else if replicas > want {
            format!("at least {replicas} replicas{}", while_open(&bounds))
        } else if replicas < want {
            format!("{why}, at most {replicas} replicas{}", while_open(&bounds))
        } else {
            why
        };
        let reason = if replicas > before {
            "ScaledUp"
        } else {
            "ScaledDown"
        };
        events.push((reason, format!("{why}: {before} → {replicas} replicas")));
        status.last_change = Some(now);
        status.reason = Some(why);
    }
    status.windows = bounds.windows;
    Decision {
        replicas,
        status,
        events,
    }
}

/// When [`autoscaled`] decides, and since when its app exists.
struct Moment {
    now: Millis,
    created_at: Millis,
}

/// What an autoscaled app of `current` replicas asks for by its load, and
/// why; before its bounds, except that only `min = 0` lets it go to zero.
/// Moves `status` in and out of panic mode.
fn autoscaled(
    a: &Autoscale,
    load: &Load,
    ready: u32,
    current: u32,
    min: u32,
    status: &mut ScaleStatus,
    at: Moment,
) -> (u32, String) {
    let now = at.now;
    let stable = Average::over(load, a.window_ms, now);
    let panic_window = (a.window_ms / 10).max(1_000);
    let burst = Average::over(load, panic_window, now);
    let (by_stable, why_stable) = stable.wants(a, None);
    let (by_burst, why_burst) = burst.wants(a, Some(panic_window));
    // Requests held for want of a ready replica are a burst too: the replicas they wake are
    // kept for a window, as a burst's are, rather than judged at once by a stable window
    // that saw nothing while the app was at zero (Knative's activator panics the same way).
    if f64::from(by_burst) / f64::from(ready.max(1)) >= PANIC_THRESHOLD || load.waiting > 0 {
        // Rounded up to a quarter window, so a sustained burst rewrites the
        // status a few times per window rather than on every pass.
        let step = (a.window_ms / 4).max(1);
        let until = now.saturating_add(a.window_ms).div_ceil(step) * step;
        status.panic_until = Some(status.panic_until.map_or(until, |t| t.max(until)));
    } else if status.panic_until.is_some_and(|t| now >= t) {
        status.panic_until = None;
    }
    let panicking = status.panic_until.is_some();
    let (mut want, mut why) = if panicking {
        (by_burst.max(current), why_burst)
    } else {
        (by_stable, why_stable)
    };
    let covered = now.saturating_sub(load.since) >= a.window_ms;
    if !covered {
        want = want.max(current);
    }
    // At zero with none serving, only waiting requests bring replicas back; above it, only
    // idleness takes the last one away. Replicas serving at zero (a canary's, which a
    // rollout keeps at one) take requests, none of them held: their load sizes the app.
    want = if current == 0 && ready == 0 {
        0
    } else {
        want.max(1)
    };
    // Quiet since its last request, or since load is known; a new app since its creation,
    // so that it is not taken to zero the moment it is made.
    let quiet_since = load.last_request.unwrap_or(load.since).max(at.created_at);
    let idle_for = now.saturating_sub(quiet_since);
    if min == 0
        && load.waiting == 0
        && !panicking
        && idle_for >= a.idle_ms
        && stable.concurrency < IDLE_CONCURRENCY
    {
        want = 0;
        why = format!("idle for {}", human(a.idle_ms));
    }
    if load.waiting > 0 {
        let wake = load.waiting.div_ceil(a.target_concurrency.max(1));
        if wake > want {
            want = wake;
            why = match load.waiting {
                1 => "a request is waiting".to_string(),
                n => format!("{n} requests are waiting"),
            };
        }
    }
    (want, why)
}

/// `load`'s requests in flight averaged over the `window_ms` before `now`, as the autoscaler
/// judges it ([`Average::over`]): what `get apps` shows beside the target.
pub fn concurrency(load: &Load, window_ms: u64, now: Millis) -> f64 {
    Average::over(load, window_ms, now).concurrency
}

/// Load averaged over a window.
struct Average {
    concurrency: f64,
    rps: f64,
}

impl Average {
    /// Over the whole seconds of the `window_ms` (rounded up to seconds) before the second
    /// `now` is in. A sample is one second's sum of the reports that arrived in it, so the
    /// current second's is still filling: counting it as a second, a window would hold one
    /// report less than its seconds whenever the pass runs in the second after a report's,
    /// and a steady load would look half as big for as long as the reports keep that phase.
    /// Seconds before `load.since` are unknown, so they do not count.
    fn over(load: &Load, window_ms: u64, now: Millis) -> Average {
        let end = now - now % 1_000;
        let measured = end.saturating_sub(load.since.div_ceil(1_000) * 1_000);
        let span = (window_ms.div_ceil(1_000) * 1_000).min(measured).max(1_000);
        let from = end.saturating_sub(span);
        let (mut concurrency, mut requests) = (0.0, 0u64);
        for s in load.samples.iter().rev().take_while(|s| s.at >= from) {
            if s.at < end {
                concurrency += s.concurrency;
                requests += s.requests;
            }
        }
        let seconds = span as f64 / 1_000.0;
        Average {
            concurrency: concurrency / seconds,
            rps: requests as f64 / seconds,
        }
    }

    /// Replicas this load asks for, and why in words; `over` names the window
    /// when it is the panic window.
    fn wants(&self, a: &Autoscale, over: Option<u64>) -> (u32, String) {
        let by_concurrency = replicas_for(self.concurrency, a.target_concurrency);
        let by_rps = a.target_rps.map_or(0, |t| replicas_for(self.rps, t));
        let (n, metric, target) = match a.target_rps {
            Some(t) if by_rps > by_concurrency => {
                (by_rps, format!("{:.1} requests/s", self.rps), t)
            }
            _ => (
                by_concurrency,
                format!("concurrency {:.1}", self.concurrency),
                a.target_concurrency,
            ),
        };
        let why = match over {
            Some(w) => format!(
                "{metric} over the last {} for a target of {target} per replica (panic mode)",
                human(w)
            ),
            None => format!("{metric} for a target of {target} per replica"),
        };
        (n, why)
    }
}

/// `ceil(load / target)`, saturating.
fn replicas_for(load: f64, target: u32) -> u32 {
    // `as` saturates, and NaN becomes 0.
    (load / f64::from(target.max(1))).ceil() as u32
}

/// `WindowOpened` / `WindowClosed` for each window whose state differs from
/// `was` (the windows open at the last decision).
fn window_events(scale: &Scale, was: &[String], now: &Bounds) -> Vec<(&'static str, String)> {
    if was == now.windows {
        return Vec::new();
    }
    let range = match (now.min, now.max) {
        (min, max) if min == max => {
            format!("runs exactly {}", shoal_core::counted(min, "replica"))
        }
        (min, max) => format!("runs {min} to {max} replicas"),
    };
    let mut events = Vec::new();
    for name in now.windows.iter().filter(|n| !was.contains(n)) {
        let sets = scale
            .schedule
            .iter()
            .find(|w| &w.name == name)
            .map(|w| match (w.min, w.max) {
                (Some(min), Some(max)) if min == max => format!(" (replicas = {min})"),
                (Some(min), Some(max)) => format!(" (min = {min}, max = {max})"),
                (Some(min), None) => format!(" (min = {min})"),
                (None, Some(max)) => format!(" (max = {max})"),
                (None, None) => String::new(),
            })
            .unwrap_or_default();
        events.push((
            "WindowOpened",
            format!("window {name:?} opened{sets}: {range}"),
        ));
    }
    for name in was.iter().filter(|n| !now.windows.contains(n)) {
        events.push(("WindowClosed", format!("window {name:?} closed: {range}")));
    }
    events
}

/// " while window "a" is open", or nothing when no window is.
fn while_open(bounds: &Bounds) -> String {
    match &bounds.windows[..] {
        [] => String::new(),
        [one] => format!(" while window {one:?} is open"),
        many => {
            let names: Vec<String> = many.iter().map(|n| format!("{n:?}")).collect();
            format!(" while windows {} are open", names.join(", "))
        }
    }
}

/// `5m`, `1h30m`, `6s`, `1.5s`.
pub(crate) fn human(ms: u64) -> String {
    if ms < 60_000 && !ms.is_multiple_of(1_000) {
        return format!("{:.1}s", ms as f64 / 1_000.0);
    }
    let s = ms / 1_000;
    let mut out = String::new();
    for (n, unit) in [(s / 3_600, "h"), (s / 60 % 60, "m"), (s % 60, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::scaled_app;

    /// 2026-11-30 00:00 UTC: 09:00 in Seoul.
    const NINE_SEOUL: Millis = 1_795_996_800_000;
    const MINUTE: Millis = 60_000;
    /// 06:00 in Seoul, clear of the windows below.
    const NOW: Millis = NINE_SEOUL - 180 * MINUTE;

    /// Target 10 in flight per replica, a 60 s window (6 s panic window).
    fn app(scale: &str, replicas: u32) -> App {
        let mut app = scaled_app(&format!(
            "[scale]\ntarget_concurrency = 10\nwindow = \"60s\"\n{scale}"
        ));
        app.spec.replicas = replicas;
        app
    }

    /// Two minutes of samples up to `now`, `concurrency(at)` in flight and
    /// `rps` requests each second, measured for the last 10 minutes and
    /// requested until `now`.
    fn load(now: Millis, rps: u64, concurrency: impl Fn(Millis) -> f64) -> Load {
        let samples = (0..120)
            .rev()
            .map(|ago| {
                let at = now - ago * 1_000;
                LoadSample {
                    at,
                    concurrency: concurrency(at),
                    requests: rps,
                }
            })
            .collect();
        Load {
            samples,
            waiting: 0,
            last_request: Some(now),
            since: now - 10 * MINUTE,
        }
    }

    fn steady(now: Millis, concurrency: f64) -> Load {
        load(now, 0, |_| concurrency)
    }

    /// Expected events: (reason, message).
    type Events = &'static [(&'static str, &'static str)];

    fn messages(d: &Decision) -> Vec<(&'static str, &str)> {
        d.events.iter().map(|(r, m)| (*r, m.as_str())).collect()
    }

    #[test]
    fn sustained_load_scales_up() {
        let cases: [(&str, u64, f64, u32, &str); 3] = [
            (
                "",
                0,
                23.4,
                3,
                "concurrency 23.4 for a target of 10 per replica",
            ),
            (
                "target_rps = 5\n",
                12,
                1.0,
                3,
                "12.0 requests/s for a target of 5 per replica",
            ),
            (
                "target_rps = 50\n",
                12,
                25.0,
                3,
                "concurrency 25.0 for a target of 10 per replica",
            ),
        ];
        for (extra, rps, concurrency, want, why) in cases {
            let a = app(&format!("min = 1\nmax = 10\n{extra}"), 2);
            let l = load(NOW, rps, |_| concurrency);
            let d = decide(&a, &l, 2, NOW);
            let message = format!("{why}: 2 → {want} replicas");
            assert_eq!(d.replicas, want, "{extra}");
            assert_eq!(messages(&d), [("ScaledUp", message.as_str())], "{extra}");
            assert_eq!(d.status.reason.as_deref(), Some(why));
            assert_eq!(
                (d.status.last_change, d.status.panic_until),
                (Some(NOW), None)
            );
            // Stored, the same load a second later changes nothing.
            let stored = d.record(&a);
            assert_eq!(stored.spec.replicas, want);
            let again = decide(
                &stored,
                &load(NOW + 1_000, rps, |_| concurrency),
                want,
                NOW + 1_000,
            );
            assert!(!again.changes(&stored), "{again:?}");
            assert!(again.events.is_empty());
        }
    }

    /// A namespace's quota lets an app grow only into the room it leaves, says so once while
    /// it holds the app, and never takes a replica away: one lowered below what runs stops
    /// nothing.
    #[test]
    fn the_quota_lets_an_app_grow_only_into_its_room_and_stops_nothing() {
        let a = app("min = 1\nmax = 10\n", 2);
        let l = load(NOW, 50, |_| 50.0);
        let d = decide_within(&a, &l, 2, NOW, || Some(3));
        assert_eq!(d.replicas, 3);
        assert_eq!(
            messages(&d),
            [(
                "ScaledUp",
                "concurrency 50.0 over the last 6s for a target of 10 per replica (panic \
                 mode), at most 3 replicas under namespace default's quota: 2 → 3 replicas"
            )]
        );
        // At its room: held, said once.
        let stored = d.record(&a);
        let held = decide_within(
            &stored,
            &load(NOW + 1_000, 50, |_| 50.0),
            3,
            NOW + 1_000,
            || Some(3),
        );
        assert_eq!(held.replicas, 3);
        let why = "held at 3 replicas: at most 3 replicas under namespace default's quota";
        assert_eq!(messages(&held), [("ScaleHeld", why)]);
        let stored = held.record(&stored);
        let again = decide_within(
            &stored,
            &load(NOW + 2_000, 50, |_| 50.0),
            3,
            NOW + 2_000,
            || Some(3),
        );
        assert!(again.events.is_empty(), "{again:?}");
        // A quota lowered below it: it keeps what it runs.
        let lowered = decide_within(
            &stored,
            &load(NOW + 3_000, 50, |_| 50.0),
            3,
            NOW + 3_000,
            || Some(1),
        );
        assert_eq!(lowered.replicas, 3);
        // Without a quota it grows as the load asks.
        assert_eq!(decide(&a, &l, 2, NOW).replicas, 5);
    }

    /// 60 in flight for the six whole seconds before `NOW`, 2 before, none after.
    fn burst(at: Millis) -> f64 {
        match at {
            at if at >= NOW => 0.0,
            at if at >= NOW - 6_000 => 60.0,
            _ => 2.0,
        }
    }

    #[test]
    fn a_steady_load_counts_whole_whatever_the_phase_of_its_reports() {
        // 4 in flight, reported once a second at .95 s: each sample is the second before
        // `NOW`'s. A pass in the same second as the last report, and one in the next before
        // the next report, both see 4 over a 2 s window.
        let l = load(NOW, 0, |_| 4.0);
        for now in [NOW + 960, NOW + 1_100, NOW + 1_999] {
            let c = concurrency(&l, 2_000, now);
            assert!((c - 4.0).abs() < 1e-9, "at {now}: {c}");
        }
        // A window not in whole seconds counts the seconds it touches.
        assert!((concurrency(&l, 1_500, NOW + 1_100) - 4.0).abs() < 1e-9);
        // Only what was measured since the start counts, in whole seconds.
        let young = Load {
            since: NOW - 1_500,
            ..l.clone()
        };
        assert!((concurrency(&young, 60_000, NOW + 100) - 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_burst_panics_up_at_once_and_holds_until_a_window_passes() {
        let a = app("min = 1\nmax = 10\n", 1);
        // The stable average (7.8) asks for 1; the panic window for 6 at once.
        let d = decide(&a, &load(NOW, 0, burst), 1, NOW);
        assert_eq!(d.replicas, 6);
        assert_eq!(
            messages(&d),
            [(
                "ScaledUp",
                "concurrency 60.0 over the last 6s for a target of 10 per replica (panic mode): 1 → 6 replicas"
            )]
        );
        assert_eq!(d.status.panic_until, Some(NOW + MINUTE));
        let a = d.record(&a);

        // Still over the threshold while the new replicas start: panic is
        // extended, rounded to a quarter window, so the next passes write nothing.
        let d = decide(&a, &load(NOW, 0, burst), 1, NOW + 1_000);
        assert_eq!(d.status.panic_until, Some(NOW + MINUTE + 15_000));
        assert!(d.changes(&a) && d.events.is_empty());
        let a = d.record(&a);
        let d = decide(&a, &load(NOW, 0, burst), 1, NOW + 2_000);
        assert!(!d.changes(&a), "{d:?}");

        // The burst is over and the stable average asks for 1: no scaling down
        // while panicking, which ends a window after the last burst.
        let steps: [(Millis, u32, Option<Millis>); 3] = [
            (NOW + 20_000, 6, Some(NOW + 75_000)),
            (NOW + 74_999, 6, Some(NOW + 75_000)),
            (NOW + 75_000, 1, None),
        ];
        for (t, want, panic_until) in steps {
            let d = decide(&a, &load(t, 0, burst), 6, t);
            assert_eq!(
                (d.replicas, d.status.panic_until),
                (want, panic_until),
                "{t}"
            );
        }
        let d = decide(&a, &load(NOW + 75_000, 0, burst), 6, NOW + 75_000);
        assert_eq!(
            messages(&d),
            [(
                "ScaledDown",
                "concurrency 0.0 for a target of 10 per replica: 6 → 1 replicas"
            )]
        );
    }

    #[test]
    fn scaling_down_waits_for_the_window_and_a_covered_one() {
        let a = app("min = 1\nmax = 10\n", 3);
        let measured_for = |mut l: Load, ms: Millis| {
            l.since = NOW - ms;
            l
        };
        let dropped = |at: Millis| if at > NOW - 10_000 { 0.0 } else { 30.0 };
        let cases: [(&str, Load, u32); 5] = [
            ("light load, window covered", steady(NOW, 5.0), 1),
            (
                "light load, 30s of a 60s window measured",
                measured_for(steady(NOW, 5.0), 30_000),
                3,
            ),
            (
                "light load, exactly covered",
                measured_for(steady(NOW, 5.0), MINUTE),
                1,
            ),
            ("load gone only 10s ago", load(NOW, 0, dropped), 3),
            (
                "scaling up needs no cover",
                measured_for(steady(NOW, 45.0), 30_000),
                5,
            ),
        ];
        for (name, l, want) in cases {
            let d = decide(&a, &l, 3, NOW);
            assert_eq!(d.replicas, want, "{name}");
            assert_eq!(d.events.len(), usize::from(want != 3), "{name}");
        }
        let d = decide(&a, &steady(NOW, 5.0), 3, NOW);
        assert_eq!(
            messages(&d),
            [(
                "ScaledDown",
                "concurrency 5.0 for a target of 10 per replica: 3 → 1 replicas"
            )]
        );
    }

    #[test]
    fn min_and_max_clamp() {
        let cases: [(u32, f64, u32, Option<&str>); 4] = [
            (2, 0.0, 2, None),
            (1, 0.0, 2, Some("at least 2 replicas: 1 → 2 replicas")),
            (
                3,
                100.0,
                4,
                Some(
                    "concurrency 100.0 over the last 6s for a target of 10 per replica (panic mode), at most 4 replicas: 3 → 4 replicas",
                ),
            ),
            (
                6,
                50.0,
                4,
                Some(
                    "concurrency 50.0 for a target of 10 per replica, at most 4 replicas: 6 → 4 replicas",
                ),
            ),
        ];
        for (current, concurrency, want, message) in cases {
            let a = app("min = 2\nmax = 4\n", current);
            let d = decide(&a, &steady(NOW, concurrency), current, NOW);
            assert_eq!(d.replicas, want, "{current} at {concurrency}");
            let got: Vec<&str> = d.events.iter().map(|(_, m)| m.as_str()).collect();
            assert_eq!(got, Vec::from_iter(message), "{current} at {concurrency}");
        }
    }

    #[test]
    fn an_idle_app_scales_to_zero() {
        let quiet = |last: Option<Millis>, since: Millis| Load {
            last_request: last,
            since,
            ..steady(NOW, 0.0)
        };
        let hour_ago = NOW - 60 * MINUTE;
        let cases: [(&str, &str, u32, Load, u32); 7] = [
            (
                "no request for 5m",
                "min = 0",
                1,
                quiet(Some(NOW - 5 * MINUTE), hour_ago),
                0,
            ),
            (
                "a request 4m59s ago",
                "min = 0",
                1,
                quiet(Some(NOW - 299_000), hour_ago),
                1,
            ),
            (
                "none since a start 5m ago",
                "min = 0",
                1,
                quiet(None, NOW - 5 * MINUTE),
                0,
            ),
            (
                "none since a start 4m ago",
                "min = 0",
                1,
                quiet(None, NOW - 4 * MINUTE),
                1,
            ),
            (
                "a long request still in flight",
                "min = 0",
                1,
                Load {
                    last_request: Some(NOW - 10 * MINUTE),
                    ..steady(NOW, 1.0)
                },
                1,
            ),
            (
                "min = 1",
                "min = 1",
                1,
                quiet(Some(NOW - 10 * MINUTE), hour_ago),
                1,
            ),
            (
                "already at zero",
                "min = 0",
                0,
                quiet(Some(NOW - 10 * MINUTE), hour_ago),
                0,
            ),
        ];
        for (name, min, current, l, want) in cases {
            let idle = if min == "min = 0" {
                "idle = \"5m\"\n"
            } else {
                ""
            };
            let a = app(&format!("{min}\nmax = 3\n{idle}"), current);
            let d = decide(&a, &l, current, NOW);
            assert_eq!(d.replicas, want, "{name}");
            let events = messages(&d);
            if want == current {
                assert!(events.is_empty(), "{name}: {events:?}");
            } else {
                assert_eq!(events, [("ScaledDown", "idle for 5m: 1 → 0 replicas")]);
            }
        }
    }

    /// A new app's idle time runs from its creation, not from the control plane's start.
    #[test]
    fn a_new_app_is_not_taken_to_zero_before_its_idle_time() {
        let mut a = app("min = 0\nmax = 3\nidle = \"5m\"\n", 1);
        let none_since_start = Load {
            last_request: None,
            since: NOW - 60 * MINUTE,
            ..steady(NOW, 0.0)
        };
        a.created_at = NOW - 4 * MINUTE;
        let d = decide(&a, &none_since_start, 1, NOW);
        assert_eq!(d.replicas, 1, "{:?}", d.events);
        a.created_at = NOW - 5 * MINUTE;
        assert_eq!(decide(&a, &none_since_start, 1, NOW).replicas, 0);
    }

    #[test]
    fn waiting_requests_wake_an_app_from_zero_never_past_max() {
        let a = app("min = 0\nmax = 5\n", 0);
        let cases: [(u32, u32, &str); 4] = [
            (0, 0, ""),
            (1, 1, "a request is waiting: 0 → 1 replicas"),
            (35, 4, "35 requests are waiting: 0 → 4 replicas"),
            (
                10_000,
                5,
                "10000 requests are waiting, at most 5 replicas: 0 → 5 replicas",
            ),
        ];
        for (waiting, want, message) in cases {
            // Just started: nothing measured, no window covered.
            let l = Load {
                waiting,
                since: NOW,
                ..Load::default()
            };
            let d = decide(&a, &l, 0, NOW);
            assert_eq!(d.replicas, want, "{waiting}");
            let got: Vec<&str> = d.events.iter().map(|(_, m)| m.as_str()).collect();
            assert_eq!(got, Vec::from_iter((want > 0).then_some(message)));
            assert_eq!(d.status.panic_until.is_some(), waiting > 0);
        }
    }

    /// The replicas waiting requests woke stay for a window: the stable window saw nothing
    /// while the app was at zero, and judged at once it would take them away again before
    /// they served (0 → 4 → 1, and the requests held meanwhile refused).
    #[test]
    fn replicas_woken_from_zero_stay_a_window() {
        let mut a = app("min = 0\nmax = 5\nidle = \"1m\"\n", 0);
        let quiet = Load {
            last_request: Some(NOW - 30 * MINUTE),
            since: NOW - 60 * MINUTE,
            ..Load::default()
        };
        let woken = decide(
            &a,
            &Load {
                waiting: 35,
                ..quiet.clone()
            },
            0,
            NOW,
        );
        assert_eq!(woken.replicas, 4);
        a.spec.replicas = woken.replicas;
        a.scale = woken.status;
        // Still starting, the requests served or still held: four stay, in either case.
        for (waiting, ready) in [(0, 0), (6, 0), (0, 4)] {
            let l = Load {
                waiting,
                last_request: Some(NOW + 200),
                ..quiet.clone()
            };
            let d = decide(&a, &l, ready, NOW + 200);
            assert_eq!(
                d.replicas, 4,
                "{waiting} waiting, {ready} ready: {:?}",
                d.events
            );
        }
        // A window on with the load gone, they go as any burst's replicas do.
        let later = NOW + 61_000 + 60_000;
        let l = Load {
            last_request: Some(NOW + 200),
            ..quiet
        };
        let d = decide(&a, &l, 4, later);
        assert!(d.replicas < 4, "{:?}", d.events);
    }

    /// At zero, replicas that still serve (a canary's, which a rollout keeps at one) take the
    /// requests, none of them held: their load sizes the app. With none serving, load from
    /// before is no reason to come back.
    #[test]
    fn replicas_serving_at_zero_are_sized_by_their_load() {
        let a = app("min = 0\nmax = 5\n", 0);
        let d = decide(&a, &steady(NOW, 40.0), 1, NOW);
        assert_eq!(d.replicas, 4, "{:?}", d.events);
        assert_eq!(decide(&a, &steady(NOW, 40.0), 0, NOW).replicas, 0);
    }

    #[test]
    fn windows_open_and_close_once_and_set_the_bounds() {
        let mut a = app(
            "min = 1\nmax = 4\n\
             [[scale.schedule]]\nname = \"mornings\"\ncron = \"0 9 * * *\"\ntimezone = \"Asia/Seoul\"\nduration = \"3h\"\nmin = 3\n",
            1,
        );
        let steps: [(Millis, u32, Events); 4] = [
            (NINE_SEOUL - MINUTE, 1, &[]),
            (
                NINE_SEOUL + MINUTE,
                3,
                &[
                    (
                        "WindowOpened",
                        "window \"mornings\" opened (min = 3): runs 3 to 4 replicas",
                    ),
                    (
                        "ScaledUp",
                        "at least 3 replicas while window \"mornings\" is open: 1 → 3 replicas",
                    ),
                ],
            ),
            (NINE_SEOUL + 120 * MINUTE, 3, &[]),
            (
                NINE_SEOUL + 180 * MINUTE,
                1,
                &[
                    (
                        "WindowClosed",
                        "window \"mornings\" closed: runs 1 to 4 replicas",
                    ),
                    (
                        "ScaledDown",
                        "concurrency 0.0 for a target of 10 per replica: 3 → 1 replicas",
                    ),
                ],
            ),
        ];
        for (t, want, events) in steps {
            let d = decide(&a, &steady(t, 0.0), a.spec.replicas, t);
            assert_eq!(d.replicas, want, "{t}");
            assert_eq!(messages(&d), events, "{t}");
            assert_eq!(d.changes(&a), !events.is_empty(), "{t}");
            let open = (NINE_SEOUL..NINE_SEOUL + 180 * MINUTE).contains(&t);
            assert_eq!(
                d.status.windows,
                Vec::from_iter(open.then(|| "mornings".to_string()))
            );
            a = d.record(&a);
        }
    }

    /// A fixed-size app runs a window's size while it is open and its own
    /// after; `spec.replicas`, the user's, is never rewritten.
    #[test]
    fn a_fixed_app_runs_a_windows_size_and_keeps_its_own() {
        // Six fields, seconds first: 09:00:00 in Seoul.
        let mut a = scaled_app(
            "[scale]\nreplicas = 2\n\
             [[scale.schedule]]\nname = \"peak\"\ncron = \"0 0 9 * * *\"\ntimezone = \"Asia/Seoul\"\nduration = \"1h\"\nreplicas = 5\n",
        );
        let steps: [(Millis, u32, Events); 4] = [
            (NINE_SEOUL - 1_000, 2, &[]),
            (
                NINE_SEOUL + 30 * MINUTE,
                5,
                &[
                    (
                        "WindowOpened",
                        "window \"peak\" opened (replicas = 5): runs exactly 5 replicas",
                    ),
                    (
                        "ScaledUp",
                        "at least 5 replicas while window \"peak\" is open: 2 → 5 replicas",
                    ),
                ],
            ),
            (NINE_SEOUL + 45 * MINUTE, 5, &[]),
            (
                NINE_SEOUL + 60 * MINUTE,
                2,
                &[
                    (
                        "WindowClosed",
                        "window \"peak\" closed: runs exactly 2 replicas",
                    ),
                    ("ScaledDown", "replicas = 2 from the spec: 5 → 2 replicas"),
                ],
            ),
        ];
        for (t, want, events) in steps {
            // Load does not size a fixed app.
            let d = decide(&a, &steady(t, 500.0), 2, t);
            assert_eq!(d.replicas, want, "{t}");
            assert_eq!(messages(&d), events, "{t}");
            a = d.record(&a);
            assert_eq!(a.spec.replicas, 2, "the user's count stays");
        }
        assert!(a.scale.windows.is_empty());
        assert_eq!(a.scale.last_change, Some(NINE_SEOUL + 60 * MINUTE));
    }
}
