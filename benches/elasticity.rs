//! Elasticity and density on a real `shoal up` (release build): how many one-replica apps a
//! default node takes and how fast, what waking an app from zero adds to its first request,
//! and replicas and p99 while load ramps up and down under autoscaling.
//! Run with `cargo bench --bench elasticity` (also part of `make bench`).
//! Knobs: `BENCH_DENSITY` (default "100,1000,10000"), `BENCH_WAKES` (default 100),
//! `BENCH_PLOT` (where the ramp's SVG goes, default `target/autoscale.svg`; empty skips the ramp).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/proc.rs"]
mod proc;

use common::{Cluster, apply_copies, client, examples, write_spec};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The hello example with default resources and `scale` as its `[scale]` section.
fn hello(c: &Cluster, scale: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/hello/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "limits = { memory = \"32Mi\" }\nrequests = { cpu = \"50m\" }\n",
            "",
        )
        .replace("[scale]\nreplicas = 1\n", scale);
    let path = write_spec(c.dir.path(), "hello.toml", &text);
    path.to_str().unwrap().to_string()
}

fn apps(c: &Cluster) -> Vec<Value> {
    c.api_json("/v1/apps").as_array().unwrap().clone()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn density(n: usize) {
    let c = Cluster::start();
    let started = Instant::now();
    c.cli_ok(&["apply", "-f", &hello(&c, "[scale]\nreplicas = 1\n")]);
    let base = c.api_json("/v1/apps/hello")["app"]["spec"].clone();
    apply_copies(&c, &base, "d", 0..n - 1);
    let applied = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ready = apps(&c).iter().filter(|a| a["ready"] == 1).count();
        if ready == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of {n} ready after 600 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let all_ready = started.elapsed().as_secs_f64();
    let rss = proc::rss_mb(c.pid());
    // A sample of 100 apps answering, spread over all of them.
    let http = client();
    let mut lat: Vec<f64> = (0..100)
        .map(|k| {
            let i = k * (n - 1) / 100;
            let t = Instant::now();
            let resp = http.get(format!("{}/d/{i}", c.gateway)).send().unwrap();
            assert_eq!(resp.status(), 200);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    println!(
        "| {n} | {applied:.1} s | {all_ready:.1} s | {rss:.0} MB | {:.0} kB | 100/100, p50 {:.2} ms |",
        rss * 1024.0 / n as f64,
        quantile(&lat, 0.5)
    );
}

/// Extra latency of the first request to an app at zero over a warm one, over `n` apps.
fn wakes(n: usize) {
    let c = Cluster::start();
    c.cli_ok(&[
        "apply",
        "-f",
        &hello(
            &c,
            "[scale]\nmin = 0\nmax = 2\nidle = \"2s\"\nwindow = \"1s\"\n",
        ),
    ]);
    let base = c.api_json("/v1/apps/hello")["app"]["spec"].clone();
    apply_copies(&c, &base, "w", 0..n);
    // Each starts with one replica, then goes idle to zero.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let at_zero = apps(&c)
            .iter()
            .filter(|a| a["desired"] == 0 && a["ready"] == 0)
            .count();
        if at_zero == n + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{at_zero} of {n} at zero");
        std::thread::sleep(Duration::from_millis(250));
    }
    let http = client();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..n {
        let url = format!("{}/w/{i}", c.gateway);
        let t = Instant::now();
        let resp = http.get(&url).send().unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().unwrap());
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert_eq!(http.get(&url).send().unwrap().status(), 200);
        warm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut extra: Vec<f64> = cold.iter().zip(&warm).map(|(c, w)| c - w).collect();
    extra.sort_by(f64::total_cmp);
    warm.sort_by(f64::total_cmp);
    println!(
        "| {n} wakes | extra p50 {:.1} ms | extra p99 {:.1} ms | max {:.1} ms | warm p50 {:.2} ms |",
        quantile(&extra, 0.5),
        quantile(&extra, 0.99),
        extra[extra.len() - 1],
        quantile(&warm, 0.5)
    );
}

/// One second of the ramp: clients, replicas, p99 of what the clients saw.
struct Point {
    t: f64,
    clients: usize,
    desired: u64,
    ready: u64,
    p99_ms: f64,
}

fn ramp(plot: &str) {
    let c = Cluster::start();
    let faulty = std::fs::read_to_string(format!("{}/faulty/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()))
        .replace(
            "[scale]\nreplicas = 1\n",
            "[scale]\nmin = 1\nmax = 10\ntarget_concurrency = 2\nwindow = \"10s\"\n",
        );
    let spec = write_spec(c.dir.path(), "faulty.toml", &faulty);
    c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
    c.wait_gw("/faulty/status/200", 200, "");

    // Clients each keep one 50 ms request in flight: concurrency follows the client count.
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let max_clients = 16;
    let workers: Vec<_> = (0..max_clients)
        .map(|k| {
            let (stop, active, latencies) = (stop.clone(), active.clone(), latencies.clone());
            let url = format!("{}/faulty/sleep/50", c.gateway);
            std::thread::spawn(move || {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    if k >= active.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let t = Instant::now();
                    let ok = http.get(&url).send().is_ok_and(|r| r.status() == 200);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    latencies
                        .lock()
                        .unwrap()
                        .push(if ok { ms } else { f64::INFINITY });
                }
            })
        })
        .collect();
    // 0 → 16 clients over 30 s, 30 s at 16, back to 0 over 30 s, 40 s idle.
    let schedule = |s: f64| -> usize {
        let n = max_clients as f64;
        (match s {
            s if s < 30.0 => n * s / 30.0,
            s if s < 60.0 => n,
            s if s < 90.0 => n * (90.0 - s) / 30.0,
            _ => 0.0,
        })
        .round() as usize
    };
    let start = Instant::now();
    let mut points = Vec::new();
    let mut failed = 0;
    while start.elapsed() < Duration::from_secs(130) {
        let t = start.elapsed().as_secs_f64();
        active.store(schedule(t), Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
        let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
        failed += lat.iter().filter(|l| l.is_infinite()).count();
        lat.sort_by(f64::total_cmp);
        let app = apps(&c)
            .into_iter()
            .find(|a| a["name"] == "faulty")
            .unwrap();
        points.push(Point {
            t,
            clients: schedule(t),
            desired: app["desired"].as_u64().unwrap(),
            ready: app["ready"].as_u64().unwrap(),
            p99_ms: if lat.is_empty() {
                0.0
            } else {
                quantile(&lat, 0.99)
            },
        });
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let reached = points
        .iter()
        .find(|p| p.ready >= 8)
        .map_or(f64::NAN, |p| p.t);
    let base_p99 = points
        .iter()
        .filter(|p| p.clients > 0)
        .map(|p| p.p99_ms)
        .take(3)
        .fold(0.0, f64::max);
    let peak_p99 = points.iter().map(|p| p.p99_ms).fold(0.0, f64::max);
    let peak_replicas = points.iter().map(|p| p.ready).max().unwrap_or(0);
    let back = points
        .iter()
        .rev()
        .take_while(|p| p.desired == 1)
        .last()
        .map_or(f64::NAN, |p| p.t);
    println!(
        "ramp 0→16→0 clients (50 ms requests, target 2 in flight per replica): {failed} failed; \
         8 ready at {reached:.0} s (16 clients from 30 s); peak {peak_replicas} ready; \
         p99 {base_p99:.0} ms at first, {peak_p99:.0} ms at worst; back to 1 at {back:.0} s \
         (load gone at 90 s)"
    );
    for p in &points {
        println!(
            "  t={:>5.1}s clients={:>2} desired={:>2} ready={:>2} p99={:>6.1} ms",
            p.t, p.clients, p.desired, p.ready, p.p99_ms
        );
    }
    std::fs::write(plot, svg(&points)).unwrap();
    println!("plot: {plot}");
}

/// Clients and ready replicas (left axis) and p99 (right axis) over time.
fn svg(points: &[Point]) -> String {
    let (w, h, pad) = (720.0, 320.0, 48.0);
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let p99_max = points
        .iter()
        .map(|p| p.p99_ms)
        .filter(|v| v.is_finite())
        .fold(10.0, f64::max);
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |v: f64, max: f64| h - pad - (h - 2.0 * pad) * v / max;
    let line = |f: &dyn Fn(&Point) -> f64, max: f64| -> String {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t), y(f(p).min(max), max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{r}\" y=\"{tb}\" text-anchor=\"end\">{t_max:.0} s</text>\n\
         <text x=\"{pad}\" y=\"{tb}\">0 s</text>\n\
         <text x=\"4\" y=\"{pad}\">16</text>\n\
         <text x=\"{rr}\" y=\"{pad}\" text-anchor=\"end\">{p99_max:.0} ms</text>\n",
        b = h - pad,
        r = w - pad,
        tb = h - pad + 16.0,
        rr = w - 4.0,
    );
    for (label, color, data, y0) in [
        (
            "clients (1 request in flight each)",
            "#999999",
            line(&|p| p.clients as f64, 16.0),
            16.0,
        ),
        (
            "ready replicas",
            "#1f77b4",
            line(&|p| p.ready as f64, 16.0),
            32.0,
        ),
        (
            "p99 latency (right axis)",
            "#d62728",
            line(&|p| p.p99_ms, p99_max),
            48.0,
        ),
    ] {
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{data}\"/>\n\
             <text x=\"{lx}\" y=\"{y0}\" fill=\"{color}\">{label}</text>\n",
            lx = pad + 8.0,
        ));
    }
    out.push_str("</svg>\n");
    out
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("| apps | applied | all Ready | RSS | per app | sample |");
    println!("|---|---|---|---|---|---|");
    for n in env_list("BENCH_DENSITY", "100,1000,10000") {
        density(n);
    }
    for n in env_list("BENCH_WAKES", "100") {
        wakes(n);
    }
    let plot = std::env::var("BENCH_PLOT").unwrap_or_else(|_| "target/autoscale.svg".into());
    if !plot.is_empty() {
        ramp(&plot);
    }
}
