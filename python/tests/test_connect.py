"""deep_pipelines.spark over Spark Connect: the seed flow (StringIndexer, DeepImageFeaturizer and
Spark's LogisticRegression in a Pipeline) fitted, applied, saved with Spark's writer and loaded,
the SQL functions of register_image_udf, and a Rust-saved pipeline through transform().

The Connect server is a JVM of its own (pyspark's SparkConnectServer through spark-submit, on
127.0.0.1, an ephemeral port, an auth token), started for this module and stopped after it. Not
``SparkSession.builder.remote("local[2]")``: that starts the server inside this process's
py4j JVM, so it refuses to start while the classic ``spark`` session of conftest (one per run)
is alive, and stopping that session would break the test files after this one. A client
session here only needs gRPC; while it is open, pyspark's ``SPARK_CONNECT_MODE_ENABLED`` makes
pyspark.ml and pyspark.sql.functions build Connect plans, so the module restores the
environment when it ends, and the classic tests after it run as before.

Needs the Connect client's packages (grpcio, grpcio-status, protobuf, googleapis-common-protos,
zstandard: ``pyspark[connect]``); skipped without them."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from conftest import DATA, FIXTURES, key, seed_pipeline, spark_images

TOLERANCE = 1e-5
# What the client sets while a Connect session is open (restored after the module).
CONNECT_ENV = ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE", "SPARK_LOCAL_REMOTE", "SPARK_API_MODE")
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def _connect_unavailable():
    try:
        from pyspark.sql.connect.utils import check_dependencies

        check_dependencies()
    except Exception as e:  # ImportError, or PySparkImportError naming the missing package
        return str(e)
    return None


_MISSING = _connect_unavailable()
pytestmark = pytest.mark.skipif(
    _MISSING is not None, reason=f"Spark Connect client packages missing: {_MISSING}"
)


def _stop(process):
    """Stops the server: SIGTERM to its process group (the JVM; its Python workers, in groups of
    their own, exit with it), a bounded wait, then SIGKILL to what is left of the group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:  # workers the JVM left behind, and the JVM if it ignored SIGTERM
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


