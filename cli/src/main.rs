//! `deep-pipelines`: the library's jobs from the command line. Featurize or classify a folder
//! of images (or a Parquet file of images) to Parquet, fit a transfer-learning model on a
//! labelled folder, apply a saved model. Progress goes to stderr, results to files or stdout.
//!
//! ```text
//! deep-pipelines models
//! deep-pipelines featurize photos/ -o features.parquet
//! deep-pipelines fit train/ -o fitted-model --test test/
//! deep-pipelines apply fitted-model photos/ -o predictions.parquet
//! ```

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use datafusion::arrow::datatypes::DataType;
use datafusion::config::TableParquetOptions;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::logical_expr::{Expr, cast};
use datafusion::prelude::ParquetReadOptions;
use deep_pipelines::evaluation::confusion_matrix;
use deep_pipelines::image::{ScanMetrics, image_folder_table, image_type};
use deep_pipelines::models::{available_models, manifest, model_dirs};
use deep_pipelines::prelude::*;
use deep_pipelines::{Error, NetworkParams, NetworkStats, Result};

/// `println!` that ignores a closed stdout (`deep-pipelines models | head`) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "deep-pipelines",
    version,
    about = "Pretrained CNNs on folders of images: features, predictions, transfer learning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress lines on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Every named model: input size, feature size, and whether its weights are installed.
    Models,
    /// Images -> features, written to Parquet (origin, label, features, error).
    Featurize {
        /// A folder of images (read recursively) or a Parquet file with an image column.
        input: PathBuf,
        /// The Parquet file to write.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        network: NetworkArgs,
        /// `pooled` (the feature vector) or `flattened` (the last feature map).
        #[arg(long, default_value = "pooled")]
        feature_mode: String,
        /// `float32` or `float16`.
        #[arg(long, default_value = "float32")]
        output_type: String,
    },
    /// Images -> top-K ImageNet classes, written to Parquet.
    Predict {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        network: NetworkArgs,
        /// Classes kept per image.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
    },
    /// Transfer learning: a labelled folder (one sub-folder per class) -> a saved model
    /// (a logistic regression on frozen features, or with --fine-tune the network's last blocks).
    Fit(FitArgs),
    /// A saved model applied to images, predictions written to Parquet.
    Apply {
        /// A model saved by `fit` (or by the library's `PipelineModel::save`).
        model_dir: PathBuf,
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Runs SQL over image folders, Parquet files and saved models registered as functions.
    Sql {
        /// The query, e.g. "SELECT origin, classify(image) AS c FROM photos".
        query: String,
        /// A folder of images as table NAME (columns: origin, label, image, image_error).
        #[arg(long = "images", value_name = "NAME=DIR")]
        images: Vec<String>,
        /// A Parquet file (or folder of them) as table NAME.
        #[arg(long = "parquet", value_name = "NAME=PATH")]
        parquet: Vec<String>,
        /// A saved model as SQL function NAME (image or encoded bytes -> its output).
        #[arg(long = "model", value_name = "NAME=MODEL_DIR")]
        models: Vec<String>,
        /// Write the result to this Parquet file instead of printing it.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

/// `fit`'s options.
#[derive(Args)]
struct FitArgs {
    /// Training images, one sub-folder per class.
    train_dir: PathBuf,
    /// Where to save the fitted model.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    network: NetworkArgs,
    /// L2 (elastic net: mixed) regularisation strength.
    #[arg(long, default_value_t = 1e-3)]
    reg_param: f64,
    /// Elastic-net mixing: 0 = L2, 1 = L1.
    #[arg(long, default_value_t = 0.0)]
    elastic_net: f64,
    /// Iterations of the optimiser at most.
    #[arg(long, default_value_t = 200)]
    max_iter: usize,
    #[command(flatten)]
    fine_tune: FineTuneArgs,
    /// Test images laid out like the training folder: prints accuracy and the confusion matrix.
    #[arg(long)]
    test: Option<PathBuf>,
    /// Replace an existing model at the output path.
    #[arg(long)]
    overwrite: bool,
}

/// `fit --fine-tune N`'s options.
#[derive(Args)]
struct FineTuneArgs {
    /// Fine-tune the network's last N blocks with a new head (DeepImageClassifier) instead
    /// of fitting a logistic regression on frozen features; 0 trains the new head only.
    #[arg(long, value_name = "N")]
    fine_tune: Option<usize>,
    /// Fine-tuning: passes over the training images.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Fine-tuning: peak learning rate (default: DeepImageClassifier's).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Fine-tuning: seed of the new head's weights, shuffles and flips.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The options of every network stage (the shared `NetworkParams`).
#[derive(Args)]
struct NetworkArgs {
    /// A named model (see `deep-pipelines models`).
    #[arg(long, default_value = "EfficientNetLite0")]
    model: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// `cpu`, or in a build with the `wgpu` feature `wgpu` (the first GPU) or `wgpu-cpu`
    /// (software Vulkan).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `crop` (the model's resize + centre crop) or `pad` (letterbox).
    #[arg(long, default_value = "crop")]
    resize_mode: String,
    /// What transparent pixels are composited over: white, black, #rrggbb or none.
    #[arg(long, default_value = "white")]
    alpha_background: String,
    /// The folder holding `<model>/` (weights, optional manifest); default: the search of
    /// `deep-pipelines models`.
    #[arg(long, default_value = "")]
    model_dir: String,
    /// An ONNX model file to run instead of `--model` (described by `<name>.json` next to it,
    /// else by its graph with ImageNet preprocessing).
    #[arg(long, default_value = "")]
    model_file: String,
    /// JSON in the manifest schema over the model file's description, e.g.
    /// '{"input_size": 224, "labels": "classes.txt"}'.
    #[arg(long, default_value = "")]
    model_manifest: String,
    /// `float32`, or `bfloat16`: the CPU plan's matrix products in bfloat16 (CPUs with
    /// AVX-512 BF16: faster; each image's features within 8% of their float32 norm).
    #[arg(long, default_value = "float32")]
    precision: String,
}

impl NetworkArgs {
    /// The stage params these options set (the rest at their defaults). A `--resize-mode` that
    /// names no mode is an error naming the option.
    fn params(&self) -> Result<NetworkParams> {
        let resize_mode = self
            .resize_mode
            .parse()
            .map_err(|message| Error::InvalidParam {
                stage: "deep-pipelines".into(),
                param: "--resize-mode".into(),
                message,
            })?;
        Ok(NetworkParams {
            model_name: self.model.clone(),
            batch_size: self.batch_size,
            device: self.device.clone(),
            resize_mode,
            alpha_background: self.alpha_background.clone(),
            model_dir: self.model_dir.clone(),
            model_file: self.model_file.clone(),
            model_manifest: self.model_manifest.clone(),
            precision: self.precision.clone(),
            ..NetworkParams::default()
        })
    }
}

fn main() -> ExitCode {
    tune_malloc();
    quiet_onnxruntime();
    let cli = Cli::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            path: "tokio runtime".into(),
            source: e,
        })
        .and_then(|runtime| runtime.block_on(run(cli)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc tuned for a run that frees and allocates an image's worth of buffers per file:
/// - two arenas instead of up to eight per core. Each thread that allocates gets an arena of its
///   own (decoding, the network's workers, the scan's prefetch threads), and freed image
///   buffers stay fragmented across them: measured on `featurize` of 2,000 640x480 JPEGs, peak
///   RSS 1,005 MB with the default, 782 MB with two arenas, at the same speed;
/// - buffers under 32 MiB (a decoded photo, a batch's activations) from the heap, and 128 MiB
///   of freed heap kept, instead of a fresh `mmap` (zeroed page by page by the kernel) for
///   each: on `featurize` of 1,000 640x480 JPEGs, 200,000 page faults became 90,000 and system
///   time 0.6 s became 0.25 s (of 9.5 s of CPU), at the same peak RSS.
///
/// The `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` environment
/// variables still win.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |name: &str| std::env::var_os(name).is_none();
        // SAFETY: mallopt only sets a tunable of the allocator; called before any thread exists.
        unsafe {
            if unset("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            // Set together: one alone turns glibc's adaptive threshold off and leaves the
            // other at its small default (every decoded image then an `mmap` of its own).
            if unset("MALLOC_MMAP_THRESHOLD_") && unset("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
            }
        }
    }
}

/// ONNX Runtime (model files) writes a device id and telemetry under `~/.cache/Microsoft`
/// unless `ORT_DISABLE_TELEMETRY` is set: a command line run leaves nothing behind.
fn quiet_onnxruntime() {
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        // SAFETY: called first in main, before any thread exists.
        unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
    }
}

async fn run(cli: Cli) -> Result<()> {
    let progress = !cli.quiet;
    // Models called from SQL run once per row whatever fields of their result are read; a
    // Parquet image column decoded by `decode_image_column` is decoded once.
    let ctx = SessionContext::new_with_config(deep_pipelines::sql::session_config());
    match cli.command {
        Command::Models => models(),
        Command::Featurize {
            input,
            output,
            network,
            feature_mode,
            output_type,
        } => {
            let stage = DeepImageFeaturizer::new()
                .with_network_params(network.params()?)
                .with_feature_mode(feature_mode.as_str())
                .with_output_type(output_type.as_str())
                .with_error_col("error");
            let model = PipelineModel::new("featurize", vec![Arc::new(stage)]);
            transform_to_parquet(&ctx, "featurize", &model, &input, &output, progress).await
        }
        Command::Predict {
            input,
            output,
            network,
            top_k,
        } => {
            let stage = DeepImagePredictor::new()
                .with_network_params(network.params()?)
                .with_top_k(top_k)
                .with_error_col("error");
            let model = PipelineModel::new("predict", vec![Arc::new(stage)]);
            transform_to_parquet(&ctx, "predict", &model, &input, &output, progress).await
        }
        Command::Fit(args) => fit(&ctx, args, progress).await,
        Command::Sql {
            query,
            images,
            parquet,
            models,
            output,
        } => {
            for spec in &images {
                let (name, dir) = name_and_path("--images", spec)?;
                deep_pipelines::register_images_table(
                    &ctx,
                    name,
                    dir,
                    ReadImagesOptions::default().with_label_from_folder(true),
                )?;
            }
            for spec in &parquet {
                let (name, path) = name_and_path("--parquet", spec)?;
                ctx.register_parquet(name, path, ParquetReadOptions::default())
                    .await?;
            }
            for spec in &models {
                let (name, dir) = name_and_path("--model", spec)?;
                deep_pipelines::register_model(&ctx, name, &PipelineModel::load(dir)?)?;
            }
            let result = ctx.sql(&query).await?;
            match output {
                Some(path) => {
                    write_parquet(result, &path).await?;
                    say!("wrote {}", path.display());
                }
                None => {
                    let batches = result.collect().await?;
                    say!(
                        "{}",
                        datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
                    );
                }
            }
            Ok(())
        }
        Command::Apply {
            model_dir,
            input,
            output,
        } => {
            let model = PipelineModel::load(&model_dir)?;
            let mut stages = model.stages().to_vec();
            let classifier = model.classifier();
            let labels = classifier
                .as_ref()
                .and_then(|c| model.labels_of(&c.label_col));
            if let (Some(classifier), Some(labels)) = (&classifier, labels) {
                let names = IndexToString::new()
                    .with_input_col(&classifier.prediction_col)
                    .with_output_col("predictedLabel")
                    .with_labels(labels);
                stages.push(Arc::new(names));
            }
            let model = PipelineModel::new(model.uid(), stages);
            transform_to_parquet(&ctx, "apply", &model, &input, &output, progress).await
        }
    }
}

/// Runs `model` over the images at `input` and streams its output to the Parquet file `output`,
/// with progress: every column but the pixels and the features (the pipeline's own output only
/// when it ends with them). `featurize` and `predict` keep the folder's `label`; `apply` reads
/// none (new images have no class; its indexer then passes them through).
async fn transform_to_parquet(
    ctx: &SessionContext,
    job: &'static str,
    model: &PipelineModel,
    input: &Path,
    output: &Path,
    progress: bool,
) -> Result<()> {
    let labels = job != "apply";
    let (images, total, scan) = read_input(ctx, input, labels, false).await?;
    let out = model.transform(images)?;
    let last = out.schema().fields().last().map(|f| f.name().clone());
    let keep: Vec<String> = out
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|name| name != "image" && (name != "features" || last.as_ref() == Some(name)))
        .collect();
    let out = out.select_columns(&keep.iter().map(String::as_str).collect::<Vec<_>>())?;
    let counter = model.clone();
    let meter = Meter::start(job, total, progress, move || images_processed(&counter));
    write_parquet(out, output).await?;
    meter.finish();
    report(job, model, scan.as_ref(), progress);
    say!("wrote {}", output.display());
    Ok(())
}

/// Where the time went, on stderr: the network stage's counters (rows, nulls and why, images/s,
/// seconds preprocessing and in the network, device) and the folder scan's (files decoded,
/// seconds decoding).
fn report(job: &str, model: &PipelineModel, scan: Option<&ScanMetrics>, enabled: bool) {
    if !enabled {
        return;
    }
    // A fine-tuned model's stage has not run yet after its fit (the trunk pass is the fit's).
    if let Some(stats) = network_stats(model).filter(|s| s.rows > 0) {
        eprintln!("{job}: {stats}");
    }
    if let Some(scan) = scan.map(ScanMetrics::snapshot) {
        eprintln!(
            "{job}: read {} files ({} decoded, {} failed), decode {:.1} s",
            scan.files_read(),
            scan.decoded,
            scan.failed,
            scan.decode_seconds
        );
    }
}

/// `NAME=PATH` from a `--images` / `--parquet` / `--model` option.
fn name_and_path<'a>(option: &str, spec: &'a str) -> Result<(&'a str, &'a str)> {
    spec.split_once('=')
        .filter(|(name, path)| !name.is_empty() && !path.is_empty())
        .ok_or_else(|| Error::InvalidParam {
            stage: "deep-pipelines sql".into(),
            param: option.into(),
            message: format!("`{spec}` is not NAME=PATH"),
        })
}

