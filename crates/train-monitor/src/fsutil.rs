//! Atomic replacement of a file: write a temporary file in the same directory, then rename.

use std::io::Write;
use std::path::Path;

use crate::error::{MonitorError, Result};

/// Replaces `path` with `bytes` so that a reader sees the old or the new content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| MonitorError::io(dir, e))?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| MonitorError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| MonitorError::io(&tmp, e))?;
    f.sync_data().map_err(|e| MonitorError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        MonitorError::io(path, e)
    })
}
