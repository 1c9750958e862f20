"""The same Flower apps on Flower's own deployment: SuperLink + SuperNodes on loopback.

``run_native(work, nodes=N, rounds=R)`` is the baseline the MQTT grid is measured against
(``bench/fl.py``) and the proof that ``app.py`` is an ordinary Flower App:

1. **Data.** ``digits_federation`` (Dirichlet α, seeded) as the MQTT simulation makes it; each
   node's partition is written to ``work/data/node-<i>`` with ``add_samples``.
2. **The app.** ``write_app(work/app, ...)`` writes a Flower App directory: a ``pyproject.toml``
   (``[tool.flwr.app]``, components ``edgefleet_native_app.server:app`` /
   ``edgefleet_native_app.client:app``) and two three-line modules that call
   ``app.build_client_app()`` and ``native.server_app(settings)`` — ``build_server_app`` over a
   ``FederatedRun`` with the run's settings baked in as a literal. No other code: the app runs
   the installed ``edgefleet.federated`` package. Flower builds it into a FAB
   (``flwr.cli.build.build_fab_from_disk``), the SuperLink stores it and each SuperNode
   fetches it, exactly as ``flwr run`` does.
3. **Processes** (``.venv/bin`` next to this interpreter, ``FLWR_HOME`` in ``work``, free
   loopback ports): ``flower-superlink --insecure`` and N ``flower-supernode --insecure``,
   each with ``--node-config 'data-dir="…"'`` (``app.data_from_node_config`` reads it),
   runtime dependency installation off.
4. **The run** is submitted over the SuperLink's Control API (protobuf over HTTP) with
   Flower's own ``ControlHttpClient`` and ``StartRunRequest`` — what ``flwr run`` sends. Not
   through the ``flwr`` typer CLI itself: with typer 0.15 (pinned by amqtt 0.11) it fails
   with "Type not yet supported: typing.Literal".
5. **Measured.** The ServerApp appends one JSON line per aggregated round (wall time since
   the run's start, the central accuracy on the digits test split) to ``work/rounds.jsonl``;
   a sampler thread (psutil, every ``sample_every`` s) records each SuperNode's process tree
   RSS (SuperNode + superexec + every ``flwr-clientapp`` child) and the SuperLink's tree
   (SuperLink + superexec + ``flwr-serverapp``); the peaks are returned.

Every process is stopped (SIGTERM, then SIGKILL) on the way out, whatever happened.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

    from .runs import RoundRecord, RunSpec

__all__ = ["APP_PACKAGE", "NativeError", "NativeResult", "run_native", "server_app", "write_app"]

log = logging.getLogger(__name__)

APP_PACKAGE = "edgefleet_native_app"
ROUNDS_FILE = "rounds.jsonl"
_CLIENT_PY = """\
from edgefleet.federated.app import build_client_app

app = build_client_app()  # trains on the node config's data-dir
"""
_SERVER_PY = """\
from edgefleet.federated.native import server_app

app = server_app({settings})
"""


class NativeError(RuntimeError):
    """The native deployment did not complete the run (the message names what and where)."""


@dataclass(frozen=True, kw_only=True)
class NativeResult:
    rounds: int
    round_seconds: tuple[float, ...]  # wall time of each round (train + evaluate + register)
    accuracy: tuple[float, ...]  # central test accuracy of each round's global model
    device_peak_rss: tuple[int, ...]  # bytes: per SuperNode, its whole process tree
    superlink_peak_rss: int  # bytes: SuperLink + superexec + flwr-serverapp
    samples: int  # RSS samples taken
    run_seconds: float  # StartRun to the last round
    logs: Mapping[str, str] = field(default_factory=dict)  # process name -> log tail

    @property
    def seconds_per_round(self) -> float:
        """Median round time, rounds after the first (the first also starts every process)."""
        tail = sorted(self.round_seconds[1:] or self.round_seconds)
        return tail[len(tail) // 2] if len(tail) % 2 else sum(tail[len(tail) // 2 - 1 :][:2]) / 2

    @property
    def device_peak_rss_max(self) -> int:
        return max(self.device_peak_rss)


# -- the app ------------------------------------------------------------------------------
def _settings(*, nodes: int, rounds: int, alpha: float, seed: int, local_epochs: int,
              lr: float, round_timeout: float, out: Path) -> dict[str, Any]:
    return {"nodes": nodes, "rounds": rounds, "alpha": alpha, "seed": seed,
            "local_epochs": local_epochs, "lr": lr, "round_timeout": round_timeout,
            "out": str(out)}  # fmt: skip


def write_app(app_dir: Path, settings: Mapping[str, Any]) -> Path:
    """A Flower App directory running ``app.py``'s apps with ``settings``; returns it."""
    pkg = app_dir / APP_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""EdgeFleet\'s FL app for a native Flower deployment."""\n')
    (pkg / "client.py").write_text(_CLIENT_PY)
    (pkg / "server.py").write_text(_SERVER_PY.format(settings=repr(json.dumps(dict(settings)))))
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "edgefleet-native-app"\nversion = "1.0.0"\n'
        'description = "EdgeFleet FL app (federated/app.py) on SuperLink/SuperNode"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        "[tool.hatch.build.targets.wheel]\n"
        f'packages = ["{APP_PACKAGE}"]\n\n'
        "[tool.flwr.app]\n"
        'publisher = "edgefleet"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{APP_PACKAGE}.server:app"\n'
        f'clientapp = "{APP_PACKAGE}.client:app"\n'
    )
    return app_dir


