"""The FL app on Flower's own deployment: the Flower App that ``native.write_app`` writes is a
valid FAB whose ServerApp/ClientApp are ``federated/app.py``'s; and (slow) it completes 2 rounds
on a real ``flower-superlink`` + ``flower-supernode``s on loopback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from edgefleet.federated import native  # noqa: E402
from edgefleet.federated.data import add_samples, digits_federation  # noqa: E402
from edgefleet.simulations.fl import FlSimConfig  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.cli.build import build_fab_from_disk  # noqa: E402
from flwr.cli.install import install_from_fab  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.config import get_fab_config, validate_config  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.supercore.object_ref import load_app  # noqa: E402

from .conftest import LocalGrid  # noqa: E402


def _settings(tmp_path: Path, nodes: int, rounds: int) -> dict[str, object]:
    return native._settings(nodes=nodes, rounds=rounds, alpha=0.5, seed=0, local_epochs=1,
                            lr=0.1, round_timeout=30, out=tmp_path / "rounds.jsonl")  # fmt: skip


def test_the_run_is_the_one_the_mqtt_simulation_runs(tmp_path: Path) -> None:
    settings = _settings(tmp_path, nodes=5, rounds=3)
    ours = native.run_spec(settings)
    sim = FlSimConfig(agents=5, rounds=3, local_epochs=1).spec("native")
    assert (ours.model, ours.train, ours.strategy, ours.policy, ours.seed) == (
        sim.model, sim.train, sim.strategy, sim.policy, sim.seed)  # fmt: skip


def test_the_app_is_a_fab_whose_apps_are_ours_and_complete_a_round(tmp_path: Path) -> None:
    """Built and installed as a SuperNode does, then loaded with Flower's own loader; the loaded
    ServerApp runs one round over two loaded ClientApps reading their node config's data-dir."""
    app_dir = native.write_app(tmp_path / "app", _settings(tmp_path, nodes=2, rounds=1))
    fab = build_fab_from_disk(app_dir)
    ok, errors, _ = validate_config(get_fab_config(fab), check_module=True, project_dir=app_dir)
    assert ok, errors
    installed = install_from_fab(fab, tmp_path / "installed", skip_prompt=True)
    server = load_app(f"{native.APP_PACKAGE}.server:app", ValueError, installed)
    client = load_app(f"{native.APP_PACKAGE}.client:app", ValueError, installed)
    assert isinstance(server, ServerApp) and isinstance(client, ClientApp)

    fed = digits_federation(n_clients=2, alpha=0.5, seed=0)
    grid = LocalGrid({11: client, 12: client})
    for (node_id, node), part in zip(grid.nodes.items(), fed.clients, strict=True):
        d = tmp_path / "data" / str(node_id)
        add_samples(d, np.concatenate([part.x_train, part.x_test]),
                    np.concatenate([part.y_train, part.y_test]))  # fmt: skip
        node.context.node_config["data-dir"] = str(d)
    server(grid, Context(run_id=7, node_id=1, node_config={}, state=RecordDict(),
                         run_config={}))  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1]
    assert 0.3 < lines[0]["accuracy"] <= 1.0  # one local epoch from random weights


@pytest.mark.slow
def test_two_rounds_complete_on_a_native_superlink_and_supernodes(tmp_path: Path) -> None:
    result = native.run_native(tmp_path, nodes=2, rounds=2, local_epochs=1, timeout=900)
    assert result.rounds == 2 and len(result.round_seconds) == 2
    assert all(math.isfinite(a) and 0.3 < a <= 1.0 for a in result.accuracy)
    assert result.samples > 0
    # a SuperNode tree (SuperNode + superexec + flwr-clientapp) holds Flower and scikit-learn
    assert all(rss > 100e6 for rss in result.device_peak_rss)
    assert result.superlink_peak_rss > 100e6
