//! A replica's output as every part sees it: the runtime captures it, the
//! agent keeps it, the control plane reads it for `shoal logs`.

use std::time::SystemTime;

/// Which guest stream a line came from; the runtime's own lines (traps,
/// timeouts) count as `Stderr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
