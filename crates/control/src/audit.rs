//! The audit log: who did what through the API, one JSON line per request, as Kubernetes'
//! audit log at its `Metadata` level. Every request that changes something (not GET or HEAD),
//! every backup (the whole state leaves with it), every join and every refused token: its
//! time, the caller (the token's name, `admin`, or `join token`), the client's address, the
//! method and path, the status and how long it took. Never a body: specs carry env values, and
//! secrets' values pass through. Reads are left out: they change nothing, and the dashboard and
//! `get -w` would drown the rest.
//!
//! Written by the request's own task, line by line without an fsync (the change it records is
//! in the store already), under a lock; a file past its size is renamed `.1` (`.1` to `.2`,
//! and so on, the oldest dropped), as logrotate does.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;

use crate::state::ControlPlane;

/// Who a response was given to, as the checks that let it through found them: set on the
/// response, so that the audit, which wraps them, can read it.
#[derive(Clone)]
pub(crate) struct Audited(pub String);

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
    /// With its query.
    path: &'a str,
    status: u16,
    ms: u64,
}

/// The audit log file and its rotation.
pub struct AuditLog {
    writer: Mutex<Writer>,
}

struct Writer {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl AuditLog {
    /// Appends to the log at `path` (made readable by its owner only), renamed aside past
    /// `max_bytes`, `keep` of those kept.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<AuditLog> {
        let file = append(path)?;
        let size = file.metadata()?.len();
        Ok(AuditLog {
            writer: Mutex::new(Writer {
                path: path.to_owned(),
                file,
                size,
                max_bytes,
                keep,
            }),
        })
    }

    fn record(&self, entry: &Entry) {
        let mut line = serde_json::to_vec(entry).expect("an entry serialises");
        line.push(b'\n');
        let mut w = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.size > 0
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
fn audited(method: &Method, path: &str, status: u16) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
        || path == "/v1/backup"
        || status == 401
        || status == 403
}

/// The middleware that writes the log, around the checks of the admin API and the join.
pub(crate) async fn audit(State(cp): State<ControlPlane>, req: Request, next: Next) -> Response {
    let Some(log) = cp.inner.audit.as_ref() else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let client = req.extensions().get::<Peer>().map(|p| p.0);
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    if audited(&method, &route, status) {
        log.record(&Entry {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            caller: resp.extensions().get::<Audited>().map(|a| a.0.as_str()),
            client,
            method: method.as_str(),
            path: &path,
            status,
            ms: started.elapsed().as_millis() as u64,
        });
    }
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
