//! The one error type of this crate.

use std::path::PathBuf;

/// Why monitoring output could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// A file or directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A chart could not be drawn.
    #[error("plot {name}: {message}")]
    Plot {
        /// The chart.
        name: String,
        /// What went wrong.
        message: String,
    },
}

impl MonitorError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = MonitorError> = std::result::Result<T, E>;
