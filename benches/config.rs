//! What reading configuration costs a request: the `settings` example answering a value it
//! reads through `wasi:config/store` (`[config]`), the same guest answering one it reads from
//! its environment (`[env]`), and `hello` (which reads one env value) as the baseline, all on
//! one `shoal up`, a fresh instance per request.
//!
//! Each URL is warmed up, then measured in turn for several rounds; prints every round, then
//! medians with the spread and the ratios. Run with `cargo bench --bench config`; needs `wrk`.
//! Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (32), `BENCH_ROUNDS` (3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/wrk.rs"]
mod wrk;

use common::{Cluster, examples, write_spec};
use wrk::env_or;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let rounds = env_or("BENCH_ROUNDS", 3) as usize;
    let c = Cluster::start();
    let settings = std::fs::read_to_string(format!("{}/settings/app.toml", examples()))
        .unwrap()
        .replace("../target", &format!("{}/target", examples()));
    let settings = format!("{settings}\n[env]\ngreeting = \"Hello from wasi:config!\"\n");
    let settings = write_spec(c.dir.path(), "settings.toml", &settings);
    let hello = format!("{}/hello/app.toml", examples());
    for spec in [hello.as_str(), settings.to_str().unwrap()] {
        c.cli_ok(&["apply", "-f", spec]);
    }
    c.wait_gw("/hello", 200, "Hello from Shoal!");
    c.wait_gw("/settings/greeting", 200, "Hello from wasi:config!");
    c.wait_gw(
        "/settings/greeting?from=env",
        200,
        "Hello from wasi:config!",
    );

    let sides = [
        ("hello (one env value, by std::env)", "/hello"),
        (
            "settings, a [config] value by wasi:config",
            "/settings/greeting",
        ),
        (
            "settings, an [env] value by std::env",
            "/settings/greeting?from=env",
        ),
    ];
    for (_, path) in sides {
        wrk::run(&format!("{}{path}", c.gateway), 3, connections);
    }
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    println!("| round | side | requests/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|---|");
    for round in 1..=rounds {
        for (i, (name, path)) in sides.iter().enumerate() {
            let run = wrk::run(&format!("{}{path}", c.gateway), seconds, connections);
            println!(
                "| {round} | {name} | {:.0} | {} | {} | {} |",
                run.rps, run.p50, run.p99, run.errors
            );
            runs[i].push(run.rps);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!();
    println!("| side | median requests/s | spread |");
    println!("|---|---|---|");
    let mut medians = Vec::new();
    for ((name, _), v) in sides.iter().zip(runs.iter_mut()) {
        let m = median(v);
        println!("| {name} | {m:.0} | {:.0}–{:.0} |", v[0], v[v.len() - 1]);
        medians.push(m);
    }
    println!();
    println!("config lookup / hello: {:.3}x", medians[1] / medians[0]);
    println!(
        "config lookup / env lookup (same guest): {:.3}x",
        medians[1] / medians[2]
    );

    // How soon a changed value reaches requests: from the apply's answer to the first
    // response with the new value, polling as fast as one client can.
    let http = common::client();
    let mut delays = Vec::new();
    for i in 1..=5 {
        let text = std::fs::read_to_string(&settings)
            .unwrap()
            .replace("Hello from wasi:config!", &format!("value {i}"));
        let spec = write_spec(c.dir.path(), &format!("settings-{i}.toml"), &text);
        c.cli_ok(&["apply", "-f", spec.to_str().unwrap()]);
        let applied = std::time::Instant::now();
        let want = format!("value {i}\n");
        while http
            .get(format!("{}/settings/greeting", c.gateway))
            .send()
            .and_then(|r| r.text())
            .map_or(true, |body| body != want)
        {
            assert!(applied.elapsed().as_secs() < 60, "value {i} never arrived");
        }
        delays.push(applied.elapsed().as_secs_f64() * 1e3);
    }
    println!();
    println!(
        "a changed [config] value served, ms after the apply answered (5 changes): {}",
        delays
            .iter()
            .map(|d| format!("{d:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
