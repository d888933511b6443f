"""A real standalone Spark cluster for the tests, on 127.0.0.1.

A Master and two Workers (1 core each) run from a copy of the test venv at another path (a hard-link
copy in a temporary folder), each in its own mount and PID namespace (``unshare``, root) in which
the driver's venv is hidden under an empty tmpfs, as on another host: an executor has only what its
own venv holds (pyspark, deep_pipelines, the weights the wheel ships), and a driver path leaking
into what the executors run fails loudly. The driver is this process, with its own pyspark; its
executors run the copy's Python (``PYSPARK_PYTHON`` / ``spark.pyspark.python``, what a cluster user
sets: the Python path on the workers).

Fixtures (for a test module: ``from cluster import cluster, cluster_spark``; or, to share one
cluster between modules, import them in conftest.py instead):

* ``cluster`` (session): the daemons; stopped at the end of the session (every process killed, the
  namespaces and their tmpfs go with them).
* ``cluster_spark`` (module): a SparkSession on the cluster with both executors up; stopped at the
  module's end. A Python process hosts one SparkContext: a local session running when it starts
  (conftest's ``spark``, if a module using it ran first) is stopped, and resumed at the module's
  end in the same SparkSession object, with the same settings. So a module must not use both.

Skipped (with the reason) without Linux, root, ``unshare``, ``java`` or a venv, unless
``DEEP_PIPELINES_REQUIRE_ALL=1``, which turns the skip into a failure (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import pytest

HOST = "127.0.0.1"
WORKERS = 2
WORKER_MEMORY = "2g"
EXECUTOR_MEMORY = "1g"
DRIVER_MEMORY = "2g"  # as conftest's local session
# The cluster's JVMs (daemons, executors): no /tmp/hsperfdata files (JVMs of different PID
# namespaces share /tmp, and their pids); C1 only and the serial collector: short-lived JVMs on
# few cores, for which the C2 compiler's and G1's threads cost more CPU than they save.
JAVA_OPTS = "-XX:-UsePerfData -XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
START_TIMEOUT = 180.0  # seconds, for each wait below (CI: 2 cores, maybe busy)
STOP_TIMEOUT = 30.0

# The driver's venv: what the workers must not see.
DRIVER_VENV = Path(sys.prefix).resolve()

# Runs inside each daemon's new namespaces: hides the driver's venv, checks that it is empty,
# then becomes the daemon ($1: the folder to hide; the rest: spark-class's arguments).
_NAMESPACE_SCRIPT = r"""
set -eu
hide="$1"; shift
mount -t tmpfs -o size=64k,mode=0755 deep-pipelines-hidden "$hide"
if [ -n "$(ls -A "$hide")" ]; then
  echo "deep-pipelines cluster: $hide is not empty in this namespace" >&2
  exit 97
