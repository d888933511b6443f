"""The command line's features Parquet, with null rows, opens in every reader users have: pyarrow
(the oldest the package declares, `pyarrow>=15`, and the current one), pandas, Polars, DuckDB
and Spark. The binary is `$DEEP_PIPELINES_CLI` or the release build of `cargo test --release`;
the oldest pyarrow runs in the venv of `$DEEP_PIPELINES_PYARROW_MIN_PYTHON` (.ci/run makes it:
`pip install pyarrow==15.0.2 "numpy<2"`)."""

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from test_reasons import FILES

MIN_PYARROW = "15."


def _required(what: str, found):
    """`found`, or a skip saying what is missing (a failure when CI requires everything)."""
    if found:
        return found
    if os.environ.get("DEEP_PIPELINES_REQUIRE_ALL") == "1":
        pytest.fail(f"{what} is required here (DEEP_PIPELINES_REQUIRE_ALL=1)")
    pytest.skip(f"{what} not found")


def _cli() -> str:
    given = os.environ.get("DEEP_PIPELINES_CLI")
    targets = [os.environ.get("CARGO_TARGET_DIR"), str(ROOT / "target")]
    found = [given] if given else [os.path.join(t, "release", "deep-pipelines") for t in targets if t]
    return _required("the deep-pipelines binary", next((p for p in found if os.path.isfile(p)), None))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """The CLI's `featurize` of the five hostile files: one good row, three null ones (Spark's
    reader lists no empty file, so the empty one is left out here)."""
    folder = tmp_path_factory.mktemp("readers")
    images = folder / "images"
    images.mkdir()
    for name, (data, _) in FILES.items():
        if data:
            (images / name).write_bytes(data)
    out = folder / "features.parquet"
    env = {k: v for k, v in os.environ.items() if k != "DEEP_PIPELINES_MODEL_DIR"}
    run = subprocess.run(
        [_cli(), "featurize", str(images), "-o", str(out), "-q"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return out


def _rows(names, features):
    """file name -> feature list length (None: a null row)."""
    return {Path(n).name: (None if f is None else len(f)) for n, f in zip(names, features)}


EXPECTED = {"bomb.png": None, "cut.png": None, "notes.png": None, "photo.png": 1280}


def test_pyarrow_pandas_polars_and_duckdb_read_null_rows(features):
    import duckdb
    import pandas as pd
    import polars as pl

    table = pq.read_table(features)
    assert _rows(table["origin"].to_pylist(), table["features"].to_pylist()) == EXPECTED
    frame = pd.read_parquet(features)
    assert _rows(frame["origin"], [None if f is None else list(f) for f in frame["features"]]) == EXPECTED
    frame = pl.read_parquet(features)
    assert _rows(frame["origin"].to_list(), frame["features"].to_list()) == EXPECTED
    rows = duckdb.sql(f"SELECT origin, features FROM read_parquet('{features}')").fetchall()
    assert _rows([r[0] for r in rows], [r[1] for r in rows]) == EXPECTED


def test_the_oldest_declared_pyarrow_reads_null_rows(features):
    python = _required("a venv with the oldest pyarrow", os.environ.get("DEEP_PIPELINES_PYARROW_MIN_PYTHON"))
    script = (
        "import json, sys, pyarrow, pyarrow.parquet as pq\n"
        "t = pq.read_table(sys.argv[1])\n"
        "print(json.dumps([pyarrow.__version__, t['origin'].to_pylist(),"
        " [None if f is None else len(f) for f in t['features'].to_pylist()]]))\n"
    )
    run = subprocess.run([python, "-c", script, str(features)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    version, origins, lengths = json.loads(run.stdout)
    assert version.startswith(MIN_PYARROW), version
    assert {Path(o).name: n for o, n in zip(origins, lengths)} == EXPECTED


def test_spark_reads_null_rows(spark, features):
    rows = spark.read.parquet(str(features)).select("origin", "features").collect()
    assert _rows([r.origin for r in rows], [r.features for r in rows]) == EXPECTED
