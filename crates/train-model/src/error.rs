//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading, building, running or writing a model.
///
/// Every variant names the file (and, where it applies, the tensor or field) at fault, so a
/// message is enough to find the problem without a debugger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A Hugging Face Hub model id could not be resolved in the cache or downloaded.
    #[error("{id}: {message}")]
    Hub {
        /// The model id (`org/name`).
        id: String,
        /// What went wrong.
        message: String,
    },
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, index, registry) is not valid JSON or has a field of the wrong type.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde reported (it names the line, column and field).
        message: String,
    },
    /// A configuration field is missing, out of range or inconsistent with another field.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The `config.json` (or other configuration file).
        path: PathBuf,
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The checkpoint's `model_type` is not one this crate implements.
    #[error("{path}: model_type `{model_type}` is not supported{hint}")]
    UnsupportedArchitecture {
        /// The `config.json`.
        path: PathBuf,
        /// The `model_type` found there.
        model_type: String,
        /// A suggestion (for example the text-only alternative of a vision-language model).
        hint: String,
    },
    /// A weights file is malformed: a bad header, offsets past the end of the file, a bad dtype.
    #[error("{path}: {message}")]
    InvalidWeights {
        /// The `.safetensors` (or `.gguf`) file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("{path}: missing tensor `{tensor}` (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// The Hugging Face name of the tensor.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// The checkpoint holds tensors this architecture does not use.
    #[error("{path}: unexpected tensor(s) not used by the architecture: {tensors:?}")]
    UnexpectedTensors {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// Their names (at most the first few).
        tensors: Vec<String>,
    },
    /// A tensor has another shape than the configuration implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        /// The file that holds the tensor.
        path: PathBuf,
        /// The Hugging Face name of the tensor.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// The requested precision cannot be used on this backend / device.
    #[error("precision {precision} is not supported by backend `{backend}`: {hint}")]
    UnsupportedPrecision {
        /// The precision asked for.
        precision: String,
        /// The backend's name.
        backend: String,
        /// What is possible instead (the facts; the CLI adds which flag to pass).
        hint: String,
    },
    /// The inputs to a forward pass are inconsistent (shapes, cache, lengths).
    #[error("invalid model input: {0}")]
    InvalidInput(String),
    /// An output directory cannot be written: it is one of the command's inputs, a sealed
    /// checkpoint, or it holds a model and replacing it was not asked for.
    #[error("{path}: {message}")]
    Output {
        /// The output directory.
        path: PathBuf,
        /// Which case it is.
        refusal: crate::output::OutputRefusal,
        /// Why it is refused.
        message: String,
    },
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::InvalidWeights {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
