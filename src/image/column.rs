//! Decoding Arrow columns of file paths or encoded bytes into image columns, as a DataFusion UDF.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Builder, StringArray, StringBuilder, StructArray,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Int32Type};
use datafusion::common::{ScalarValue, exec_err};
use datafusion::functions::core::expr_fn::get_field;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, Expr, ident, lit};

use super::decode::{DecodeLimits, ImageRow, ImageView, decode_image};
use super::problem::{ImageProblem, ProblemKind};
use super::{image_fields, image_type};
use crate::error::{Error, Result};

/// Output type of the decoding UDFs: the image struct plus the error for rows that failed.
pub(crate) fn decoded_type() -> DataType {
    DataType::Struct(decoded_fields())
}

/// The fields of [`decoded_type`], as the array builder needs them.
fn decoded_fields() -> Fields {
    Fields::from(vec![
        Field::new("image", image_type(), true),
        Field::new("error", DataType::Utf8, true),
    ])
}

/// Builds the `{image, error}` struct array from per-row results (None = null input row).
pub(super) fn decoded_array(rows: Vec<DecodedRow>) -> ArrayRef {
    let n = rows.len();
    let mut origin = StringBuilder::with_capacity(n, n * 32);
    let mut height = Int32Builder::with_capacity(n);
    let mut width = Int32Builder::with_capacity(n);
    let mut channels = Int32Builder::with_capacity(n);
    let mut mode = Int32Builder::with_capacity(n);
    let mut data = BinaryBuilder::with_capacity(n, 0);
    let mut error = StringBuilder::new();
    let mut valid = Vec::with_capacity(n);
    for row in rows {
        match row {
            Some(Ok(img)) => {
                origin.append_value(&img.origin);
                height.append_value(img.height as i32);
                width.append_value(img.width as i32);
                channels.append_value(img.channels as i32);
                mode.append_value(img.mode);
                data.append_value(&img.data);
                error.append_null();
                valid.push(true);
            }
            other => {
                origin.append_null();
                height.append_value(0);
                width.append_value(0);
                channels.append_value(0);
                mode.append_value(0);
                data.append_value([]);
                match other {
                    Some(Err(problem)) => error.append_value(problem.to_string()),
                    _ => error.append_value(null_input().to_string()),
                }
                valid.push(false);
            }
        }
    }
    let image = StructArray::new(
        image_fields(),
        vec![
            Arc::new(origin.finish()) as ArrayRef,
            Arc::new(height.finish()),
            Arc::new(width.finish()),
            Arc::new(channels.finish()),
            Arc::new(mode.finish()),
            Arc::new(data.finish()),
        ],
        Some(NullBuffer::from(valid)),
    );
    Arc::new(StructArray::new(
        decoded_fields(),
        vec![Arc::new(image) as ArrayRef, Arc::new(error.finish())],
        None,
    ))
}

/// Decodes a column of encoded images inside the query (arguments: the bytes and the origin to
/// record), one record batch at a time, so memory stays O(batch).
///
/// Marked volatile (it is expensive): the optimiser must neither duplicate it into a
/// pushed-down filter nor evaluate it twice.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DecodeImageUdf {
    limits: DecodeLimits,
    signature: Signature,
}

impl DecodeImageUdf {
    fn new(limits: DecodeLimits) -> Self {
        DecodeImageUdf {
            limits,
            signature: Signature::any(2, Volatility::Volatile),
        }
    }
}

impl ScalarUDFImpl for DecodeImageUdf {
    fn name(&self) -> &str {
        "decode_image"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(decoded_type())
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let n = args.number_rows;
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let origins = string_array(&arrays[1], "origin")?;
            let rows = decode_bytes(&arrays[0], origins.iter(), &self.limits)?;
            debug_assert_eq!(rows.len(), n);
            Ok(ColumnarValue::Array(decoded_array(rows)))
        })
    }
}

/// One decoded row: None where the input was null.
pub(super) type DecodedRow = Option<std::result::Result<ImageRow, ImageProblem>>;

/// The reason of a row whose input is null.
fn null_input() -> ImageProblem {
    ImageProblem::new(ProblemKind::NullInput, "the value is null")
}

