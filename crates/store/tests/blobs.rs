use std::path::Path;

use bytes::Bytes;
use futures::stream;
use sha2::{Digest, Sha256};
use shoal_store::{BlobError, BlobStore};

fn chunks(data: &[u8], size: usize) -> Vec<Result<Bytes, std::io::Error>> {
    data.chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn module(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn put_hashes_correctly_and_dedups() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let data = module(100_000);
    let expected = format!("sha256:{}", hex::encode(Sha256::digest(&data)));

    let first = blobs
        .put_stream(stream::iter(chunks(&data, 4096)), 1 << 20)
        .await
        .unwrap();
    assert_eq!(first.digest, expected);
    assert_eq!(first.size, data.len() as u64);
    assert!(!first.existed);
    assert_eq!(first.path, blobs.path(&expected));
    assert_eq!(std::fs::read(&first.path).unwrap(), data);

    // Same bytes, different chunking: stored once.
    let second = blobs
        .put_stream(stream::iter(chunks(&data, 777)), 1 << 20)
        .await
        .unwrap();
    assert_eq!(second.digest, expected);
    assert!(second.existed);
    assert_eq!(files_in(&dir.path().join("sha256")).len(), 1);
    assert!(files_in(&dir.path().join("tmp")).is_empty());

    assert!(blobs.contains(&expected));
    assert_eq!(blobs.read(&expected).unwrap(), data);
    blobs.delete(&expected).unwrap();
    assert!(!blobs.contains(&expected));
    assert!(matches!(blobs.read(&expected), Err(BlobError::NotFound(_))));
    blobs.delete(&expected).unwrap();

    // The empty blob is a blob too.
    let empty = blobs
        .put_stream(stream::iter(chunks(&[], 1)), 0)
        .await
        .unwrap();
    assert_eq!(
        empty.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(b"")))
    );
    assert_eq!(empty.size, 0);
}

#[tokio::test]
async fn too_large_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let data = module(10_000);
    let exact = blobs
        .put_stream(stream::iter(chunks(&data, 1000)), 10_000)
        .await
        .unwrap();
    assert_eq!(
        exact.size, 10_000,
        "a blob of exactly the limit is accepted"
    );
    blobs.delete(&exact.digest).unwrap();

    // The stream would go on forever: the limit must stop it as soon as it is exceeded.
    let endless = stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from_static(&[7u8; 1000])));
    let err = blobs.put_stream(endless, 9_999).await.unwrap_err();
    assert!(matches!(err, BlobError::TooLarge { limit: 9_999 }), "{err}");
    assert!(files_in(&dir.path().join("sha256")).is_empty());
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn failed_stream_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let items = vec![
        Ok(Bytes::from_static(b"partial")),
        Err("connection reset".to_string()),
    ];
    let err = blobs
        .put_stream(stream::iter(items), 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BlobError::Stream(m) if m.contains("connection reset")),
        "{err}"
    );
    assert!(files_in(&dir.path().join("sha256")).is_empty());
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[test]
fn leftover_temp_files_are_cleaned_on_open() {
    let dir = tempfile::tempdir().unwrap();
    BlobStore::open(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("tmp").join("123-0-0.part"),
        b"half an upload",
    )
    .unwrap();
    BlobStore::open(dir.path()).unwrap();
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[test]
fn bad_digests_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let good = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        blobs.try_path(&good).unwrap(),
        dir.path().join("sha256").join("ab".repeat(32))
    );
    let bad = [
        String::new(),
        "ab".repeat(32),
        format!("sha256:{}", "AB".repeat(32)),
        format!("sha512:{}", "ab".repeat(32)),
        format!("sha256:{}", "ab".repeat(31)),
        format!("sha256:{}0", "ab".repeat(32)),
        format!("sha256:../{}", "ab".repeat(31)),
        "sha256:../../../../etc/passwd".to_string(),
        format!("sha256:{}/..", "a".repeat(61)),
    ];
    for digest in &bad {
        assert!(
            matches!(blobs.read(digest), Err(BlobError::BadDigest(_))),
            "{digest:?}"
        );
        assert!(
            matches!(blobs.delete(digest), Err(BlobError::BadDigest(_))),
            "{digest:?}"
        );
        assert!(
            matches!(blobs.try_path(digest), Err(BlobError::BadDigest(_))),
            "{digest:?}"
        );
        assert!(!blobs.contains(digest));
        assert!(blobs.path(digest).starts_with(dir.path().join("sha256")));
    }
}
