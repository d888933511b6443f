//! The UDFs behind a network stage: [`NetworkUdf`] (image struct -> the stage's output, in
//! `batchSize`-image forward passes) and [`ImageProblemUdf`] (the `errorCol`: why a row's
//! output is null). Both ask one [`RowCheck`], so a null output and its reason agree.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray, StructArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::exec_err;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};
use rayon::prelude::*;

use super::NetworkOutput;
use super::metrics::{CallStats, NetworkMetrics};
use crate::error::Result;
use crate::image::{
    DecodeLimits, ImageProblem, ImageView, ProblemKind, decoded_type, image_type, struct_image,
};
use crate::models::{LoadedModel, model_error};
use crate::preprocess::{PreprocessOptions, check_fits, preprocess_into};

/// An image column as the UDFs get it: the structs and, for rows whose struct is null, the
/// reason when the input has one (the decoder's, or the reader's `<inputCol>_error`).
#[derive(Clone, Copy)]
pub(super) struct ImageInput<'a> {
    images: &'a StructArray,
    reasons: Option<&'a StringArray>,
}

impl ImageInput<'_> {
    fn len(&self) -> usize {
        self.images.len()
    }
}

/// The UDFs' signature: an image struct, optionally with the reasons of its null rows (Utf8),
/// or the decoder's `{image, error}` struct (taken whole: reading its fields with `get_field`
/// would let DataFusion's leaf-expression pushdown copy the decoding into each reader).
pub(super) fn image_input_signature(volatility: Volatility) -> Signature {
    Signature::one_of(
        vec![
            TypeSignature::Exact(vec![image_type()]),
            TypeSignature::Exact(vec![image_type(), DataType::Utf8]),
            TypeSignature::Exact(vec![decoded_type()]),
        ],
        volatility,
    )
}

/// Which rows of an image column a network stage can take, and their network inputs.
#[derive(Debug, Clone)]
pub(super) struct RowCheck {
    pub model: Arc<LoadedModel>,
    pub options: PreprocessOptions,
    pub limits: DecodeLimits,
}

impl RowCheck {
    /// The image of `row`, its fields checked against each other, the limits and the
    /// preprocessing (no pixel read yet); the error is why its output is null.
    fn image<'a>(
        &self,
        input: ImageInput<'a>,
        row: usize,
    ) -> std::result::Result<ImageView<'a>, ImageProblem> {
        let images = input.images;
        if let Some(reasons) = input
            .reasons
            .filter(|r| images.is_null(row) && r.is_valid(row))
        {
            return Err(ImageProblem::from_reason(reasons.value(row)));
        }
        let view = struct_image(images, row, &self.limits)?;
        check_fits(&view, &self.model.manifest, &self.options)
            .map_err(|detail| ImageProblem::new(ProblemKind::DoesNotFit, detail))?;
        Ok(view)
    }

    /// Values in one image's network input.
    fn input_len(&self) -> usize {
        let size = self.model.manifest.input_size as usize;
        3 * size * size
    }

    /// Writes the network input of `row` into `out`; the row must have passed
    /// [`RowCheck::image`].
    fn input_into(&self, images: ImageInput<'_>, row: usize, out: &mut [f32]) -> Result<()> {
        let broken = |e: String| {
            model_error(
                &self.model.manifest.name,
                format!("row {row} passed its checks, then failed: {e}"),
            )
        };
        let image = self.image(images, row).map_err(|p| broken(p.to_string()))?;
        preprocess_into(&image, &self.model.manifest, &self.options, out).map_err(broken)
    }

    /// The network inputs of `rows` (which passed [`RowCheck::image`]), made in parallel.
    fn inputs(&self, images: ImageInput<'_>, rows: &[usize]) -> Result<Vec<f32>> {
        let input_len = self.input_len();
        let mut inputs = vec![0.0f32; rows.len() * input_len];
        inputs
            .par_chunks_mut(input_len)
            .zip(rows)
            .try_for_each(|(out, &row)| self.input_into(images, row, out))?;
        Ok(inputs)
    }
}

