//! Images as Arrow: Spark's `ImageSchema` struct, decoding (files or an existing binary column),
//! and [`read_images`], which turns a folder of image files into a lazy DataFrame.
//!
//! # Layout
//! The `image` column is a struct with Spark's `ImageSchema` fields
//! `origin: Utf8, height: Int32, width: Int32, nChannels: Int32, mode: Int32, data: Binary`.
//! As in Spark, `data` holds the pixels row-major, 8 bits per channel, channels interleaved in
//! **BGR(A)** order, and `mode` is the OpenCV type code:
//!
//! | mode | OpenCV   | channels | order |
//! |------|----------|----------|-------|
//! | 0    | CV_8UC1  | 1        | grey  |
//! | 16   | CV_8UC3  | 3        | BGR   |
//! | 24   | CV_8UC4  | 4        | BGRA  |
//!
//! so image columns move between Spark and deep-pipelines (through Arrow) unchanged.
//!
//! # What each kind of input becomes
//! - 16-bit images are reduced to 8 bits per channel; grey stays grey (mode 0); grey + alpha and
//!   RGBA become BGRA (mode 24); palette images are expanded to BGR or BGRA; CMYK JPEGs are
//!   converted to BGR.
//! - **EXIF orientation is applied**: a phone photo stored sideways with an orientation tag comes
//!   out upright, as it is displayed (Spark's ImageSchema ignores the tag).
//! - Animated GIF / PNG / WebP: the first frame.
//! - Decoding limits ([`DecodeLimits`]: pixels per side, decoded bytes) are checked from the
//!   header, before any pixel buffer is allocated: a tiny file declaring 50,000 x 50,000 pixels
//!   is an error for its row, not an out-of-memory abort.
//!
//! # Errors
//! A file that is empty, truncated, not an image, or larger than [`DecodeLimits`] never fails
//! the job: its row gets a null `image` and a readable `image_error`
//! (or is dropped with [`ReadImagesOptions::drop_invalid`]).

use std::io::Cursor;

use image::ImageDecoder;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Builder, RecordBatch, StringArray, StringBuilder,
    StructArray,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::common::{ScalarValue, exec_err};
use datafusion::datasource::MemTable;
use datafusion::functions::core::expr_fn::get_field;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, SessionContext, ident, lit};

use crate::error::{Error, Result};

/// OpenCV type code of an 8-bit single-channel (grey) image.
pub const MODE_GRAY8: i32 = 0;
/// OpenCV type code of an 8-bit 3-channel (BGR) image.
pub const MODE_BGR8: i32 = 16;
/// OpenCV type code of an 8-bit 4-channel (BGRA) image.
pub const MODE_BGRA8: i32 = 24;

/// The fields of Spark's `ImageSchema` struct, in Spark's order.
pub fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("origin", DataType::Utf8, true),
        Field::new("height", DataType::Int32, false),
        Field::new("width", DataType::Int32, false),
        Field::new("nChannels", DataType::Int32, false),
        Field::new("mode", DataType::Int32, false),
        Field::new("data", DataType::Binary, false),
    ])
}

/// The Arrow type of an image column.
pub fn image_type() -> DataType {
    DataType::Struct(image_fields())
}

/// Guards against decompression bombs and absurd inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DecodeLimits {
    /// Largest width or height accepted, in pixels.
    pub max_side: u32,
    /// Largest decoded size accepted, in bytes.
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_side: 16_384,
            max_decoded_bytes: 512 * 1024 * 1024,
        }
    }
}

/// One decoded image in `ImageSchema` layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub origin: String,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub mode: i32,
    /// Row-major pixels, channels interleaved in BGR(A) order (grey for mode 0).
    pub data: Vec<u8>,
}

