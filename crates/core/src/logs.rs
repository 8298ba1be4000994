//! A replica's output as every part sees it: the runtime captures it and keeps it on the
//! node's disk, the node's gateway serves it, the control plane merges every replica's for
//! `shoal logs`.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Which guest stream a line came from; the runtime's own lines (traps,
/// timeouts) count as `Stderr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl std::fmt::Display for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        })
    }
}

/// One line of output, without its trailing newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub time: SystemTime,
    pub stream: LogStream,
    pub line: String,
}

impl LogLine {
    /// Milliseconds since the Unix epoch.
    pub fn millis(&self) -> crate::Millis {
        self.time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// One line of a replica's output as it travels: from a node's gateway to the control plane
/// (NDJSON, `GET /_shoal/logs/{replica}`) and from the API to clients (`shoal logs -o json`).
/// `seq` numbers a replica's lines from its first, across node restarts, so a follower that
/// reconnects asks for what it has not seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub replica: String,
    /// The line's number in the replica's output; [`LogEntry::NOTICE`] for a line Shoal
    /// writes in its place (its output could not be read).
    pub seq: u64,
    /// When the line was written: milliseconds since the Unix epoch.
    pub time: crate::Millis,
    pub stream: LogStream,
    pub line: String,
}

impl LogEntry {
    /// The `seq` of a notice in a replica's place, not one of its lines: no follower
    /// resumes after it.
    pub const NOTICE: u64 = u64::MAX;

    /// `REPLICA [TIME] STREAM LINE`, the time (RFC 3339, UTC, milliseconds) only if asked
    /// for, as `kubectl logs --timestamps` adds it.
    pub fn text(&self, timestamps: bool) -> String {
        if timestamps {
            let time = UNIX_EPOCH + std::time::Duration::from_millis(self.time);
            format!(
                "{} {} {} {}\n",
                self.replica,
                humantime::format_rfc3339_millis(time),
                self.stream,
                self.line
            )
        } else {
            format!("{} {} {}\n", self.replica, self.stream, self.line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_as_text_with_or_without_its_time() {
        let entry = LogEntry {
            replica: "hello-1-abcde".into(),
            seq: 7,
            time: 1_764_547_200_123,
            stream: LogStream::Stderr,
            line: "boom".into(),
        };
        assert_eq!(entry.text(false), "hello-1-abcde stderr boom\n");
        assert_eq!(
            entry.text(true),
            "hello-1-abcde 2025-12-01T00:00:00.123Z stderr boom\n"
        );
        let json = serde_json::to_string(&entry).unwrap();
        assert!(json.contains("\"stream\":\"stderr\""), "{json}");
        assert_eq!(serde_json::from_str::<LogEntry>(&json).unwrap(), entry);
    }
}
