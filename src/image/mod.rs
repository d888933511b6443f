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

mod column;
mod decode;
mod problem;
mod read;
mod scan;

use datafusion::arrow::datatypes::{DataType, Field, Fields};

pub use column::{decode_binary_array, decode_image_column, image_array, image_error_function};
pub(crate) use column::{decode_expr, decoded_type, is_bytes, struct_image};
pub use decode::{
    DecodeLimits, ImageRow, ImageView, PixelLayout, Rgb8, decode_image, decode_rgb8, to_rgb8,
};
pub use problem::{ImageProblem, ProblemKind};
pub use read::{ReadImagesOptions, image_folder_table, list_image_files, read_images};
pub use scan::{ImageFolderExec, ImageFolderTable, ScanMetrics, ScanStats};

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
