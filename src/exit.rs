//! What the CLI's exit code says, as kubectl and nomad users expect: 0 done; 1 failed; 2 a
//! usage error (clap's); 3 not found; 4 a conflict (it exists, is in use, or changed
//! meanwhile); 5 unavailable (the API cannot be reached, or cannot serve now); 6 denied (no or
//! a wrong token, a role or namespace the token lacks, a namespace's quota). `shoal diff` and
//! `apply --dry-run` exit
//! 1 when something would change, and never 1 on an error.

use std::process::ExitCode;

/// A failure the exit code tells apart, carried in an `anyhow::Error` chain.
#[derive(Debug)]
pub struct Classified {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Classified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Classified {}

pub const USAGE: u8 = 2;
pub const NOT_FOUND: u8 = 3;
pub const CONFLICT: u8 = 4;
pub const UNAVAILABLE: u8 = 5;
pub const DENIED: u8 = 6;

/// What `shoal diff` and `apply --dry-run` return when something would change: no message,
/// exit code 1.
#[derive(Debug)]
pub struct WouldChange;

impl std::fmt::Display for WouldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("something would change")
    }
}

impl std::error::Error for WouldChange {}

/// A failure already written to stderr (one of several a command went on past), carried for
/// its exit code only.
#[derive(Debug)]
pub struct Reported(pub anyhow::Error);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Reported {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// The exit code for `result`; `diff` says whether the command was a diff (where 1 means
/// "would change", so a plain failure exits 2).
pub fn code(result: &anyhow::Result<()>, diff: bool) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    if e.downcast_ref::<WouldChange>().is_some() {
        return ExitCode::from(1);
    }
    let classified = e.chain().find_map(|c| c.downcast_ref::<Classified>());
    match classified {
        Some(c) => ExitCode::from(c.code),
        None if diff => ExitCode::from(2),
        None => ExitCode::FAILURE,
    }
}

/// A usage error found after parsing the command line (a flag that means nothing here):
/// exit code 2, as clap's own.
pub fn usage(message: String) -> anyhow::Error {
    fail(USAGE, message)
}

/// A failure the CLI itself tells apart, with exit code `code`.
pub fn fail(code: u8, message: String) -> anyhow::Error {
    Classified { code, message }.into()
}

/// Whether `e` says what was asked for does not exist (exit code 3).
pub fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<Classified>())
        .any(|c| c.code == NOT_FOUND)
}

/// The exit code an API status means, if it is one the code tells apart.
pub fn for_status(status: u16) -> Option<u8> {
    match status {
        404 => Some(NOT_FOUND),
        409 => Some(CONFLICT),
        401 | 403 => Some(DENIED),
        502..=504 => Some(UNAVAILABLE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_distinct_codes_and_diffs_keep_1_for_a_change() {
        assert_eq!(for_status(404), Some(NOT_FOUND));
        assert_eq!(for_status(409), Some(CONFLICT));
        assert_eq!(for_status(403), Some(DENIED));
        assert_eq!(for_status(503), Some(UNAVAILABLE));
        assert_eq!(for_status(400), None);
        let plain: anyhow::Result<()> = Err(anyhow::anyhow!("boom"));
        assert_eq!(code(&plain, false), ExitCode::FAILURE);
        assert_eq!(code(&plain, true), ExitCode::from(2));
        let change: anyhow::Result<()> = Err(WouldChange.into());
        assert_eq!(code(&change, true), ExitCode::from(1));
        let missing: anyhow::Result<()> = Err(anyhow::Error::new(Classified {
            code: NOT_FOUND,
            message: "no such app".into(),
        })
        .context("describing"));
        assert_eq!(code(&missing, true), ExitCode::from(NOT_FOUND));
    }
}
