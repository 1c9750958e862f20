"""Federated learning: round time over MQTT on mosquitto, device RSS, coordinator overhead.

One fleet on a real mosquitto (``simulations.fl``'s rig: Dirichlet(0.5) digits partitions, the
bootstrap release so every agent holds the keyring), N agents (quick: 3) of which one is an
``edgefleet agent run`` process with FL enabled and the others agent daemons as threads of this
process; plus one more ``edgefleet agent run`` process with FL disabled (not sampled). R rounds
of FedAvg (quick: 2).

* round time: the FL service's wall time per round on mosquitto, against the same run on the
  in-memory broker (same seeds), i.e. what the real broker and the agent process add; and
  against Flower's own deployment of the same app (``federated.native.run_native``: a
  SuperLink and N SuperNodes on loopback, same partitions, strategy and training settings;
  ~35 s per round, so only in the full run, or with ``--quick`` when
  ``EDGEFLEET_BENCH_NATIVE=1``).
* device RSS during a round: ``VmHWM`` of the FL agent process after the rounds, against the
  same agent without FL (``VmHWM`` of the FL-disabled process, which saw the same release; it
  is stopped before the run, since the service would sample it and wait out its timeout); and
  against a native device: the peak RSS of one SuperNode's whole process tree (SuperNode +
  superexec + the ``flwr-clientapp`` it starts per message), the largest of the N.
* idle RSS: ``VmRSS`` of the FL-enabled process after the bootstrap release, before any round,
  against the FL-disabled process at the same point.
* where a round's RSS goes (a note): VmRSS after each import a round adds, in a fresh process,
  with and without pandas (scikit-learn imports it whenever it is installed).
* coordinator time per round (validation + aggregation + export + registration, from
  ``RoundRecord.coordinator_seconds``) against the strategy's own ``aggregate_train``
  (``RoundRecord.aggregate_seconds``).

MB = 10^6 bytes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._util import Row, median

if TYPE_CHECKING:
    from edgefleet.federated.native import NativeResult
    from edgefleet.simulations.fleet import Fleet

NAME = "fl"
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise KeyError(key)


def _wait_log(fleet: Fleet, device: str, needle: str, proc: subprocess.Popen[bytes],
              timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{device} exited: {fleet.log_of(device)[-2000:]}")
        if needle in fleet.log_of(device):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{device}: no {needle!r} in its log after {timeout} s")


def _mqtt_run(work: Path, agents: int, rounds: int) -> dict[str, object]:
    """The measured fleet: one FL agent process, agents-1 thread agents, one non-FL process."""
    import numpy as np
    from edgefleet.coordinator.service import mqtt_config_for
    from edgefleet.federated.data import add_samples, digits_federation
    from edgefleet.federated.service import FlService
    from edgefleet.simulations.fl import BOOTSTRAP, FlSimConfig, _bootstrap_model, _start_agent
    from edgefleet.simulations.fleet import open_fleet

    cfg = FlSimConfig(agents=agents, rounds=rounds, broker="mosquitto", release="")
    devices = [f"fl-{i}" for i in range(agents)]
    proc_dev, off_dev = devices[0], "nofl-0"
    federation = digits_federation(n_clients=agents, alpha=cfg.alpha, seed=cfg.seed)
    base = _bootstrap_model(work / "bootstrap", cfg.seed)
    out: dict[str, object] = {}
    with open_fleet(work, [*devices, off_dev], models=[base], broker="mosquitto") as fleet:
        for device, part in zip(devices, federation.clients, strict=True):
            fleet.set_agent(device, fl_enabled=True, fl_data_dir="fl-data")
            add_samples(fleet.homes[device] / "fl-data",
                        np.concatenate([part.x_train, part.x_test]),
                        np.concatenate([part.y_train, part.y_test]))  # fmt: skip
        fleet.start_service()
        fl_proc = fleet.spawn_agent(proc_dev)
        off_proc = fleet.spawn_agent(off_dev)
        threads = [_start_agent(fleet, d, cfg.heartbeat, None)[1] for d in devices[1:]]
        service = None
        try:
            _wait_log(fleet, proc_dev, "federated learning enabled", fl_proc)
            fleet.wait_active([*devices, off_dev],
                              fleet.release(base.version, name=BOOTSTRAP).sequence, timeout=60)
            time.sleep(1.0)  # both processes idle with the model active
            out["idle_fl"] = _status_mb(fl_proc.pid, "VmRSS")
            out["idle_nofl"] = _status_mb(off_proc.pid, "VmRSS")
            out["hwm_nofl"] = _status_mb(off_proc.pid, "VmHWM")  # it has no part in a round
            # the service samples it despite FL being off in its agent.toml (it would cost a
            # round_timeout per round): it leaves before the run
            off_proc.terminate()
            off_proc.wait(10)
            time.sleep(1.5)
            c = fleet.coordinator
            mqtt = mqtt_config_for(c, client_id="coordinator-fl", broker=fleet.broker.url,
                                   password=fleet.users[c.config.username],
                                   protocol=fleet.protocol)  # fmt: skip
            service = FlService(c, mqtt, link_factory=fleet.broker.link_factory)
            service.start()
            outcome = service.run(cfg.spec("bench"))
            out["hwm_fl"] = _status_mb(fl_proc.pid, "VmHWM")
            out["round_seconds"] = list(outcome.round_seconds)
            records = [r for r in outcome.result.rounds if r.version]
            if len(records) != rounds:
                raise AssertionError(f"{len(records)} of {rounds} rounds aggregated")
            out["aggregate"] = [r.aggregate_seconds for r in records]
            out["coordinator"] = [r.coordinator_seconds for r in records]
        finally:
            for fl in threads:
                fl.stop(timeout=5)
            if service is not None:
                service.stop()
    return out


def _memory_round_seconds(work: Path, agents: int, rounds: int) -> list[float]:
    from edgefleet.simulations.fl import FlSimConfig, run_fl

    cfg = FlSimConfig(agents=agents, rounds=rounds, broker="memory", release="")
    return list(run_fl(work, cfg).outcome.round_seconds)


def _native(work: Path, nodes: int, rounds: int, quick: bool) -> NativeResult | None:
    if quick and os.environ.get("EDGEFLEET_BENCH_NATIVE") != "1":
        return None
    from edgefleet.federated.native import run_native

    return run_native(work, nodes=nodes, rounds=rounds)


_PROBE = """
import importlib, importlib.abc, sys
class NoPandas(importlib.abc.MetaPathFinder):  # what a device without pandas installed sees
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "pandas":
            raise ImportError(name)