def run_spec(settings: Mapping[str, Any]) -> RunSpec:
    """The run the MQTT simulation makes with the same settings (``FlSimConfig.spec``)."""
    from .runs import RunSpec
    from .strategies import StrategySpec, UpdatePolicy
    from .trainer import ModelSpec, TrainConfig

    k, seed = int(settings["nodes"]), int(settings["seed"])
    return RunSpec(
        run_id="native", model_name="digits-native", rounds=int(settings["rounds"]),
        model=ModelSpec(hidden=(64,)),
        train=TrainConfig(optimizer="sgd", lr=float(settings["lr"]),
                          local_epochs=int(settings["local_epochs"]), seed=seed),
        strategy=StrategySpec(name="fedavg", fraction_train=1.0, min_train_nodes=k,
                              min_evaluate_nodes=k, min_available_nodes=k),
        policy=UpdatePolicy(quorum=k, max_update_norm=100.0),
        round_timeout=float(settings["round_timeout"]), seed=seed,
    )  # fmt: skip


class _MemoryRegistrar:
    """Registers versions in memory (the ServerApp process of a native run has no registry)."""

    def __init__(self) -> None:
        self._versions: list[Any] = []
        self._blobs: dict[str, bytes] = {}

    def register(self, *, name: str, onnx: bytes, meta: dict[str, Any],
                 lineage: dict[str, Any]) -> str:
        from .runs import Version

        version = str(len(self._versions) + 1)
        self._versions.append(Version(version=version, lineage=lineage))
        return version

    def versions(self, name: str) -> list[Any]:
        return list(self._versions)

    def put_blob(self, data: bytes) -> str:
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        self._blobs[digest] = data
        return digest

    def get_blob(self, digest: str) -> bytes:
        return self._blobs[digest]


class _TimedRun:
    """``FederatedRun`` plus one JSON line per aggregated round in ``settings['out']``."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)

    def execute(self, grid: Any) -> object:
        from .data import digits_federation
        from .runs import FederatedRun
        from .trainer import Trainer

        fed = digits_federation(n_clients=int(self.settings["nodes"]),
                                alpha=float(self.settings["alpha"]),
                                seed=int(self.settings["seed"]))  # fmt: skip
        out = Path(self.settings["out"])
        start = time.monotonic()

        def central(trainer: Trainer) -> dict[str, float]:
            r = trainer.evaluate(fed.x_test, fed.y_test)
            return {"accuracy": r.accuracy, "loss": r.loss}

        def record(r: RoundRecord) -> None:
            acc = r.lineage.get("fl", {}).get("metrics", {}).get("central", {}).get("accuracy")
            line = {"round": r.round, "t": time.monotonic() - start, "accuracy": acc,
                    "version": r.version}  # fmt: skip
            with out.open("a") as f:
                f.write(json.dumps(line) + "\n")

        run = FederatedRun(run_spec(self.settings), registrar=_MemoryRegistrar(),
                           central_eval=central, on_round=record)  # fmt: skip
        return run.execute(grid)


def server_app(settings_json: str) -> ServerApp:
    """The ServerApp of a native run: ``app.build_server_app`` over a timed ``FederatedRun``."""
    from .app import build_server_app

    return build_server_app(_TimedRun(json.loads(settings_json)))


# -- processes ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise NativeError(f"{path}: not found (install edgefleet[fl] in this environment)")
    return str(path)


class _Procs:
    def __init__(self, work: Path, env: Mapping[str, str]) -> None:
        self.work, self.env = work, dict(env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        logf = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(list(argv), stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.work, start_new_session=True)  # fmt: skip
        logf.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise NativeError(f"{name} exited with {proc.returncode}: "
                                  f"{self.log_tail(name, 800)}")  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group: superexec and app children too
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Sampler(threading.Thread):
    """Peak RSS of each named process's whole tree, sampled every ``every`` s."""

    def __init__(self, roots: Mapping[str, int], every: float) -> None:
        super().__init__(name="native-rss", daemon=True)
        self.roots, self.every = dict(roots), every
        self.peaks = dict.fromkeys(self.roots, 0)
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            for name, pid in self.roots.items():
                self.peaks[name] = max(self.peaks[name], _tree_rss(pid))
            self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _control_client(address: str) -> Any:
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[CliClientHttpInterceptor(),
                      RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )  # fmt: skip