/// Whether a forward pass's error (or panic) says the device could not allocate its memory.
fn is_allocation_failure(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "out of memory",
        "outofmemory",
        "failed to allocate",
        "allocation failed",
        "could not allocate",
    ]
    .iter()
    .any(|p| message.contains(p))
}

/// The UDF behind a network stage: image struct -> one output per row, computed per record batch
/// in `batch_size`-image forward passes. Null, inconsistent or oversized images give null rows.
#[derive(Debug)]
pub(super) struct NetworkUdf<O> {
    rows: RowCheck,
    batch_size: usize,
    /// Images per forward pass the device has managed: starts at `batch_size`, halved when the
    /// device fails to allocate a batch.
    device_batch: AtomicUsize,
    output: O,
    metrics: NetworkMetrics,
    device: String,
    signature: Signature,
    name: String,
}

impl<O: NetworkOutput> NetworkUdf<O> {
    pub(super) fn new(
        rows: RowCheck,
        batch_size: usize,
        output: O,
        metrics: NetworkMetrics,
        device: &str,
    ) -> Self {
        NetworkUdf {
            name: format!("{}_{}", O::VERB, rows.model.manifest.name),
            rows,
            batch_size,
            device_batch: AtomicUsize::new(batch_size),
            output,
            metrics,
            device: device.to_string(),
            // Volatile: an expensive call the optimiser must never duplicate or inline twice.
            signature: image_input_signature(Volatility::Volatile),
        }
    }

    fn compute(&self, images: ImageInput<'_>) -> Result<ArrayRef> {
        self.metrics.started(Instant::now());
        let mut call = CallStats {
            rows: images.len() as u64,
            device: self.device.clone(),
            ..CallStats::default()
        };
        let model = &self.rows.model;
        let width = self.output.width(model);
        let outcome = self
            .run_batched(images, width, &mut call)
            .and_then(|(values, valid)| self.output.build(model, values, valid));
        self.metrics.record(&call);
        outcome
    }

    /// Runs the valid images through the network `batch_size` at a time, each giving `width`
    /// values. Images are preprocessed (in parallel) one forward pass at a time, so at most
    /// `batch_size` network inputs exist at once, whatever the record batch's size (decoding,
    /// the larger cost before the network, is overlapped upstream by the folder scan). Returns
    /// the flat values (zeros for null rows) and the validity of each row.
    fn run_batched(
        &self,
        images: ImageInput<'_>,
        width: usize,
        call: &mut CallStats,
    ) -> Result<(Vec<f32>, Vec<bool>)> {
        let mut valid = Vec::with_capacity(images.len());
        for row in 0..images.len() {
            match self.rows.image(images, row) {
                Ok(_) => valid.push(true),
                Err(problem) => {
                    call.nulls.push(problem.kind.as_str());
                    valid.push(false);
                }
            }
        }
        let present: Vec<usize> = (0..valid.len()).filter(|&i| valid[i]).collect();
        let mut values = vec![0.0f32; valid.len() * width];
        let per_pass = self.device_batch.load(Ordering::Relaxed).max(1);
        for rows in present.chunks(per_pass) {
            let out = self.forward(images, rows, call)?;
            for (k, &row) in rows.iter().enumerate() {
                values[row * width..(row + 1) * width]
                    .copy_from_slice(&out[k * width..(k + 1) * width]);
            }
        }
        Ok((values, valid))
    }

