//! The one way the train-rs crates replace a file.
//!
//! The durability rule: the new content is written to a temporary file in the same directory
//! (so the rename stays on one file system), its data is synced to the disk, and only then is
//! it renamed over the final name. A concurrent reader, or the file system after a crash,
//! sees the old content or the new one, never a part; a failed write removes its temporary
//! file. (Syncing the directory, for a rename that must survive a power loss, is the job of
//! writers of whole directories such as training checkpoints.)
//!
//! ```
//! # fn main() -> std::io::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("status.json");
//! train_fs::write_atomic(&path, b"{\"step\": 1}\n")?;
//! assert_eq!(std::fs::read(&path)?, b"{\"step\": 1}\n");
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes` (see the crate's rule).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, |f| f.write_all(bytes))
}

/// Replaces `path` with what `write` writes into the temporary file (see the crate's rule).
/// Errors of `write` come back as they are; the temporary file is removed on any error.
pub fn replace_with<E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temporary_name(path);
    let written = File::create(&tmp).map_err(E::from).and_then(|mut file| {
        write(&mut file)?;
        file.flush()?;
        Ok(())
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    install(&tmp, path).map_err(E::from)
}

/// Moves a complete temporary file `tmp` (written by a library that only writes to a path,
/// next to `path`, e.g. named by [`temporary_name`]) over `path` by the crate's rule: its data
/// synced, then renamed. `tmp` is removed on failure.
pub fn install(tmp: &Path, path: &Path) -> io::Result<()> {
    let result = File::options()
        .write(true)
        .open(tmp)
        .and_then(|f| f.sync_data())
        .and_then(|()| std::fs::rename(tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// `.<name>.<pid>.<n>.tmp` beside `path`: hidden, and unique among the writers of this process
/// and of others.
pub fn temporary_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_content_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["a.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_content_and_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").unwrap();
        let e = replace_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["a.json"]);
        // A directory where the file should go: the rename fails, nothing is left behind.
        let blocked = dir.path().join("sub");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, b"new").is_err());
        assert_eq!(entries(dir.path()), ["a.json", "sub"]);
    }

    #[test]
    fn temporary_names_are_hidden_and_unique() {
        let p = Path::new("/d/model.safetensors");
        let (a, b) = (temporary_name(p), temporary_name(p));
        assert_ne!(a, b);
        assert!(
            a.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".model.safetensors.")
        );
        assert_eq!(a.parent(), p.parent());
    }
}
