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
from typing import Any, Dict, Iterable, List, Optional, Union

import pyarrow as pa

from . import _native

__version__ = _native.__version__
__all__ = [
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


class _NetworkStage(_Native):
    """A network stage with Spark-named params; the native core fills in the defaults and checks
    the values (one place for both: the Rust params type). ``getParams()`` lists every param
    with its value."""

    _class = ""

    def __init__(self, **params: Any):
        known = self._known_params()
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{self._class}: unknown param(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        self._given = {k: v for k, v in params.items() if v is not None}
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