/// Decodes encoded bytes (PNG, JPEG, GIF, BMP, WebP) into `ImageSchema` layout.
///
/// The error is a readable sentence suitable for the `image_error` column.
pub fn decode_image(
    bytes: &[u8],
    origin: &str,
    limits: &DecodeLimits,
) -> std::result::Result<ImageRow, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".to_string());
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    if reader.format().is_none() {
        return Err("not a recognised image format (PNG, JPEG, GIF, BMP, WebP)".to_string());
    }
    let mut reader = reader;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(image_limits);
    let over_limits = |e: image::ImageError| match e {
        image::ImageError::Limits(e) => format!(
            "over the decode limits ({} px per side, {} bytes decoded): {e}",
            limits.max_side, limits.max_decoded_bytes
        ),
        e => format!("cannot decode: {}", e.to_string().trim_end()),
    };
    // The header is read and checked against the limits before any pixel buffer exists.
    let mut decoder = reader.into_decoder().map_err(over_limits)?;
    let (width, height) = decoder.dimensions();
    if decoder.total_bytes() > limits.max_decoded_bytes {
        return Err(format!(
            "image is {width}x{height}: {} bytes decoded, over the limit of {} bytes",
            decoder.total_bytes(),
            limits.max_decoded_bytes
        ));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut decoded = image::DynamicImage::from_decoder(decoder).map_err(over_limits)?;
    decoded.apply_orientation(orientation);
    let (width, height) = (decoded.width(), decoded.height());
    if width == 0 || height == 0 {
        return Err(format!("image has no pixels ({width}x{height})"));
    }
    let (mode, channels, data) = if decoded.color().has_alpha() {
        let mut px = decoded.into_rgba8().into_raw();
        px.chunks_exact_mut(4).for_each(|p| p.swap(0, 2));
        (MODE_BGRA8, 4, px)
    } else if decoded.color().channel_count() == 1 {
        (MODE_GRAY8, 1, decoded.into_luma8().into_raw())
    } else {
        let mut px = decoded.into_rgb8().into_raw();
        px.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
        (MODE_BGR8, 3, px)
    };
    Ok(ImageRow {
        origin: origin.to_string(),
        height,
        width,
        channels,
        mode,
        data,
    })
}

/// An 8-bit RGB image: `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decodes an encoded image (with `limits`) straight to 8-bit RGB, through the same
/// `ImageSchema` row the DataFrame path makes.
pub fn decode_rgb8(
    bytes: &[u8],
    origin: &str,
    limits: &DecodeLimits,
) -> std::result::Result<Rgb8, String> {
    let row = decode_image(bytes, origin, limits)?;
    to_rgb8(
        row.height as i32,
        row.width as i32,
        row.channels as i32,
        row.mode,
        &row.data,
    )
}

/// Converts an `ImageSchema` row (grey, BGR or BGRA) to RGB, checking that the fields agree.
pub fn to_rgb8(
    height: i32,
    width: i32,
    channels: i32,
    mode: i32,
    data: &[u8],
) -> std::result::Result<Rgb8, String> {
    let expected_channels = match mode {
        MODE_GRAY8 => 1,
        MODE_BGR8 => 3,
        MODE_BGRA8 => 4,
        other => {
            return Err(format!(
                "unsupported image mode {other} (expected 0 = CV_8UC1, 16 = CV_8UC3, 24 = CV_8UC4)"
            ));
        }
    };
    if channels != expected_channels {
        return Err(format!(
            "nChannels {channels} does not match mode {mode} ({expected_channels} channels)"
        ));
    }
    if height <= 0 || width <= 0 {
        return Err(format!("image has no pixels ({width}x{height})"));
    }
    let pixels = height as usize * width as usize;
    if data.len() != pixels * channels as usize {
        return Err(format!(
            "data has {} bytes, expected {width}x{height}x{channels} = {}",
            data.len(),
            pixels * channels as usize
        ));
    }
    let rgb = match channels {
        1 => data.iter().flat_map(|&g| [g, g, g]).collect(),
        c => data
            .chunks_exact(c as usize)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
    };
    Ok(Rgb8 {
        width: width as u32,
        height: height as u32,
        data: rgb,
    })
}

/// Output type of the decoding UDFs: the image struct plus the error for rows that failed.
fn decoded_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("image", image_type(), true),
        Field::new("error", DataType::Utf8, true),
    ]))
}

/// Builds the `{image, error}` struct array from per-row results (None = null input row).
fn decoded_array(rows: Vec<Option<std::result::Result<ImageRow, String>>>) -> ArrayRef {
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
                    Some(Err(message)) => error.append_value(message),
                    _ => error.append_null(),
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
    let DataType::Struct(fields) = decoded_type() else {
        unreachable!("decoded_type is a struct")
    };
    Arc::new(StructArray::new(
        fields,
        vec![Arc::new(image) as ArrayRef, Arc::new(error.finish())],
        None,
    ))
}

/// Where a decoding UDF gets its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ByteSource {
    /// One argument: a file path, read at execution time.
    File,
    /// Two arguments: encoded bytes and the origin to record.
    Column,
}

