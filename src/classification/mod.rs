//! Classifiers trained on feature columns.

pub mod logistic_math;
mod logistic_regression;

pub use logistic_math::Family;
pub(crate) use logistic_regression::{CLASS_LOGISTIC_REGRESSION, CLASS_LOGISTIC_REGRESSION_MODEL};
pub use logistic_regression::{
    LogisticRegression, LogisticRegressionModel, LogisticRegressionParams,
};
