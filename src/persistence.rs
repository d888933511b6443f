//! Saving and loading stages, pipelines and fitted pipelines, in a layout close to Spark ML's.
//!
//! ```text
//! model/                          one folder per stage
//!   _SUCCESS                      written last: a folder without it is an interrupted save
//!   metadata.json                 class, uid, libraryVersion, formatVersion, timestamp,
//!                                 paramMap, defaultParamMap, extra (small model facts),
//!                                 dataFiles (name -> sha256), stageUids (pipelines)
//!   data/model.safetensors        model data, e.g. LogisticRegressionModel's coefficients
//!   stages/0_StringIndexer_.../   a pipeline's stages, each a folder like this one
//!   stages/1_DeepImageFeaturizer_.../
//!   stages/2_LogisticRegression_.../
//! ```
//!
//! Bundled networks are saved **by reference** (model name + weight sha256 in `extra`), not
//! copied; loading checks that the installed model still has that hash. Saving is atomic: the
//! folder is written under a temporary name beside `path` and renamed into place, so a crash
//! never leaves a half-written model at `path`. Loading checks the format version, every data
//! file's sha256 and every stage's class, and names the file at fault.
//!
//! This module is the file format only (it knows no stage types): the `registry` module turns a
//! [`SavedStage`] back into a stage, by class.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::params::Params;

/// Version of the on-disk layout this library writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");
const METADATA: &str = "metadata.json";
const SUCCESS: &str = "_SUCCESS";
const CLASS_PREFIX: &str = "deep_pipelines.";

/// One stage as saved: what `metadata.json` holds, the data files, and child stages.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedStage {
    /// Class name: this crate's stages use a short name (`LogisticRegressionModel`), written
    /// with the `deep_pipelines.` prefix; a name with a dot (`my_crate.MyStage`) is kept as is.
    pub class: String,
    pub uid: String,
    /// The stage's params (Spark names).
    pub params: Value,
    /// The defaults of those params.
    pub default_params: Value,
    /// Small model facts kept in the metadata (labels, model reference, ...).
    pub extra: Value,
    /// Files under `data/`: (file name, bytes).
    pub data: Vec<(String, Vec<u8>)>,
    /// A pipeline's stages, in order.
    pub stages: Vec<SavedStage>,
}

impl SavedStage {
    /// A stage with no params, data or children yet.
    pub fn new(class: &str, uid: &str) -> Self {
        SavedStage {
            class: class.to_string(),
            uid: uid.to_string(),
            params: Value::Object(Default::default()),
            default_params: Value::Object(Default::default()),
            extra: Value::Null,
            data: Vec::new(),
            stages: Vec::new(),
        }
    }

    /// A stage whose state is its params.
    pub fn of<P: Params>(class: &str, uid: &str, params: &P) -> Self {
        SavedStage {
            params: params.to_json(),
            default_params: P::default().to_json(),
            ..Self::new(class, uid)
        }
    }

    /// A pipeline-like stage holding other stages.
    pub fn container(class: &str, uid: &str, stages: Vec<SavedStage>) -> Self {
        SavedStage {
            stages,
            ..Self::new(class, uid)
        }
    }

    pub fn with_extra(mut self, extra: Value) -> Self {
        self.extra = extra;
        self
    }

    pub fn with_data(mut self, name: &str, bytes: Vec<u8>) -> Self {
        self.data.push((name.to_string(), bytes));
        self
    }

    /// The params, validated, as the stage's params type.
    pub fn params<P: Params>(&self) -> Result<P> {
        P::from_json(self.params.clone())
    }

    /// A data file by name.
    pub fn data_file(&self, name: &str) -> Result<&[u8]> {
        self.data
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| {
                Error::Persistence(format!(
                    "{} `{}`: data file `{name}` missing",
                    self.class, self.uid
                ))
            })
    }

    /// A field of `extra`, deserialised.
    pub fn extra_field<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let value = self.extra.get(name).cloned().ok_or_else(|| {
            Error::Persistence(format!(
                "{} `{}`: metadata has no `extra.{name}`",
                self.class, self.uid
            ))
        })?;
        serde_json::from_value(value).map_err(|e| {
            Error::Persistence(format!(
                "{} `{}`: malformed `extra.{name}`: {e}",
                self.class, self.uid
            ))
        })
    }
}

/// The contents of `metadata.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    class: String,
    uid: String,
    library_version: String,
    format_version: u32,
    timestamp: u64,
    param_map: Value,
    default_param_map: Value,
    #[serde(default)]
    extra: Value,
    #[serde(default)]
    data_files: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    stage_uids: Vec<String>,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Checks that a stage uid or data-file name is one plain path component, as the writer makes
/// them (`LogisticRegression_1a2b...`, `model.safetensors`): ASCII letters, digits, `_`, `-`
/// and `.`, not starting with `.`. Names read from `metadata.json` are joined onto the model's
/// folder, so anything else (`..`, `/`, an absolute path) could reach outside it.
fn check_component(what: &str, name: &str, file: &Path) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if plain {
        Ok(())
    } else {
        Err(persistence_error(
            file,
            format!(
                "{what} {name:?} is not a plain file name (letters, digits, `_`, `-`, `.`; not starting with `.`); refusing to use it as a path"
            ),
        ))
    }
}

fn stage_dir_name(index: usize, count: usize, uid: &str) -> String {
    let width = count.saturating_sub(1).to_string().len();
    format!("{index:0width$}_{uid}")
}