/// The counters of the first network stage of `model`.
fn network_stats(model: &PipelineModel) -> Option<NetworkStats> {
    model.network().map(|n| n.metrics())
}

/// Sets the counters of the network stages of `model` back to zero.
fn reset_metrics(model: &PipelineModel) {
    model.network_stages().for_each(|n| n.reset_metrics());
}

/// Images the network stages of `model` have processed.
fn images_processed(model: &PipelineModel) -> u64 {
    network_stats(model).map_or(0, |s| s.images)
}

fn models() -> Result<()> {
    say!(
        "{:<20} {:>6} {:>9} {:>8}  weights",
        "model",
        "input",
        "features",
        "classes"
    );
    for name in available_models() {
        let (m, folder) = manifest(&name)?;
        let weights = folder.join(&m.weights.file);
        let state = if weights.is_file() {
            format!("installed ({})", weights.display())
        } else {
            format!(
                "missing: put {} at {} (source: {})",
                m.weights.file,
                weights.display(),
                m.weights.source
            )
        };
        say!(
            "{:<20} {:>6} {:>9} {:>8}  {state}",
            name,
            m.input_size,
            m.feature_dim,
            m.num_classes
        );
    }
    let dirs: Vec<String> = model_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    say!(
        "\nmodel folders, searched in order: {} (set DEEP_PIPELINES_MODEL_DIR to search another first)",
        dirs.join(", ")
    );
    Ok(())
}

