"""Deep Learning Pipelines on Arrow, powered by the deep-pipelines Rust crate.

Local use, no Spark (pyarrow tables in, pyarrow tables out; pandas / Polars / Daft / Ray data
converts to and from pyarrow)::

    import deep_pipelines as dp
    images = dp.read_images("photos/", labelFromFolder=True)
    features = dp.DeepImageFeaturizer(modelName="EfficientNetLite0").transform(images)
    predictions = dp.PipelineModel.load("fitted-model").transform(images)

On Spark, the same stages are ``pyspark.ml`` Transformers: see :mod:`deep_pipelines.spark`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import pyarrow as pa

from . import _native

__version__ = _native.__version__
__all__ = [
    "DeepImageClassifier",
    "DeepImageClassifierModel",
    "PipelineModel",
    "available_models",
    "model_dirs",
    "read_images",
    "set_num_threads",
]

MODEL_DIR_ENV = _native.MODEL_DIR_ENV


# The models this package ships (EfficientNet-Lite0), searched after $DEEP_PIPELINES_MODEL_DIR
# and ./models by every stage whose modelDir is empty, in this process: on a Spark executor,
# the package installed there.
_native.add_model_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))


# ONNX Runtime (model files) writes a device id and telemetry under ~/.cache/Microsoft unless
# this is set when it loads; a user who wants it sets the variable to 0 first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _find_onnxruntime() -> None:
    """Points model files (``modelFile``) at the ``onnxruntime`` package installed beside this
    one (its wheel ships ``capi/libonnxruntime.so.*``), found without importing it; the
    ``ORT_DYLIB_PATH`` environment variable wins over it."""
    import glob
    import importlib.util

    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return
    for folder in (spec.submodule_search_locations or []) if spec else []:
        names = ("libonnxruntime.so*", "libonnxruntime*.dylib", "onnxruntime.dll")
        found = sorted(
            p
            for n in names
            for p in glob.glob(os.path.join(folder, "capi", n))
            if "providers" not in os.path.basename(p)
        )
        if found:
            _native.set_onnxruntime_library(found[-1])
            return


_find_onnxruntime()


def model_dirs() -> List[str]:
    """The folders searched, in order, for a model when a stage's ``modelDir`` is empty:
    ``$DEEP_PIPELINES_MODEL_DIR`` (when set), ``./models``, then the models shipped in this
    package. Each process searches its own (a Spark executor, those of the machine it runs on)."""
    return list(_native.model_dirs())


def available_models():
    """The ``modelName`` values the native core knows."""
    return list(_native.available_models())


def set_num_threads(num_threads: int) -> bool:
    """Sizes the native thread pool (decoding, resizing, the networks) for this process. Takes
    effect only before the first native work; returns False if the pool already exists."""
    return _native.init_threads(int(num_threads))


def read_images(
    path: Union[str, os.PathLike],
    recursive: bool = True,
    labelFromFolder: bool = False,
    dropInvalid: bool = False,
) -> pa.Table:
    """The images under ``path`` as a table: ``origin`` (+ ``label``, the parent folder's name),
    ``image`` (Spark's ImageSchema struct) and ``image_error`` (why a file did not decode; its
    ``image`` is then null)."""
    stream = _native.read_images(os.fspath(path), recursive, labelFromFolder, dropInvalid)
    return pa.RecordBatchReader.from_stream(stream).read_all()


Data = Union[pa.Table, pa.RecordBatch, Iterable[pa.RecordBatch]]


def _batches(data: Data) -> Iterable[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        return data.to_batches()
    if isinstance(data, pa.RecordBatch):
        return [data]
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data)
    return data


class _Native:
    """A native transformer applied batch by batch."""

    def __init__(self, native: "_native.Transformer"):
        self._native = native

    def transform_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch(self._native.transform(batch))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return pa.schema(self._native.output_schema(schema))

    def metrics(self) -> Optional[Dict[str, Any]]:
        """What the (first) network stage has done in this process: ``rows``, ``images``,
        ``forwardPasses``, ``nullRows`` (by reason), ``preprocessSeconds``, ``networkSeconds``,
        ``wallSeconds``, ``imagesPerSecond``, ``device``; None without a network stage."""
        metrics = self._native.metrics_json
        return None if metrics is None else json.loads(metrics)

    def transform(self, data: Data) -> pa.Table:
        """``data`` (a table, a record batch, or an iterable / stream of batches) with the
        stages' output columns added. Null or undecodable images give null rows."""
        schema = data.schema if isinstance(data, (pa.Table, pa.RecordBatch)) else None
        out = [self.transform_batch(b) for b in _batches(data) if b.num_rows > 0]
        if out:
            return pa.Table.from_batches(out)
        if schema is None:
            raise ValueError("transform: no batches given")
        return self.output_schema(schema).empty_table()


def _given_params(stage: str, params: Dict[str, Any], known: set) -> Dict[str, Any]:
    """The params set (``None`` leaves a default); an unknown name is an error listing the
    known ones."""
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"{stage}: unknown param(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return {k: v for k, v in params.items() if v is not None}


class _NetworkStage(_Native):
    """A network stage with Spark-named params; the native core fills in the defaults and checks
    the values (one place for both: the Rust params type). ``getParams()`` lists every param
    with its value."""

    _class = ""

    def __init__(self, **params: Any):
        self._given = _given_params(self._class, params, self._known_params())
        native = _native.Transformer.stage(self._class, self.native_params_json())
        super().__init__(native)

    @classmethod
    def _known_params(cls) -> set:
        return set(json.loads(_native.Transformer.stage(cls._class, "{}").params_json))

    def native_params_json(self) -> str:
        """The params given (an empty ``modelDir``: see :func:`model_dirs`)."""
        return json.dumps(self._given, sort_keys=True)

    def getParams(self) -> Dict[str, Any]:
        """Every param's value, defaults included."""
        return json.loads(self._native.params_json)

    def copy(self, **overrides: Any) -> "_NetworkStage":
        return type(self)(**{**self._given, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self._given.items()))
        return f"{self._class}({args})"


def _local_stage(class_name: str) -> type:
    """The local class of a native network stage, its docstring listing the native params."""
    params = json.loads(_native.Transformer.stage(class_name, "{}").explain_params)
    lines = [f"    {p['name']} (default {p['default']!r}): {p['doc']}" for p in params]
    doc = (
        f"The native ``{class_name}`` on pyarrow tables: ``transform(table)`` adds its output "
        "column(s); null or undecodable images give null rows.\n\n  Params:\n" + "\n".join(lines)
    )
    return type(class_name, (_NetworkStage,), {"_class": class_name, "__doc__": doc})


# One local class per native network stage (DeepImageFeaturizer, DeepImagePredictor, ...).
for _name in _native.network_stage_classes():
    globals()[_name] = _local_stage(_name)
    __all__.append(_name)
del _name


class PipelineModel(_Native):
    """A fitted pipeline saved by the Rust API (``PipelineModel::save``) or the command line."""

    def __init__(self, native: "_native.Transformer", path: str):
        super().__init__(native)
        self.path = path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PipelineModel":
        path = os.fspath(path)
        return cls(_native.Transformer.load(path), path)

    @property
    def stage_uids(self):
        return list(self._native.stage_uids)

    def __repr__(self) -> str:
        return f"PipelineModel({self.path!r}, stages={self.stage_uids})"


# ---------------------------------------------------------------- fine-tuning


def _print_epoch(stats: Dict[str, Any], line: str) -> None:
    """The default progress of a fine-tuning fit: one line per epoch on stderr."""
    print(f"DeepImageClassifier {line}", file=sys.stderr, flush=True)


Progress = Callable[[Dict[str, Any], str], None]


def _activation_rows(activations: pa.Array) -> List[Optional[bytes]]:
    """Each row of the trunk's output (a fixed-size list of float32) as little-endian float32
    bytes; null rows stay None."""
    if isinstance(activations, pa.ChunkedArray):
        activations = activations.combine_chunks()
    import numpy as np

    width = activations.type.list_size
    values = np.asarray(activations.values.to_numpy(zero_copy_only=False), dtype="<f4")
    start = activations.offset * width
    return [
        values[start + i * width : start + (i + 1) * width].tobytes() if valid else None
        for i, valid in enumerate(activations.is_valid().to_pylist())
    ]


class _Spill:
    """Activation rows of a fit, written to a local file (the top trains on it memory-mapped):
    memory stays that of one batch, however many rows."""

    def __init__(self, folder: str, width: int, label_col: str):
        self.path = os.path.join(folder, "activations.f32")
        self._file = open(self.path, "wb")
        self._row_bytes = 4 * width
        self._label_col = label_col
        self.labels: List[int] = []
        self.skipped = 0

    def add(self, rows: Iterable[Tuple[Optional[bytes], Any]]) -> None:
        """Appends ``(activation bytes, label)`` rows; rows missing either are skipped."""
        for values, label in rows:
            if values is None or label is None:
                self.skipped += 1
                continue
            if len(values) != self._row_bytes:
                raise RuntimeError(
                    f"DeepImageClassifier: an activation row of {len(values)} bytes, expected "
                    f"{self._row_bytes}"
                )
            if isinstance(label, bool) or float(label) < 0 or float(label) != int(label):
                raise ValueError(
                    f"DeepImageClassifier: column `{self._label_col}`: labels must be class "
                    f"indices 0, 1, 2, ...; found {label!r} (index strings with StringIndexer)"
                )
            self._file.write(values)
            self.labels.append(int(label))

    def close(self) -> None:
        self._file.close()


def _model_files(folder: str) -> Dict[str, bytes]:
    """Every file under ``folder`` by relative path: a saved model carried in memory."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, folder)] = f.read()
    return files


def _write_files(files: Dict[str, bytes], folder: str) -> None:
    for rel, data in files.items():
        target = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)


def _train_top(fit: "_native.ClassifierFit", spill: _Spill, progress: Optional[Progress]):
    """Trains the top on a closed spill; returns (saved model files, fit facts)."""
    out = os.path.join(os.path.dirname(spill.path), "model")
    report = None if progress is None else (lambda stats, line: progress(json.loads(stats), line))
    facts = fit.fit(spill.path, spill.labels, spill.skipped, out, report)
    return _model_files(out), json.loads(facts)


def _check_fit_columns(schema: pa.Schema, image_col: str, label_col: str) -> None:
    for param, col in (("inputCol", image_col), ("labelCol", label_col)):
        if col not in schema.names:
            raise ValueError(
                f"DeepImageClassifier: {param} `{col}` not found; columns: {', '.join(schema.names)}"
            )
    label_type = schema.field(label_col).type
    if not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type)):
        raise ValueError(
            f"DeepImageClassifier: labelCol `{label_col}` is {label_type}; expected class "
            "indices 0..k-1 (index strings with StringIndexer)"
        )


class DeepImageClassifier:
    """Fine-tunes a pretrained network on pyarrow tables: its last ``trainableBlocks`` blocks
    train with a new classifier head on ``labelCol`` (class indices 0..k-1); the frozen trunk
    runs once per image. ``fit(table)`` gives a :class:`DeepImageClassifierModel` adding
    ``rawPrediction``, ``probability`` and ``prediction``. The trunk's activations are spilled
    to a temporary file, so memory stays that of one batch. Params (same names and defaults as
    the Rust ``DeepImageClassifier``): ``getParams()``, ``explainParams()``."""

    def __init__(self, **params: Any):
        known = set(json.loads(_native.ClassifierFit("{}").params_json))
        self._given = _given_params("DeepImageClassifier", params, known)
        self._fit = _native.ClassifierFit(json.dumps(self._given))

    def getParams(self) -> Dict[str, Any]:
        """Every param's value, defaults included."""
        return json.loads(self._fit.params_json)

    def explainParams(self) -> str:
        return "\n".join(
            f"{p['name']}: {p['doc']} (default: {p['default']!r}, current: {p['value']!r})"
            for p in json.loads(self._fit.explain_params)
        )

    def fit(self, data: Data, progress: Optional[Progress] = _print_epoch) -> "DeepImageClassifierModel":
        """Fits on ``data`` (a table, a batch or an iterable of batches); ``progress(stats,
        line)`` after each epoch (default: a line on stderr; None: quiet)."""
        params = self.getParams()
        image_col, label_col = params["inputCol"], params["labelCol"]
        trunk = self._fit.trunk("__activations")
        with tempfile.TemporaryDirectory(prefix="deep-pipelines-fit-") as folder:
            spill = _Spill(folder, self._fit.activation_len, label_col)
            try:
                for batch in _batches(data):
                    _check_fit_columns(batch.schema, image_col, label_col)
                    if batch.num_rows == 0:
                        continue
                    out = pa.record_batch(trunk.transform(batch.select([image_col, label_col])))
                    rows = _activation_rows(out.column("__activations"))
                    spill.add(zip(rows, out.column(label_col).to_pylist()))
            finally:
                spill.close()
            files, facts = _train_top(self._fit, spill, progress)
        return DeepImageClassifierModel(files, facts)


class DeepImageClassifierModel(_Native):
    """A fine-tuned network: ``transform`` adds ``rawPrediction``, ``probability`` and
    ``prediction``. ``fitFacts`` (classes, rows, kept epoch, per-epoch history), ``save(path)``
    (the Rust API's format: ``deep_pipelines.PipelineModel.load`` and the Rust
    ``PipelineModel::load`` read it)."""

    def __init__(self, files: Dict[str, bytes], facts: Dict[str, Any]):
        with tempfile.TemporaryDirectory(prefix="deep-pipelines-model-") as folder:
            _write_files(files, folder)
            native = _native.Transformer.load(folder)
        super().__init__(native)
        self._files = files
        self.fitFacts = facts

    def save(self, path: Union[str, os.PathLike]) -> None:
        path = os.fspath(path)
        if os.path.exists(path) and os.listdir(path):
            raise FileExistsError(f"{path} exists and is not empty")
        _write_files(self._files, path)
