"""deep_pipelines.spark on a real standalone cluster (cluster.py: a Master and two 1-core Workers on
127.0.0.1, their executors on a copy of the venv at another path, the driver's venv hidden from
them): the transfer-learning flow, Spark's persistence, the SQL functions and a Rust-saved pipeline
give what the local API gives; a featurize job survives a killed executor JVM and a killed Python
worker through Spark's task retry, every row once, the features those of a clean run.

One SparkContext per process: while this module runs, conftest's local[2] `spark` (if started)
is stopped; cluster.py resumes it afterwards."""

import collections
import json
import os
import signal
import threading
import time

import numpy as np
import pyspark.sql.functions as F
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import StringIndexer
from pyspark.ml.linalg import VectorUDT

import deep_pipelines as dp
from conftest import DATA, FIXTURES, key, seed_pipeline, spark_images
from deep_pipelines.spark import DeepImageFeaturizer, register_image_udf, transform

import cluster as cluster_module

TOLERANCE = 1e-5  # Spark's image decoding and batches vs the local API's (as test_spark.py)
PIPELINE_MODEL = FIXTURES / "saved_v0_1" / "pipeline_model"  # saved by the Rust API
PREDICTOR = FIXTURES / "saved_v0_1" / "predictor"
PARTITIONS = 12  # of the fault-injection job


def test_executors_run_their_own_venv_and_cannot_see_the_drivers(cluster, cluster_spark):
    sc = cluster_spark.sparkContext
    driver_venv, copy = str(cluster_module.DRIVER_VENV), str(cluster.venv)

    def probe(_):
        import os, sys, time

        import deep_pipelines
        import pyspark

        time.sleep(0.5)  # both executors take tasks
        yield {
            "python": sys.executable,
            "deep_pipelines": deep_pipelines.__file__,
            "pyspark": pyspark.__file__,
            "models": deep_pipelines.model_dirs()[-1],
            "driver_venv": os.listdir(driver_venv),
            "namespace": os.readlink("/proc/self/ns/mnt"),
        }

    seen = sc.parallelize(range(8), 8).mapPartitions(probe).collect()
    for s in seen:
        assert s["python"] == str(cluster.python), s
        assert all(s[k].startswith(copy + "/") for k in ("deep_pipelines", "pyspark", "models")), s
        assert s["driver_venv"] == [], s
    namespaces = {s["namespace"] for s in seen}
    assert len(namespaces) == 2 and os.readlink("/proc/self/ns/mnt") not in namespaces, namespaces

    executors = cluster.executors(sc.applicationId)
    assert len(executors) == 2, executors
    procs = cluster_module.processes()
    for pid in executors:
        argv = " ".join(procs[pid]["argv"])
        assert driver_venv not in argv and copy in argv, argv
        assert cluster_module.hidden_in(pid)


def test_each_task_runs_a_wgpu_stage_on_the_gpu_spark_gave_it(cluster_spark):
    """The workers announce one GPU each (addresses 0 and 1) and each task asks for one: in a
    task, a stage on device `wgpu` is put on `wgpu:<address>`; on the driver it stays `wgpu`."""
    from deep_pipelines.spark import _on_gpu, _task_gpu

    def devices(_rows):
        time.sleep(0.3)  # both executors take tasks
        gpu = _task_gpu()
        yield gpu, _on_gpu('{"device": "wgpu"}', gpu), _on_gpu('{"device": "cpu"}', gpu)

    seen = set(cluster_spark.sparkContext.parallelize(range(8), 8).mapPartitions(devices).collect())
    assert {gpu for gpu, _, _ in seen} == {0, 1}, seen
    for gpu, wgpu, cpu in seen:
        assert json.loads(wgpu) == {"device": f"wgpu:{gpu}"}
        assert json.loads(cpu) == {"device": "cpu"}
    assert _task_gpu() is None


