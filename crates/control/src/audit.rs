//! The audit log: who did what through the admin API, one JSON line per request, as
//! Kubernetes' audit log at its `Metadata` level. Every request that changes something or
//! asks to (not GET or HEAD; a dry run too, as Kubernetes audits those), every backup (the whole state leaves with it), every join and every refused
//! token: its time, the caller (the token's name, `admin`, or `join token`), the client's
//! address, the method and path, the status and how long it took. Never a body: specs carry
//! env values, and secrets' values pass through. Reads are left out: they change nothing, and
//! the dashboard and `get -w` would drown the rest. So is what nodes send with their own
//! credentials (heartbeats, reports, registration): the node API's traffic, not people's.
//!
//! A request whose client hangs up before the answer is still written, with status 499 (as
//! nginx says it): its handler's store write may well have happened. Requests without a valid
//! token (401) are written at most [`REFUSALS_PER_SECOND`] per client address a second, and
//! paths are cut at [`PATH_BYTES`], so a flood of bad tokens neither drowns nor rotates away
//! the rest; a 403 has a known caller, and is always written.
//!
//! Written by the request's own task, line by line without an fsync (the change it records is
//! in the store already), under a lock; a regular file past its size is renamed `.1` (`.1` to
//! `.2`, and so on, the oldest dropped), as logrotate does. Anything else (`/dev/stdout`, a
//! pipe) is only written to.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;

use crate::state::ControlPlane;

/// 401s written per client address per second; the rest of that second's are not.
const REFUSALS_PER_SECOND: u32 = 10;

/// The longest path (with its query) written; a longer one is cut, and says so with `…`.
const PATH_BYTES: usize = 512;

/// Status of a request whose client went before its answer (nginx's "client closed request").
const CLIENT_WENT: u16 = 499;

/// Who is calling, as the checks that let a request through found them: the audit puts an
/// empty one in each request it wraps, and `authorize` or the join token's check fills it.
#[derive(Clone, Default)]
pub(crate) struct Audited(Arc<OnceLock<String>>);

impl Audited {
    pub(crate) fn caller(&self, name: &str) {
        let _ = self.0.set(name.to_owned());
    }
}

/// The client's address, set on each request by [`crate::serve`].
#[derive(Clone, Copy)]
pub(crate) struct Peer(pub IpAddr);

/// One line of the log.
#[derive(Debug, Serialize)]
struct Entry<'a> {
    /// RFC 3339, UTC, milliseconds.
    time: String,
    /// Absent: no token that checked out.
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<IpAddr>,
    method: &'a str,
    /// With its query, cut at [`PATH_BYTES`].
    path: &'a str,
    status: u16,
    ms: u64,
}

/// The audit log file, its rotation, and the refusals written this second.
pub struct AuditLog {
    writer: Mutex<Writer>,
    refusals: Mutex<(u64, HashMap<Option<IpAddr>, u32>)>,
}

struct Writer {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    /// Whether it is a file of its own to rename aside (not a device, a pipe or a link).
    rotates: bool,
}

impl AuditLog {
    /// Appends to the log at `path` (made readable by its owner only), renamed aside past
    /// `max_bytes`, `keep` of those kept.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<AuditLog> {
        let rotates = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta.is_file(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
        };
        let file = append(path)?;
        let size = file.metadata()?.len();
        Ok(AuditLog {
            writer: Mutex::new(Writer {
                path: path.to_owned(),
                file,
                size,
                max_bytes,
                keep,
                rotates,
            }),
            refusals: Mutex::new((0, HashMap::new())),
        })
    }

    fn record(&self, entry: &Entry) {
        let second = shoal_core::clock::now_ms() / 1000;
        if entry.status == 401 && !self.refusal_written(entry.client, second) {
            return;
        }
        let mut line = serde_json::to_vec(entry).expect("an entry serialises");
        line.push(b'\n');
        let mut w = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.rotates
            && w.size > 0
            && w.size + line.len() as u64 > w.max_bytes
            && let Err(e) = w.rotate()
        {
            tracing::error!(path = %w.path.display(), error = %e, "cannot rotate the audit log");
        }
        match w.file.write_all(&line) {
            Ok(()) => w.size += line.len() as u64,
            Err(e) => {
                tracing::error!(path = %w.path.display(), error = %e, "cannot write the audit log")
            }
        }
    }

    /// Whether a 401 of `client` in `second` is written: one of the first
    /// [`REFUSALS_PER_SECOND`] of that second.
    fn refusal_written(&self, client: Option<IpAddr>, second: u64) -> bool {
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if refusals.0 != second {
            *refusals = (second, HashMap::new());
        }
        let count = refusals.1.entry(client).or_default();
        *count += 1;
        *count <= REFUSALS_PER_SECOND
    }
}

