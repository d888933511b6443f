//! A folder of image files as a DataFusion table: a real scan (like Spark's `image` data source)
//! that reads and decodes each file once, only for the columns a query reads, a few record
//! batches ahead of whoever consumes them.
//!
//! Why a scan and not a decoding UDF: DataFusion pushes each `get_field` of a struct-valued UDF
//! down to its own call, so a plan keeping both `image` and `image_error` would decode every
//! file twice. Here `image` and `image_error` are plain columns of the scan.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch, RecordBatchOptions, StringArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result as DfResult, internal_err};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::{
    RecordBatchReceiverStreamBuilder, RecordBatchStreamAdapter,
};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};

use super::column::decoded_array;
use super::decode::{DecodeLimits, decode_file};
use super::image_type;

/// Record batches a partition decodes ahead of its consumer: the next batch is read and decoded
/// while the network runs on the current one, so memory stays two batches per partition.
const PREFETCH_BATCHES: usize = 1;

/// What a folder scan has done, shared by every scan of one [`super::ReadImagesOptions`] (clone
/// the handle before reading, read it after running the query).
#[derive(Debug, Clone, Default)]
pub struct ScanMetrics(Arc<ScanCounters>);

#[derive(Debug, Default)]
struct ScanCounters {
    decoded: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    decode_nanos: AtomicU64,
}

/// A snapshot of [`ScanMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ScanStats {
    /// Files read and decoded into an image.
    pub decoded: u64,
    /// Files read whose decoding failed (their rows have a null image and an `image_error`).
    pub failed: u64,
    /// Decoded pixel bytes.
    pub decoded_bytes: u64,
    /// Time spent reading and decoding files, summed over the threads that did it.
    pub decode_seconds: f64,
}

impl ScanStats {
    /// Files the scan read (decoded or failed).
    pub fn files_read(&self) -> u64 {
        self.decoded + self.failed
    }
}