def test_sql_functions_give_the_local_apis_rows(cluster_spark, few_images):
    spark = cluster_spark
    register_image_udf(spark, "imagenet_top5", modelName="EfficientNetLite0")
    register_image_udf(spark, "saved_predictor", model_path=str(PREDICTOR))
    register_image_udf(spark, "classify", model_path=str(PIPELINE_MODEL))
    spark_images(spark, few_images).createOrReplaceTempView("few_images")
    rows = spark.sql(
        "SELECT image.origin AS origin, imagenet_top5(image) AS top, "
        "saved_predictor(image) AS saved, classify(image) AS c FROM few_images"
    ).collect()
    rows = {key(r.origin): r for r in rows}
    assert len(rows) == 65

    local = dp.read_images(few_images)
    top = dp.DeepImagePredictor(topK=5).transform(local)
    top = dict(zip(map(key, top["origin"].to_pylist()), top["predicted_labels"].to_pylist()))
    saved = dp.PipelineModel.load(PREDICTOR).transform(local)
    saved = dict(zip(map(key, saved["origin"].to_pylist()), saved["predicted"].to_pylist()))
    fitted = dp.PipelineModel.load(PIPELINE_MODEL).transform(local)
    fitted = {
        key(o): (p, l, prob)
        for o, p, l, prob in zip(
            fitted["origin"].to_pylist(), fitted["prediction"].to_pylist(),
            fitted["predictedLabel"].to_pylist(), fitted["probability"].to_pylist(),
        )
    }
    assert rows.keys() == top.keys() == saved.keys() == fitted.keys()
    for k, row in rows.items():
        if top[k] is None:  # the corrupt file
            assert row.top is None and row.saved is None and k == "broken/corrupt.png"
            continue
        for spark_top, local_top in ((row.top, top[k]), (row.saved, saved[k])):
            assert [e.label for e in spark_top] == [e["label"] for e in local_top], k
            assert [e["class"] for e in spark_top] == [e["class"] for e in local_top], k
            assert np.allclose([e.probability for e in spark_top], [e["probability"] for e in local_top],
                               atol=TOLERANCE), k
        prediction, label, probability = fitted[k]
        assert (row.c.prediction, row.c.label) == (prediction, label), k
        assert abs(row.c.probability - max(probability)) <= TOLERANCE, k


def test_a_rust_saved_pipeline_gives_the_local_apis_rows(cluster_spark, few_images):
    df = spark_images(cluster_spark, few_images).drop("class")
    out = transform(df, str(PIPELINE_MODEL)).collect()
    local = dp.PipelineModel.load(PIPELINE_MODEL).transform(dp.read_images(few_images))
    index = {key(o): i for i, o in enumerate(local["origin"].to_pylist())}
    assert len(out) == len(index) == 65
    for row in out:
        i = index[key(row.image.origin)]
        for col in ("prediction", "predictedLabel"):
            assert row[col] == local[col][i].as_py(), (key(row.image.origin), col)
        for col, tolerance in (("probability", 1e-6), ("rawPrediction", TOLERANCE), ("features", TOLERANCE)):
            expected = local[col][i].as_py()
            if expected is None:
                assert row[col] is None
                continue
            assert np.abs(np.array(row[col]) - np.array(expected)).max() <= tolerance, col


def test_a_model_file_reaches_the_executors_through_spark(cluster_spark, tmp_path):
    """An ONNX modelFile given on the driver runs on executors that share nothing with it: the
    model travels with the task (the file is gone from the driver's folder before the job
    runs), and the features are PyTorch's."""
    from test_onnx import EXPECTED, ONNX, assert_like_torch, by_image, model_copy

    images = tmp_path / "images"
    images.mkdir()
    for name in EXPECTED["images"]:
        (images / name).write_bytes((ONNX / name).read_bytes())
    source = model_copy(tmp_path / "source", "tiny_vit")
    df = cluster_spark.read.format("image").load(str(images)).repartition(2)
    out = DeepImageFeaturizer(modelFile=source, outputFormat="array").transform(df)
    for f in (tmp_path / "source").iterdir():
        f.unlink()
    rows = out.select("image.origin", "features").collect()
    assert_like_torch("tiny_vit", by_image([r[0] for r in rows], [r[1] for r in rows]))