fi
echo "deep-pipelines cluster: $hide is an empty tmpfs in this namespace; SPARK_HOME=$SPARK_HOME"
exec bash "$SPARK_HOME/bin/spark-class" "$@"
"""


def unavailable() -> Optional[str]:
    """Why this machine cannot run the cluster, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (mount and PID namespaces)"
    if os.geteuid() != 0:
        return "needs root (unshare --mount, mount -t tmpfs)"
    for tool in ("unshare", "setpriv", "mount", "java", "bash"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare --mount --pid` fails here: {probe.stderr.strip()}"
    if sys.prefix == sys.base_prefix:
        return "needs the tests to run in a venv (the executors get a copy of it)"
    import pyspark

    import deep_pipelines

    for module in (pyspark, deep_pipelines):
        if DRIVER_VENV not in Path(module.__file__).resolve().parents:
            return f"{module.__name__} is not installed in the venv {DRIVER_VENV}"
    return None


def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({e})"
    return "\n".join(text[-lines:])


def processes() -> Dict[int, dict]:
    """Every process this one can see: pid -> {ppid, argv, cpu (clock ticks used)}."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = {"ppid": int(fields[1]), "argv": argv, "cpu": int(fields[11]) + int(fields[12])}
    return out


def hidden_in(pid: int, path: Path = DRIVER_VENV) -> bool:
    """Whether `path` is empty as process `pid` sees it (through its mount namespace)."""
    return os.listdir(f"/proc/{pid}/root{path}") == []


class Cluster:
    """A Master and WORKERS Workers from a copy of the venv, each in its own namespaces."""

    def __init__(self, workers: int = WORKERS):
        self.workers = workers
        self.root = Path(tempfile.mkdtemp(prefix="deep-pipelines-cluster-"))
        self.venv = self.root / "venv"
        import pyspark

        self.site = Path(pyspark.__file__).resolve().parents[1]
        self.python = self.venv / "bin" / "python"
        self.spark_home = self.venv / self.site.relative_to(DRIVER_VENV) / "pyspark"
        self.logs = self.root / "logs"
        self.daemons: Dict[str, subprocess.Popen] = {}
        self.log_files: Dict[str, Path] = {}
        ports = _free_ports(2 + 2 * workers)
        self.master_port, self.master_ui_port = ports[:2]
        self.worker_ports = ports[2:]
        self.url = f"spark://{HOST}:{self.master_port}"
        self.session = None
        self._suspended = None

    # ------------------------------------------------------------ daemons

    def start(self) -> "Cluster":
        try:
            self._copy_venv()
            self.logs.mkdir()
            (self.root / "conf").mkdir()  # an empty SPARK_CONF_DIR: no spark-defaults, no spark-env
            # All at once (a worker retries until the master is up): the JVMs start in parallel.
            self._spawn("master", [
                "org.apache.spark.deploy.master.Master",
                "--host", HOST, "--port", str(self.master_port),
                "--webui-port", str(self.master_ui_port),
            ])
            for i in range(self.workers):
                port, ui = self.worker_ports[2 * i : 2 * i + 2]
                self._spawn(f"worker-{i}", [
                    "org.apache.spark.deploy.worker.Worker",
                    "--host", HOST, "--port", str(port), "--webui-port", str(ui),
                    "--cores", "1", "--memory", WORKER_MEMORY,
                    "--work-dir", str(self.root / f"work-{i}"),
                    self.url,
                ], SPARK_WORKER_OPTS=self._gpu_options(i))
            self._start_driver_jvm()  # meanwhile
            self._wait("the master", lambda: self.master_state().get("status") == "ALIVE")
            self._wait(
                f"{self.workers} workers to register",
                lambda: len([w for w in self.master_state().get("workers", []) if w.get("state") == "ALIVE"])
                == self.workers,
            )
            for name in self.daemons:
                pid = self.daemon_pid(name)
                if not hidden_in(pid):
                    raise RuntimeError(f"{name} (pid {pid}) sees the driver's venv {DRIVER_VENV}")
        except BaseException:
            print(self.log_tails(), file=sys.stderr)
            self.stop()
            raise
        return self

    def _gpu_options(self, i: int) -> str:
        """Worker i announces one GPU, address `i`, through a discovery script (as
        `spark.worker.resource.gpu.*` does on a GPU host): what Spark gives each task to run on."""
        script = self.root / "conf" / f"gpu-{i}.sh"
        script.write_text(f"#!/bin/sh\necho '{{\"name\": \"gpu\", \"addresses\": [\"{i}\"]}}'\n")
        script.chmod(0o755)
        return f"-Dspark.worker.resource.gpu.amount=1 -Dspark.worker.resource.gpu.discoveryScript={script}"

    def _copy_venv(self) -> None:
        """The executors' venv: a hard-link copy of the driver's (a plain copy across devices).
        Its scripts' shebangs still name the driver's venv: only bin/python (a link to the base
        interpreter, which reads the copy's pyvenv.cfg) and `bash .../spark-class` are run."""
        try:
            subprocess.run(["cp", "-al", str(DRIVER_VENV), str(self.venv)], check=True,
                           capture_output=True, timeout=300)
        except subprocess.CalledProcessError:
            shutil.rmtree(self.venv, ignore_errors=True)
            subprocess.run(["cp", "-a", str(DRIVER_VENV), str(self.venv)], check=True, timeout=600)

    def _env(self, name: str) -> Dict[str, str]:
        drop = ("SPARK_", "PYSPARK_", "_PYSPARK", "PYTHON", "VIRTUAL_ENV", "DEEP_PIPELINES_", "CLASSPATH")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        path = [p for p in env.get("PATH", "").split(os.pathsep)
                if p and not Path(p).resolve().is_relative_to(DRIVER_VENV)]
        env["PATH"] = os.pathsep.join([str(self.venv / "bin")] + path)
        env.update(
            SPARK_HOME=str(self.spark_home),
            SPARK_CONF_DIR=str(self.root / "conf"),
            SPARK_LOCAL_IP=HOST,
            SPARK_LOCAL_DIRS=str(self.root / f"local-{name}"),
            SPARK_LOG_DIR=str(self.logs),
            SPARK_DAEMON_MEMORY="512m",
            SPARK_DAEMON_JAVA_OPTS=JAVA_OPTS + " -Dspark.master.rest.enabled=false",
            SPARK_LAUNCHER_OPTS=JAVA_OPTS,
            PYSPARK_PYTHON=str(self.python),
        )
        return env

    def _spawn(self, name: str, args: List[str], **env: str) -> None:
        log = self.logs / f"{name}.log"
        self.log_files[name] = log
        # setpriv --pdeathsig: unshare dies with this process, and (--kill-child) the namespace's
        # first process with unshare, and every process of the namespace with that one.
        argv = [
            "setpriv", "--pdeathsig", "KILL", "--",
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
            "--kill-child=SIGKILL", "--",
            "/bin/sh", "-c", _NAMESPACE_SCRIPT, name, str(DRIVER_VENV), *args,
        ]
        with open(log, "wb") as out:
            self.daemons[name] = subprocess.Popen(
                argv, env={**self._env(name), **env}, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
            )

    def _wait(self, what: str, ready, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.daemons.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"cluster: waiting for {what}, daemon(s) exited: {dead}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"cluster: {what} not ready after {timeout:.0f} s")

    def master_state(self) -> dict:
        """The master's status page as JSON (workers, apps)."""
        url = f"http://{HOST}:{self.master_ui_port}/json/"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)

    def daemon_pid(self, name: str) -> int:
        """The pid (here) of a daemon's JVM: the first process of its namespace."""
        unshare = self.daemons[name].pid
        procs = processes()
        # setpriv execs unshare; its one child is the namespace's first process (sh, then the JVM).
        children = [p for p, info in procs.items() if info["ppid"] == unshare]
        if len(children) != 1:
            raise RuntimeError(f"{name}: expected one child of unshare {unshare}, found {children}")
        return children[0]

    def our_processes(self) -> Dict[int, dict]:
        """The processes running from the copy (daemons, executors, Python workers)."""
        mark = str(self.root)
        return {p: i for p, i in processes().items() if any(mark in a for a in i["argv"])}

    def executors(self, app_id: str) -> Dict[int, str]:
        """pid -> executor id of the application's executor JVMs."""
        out = {}
        for pid, info in self.our_processes().items():
            argv = info["argv"]
            if "org.apache.spark.executor.CoarseGrainedExecutorBackend" in argv and app_id in argv:
                out[pid] = argv[argv.index("--executor-id") + 1]
        return out

    def python_workers(self) -> Dict[int, dict]:
        """The executors' Python workers: processes forked by a `pyspark.daemon`."""
        procs = self.our_processes()
        daemons = {p for p, i in procs.items() if "pyspark.daemon" in i["argv"]}
        # A forked worker keeps the daemon's command line: a worker is a daemon's child.
        return {p: i for p, i in procs.items() if p in daemons and i["ppid"] in daemons}

    def log_tails(self, lines: int = 40) -> str:
        parts = [f"cluster logs under {self.root}"]
        files = list(self.log_files.items())
        files += [(str(p.relative_to(self.root)), p) for p in sorted(self.root.glob("work-*/*/*/stderr"))]
        for name, path in files:
            parts.append(f"----- {name}: {path}\n{_tail(path, lines)}")
        return "\n".join(parts)

    def stop(self) -> List[str]:
        """Kills every daemon (and so every process of their namespaces); returns the leftovers
        found (then killed), which should be none."""
        for p in self.daemons.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.daemons.values():
            try:
                p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        leftovers = []
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            left = self.our_processes()
            if not left:
                break
            time.sleep(0.2)
        for pid, info in self.our_processes().items():
            leftovers.append(f"{pid}: {' '.join(info['argv'])[:200]}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.venv, ignore_errors=True)
        return leftovers

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ driver

    @staticmethod
    def _start_driver_jvm() -> None:
        """This process's Spark JVM (py4j gateway), if none runs yet, with no option of the
        cluster's: spark-submit makes its options JVM system properties, which every later
        SparkConf (a local session's too) would read."""
        from pyspark import SparkConf, SparkContext

        if SparkContext._gateway is None:
            SparkContext._ensure_initialized(conf=SparkConf().set("spark.driver.memory", DRIVER_MEMORY))

    def spark_session(self, **conf: str):
        """A SparkSession on the cluster (this process is the driver), once both executors have
        registered. One SparkContext runs in a process: one running already (a local session) is
        stopped, and resumed by `stop_session`."""
        from pyspark import SparkContext
        from pyspark.sql import SparkSession

        self._suspended = _suspend_active_session()
        self._start_driver_jvm()
        settings = {
            "spark.driver.host": HOST,
            "spark.driver.bindAddress": HOST,
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.executor.memory": EXECUTOR_MEMORY,
            "spark.executor.cores": "1",
            "spark.cores.max": str(self.workers),
            "spark.task.maxFailures": "8",
            "spark.pyspark.python": str(self.python),
            "spark.executor.extraJavaOptions": JAVA_OPTS,
            "spark.sql.shuffle.partitions": "4",
            "spark.sql.session.timeZone": "UTC",
            # Small files: the default 4 MB "cost" of opening one makes a partition of every
            # 32 images (and 200 iterations of LogisticRegression over 32 tasks each); this
            # reads them in about one partition per core.
            "spark.sql.files.openCostInBytes": "8192",
            # Each task is given its executor's GPU (see _gpu_options), as on a GPU cluster.
            "spark.executor.resource.gpu.amount": "1",
            "spark.task.resource.gpu.amount": "1",
            **conf,
        }
        try:
            # The executors' Python: a SparkContext reads PYSPARK_PYTHON when it starts.
            with _pyspark_python(str(self.python)):
                builder = SparkSession.builder.master(self.url).appName("deep-pipelines-cluster-tests")
                for k, v in settings.items():
                    builder = builder.config(k, v)
                session = builder.getOrCreate()
        except BaseException:
            _resume_session(self._suspended)
            self._suspended = None
            raise
        self.session = session
        try:
            sc = session.sparkContext
            sc.setLogLevel("ERROR")
            assert sc.master == self.url and sc.pythonExec == str(self.python), (sc.master, sc.pythonExec)
            self.wait_for_executors()
        except BaseException:
            self.stop_session()
            raise
        return session

    def wait_for_executors(self, count: Optional[int] = None, timeout: float = START_TIMEOUT) -> None:
        """Until `count` (default: one per worker) executors are registered with the driver."""
        count = self.workers if count is None else count
        sc = self.session.sparkContext
        # The scheduler's live executors (SparkContext.getExecutorIds, private[spark] in Scala).
        self._wait(f"{count} executors", lambda: sc._jsc.sc().getExecutorIds().size() >= count, timeout)

    def stop_session(self) -> None:
        """Stops the cluster session and waits until the master has let its executors go."""
        from pyspark import SparkContext

        session, self.session = self.session, None
        if session is None:
            return
        app_id = session.sparkContext.applicationId
        session.stop()
        assert SparkContext._active_spark_context is None
        _resume_session(self._suspended)
        self._suspended = None
        self._wait("the application's executors to stop", lambda: not self.executors(app_id), STOP_TIMEOUT)


# ---------------------------------------------------------------- one SparkContext per process

# Set when a SparkContext starts: not what a resumed context should take over.
_RUNTIME_KEYS = {
    "spark.app.id", "spark.app.startTime", "spark.app.submitTime", "spark.driver.port",
    "spark.executor.id", "spark.app.initial.jar.urls", "spark.app.initial.file.urls",
}


class _pyspark_python:
    """PYSPARK_PYTHON set to `python` for a while."""

    def __init__(self, python: str):
        self.python = python

    def __enter__(self):
        self.saved = os.environ.get("PYSPARK_PYTHON")
        os.environ["PYSPARK_PYTHON"] = self.python

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = self.saved


def _suspend_active_session():
    """Stops the SparkContext running in this process, if any (e.g. conftest's local[2] `spark`,
    when a module using it ran first), and returns what `_resume_session` needs to bring it back."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    sc = SparkContext._active_spark_context
    if sc is None:
        return None
    session = SparkSession._instantiatedSession
    if session is not None and session._sc is not sc:
        session = None
    conf = [(k, v) for k, v in sc.getConf().getAll() if k not in _RUNTIME_KEYS]
    suspended = (session, conf, sc.pythonExec)
    print(f"\ncluster: stopping the running SparkContext ({sc.master}) until the cluster tests end")
    if session is not None:
        session.stop()
    else:
        sc.stop()
    return suspended


def _resume_session(suspended) -> None:
    """Starts a SparkContext with the suspended one's settings and, in place, makes the
    suspended SparkSession object (the one fixtures hold) a session of it."""
    if suspended is None:
        return
    from pyspark import SparkConf, SparkContext

    session, conf, python = suspended
    with _pyspark_python(python):
        sc = SparkContext(conf=SparkConf().setAll(conf))
    if session is not None:
        session.__dict__.clear()  # cached views of the old JVM session (conf, catalog, ...)
        session.__init__(sc)
    print(f"cluster: resumed a SparkContext ({sc.master})")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cluster(request):
    reason = unavailable()
    if reason is not None:
        if os.environ.get("DEEP_PIPELINES_REQUIRE_ALL") == "1":
            pytest.fail(f"the Spark cluster tests cannot run here: {reason}")
        pytest.skip(f"Spark cluster: {reason}")
    failed_before = request.session.testsfailed
    started = time.monotonic()
    c = Cluster().start()
    print(f"\ncluster: master {c.url}, {c.workers} workers, up in {time.monotonic() - started:.1f} s")
    yield c
    failed = request.session.testsfailed > failed_before
    if failed:
        # Outside pytest's capture: the report shows a passing teardown's output nowhere else.
        print("\n" + c.log_tails(), file=sys.__stderr__)
    leftovers = c.stop()
    if failed:
        print(f"cluster: logs kept in {c.root}", file=sys.__stderr__)
    else:
        c.remove()
    assert not leftovers, f"processes left running after the cluster stopped: {leftovers}"


@pytest.fixture(scope="module")
def cluster_spark(cluster):
    """A SparkSession on `cluster`, both executors up; stopped at the module's end."""
    session = cluster.spark_session()
    yield session
    cluster.stop_session()
