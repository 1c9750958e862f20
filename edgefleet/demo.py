"""``edgefleet demo``: the whole path on one machine, in about a minute.

Starts an embedded broker (the system mosquitto with a generated, locked-down config, else
amqtt), a coordinator and N agents as separate processes; trains and registers the digits
model, enrolls the agents, releases v1 to all, shows progress, checks each agent's
predictions over its local HTTP API, then releases v2 (a retrained model, TFLite) to one
group and shows that only that group switched. With ``--fl`` (``make demo DEMO_ARGS=--fl``)
the agents also opt in to federated learning with their own non-IID digits partitions, train
the model in ``--fl-rounds`` Flower rounds (a progress line and a registered version per
round), and the last round's model is released to all of them and served (``_demo_fl``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

console = Console(stderr=False)


def _cli(*args: str) -> None:
    from edgefleet.cli import main

    code = main(list(args))
    if code != 0:
        raise RuntimeError(f"edgefleet {' '.join(args)} exited {code}")


def _spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def _wait_release(
    coordinator: Any, sequence: int, targets: list[str], timeout: float, label: str
) -> None:
    """Show per-device progress from the statuses the coordinator ingests."""
    from edgefleet.coordinator.fleet import TargetState, wait_for

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        console=console,
    ) as bar:
        tasks = {t: bar.add_task(f"{label} → {t}", total=1.0, state="waiting") for t in targets}

        def show(states: list[TargetState]) -> None:
            for s in states:
                if s.arrived:
                    bar.update(tasks[s.device_id], completed=1.0, state=f"v{s.version} active")
                elif s.total and s.done is not None:
                    bar.update(tasks[s.device_id], completed=s.done / s.total, state=s.state)

        result = wait_for(
            coordinator.registry, sequence, targets, timeout, poll=0.2, on_progress=show
        )
    if not result.ok:
        raise TimeoutError(
            f"{label}: not every device reported release {sequence} in {timeout:.0f} s"
        )


def run(workdir: Path, n_agents: int, fl_rounds: int = 0) -> int:
    from edgefleet.agent.http import predict_via_http
    from edgefleet.coordinator.brokerconf import credentials
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.simulations.brokers import start_broker
    from edgefleet.simulations.homes import point_agents_at

    t0 = time.monotonic()
    chome, mdir = workdir / "coordinator", workdir / "models"
    devices = [f"device-{i + 1}" for i in range(n_agents)]
    console.rule("[bold]EdgeFleet demo")
    console.print(f"workdir {workdir}")
    _cli("coordinator", "init", "--home", str(chome))
    _cli("model", "train", "digits", "--out", str(mdir / "v1"))
    _cli("model", "train", "digits", "--out", str(mdir / "v2"), "--hidden", "64")
    for version, model in (
        ("1", mdir / "v1" / "digits.onnx"),
        ("2", mdir / "v2" / "digits.tflite"),
    ):
        _cli(
            "model",
            "register",
            "--home",
            str(chome),
            "--name",
            "digits",
            "--file",
            str(model),
            "--version",
            version,
        )
    for dev in devices:
        ahome = workdir / dev
        _cli(
            "agent",
            "init",
            "--home",
            str(ahome),
            "--device-id",
            dev,
            "--trust",
            str(chome / "root.pub"),
        )
        _cli(
            "coordinator",
            "enroll",
            "--home",
            str(chome),
            "--device-id",
            dev,
            "--public-key",
            str(ahome / "keys" / "device.pub.json"),
        )
    canary = devices[-1:]
    _cli("coordinator", "group", "add", "--home", str(chome), "canary", *canary)
    coordinator = Coordinator.open(chome)
    users = credentials(coordinator)
    procs: list[subprocess.Popen[bytes]] = []
    broker = start_broker("auto", users=users, data_dir=workdir / "broker")
    try:
        console.print(
            f"broker: {broker.kind} on {broker.url} "
            f"(MQTT {'5' if broker.protocol == 5 else '3.1.1'}"
            f"{', passwords + ACL' if broker.kind == 'mosquitto' else ', demo only: no ACL'})"
        )
        point_agents_at(
            coordinator, {dev: workdir / dev for dev in devices}, broker.url, broker.protocol
        )
        if fl_rounds:
            from . import _demo_fl

            _demo_fl.opt_in(workdir, devices, _cli)
        try:
            procs.append(
                _spawn(workdir / "coordinator.log", "coordinator", "serve", "--home", str(chome))
            )
            for dev in devices:
                procs.append(
                    _spawn(
                        workdir / f"{dev}.log",
                        "agent",
                        "run",
                        "--home",
                        str(workdir / dev),
                        "--heartbeat",
                        "1",
                    )
                )
            seq1 = _release(chome, "1", "all")
            _wait_release(Coordinator.open(chome), seq1, devices, 60, "v1")
            test = np.load(mdir / "v1" / "digits_test.npz")
            acc1 = _accuracies(workdir, devices, test, predict_via_http)
            seq2 = _release(chome, "2", "group:canary")
            _wait_release(Coordinator.open(chome), seq2, canary, 60, "v2")
            acc2 = _accuracies(workdir, devices, test, predict_via_http)
            _summary(Coordinator.open(chome), devices, acc1, acc2, canary)
            if fl_rounds:
                console.rule("[bold]federated learning")
                seq3, rows = _demo_fl.run_rounds(chome, devices, fl_rounds, _cli)
                _wait_release(Coordinator.open(chome), seq3, devices, 60, _demo_fl.NAME)
                x, y = _demo_fl.test_split()
                acc3 = _accuracies(workdir, devices, {"x": x, "y": y}, predict_via_http)
                _fl_summary(rows, acc3, acc2[canary[0]])
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    finally:
        broker.close()
    console.print(f"[green]demo finished in {time.monotonic() - t0:.1f} s")
    return 0


def _release(chome: Path, version: str, to: str) -> int:
    from edgefleet.coordinator.home import Coordinator

    _cli(
        "model",
        "release",
        "--home",
        str(chome),
        "--name",
        "digits",
        "--version",
        version,
        "--to",
        to,
    )
    return max(r.sequence for r in Coordinator.open(chome).registry.releases())


def _accuracies(workdir: Path, devices: list[str], test: Any, predict: Any) -> dict[str, float]:
    out = {}
    for dev in devices:
        probs = None
        for _ in range(50):  # the daemon's HTTP API may still be starting
            probs = predict(workdir / dev, test["x"])
            if probs is not None:
                break
            time.sleep(0.1)
        if probs is None:
            raise RuntimeError(f"{dev}: local HTTP API not reachable")
        out[dev] = float((np.asarray(probs).argmax(axis=1) == test["y"]).mean())
    return out


def _summary(
    coordinator: Any,
    devices: list[str],
    acc1: dict[str, float],
    acc2: dict[str, float],
    canary: list[str],
) -> None:
    table = Table(
        "device",
        "group",
        "version",
        "format",
        "accuracy after v1",
        "accuracy now",
        title="fleet after releasing v2 to group canary",
    )
    rows = {d.device_id: d for d in coordinator.registry.devices()}
    fmt = {m.version: m.format for m in coordinator.registry.models()}
    for dev in devices:
        d = rows[dev]
        table.add_row(
            dev,
            "canary" if dev in canary else "-",
            str(d.active_version),
            fmt.get(d.active_version or "", "?"),
            f"{acc1[dev]:.4f}",
            f"{acc2[dev]:.4f}",
        )
    console.print(table)
    switched = [d for d in devices if rows[d].active_version == "2"]
    if sorted(switched) != sorted(canary):
        raise RuntimeError(f"expected only {canary} on v2, saw {switched}")
    console.print(f"only the canary group switched to v2: {', '.join(switched)}")


def _fl_summary(
    rows: list[tuple[int, str, float]], served: dict[str, float], centralized: float
) -> None:
    from ._demo_fl import NAME

    table = Table("round", "version", "eval accuracy (on the devices)",
                  title=f"{NAME}: one registered version per round")  # fmt: skip
    for rnd, version, acc in rows:
        table.add_row(str(rnd), version, f"{acc:.4f}")
    console.print(table)
    worst = min(served.values())
    console.print(f"{NAME} {rows[-1][1]} served by {len(served)} agents: test accuracy "
                  f"{worst:.4f} (v2, the same MLP trained centrally: {centralized:.4f})")


def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(workdir.resolve(), args.agents, args.fl_rounds if args.fl else 0)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"files kept in {workdir}")
