"""The federated part of ``edgefleet demo --fl``: the demo's agents train the digits model on
their own non-IID partitions in Flower rounds, and the last round's model goes out to all.

``opt_in`` runs before the agents start: it sets ``fl_enabled`` in each ``agent.toml`` and
adds the device's Dirichlet(α) partition of the digits training split with ``edgefleet agent
data add`` (what an operator does). ``run_rounds`` runs ``edgefleet fl start`` (a progress line
per round, a version per round, released to all) and returns the released sequence and the
registered versions with their accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALPHA", "NAME", "opt_in", "run_rounds", "test_split"]

NAME = "digits-fl"
ALPHA = 0.5  # Dirichlet label skew of the partitions
SEED = 0


def test_split() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split (the same as ``model train digits``'s, seed 0)."""
    from edgefleet.federated.data import digits_federation

    fed = digits_federation(n_clients=1, alpha=ALPHA, seed=SEED)
    return fed.x_test, fed.y_test


def opt_in(workdir: Path, devices: list[str], cli: Callable[..., None]) -> list[int]:
    """Opt every device in and give it its partition; the number of samples of each."""
    from edgefleet.agent.config import AgentConfig
    from edgefleet.federated.data import digits_federation
    from edgefleet.infra.fsutil import atomic_write

    fed = digits_federation(n_clients=len(devices), alpha=ALPHA, seed=SEED)
    sizes = []
    for dev, part in zip(devices, fed.clients, strict=True):
        home = workdir / dev
        cfg = dataclasses.replace(AgentConfig.load(home), fl_enabled=True, fl_data_dir="fl-data")
        atomic_write(home / "agent.toml", cfg.to_toml().encode())
        x = np.concatenate([part.x_train, part.x_test])
        y = np.concatenate([part.y_train, part.y_test])
        samples = workdir / f"{dev}-samples.npz"
        np.savez(samples, x=x, y=y)
        cli("agent", "data", "add", "--home", str(home), str(samples))
        sizes.append(len(y))
    return sizes


def run_rounds(
    chome: Path, devices: list[str], rounds: int, cli: Callable[..., None]
) -> tuple[int, list[tuple[int, str, float]]]:
    """``fl start`` over all devices; (released sequence, [(round, version, accuracy)]).
    The round timeout is generous: each agent imports Flower and scikit-learn on its first
    instruction, which on a busy 2-core machine takes tens of seconds."""
    from edgefleet.coordinator.home import Coordinator

    cli("fl", "start", "--home", str(chome), "--name", NAME, "--rounds", str(rounds),
        "--min-clients", str(len(devices)), "--run-id", "demo-fl", "--local-epochs", "5",
        "--round-timeout", "180", "--release-to", "all")  # fmt: skip
    c = Coordinator.open(chome)
    versions: list[Any] = [m for m in c.registry.models() if m.name == NAME]
    rows = [(int(m.lineage["fl"]["round"]), m.version,
             float(m.lineage["fl"]["metrics"]["eval"].get("eval-accuracy", float("nan"))))
            for m in versions]  # fmt: skip
    sequence = max(r.sequence for r in c.registry.releases())
    return sequence, rows