impl ScanMetrics {
    pub fn snapshot(&self) -> ScanStats {
        let c = &self.0;
        ScanStats {
            decoded: c.decoded.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            decoded_bytes: c.bytes.load(Ordering::Relaxed),
            decode_seconds: c.decode_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    fn record(
        &self,
        outcome: &std::result::Result<super::ImageRow, super::ImageProblem>,
        started: Instant,
    ) {
        let c = &self.0;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        c.decode_nanos.fetch_add(nanos, Ordering::Relaxed);
        match outcome {
            Ok(image) => {
                c.decoded.fetch_add(1, Ordering::Relaxed);
                c.bytes
                    .fetch_add(image.data.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The files of an image folder, listed and sampled, with how to read them.
#[derive(Debug)]
pub(super) struct FolderFiles {
    /// Files per partition (contiguous runs of the sorted list).
    pub partitions: Vec<Vec<PathBuf>>,
    pub label_from_folder: bool,
    pub drop_invalid: bool,
    pub batch_rows: usize,
    pub limits: DecodeLimits,
    pub metrics: ScanMetrics,
}

/// A folder of image files as a table: `origin`, [`label`], `image`, `image_error`.
#[derive(Debug)]
pub struct ImageFolderTable {
    files: Arc<FolderFiles>,
    schema: SchemaRef,
}

impl ImageFolderTable {
    pub(super) fn new(files: FolderFiles) -> Self {
        let mut fields = vec![Field::new("origin", DataType::Utf8, false)];
        if files.label_from_folder {
            fields.push(Field::new("label", DataType::Utf8, true));
        }
        fields.push(Field::new("image", image_type(), true));
        fields.push(Field::new("image_error", DataType::Utf8, true));
        ImageFolderTable {
            files: Arc::new(files),
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// Number of files the table reads.
    pub fn file_count(&self) -> usize {
        self.files.partitions.iter().map(Vec::len).sum()
    }
}

#[async_trait]
impl TableProvider for ImageFolderTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let columns: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&columns)?);
        let decode = self.files.drop_invalid
            || schema
                .fields()
                .iter()
                .any(|f| matches!(f.name().as_str(), "image" | "image_error"));
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(self.files.partitions.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(ImageFolderExec {
            files: Arc::clone(&self.files),
            schema,
            decode,
            limit,
            properties: Arc::new(properties),
        }))
    }
}

/// The physical scan of an [`ImageFolderTable`]: one partition per run of files.
#[derive(Debug)]
pub struct ImageFolderExec {
    files: Arc<FolderFiles>,
    /// The projected schema.
    schema: SchemaRef,
    /// Read and decode the files (`image` or `image_error` read, or invalid rows dropped).
    decode: bool,
    limit: Option<usize>,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for ImageFolderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        write!(
            f,
            "ImageFolderExec: files={}, partitions={}, projection=[{}], decode={}",
            self.files.partitions.iter().map(Vec::len).sum::<usize>(),
            self.files.partitions.len(),
            names.join(", "),
            self.decode
        )?;
        if let Some(limit) = self.limit {
            write!(f, ", limit={limit}")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for ImageFolderExec {
    fn name(&self) -> &'static str {
        "ImageFolderExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            internal_err!("ImageFolderExec has no children")
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let files = match self.files.partitions.get(partition) {
            Some(files) => files.clone(),
            None if partition == 0 => Vec::new(),
            None => return internal_err!("ImageFolderExec has no partition {partition}"),
        };
        let mut reader = PartitionReader {
            folder: Arc::clone(&self.files),
            files,
            next: 0,
            remaining: self.limit.unwrap_or(usize::MAX),
            schema: Arc::clone(&self.schema),
            decode: self.decode,
        };
        if !self.decode || tokio::runtime::Handle::try_current().is_err() {
            // Nothing to decode (or no runtime to decode on): batches are made as they are asked for.
            let batches = std::iter::from_fn(move || reader.next_batch());
            return Ok(Box::pin(RecordBatchStreamAdapter::new(
                Arc::clone(&self.schema),
                futures::stream::iter(batches),
            )));
        }
        // Decoding is blocking work: a thread of the runtime's blocking pool decodes the next
        // batch while the consumer (the network) works on the current one. It waits for the
        // channel to be empty before decoding, so one batch at most is decoded ahead.
        let mut builder =
            RecordBatchReceiverStreamBuilder::new(Arc::clone(&self.schema), PREFETCH_BATCHES);
        let tx = builder.tx();
        builder.spawn_blocking(move || {
            loop {
                let Ok(slot) = futures::executor::block_on(tx.reserve()) else {
                    break; // the consumer is gone
                };
                let Some(batch) = reader.next_batch() else {
                    break;
                };
                let failed = batch.is_err();
                slot.send(batch);
                if failed {
                    break; // the error is the stream's end
                }
            }
            Ok(())
        });
        Ok(builder.build())
    }
}

/// Makes one partition's record batches, `batch_rows` files at a time.
struct PartitionReader {
    folder: Arc<FolderFiles>,
    files: Vec<PathBuf>,
    next: usize,
    remaining: usize,
    schema: SchemaRef,
    decode: bool,
}

impl PartitionReader {
    fn next_batch(&mut self) -> Option<DfResult<RecordBatch>> {
        while self.next < self.files.len() && self.remaining > 0 {
            let end = (self.next + self.folder.batch_rows).min(self.files.len());
            let chunk = &self.files[self.next..end];
            self.next = end;
            let batch = match self.batch(chunk) {
                Ok(batch) => batch,
                Err(e) => return Some(Err(e)),
            };
            if batch.num_rows() == 0 {
                continue; // every file of the chunk was invalid and dropped
            }
            let batch = if batch.num_rows() > self.remaining {
                batch.slice(0, self.remaining)
            } else {
                batch
            };
            self.remaining -= batch.num_rows();
            return Some(Ok(batch));
        }
        None
    }

    fn batch(&self, chunk: &[PathBuf]) -> DfResult<RecordBatch> {
        let paths: Vec<String> = chunk
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let decoded = self.decode.then(|| {
            use rayon::prelude::*;
            let metrics = &self.folder.metrics;
            let rows: Vec<_> = paths
                .par_iter()
                .map(|p| {
                    let started = Instant::now();
                    let outcome = decode_file(p, &self.folder.limits);
                    metrics.record(&outcome, started);
                    Some(outcome)
                })
                .collect();
            decoded_array(rows)
        });
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields() {
            columns.push(match field.name().as_str() {
                "origin" => Arc::new(StringArray::from(paths.clone())),
                "label" => Arc::new(
                    chunk
                        .iter()
                        .map(|p| {
                            p.parent()
                                .and_then(|d| d.file_name())
                                .map(|n| n.to_string_lossy().into_owned())
                        })
                        .collect::<StringArray>(),
                ),
                "image" | "image_error" => {
                    let Some(decoded) = &decoded else {
                        return internal_err!("image columns projected without decoding");
                    };
                    let child = usize::from(field.name() == "image_error");
                    Arc::clone(decoded.as_struct().column(child))
                }
                other => return internal_err!("ImageFolderExec has no column {other}"),
            });
        }
        let options = RecordBatchOptions::new().with_row_count(Some(chunk.len()));
        let batch = RecordBatch::try_new_with_options(Arc::clone(&self.schema), columns, &options)?;
        match (&decoded, self.folder.drop_invalid) {
            (Some(decoded), true) => {
                let images = decoded.as_struct().column(0);
                let valid = datafusion::arrow::compute::is_not_null(images)?;
                Ok(filter_record_batch(&batch, &valid)?)
            }
            _ => Ok(batch),
        }
    }
}
