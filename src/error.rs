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
    /// A column is missing or has the wrong type (`stage`: the uid of the stage that needs it).
    #[error("{}column `{column}`: {message}", .stage.as_ref().map(|s| format!("{s}: ")).unwrap_or_default())]
    Column {
        stage: Option<String>,
        column: String,
        message: String,
    },
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
            stage: None,
            column: column.to_string(),
            message: message.into(),
        }
    }

    /// Names the stage in a column error that does not name one yet.
    pub(crate) fn in_stage(self, uid: &str) -> Self {
        match self {
            Error::Column {
                stage: None,
                column,
                message,
            } => Error::Column {
                stage: Some(uid.to_string()),
                column,
                message,
            },
            other => other,
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

/// Runs one batch of a UDF, turning a panic into an error for that query: a bug or a bad input
/// that panics deep in a decoder or kernel fails the job cleanly instead of aborting the process.
pub(crate) fn catch_panics<T>(
    what: &str,
    f: impl FnOnce() -> datafusion::common::Result<T>,
) -> datafusion::common::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(DataFusionError::Execution(format!(
            "{what} panicked: {}",
            panic_message(payload.as_ref())
        )))
    })
}

/// The message a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_execution_error() {
        let err = catch_panics::<()>("featurize", || panic!("bad kernel")).unwrap_err();
        assert!(
            err.to_string().contains("featurize panicked: bad kernel"),
            "{err}"
        );
        assert_eq!(catch_panics("ok", || Ok(3)).unwrap(), 3);
    }
}
