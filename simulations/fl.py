"""Federated learning on the fleet rig: N agents with non-IID digits partitions, R rounds.

``run_fl(work, FlSimConfig(...))`` provisions a fleet (``open_fleet``) on any broker, gives
each agent its Dirichlet(α) partition of scikit-learn's bundled digits as its local data
directory (``agent.toml``: ``fl_enabled``, ``fl_data_dir``), releases a small bootstrap model
so every agent holds the coordinator's keyring (instructions are verified with it), runs the
FL service's rounds (each round's global model a registry version) with the central test
split as ``central_eval``, releases the last round through the signed release path and has
every agent predict the test split with the model it now serves. ``edgefleet sim fl`` prints
the accuracy per round and writes it as CSV, plus a PNG plot if matplotlib is installed.

``fl_fleet`` is the same rig as a context manager, for tests that need to step in (kill an
agent mid-round, gate a ClientApp, compare brokers).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from edgefleet.coordinator.service import mqtt_config_for
from edgefleet.federated.agent import DeviceFl
from edgefleet.federated.data import Federation, add_samples, digits_federation
from edgefleet.federated.runs import RoundRecord, RunSpec
from edgefleet.federated.service import FlOutcome, FlService, ReleasePolicy
from edgefleet.federated.strategies import DpSpec, StrategySpec, UpdatePolicy
from edgefleet.federated.trainer import ModelSpec, TrainConfig, Trainer

from .brokers import BrokerKind
from .fleet import Fleet, RunningAgent, open_fleet
from .homes import ModelFile

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

__all__ = ["FlFleet", "FlSimConfig", "FlSimResult", "fl_fleet", "run_fl", "write_report"]

log = logging.getLogger(__name__)

BOOTSTRAP = "digits-base"  # the model released first, so every agent holds the keyring


@dataclass(frozen=True, kw_only=True)
class FlSimConfig:
    agents: int = 5
    rounds: int = 10
    alpha: float = 0.5  # Dirichlet concentration: smaller = more label skew
    seed: int = 0
    broker: BrokerKind = "memory"
    name: str = "digits-fl"
    strategy: str = "fedavg"
    hidden: int = 64
    local_epochs: int = 5
    lr: float = 0.1
    optimizer: str = "sgd"
    fraction: float = 1.0
    min_clients: int = 0  # 0 = all agents
    quorum: int = 0  # 0 = min_clients
    round_timeout: float = 60.0  # s
    release: str = "all"  # selector the last round is released to; "" = none
    heartbeat: float = 0.5  # s between agent statuses
    dp_noise: float | None = None  # central DP (FedAvg): noise multiplier z, with dp_clip
    dp_clip: float | None = None  # the L2 clipping norm C of each update

    def spec(self, run_id: str = "sim") -> RunSpec:
        k = self.min_clients or self.agents
        dp = None
        if self.dp_noise is not None or self.dp_clip is not None:
            if self.dp_noise is None or self.dp_clip is None:
                raise ValueError("differential privacy needs both a noise multiplier and a clip")
            dp = DpSpec(noise_multiplier=self.dp_noise, clipping_norm=self.dp_clip)
        return RunSpec(
            run_id=run_id,
            model_name=self.name,
            rounds=self.rounds,
            model=ModelSpec(hidden=(self.hidden,)),
            train=TrainConfig(optimizer=self.optimizer, lr=self.lr,
                              local_epochs=self.local_epochs, seed=self.seed),
            strategy=StrategySpec(name=self.strategy, fraction_train=self.fraction,
                                  min_train_nodes=k, min_evaluate_nodes=k,
                                  min_available_nodes=k, dp=dp),
            policy=UpdatePolicy(quorum=self.quorum or k, max_update_norm=100.0),
            round_timeout=self.round_timeout,
            seed=self.seed,
        )  # fmt: skip


@dataclass
class FlFleet:
    fleet: Fleet
    federation: Federation
    service: FlService
    fl: dict[str, DeviceFl] = field(default_factory=dict)

    @property
    def devices(self) -> list[str]:
        return self.fleet.devices

    def central_eval(self, trainer: Trainer) -> dict[str, float]:
        r = trainer.evaluate(self.federation.x_test, self.federation.y_test)
        return {"accuracy": r.accuracy, "loss": r.loss}

    def kill(self, device: str) -> None:
        """The agent dies mid-whatever: its daemon stops, its FL client sends nothing more."""
        self.fl.pop(device).stop(timeout=0)
        self.fleet.kill(device)

    def served_accuracy(self, device: str) -> float:
        running = self.fleet.agents[device]
        proba = running.agent.predict(self.federation.x_test.astype(np.float32))
        return float(np.mean(np.argmax(proba, axis=1) == self.federation.y_test))


def _start_agent(
    fleet: Fleet, device: str, heartbeat: float, app: ClientApp | None
) -> tuple[RunningAgent, DeviceFl]:
    box: list[DeviceFl] = []
    running = fleet.start_agent(
        device, heartbeat=heartbeat, extra_handlers={"fl": lambda p: box[0].client.handle(p)}
    )
    fl = DeviceFl(running.agent, client_app=app)
    fl.bind(running.daemon)
    box.append(fl)
    return running, fl


@contextmanager
def fl_fleet(
    work: Path,
    cfg: FlSimConfig,
    *,
    apps: dict[str, Callable[[], ClientApp]] | None = None,  # device -> its own ClientApp
    opted_out: Collection[str] = (),  # devices with fl_enabled = false (they hold data too)
) -> Iterator[FlFleet]:
    """A running fleet whose agents hold their partitions and the keyring, an FL service."""
    devices = [f"fl-{i}" for i in range(cfg.agents)]
    federation = digits_federation(n_clients=cfg.agents, alpha=cfg.alpha, seed=cfg.seed)
    base = _bootstrap_model(work / "bootstrap", cfg.seed)
    with open_fleet(work, devices, models=[base], broker=cfg.broker) as fleet:
        for device, part in zip(devices, federation.clients, strict=True):
            fleet.set_agent(device, fl_enabled=device not in opted_out, fl_data_dir="fl-data")
            add_samples(fleet.homes[device] / "fl-data",
                        np.concatenate([part.x_train, part.x_test]),
                        np.concatenate([part.y_train, part.y_test]))  # fmt: skip
        fleet.start_service()
        flf: list[DeviceFl] = []
        for device in devices:
            app = (apps or {}).get(device)
            _, fl = _start_agent(fleet, device, cfg.heartbeat, app() if app else None)
            flf.append(fl)
        fleet.wait_active(devices, fleet.release(base.version, name=BOOTSTRAP).sequence)
        c = fleet.coordinator
        mqtt = mqtt_config_for(c, client_id="coordinator-fl", broker=fleet.broker.url,
                               password=fleet.users[c.config.username],
                               protocol=fleet.protocol)  # fmt: skip
        service = FlService(c, mqtt, link_factory=fleet.broker.link_factory)
        service.start()
        sim = FlFleet(fleet, federation, service, dict(zip(devices, flf, strict=True)))
        try:
            yield sim
        finally:
            for fl in sim.fl.values():
                fl.stop(timeout=5)
            service.stop()


def _bootstrap_model(out: Path, seed: int) -> ModelFile:
    from edgefleet.models.digits import write_digits_artifacts

    art = write_digits_artifacts(out, seed=seed, hidden=8)
    return ModelFile(name=BOOTSTRAP, path=art.onnx_path, version="1")


@dataclass(frozen=True, kw_only=True)
class FlSimResult:
    centralized: float  # test accuracy of the same architecture trained on all the data
    accuracy: tuple[float, ...]  # central test accuracy of each round's global model
    records: tuple[RoundRecord, ...]
    outcome: FlOutcome
    served: dict[str, float]  # device -> test accuracy of the model it serves after release
    strategy: str = "fedavg"
    agents: int = 0

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.outcome.result.weights


def centralized_accuracy(cfg: FlSimConfig) -> float:
    """The same architecture trained centrally on the same split and seed."""
    from edgefleet.models.digits import load_digits_split, train_digits

    split = load_digits_split(cfg.seed)
    model = train_digits(split, seed=cfg.seed, hidden=cfg.hidden)
    return float(model.score(split.X_test, split.y_test))


def run_fl(
    work: Path,
    cfg: FlSimConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,  # the fleet is up; the rounds start now
) -> FlSimResult:
    records: list[RoundRecord] = []

    def record(r: RoundRecord) -> None:
        records.append(r)
        if on_round is not None:
            on_round(r)

    with fl_fleet(work, cfg) as sim:
        policy = ReleasePolicy(selector=cfg.release) if cfg.release else None
        if on_start is not None:
            on_start()
        outcome = sim.service.run(cfg.spec(), central_eval=sim.central_eval, on_round=record,
                                  release=policy)  # fmt: skip
        served: dict[str, float] = {}
        if outcome.released is not None:
            targets = list(outcome.released.targets)
            sim.fleet.wait_active(targets, outcome.released.sequence)
            served = {d: sim.served_accuracy(d) for d in targets}
    accuracy = tuple(
        float(r.lineage["fl"]["metrics"]["central"]["accuracy"]) for r in records if r.version
    )
    return FlSimResult(
        centralized=centralized_accuracy(cfg),
        accuracy=accuracy,
        records=tuple(records),
        outcome=outcome,
        served=served,
        strategy=cfg.strategy,
        agents=cfg.agents,
    )


def epsilons(result: FlSimResult) -> tuple[float | None, ...]:
    """ε after each registered round (None without DP)."""
    return tuple((r.lineage["fl"].get("dp") or {}).get("epsilon") for r in result.records
                 if r.version)  # fmt: skip


def write_report(result: FlSimResult, out: Path) -> list[Path]:
    """``accuracy.csv`` (round, version, accuracy, centralized, seconds, epsilon) and, if
    matplotlib is importable, ``accuracy.png``: accuracy per round against the centralized
    model and, with DP, accuracy against ε beside it. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result.records if r.version]
    seconds: Sequence[float] = result.outcome.round_seconds
    eps = epsilons(result)
    path = out / "accuracy.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "version", "accuracy", "centralized", "seconds", "epsilon"])
        for r, acc, s, e in zip(rows, result.accuracy, seconds, eps, strict=False):
            w.writerow([r.round, r.version, f"{acc:.4f}", f"{result.centralized:.4f}", f"{s:.3f}",
                        "" if e is None else f"{e:.4f}"])  # fmt: skip
    png = _plot(result, [r.round for r in rows], eps, out / "accuracy.png")
    return [path] if png is None else [path, png]


