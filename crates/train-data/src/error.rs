//! The one error type of this crate, and the per-row problems that data checks report.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Where a row comes from: the file, and its line (text formats) or row index (Parquet, JSON
/// arrays).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RowLocation {
    /// The data file.
    pub path: PathBuf,
    /// 1-based line for JSONL; `None` for formats without lines.
    pub line: Option<usize>,
    /// 0-based index of the row among all rows of the file (valid or not).
    pub row: usize,
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.path.display()),
            None => write!(f, "{} row {}", self.path.display(), self.row),
        }
    }
}

/// What is wrong with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// The line is not valid JSON.
    BrokenJson,
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// A field has the wrong type (e.g. `messages` is not a list).
    WrongType,
    /// No `messages` (or `conversations` / `instruction`) field.
    MissingMessages,
    /// `messages` is empty.
    EmptyMessages,
    /// A role other than system, user, assistant.
    UnknownRole,
    /// Turns do not alternate user / assistant (after an optional leading system message).
    WrongTurnOrder,
    /// A message with empty content.
    EmptyContent,
    /// No assistant turn: nothing to train on.
    NoAssistantTurn,
    /// The same conversation appears earlier in the file.
    Duplicate,
    /// The tokenized row is longer than the maximum length.
    TooLong,
    /// An assistant answer already appears in the prompt.
    AnswerLeakage,
    /// Truncation removed every label token of the row.
    AllLabelsTruncated,
    /// The chat template failed on this row.
    Template,
    /// A line, a field, a run of text without whitespace or the number of messages is over
    /// its limit (the message names the limit).
    TooLarge,
    /// A tokenized-dataset cache file failed its checks (it is rebuilt from the data file).
    InvalidCache,
}

/// How serious a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The row cannot be used.
    Error,
    /// The row can be used but is suspicious.
    Warning,
}

impl ProblemKind {
    /// Errors make a row unusable; warnings do not.
    pub fn severity(self) -> Severity {
        match self {
            Self::Duplicate
            | Self::TooLong
            | Self::AnswerLeakage
            | Self::AllLabelsTruncated
            | Self::InvalidCache => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

/// One problem found in one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The row.
    pub location: RowLocation,
    /// The field at fault, e.g. `messages[2].role` (empty when the whole row is at fault).
    pub field: String,
    /// The category.
    pub kind: ProblemKind,
    /// Error or warning.
    pub severity: Severity,
    /// A human-readable explanation.
    pub message: String,
}

impl Problem {
    /// A problem of `kind` at `location` / `field`.
    pub fn new(
        location: RowLocation,
        field: impl Into<String>,
        kind: ProblemKind,
        message: impl Into<String>,
    ) -> Self {
        Self {
            location,
            field: field.into(),
            kind,
            severity: kind.severity(),
            message: message.into(),
        }
    }
}

/// `error` or `warning`, as the problem lines print it.
impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = self.severity;
        if self.field.is_empty() {
            write!(f, "{}: {sev}: {}", self.location, self.message)
        } else {
            write!(
                f,
                "{}: {sev}: field `{}`: {}",
                self.location, self.field, self.message
            )
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A row is invalid and the policy is `strict`.
    #[error("{0}")]
    Row(Box<Problem>),
    /// A file as a whole is unusable (not a JSON array, unreadable Parquet, no usable rows…).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A chat template failed to compile or to render.
    #[error("chat template {template}: {message}")]
    Template {
        /// Where the template comes from (file and key).
        template: String,
        /// minijinja's message, with the row when rendering failed.
        message: String,
    },
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A configuration value is invalid.
    #[error("configuration: field `{field}`: {message}")]
    Config {
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
