//! Work per row, counted: the image folder scan decodes each file once whatever image columns a
//! plan keeps (none when it keeps none); a model called from SQL runs once per row whatever
//! fields of its result a query reads; a network stage's counters say what it did; a forward pass
//! the device cannot allocate is retried with half the batch.

use crate::common;
use crate::hostile_input::user_manifest;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::{Device, Tensor};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Float32Type;
use deep_pipelines::models::{ImageNetwork, register_network};
use deep_pipelines::prelude::*;

/// 12 images of each of two classes and one file that is not an image: 25 rows.
use crate::sql::image_folder as folder;

/// Rows of `sql` on table `images` (the folder, read with `options`), and files the scan read.
async fn rows_and_reads(
    ctx: &SessionContext,
    options: &ReadImagesOptions,
    sql: &str,
) -> (usize, u64) {
    let before = options.metrics().snapshot().files_read();
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let rows = batches.iter().map(|b| b.num_rows()).sum();
    (rows, options.metrics().snapshot().files_read() - before)
}

#[tokio::test]
async fn the_folder_scan_decodes_each_file_once_and_only_when_pixels_are_read() {
    let dir = folder();
    let ctx = SessionContext::new();
    // Two partitions of 4-row batches: several batches and partitions per query.
    let options = ReadImagesOptions::default()
        .with_label_from_folder(true)
        .with_num_partitions(2)
        .with_batch_rows(4);
    deep_pipelines::register_images_table(&ctx, "images", dir.path(), options.clone()).unwrap();

    // Image and error kept: each file decoded once (DataFusion 55 would decode a struct-valued
    // UDF once per field read).
    let (rows, reads) = rows_and_reads(
        &ctx,
        &options,
        "SELECT origin, image, image_error FROM images",
    )
    .await;
    assert_eq!((rows, reads), (25, 25));
    let (rows, reads) = rows_and_reads(
        &ctx,
        &options,
        "SELECT image.width, image_error FROM images WHERE image_error IS NULL",
    )
    .await;
    assert_eq!((rows, reads), (24, 25));

    // Neither read: no file opened.
    for sql in [
        "SELECT origin, label FROM images",
        "SELECT count(*) FROM images",
        "SELECT label, count(*) FROM images GROUP BY label",
    ] {
        let (_, reads) = rows_and_reads(&ctx, &options, sql).await;
        assert_eq!(reads, 0, "{sql}");
    }
    let (rows, reads) = rows_and_reads(&ctx, &options, "SELECT origin FROM images").await;
    assert_eq!((rows, reads), (25, 0));

    // The DataFrame API, through a network stage that also keeps `image_error`.
    let df = read_images(&ctx, dir.path(), options.clone()).unwrap();
    let before = options.metrics().snapshot();
    let out = DeepImageFeaturizer::new()
        .with_error_col("reason")
        .transform(df)
        .unwrap()
        .select_columns(&["origin", "image_error", "reason", "features"])
        .unwrap();
    let out = common::collect(out).await;
    let after = options.metrics().snapshot();
    assert_eq!(out.num_rows(), 25);
    assert_eq!(after.decoded - before.decoded, 24);
    assert_eq!(after.failed - before.failed, 1);
    assert!(after.decode_seconds > before.decode_seconds);
    let errors = out
        .column_by_name("image_error")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(errors.len() - errors.null_count(), 1);

    // Dropping invalid rows needs the decode, whatever is selected; the broken file is gone.
    let dropping = options.clone().with_drop_invalid(true);
    deep_pipelines::register_images_table(&ctx, "valid", dir.path(), dropping.clone()).unwrap();
    let before = dropping.metrics().snapshot().files_read();
    let count = ctx
        .sql("SELECT origin FROM valid")
        .await
        .unwrap()
        .count()
        .await
        .unwrap();
    assert_eq!(count, 24);
    assert_eq!(dropping.metrics().snapshot().files_read() - before, 25);

    // LIMIT stops the scan early (at most the prefetched batches past it are read).
    let (rows, reads) = rows_and_reads(&ctx, &options, "SELECT image FROM images LIMIT 3").await;
    assert_eq!(rows, 3);
    assert!(reads < 25, "a LIMIT 3 query read {reads} files");

    // EXPLAIN shows the scan and what it projects.
    let plan = ctx.sql("EXPLAIN SELECT origin FROM images").await.unwrap();
    let plan = common::collect(plan).await;
    let text: Vec<&str> = plan.column(1).as_string::<i32>().iter().flatten().collect();
    let text = text.join("\n");
    assert!(
        text.contains("ImageFolderExec: files=25, partitions=2, projection=[origin], decode=false"),
        "{text}"
    );
}