def _start_run(client: Any, app_dir: Path) -> int:
    """What ``flwr run APP`` sends: the app built into a FAB, in a ``StartRunRequest``."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab_from_disk(app_dir)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    req = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto({}),
                          federation="")  # fmt: skip
    res = client.StartRun(req)
    if not res.HasField("run_id"):
        raise NativeError(f"the SuperLink did not start the run: {res}")
    return int(res.run_id)


def _wait(what: str, procs: _Procs, done: Any, timeout: float, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if done():
                return
        except Exception as exc:  # the SuperLink not up yet
            log.debug("native: %s: %s", what, exc)
        time.sleep(poll)
    raise NativeError(f"native deployment: no {what} after {timeout:.0f} s")


def _run_status(client: Any, run_id: int) -> str:
    from flwr.proto.control_pb2 import ListRunsRequest

    res = client.ListRuns(ListRunsRequest(run_id=run_id))
    run = res.run_dict[run_id]
    return f"{run.status.status}:{run.status.sub_status}"


def run_native(
    work: Path,
    *,
    nodes: int,
    rounds: int,
    alpha: float = 0.5,
    seed: int = 0,
    local_epochs: int = 5,
    lr: float = 0.1,
    round_timeout: float = 300.0,  # s the ServerApp waits for replies per step
    timeout: float = 1800.0,  # s for the whole run
    sample_every: float = 0.2,  # s between RSS samples
) -> NativeResult:
    """Run the FL app for ``rounds`` rounds on a SuperLink and ``nodes`` SuperNodes."""
    if nodes < 1 or rounds < 1:
        raise ValueError(f"need nodes >= 1 and rounds >= 1, got {nodes}, {rounds}")
    from .data import add_samples, digits_federation

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = work / ROUNDS_FILE
    out.unlink(missing_ok=True)
    import numpy as np

    fed = digits_federation(n_clients=nodes, alpha=alpha, seed=seed)
    data_dirs = []
    for i, part in enumerate(fed.clients):
        d = work / "data" / f"node-{i}"
        add_samples(d, np.concatenate([part.x_train, part.x_test]),
                    np.concatenate([part.y_train, part.y_test]))  # fmt: skip
        data_dirs.append(d)
    settings = _settings(nodes=nodes, rounds=rounds, alpha=alpha, seed=seed,
                         local_epochs=local_epochs, lr=lr, round_timeout=round_timeout, out=out)
    app_dir = write_app(work / "app", settings)
    bindir = str(Path(sys.executable).parent)  # superexec and the app processes are on PATH
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "PYTHONUNBUFFERED": "1",
           "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
    procs = _Procs(work, env)
    sampler: _Sampler | None = None
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        procs.spawn("superlink", [_bin("flower-superlink"), "--insecure", "--port", str(port),
                                  "--disable-runtime-dependency-installation"])  # fmt: skip
        for i, d in enumerate(data_dirs):
            procs.spawn(f"supernode-{i}", [
                _bin("flower-supernode"), "--insecure", "--superlink", address,
                "--port", str(_free_port()), "--node-config", f'data-dir="{d}"',
            ])  # fmt: skip
        sampler = _Sampler({n: p.pid for n, p in procs.procs.items()}, sample_every)
        sampler.start()
        client = _control_client(address)
        try:
            _wait(f"{nodes} SuperNodes registered", procs,
                  lambda: _online_nodes(client) >= nodes, timeout=120)  # fmt: skip
            started = time.monotonic()
            run_id = _start_run(client, app_dir)
            log.info("native: run %d on %d SuperNodes", run_id, nodes)
            _wait(f"{rounds} rounds (see {work}/*.log)", procs,
                  lambda: _rounds_done(out, run_id, client) >= rounds, timeout=timeout)
            run_seconds = time.monotonic() - started
        finally:
            client.close()
        sampler.stop()
        lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        ts = [0.0] + [float(line["t"]) for line in lines]
        peaks = sampler.peaks
        return NativeResult(
            rounds=len(lines),
            round_seconds=tuple(b - a for a, b in zip(ts, ts[1:], strict=False)),
            accuracy=tuple(float(line["accuracy"]) for line in lines),
            device_peak_rss=tuple(peaks[f"supernode-{i}"] for i in range(nodes)),
            superlink_peak_rss=peaks["superlink"],
            samples=sampler.samples,
            run_seconds=run_seconds,
            logs={n: procs.log_tail(n, 500) for n in procs.procs},
        )
    finally:
        if sampler is not None:
            sampler.stop()
        procs.stop()


def _online_nodes(client: Any) -> int:
    from flwr.proto.control_pb2 import ListNodesRequest

    res = client.ListNodes(ListNodesRequest())
    return sum(1 for n in res.nodes_info if n.status == "online")


def _rounds_done(out: Path, run_id: int, client: Any) -> int:
    n = len(out.read_text().splitlines()) if out.exists() else 0
    status = _run_status(client, run_id)
    if status.startswith("finished") and not status.endswith("completed"):
        raise NativeError(f"native run {run_id} ended {status} after {n} rounds")
    return n