/// Decodes images inside the query, one record batch at a time, so memory stays O(batch).
///
/// Marked volatile (it reads files, and it is expensive): the optimiser must neither duplicate
/// it into a pushed-down filter nor evaluate it twice.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DecodeImageUdf {
    source: ByteSource,
    limits: DecodeLimits,
    signature: Signature,
}

impl DecodeImageUdf {
    fn new(source: ByteSource, limits: DecodeLimits) -> Self {
        let arity = match source {
            ByteSource::File => 1,
            ByteSource::Column => 2,
        };
        DecodeImageUdf {
            source,
            limits,
            signature: Signature::any(arity, Volatility::Volatile),
        }
    }
}

fn decode_file(path: &str, limits: &DecodeLimits) -> std::result::Result<ImageRow, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read file: {e}"))?
        .len();
    // An encoded image is never larger than its decoded form by more than a small factor.
    if len > limits.max_decoded_bytes {
        return Err(format!(
            "file is {len} bytes, over the limit of {} bytes",
            limits.max_decoded_bytes
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read file: {e}"))?;
    decode_image(&bytes, path, limits)
}

impl ScalarUDFImpl for DecodeImageUdf {
    fn name(&self) -> &str {
        match self.source {
            ByteSource::File => "read_image_file",
            ByteSource::Column => "decode_image",
        }
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
            let rows: Vec<_> = match self.source {
                ByteSource::File => {
                    let paths = string_array(&arrays[0], "path")?;
                    let paths: Vec<Option<&str>> = paths.iter().collect();
                    rayon_map(&paths, |p| p.map(|p| decode_file(p, &self.limits)))
                }
                ByteSource::Column => {
                    let origins = string_array(&arrays[1], "origin")?;
                    decode_bytes(&arrays[0], origins.iter(), &self.limits)?
                }
            };
            debug_assert_eq!(rows.len(), n);
            Ok(ColumnarValue::Array(decoded_array(rows)))
        })
    }
}

type DecodedRow = Option<std::result::Result<ImageRow, String>>;

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

/// Options of [`read_images`].
#[derive(Debug, Clone)]
pub struct ReadImagesOptions {
    /// Descend into sub-folders (default true).
    pub recursive: bool,
    /// File extensions to read, lower case without dot (default png, jpg, jpeg, gif, bmp, webp).
    pub extensions: Vec<String>,
    /// Number of DataFrame partitions (default: the number of cores).
    pub num_partitions: usize,
    /// Rows per record batch: bounds the decoded pixels held at once (default 32).
    pub batch_rows: usize,
    /// Fraction of files to keep, sampled by a hash of `seed` and the path relative to the folder
    /// read, so the same files are kept wherever the folder sits (default 1.0).
    pub sample_ratio: f64,
    /// Seed of the sample (default 0).
    pub seed: u64,
    /// Drop rows whose file could not be decoded instead of keeping them with a null image.
    pub drop_invalid: bool,
    /// Add a `label` column holding each file's parent folder name (default false).
    pub label_from_folder: bool,
    /// Decoding limits.
    pub limits: DecodeLimits,
}

impl Default for ReadImagesOptions {
    fn default() -> Self {
        ReadImagesOptions {
            recursive: true,
            extensions: ["png", "jpg", "jpeg", "gif", "bmp", "webp"]
                .map(String::from)
                .to_vec(),
            num_partitions: std::thread::available_parallelism().map_or(1, |n| n.get()),
            batch_rows: 32,
            sample_ratio: 1.0,
            seed: 0,
            drop_invalid: false,
            label_from_folder: false,
            limits: DecodeLimits::default(),
        }
    }
}

impl ReadImagesOptions {
    pub fn with_recursive(mut self, recursive: bool) -> Self {
        self.recursive = recursive;
        self
    }
    pub fn with_extensions(mut self, extensions: &[&str]) -> Self {
        self.extensions = extensions
            .iter()
            .map(|e| e.trim_start_matches('.').to_lowercase())
            .collect();
        self
    }
    pub fn with_num_partitions(mut self, n: usize) -> Self {
        self.num_partitions = n;
        self
    }
    pub fn with_batch_rows(mut self, n: usize) -> Self {
        self.batch_rows = n;
        self
    }
    pub fn with_sample(mut self, ratio: f64, seed: u64) -> Self {
        self.sample_ratio = ratio;
        self.seed = seed;
        self
    }
    pub fn with_drop_invalid(mut self, drop: bool) -> Self {
        self.drop_invalid = drop;
        self
    }
    pub fn with_label_from_folder(mut self, label: bool) -> Self {
        self.label_from_folder = label;
        self
    }
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    fn validate(&self) -> Result<()> {
        use crate::params::check;
        const STAGE: &str = "read_images";
        check::in_range(STAGE, "sampleRatio", self.sample_ratio, 0.0, 1.0)?;
        check::at_least(STAGE, "numPartitions", self.num_partitions as f64, 1.0)?;
        check::at_least(STAGE, "batchRows", self.batch_rows as f64, 1.0)?;
        if self.extensions.is_empty() {
            return Err(Error::param(STAGE, "extensions", "must list at least one"));
        }
        Ok(())
    }
}

