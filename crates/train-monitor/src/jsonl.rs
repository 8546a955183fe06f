//! Append-only JSON-lines files (`layer_history.jsonl`, `previews.jsonl`, `evolution.jsonl`,
//! `completions.jsonl`), and the cut a resumed run makes in them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{MonitorError, Result};

/// Appends one JSON object per line, flushed each time.
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    file: Option<File>,
}

impl JsonlWriter {
    /// Appends to `path` (created, with its directory, at the first row).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `rows`.
    pub fn append<T: Serialize>(&mut self, rows: &[T]) -> Result<()> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| MonitorError::io(dir, e))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| MonitorError::io(&self.path, e))?;
            self.file = Some(f);
        }
        let mut text = String::new();
        for r in rows {
            text.push_str(&serde_json::to_string(r).unwrap_or_default());
            text.push('\n');
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(text.as_bytes())
                .and_then(|()| f.flush())
                .map_err(|e| MonitorError::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// Largest JSON-lines log [`drop_rows_from_step`] rewrites.
pub const MAX_RESUMED_LOG_BYTES: u64 = 512 << 20;

/// Removes from the JSON-lines log at `path` the rows of steps `first_dropped` and later (a
/// row's `step` field), so that a run resumed from step `first_dropped − 1` does not leave the
/// rows of the steps it does again twice; every other line is kept as it is. Replaced
/// atomically; a missing file is nothing to do. Returns how many rows were removed.
pub fn drop_rows_from_step(path: &Path, first_dropped: usize) -> Result<usize> {
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(MonitorError::io(path, e)),
    };
    if size > MAX_RESUMED_LOG_BYTES {
        return Err(MonitorError::io(
            path,
            std::io::Error::other(format!(
                "{size} bytes, over the {MAX_RESUMED_LOG_BYTES} a resume rewrites; the rows of the steps done again stay"
            )),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| MonitorError::io(path, e))?;
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
        if step.is_some_and(|s| s >= first_dropped as u64) {
            dropped += 1;
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    if dropped > 0 {
        crate::write_atomic(path, kept.as_bytes())?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_drops_the_rows_of_the_steps_it_does_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"loss\":2}\n{\"step\":2}\nnot json\n{\"kind\":\"x\"}\n{\"step\":3}\n{\"step\":2,\"eval_loss\":1}\n",
        )
        .unwrap();
        assert_eq!(drop_rows_from_step(&path, 3).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1,\"loss\":2}\n{\"step\":2}\nnot json\n{\"kind\":\"x\"}\n{\"step\":2,\"eval_loss\":1}\n"
        );
        assert_eq!(drop_rows_from_step(&path, 3).unwrap(), 0);
        assert_eq!(
            drop_rows_from_step(&dir.path().join("none.jsonl"), 1).unwrap(),
            0
        );
    }
}
