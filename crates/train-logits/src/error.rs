//! The one error type of this crate.

use std::path::PathBuf;

/// Why a processor could not be built or applied, or generation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogitsError {
    /// A processor setting is out of range or inconsistent.
    #[error("processor `{processor}`: {message}")]
    Config {
        /// The processor (its `type` in TOML).
        processor: String,
        /// What is wrong.
        message: String,
    },
    /// The logits handed to a processor do not fit it (vocabulary size, empty row).
    #[error("processor `{processor}`: {message}")]
    Input {
        /// The processor.
        processor: String,
        /// What is wrong.
        message: String,
    },
    /// A processors file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (with line and column when TOML says so).
        message: String,
    },
    /// The generation request is invalid (no prompt, zero-length prompt, bad settings).
    #[error("generation: {0}")]
    Generation(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] train_model::ModelError),
    /// Templating or tokenizing the prompt failed.
    #[error(transparent)]
    Data(#[from] train_data::DataError),
    /// The tokenizer failed to decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// [`crate::generate_until`]'s flag was raised: the generation was abandoned.
    #[error("stopped on request")]
    Cancelled,
}

impl LogitsError {
    pub(crate) fn config(processor: &str, message: impl Into<String>) -> Self {
        Self::Config {
            processor: processor.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn input(processor: &str, message: impl Into<String>) -> Self {
        Self::Input {
            processor: processor.to_string(),
            message: message.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = LogitsError> = std::result::Result<T, E>;
