//! Running a fitted pipeline on in-memory Arrow batches from synchronous code: the Python
//! package (a Spark task's batches), SQL functions, a command line. One process-wide runtime,
//! never one per batch; a batch runs as one DataFusion partition, so rows keep their order.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::prelude::{SessionConfig, SessionContext};
use tokio::runtime::Runtime;

use crate::error::{Error, Result};
use crate::image::{DecodeLimits, image_array, is_bytes};
use crate::pipeline::{PipelineModel, Transformer};

/// The column a pipeline's first network stage reads images from.
pub fn image_input_col(model: &PipelineModel) -> Option<String> {
    model
        .network()
        .map(|n| n.network_params().input_col.clone())
}

/// A fitted pipeline (or one stage) applied to record batches as they come.
///
/// The image column may arrive as another engine gives it (Spark's `ImageSchema` struct with
/// its nullability, large binary data): it is made an image column first (see
/// [`image_array`]); encoded bytes go to the network stages as they are, which decode them.
///
/// ```no_run
/// # fn demo(batch: datafusion::arrow::array::RecordBatch) -> deep_pipelines::Result<()> {
/// use deep_pipelines::batch::BatchTransformer;
/// use deep_pipelines::PipelineModel;
/// let model = BatchTransformer::new(PipelineModel::load("fitted-model")?);
/// let out = model.transform(batch)?; // input columns + the pipeline's outputs
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BatchTransformer {
    model: PipelineModel,
    image_col: Option<String>,
    limits: DecodeLimits,
}

impl BatchTransformer {
    pub fn new(model: PipelineModel) -> Self {
        BatchTransformer {
            image_col: image_input_col(&model),
            model,
            limits: DecodeLimits::default(),
        }
    }

    /// One stage (or a fitted pipeline) applied to batches.
    pub fn from_stage(stage: Arc<dyn Transformer>) -> Self {
        Self::new(PipelineModel::of(stage))
    }

    pub fn model(&self) -> &PipelineModel {
        &self.model
    }

    /// The input column read as images, if the pipeline has a network stage.
    pub fn image_col(&self) -> Option<&str> {
        self.image_col.as_deref()
    }

    /// The pipeline's output for `batch`: its columns plus those the stages add, row for row.
    pub fn transform(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let batch = self.with_image_column(batch)?;
        let schema = batch.schema();
        let rows = batch.num_rows();
        // One partition, one output batch: rows stay in input order.
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(rows.max(1));
        let ctx = SessionContext::new_with_config(config);
        let df = self.model.transform(ctx.read_batch(batch)?)?;
        let out_schema: SchemaRef = Arc::clone(df.schema().inner());
        let batches = run_blocking(self.model.uid(), async move { Ok(df.collect().await?) })?;
        let out = concat_batches(&out_schema, &batches)?;
        if out.num_rows() != rows {
            return Err(Error::Fit(format!(
                "{} gave {} rows for {rows} input rows (input schema {schema})",
                self.model.uid(),
                out.num_rows()
            )));
        }
        Ok(out)
    }

    /// The schema [`BatchTransformer::transform`] gives for batches of `input` (runs the
    /// pipeline on no rows; loads its networks).
    pub fn output_schema(&self, input: SchemaRef) -> Result<SchemaRef> {
        Ok(self.transform(RecordBatch::new_empty(input))?.schema())
    }

    /// `batch` with its image column (if any) as an image struct.
    fn with_image_column(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let Some(name) = &self.image_col else {
            return Ok(batch);
        };
        let Ok(index) = batch.schema().index_of(name) else {
            return Err(Error::column(
                name,
                format!(
                    "not found in the input batch (columns: {})",
                    column_names(&batch)
                ),
            ));
        };
        if is_bytes(batch.column(index).data_type()) {
            // The network stages decode bytes themselves, keeping each bad row's reason.
            return Ok(batch);
        }
        let images = image_array(name, batch.column(index), &self.limits)?;
        let mut columns = batch.columns().to_vec();
        let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
        fields[index] = Arc::new(
            fields[index]
                .as_ref()
                .clone()
                .with_data_type(images.data_type().clone())
                .with_nullable(true),
        );
        columns[index] = images;
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }
}

fn column_names(batch: &RecordBatch) -> String {
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    names.join(", ")
}

thread_local! {
    /// Set on the threads of [`runtime`]: a synchronous run started there (a pipeline that
    /// calls a SQL function) must not wait for a task that may queue behind its own thread.
    static ON_OUR_RUNTIME: Cell<bool> = const { Cell::new(false) };
}

/// One multi-threaded runtime for every synchronous caller in the process (SQL functions,
/// [`BatchTransformer`]), made on first use and
/// never dropped (dropping a runtime inside an async context panics).
pub(crate) fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<std::io::Result<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("deep-pipelines")
                .on_thread_start(|| ON_OUR_RUNTIME.set(true))
                .enable_all()
                .build()
        })
        .as_ref()
        .map_err(|e| {
            Error::io(
                "tokio runtime",
                std::io::Error::new(e.kind(), e.to_string()),
            )
        })
}

/// Runs `future` to completion on this thread, with [`runtime`] as the context of whatever it
/// spawns.
///
/// `invoke` is synchronous and runs on a worker of the calling query's runtime, which may be
/// its only worker: `block_on` there panics, and a task spawned there could not run while this
/// thread waits. So this thread polls the future and parks between polls, and what the plan
/// spawns runs on our own runtime's workers. `unconstrained`: the caller's task budget must not
/// make the wait spin. A panic in `future` comes back as an error.
pub fn run_blocking<T>(name: &str, future: impl Future<Output = Result<T>>) -> Result<T> {
    let runtime = runtime()?;
    let run = || {
        let _context = runtime.enter();
        park_until_ready(tokio::task::unconstrained(future))
    };
    // On one of our own workers (a pipeline that calls a SQL function): hand its queue to
    // another thread first, so that nothing waits behind this one.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if ON_OUR_RUNTIME.get() {
            tokio::task::block_in_place(run)
        } else {
            run()
        }
    }));
    outcome.unwrap_or_else(|payload| {
        // The crate's one way of turning a panic's payload into an error message.
        let what = format!("SQL function `{name}`");
        crate::error::catch_panics(&what, || std::panic::resume_unwind(payload))
            .map_err(Error::from)
    })
}

/// Polls `future` on this thread until it is ready, parking the thread until it is woken.
fn park_until_ready<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}