#[tokio::test]
async fn a_model_called_from_sql_runs_once_per_row_whatever_fields_are_read() {
    let model = common::fitted_example().await;
    let featurizer = model.stage::<DeepImageFeaturizer>().unwrap().clone();
    let dir = folder();
    // A plain session: registering the model makes it one call per row.
    let ctx = SessionContext::new();
    deep_pipelines::register_images_table(&ctx, "images", dir.path(), ReadImagesOptions::default())
        .unwrap();
    deep_pipelines::register_model(&ctx, "classify", &model).unwrap();
    for sql in [
        "SELECT classify(image)['label'] AS l, classify(image)['probability'] AS p FROM images",
        "SELECT origin, classify(image)['label'], classify(image)['prediction'], \
         classify(image)['probability'] FROM images WHERE image_error IS NULL",
        "SELECT c['label'], c['probability'] FROM (SELECT classify(image) AS c FROM images)",
        "SELECT origin, c['label'] FROM (SELECT origin, classify(image) AS c FROM images) \
         WHERE c['probability'] >= 0.0",
        "SELECT origin, c['label'] FROM (SELECT origin, classify(image) AS c FROM images) \
         WHERE c['probability'] >= 0.0 ORDER BY c['prediction'], c['probability'] DESC",
    ] {
        let before = featurizer.images_processed();
        let out = common::collect(ctx.sql(sql).await.unwrap()).await;
        let forwarded = featurizer.images_processed() - before;
        let valid = 24u64;
        assert!(
            out.num_rows() as u64 >= valid,
            "{sql}: {} rows",
            out.num_rows()
        );
        if forwarded != valid {
            let plan = ctx.sql(&format!("EXPLAIN {sql}")).await.unwrap();
            let plan = common::collect(plan).await;
            let text: Vec<&str> = plan.column(1).as_string::<i32>().iter().flatten().collect();
            panic!(
                "forward passes per row must be 1: {forwarded} for {valid} images: {sql}\n{}",
                text.join("\n")
            );
        }
    }
    // The same holds in a session from `sql::session_config`, before any model is registered.
    let config = deep_pipelines::sql::session_config();
    assert!(!config.options().optimizer.enable_leaf_expression_pushdown);
}

#[tokio::test]
async fn a_network_stage_reports_rows_nulls_and_where_the_time_went() {
    let dir = folder();
    let ctx = SessionContext::new();
    let featurizer = DeepImageFeaturizer::new().with_batch_size(10);
    let images = read_images(&ctx, dir.path(), ReadImagesOptions::default()).unwrap();
    let zero = featurizer.metrics();
    assert_eq!((zero.rows, zero.images, zero.null_count()), (0, 0, 0));
    common::collect(featurizer.transform(images).unwrap()).await;
    let stats = featurizer.metrics();
    assert_eq!(stats.rows, 25);
    assert_eq!(stats.images, 24);
    // The broken PNG: its reason comes from the scan's `image_error`.
    assert_eq!(stats.null_rows.get("undecodable"), Some(&1), "{stats:?}");
    assert_eq!(stats.null_count(), 1);
    // 24 images in batches of 10, in however many record batches the scan made.
    assert!((3..=24).contains(&stats.forward_passes), "{stats:?}");
    assert!(
        stats.preprocess_seconds > 0.0 && stats.network_seconds > 0.0,
        "{stats:?}"
    );
    assert!(
        stats.wall_seconds > 0.0 && stats.images_per_second() > 0.0,
        "{stats:?}"
    );
    assert_eq!(stats.device, "cpu");
    assert_eq!(stats.batch_halvings, 0);
    let line = stats.to_string();
    assert!(
        line.contains("24 images") && line.contains("null (undecodable): 1"),
        "{line}"
    );
    featurizer.reset_metrics();
    assert_eq!(featurizer.metrics().rows, 0);
}

