//! Classifiers: logistic regression on feature columns, and fine-tuned networks on images.

mod deep_image_classifier;
pub mod logistic_math;
mod logistic_regression;
mod trunk_cache;

pub use deep_image_classifier::{
    DeepImageClassifier, DeepImageClassifierModel, DeepImageClassifierParams, FitFacts, Progress,
};
pub use logistic_math::Family;
pub use logistic_regression::{
    LogisticRegression, LogisticRegressionModel, LogisticRegressionParams,
};

use crate::pipeline::PipelineModel;

/// Where a fitted pipeline's classifier (a logistic regression or a fine-tuned network) writes
/// its outputs, and the label column it was fitted on.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierColumns {
    pub prediction_col: String,
    pub probability_col: String,
    pub label_col: String,
}

/// The columns of `model`'s first classifier stage, if it has one.
pub fn classifier_columns(model: &PipelineModel) -> Option<ClassifierColumns> {
    model.stages().iter().find_map(|stage| {
        let any = stage.as_any();
        if let Some(lr) = any.downcast_ref::<LogisticRegressionModel>() {
            let p = lr.params();
            return Some(ClassifierColumns {
                prediction_col: p.prediction_col.clone(),
                probability_col: p.probability_col.clone(),
                label_col: p.label_col.clone(),
            });
        }
        let p = any.downcast_ref::<DeepImageClassifierModel>()?.params();
        Some(ClassifierColumns {
            prediction_col: p.prediction_col.clone(),
            probability_col: p.probability_col.clone(),
            label_col: p.label_col.clone(),
        })
    })
}
