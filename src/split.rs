//! [`random_split`]: Spark's `randomSplit`, deterministic for a seed.
//!
//! Each row gets a uniform number in [0, 1) from a seeded hash of its key columns, and split `i`
//! keeps the rows whose number falls in its share of [0, 1). Unlike a per-partition random
//! stream, the result does not depend on partitioning or row order; identical key values land in
//! the same split.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident, lit};

use crate::error::{Error, Result};

const STAGE: &str = "randomSplit";
const KEY: &str = "__split_key";

/// Splits `df` by `weights` (normalised to sum 1), keyed on every scalar column (strings,
/// numbers, booleans, dates; not structs, lists or binaries, which would force e.g. images to
/// be decoded just to be hashed).
pub fn random_split(df: DataFrame, weights: &[f64], seed: u64) -> Result<Vec<DataFrame>> {
    let keys: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .filter(|f| {
            !f.data_type().is_nested()
                && !matches!(
                    f.data_type(),
                    DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                )
        })
        .map(|f| f.name().clone())
        .collect();
    if keys.is_empty() {
        return Err(Error::param(
            STAGE,
            "keyCols",
            "the DataFrame has no scalar column to key the split on; use random_split_by",
        ));
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    random_split_by(df, weights, seed, &keys)
}

/// [`random_split`] keyed on the given columns (e.g. a unique id or the file path).
pub fn random_split_by(
    df: DataFrame,
    weights: &[f64],
    seed: u64,
    key_cols: &[&str],
) -> Result<Vec<DataFrame>> {
    if weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(Error::param(
            STAGE,
            "weights",
            format!("must be finite and >= 0, got {weights:?}"),
        ));
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(Error::param(STAGE, "weights", "must not all be zero"));
    }
    for c in key_cols {
        crate::columns::require_column(&df, c)?;
    }
    if key_cols.is_empty() {
        return Err(Error::param(
            STAGE,
            "keyCols",
            "must name at least one column",
        ));
    }
    let udf = ScalarUDF::new_from_impl(SplitKeyUdf {
        seed,
        signature: Signature::variadic_any(Volatility::Immutable),
    });
    let keyed = df.with_column(KEY, udf.call(key_cols.iter().map(|c| ident(*c)).collect()))?;
    let mut splits = Vec::with_capacity(weights.len());
    let mut lower = 0.0;
    for (i, w) in weights.iter().enumerate() {
        let upper = if i + 1 == weights.len() {
            1.0
        } else {
            lower + w / total
        };
        let part = keyed
            .clone()
            .filter(ident(KEY).gt_eq(lit(lower)).and(ident(KEY).lt(lit(upper))))?
            .drop_columns(&[KEY])?;
        splits.push(part);
        lower = upper;
    }
    Ok(splits)
}

/// Seeded hash of the key columns' row encoding -> uniform f64 in [0, 1).
#[derive(Debug, PartialEq, Eq, Hash)]
struct SplitKeyUdf {
    seed: u64,
    signature: Signature,
}

fn uniform(seed: u64, bytes: &[u8]) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // murmur3 finaliser: spreads FNV's weak low bits.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl ScalarUDFImpl for SplitKeyUdf {
    fn name(&self) -> &str {
        "split_key"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays: Vec<ArrayRef> = ColumnarValue::values_to_arrays(&args.args)?;
            let fields = arrays
                .iter()
                .map(|a| SortField::new(a.data_type().clone()))
                .collect();
            let rows = RowConverter::new(fields)?.convert_columns(&arrays)?;
            let values: Float64Array = (0..rows.num_rows())
                .map(|i| Some(uniform(self.seed, rows.row(i).as_ref())))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(values)))
        })
    }
}