/// Images from a folder (recursive; with `labels`, `label` = each file's folder name) or a Parquet file with
/// an image struct column or a binary column of encoded images, as column `image`; and how many
/// rows there are; and, for a folder, the scan's counters.
async fn read_input(
    ctx: &SessionContext,
    input: &Path,
    labels: bool,
    drop_invalid: bool,
) -> Result<(DataFrame, usize, Option<ScanMetrics>)> {
    if input.is_dir() {
        let options = ReadImagesOptions::default()
            .with_label_from_folder(labels)
            .with_drop_invalid(drop_invalid);
        let scan = options.metrics();
        let table = image_folder_table(input, options)?;
        let files = table.file_count();
        return Ok((ctx.read_table(Arc::new(table))?, files, Some(scan)));
    }
    if !input.is_file() {
        return Err(Error::Io {
            path: input.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        });
    }
    let path = input.to_string_lossy();
    let df = ctx
        .read_parquet(path.as_ref(), ParquetReadOptions::default())
        .await?;
    let rows = df.clone().count().await?;
    let schema = df.schema().clone();
    let image_like = |t: &DataType| match (t, image_type()) {
        (DataType::Struct(found), DataType::Struct(want)) => want
            .iter()
            .all(|w| found.iter().any(|f| f.name() == w.name())),
        _ => false,
    };
    if let Some(f) = schema.fields().iter().find(|f| image_like(f.data_type())) {
        let name = f.name().clone();
        let image = cast(ident(&name), image_type()).alias("image");
        let others: Vec<_> = schema
            .fields()
            .iter()
            .filter(|g| g.name() != &name && g.name() != "image")
            .map(|g| ident(g.name()))
            .chain([image])
            .collect();
        return Ok((df.select(others)?, rows, None));
    }
    let binary = schema.fields().iter().find(|f| {
        matches!(
            f.data_type(),
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView
        )
    });
    match binary {
        Some(f) => {
            let origin = schema
                .fields()
                .iter()
                .find(|g| g.name() == "origin" || g.name() == "path")
                .map(|g| g.name().clone());
            let df = decode_image_column(
                df,
                &f.name().clone(),
                "image",
                origin.as_deref(),
                Default::default(),
                drop_invalid,
            )?;
            Ok((df, rows, None))
        }
        None => Err(Error::Column {
            stage: None,
            column: "image".into(),
            message: format!(
                "{}: no image struct (origin, height, width, nChannels, mode, data) or binary column; columns: {}",
                input.display(),
                schema
                    .fields()
                    .iter()
                    .map(|f| format!("{} {}", f.name(), f.data_type()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// `df` with its fixed-size list columns (features, logits) as plain lists. A null row of a
/// fixed-size list is stored in Parquet as an empty list, which pyarrow before 26 refuses to
/// read back as fixed-size ("Expected all lists to be of size=1280"); as lists, every reader
/// opens the file: pyarrow from 15, pandas, Polars, DuckDB, Spark.
fn with_plain_lists(df: DataFrame) -> Result<DataFrame> {
    let columns: Vec<Expr> = df
        .schema()
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::from((qualifier, field));
            match field.data_type() {
                DataType::FixedSizeList(item, _) => {
                    cast(column, DataType::List(Arc::clone(item))).alias(field.name())
                }
                _ => column,
            }
        })
        .collect();
    Ok(df.select(columns)?)
}

/// Writes `df` to one Parquet file, streaming batch by batch, under a temporary name renamed into
/// place at the end: `path` never holds a partial file.
async fn write_parquet(df: DataFrame, path: &Path) -> Result<()> {
    let df = with_plain_lists(df)?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Fit(format!("{} is not a file name", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::Io {
        path: parent.display().to_string(),
        source: e,
    })?;
    let temp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let options = DataFrameWriteOptions::new().with_single_file_output(true);
    // Row groups of 2,048 rows: the writer holds one row group in memory (DataFusion's default
    // of 1M rows would hold every feature of a 100,000-image job until the end).
    let mut parquet = TableParquetOptions::default();
    parquet.global.max_row_group_size = 2048;
    let written = df
        .write_parquet(&temp.to_string_lossy(), options, Some(parquet))
        .await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e.into());
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        Error::Io {
            path: path.display().to_string(),
            source: e,
        }
    })
}

impl FineTuneArgs {
    /// The fine-tuning estimator, if `--fine-tune` was given.
    fn classifier(&self, network: NetworkParams, progress: bool) -> Option<DeepImageClassifier> {
        let blocks = self.fine_tune?;
        let mut classifier = DeepImageClassifier::new()
            .with_network_params(network)
            .with_label_col("labelIndex")
            .with_trainable_blocks(blocks)
            .with_epochs(self.epochs)
            .with_seed(self.seed);
        if let Some(rate) = self.learning_rate {
            classifier = classifier.with_learning_rate(rate);
        }
        if progress {
            classifier = classifier.with_progress(|epoch| eprintln!("fit: {epoch}"));
        }
        Some(classifier)
    }
}

async fn fit(ctx: &SessionContext, job: FitArgs, progress: bool) -> Result<()> {
    if job.output.exists() && !job.overwrite {
        return Err(Error::Persistence(format!(
            "{} already exists; pass --overwrite to replace it",
            job.output.display()
        )));
    }
    let (train, total, scan) = read_input(ctx, &job.train_dir, true, true).await?;
    let pipeline = Pipeline::new().with_estimator(
        StringIndexer::new()
            .with_input_col("label")
            .with_output_col("labelIndex")
            .with_string_order_type("alphabetAsc"),
    );
    let started = Instant::now();
    let network = job.network.params()?;
    let model = match job.fine_tune.classifier(network.clone(), progress) {
        None => {
            let featurizer = DeepImageFeaturizer::new().with_network_params(network);
            let counter = featurizer.clone();
            let pipeline = pipeline.with_transformer(featurizer).with_estimator(
                LogisticRegression::new()
                    .with_label_col("labelIndex")
                    .with_reg_param(job.reg_param)
                    .with_elastic_net_param(job.elastic_net)
                    .with_standardization(false)
                    .with_max_iter(job.max_iter),
            );
            let meter = Meter::start("fit: featurize", total, progress, move || {
                counter.images_processed()
            });
            let model = pipeline.fit(&train).await?;
            meter.finish();
            model
        }
        Some(classifier) => {
            let counter = classifier.clone();
            let views = if classifier.params().horizontal_flip {
                2
            } else {
                1
            };
            // The trunk's pass comes first (its meter ends with it); then a line per epoch.
            let meter = Meter::start("fit: frozen trunk", total, progress, move || {
                counter.trunk_images() / views
            });
            let model = pipeline.with_estimator(classifier).fit(&train).await;
            meter.finish();
            model?
        }
    };
    report("fit", &model, scan.as_ref(), progress);
    let labels = model.labels_of("labelIndex").unwrap_or_default().to_vec();
    let how = if let Some(lr) = model.stage::<LogisticRegressionModel>() {
        format!(
            "logistic regression: {} iterations, {}",
            lr.fitted().iterations,
            if lr.fitted().converged {
                "converged"
            } else {
                "stopped at --max-iter"
            }
        )
    } else if let Some(c) = model.stage::<DeepImageClassifierModel>() {
        let facts = c.fit_facts();
        format!(
            "fine-tuned {} blocks of {}: {} epochs, kept epoch {}",
            facts.trainable_blocks,
            c.params().network.model_name,
            facts.history.len(),
            facts.best_epoch
        )
    } else {
        return Err(Error::Fit("the fitted pipeline has no classifier".into()));
    };
    say!(
        "fitted on {total} images, {} classes ({}) in {:.1} s; {how}",
        labels.len(),
        labels.join(", "),
        started.elapsed().as_secs_f64(),
    );
    if job.overwrite {
        model.save_overwrite(&job.output)?;
    } else {
        model.save(&job.output)?;
    }
    say!("saved the model to {}", job.output.display());
    if let Some(test_dir) = &job.test {
        let (test, total, scan) = read_input(ctx, test_dir, true, true).await?;
        reset_metrics(&model);
        let counter = model.clone();
        let meter = Meter::start("test: featurize", total, progress, move || {
            images_processed(&counter)
        });
        let predictions = model.transform(test)?.cache().await?;
        meter.finish();
        report("test", &model, scan.as_ref(), progress);
        let metrics = MulticlassClassificationEvaluator::new()
            .with_label_col("labelIndex")
            .evaluate_all(&predictions)
            .await?;
        say!(
            "test: {total} images, accuracy {:.4}, f1 (weighted) {:.4}, logLoss {:.4}",
            metrics["accuracy"],
            metrics["f1"],
            metrics["logLoss"]
        );
        let matrix = confusion_matrix(&predictions, "labelIndex", "prediction")
            .await?
            .with_labels(&labels);
        say!("confusion matrix (rows: actual, columns: predicted)\n{matrix}");
    }
    Ok(())
}

/// Progress of a long job on stderr: images done (`done` counts from its value at the start),
/// images/s and ETA. On a terminal a bar redrawn in place; otherwise a plain line
/// every 5 s (logs, CI). Both end with one summary line, when all `total` images are done or at
/// `finish` (a fit's trunk pass ends before its epochs). Prints nothing when `enabled` is false.
struct Meter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Characters of the terminal progress bar.
const BAR: usize = 30;

impl Meter {
    fn start(
        what: &'static str,
        total: usize,
        enabled: bool,
        done: impl Fn() -> u64 + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = enabled.then(|| {
            let stop = Arc::clone(&stop);
            let base = done();
            let done = move || done().saturating_sub(base);
            std::thread::spawn(move || {
                let started = Instant::now();
                let line = |n: u64| {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    let rate = n as f64 / secs;
                    let eta = if rate > 0.0 && (n as usize) < total {
                        format!(", ETA {:.0} s", (total as f64 - n as f64) / rate)
                    } else {
                        String::new()
                    };
                    format!("{what}: {n}/{total} images, {rate:.1} images/s, {secs:.0} s{eta}")
                };
                if std::io::stderr().is_terminal() {
                    // A bar redrawn in place, then the same summary line as below.
                    while !stop.load(Ordering::Relaxed) && (done() as usize) < total {
                        let n = done();
                        let filled = (BAR * n as usize / total.max(1)).min(BAR);
                        eprint!(
                            "\r[{}{}] {}\x1b[K",
                            "#".repeat(filled),
                            "-".repeat(BAR - filled),
                            line(n)
                        );
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    eprint!("\r\x1b[K");
                    eprintln!("{}", line(done()));
                    return;
                }
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) && (done() as usize) < total {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= Duration::from_secs(5) {
                        last = Instant::now();
                        eprintln!("{}", line(done()));
                    }
                }
                eprintln!("{}", line(done()));
            })
        });
        Meter { stop, thread }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
