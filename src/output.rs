//! Tables for people, JSON for scripts.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// What `-o` takes: a [`Format`] every command writes, or `toml`, which only `shoal get app
/// NAME` writes (the app's spec as a spec file, for `apply -f`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputArg {
    Table,
    Json,
    Toml,
}

/// Prints rows under a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    table_indented("", header, rows)
}

/// A table nested under a heading, as in `describe`.
pub fn table_indented(indent: &str, header: &[&str], rows: &[Vec<String>]) {
    let widths = widths(header, rows);
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    println!("{indent}{}", line(&widths, &header));
    for row in rows {
        println!("{indent}{}", line(&widths, row));
    }
}

/// Each column's width: its widest cell, header included.
pub fn widths(header: &[&str], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// One more row of a table printed before, in its columns (a wider cell pushes the rest).
pub fn print_row(widths: &[usize], row: &[String]) {
    println!("{}", line(widths, row));
}

fn line(widths: &[usize], cells: &[String]) -> String {
    let mut out = String::new();
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            out.push_str(cell);
        } else {
            out.push_str(&format!("{cell:<w$}   "));
        }
    }
    out.trim_end().to_string()
}

pub fn json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("values serialise")
    );
}

/// `3s`, `5m`, `2h`, `4d`, like kubectl's AGE column.
pub fn age(since_ms: u64) -> String {
    duration(shoal_core::now_ms().saturating_sub(since_ms))
}

/// A span of time as [`age`] shows it.
pub fn duration(ms: u64) -> String {
    let d = Duration::from_millis(ms).as_secs();
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        7200..=172_799 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// `sha256:abcdef123456` — enough of a digest to recognise it.
/// `n` and the noun, plural unless one: "1 key", "2 keys".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub fn short_digest(d: &str) -> String {
    d.get(..19).unwrap_or(d).to_string()
}

/// Ends the process as a write to a closed pipe would (by SIGPIPE, quietly) as soon as
/// stdout's reader goes away, for commands that follow (`logs -f`, `events -f`, `get -w`):
/// one with nothing new to print would otherwise find out only at its next line, which may
/// never come (`shoal logs quiet-app -f | head -1`). A thread sleeps in `poll` until then.
pub fn end_when_stdout_closes() {
    #[cfg(unix)]
    std::thread::spawn(|| {
        let mut out = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        loop {
            // SAFETY: `out` lives on this thread's stack for the call.
            let ready = unsafe { libc::poll(&mut out, 1, -1) };
            if ready == 1 && out.revents & libc::POLLERR != 0 {
                // SAFETY: signal and raise have no preconditions.
                unsafe {
                    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                    libc::raise(libc::SIGPIPE);
                }
            }
            let interrupted = ready < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            // Otherwise a terminal hung up, or stdout is nothing poll can watch: no reader
            // to wait for.
            if !interrupted {
                return;
            }
        }
    });
}

/// Writes `bytes` to stdout as they are; a reader that went away (`| head`) ends it quietly.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
