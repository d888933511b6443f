//! Unit tests of the predictor's decoding.

use super::*;

#[test]
fn top_k_orders_by_value_then_index() {
    assert_eq!(top_k_indices(&[0.1, 0.5, 0.2, 0.5], 3), vec![1, 3, 2]);
}

#[test]
fn softmax_sums_to_one_and_survives_large_logits() {
    let p = softmax(&[1000.0, 1000.0, -1000.0]);
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert!((p[0] - 0.5).abs() < 1e-6 && p[2] == 0.0);
}