# The server's log4j2 configuration (its own SPARK_CONF_DIR: no spark-defaults.conf or
# spark-env.sh of the machine leaks in): warnings, plus the line that gives the port.
LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.server.name = org.apache.spark.sql.connect.service.SparkConnectServer
logger.server.level = info
"""
STARTED = re.compile(rb"Spark Connect server started at: ([0-9.]+):(\d+)")


if sys.platform.startswith("linux"):  # loaded here: the child between fork and exec imports nothing
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
else:  # pragma: no cover
    _PRCTL = None


def _die_with_parent():
    """In the child before exec (Linux): SIGTERM when this pytest process dies, so that a killed
    run leaves no server behind (PR_SET_PDEATHSIG survives spark-submit's execs)."""
    if _PRCTL is not None:
        _PRCTL(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    """A Spark Connect server (local[2], its own JVM) on 127.0.0.1: its `sc://` URL."""
    from pyspark.find_spark_home import _find_spark_home

    spark_home = os.environ.get("SPARK_HOME") or _find_spark_home()
    folder = tmp_path_factory.mktemp("connect")
    (folder / "conf").mkdir()
    (folder / "conf" / "log4j2.properties").write_text(LOG4J2)
    log_path = folder / "server.log"
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in CONNECT_ENV}
    env.update(
        SPARK_HOME=spark_home,
        SPARK_CONF_DIR=str(folder / "conf"),
        SPARK_LOCAL_IP="127.0.0.1",
        PYSPARK_PYTHON=sys.executable,
        SPARK_CONNECT_AUTHENTICATE_TOKEN=token,  # in the environment: not in `ps`
    )
    command = [
        os.path.join(spark_home, "bin", "spark-submit"),
        "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--name", "deep-pipelines-connect-tests",
        "--master", "local[2]",
        "--driver-memory", "2g",
        "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", "spark.connect.grpc.binding.port=0",  # the OS picks a free one: no race
        "--conf", "spark.driver.host=127.0.0.1",
        "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.shuffle.partitions=2",
        "--conf", "spark.sql.session.timeZone=UTC",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        # spark-submit and spark-class exec the JVM: this pid (and process group) is the server.
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        port = None
        while port is None:
            found = STARTED.search(log_path.read_bytes())
            if found:
                port = int(found.group(2))
            elif process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_bytes()[-4000:].decode(errors="replace")
                pytest.fail(f"the Spark Connect server did not start (exit {process.poll()}):\n{tail}")
            else:
                time.sleep(0.25)
        # `localhost` with a token: gRPC local (loopback) credentials, no TLS needed.
        yield f"sc://localhost:{port}/;token={token}"
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def connect(connect_url):
    """A Spark Connect client session for this module; the process's environment (and so the
    classic mode of the other test files) is restored when it ends."""
    from pyspark.sql import SparkSession

    saved = {k: os.environ.get(k) for k in CONNECT_ENV}
    session = None
    try:
        # `create`, not `getOrCreate`: the latter refuses while a classic session is active.
        session = SparkSession.builder.remote(connect_url).create()
        assert session.version.startswith("4."), session.version
        yield session
    finally:
        if session is not None:
            session.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The seed flow (examples/spark/transfer_learning.py), planned by this client, run by the server.
@pytest.fixture(scope="module")
def fitted(connect):
    return seed_pipeline().fit(spark_images(connect, DATA / "train"))


def test_the_seed_flow_reaches_084_over_connect(connect, fitted):
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.connect.dataframe import DataFrame as ConnectDataFrame

    predictions = fitted.transform(spark_images(connect, DATA / "test"))
    assert isinstance(predictions, ConnectDataFrame)
    assert isinstance(predictions.schema["features"].dataType, VectorUDT)
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(predictions)
    print(f"Spark Connect: test accuracy {accuracy:.4f}")
    assert accuracy >= 0.84


def test_the_fitted_pipeline_saves_and_loads_over_connect(connect, fitted, few_images, tmp_path):
    from pyspark.ml import PipelineModel

    from deep_pipelines.spark import DeepImageFeaturizer

    path = str(tmp_path / "fitted")  # the server's file system: the same machine here
    fitted.write().overwrite().save(path)

    def predictions(model):
        df = spark_images(connect, few_images).where("class != 'broken'")
        rows = model.transform(df).select("image.origin", "prediction", "probability").collect()
        return {key(r.origin): (r.prediction, r.probability.toArray()) for r in rows}

    before = predictions(fitted)
    loaded = PipelineModel.load(path)
    featurizer = loaded.stages[1]
    assert isinstance(featurizer, DeepImageFeaturizer)
    assert featurizer.getModelName() == "EfficientNetLite0" and featurizer.getOutputCol() == "features"
    after = predictions(loaded)
    assert before.keys() == after.keys() and len(before) == 64
    for k in before:
        assert before[k][0] == after[k][0]
        assert np.abs(before[k][1] - after[k][1]).max() <= 1e-9


def test_stages_and_an_unfitted_pipeline_save_and_load_over_connect(connect, tmp_path):
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression

    from deep_pipelines.spark import DeepImageFeaturizer, DeepImagePredictor

    featurizer = DeepImageFeaturizer(modelName="ResNet50", batchSize=8, outputFormat="array")
    featurizer.write().save(str(tmp_path / "featurizer"))  # not .overwrite(): see below
    loaded = DeepImageFeaturizer.load(str(tmp_path / "featurizer"))
    assert loaded.uid == featurizer.uid
    assert (loaded.getModelName(), loaded.getBatchSize(), loaded.getOutputFormat()) == ("ResNet50", 8, "array")

    pipeline = Pipeline(stages=[DeepImagePredictor(topK=2), LogisticRegression(maxIter=7)])
    pipeline.write().overwrite().save(str(tmp_path / "pipeline"))  # Connect's own writer
    stages = Pipeline.load(str(tmp_path / "pipeline")).getStages()
    assert [type(s) for s in stages] == [DeepImagePredictor, LogisticRegression]
    assert stages[0].getTopK() == 2 and stages[1].getMaxIter() == 7


def test_a_stage_overwrites_its_save_over_connect(connect, tmp_path):
    from deep_pipelines.spark import DeepImageFeaturizer

    path = str(tmp_path / "featurizer")
    DeepImageFeaturizer(batchSize=8).write().save(path)
    DeepImageFeaturizer(batchSize=4).write().overwrite().save(path)
    assert DeepImageFeaturizer.load(path).getBatchSize() == 4


def test_sql_functions_over_connect(connect, few_images):
    from pyspark.sql.types import FloatType, IntegerType, StringType, StructType

    import deep_pipelines as dp
    from deep_pipelines.spark import register_image_udf

    register_image_udf(connect, "imagenet_top5", modelName="EfficientNetLite0")
    register_image_udf(connect, "classify", model_path=str(FIXTURES / "saved_v0_1" / "pipeline_model"))
    spark_images(connect, few_images).createOrReplaceTempView("few_images")
    df = connect.sql(
        "SELECT image.origin AS origin, imagenet_top5(image) AS top, classify(image) AS c "
        "FROM few_images"
    )
    assert df.schema["c"].dataType == StructType.fromDDL(
        "prediction DOUBLE, label STRING, probability DOUBLE"
    )
    entry = df.schema["top"].dataType.elementType
    assert [(f.name, f.dataType) for f in entry.fields] == [
        ("class", IntegerType()), ("label", StringType()), ("probability", FloatType())
    ]  # fmt: skip
    rows = {key(r.origin): r for r in df.collect()}
    assert len(rows) == 65 and rows["broken/corrupt.png"].top is None

    local = dp.DeepImagePredictor(topK=5).transform(dp.read_images(few_images))
    expected = dict(zip(map(key, local["origin"].to_pylist()), local["predicted_labels"].to_pylist()))
    rust = dp.PipelineModel.load(FIXTURES / "saved_v0_1" / "pipeline_model").transform(
        dp.read_images(few_images)
    )
    predicted = dict(zip(map(key, rust["origin"].to_pylist()), rust["predictedLabel"].to_pylist()))
    for k, row in rows.items():
        if expected[k] is None:
            continue
        assert [e.label for e in row.top] == [e["label"] for e in expected[k]]
        assert np.allclose(
            [e.probability for e in row.top], [e["probability"] for e in expected[k]], atol=TOLERANCE
        )
        assert row.c.label == predicted[k], k


def test_a_pipeline_saved_by_rust_applies_over_connect(connect, tmp_path):
    import deep_pipelines as dp
    from deep_pipelines.spark import transform
    from test_local import SAVED_V0_1_FILES

    folder = tmp_path / "saved_v0_1_images"
    for f in SAVED_V0_1_FILES:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / f, folder / f)
    path = FIXTURES / "saved_v0_1" / "pipeline_model"
    df = spark_images(connect, folder).withColumnRenamed("class", "label")
    out = transform(df, str(path)).collect()
    rust = dp.PipelineModel.load(path).transform(dp.read_images(folder, labelFromFolder=True))
    rust_rows = {key(o): i for i, o in enumerate(rust["origin"].to_pylist())}
    assert len(out) == len(rust_rows) == 8
    for row in out:
        i = rust_rows[key(row.image.origin)]
        assert row.predictedLabel == rust["predictedLabel"][i].as_py()
        assert row.prediction == rust["prediction"][i].as_py()
        assert np.abs(np.array(row.probability) - np.array(rust["probability"][i].as_py())).max() <= 1e-6


def test_the_fine_tuning_classifier_fits_saves_and_loads_over_connect(connect, few_images, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import StringIndexer
    from pyspark.sql import functions as F

    from deep_pipelines.spark import DeepImageClassifier

    lines = []
    images = spark_images(connect, few_images).where(F.col("class") != "broken")
    pipeline = Pipeline(
        stages=[
            StringIndexer(inputCol="class", outputCol="labelIndex"),
            DeepImageClassifier(labelCol="labelIndex", trainableBlocks=0, epochs=2, batchSize=16)
            .setProgress(lambda stats, line: lines.append(line)),
        ]
    )
    fitted = pipeline.fit(images)
    assert len(lines) == 2 and fitted.stages[-1].fitFacts["trainingRows"] == 64
    assert fitted.stages[-1].metrics() is None  # no accumulators over Connect

    def predicted(model):
        rows = model.transform(images).select("image.origin", "prediction").collect()
        return {key(r.origin): r.prediction for r in rows}

    here = predicted(fitted)
    assert len(here) == 64
    path = str(tmp_path / "classifier")
    fitted.write().overwrite().save(path)
    assert predicted(PipelineModel.load(path)) == here
