//! One error type for the library: every variant says *what* (column, param, file, tensor) failed.

use datafusion::error::DataFusionError;

/// Errors returned by deep-pipelines.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stage parameter was set to a value outside its valid range.
    #[error("invalid param `{param}` of {stage}: {message}")]
    InvalidParam {
        stage: String,
        param: String,
        message: String,
    },
    /// A column is missing or has the wrong type.
    #[error("column `{column}`: {message}")]
    Column { column: String, message: String },
    /// A model could not be found, loaded or run.
    #[error("model `{model}`: {message}")]
    Model { model: String, message: String },
    /// Fitting failed on the given data (bad labels, no rows, ...).
    #[error("fit failed: {0}")]
    Fit(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Saved pipeline / model metadata is malformed.
    #[error("persistence: {0}")]
    Persistence(String),
    /// An error from the DataFusion engine.
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
}

impl Error {
    pub(crate) fn param(stage: &str, param: &str, message: impl Into<String>) -> Self {
        Error::InvalidParam {
            stage: stage.to_string(),
            param: param.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn column(column: &str, message: impl Into<String>) -> Self {
        Error::Column {
            column: column.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        Error::DataFusion(DataFusionError::ArrowError(Box::new(e), None))
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
