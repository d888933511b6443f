//! `BatchTransformer` and `image_array`: a pipeline applied to record batches as other engines
//! hand them over (Spark's image struct with its own nullability and large binary data, or
//! encoded bytes), the path the Python package takes.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int64Array, LargeBinaryArray, RecordBatch, StringArray,
    StructArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
use deep_pipelines::batch::BatchTransformer;
use deep_pipelines::image::{DecodeLimits, image_array, image_type};
use deep_pipelines::prelude::*;

use crate::common;

const FILES: &[&str] = &[
    "test/bag/00018.png",
    "test/sneaker/00009.png",
    "test/coat/00006.png",
];

fn encoded() -> Vec<Vec<u8>> {
    FILES
        .iter()
        .map(|f| std::fs::read(format!("{}/{f}", common::DATA)).unwrap())
        .collect()
}

/// The files' images as our image struct (decoded from their bytes).
fn our_images() -> ArrayRef {
    let bytes: ArrayRef = Arc::new(BinaryArray::from_iter_values(encoded()));
    image_array("content", &bytes, &DecodeLimits::default()).unwrap()
}

/// The same images as Spark's `image` source hands them to Python: every field nullable, sizes
/// as Int64 (a round trip through pandas does that), data as LargeBinary, plus a null row.
fn spark_style_images() -> ArrayRef {
    let ours = our_images();
    let ours = ours.as_struct();
    let fields: Vec<(Arc<Field>, ArrayRef)> = ours
        .fields()
        .iter()
        .zip(ours.columns())
        .map(|(f, c)| {
            let t = match f.data_type() {
                DataType::Int32 => DataType::Int64,
                DataType::Binary => DataType::LargeBinary,
                other => other.clone(),
            };
            let mut values = cast(c, &t).unwrap();
            // One more row: a null image.
            values = datafusion::arrow::compute::concat(&[
                values.as_ref(),
                datafusion::arrow::array::new_null_array(&t, 1).as_ref(),
            ])
            .unwrap();
            (Arc::new(Field::new(f.name(), t, true)), values)
        })
        .collect();
    let n = ours.len() + 1;
    let nulls = datafusion::arrow::buffer::NullBuffer::from_iter((0..n).map(|i| i < n - 1));
    let (fields, columns): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    Arc::new(StructArray::new(Fields::from(fields), columns, Some(nulls)))
}

fn batch(column: &str, images: ArrayRef) -> RecordBatch {
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..images.len() as i64));
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(column, images.data_type().clone(), true),
    ]);
    RecordBatch::try_new(Arc::new(schema), vec![ids, images]).unwrap()
}

fn features(out: &RecordBatch) -> Vec<Option<Vec<f32>>> {
    let list = out.column_by_name("features").unwrap().as_fixed_size_list();
    (0..list.len())
        .map(|r| {
            (!list.is_null(r)).then(|| {
                let v = list.value(r);
                v.as_primitive::<datafusion::arrow::datatypes::Float32Type>()
                    .values()
                    .to_vec()
            })
        })
        .collect()
}

#[test]
fn spark_style_structs_and_bytes_give_the_features_of_our_image_struct() {
    let featurizer = BatchTransformer::from_stage(Arc::new(DeepImageFeaturizer::new()));
    assert_eq!(featurizer.image_col(), Some("image"));
    let ours = features(&featurizer.transform(batch("image", our_images())).unwrap());
    let spark = featurizer
        .transform(batch("image", spark_style_images()))
        .unwrap();
    assert_eq!(spark.num_rows(), 4);
    assert_eq!(spark.column_by_name("id").unwrap().len(), 4);
    let spark = features(&spark);
    assert!(spark[3].is_none(), "a null image gives null features");

    let mut bytes: Vec<Option<Vec<u8>>> = encoded().into_iter().map(Some).collect();
    bytes.push(Some(b"not an image".to_vec()));
    let large: ArrayRef = Arc::new(LargeBinaryArray::from_iter(
        bytes.iter().map(|b| b.as_deref()),
    ));
    let from_bytes = BatchTransformer::from_stage(Arc::new(
        DeepImageFeaturizer::new().with_input_col("content"),
    ));
    let from_bytes = features(&from_bytes.transform(batch("content", large)).unwrap());
    assert!(
        from_bytes[3].is_none(),
        "undecodable bytes give null features"
    );
    for row in 0..3 {
        let want = ours[row].as_ref().unwrap();
        for got in [&spark[row], &from_bytes[row]] {
            assert_eq!(common::max_abs_diff(got.as_ref().unwrap(), want), 0.0);
        }
    }
}

#[test]
fn the_output_schema_is_known_before_any_row() {
    let featurizer = BatchTransformer::from_stage(Arc::new(DeepImageFeaturizer::new()));
    let input = batch("image", spark_style_images()).schema();
    let out = featurizer.output_schema(input).unwrap();
    let names: Vec<&str> = out.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "image", "features"]);
    assert_eq!(out.field(1).data_type(), &image_type());
}

#[test]
fn what_is_not_an_image_column_is_an_error_naming_it() {
    let featurizer = BatchTransformer::from_stage(Arc::new(DeepImageFeaturizer::new()));
    let strings: ArrayRef = Arc::new(StringArray::from(vec!["a.png"]));
    let err = featurizer
        .transform(batch("image", strings))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column `image`") && err.contains("Utf8"),
        "{err}"
    );
    let err = featurizer
        .transform(batch("pictures", our_images()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`image`") && err.contains("not found"),
        "{err}"
    );
    let partial = StructArray::from(vec![(
        Arc::new(Field::new("height", DataType::Int32, false)),
        Arc::new(datafusion::arrow::array::Int32Array::from(vec![1])) as ArrayRef,
    )]);
    let err = image_array(
        "img",
        &(Arc::new(partial) as ArrayRef),
        &DecodeLimits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("column `img`") && err.contains("`origin` missing"),
        "{err}"
    );
}

#[test]
fn a_saved_pipeline_applies_to_batches_as_its_dataframe_transform_does() {
    let model = PipelineModel::load(format!(
        "{}/tests/fixtures/saved_v0_1/pipeline_model",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let runner = BatchTransformer::new(model.clone());
    let labels: ArrayRef = Arc::new(StringArray::from(vec!["bag", "sneaker", "coat"]));
    let images = our_images();
    let schema = Schema::new(vec![
        Field::new("label", DataType::Utf8, true),
        Field::new("image", image_type(), true),
    ]);
    let input = RecordBatch::try_new(Arc::new(schema), vec![labels, images]).unwrap();
    let out = runner.transform(input.clone()).unwrap();
    let ctx = SessionContext::new();
    let expected = futures_collect(model.transform(ctx.read_batch(input).unwrap()).unwrap());
    for name in ["prediction", "probability", "predictedLabel"] {
        assert_eq!(
            out.column_by_name(name).unwrap().to_data(),
            expected.column_by_name(name).unwrap().to_data(),
            "{name}"
        );
    }
}

fn futures_collect(df: DataFrame) -> RecordBatch {
    deep_pipelines::batch::run_blocking("test", async move {
        let schema = Arc::clone(df.schema().inner());
        let batches = df.collect().await?;
        Ok(datafusion::arrow::compute::concat_batches(
            &schema, &batches,
        )?)
    })
    .unwrap()
}
