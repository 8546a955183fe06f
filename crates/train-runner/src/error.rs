//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can stop a run before it starts or while it runs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// A training setting is out of range.
    #[error("configuration: `{field}`: {message}")]
    Config {
        /// The setting (its flag name in snake_case).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Loading or saving the model failed.
    #[error(transparent)]
    Model(#[from] train_model::ModelError),
    /// Preparing the data failed.
    #[error(transparent)]
    Data(#[from] train_data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another live run holds the output directory.
    #[error(
        "{path} is in use by another run (process {pid}); wait for it to finish or choose another --output"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The other process, as recorded in the lock file.
        pid: String,
    },
    /// A data-parallel worker failed (registration, all-reduce, or a panic).
    #[error("data parallel: {0}")]
    Parallel(String),
    /// A checkpoint is missing, incomplete or inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The output directory already holds a run and neither `--resume` nor `--yes` was given.
    #[error(
        "{path} already holds checkpoints of a run; pass --resume to continue it, or --yes to start over there"
    )]
    OutputNotEmpty {
        /// The output directory.
        path: PathBuf,
    },
}

impl RunnerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = RunnerError> = std::result::Result<T, E>;