if sys.argv[1] == "1":
    sys.meta_path.insert(0, NoPandas())
def mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
out = []
for mod in ("numpy", "onnxruntime", "flwr.app", "sklearn.neural_network"):
    importlib.import_module(mod)
    out.append(f"{mod} {mb():.1f}")
print("; ".join(out))
"""


def _rss_breakdown() -> list[str]:
    """VmRSS after each import a round adds, in a fresh process (with and without pandas,
    which scikit-learn imports whenever it is installed)."""
    import sys

    notes = []
    for blocked, label in (("0", "this venv"), ("1", "pandas hidden")):
        res = subprocess.run([sys.executable, "-c", _PROBE, blocked], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        notes.append(f"round imports, VmRSS MB after each ({label}): {res.stdout.strip()}")
    return notes


def run(quick: bool) -> list[Row]:
    from edgefleet.infra.broker import _which

    _NOTES.clear()
    if _which("mosquitto") is None:
        _NOTES.append("skipped: needs the mosquitto binary (rounds over a real broker)")
        return []
    agents, rounds = (3, 2) if quick else (5, 3)
    with tempfile.TemporaryDirectory(prefix="bench-fl-") as tmp:
        work = Path(tmp)
        m = _mqtt_run(work / "mqtt", agents, rounds)
        mem = _memory_round_seconds(work / "memory", agents, rounds)
        native = _native(work / "native", agents, rounds, quick)
    secs: list[float] = m["round_seconds"]  # type: ignore[assignment]
    agg: list[float] = m["aggregate"]  # type: ignore[assignment]
    coord: list[float] = m["coordinator"]  # type: ignore[assignment]
    rows = [
        Row(key="round_s:mosquitto", metric=f"round time, {agents} agents, digits, MqttGrid on "
            "mosquitto (1 agent a process), rounds after the 1st", value=median(secs[1:] or secs),
            unit="s",
            baseline="same run on the in-memory broker, rounds after the 1st",
            baseline_value=median(mem[1:] or mem)),
        Row(key="hwm_mb:agent_fl", metric="device VmHWM after the rounds, `agent run` with FL",
            value=float(m["hwm_fl"]), unit="MB",  # type: ignore[arg-type]
            baseline="same agent, FL disabled", baseline_value=float(m["hwm_nofl"])),  # type: ignore[arg-type]
        Row(key="idle_rss_mb:agent_fl", metric="idle agent VmRSS, FL enabled, no round yet",
            value=float(m["idle_fl"]), unit="MB",  # type: ignore[arg-type]
            baseline="same agent, FL disabled", baseline_value=float(m["idle_nofl"]),  # type: ignore[arg-type]
            aim="<= 1.05"),
        Row(key="coordinator_s:round", metric="coordinator time per round (validate + "
            "aggregate + export + register)", value=median(coord), unit="s",
            baseline="strategy's own aggregate_train", baseline_value=median(agg)),
    ]
    if native is not None:
        rows.append(Row(key="round_s:native", metric=f"round time, {agents} agents, digits, "
                        "MqttGrid on mosquitto, rounds after the 1st",
                        value=median(secs[1:] or secs), unit="s",
                        baseline=f"Flower native: SuperLink + {agents} SuperNodes, loopback, "
                        "same app and settings", baseline_value=native.seconds_per_round,
                        aim="<= 0.01", note="stretch 1/300"))
        rows.append(Row(key="hwm_mb:native", metric="device peak RSS during the rounds, "
                        "`agent run` with FL (VmHWM)", value=float(m["hwm_fl"]),  # type: ignore[arg-type]
                        unit="MB", baseline="native SuperNode + superexec + flwr-clientapp "
                        "tree, peak (psutil)", baseline_value=native.device_peak_rss_max / 1e6,
                        aim="<= 0.333", note="stretch 1/4"))
        _NOTES.append(
            f"native: {native.rounds} rounds, seconds "
            f"{', '.join(f'{s:.1f}' for s in native.round_seconds)}; "
            f"accuracy {', '.join(f'{a:.3f}' for a in native.accuracy)}; device tree peaks "
            f"{', '.join(f'{r / 1e6:.0f}' for r in native.device_peak_rss)} MB; SuperLink tree "
            f"{native.superlink_peak_rss / 1e6:.0f} MB; {native.samples} RSS samples")
    else:
        _NOTES.append("native SuperLink/SuperNode rows skipped in --quick "
                      "(EDGEFLEET_BENCH_NATIVE=1 runs them)")
    _NOTES.append("round 1 waits out round_timeout for the stopped FL-disabled agent, which "
                  "the service still samples (presence not yet expired): excluded")
    _NOTES.extend(_rss_breakdown())
    _NOTES.append(f"{agents} agents, {rounds} rounds; per-round medians; mosquitto round "
                  f"seconds {', '.join(f'{s:.3f}' for s in secs)}")
    return rows

