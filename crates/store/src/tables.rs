//! The redb schema. Every table the store uses is declared here, so the on-disk layout is in
//! one place.
//!
//! # Formats
//! [`META_FORMAT`] says which layout a file has (absent = 1):
//! - **1**: current keys in [`KV`]; [`LOG`] holds the events since the compaction point.
//! - **2** ([`FORMAT`]): [`LOG`] is the only record. It holds every event since the compaction
//!   point and, below it, the row that wrote each key still present; the current keys are an
//!   index in memory, rebuilt from it at open. A commit then appends rows at the log's end
//!   instead of also rewriting a leaf of the key table wherever each key falls. [`KV_MOVED`]
//!   takes [`KV`]'s name, so a binary that reads format 1 refuses the file (redb's table
//!   type check) instead of finding no keys. A format-1 file is migrated when opened for
//!   writing.

use redb::TableDefinition;

/// A [`KV`] value: (create_revision, mod_revision, version, value).
pub type KvRow<'a> = (u64, u64, u64, &'a [u8]);

/// A [`LOG`] value: (key, deleted, create_revision, version, value, prev_value).
pub type LogRow<'a> = (&'a str, bool, u64, u64, &'a [u8], Option<&'a [u8]>);

/// Format 1's current state: key → [`KvRow`]. Read only to migrate a file or to read one.
pub const KV: TableDefinition<&str, KvRow<'static>> = TableDefinition::new("kv");

/// Format 2's stand-in under [`KV`]'s name, empty: a binary that knows only format 1 fails
/// to open its `kv` table with a type mismatch.
pub const KV_MOVED: TableDefinition<&str, u64> = TableDefinition::new("kv");

/// The event log: (revision, index within the revision) → [`LogRow`]. A revision's events are
/// contiguous and in op order, so replay is one range scan. Trimmed by compaction, which
/// (format 2) keeps the rows of the keys still present.
pub const LOG: TableDefinition<(u64, u32), LogRow<'static>> = TableDefinition::new("log");

/// Counters: [`META_REVISION`], [`META_COMPACTED`], [`META_FORMAT`], and the store's
/// [`META_ID`].
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Highest committed revision (absent = 0).
pub const META_REVISION: &str = "revision";
/// Log entries with revision <= this have been dropped (absent = 0), but for the rows of keys
/// still present (format 2).
pub const META_COMPACTED: &str = "compacted";
/// A random number drawn when the file was made: which store this is (a copy is the same).
pub const META_ID: &str = "id";
/// The file's layout (absent = 1): see the module's doc.
pub const META_FORMAT: &str = "format";

/// The layout this build writes.
pub const FORMAT: u64 = 2;
