//! Weight files: safetensors and PyTorch checkpoints read into a module (a `.pth` is parsed as
//! data, never run), checked before anything is allocated (size, header, sha256), with errors
//! that name tensors as the file spells them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{
    ApplyError, ApplyResult, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};
use sha2::{Digest, Sha256};

use super::layers::NameMap;
use super::model_error;
use crate::error::Result;

/// Reads a weight file, refusing one larger than `max_bytes` before reading it.
pub fn read_weight_file(path: &Path, max_bytes: u64, model: &str) -> Result<Vec<u8>> {
    check_weight_size(path, max_bytes, model)?;
    std::fs::read(path).map_err(|e| {
        model_error(
            model,
            format!("cannot read weight file {}: {e}", path.display()),
        )
    })
}

/// Refuses a weight file larger than `max_bytes`, from its metadata, before reading it.
fn check_weight_size(path: &Path, max_bytes: u64, model: &str) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| {
            model_error(
                model,
                format!("cannot read weight file {}: {e}", path.display()),
            )
        })?
        .len();
    if len > max_bytes {
        return Err(model_error(
            model,
            format!(
                "weight file {} is {len} bytes, more than the {max_bytes} the architecture can need",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The most bytes a safetensors file for `module` can hold: 8 bytes per parameter (f64 at most)
/// plus a header of up to the format's 100 MB cap.
pub fn max_weight_bytes<M: Module>(module: &M) -> u64 {
    module.num_params() as u64 * 8 + 100_000_000
}

/// Checks an untrusted safetensors buffer before anything is allocated for its tensors: the
/// header parses, offsets lie inside the buffer and match each shape, every tensor is F32 and
/// none holds more values than the whole module.
/// Returns the tensor names.
pub fn check_safetensors_header(
    bytes: &[u8],
    max_values: usize,
    what: &str,
) -> Result<Vec<String>, String> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("{what}: not a valid safetensors file: {e}"))?;
    let data_len = bytes.len().saturating_sub(8 + header_len(bytes));
    let mut names = Vec::new();
    for (name, info) in metadata.tensors() {
        // PyTorch's BatchNorm step counters (int64 scalars) are ignored on load.
        let counter = is_batch_counter(&name);
        if info.dtype != safetensors::Dtype::F32 && !counter {
            return Err(format!(
                "{what}: tensor `{name}` has dtype {:?}, expected F32",
                info.dtype
            ));
        }
        let values = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&v| v <= max_values)
            .ok_or_else(|| {
                format!(
                    "{what}: tensor `{name}` has shape {:?}, larger than the whole model",
                    info.shape
                )
            })?;
        let (start, end) = info.data_offsets;
        if end > data_len || start > end || end - start != values * info.dtype.bitsize() / 8 {
            return Err(format!(
                "{what}: tensor `{name}` has offsets {start}..{end} that do not fit its shape {:?} or the file",
                info.shape
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// `bn.num_batches_tracked`: a training counter PyTorch saves with every BatchNorm; no weight.
fn is_batch_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

fn header_len(bytes: &[u8]) -> usize {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, |b| u64::from_le_bytes(b) as usize)
}

/// Loads safetensors weights (PyTorch layout) from a file into `module`, failing on any
/// missing, unexpected or mis-shaped tensor and naming it.
pub fn load_safetensors<M: ModuleSnapshot + Module, A: AsRef<str>, B: AsRef<str>>(
    module: &mut M,
    path: &Path,
    name_map: &[(A, B)],
    model: &str,
) -> Result<()> {
    require_file(path, model)?;
    let bytes = read_weight_file(path, max_weight_bytes(module), model)?;
    load_safetensors_bytes(module, bytes, &path.display().to_string(), name_map, model)
}

fn require_file(path: &Path, model: &str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(model_error(
            model,
            format!("weight file {} not found", path.display()),
        ))
    }
}

/// [`load_safetensors`] from bytes already read (`what` names them in errors). The header is
/// checked by [`check_safetensors_header`] first: hostile files fail before any allocation.
pub fn load_safetensors_bytes<M: ModuleSnapshot + Module, A: AsRef<str>, B: AsRef<str>>(
    module: &mut M,
    bytes: Vec<u8>,
    what: &str,
    name_map: &[(A, B)],
    model: &str,
) -> Result<()> {
    let file_names = check_safetensors_header(&bytes, module.num_params(), what)
        .map_err(|e| model_error(model, e))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .validate(false);
    for (from, to) in name_map {
        store = store.with_key_remapping(from.as_ref(), to.as_ref());
    }
    apply_store(module, &mut store, what, model, || {
        FileNames::new(file_names, name_map)
    })
}

/// Loads a PyTorch checkpoint (`torch.save(state_dict)`, zip or legacy format) into `module`.
/// burn-store's reader parses the pickle stream as data and never executes it.
pub fn load_pytorch<M: ModuleSnapshot + Module, A: AsRef<str>, B: AsRef<str>>(
    module: &mut M,
    path: &Path,
    name_map: &[(A, B)],
    model: &str,
) -> Result<()> {
    require_file(path, model)?;
    check_weight_size(path, max_weight_bytes(module), model)?;
    let mut store = PytorchStore::from_file(path)
        .map_indices_contiguous(false)
        .allow_partial(true)
        .validate(false);
    for (from, to) in name_map {
        store = store.with_key_remapping(from.as_ref(), to.as_ref());
    }
    apply_store(
        module,
        &mut store,
        &path.display().to_string(),
        model,
        || {
            // Only on error: the file's own names, to report problems as the checkpoint spells them.
            let names = PytorchStore::from_file(path)
                .map_indices_contiguous(false)
                .keys()
                .unwrap_or_default();
            FileNames::new(names, name_map)
        },
    )
}

/// Applies a store to `module` and turns missing, unexpected and mis-shaped tensors into one
/// error naming up to five of them, as the file names them (`file_names` is called only then).
fn apply_store<M: ModuleSnapshot, S: ModuleStore>(
    module: &mut M,
    store: &mut S,
    what: &str,
    model: &str,
    file_names: impl FnOnce() -> FileNames,
) -> Result<()>
where
    S::Error: std::fmt::Display,
{
    let result: ApplyResult = module
        .load_from(store)
        .map_err(|e| model_error(model, format!("reading {what}: {e}")))?;
    let unused: Vec<&String> = result
        .unused
        .iter()
        .filter(|p| !is_batch_counter(p))
        .collect();
    if result.errors.is_empty() && result.missing.is_empty() && unused.is_empty() {
        return Ok(());
    }
    let names = file_names();
    let mut problems: Vec<String> = result
        .errors
        .iter()
        .map(|e| match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => {
                let note = if expected.num_dims() == 2 {
                    " (2-d shapes in burn's [in, out] layout: PyTorch's linear weights transposed)"
                } else {
                    ""
                };
                format!(
                    "tensor {} has shape {:?}, the architecture needs {:?}{note}",
                    names.name(path),
                    found.as_slice(),
                    expected.as_slice()
                )
            }
            other => format!("{other:?}"),
        })
        .collect();
    problems.extend(
        result
            .missing
            .iter()
            .map(|(p, _)| format!("tensor `{p}` missing from the file")),
    );
    problems.extend(
        unused
            .iter()
            .map(|p| format!("unexpected tensor {} in the file", names.name(p))),
    );
    let shown = problems.len().min(5);
    Err(model_error(
        model,
        format!(
            "weights {what} do not match the architecture ({} problem(s)): {}{}",
            problems.len(),
            problems[..shown].join("; "),
            if problems.len() > shown { "; ..." } else { "" }
        ),
    ))
}

/// Module paths back to the weight file's names, by running the name map's rules forward on
/// every name in the file (as burn-store's key remapper does).
struct FileNames(HashMap<String, String>);

impl FileNames {
    fn new<A: AsRef<str>, B: AsRef<str>>(names: Vec<String>, rules: &[(A, B)]) -> Self {
        let rules: Vec<(regex::Regex, &str)> = rules
            .iter()
            .filter_map(|(from, to)| Some((regex::Regex::new(from.as_ref()).ok()?, to.as_ref())))
            .collect();
        let map = names
            .into_iter()
            .map(|original| {
                let mut mapped = original.clone();
                for (pattern, to) in &rules {
                    if pattern.is_match(&mapped) {
                        mapped = pattern.replace_all(&mapped, *to).into_owned();
                    }
                }
                (mapped, original)
            })
            .collect();
        FileNames(map)
    }

    /// `` `file.name` (module path `a.b`) ``, or just `` `a.b` `` when the names agree.
    fn name(&self, path: &str) -> String {
        match self.0.get(path) {
            Some(original) if original != path => format!("`{original}` (module path `{path}`)"),
            _ => format!("`{path}`"),
        }
    }
}

/// Where a model's weights are: a file, or safetensors bytes built into this binary (the
/// default model, with the `embedded-model` feature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    File(PathBuf),
    Embedded(&'static [u8]),
}

impl WeightSource {
    /// The file, or `<built-in weights>`, for messages.
    pub fn describe(&self) -> String {
        match self {
            WeightSource::File(path) => path.display().to_string(),
            WeightSource::Embedded(_) => "<built-in weights>".to_string(),
        }
    }
}

/// Loads weights into `module` from a safetensors file or a PyTorch checkpoint (by extension:
/// `.pth`, `.pt`, `.bin` are PyTorch), checking the sha256 when one is given.
pub fn load_weights<M: ModuleSnapshot + Module>(
    module: M,
    path: &Path,
    names: &NameMap,
    sha256: Option<&str>,
    model: &str,
) -> Result<M> {
    load_weights_from(
        module,
        &WeightSource::File(path.to_path_buf()),
        names,
        sha256,
        model,
    )
}

/// [`load_weights`] from a file or from built-in bytes (safetensors).
pub fn load_weights_from<M: ModuleSnapshot + Module>(
    mut module: M,
    source: &WeightSource,
    names: &NameMap,
    sha256: Option<&str>,
    model: &str,
) -> Result<M> {
    let path = match source {
        WeightSource::File(path) => path,
        WeightSource::Embedded(bytes) => {
            names.check().map_err(|e| model_error(model, e))?;
            let what = source.describe();
            if let Some(sha) = sha256 {
                check_sha256(Sha256::digest(bytes), Path::new(&what), sha, model)?;
            }
            load_safetensors_bytes(&mut module, bytes.to_vec(), &what, &names.0, model)?;
            return Ok(module);
        }
    };
    require_file(path, model)?;
    names.check().map_err(|e| model_error(model, e))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(extension.as_str(), "pth" | "pt" | "bin") {
        if let Some(sha) = sha256 {
            // Hashed in chunks: a 550 MB VGG checkpoint is not held twice in memory.
            check_weight_size(path, max_weight_bytes(&module), model)?;
            check_sha256(file_sha256(path, model)?, path, sha, model)?;
        }
        load_pytorch(&mut module, path, &names.0, model)?;
    } else {
        let bytes = read_weight_file(path, max_weight_bytes(&module), model)?;
        if let Some(sha) = sha256 {
            check_sha256(Sha256::digest(&bytes), path, sha, model)?;
        }
        load_safetensors_bytes(
            &mut module,
            bytes,
            &path.display().to_string(),
            &names.0,
            model,
        )?;
    }
    Ok(module)
}

/// Checks the file's sha256 against `expected`: the whole digest, or its first digits.
fn check_sha256(digest: impl AsRef<[u8]>, path: &Path, expected: &str, model: &str) -> Result<()> {
    let found = hex::encode(digest);
    let expected_lower = expected.to_ascii_lowercase();
    if expected.len() < 8 || !found.starts_with(&expected_lower) {
        return Err(model_error(
            model,
            format!(
                "weight file {} has sha256 {found}, the manifest expects {expected}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The sha256 of a file, read 1 MiB at a time.
fn file_sha256(path: &Path, model: &str) -> Result<impl AsRef<[u8]>> {
    use std::io::Read;
    let read_error = |e: std::io::Error| {
        model_error(
            model,
            format!("cannot read weight file {}: {e}", path.display()),
        )
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buffer[..n]);
    }
}