# The flow of examples/spark/transfer_learning.py (test_spark.py's `fitted`), on the cluster.
def test_transfer_learning_reaches_084_and_predicts_the_same_after_save_and_load(cluster_spark, tmp_path):
    spark = cluster_spark
    started = time.monotonic()
    model = seed_pipeline().fit(spark_images(spark, DATA / "train"))
    fitted_in = time.monotonic() - started
    test = spark_images(spark, DATA / "test")

    def predictions(model):
        out = model.transform(test)
        assert isinstance(out.schema["features"].dataType, VectorUDT)
        rows = out.select("image.origin", "label", "prediction", "probability").collect()
        return {key(r.origin): (r.label, r.prediction, r.probability.toArray()) for r in rows}

    before = predictions(model)
    accuracy = np.mean([label == prediction for label, prediction, _ in before.values()])
    print(f"cluster: fitted in {fitted_in:.1f} s; test accuracy {accuracy:.4f} on {len(before)} images")
    assert len(before) == 500 and accuracy >= 0.84

    path = tmp_path / "fitted"  # written by the executors: a folder they share with the driver
    model.write().overwrite().save(str(path))
    for f in path.rglob("*"):
        if f.is_file() and f.suffix in ("", ".json") and f.stat().st_size < 1 << 20:
            assert str(cluster_module.DRIVER_VENV) not in f.read_text(errors="replace"), f
    loaded = PipelineModel.load(str(path))
    assert isinstance(loaded.stages[1], DeepImageFeaturizer) and loaded.stages[1].getModelDir() == ""
    after = predictions(loaded)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k][:2] == after[k][:2], k
        assert np.abs(before[k][2] - after[k][2]).max() <= 1e-9, k


# ---------------------------------------------------------------- faults


def featurize(spark):
    """The fault-injection job: the 1000 training images, PARTITIONS tasks of featurization."""
    df = spark_images(spark, DATA / "train").repartition(PARTITIONS)
    out = DeepImageFeaturizer(outputFormat="array", batchSize=8).transform(df)
    return out.select(F.col("image.origin").alias("origin"), "features")


def features_by_origin(rows):
    counts = collections.Counter(r.origin for r in rows)
    assert not [o for o, n in counts.items() if n != 1], "rows twice (or more)"
    return {r.origin: np.asarray(r.features, dtype=np.float32) for r in rows}


@pytest.fixture(scope="module")
def clean_features(cluster_spark):
    started = time.monotonic()
    features = features_by_origin(featurize(cluster_spark).collect())
    print(f"cluster: clean featurization of {len(features)} images in {time.monotonic() - started:.1f} s")
    assert len(features) == 1000 and all(f is not None and f.shape == (1280,) for f in features.values())
    return features


def run_killing(spark, kill):
    """Runs `featurize` and, once its featurization stage has finished tasks and still runs
    others, calls `kill()`; returns the rows and what happened."""
    sc = spark.sparkContext
    tracker = sc.statusTracker()
    state = {"failed": 0}
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + 600
        while not done.is_set() and time.monotonic() < deadline:
            for stage in tracker.getActiveStageIds():
                info = tracker.getStageInfo(stage)
                if info is None or info.numTasks != PARTITIONS:
                    continue
                state["failed"] = max(state["failed"], info.numFailedTasks)
                if "killed" not in state and info.numCompletedTasks >= 2 and info.numActiveTasks >= 1 \
                        and info.numCompletedTasks + info.numActiveTasks <= PARTITIONS - 2:
                    state["stage"] = stage
                    state["when"] = f"{info.numCompletedTasks} of {info.numTasks} tasks done"
                    try:
                        state["killed"] = kill()
                    except Exception as e:  # reported by the test
                        state["killed"] = None
                        state["error"] = repr(e)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        rows = featurize(spark).collect()
    finally:
        done.set()
        watcher.join(30)
    state["seconds"] = time.monotonic() - started
    if "stage" in state:
        info = tracker.getStageInfo(state["stage"])
        if info is not None:
            state["failed"] = max(state["failed"], info.numFailedTasks)
    print(f"cluster: {state}")
    assert "killed" in state, "the job ended before the kill: make it longer"
    assert "error" not in state, state["error"]
    return rows, state


