//! Classifiers trained on feature columns.

pub mod logistic_math;
mod logistic_regression;

pub use logistic_math::Family;
pub use logistic_regression::{
    LogisticRegression, LogisticRegressionModel, LogisticRegressionParams,
};
