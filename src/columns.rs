//! Looking up a DataFrame's columns with errors that name the column and list those there are:
//! what every stage checks before it plans.

use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::DataFrame;

use crate::error::{Error, Result};

/// The type of column `name` of `df`; the error lists the columns there are.
pub(crate) fn require_column(df: &DataFrame, name: &str) -> Result<DataType> {
    df.schema()
        .field_with_unqualified_name(name)
        .map(|f| f.data_type().clone())
        .map_err(|_| {
            let names: Vec<&str> = df
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect();
            Error::column(
                name,
                format!("not found in the DataFrame (columns: {})", names.join(", ")),
            )
        })
}
