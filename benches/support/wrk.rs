//! Runs `wrk` (the load generator both sides of a comparison share) and reads its summary,
//! and the knobs benchmarks read from the environment.

#![allow(dead_code, reason = "each bench uses a different subset")]

use std::process::Command;

pub struct Wrk {
    pub rps: f64,
    pub p50: String,
    pub p99: String,
    /// Non-2xx responses and socket errors, as wrk words them; "none" if none.
    pub errors: String,
}

pub fn run(url: &str, seconds: u64, connections: u64) -> Wrk {
    run_on(url, seconds, connections, None, false)
}

/// [`run`], with wrk on CPU `cpu` alone if given; with `batch` too, under `SCHED_BATCH`, so
/// that its wakeups (a response arrived) do not preempt a server sharing that CPU mid-write.
/// It still gets its fair share of the CPU.
pub fn run_on(url: &str, seconds: u64, connections: u64, cpu: Option<usize>, batch: bool) -> Wrk {
    let mut wrk = Command::new("wrk");
    wrk.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
        url,
    ]);
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        let set = cpu_set(cpu);
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: both calls are async-signal-safe; the closure allocates nothing.
        unsafe {
            wrk.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0
                    || (batch && libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = wrk.output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Wrk {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        p50: field("50%"),
        p99: field("99%"),
        errors: if errors.is_empty() {
            "none".into()
        } else {
            errors
        },
    }
}

/// The CPU set of CPU `cpu` alone, for `sched_setaffinity`.
pub fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// wrk's latency (`950.00us`, `4.95ms`, `1.02s`) in milliseconds.
pub fn millis(text: &str) -> f64 {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        (text, f64::NAN)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * scale)
}

/// The number in environment variable `name` (a bench's knob), or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
