//! Unit tests of the featurizer's params and counter.

use super::*;
use crate::network_stage::NetworkStage;
use crate::params::ParamMap;
use crate::stage::Transformer;

/// Setters parse the names serde writes, so saved JSON and `ParamMap`s keep today's strings.
#[test]
fn choice_names_are_the_serde_names() {
    fn check<C: Choice + Serialize + serde::de::DeserializeOwned + std::fmt::Debug + PartialEq>() {
        for name in C::NAMES {
            let value = C::from_name(name).unwrap();
            assert_eq!(serde_json::to_value(value).unwrap(), *name);
            assert_eq!(serde_json::from_value::<C>((*name).into()).unwrap(), value);
        }
    }
    check::<FeatureMode>();
    check::<OutputType>();
}

#[test]
fn a_rejected_setter_value_fails_validation_until_a_valid_one_replaces_it() {
    let bad = DeepImageFeaturizer::new().with_feature_mode("mean");
    let err = bad.params.validate().unwrap_err().to_string();
    assert!(
        err.contains("featureMode` of DeepImageFeaturizer") && err.contains("`mean`"),
        "{err}"
    );
    let fixed = bad
        .with_feature_mode(FeatureMode::Flattened)
        .with_output_type("float16");
    assert!(fixed.params.validate().is_ok());
    assert_eq!(fixed.params.feature_mode, FeatureMode::Flattened);
    assert_eq!(fixed.params.output_type, OutputType::Float16);
}

#[test]
fn param_json_keeps_its_strings() {
    let params = DeepImageFeaturizerParams {
        feature_mode: FeatureMode::Flattened,
        output_type: OutputType::Float16,
        ..Default::default()
    };
    let json = params.to_json();
    assert_eq!(json["featureMode"], "flattened");
    assert_eq!(json["outputType"], "float16");
    let back: DeepImageFeaturizerParams = serde_json::from_value(json).unwrap();
    assert_eq!(back, params);
}

#[test]
fn clones_and_copies_share_the_forward_count_and_a_new_stage_starts_at_zero() {
    let stage = DeepImageFeaturizer::new();
    let copy = stage.copy_with(&ParamMap::new()).unwrap();
    let copy = copy.as_any().downcast_ref::<DeepImageFeaturizer>().unwrap();
    stage.clone().metrics.add_images(2);
    copy.metrics.add_images(3);
    assert_eq!(stage.images_processed(), 5);
    assert_eq!(DeepImageFeaturizer::new().images_processed(), 0);
}
