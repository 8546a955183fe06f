//! Shared by the targets: a per-process scratch file for parsers that read paths.

use std::path::PathBuf;

/// Writes `bytes` to a scratch file named `name` in this process's own directory.
pub fn scratch(name: &str, bytes: &[u8]) -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!("train-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(name);
    std::fs::write(&path, bytes).ok()?;
    Some(path)
}
