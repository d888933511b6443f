//! Listing, sampling and lazily reading a folder of image files into a DataFrame.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::prelude::{DataFrame, SessionContext};

use super::decode::DecodeLimits;
use super::scan::{FolderFiles, ImageFolderTable, ScanMetrics};
use crate::error::{Error, Result};

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
    /// Counts what the scans made with these options read and decode (shared by clones).
    pub metrics: ScanMetrics,
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
            metrics: ScanMetrics::default(),
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

    /// A handle on the counters of the scans made with these options: files decoded, failed,
    /// seconds spent decoding.
    pub fn metrics(&self) -> ScanMetrics {
        self.metrics.clone()
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

/// The image files under `path` as a table (see [`read_images`] for its columns): a scan that
/// reads and decodes each file once, only when `image` or `image_error` is read.
pub fn image_folder_table(
    path: impl AsRef<Path>,
    options: ReadImagesOptions,
) -> Result<ImageFolderTable> {
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
    let per_partition = files.len().div_ceil(options.num_partitions);
    Ok(ImageFolderTable::new(FolderFiles {
        partitions: files
            .chunks(per_partition)
            .map(<[PathBuf]>::to_vec)
            .collect(),
        label_from_folder: options.label_from_folder,
        drop_invalid: options.drop_invalid,
        batch_rows: options.batch_rows,
        limits: options.limits,
        metrics: options.metrics,
    }))
}

/// Reads the image files under `path` into a DataFrame with columns
/// `origin` (path), [`label` (parent folder)], `image` (ImageSchema struct) and `image_error`.
///
/// Only the file list is built eagerly. Files are read and decoded when the plan executes, once
/// each, one small batch (`batch_rows`) at a time per partition, the next batch decoded while
/// the current one is consumed; a query that reads neither `image` nor `image_error` (e.g.
/// `origin`, `label`, a count) reads no file. [`ReadImagesOptions::metrics`] counts the work.
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
    Ok(ctx.read_table(Arc::new(image_folder_table(path, options)?))?)
}
