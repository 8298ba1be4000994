//! Files the CLI reads whole (specs, components, values), each read only up to a bound: a
//! path naming `/dev/zero`, or a file far larger than anything the API takes, is refused
//! rather than read into memory until the machine runs out.

use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::Path;

/// What a spec or pool file may hold: far more than any real one.
pub const SPEC_LIMIT: u64 = 4 << 20;
/// What a component may hold: more than a server is ever configured to take.
pub const MODULE_LIMIT: u64 = 1 << 30;
/// What a value read from a file (config sets, secrets, key-value) may hold.
pub const VALUE_LIMIT: u64 = 64 << 20;

/// The bytes of `path` (`-`: standard input), if there are at most `limit` of them. Pipes and
/// devices are read up to the bound too (`--from-file password=<(…)` stays possible).
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        return bounded(std::io::stdin().lock(), limit);
    }
    let file = std::fs::File::open(path)?;
    if let Ok(meta) = file.metadata()
        && meta.is_file()
        && meta.len() > limit
    {
        bail!("{} bytes, more than {} (the most read)", meta.len(), limit);
    }
    bounded(file, limit)
}

fn bounded(from: impl Read, limit: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    from.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        bail!("more than {limit} bytes (the most read)");
    }
    Ok(bytes)
}

/// Standard input, as [`read_text`] reads a file.
pub fn read_stdin_text(limit: u64) -> Result<String> {
    String::from_utf8(bounded(std::io::stdin().lock(), limit)?).context("not UTF-8 text")
}

/// [`read`], as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read(path, limit)?).context("not UTF-8 text")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_bound_and_refuses_beyond_it_devices_included() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read(&path, 5).unwrap(), b"12345");
        let err = read(&path, 4).unwrap_err().to_string();
        assert!(err.contains("5 bytes, more than 4"), "{err}");
        let err = read(Path::new("/dev/zero"), 1024).unwrap_err().to_string();
        assert!(err.contains("more than 1024 bytes"), "{err}");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(read_text(&path, 5).is_err());
    }
}