/// The channel means of its input, as `MeanChannels`, on a device that cannot allocate more
/// than `max_batch` images at once: a larger forward pass fails as wgpu's allocator does.
#[derive(Debug)]
struct SmallDevice {
    max_batch: usize,
    passes: AtomicUsize,
}

impl ImageNetwork for SmallDevice {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let [n, c, _, _] = input.dims();
        self.passes.fetch_add(1, Ordering::Relaxed);
        if n > self.max_batch {
            panic!(
                "Out of memory: failed to allocate {n} images ({} max)",
                self.max_batch
            );
        }
        input.mean_dim(3).mean_dim(2).reshape([n, c, 1, 1])
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        let [n, c, _, _] = map.dims();
        Some(map.reshape([n, c]))
    }
}

#[tokio::test]
async fn a_batch_the_device_cannot_allocate_is_retried_with_half_the_batch() {
    let dir = folder();
    let ctx = SessionContext::new();
    let device = Device::flex();
    let network = Arc::new(SmallDevice {
        max_batch: 3,
        passes: AtomicUsize::new(0),
    });
    register_network(user_manifest("SmallDevice3", 3), network.clone(), &device).unwrap();
    register_network(
        user_manifest("ChannelMeansRef", 3),
        Arc::new(crate::hostile_input::MeanChannels(3)),
        &device,
    )
    .unwrap();
    let options = ReadImagesOptions::default()
        .with_num_partitions(1)
        .with_batch_rows(25);
    let images = read_images(&ctx, dir.path(), options).unwrap();
    let small = DeepImageFeaturizer::new()
        .with_model_name("SmallDevice3")
        .with_batch_size(16);
    let out = common::collect(small.transform(images.clone()).unwrap()).await;
    let reference = DeepImageFeaturizer::new().with_model_name("ChannelMeansRef");
    let expected = common::collect(reference.transform(images.clone()).unwrap()).await;
    let (a, b) = (
        out.column_by_name("features").unwrap().as_fixed_size_list(),
        expected
            .column_by_name("features")
            .unwrap()
            .as_fixed_size_list(),
    );
    assert_eq!((a.len(), a.null_count()), (25, 1));
    for r in 0..a.len() {
        assert_eq!(a.is_null(r), b.is_null(r));
        if a.is_valid(r) {
            let (x, y) = (a.value(r), b.value(r));
            assert_eq!(
                x.as_primitive::<Float32Type>().values(),
                y.as_primitive::<Float32Type>().values(),
                "row {r}"
            );
        }
    }
    // 24 images, batch 16: 16 fails, 8 fails, 4 fails, then 2-image passes; later passes start
    // at the size that worked.
    let stats = small.metrics();
    assert_eq!(stats.images, 24);
    assert!(stats.batch_halvings >= 3, "{stats:?}");
    assert_eq!(
        stats.forward_passes as usize,
        network.passes.load(Ordering::Relaxed)
    );
    assert!(stats.forward_passes < 24, "{stats:?}");

    // A device that cannot take even one image: the job fails, naming the failure.
    register_network(
        user_manifest("SmallDevice0", 3),
        Arc::new(SmallDevice {
            max_batch: 0,
            passes: AtomicUsize::new(0),
        }),
        &device,
    )
    .unwrap();
    let none = DeepImageFeaturizer::new()
        .with_model_name("SmallDevice0")
        .with_batch_size(8);
    let err = none
        .transform(images)
        .unwrap()
        .collect()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Out of memory") && err.contains("SmallDevice0"),
        "{err}"
    );
    assert!(none.metrics().batch_halvings >= 3, "{:?}", none.metrics());
}
