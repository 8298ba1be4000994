//! `notes`: keeps notes in `notes.txt` on a volume mounted at `$MOUNT` (default `/data`).
//!
//! - `notes write TEXT…` appends a line and exits (a job);
//! - `notes read` prints every line, then stays up (a daemon), so what a job wrote before a
//!   restart shows in its log after it;
//! - `notes fill BYTES` writes that many bytes to `fill.bin`, saying how far it got (the volume's
//!   size limit stops it);
//! - `notes dirs N` and `notes files N` make N directories or N empty files, saying how many
//!   they made (the limit stops them too);
//! - `notes escape` tries to reach what lies outside the volume (`..`, an absolute path, a
//!   symlink that points out) and says what each attempt got.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mount = std::env::var("MOUNT").unwrap_or_else(|_| "/data".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let notes = format!("{mount}/notes.txt");
    match args.first().map(String::as_str) {
        Some("write") => {
            let line = args[1..].join(" ");
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&notes)
                .and_then(|mut f| writeln!(f, "{line}"));
            match written {
                Ok(()) => {
                    println!("notes: wrote {line:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("notes: cannot write {notes}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("read") => {
            match std::fs::read_to_string(&notes) {
                Ok(text) => {
                    for line in text.lines() {
                        println!("notes: read {line:?}");
                    }
                }
                Err(e) => println!("notes: nothing to read in {notes}: {e}"),
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some("fill") => {
            let want: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            let path = format!("{mount}/fill.bin");
            let mut done = 0u64;
            let chunk = vec![7u8; 64 * 1024];
            let result = std::fs::File::create(&path).and_then(|mut f| {
                while done < want {
                    let n = chunk.len().min((want - done) as usize);
                    f.write_all(&chunk[..n])?;
                    done += n as u64;
                }
                f.flush()
            });
            match result {
                Ok(()) => println!("notes: filled {done} bytes"),
                Err(e) => println!("notes: fill stopped after {done} bytes: {e}"),
            }
            ExitCode::SUCCESS
        }
        Some(what @ ("dirs" | "files")) => {
            let want: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            let (noun, make): (_, fn(&str) -> std::io::Result<()>) = match what {
                "dirs" => ("directories", |p| std::fs::create_dir(p)),
                _ => ("files", |p| std::fs::File::create(p).map(drop)),
            };
            let mut made = 0u64;
            let result = loop {
                if made == want {
                    break Ok(());
                }
                if let Err(e) = make(&format!("{mount}/{what}-{made}")) {
                    break Err(e);
                }
                made += 1;
            };
            match result {
                Ok(()) => println!("notes: made {made} {noun}"),
                Err(e) => println!("notes: {what} stopped after {made} {noun}: {e}"),
            }
            ExitCode::SUCCESS
        }
        Some("escape") => {
            let attempts = [
                ("parent", format!("{mount}/../etc/passwd")),
                ("absolute", "/etc/passwd".to_string()),
            ];
            for (what, path) in attempts {
                match std::fs::read(&path) {
                    Ok(bytes) => println!("notes: escape {what}: READ {} bytes", bytes.len()),
                    Err(e) => println!("notes: escape {what}: refused ({e})"),
                }
            }
            let link = format!("{mount}/out");
            let _ = std::fs::remove_file(&link);
            match symlink(&mount, "../../../../../../etc", "out") {
                Ok(()) => match std::fs::read(format!("{link}/passwd")) {
                    Ok(bytes) => println!("notes: escape symlink: READ {} bytes", bytes.len()),
                    Err(e) => println!("notes: escape symlink: refused ({e})"),
                },
                Err(e) => println!("notes: escape symlink: refused ({e})"),
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: notes write TEXT… | read | fill BYTES | dirs N | files N | escape");
            ExitCode::FAILURE
        }
    }
}

/// Makes `name` in the preopened directory `mount`, a symlink to `target`.
fn symlink(mount: &str, target: &str, name: &str) -> Result<(), String> {
    let dirs = wasip2::filesystem::preopens::get_directories();
    let (dir, _) = dirs
        .iter()
        .find(|(_, path)| path == mount)
        .ok_or_else(|| format!("{mount} is not a preopened directory"))?;
    dir.symlink_at(target, name).map_err(|e| format!("{e:?}"))
}
