//! A build without the `onnx` feature: a model file is a clear error naming the feature.

use deep_pipelines::models::load_model_file;

#[test]
fn a_model_file_needs_the_onnx_feature() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/onnx/cnn_bn.onnx"
    );
    let e = load_model_file(std::path::Path::new(file), "", "cpu")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`onnx` feature") && e.contains("cnn_bn"), "{e}");
}