def _plot(result: FlSimResult, rounds: list[int], eps: Sequence[float | None],
          png: Path) -> Path | None:  # fmt: skip
    """The PNG, or None if matplotlib is not installed (the ``plots`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; before pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s", png.name)
        return None
    from matplotlib.ticker import MaxNLocator

    with_dp = bool(eps) and all(e is not None for e in eps)
    dp = next(r.lineage["fl"]["dp"] for r in result.records if r.version) if with_dp else {}
    fig, axes = plt.subplots(1, 2 if with_dp else 1, figsize=(10 if with_dp else 6, 4),
                             squeeze=False, dpi=100)  # fmt: skip
    ax = axes[0][0]
    ax.plot(rounds, result.accuracy, marker="o", label="federated (global)")
    ax.axhline(result.centralized, linestyle="--", color="gray", label="centralized")
    ax.axhline(0.97 * result.centralized, linestyle=":", color="gray", label="0.97 x centralized")
    title = f"{result.strategy} on digits, {result.agents} agents"
    if dp:
        title += f", DP z={dp['noise_multiplier']:g} C={dp['clipping_norm']:g}"
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1.02), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    if with_dp:
        ax = axes[0][1]
        ax.plot([float(e) for e in eps if e is not None], result.accuracy, marker="o")
        ax.set(xlabel=f"epsilon (delta = {dp['delta']:g})", ylabel="test accuracy", ylim=(0, 1.02),
               title="accuracy against privacy spent")  # fmt: skip
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
