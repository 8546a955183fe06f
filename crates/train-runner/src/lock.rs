//! The output-directory lock: one run writes into a directory at a time.
//!
//! The lock is an exclusive OS lock on `OUTPUT/.train.lock`, which holds the owner's process id.
//! The OS releases it when the process dies, so a lock file left by a crashed run is taken over
//! (with a warning from the caller), and `--resume` after a crash just works.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, RunnerError};

/// A held output-directory lock (released on drop).
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    path: PathBuf,
    /// The process id found in a lock file left by a process that no longer holds it.
    pub stale_owner: Option<String>,
}

impl OutputLock {
    /// Takes the lock of `dir` (created if needed), or reports the live owner.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| RunnerError::io(dir, e))?;
        let path = dir.join(".train.lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| RunnerError::io(&path, e))?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim().to_string();
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(RunnerError::Locked {
                    path,
                    pid: if previous.is_empty() {
                        "unknown".into()
                    } else {
                        previous
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(RunnerError::io(&path, e)),
        }
        let me = std::process::id().to_string();
        let stale_owner = (!previous.is_empty() && previous != me).then_some(previous);
        file.set_len(0).map_err(|e| RunnerError::io(&path, e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| RunnerError::io(&path, e))?;
        file.write_all(me.as_bytes())
            .map_err(|e| RunnerError::io(&path, e))?;
        file.flush().map_err(|e| RunnerError::io(&path, e))?;
        Ok(Self {
            file,
            path,
            stale_owner,
        })
    }

    /// The process id of the live run that holds the lock of `dir`, or `None` when no live
    /// process holds it (no run, or one that died: the OS released its lock). Takes nothing.
    pub fn live_owner(dir: &Path) -> Option<String> {
        let path = dir.join(".train.lock");
        let mut file = OpenOptions::new().read(true).open(&path).ok()?;
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                None
            }
            Err(std::fs::TryLockError::WouldBlock) => Some(if owner.trim().is_empty() {
                "unknown".into()
            } else {
                owner.trim().to_string()
            }),
            Err(std::fs::TryLockError::Error(_)) => None,
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Leave an empty file: the next run sees no stale owner.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
