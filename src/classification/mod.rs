//! Classifiers: logistic regression on feature columns, and fine-tuned networks on images.

mod deep_image_classifier;
pub mod logistic_math;
mod logistic_regression;
mod trunk_cache;

pub use deep_image_classifier::{
    ClassifierTrunk, DeepImageClassifier, DeepImageClassifierModel, DeepImageClassifierParams,
    FitFacts, Progress,
};
pub use logistic_math::Family;
pub use logistic_regression::{
    LogisticRegression, LogisticRegressionModel, LogisticRegressionParams,
};

pub use crate::stage::ClassifierColumns;