/// Decodes a binary array of encoded images in parallel, one result per row (None = null).
fn decode_bytes<'a>(
    bytes: &ArrayRef,
    origins: impl Iterator<Item = Option<&'a str>>,
    limits: &DecodeLimits,
) -> datafusion::common::Result<Vec<DecodedRow>> {
    let items: Vec<(Option<&[u8]>, &str)> = binary_values(bytes)?
        .into_iter()
        .zip(origins)
        .map(|(b, o)| (b, o.unwrap_or("")))
        .collect();
    Ok(rayon_map(&items, |(b, o)| {
        b.map(|b| decode_image(b, o, limits))
    }))
}

/// Decodes a binary array of encoded images into an image struct array (null where the bytes
/// are null or undecodable), e.g. for a SQL function called on raw file contents.
pub fn decode_binary_array(
    bytes: &ArrayRef,
    limits: &DecodeLimits,
) -> datafusion::common::Result<ArrayRef> {
    let rows = decode_bytes(bytes, std::iter::repeat(None), limits)?;
    let decoded = decoded_array(rows);
    Ok(Arc::clone(decoded.as_struct().column(0)))
}

/// An image column from what other engines hand over: an `ImageSchema` struct as Spark's
/// `image` source or a Spark/pyarrow round trip gives it (fields matched by name; any
/// nullability; Binary, LargeBinary or BinaryView data; any integer sizes), or encoded bytes
/// (Binary, LargeBinary or BinaryView: `binaryFile`'s `content`, Parquet) decoded here, null
/// where undecodable. Anything else is an error naming `column` and what was found.
pub fn image_array(column: &str, input: &ArrayRef, limits: &DecodeLimits) -> Result<ArrayRef> {
    let data_type = input.data_type();
    if *data_type == image_type() {
        return Ok(Arc::clone(input));
    }
    if matches!(
        data_type,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    ) {
        return Ok(decode_binary_array(input, limits)?);
    }
    let expected = "expected an image struct (origin, height, width, nChannels, mode, data) or encoded image bytes";
    let Some(images) = input.as_struct_opt() else {
        return Err(Error::column(
            column,
            format!("{expected}, got {data_type}"),
        ));
    };
    let columns = image_fields()
        .iter()
        .map(|field| {
            let child = images.column_by_name(field.name()).ok_or_else(|| {
                Error::column(
                    column,
                    format!(
                        "{expected}; field `{}` missing in {data_type}",
                        field.name()
                    ),
                )
            })?;
            Ok(datafusion::arrow::compute::cast(child, field.data_type())?)
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    // A row with a null where the image type has none (size, mode, data) is a null image.
    let nulls = columns
        .iter()
        .skip(1)
        .fold(images.logical_nulls(), |acc, c| {
            NullBuffer::union(acc.as_ref(), c.logical_nulls().as_ref())
        });
    Ok(Arc::new(StructArray::try_new(
        image_fields(),
        columns,
        nulls,
    )?))
}

/// Decoding is CPU-bound and independent per image: spread a batch over the rayon pool.
fn rayon_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    items.par_iter().map(f).collect()
}

fn string_array(array: &ArrayRef, what: &str) -> datafusion::common::Result<StringArray> {
    let cast = datafusion::arrow::compute::cast(array, &DataType::Utf8)?;
    match cast.as_string_opt::<i32>() {
        Some(s) => Ok(s.clone()),
        None => exec_err!("{what} must be a string column, got {}", array.data_type()),
    }
}

fn binary_values(array: &ArrayRef) -> datafusion::common::Result<Vec<Option<&[u8]>>> {
    Ok(match array.data_type() {
        DataType::Binary => array.as_binary::<i32>().iter().collect(),
        DataType::LargeBinary => array.as_binary::<i64>().iter().collect(),
        DataType::BinaryView => array.as_binary_view().iter().collect(),
        other => return exec_err!("image bytes must be a binary column, got {other}"),
    })
}

/// `{image, error}` for each row of `bytes` (a Binary, LargeBinary or BinaryView column):
/// the decoded image, or null and the reason ([`ImageProblem`]).
pub(crate) fn decode_expr(bytes: Expr, limits: DecodeLimits) -> Expr {
    ScalarUDF::new_from_impl(DecodeImageUdf::new(limits))
        .call(vec![bytes, lit(ScalarValue::Utf8(None))])
}

/// Whether a column of this type holds encoded images.
pub(crate) fn is_bytes(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

/// Name of the temporary `{image, error}` column the decoding UDF adds.
const DECODED: &str = "__decoded";

/// Decodes a binary column of encoded images (e.g. read from Parquet) into an image column.
///
/// Adds `output_col` (ImageSchema struct, null where decoding failed) and `{output_col}_error`.
/// The struct's `origin` is taken from `origin_col` when given. With `drop_invalid`, rows that
/// fail to decode are dropped instead.
pub fn decode_image_column(
    df: DataFrame,
    input_col: &str,
    output_col: &str,
    origin_col: Option<&str>,
    limits: DecodeLimits,
    drop_invalid: bool,
) -> Result<DataFrame> {
    let schema = df.schema();
    let field = schema
        .field_with_unqualified_name(input_col)
        .map_err(|_| Error::column(input_col, "not found in the DataFrame"))?;
    if !matches!(
        field.data_type(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    ) {
        return Err(Error::column(
            input_col,
            format!("expected a binary column, got {}", field.data_type()),
        ));
    }
    let origin = match origin_col {
        Some(c) => {
            schema
                .field_with_unqualified_name(c)
                .map_err(|_| Error::column(c, "not found in the DataFrame"))?;
            ident(c)
        }
        None => lit(ScalarValue::Utf8(None)),
    };
    let udf = ScalarUDF::new_from_impl(DecodeImageUdf::new(limits));
    let df = df
        .with_column(DECODED, udf.call(vec![ident(input_col), origin]))?
        .with_column(output_col, get_field(ident(DECODED), "image"))?
        .with_column(
            &format!("{output_col}_error"),
            get_field(ident(DECODED), "error"),
        )?
        .drop_columns(&[DECODED])?;
    Ok(if drop_invalid {
        df.filter(ident(output_col).is_not_null())?
    } else {
        df
    })
}

/// `image_error(x)`: why a row has no usable image, in the reasons' words (`<kind>: <detail>`),
/// or NULL where it has one. `x` is encoded bytes (decoded, as a network stage would) or an
/// image struct, ours or Spark's (its fields checked against each other and the limits, no
/// pixel read).
#[derive(Debug, PartialEq, Eq, Hash)]
struct ImageErrorUdf {
    limits: DecodeLimits,
    signature: Signature,
}

impl ScalarUDFImpl for ImageErrorUdf {
    fn name(&self) -> &str {
        "image_error"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let input = &arrays[0];
            let reasons: StringArray = if is_bytes(input.data_type()) {
                decode_bytes(input, std::iter::repeat(None), &self.limits)?
                    .into_iter()
                    .map(|row| match row {
                        Some(Ok(_)) => None,
                        Some(Err(problem)) => Some(problem.to_string()),
                        None => Some(null_input().to_string()),
                    })
                    .collect()
            } else {
                let images = image_array("image_error", input, &self.limits)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                struct_problems(images.as_struct(), &self.limits)
            };
            Ok(ColumnarValue::Array(Arc::new(reasons)))
        })
    }
}

/// Each row's problem as [`struct_image`] finds it (NULL: none).
fn struct_problems(images: &StructArray, limits: &DecodeLimits) -> StringArray {
    (0..images.len())
        .map(|row| {
            struct_image(images, row, limits)
                .err()
                .map(|p| p.to_string())
        })
        .collect()
}

/// Row `row` of an image struct column, its fields checked against each other and `limits`
/// (no pixel read); the problem when it is null or they disagree.
pub(crate) fn struct_image<'a>(
    images: &'a StructArray,
    row: usize,
    limits: &DecodeLimits,
) -> std::result::Result<ImageView<'a>, ImageProblem> {
    if images.is_null(row) {
        return Err(null_input());
    }
    let invalid = |detail| ImageProblem::new(ProblemKind::InvalidStruct, detail);
    let int = |name: &str| {
        images
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int32Type>())
            .map(|a| a.value(row))
            .ok_or_else(|| invalid(format!("image struct has no Int32 field `{name}`")))
    };
    let data = images
        .column_by_name("data")
        .and_then(|c| c.as_binary_opt::<i32>())
        .map(|a| a.value(row))
        .ok_or_else(|| invalid("image struct has no Binary field `data`".into()))?;
    ImageView::from_row(
        int("height")?,
        int("width")?,
        int("nChannels")?,
        int("mode")?,
        data,
        limits,
    )
}

/// The `image_error` SQL function (see [`ImageErrorUdf`]), with the default limits.
pub fn image_error_function() -> ScalarUDF {
    ScalarUDF::new_from_impl(ImageErrorUdf {
        limits: DecodeLimits::default(),
        signature: Signature::any(1, Volatility::Immutable),
    })
}