def assert_equal_to_clean(rows, clean):
    features = features_by_origin(rows)
    assert features.keys() == clean.keys()
    worst = max(np.abs(features[o] - clean[o]).max() for o in clean)
    assert worst <= 1e-6, worst


def test_a_featurize_job_survives_a_killed_executor_jvm(cluster, cluster_spark, clean_features):
    app = cluster_spark.sparkContext.applicationId

    def kill():
        executors = cluster.executors(app)
        pid = min(executors, key=lambda p: int(executors[p]))
        os.kill(pid, signal.SIGKILL)
        return {"pid": pid, "executor": executors[pid]}

    rows, state = run_killing(cluster_spark, kill)
    assert_equal_to_clean(rows, clean_features)
    # The worker started a replacement; later tests get both executors again.
    cluster.wait_for_executors()
    assert state["killed"]["pid"] not in cluster.executors(app)
    assert state["killed"]["executor"] not in cluster.executors(app).values()


def test_a_featurize_job_survives_a_killed_python_worker(cluster, cluster_spark, clean_features):
    def kill():
        # The Python worker at work: the one using the most CPU over a short while.
        before = cluster.python_workers()
        time.sleep(0.3)
        after = cluster.python_workers()
        busy = max((p for p in after if p in before), key=lambda p: after[p]["cpu"] - before[p]["cpu"])
        os.kill(busy, signal.SIGKILL)
        return {"pid": busy, "python workers": len(after)}

    rows, state = run_killing(cluster_spark, kill)
    assert_equal_to_clean(rows, clean_features)
    assert state["failed"] >= 1, state  # the task the worker ran failed, and was retried


def test_a_fine_tuning_fit_on_the_cluster_equals_the_local_fit(cluster_spark, tmp_path):
    """The frozen trunk in the executors (driver venv hidden), the top on the driver: the same
    rows in the same order as the local (native) fit, so the same losses and test accuracy."""

    from deep_pipelines.spark import DeepImageClassifier
    from test_classifier import PARAMS, accuracy, few, local_table, spark_table

    train, test = few(tmp_path / "train", "train", 30), few(tmp_path / "test", "test", 10)
    local = dp.DeepImageClassifier(**PARAMS).fit(local_table(train), progress=None)
    pipeline = Pipeline(
        stages=[
            StringIndexer(inputCol="class", outputCol="labelIndex", stringOrderType="alphabetAsc"),
            DeepImageClassifier(**PARAMS).setProgress(None),
        ]
    )
    fitted = pipeline.fit(spark_table(cluster_spark, train))
    facts = fitted.stages[-1].fitFacts
    assert facts["trainingRows"] == local.fitFacts["trainingRows"] == 300
    for ours, theirs in zip(facts["history"], local.fitFacts["history"]):
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-4, (ours, theirs)
    rows = fitted.transform(spark_table(cluster_spark, test)).select("labelIndex", "prediction").collect()
    on_cluster = accuracy([r.prediction for r in rows], [r.labelIndex for r in rows])
    out = local.transform(local_table(test))
    here = accuracy(out["prediction"].to_pylist(), out["labelIndex"].to_pylist())
    print(f"fine-tuning: cluster accuracy {on_cluster:.4f}, local {here:.4f}")
    assert len(rows) == 100 and abs(on_cluster - here) <= 0.02
    # Saved with Spark's writer, loaded, applied by the executors: the same predictions.
    fitted.write().overwrite().save(str(tmp_path / "fitted"))
    again = PipelineModel.load(str(tmp_path / "fitted")).transform(spark_table(cluster_spark, test))
    assert [r.prediction for r in again.select("prediction").collect()] == [r.prediction for r in rows]
