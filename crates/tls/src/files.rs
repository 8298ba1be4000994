//! Small files that hold secrets (tokens, credentials): written whole or not
//! at all, readable by their owner only.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` with mode 0600, through a temporary file beside it that is
/// fsync'd and renamed into place: a crash leaves the old content or the new, never a torn
/// token, and the secret is never readable by others, not even for a moment. The temporary
/// file is a new one of a random name (`O_EXCL`): a file of a fixed name left there, or put
/// there, with a looser mode (or a link) would have been written through and kept its mode.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    let mut file = tempfile::Builder::new()
        .prefix(".shoal-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_file_is_replaced_whole_and_only_its_owner_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    /// The temporary file used to have a fixed name, opened without `O_EXCL`: one left
    /// there with mode 0644 was written through and renamed into place as it was.
    #[test]
    fn a_loose_file_where_the_temporary_one_went_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let loose = dir.path().join("token.tmp");
        std::fs::write(&loose, b"old").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&loose).unwrap(), b"old");
    }
}
