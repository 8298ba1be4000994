//! The cluster-wide key-value store guests reach through `wasi:keyvalue`: what one call asks of
//! the control plane and what it answers. Buckets belong to a namespace; an app opens only the
//! buckets its spec grants (`[keyvalue] buckets`), and every replica on every node sees the same
//! data, kept in the control plane's store.

use serde::{Deserialize, Serialize};

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The most one `set` or `set-many` writes, keys and values together: one write of the
/// control plane's store (etcd takes about 1.5 MiB in a request), and one request of a
/// node, whatever node the guest runs on.
pub const MAX_SET_BYTES: usize = MAX_VALUE_BYTES + MAX_KEY_BYTES;
/// The most keys one `list-keys` call answers; its cursor says where the next page starts.
pub const LIST_PAGE: usize = 1000;
/// What one bucket may hold (keys and values), unless the control plane is told otherwise.
pub const DEFAULT_BUCKET_BYTES: u64 = 64 << 20;
/// The most buckets one app may be granted.
pub const MAX_BUCKETS: usize = 16;

/// One `wasi:keyvalue` call on a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum KvOp {
    /// `get` (one key) and `get-many`.
    Get {
        keys: Vec<String>,
    },
    /// `set` and `set-many`, all or nothing.
    Set {
        entries: Vec<(String, Vec<u8>)>,
    },
    /// `delete` and `delete-many`; a key that is not there is no error.
    Delete {
        keys: Vec<String>,
    },
    Exists {
        key: String,
    },
    /// A page of keys in order, from `cursor` (a position) on.
    List {
        cursor: Option<u64>,
    },
    /// Adds `delta` to the decimal number stored at `key` (0 if absent) and answers the sum,
    /// atomically across every node.
    Increment {
        key: String,
        delta: u64,
    },
}

/// What a [`KvOp`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "answer")]
pub enum KvAnswer {
    Values {
        values: Vec<Option<Vec<u8>>>,
    },
    Done,
    Exists {
        exists: bool,
    },
    Keys {
        keys: Vec<String>,
        cursor: Option<u64>,
    },
    Count {
        value: u64,
    },
}

/// Calls on one bucket a node sends in one request, at most ([`KvOutcome`]).
pub const MAX_BATCH: usize = 64;

/// What one of the calls a node sent together came to: each is answered as if sent alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum KvOutcome {
    Answered {
        answer: KvAnswer,
    },
    /// Why the store refused it (past the bucket's limit, not a number, a bad key…).
    Refused {
        message: String,
    },
    /// The control plane failed it (its store did; a 5xx had it gone alone): a call that does
    /// the same the second time may go again, to another server if this one fails it too.
    Failed {
        message: String,
    },
}

/// A key's rule: 1 to [`MAX_KEY_BYTES`] bytes, no NUL.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.contains('\0') {
        return Err(format!(
            "a key is 1 to {MAX_KEY_BYTES} bytes without NUL (got {} bytes)",
            key.len()
        ));
    }
    Ok(())
}

/// The rule of a key written, and of any key in a URL: [`check_key`]'s, and no `.` or `..`
/// between slashes. A key is the end of its URL's path (`/v1/kv/BUCKET/KEY`), and a URL's
/// `..` (escaped or not) is a step up: `shoal kv delete b ../../apps/hello` deleted app
/// `hello`. Keys written before the rule may still be read and deleted by guests.
pub fn check_new_key(key: &str) -> Result<(), String> {
    check_key(key)?;
    if key.split('/').any(|part| part == "." || part == "..") {
        return Err(format!(
            "{key:?}: a key has no `.` or `..` between slashes, as a URL's path would read them"
        ));
    }
    Ok(())
}

/// Why a `set` or `set-many` of `entries` is refused, if it is: a value over
/// [`MAX_VALUE_BYTES`], or more than [`MAX_SET_BYTES`] in all. Judged where the guest runs
/// before it goes anywhere, and again by the control plane.
pub fn check_set(entries: &[(String, Vec<u8>)]) -> Result<(), String> {
    let mut total = 0usize;
    for (k, v) in entries {
        if v.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "the value of {k:?} is {} bytes: at most {MAX_VALUE_BYTES}",
                v.len()
            ));
        }
        total = total.saturating_add(k.len() + v.len());
    }
    if total > MAX_SET_BYTES {
        return Err(format!(
            "set-many of {} keys and {total} bytes: at most {MAX_SET_BYTES} bytes (keys and \
             values) in one call",
            entries.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_writes_one_largest_value_at_most() {
        let value = |n| vec![0u8; n];
        assert!(check_set(&[("k".into(), value(MAX_VALUE_BYTES))]).is_ok());
        let over = check_set(&[("k".into(), value(MAX_VALUE_BYTES + 1))]).unwrap_err();
        assert!(over.contains("at most 1048576"), "{over}");
        let two = [
            ("a".into(), value(600 << 10)),
            ("b".into(), value(600 << 10)),
        ];
        let many = check_set(&two).unwrap_err();
        assert!(
            many.starts_with("set-many of 2 keys and 1228802 bytes"),
            "{many}"
        );
    }

    #[test]
    fn a_key_written_is_no_path_step() {
        for bad in ["", "..", ".", "../../apps/hello", "a/./b", "a/..", "a\0b"] {
            assert!(check_new_key(bad).is_err(), "{bad:?}");
        }
        for good in ["hits", "a..b", "..a", "v1.2/x", "a//b", "/a", "é"] {
            assert!(check_new_key(good).is_ok(), "{good:?}");
        }
        assert!(check_new_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(check_key("a/./b").is_ok(), "one written before may be read");
    }
}