fn write_stage(stage: &SavedStage, dir: &Path) -> Result<()> {
    let metadata = dir.join(METADATA);
    check_component("stage uid", &stage.uid, &metadata)?;
    for (name, _) in &stage.data {
        check_component("data file name", name, &metadata)?;
    }
    create_dir(dir)?;
    let mut data_files = std::collections::BTreeMap::new();
    if !stage.data.is_empty() {
        let data_dir = dir.join("data");
        create_dir(&data_dir)?;
        for (name, bytes) in &stage.data {
            write_file(&data_dir.join(name), bytes)?;
            data_files.insert(name.clone(), sha256_hex(bytes));
        }
    }
    for (index, child) in stage.stages.iter().enumerate() {
        let name = stage_dir_name(index, stage.stages.len(), &child.uid);
        write_stage(child, &dir.join("stages").join(name))?;
    }
    let class = if stage.class.contains('.') {
        stage.class.clone()
    } else {
        format!("{CLASS_PREFIX}{}", stage.class)
    };
    let metadata = Metadata {
        class,
        uid: stage.uid.clone(),
        library_version: LIBRARY_VERSION.to_string(),
        format_version: FORMAT_VERSION,
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        param_map: stage.params.clone(),
        default_param_map: stage.default_params.clone(),
        extra: stage.extra.clone(),
        data_files,
        stage_uids: stage.stages.iter().map(|s| s.uid.clone()).collect(),
    };
    let json = serde_json::to_vec_pretty(&metadata)
        .map_err(|e| Error::Persistence(format!("cannot serialise metadata: {e}")))?;
    write_file(&dir.join(METADATA), &json)
}

/// Writes `stage` to `path` atomically: into a temporary sibling folder, then renamed.
pub fn save(stage: &SavedStage, path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        return Err(Error::Persistence(format!(
            "{} already exists; use save_overwrite to replace it",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::Persistence(format!("{} is not a folder name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir(&parent)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let temp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let written = write_stage(stage, &temp).and_then(|()| write_file(&temp.join(SUCCESS), b""));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    if !path.exists() {
        return std::fs::rename(&temp, path).map_err(|e| {
            let _ = std::fs::remove_dir_all(&temp);
            Error::io(path, e)
        });
    }
    // Overwrite: move the old folder aside, move the new one in, then delete the old one. If
    // the second move fails the old folder goes back, so `path` holds the old model or the new
    // one, never neither.
    let old = parent.join(format!(".{name}.old-{}-{nanos}", std::process::id()));
    if let Err(e) = std::fs::rename(path, &old) {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(persistence_error(
            path,
            format!("cannot move the previous model aside ({e}); it is unchanged"),
        ));
    }
    if let Err(e) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(match std::fs::rename(&old, path) {
            Ok(()) => persistence_error(
                path,
                format!(
                    "cannot move the new model into place ({e}); the previous model is unchanged"
                ),
            ),
            Err(back) => persistence_error(
                path,
                format!(
                    "cannot move the new model into place ({e}), nor the previous one back ({back}): the previous model is at {}",
                    old.display()
                ),
            ),
        });
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// An error about the file or folder at `path`.
pub(crate) fn persistence_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Persistence(format!("{}: {message}", path.display()))
}

fn read_stage(dir: &Path) -> Result<SavedStage> {
    let meta_path = dir.join(METADATA);
    let text = std::fs::read(&meta_path)
        .map_err(|e| persistence_error(&meta_path, format!("cannot read stage metadata ({e})")))?;
    let meta: Metadata = serde_json::from_slice(&text)
        .map_err(|e| persistence_error(&meta_path, format!("malformed metadata: {e}")))?;
    if meta.format_version > FORMAT_VERSION {
        return Err(persistence_error(
            &meta_path,
            format!(
                "written in format version {} by deep-pipelines {}; this version ({LIBRARY_VERSION}) reads up to format {FORMAT_VERSION}",
                meta.format_version, meta.library_version
            ),
        ));
    }
    check_component("stage uid", &meta.uid, &meta_path)?;
    for name in meta.data_files.keys() {
        check_component("data file name", name, &meta_path)?;
    }
    for uid in &meta.stage_uids {
        check_component("stage uid", uid, &meta_path)?;
    }
    let class = meta
        .class
        .strip_prefix(CLASS_PREFIX)
        .map_or_else(|| meta.class.clone(), str::to_string);
    let mut data = Vec::new();
    for (name, expected) in &meta.data_files {
        let path = dir.join("data").join(name);
        let bytes = std::fs::read(&path)
            .map_err(|e| persistence_error(&path, format!("cannot read data file ({e})")))?;
        let found = sha256_hex(&bytes);
        if &found != expected {
            return Err(persistence_error(
                &path,
                format!("data file has sha256 {found}, the metadata expects {expected}"),
            ));
        }
        data.push((name.clone(), bytes));
    }
    let mut stages = Vec::with_capacity(meta.stage_uids.len());
    for (index, uid) in meta.stage_uids.iter().enumerate() {
        let name = stage_dir_name(index, meta.stage_uids.len(), uid);
        let child = read_stage(&dir.join("stages").join(&name))?;
        if &child.uid != uid {
            return Err(persistence_error(
                &dir.join("stages").join(&name),
                format!("stage uid `{}`, the pipeline expects `{uid}`", child.uid),
            ));
        }
        stages.push(child);
    }
    Ok(SavedStage {
        class,
        uid: meta.uid,
        params: meta.param_map,
        default_params: meta.default_param_map,
        extra: meta.extra,
        data,
        stages,
    })
}

/// Reads a saved folder, checking that the save completed.
pub fn read(path: &Path) -> Result<SavedStage> {
    if !path.is_dir() {
        return Err(persistence_error(
            path,
            "no saved stage here (not a folder)",
        ));
    }
    if !path.join(SUCCESS).is_file() {
        return Err(persistence_error(
            path,
            format!("incomplete save: `{SUCCESS}` is missing (the save was interrupted?)"),
        ));
    }
    read_stage(path)
}