    /// Preprocesses `rows` and runs them through the network, in passes of at most the device's
    /// batch size. When the device fails to allocate a pass, that size is halved (down to one
    /// image) for this and every later pass, and the rows are preprocessed again in halves (no
    /// second copy of the inputs is kept for the retry).
    fn forward(
        &self,
        images: ImageInput<'_>,
        rows: &[usize],
        call: &mut CallStats,
    ) -> Result<Vec<f32>> {
        let limit = self.device_batch.load(Ordering::Relaxed).max(1);
        if rows.len() > limit {
            let mut out = Vec::new();
            for part in rows.chunks(limit) {
                out.extend(self.forward(images, part, call)?);
            }
            return Ok(out);
        }
        let started = Instant::now();
        let inputs = self.rows.inputs(images, rows)?;
        call.preprocess += started.elapsed();
        let started = Instant::now();
        let model = &self.rows.model;
        let batch = rows.len();
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.output.forward(model, inputs, batch)
        }))
        .unwrap_or_else(|payload| {
            Err(model_error(
                &model.manifest.name,
                format!(
                    "forward pass of {batch} images panicked: {}",
                    crate::error::panic_message(payload.as_ref())
                ),
            ))
        });
        call.network += started.elapsed();
        call.forward_passes += 1;
        match attempt {
            Ok(out) => {
                call.images += batch as u64;
                Ok(out)
            }
            Err(error) if batch > 1 && is_allocation_failure(&error.to_string()) => {
                call.batch_halvings += 1;
                self.device_batch.fetch_min(batch / 2, Ordering::Relaxed);
                self.forward(images, rows, call)
            }
            Err(error) => Err(error),
        }
    }
}

/// What both network-stage UDFs do with their call: `compute` on the image struct argument
/// (and the reasons, when given), under `catch_panics` (a panic is a query error naming the UDF).
fn on_images(
    name: &str,
    args: &ScalarFunctionArgs,
    compute: impl FnOnce(ImageInput<'_>) -> Result<ArrayRef>,
) -> datafusion::common::Result<ColumnarValue> {
    crate::error::catch_panics(name, || {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(first) = arrays.first().and_then(|a| a.as_struct_opt()) else {
            return exec_err!("{name} input must be an image struct");
        };
        let decoded = first
            .column_by_name("image")
            .and_then(|a| a.as_struct_opt());
        let (images, reasons) = match decoded {
            Some(images) => (images, first.column_by_name("error")),
            None => (first, arrays.get(1)),
        };
        let reasons = reasons.and_then(|a| a.as_string_opt::<i32>());
        let array = compute(ImageInput { images, reasons })
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        Ok(ColumnarValue::Array(array))
    })
}

/// The `errorCol` UDF: null where the network stage gives an output, else the reason it does
/// not ([`ImageProblem`]: the input's own reason for a null image, else what the struct
/// check finds). Reads no pixel: cheap next to the network.
#[derive(Debug)]
pub(super) struct ImageProblemUdf {
    rows: RowCheck,
    signature: Signature,
    name: String,
}

impl ImageProblemUdf {
    pub(super) fn new(rows: RowCheck) -> Self {
        ImageProblemUdf {
            name: format!("image_problem_{}", rows.model.manifest.name),
            rows,
            signature: image_input_signature(Volatility::Immutable),
        }
    }
}

impl PartialEq for ImageProblemUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.rows.options == other.rows.options
            && self.rows.limits == other.rows.limits
            && Arc::ptr_eq(&self.rows.model, &other.rows.model)
    }
}

impl Eq for ImageProblemUdf {}

impl Hash for ImageProblemUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.rows.options.hash(state);
    }
}

impl ScalarUDFImpl for ImageProblemUdf {
    fn name(&self) -> &str {
        &self.name
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
        on_images(&self.name, &args, |images| {
            let problems: StringArray = (0..images.len())
                .map(|row| self.rows.image(images, row).err().map(|p| p.to_string()))
                .collect();
            Ok(Arc::new(problems))
        })
    }
}

impl<O: NetworkOutput> PartialEq for NetworkUdf<O> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.batch_size == other.batch_size
            && self.output == other.output
            && self.rows.options == other.rows.options
            && Arc::ptr_eq(&self.rows.model, &other.rows.model)
            && self.metrics.same(&other.metrics)
    }
}

impl<O: NetworkOutput> Eq for NetworkUdf<O> {}

impl<O: NetworkOutput> Hash for NetworkUdf<O> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.batch_size.hash(state);
        self.output.hash(state);
    }
}

impl<O: NetworkOutput> ScalarUDFImpl for NetworkUdf<O> {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(self.output.data_type(&self.rows.model))
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        on_images(&self.name, &args, |images| self.compute(images))
    }
}
