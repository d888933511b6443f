//! The integration tests, one module per subject, in one test binary: every test binary links
//! burn and DataFusion (about 90 s of release build each on 2 cores), so one binary instead of
//! eleven is most of what a cold CI saves on our own crate. Tests may run concurrently: nothing
//! here asserts on process-wide state (network forward counts are per stage).

mod common;

mod architecture;
mod bad_input;
mod batch;
mod bounded_input;
mod cli;
mod decode_once;
mod efficientnet_parity;
mod fine_tune;
#[cfg(feature = "wgpu")]
mod gpu;
mod hostile_input;
mod logistic_sklearn_parity;
mod model_zoo;
#[cfg(feature = "onnx")]
mod onnx;
mod own_stage;
mod persistence;
mod pipeline_semantics;
mod readme;
mod saved_v0_1;
mod sql;
mod tuning;
