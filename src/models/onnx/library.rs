//! Where ONNX Runtime's shared library is: nothing is downloaded or linked at build time; the
//! library comes from the machine that runs the model.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Environment variable naming `libonnxruntime.so` (or `.dylib` / `.dll`) to load.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The library the embedding program found (the Python package: the `onnxruntime` package it
/// imports beside itself).
static SET: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Uses `path` as ONNX Runtime's library when `ORT_DYLIB_PATH` is not set (before the first
/// ONNX model opens; later calls change nothing once it is loaded).
pub fn set_onnxruntime_library(path: impl Into<PathBuf>) {
    *SET.write().unwrap_or_else(|p| p.into_inner()) = Some(path.into());
}

/// ONNX Runtime's shared library (its environment is made with telemetry events off; ONNX
/// Runtime also writes a device id under `~/.cache/Microsoft` unless `ORT_DISABLE_TELEMETRY` is
/// set when it loads, which the command line and the Python package do): `$ORT_DYLIB_PATH`; else the one set with
/// [`set_onnxruntime_library`]; else the `onnxruntime` Python package's
/// (`onnxruntime/capi/libonnxruntime.so.*`) in the active virtual environment or of the
/// `python3` on `PATH`; else an error saying how to get it.
pub fn onnxruntime_library() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(ORT_DYLIB_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{ORT_DYLIB_ENV}={} is not a file", path.display()))
        };
    }
    if let Some(path) = SET.read().ok().and_then(|p| p.clone()) {
        return Ok(path);
    }
    let venv = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from);
    let packages = venv
        .iter()
        .flat_map(|v| site_packages(v))
        .map(|s| s.join("onnxruntime"))
        .chain(python_package());
    for package in packages {
        if let Some(lib) = library_in(&package.join("capi")) {
            return Ok(lib);
        }
    }
    Err(format!(
        "ONNX Runtime's library was not found: `pip install onnxruntime` (its wheel ships \
         onnxruntime/capi/libonnxruntime.so.*) into the active virtual environment or the \
         `python3` on PATH, or set {ORT_DYLIB_ENV} to the library file"
    ))
}

/// `<venv>/lib/python3.*/site-packages`.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect()
}

/// The `onnxruntime` package folder of the `python3` on `PATH`, found without importing it.
fn python_package() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; s = u.find_spec('onnxruntime'); \
             print(s.submodule_search_locations[0] if s else '')",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `libonnxruntime.so*` / `.dylib` / `onnxruntime.dll` in `dir` (the highest version first).
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.starts_with("libonnxruntime.so")
                || name.starts_with("libonnxruntime") && name.ends_with(".dylib")
                || name == "onnxruntime.dll")
                && !name.contains("providers")
        })
        .collect();
    found.sort();
    found.pop()
}
