//! Append-only JSON-lines files (`layer_history.jsonl`, `previews.jsonl`, `evolution.jsonl`).

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
