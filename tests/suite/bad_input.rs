//! Broken files never crash a job: null image + readable error, or dropped with drop_invalid.

use std::io::Cursor;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use deep_pipelines::prelude::*;

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 2) as u8, 200]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

fn write_fixture_dir(dir: &Path) {
    let jpeg = jpeg_bytes(64, 48);
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::fs::write(dir.join("notes.png"), b"this is a text file, not a PNG\n").unwrap();
    std::fs::write(dir.join("valid.png"), png_bytes(40, 30)).unwrap();
}

async fn collect(df: DataFrame) -> RecordBatch {
    let batches = df.collect().await.unwrap();
    datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let c = batch.column_by_name(name).unwrap();
    let c =
        datafusion::arrow::compute::cast(c, &datafusion::arrow::datatypes::DataType::Utf8).unwrap();
    c.as_string::<i32>()
        .iter()
        .map(|s| s.map(String::from))
        .collect()
}

#[tokio::test]
async fn broken_files_give_null_images_with_errors_and_valid_rows_get_features() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture_dir(dir.path());
    let ctx = SessionContext::new();
    let images = read_images(&ctx, dir.path(), ReadImagesOptions::default()).unwrap();
    let featurized = DeepImageFeaturizer::new().transform(images).unwrap();
    let batch = collect(
        featurized
            .sort(vec![col("origin").sort(true, false)])
            .unwrap(),
    )
    .await;
    assert_eq!(batch.num_rows(), 4);

    let origins = strings(&batch, "origin");
    let errors = strings(&batch, "image_error");
    let image = batch.column_by_name("image").unwrap();
    let features = batch
        .column_by_name("features")
        .unwrap()
        .as_fixed_size_list();
    for (row, origin) in origins.iter().enumerate() {
        let origin = origin.as_deref().unwrap();
        let error = errors[row].as_deref();
        println!("{origin}: {error:?}");
        if origin.ends_with("valid.png") {
            assert!(image.is_valid(row) && error.is_none());
            assert!(features.is_valid(row));
            assert_eq!(features.value(row).len(), 1280);
        } else {
            assert!(image.is_null(row), "{origin} should have a null image");
            assert!(features.is_null(row), "{origin} should have null features");
            let error = error.unwrap_or_else(|| panic!("{origin} has no error message"));
            assert!(!error.is_empty());
        }
    }
    let error_of = |name: &str| {
        let row = origins
            .iter()
            .position(|o| o.as_deref().unwrap().ends_with(name))
            .unwrap();
        errors[row].clone().unwrap()
    };
    assert_eq!(error_of("empty.png"), "empty: 0 bytes");
    assert!(error_of("notes.png").starts_with("unsupported format: "));
    assert!(error_of("truncated.jpg").starts_with("truncated: "));
}

#[tokio::test]
async fn drop_invalid_keeps_only_decodable_images() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture_dir(dir.path());
    let ctx = SessionContext::new();
    let options = ReadImagesOptions::default().with_drop_invalid(true);
    let batch = collect(read_images(&ctx, dir.path(), options).unwrap()).await;
    assert_eq!(batch.num_rows(), 1);
    assert!(
        strings(&batch, "origin")[0]
            .as_deref()
            .unwrap()
            .ends_with("valid.png")
    );
}

#[tokio::test]
async fn decode_image_column_handles_bytes_from_parquet_like_tables() {
    use datafusion::arrow::array::{BinaryArray, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("bytes", DataType::Binary, true),
    ]));
    let png = png_bytes(8, 6);
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["a.png", "b.png", "c.png"])),
            Arc::new(BinaryArray::from(vec![
                Some(png.as_slice()),
                Some(&b"junk"[..]),
                None,
            ])),
        ],
    )
    .unwrap();
    let ctx = SessionContext::new();
    let df = ctx.read_batch(batch).unwrap();
    let limits = deep_pipelines::image::DecodeLimits::default();
    let out =
        decode_image_column(df.clone(), "bytes", "image", Some("path"), limits, false).unwrap();
    let out = collect(out).await;
    let image = out.column_by_name("image").unwrap().as_struct();
    assert!(image.is_valid(0) && image.is_null(1) && image.is_null(2));
    assert_eq!(
        strings(&out, "image_error")[1]
            .as_deref()
            .map(|e| e.starts_with("unsupported format: ")),
        Some(true)
    );
    assert_eq!(
        image
            .column_by_name("width")
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Int32Type>()
            .value(0),
        8
    );
    assert_eq!(
        image
            .column_by_name("mode")
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Int32Type>()
            .value(0),
        16
    );

    let err = decode_image_column(df, "path", "image", None, limits, false).unwrap_err();
    assert!(err.to_string().contains("`path`"), "{err}");
}

#[tokio::test]
async fn featurizer_rejects_missing_and_wrong_columns() {
    let ctx = SessionContext::new();
    let df = ctx.sql("SELECT 1 AS image, 2 AS other").await.unwrap();
    let err = DeepImageFeaturizer::new()
        .with_input_col("nope")
        .transform(df.clone())
        .unwrap_err();
    assert!(err.to_string().contains("`nope`"), "{err}");
    let err = DeepImageFeaturizer::new().transform(df).unwrap_err();
    assert!(
        err.to_string().contains("expected an image struct"),
        "{err}"
    );
}

#[test]
fn missing_directory_names_the_path() {
    let ctx = SessionContext::new();
    let err = read_images(&ctx, "/no/such/dir", ReadImagesOptions::default()).unwrap_err();
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
}