/// Lists image files under `path` (sorted, so runs are reproducible).
pub fn list_image_files(path: &Path, options: &ReadImagesOptions) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let p = entry.path();
            let file_type = entry.file_type().map_err(|e| Error::io(&p, e))?;
            if file_type.is_dir() || (file_type.is_symlink() && p.is_dir()) {
                if options.recursive {
                    dirs.push(p);
                }
            } else if has_extension(&p, &options.extensions) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn has_extension(path: &Path, extensions: &[String]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Uniform in [0, 1) from (seed, path): the same files are sampled on every run.
fn sample_key(seed: u64, path: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in path.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads the image files under `path` into a DataFrame with columns
/// `origin` (path), [`label` (parent folder)], `image` (ImageSchema struct) and `image_error`.
///
/// Only the file list is built eagerly; files are read and decoded when the plan executes, one
/// small batch (`batch_rows`) at a time per partition.
///
/// ```no_run
/// # async fn demo() -> deep_pipelines::Result<()> {
/// use deep_pipelines::image::{read_images, ReadImagesOptions};
/// let ctx = datafusion::prelude::SessionContext::new();
/// let df = read_images(&ctx, "photos/", ReadImagesOptions::default().with_label_from_folder(true))?;
/// df.show().await?;
/// # Ok(()) }
/// ```
pub fn read_images(
    ctx: &SessionContext,
    path: impl AsRef<Path>,
    options: ReadImagesOptions,
) -> Result<DataFrame> {
    options.validate()?;
    let path = path.as_ref();
    let files: Vec<PathBuf> = list_image_files(path, &options)?
        .into_iter()
        .filter(|p| {
            options.sample_ratio >= 1.0
                || sample_key(
                    options.seed,
                    &p.strip_prefix(path).unwrap_or(p).to_string_lossy(),
                ) < options.sample_ratio
        })
        .collect();
    if files.is_empty() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no image files found (extensions: {})",
                    options.extensions.join(", ")
                ),
            ),
        ));
    }

    let mut fields = vec![Field::new("origin", DataType::Utf8, false)];
    if options.label_from_folder {
        fields.push(Field::new("label", DataType::Utf8, true));
    }
    let schema = Arc::new(Schema::new(fields));
    let per_partition = files.len().div_ceil(options.num_partitions);
    let mut partitions = Vec::new();
    for part in files.chunks(per_partition) {
        let mut batches = Vec::new();
        for chunk in part.chunks(options.batch_rows) {
            let origins: StringArray = chunk
                .iter()
                .map(|p| Some(p.to_string_lossy().into_owned()))
                .collect();
            let mut columns: Vec<ArrayRef> = vec![Arc::new(origins)];
            if options.label_from_folder {
                let labels: StringArray = chunk
                    .iter()
                    .map(|p| {
                        p.parent()
                            .and_then(|d| d.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                    })
                    .collect();
                columns.push(Arc::new(labels));
            }
            batches.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
        }
        partitions.push(batches);
    }
    let table = MemTable::try_new(Arc::clone(&schema), partitions)?;
    let df = ctx.read_table(Arc::new(table))?;

    let udf = ScalarUDF::new_from_impl(DecodeImageUdf::new(ByteSource::File, options.limits));
    let df = df.with_column(DECODED, udf.call(vec![ident("origin")]))?;
    let mut select = vec![ident("origin")];
    if options.label_from_folder {
        select.push(ident("label"));
    }
    select.push(get_field(ident(DECODED), "image").alias("image"));
    select.push(get_field(ident(DECODED), "error").alias("image_error"));
    let df = df.select(select)?;
    Ok(if options.drop_invalid {
        df.filter(ident("image").is_not_null())?
    } else {
        df
    })
}

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
    let udf = ScalarUDF::new_from_impl(DecodeImageUdf::new(ByteSource::Column, limits));
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
