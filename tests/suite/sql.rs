//! Models as SQL functions: a fitted pipeline's SQL predictions equal `PipelineModel::transform`'s
//! row for row, on image structs and on raw bytes; undecodable input gives NULL; EXPLAIN names
//! the network.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BinaryArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Schema};
use deep_pipelines::prelude::*;
use deep_pipelines::sql::register_featurizer;

/// A folder with a sample of the test images (two classes) plus one file that is not an image.
pub(crate) fn image_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for class in ["bag", "sneaker"] {
        let target = dir.path().join(class);
        std::fs::create_dir_all(&target).unwrap();
        let source = format!("{}/test/{class}", common::DATA);
        let mut files: Vec<_> = std::fs::read_dir(&source)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files.iter().take(12) {
            std::fs::copy(file, target.join(file.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        dir.path().join("bag/broken.png"),
        b"\x89PNG\r\n\x1a\n truncated",
    )
    .unwrap();
    dir
}

/// origin -> (prediction, probability of the predicted class) from `PipelineModel::transform`.
async fn expected(model: &PipelineModel, images: DataFrame) -> HashMap<String, (f64, f64)> {
    let out = common::collect(model.transform(images).unwrap()).await;
    let origins = out.column_by_name("origin").unwrap().as_string::<i32>();
    let predictions = out
        .column_by_name("prediction")
        .unwrap()
        .as_primitive::<Float64Type>();
    let probabilities = out
        .column_by_name("probability")
        .unwrap()
        .as_fixed_size_list();
    (0..out.num_rows())
        .filter(|&r| predictions.is_valid(r))
        .map(|r| {
            let p = predictions.value(r);
            let probability = probabilities.value(r);
            let probability = probability.as_primitive::<Float64Type>().value(p as usize);
            (origins.value(r).to_string(), (p, probability))
        })
        .collect()
}

fn check_rows(batch: &RecordBatch, expected: &HashMap<String, (f64, f64)>, labels: &[String]) {
    let origins = batch.column(0).as_string::<i32>();
    let result = batch.column(1).as_struct();
    let prediction = result.column(0).as_primitive::<Float64Type>();
    let label = result.column(1).as_string::<i32>();
    let probability = result.column(2).as_primitive::<Float64Type>();
    let mut checked = 0;
    for r in 0..batch.num_rows() {
        let origin = origins.value(r);
        if origin.ends_with("broken.png") {
            assert!(result.is_null(r), "undecodable file must give NULL");
            continue;
        }
        let (p, prob) = expected[origin];
        assert_eq!(prediction.value(r), p, "{origin}");
        assert_eq!(label.value(r), labels[p as usize], "{origin}");
        assert!((probability.value(r) - prob).abs() < 1e-6, "{origin}");
        checked += 1;
    }
    assert_eq!(checked, expected.len());
}

#[tokio::test]
async fn sql_predictions_equal_transform_for_every_row() {
    let ctx = SessionContext::new();
    let model = common::fitted_example().await;
    let labels = model
        .stage::<StringIndexerModel>()
        .unwrap()
        .labels()
        .to_vec();
    let folder = image_folder();
    deep_pipelines::register_images_table(
        &ctx,
        "images",
        folder.path(),
        ReadImagesOptions::default(),
    )
    .unwrap();
    deep_pipelines::register_model(&ctx, "classify", &model).unwrap();

    let images = ctx.table("images").await.unwrap();
    let expected = expected(&model, images).await;
    assert_eq!(expected.len(), 24);

    let sql = "SELECT origin, classify(image) AS c FROM images ORDER BY origin";
    let batch = common::collect(ctx.sql(sql).await.unwrap()).await;
    assert_eq!(batch.num_rows(), 25);
    check_rows(&batch, &expected, &labels);

    // Field access and filtering on the result, as a user would write it.
    let sql = "SELECT origin, classify(image)['label'] AS label FROM images \
               WHERE image IS NOT NULL ORDER BY origin";
    let batch = common::collect(ctx.sql(sql).await.unwrap()).await;
    assert_eq!(batch.num_rows(), 24);

    // EXPLAIN names the network behind the function.
    let plan = common::collect(
        ctx.sql("EXPLAIN SELECT classify(image) FROM images")
            .await
            .unwrap(),
    )
    .await;
    let text: Vec<String> = plan
        .column(1)
        .as_string::<i32>()
        .iter()
        .flatten()
        .map(String::from)
        .collect();
    let text = text.join("\n");
    assert!(
        text.contains("classify[") && text.contains("DeepImageFeaturizer(EfficientNetLite0)"),
        "{text}"
    );
}

#[tokio::test]
async fn sql_function_takes_raw_encoded_bytes() {
    let ctx = SessionContext::new();
    let model = common::fitted_example().await;
    let labels = model
        .stage::<StringIndexerModel>()
        .unwrap()
        .labels()
        .to_vec();
    let folder = image_folder();
    let images = read_images(&ctx, folder.path(), ReadImagesOptions::default()).unwrap();
    let expected = expected(&model, images).await;

    // A table of (origin, content) as Parquet of file contents would give.
    let mut files: Vec<_> = walk(folder.path());
    files.sort();
    let origins: StringArray = files
        .iter()
        .map(|p| Some(p.to_string_lossy().into_owned()))
        .collect();
    let contents: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let contents = BinaryArray::from_iter_values(contents.iter());
    let schema = Arc::new(Schema::new(vec![
        Field::new("origin", DataType::Utf8, true),
        Field::new("content", DataType::Binary, true),
    ]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(origins), Arc::new(contents)]).unwrap();
    ctx.register_batch("files", batch).unwrap();
    deep_pipelines::register_model(&ctx, "classify", &model).unwrap();
    let sql = "SELECT origin, classify(content) FROM files ORDER BY origin";
    let batch = common::collect(ctx.sql(sql).await.unwrap()).await;
    assert_eq!(batch.num_rows(), 25);
    check_rows(&batch, &expected, &labels);

    let err = ctx
        .sql("SELECT classify(origin) FROM files")
        .await
        .map(|df| df.schema().clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected an image struct"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn sql_featurizer_returns_the_transformers_features() {
    let ctx = SessionContext::new();
    let folder = image_folder();
    deep_pipelines::register_images_table(
        &ctx,
        "images",
        folder.path(),
        ReadImagesOptions::default(),
    )
    .unwrap();
    let featurizer = DeepImageFeaturizer::new();
    register_featurizer(&ctx, "features_of", &featurizer).unwrap();
    let sql = ctx
        .sql("SELECT origin, features_of(image) AS f FROM images ORDER BY origin")
        .await
        .unwrap();
    let via_sql = common::collect(sql).await;
    let direct = featurizer
        .transform(ctx.table("images").await.unwrap())
        .unwrap()
        .sort(vec![col("origin").sort(true, false)])
        .unwrap();
    let direct = common::collect(direct).await;
    let a = via_sql.column(1).as_fixed_size_list();
    let b = direct
        .column_by_name("features")
        .unwrap()
        .as_fixed_size_list();
    assert_eq!(a.len(), 25);
    assert_eq!(a.value_length(), 1280);
    for r in 0..a.len() {
        assert_eq!(a.is_null(r), b.is_null(r));
        if a.is_null(r) {
            continue;
        }
        let (x, y) = (a.value(r), b.value(r));
        let (x, y) = (
            x.as_primitive::<Float32Type>(),
            y.as_primitive::<Float32Type>(),
        );
        let diff = x
            .values()
            .iter()
            .zip(y.values())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(diff <= 1e-5, "row {r}: features differ by {diff}");
    }
}
