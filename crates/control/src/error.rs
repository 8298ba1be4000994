//! What can go wrong in the control plane, in its own terms. HTTP is the API
//! layer's business: `api_error` maps these to statuses and bodies, and the
//! in-process node link to `LinkError`s, each in one place.

use shoal_core::problem::ErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The object asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with the state: it exists already, or changed meanwhile.
    #[error("{0}")]
    Conflict(String),
    /// Another write came between what a change read and its own (its guard failed): a
    /// conflict to the caller, which a declarative change may read again and retry.
    #[error("{0}")]
    Raced(String),
    /// The request breaks a rule: which one (`code`, e.g. `InvalidSpec`,
    /// `UnknownModule`), the field at fault if there is one, and why.
    #[error("{message}")]
    Invalid {
        code: ErrorCode,
        field: Option<String>,
        message: String,
    },
    /// Something the request needs cannot be had now (the secret key file is missing, a
    /// sealed value does not open): said, and nothing is served in its place.
    #[error("{0}")]
    Unavailable(String),
    /// Asked for history that was compacted away: read the snapshot again.
    #[error("{0}")]
    Compacted(String),
    /// Shoal failed; the cause was logged where it happened, never sent.
    #[error("internal error; see the server log")]
    Internal,
}

pub type ControlResult<T> = Result<T, ControlError>;

impl ControlError {
    pub fn not_found(message: impl Into<String>) -> Self {
        ControlError::NotFound(message.into())
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ControlError::Conflict(message.into())
    }

    /// A broken rule with no single field to blame.
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlError::Invalid {
            code,
            field: None,
            message: message.into(),
        }
    }

    /// Logs the cause and says only that something failed.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        ControlError::Internal
    }
}

impl From<shoal_store::StoreError> for ControlError {
    fn from(e: shoal_store::StoreError) -> Self {
        match e {
            shoal_store::StoreError::Compacted { compacted } => ControlError::Compacted(format!(
                "history up to revision {compacted} is compacted; re-read the snapshot"
            )),
            shoal_store::StoreError::TooLarge(why) => ControlError::invalid(
                ErrorCode::TooLarge,
                format!(
                    "the change is larger than the store takes at once ({why}): make it smaller (an app's [config] and config sets, a secret's versions and a key-value write each go whole in one write), or raise etcd's --max-request-bytes"
                ),
            ),
            unavailable @ shoal_store::StoreError::Unavailable(_) => {
                ControlError::Unavailable(format!("{unavailable}: try again in a moment"))
            }
            full if full.is_disk_full() => {
                tracing::error!(error = %full, "the store's disk is full");
                ControlError::Unavailable(
                    "the store cannot write: its disk is full; free space there, then restart the server"
                        .into(),
                )
            }
            other => ControlError::internal(other),
        }
    }
}

impl From<shoal_core::SpecError> for ControlError {
    fn from(e: shoal_core::SpecError) -> Self {
        ControlError::Invalid {
            code: ErrorCode::InvalidSpec,
            field: e.field.clone(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk is said as such, and as what cannot be served now (503, the CLI's exit
    /// 5), not as an internal error.
    #[test]
    fn a_full_disk_is_unavailable_and_says_so() {
        for full in [
            shoal_store::StoreError::Io(std::io::Error::from_raw_os_error(28)),
            shoal_store::StoreError::Db("I/O error: No space left on device (os error 28)".into()),
        ] {
            match ControlError::from(full) {
                ControlError::Unavailable(message) => {
                    assert!(message.contains("disk is full"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            ControlError::from(shoal_store::StoreError::Db("corrupt".into())),
            ControlError::Internal
        ));
    }
}
