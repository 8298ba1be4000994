//! The redb schema. Every table the store uses is declared here, so the on-disk layout is in
//! one place.

use redb::TableDefinition;

/// A [`KV`] value: (create_revision, mod_revision, version, value).
pub type KvRow<'a> = (u64, u64, u64, &'a [u8]);

/// A [`LOG`] value: (key, deleted, create_revision, version, value, prev_value).
pub type LogRow<'a> = (&'a str, bool, u64, u64, &'a [u8], Option<&'a [u8]>);

/// Current state: key → [`KvRow`].
pub const KV: TableDefinition<&str, KvRow<'static>> = TableDefinition::new("kv");

/// Event log for watches, trimmed by compaction: (revision, index within the revision) →
/// [`LogRow`]. A revision's events are contiguous and in op order, so replay is one range scan.
pub const LOG: TableDefinition<(u64, u32), LogRow<'static>> = TableDefinition::new("log");

/// Counters: [`META_REVISION`] and [`META_COMPACTED`], and the store's [`META_ID`].
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Highest committed revision (absent = 0).
pub const META_REVISION: &str = "revision";
/// Log entries with revision <= this have been dropped (absent = 0).
pub const META_COMPACTED: &str = "compacted";
/// A random number drawn when the file was made: which store this is (a copy is the same).
pub const META_ID: &str = "id";
