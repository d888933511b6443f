//! A saved network stage carries its model file: the `.onnx` (with its sha256, checked on
//! load), its full description and its class names go into the stage's `data/`, so the saved
//! pipeline runs on another machine or in a Spark executor with nothing else.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{ModelReference, NetworkParams};
use crate::error::{Error, Result};
use crate::persistence::{SavedStage, persistence_error, sha256_hex};

const MODEL: &str = "model.onnx";
const DESCRIPTION: &str = "model.json";
const LABELS: &str = "labels.txt";

/// `saved` (a stage whose `modelFile` is set) with the model file, its description and class
/// names as data files, and `modelFile` naming the saved copy.
pub(super) fn save(params: &NetworkParams, saved: SavedStage) -> Result<SavedStage> {
    let path = Path::new(&params.model_file);
    let model = params.model()?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    #[cfg(feature = "onnx")]
    crate::models::onnx_file_to_save(path, &bytes)?;
    let sha256 = sha256_hex(&bytes);
    let mut manifest = model.manifest.clone();
    manifest.weights.file = MODEL.into();
    manifest.weights.sha256 = Some(sha256.clone());
    let mut saved = saved;
    if let Some(labels) = &model.labels {
        manifest.labels = Some(LABELS.into());
        saved = saved.with_data(LABELS, labels.join("\n").into_bytes());
    }
    let description = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Persistence(format!("{}: {e}", path.display())))?;
    if let Some(p) = saved.params.as_object_mut() {
        p.insert("modelFile".into(), Value::from(MODEL));
        p.remove("modelManifest");
    }
    let reference = ModelReference {
        name: manifest.name.clone(),
        weights_file: MODEL.into(),
        sha256: Some(sha256),
    };
    Ok(saved
        .with_extra(reference.extra())
        .with_data(MODEL, bytes)
        .with_data(DESCRIPTION, description))
}

/// Points a saved stage's `modelFile` (in its params `json`) at a local copy of its model: a
/// folder named by the file's sha256 under the temporary directory, written once per machine.
pub(super) fn restore(saved: &SavedStage, json: &mut Value) -> Result<()> {
    let bytes = saved.data_file(MODEL)?;
    let sha256 = sha256_hex(bytes);
    let expected = saved.extra_field::<ModelReference>("model")?.sha256;
    if expected.as_deref() != Some(sha256.as_str()) {
        return Err(Error::Persistence(format!(
            "{} `{}`: the saved model file has sha256 {sha256}, the metadata says {}",
            saved.class,
            saved.uid,
            expected.as_deref().unwrap_or("(none)")
        )));
    }
    let mut files = vec![(MODEL, bytes), (DESCRIPTION, saved.data_file(DESCRIPTION)?)];
    if let Ok(labels) = saved.data_file(LABELS) {
        files.push((LABELS, labels));
    }
    let folder = local_copy(&sha256, &files)?;
    json["modelFile"] = Value::from(folder.join(MODEL).to_string_lossy().into_owned());
    json["modelManifest"] = Value::from("");
    Ok(())
}

/// `<tmp>/deep-pipelines-models/<sha256>` holding `files`: reused when its model file has that
/// sha256, else written to a fresh folder and renamed into place.
fn local_copy(sha256: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let parent = std::env::temp_dir().join("deep-pipelines-models");
    let folder = parent.join(sha256);
    let intact = |folder: &Path| {
        std::fs::read(folder.join(MODEL)).is_ok_and(|b| sha256_hex(&b) == sha256)
            && files
                .iter()
                .all(|(name, bytes)| std::fs::read(folder.join(name)).is_ok_and(|b| b == *bytes))
    };
    if intact(&folder) {
        return Ok(folder);
    }
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let partial = parent.join(format!(
        "{sha256}.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    for (name, bytes) in files {
        let path = partial.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    if std::fs::rename(&partial, &folder).is_err() {
        // Another process wrote it first, or a stale copy is in the way.
        let _ = std::fs::remove_dir_all(&partial);
        if !intact(&folder) {
            return Err(persistence_error(
                &folder,
                "a different model is in the way of the saved model's local copy",
            ));
        }
    }
    Ok(folder)
}