impl Writer {
    fn rotate(&mut self) -> std::io::Result<()> {
        let aside = |n: usize| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        for n in (1..self.keep).rev() {
            match std::fs::rename(aside(n), aside(n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            std::fs::rename(&self.path, aside(1))?;
        }
        self.file = append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Whether a request goes into the log (see the module's doc).
fn audited(method: &Method, route: &str, status: u16) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
        || route == "/v1/backup"
        || status == 401
        || status == 403
}

/// `path` cut at [`PATH_BYTES`], on a character boundary.
fn cut(path: &str) -> String {
    if path.len() <= PATH_BYTES {
        return path.to_owned();
    }
    let mut end = PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// A request on its way: written when its answer is, or, if its client goes first and the
/// handler is dropped, when it is dropped.
struct InFlight {
    cp: ControlPlane,
    method: Method,
    route: String,
    path: String,
    client: Option<IpAddr>,
    audited: Audited,
    started: std::time::Instant,
    answered: bool,
}

impl InFlight {
    fn write(&self, status: u16) {
        let Some(log) = self.cp.inner.audit.as_ref() else {
            return;
        };
        if !audited(&self.method, &self.route, status) {
            return;
        }
        log.record(&Entry {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            caller: self.audited.0.get().map(String::as_str),
            client: self.client,
            method: self.method.as_str(),
            path: &self.path,
            status,
            ms: self.started.elapsed().as_millis() as u64,
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.answered {
            self.write(CLIENT_WENT);
        }
    }
}

/// The middleware that writes the log, around the checks of the admin API and the join.
pub(crate) async fn audit(
    State(cp): State<ControlPlane>,
    mut req: Request,
    next: Next,
) -> Response {
    if cp.inner.audit.is_none() {
        return next.run(req).await;
    }
    let audited = Audited::default();
    req.extensions_mut().insert(audited.clone());
    let mut in_flight = InFlight {
        method: req.method().clone(),
        route: req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        path: cut(req
            .uri()
            .path_and_query()
            .map_or(req.uri().path(), |p| p.as_str())),
        client: req.extensions().get::<Peer>().map(|p| p.0),
        audited,
        started: std::time::Instant::now(),
        answered: false,
        cp,
    };
    let resp = next.run(req).await;
    in_flight.answered = true;
    in_flight.write(resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u16) -> Entry<'static> {
        Entry {
            time: "2026-12-04T07:00:00.000Z".into(),
            caller: Some("ci"),
            client: Some("127.0.0.1".parse().unwrap()),
            method: "POST",
            path: "/v1/apps",
            status: n,
            ms: 3,
        }
    }

    #[test]
    fn changes_backups_and_refusals_are_audited_reads_are_not() {
        assert!(audited(&Method::POST, "/v1/apps", 201));
        assert!(audited(&Method::DELETE, "/v1/apps/{name}", 404));
        assert!(audited(&Method::GET, "/v1/backup", 200));
        assert!(audited(&Method::GET, "/v1/apps", 401));
        assert!(audited(&Method::GET, "/v1/nodes", 403));
        assert!(!audited(&Method::GET, "/v1/apps", 200));
        assert!(!audited(&Method::HEAD, "/v1/apps", 200));
    }

    #[test]
    fn tokens_refused_are_written_ten_a_second_per_client_and_paths_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, 1 << 20, 1).unwrap();
        let from = |ip: &str| Entry {
            caller: None,
            client: Some(ip.parse().unwrap()),
            ..entry(401)
        };
        let one: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        let written = (0..15).filter(|_| log.refusal_written(one, 7)).count();
        assert_eq!(written, 10);
        assert!(log.refusal_written(Some("10.0.0.2".parse().unwrap()), 7));
        assert!(log.refusal_written(one, 8), "a new second");
        log.record(&from("10.0.0.3"));
        log.record(&entry(201));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("10.0.0.3").count(), 1, "{text}");
        assert_eq!(text.matches("\"status\":201").count(), 1, "{text}");

        let long = format!("/v1/apps?x={}", "é".repeat(400));
        let short = cut(&long);
        assert!(
            short.len() <= PATH_BYTES + '…'.len_utf8(),
            "{}",
            short.len()
        );
        assert!(short.ends_with('…') && long.starts_with(short.trim_end_matches('…')));
        assert_eq!(cut("/v1/apps"), "/v1/apps");
    }

    #[test]
    fn what_is_not_a_file_of_its_own_is_written_to_and_never_renamed() {
        let log = AuditLog::open(Path::new("/dev/null"), 10, 2).unwrap();
        for n in 0..3 {
            log.record(&entry(200 + n));
        }
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata("/dev/null").unwrap();
        assert!(meta.file_type().is_char_device());
    }

    #[test]
    fn lines_are_json_and_the_log_rotates_past_its_size_keeping_so_many() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let line = serde_json::to_vec(&entry(201)).unwrap().len() as u64 + 1;
        let log = AuditLog::open(&path, 3 * line, 2).unwrap();
        for n in 0..10 {
            log.record(&entry(200 + n));
        }
        let read = |p: &Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert_eq!(v["caller"], "ci");
                    assert_eq!(v["path"], "/v1/apps");
                    v["status"].as_u64().unwrap()
                })
                .collect()
        };
        assert_eq!(read(&path), [209]);
        assert_eq!(read(&dir.path().join("audit.log.1")), [206, 207, 208]);
        assert_eq!(read(&dir.path().join("audit.log.2")), [203, 204, 205]);
        assert!(!dir.path().join("audit.log.3").exists(), "two kept");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Opened again, it appends.
        drop(log);
        let log = AuditLog::open(&path, 3 * line, 2).unwrap();
        log.record(&entry(299));
        assert_eq!(read(&path), [209, 299]);
    }
}
