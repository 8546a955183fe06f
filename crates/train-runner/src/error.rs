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
    #[error("{path} is in use by another run (process {pid})")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The other process, as recorded in the lock file.
        pid: String,
    },
    /// A reward function is misconfigured or failed (GRPO).
    #[error("reward `{function}`: {message}")]
    Reward {
        /// The function's name (`(file)` for the reward file itself).
        function: String,
        /// What is wrong, naming the row where it is about one.
        message: String,
    },
    /// Generating completions failed (GRPO).
    #[error("generation: {0}")]
    Generation(#[from] train_logits::LogitsError),
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
    /// The output directory already holds a run, and neither a resume nor a fresh start over it
    /// (`TrainSetup::overwrite`) was asked for.
    #[error("{path} already holds checkpoints of a run")]
    OutputNotEmpty {
        /// The output directory.
        path: PathBuf,
    },
    /// A resume from an older checkpoint would abandon newer checkpoints (or another run's),
    /// and moving them aside (`TrainSetup::overwrite`) was not asked for.
    #[error(
        "checkpoint {path}: resuming from step {step} would abandon {} in {} (newer, or of another run)",
        abandoned.join(", "),
        output.display()
    )]
    WouldAbandon {
        /// The checkpoint asked for.
        path: PathBuf,
        /// Its step.
        step: usize,
        /// The checkpoints it would abandon.
        abandoned: Vec<String>,
        /// The output directory.
        output: PathBuf,
    },
    /// A checkpoint is resumed with another model than the one it was trained from.
    #[error(
        "checkpoint {path}: it was trained from {trained_from} (config.json SHA-256 {trained_hash}…), not from {given} (SHA-256 {given_hash}…)"
    )]
    OtherModel {
        /// The checkpoint.
        path: PathBuf,
        /// The model directory it records (or "another model").
        trained_from: String,
        /// The start of that model's config fingerprint.
        trained_hash: String,
        /// The model directory given.
        given: String,
        /// The start of its config fingerprint.
        given_hash: String,
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
