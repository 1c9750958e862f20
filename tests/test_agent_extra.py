"""The agent side must run with only the ``agent`` extra: no scikit-learn, SQL, rich or Flower.

A child process blocks those imports outright, then installs a bundle and predicts through the
real CLI, so a stray import anywhere on the agent path fails here.
"""

import json
import subprocess
import sys
from pathlib import Path

from edgefleet.coordinator.home import Coordinator

from .conftest import Digits

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"sklearn", "scipy", "sqlalchemy", "rich", "flwr", "onnx",
           "edgefleet.coordinator", "edgefleet.models"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or ".".join(name.split(".")[:2]) in BLOCKED:
            raise ImportError(f"{name} is not part of the agent extra")
sys.meta_path.insert(0, Block())
from edgefleet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=120
    )


def test_agent_commands_work_without_coordinator_dependencies(
    tmp_path: Path, digits_v1: Digits
) -> None:
    c = Coordinator.init(tmp_path / "coord")
    c.register_model("digits", digits_v1.onnx)
    home = tmp_path / "dev"
    init = _cli(
        "agent",
        "init",
        "--home",
        str(home),
        "--device-id",
        "dev-x",
        "--trust",
        str(tmp_path / "coord" / "root.pub"),
    )
    assert init.returncode == 0, init.stderr
    from edgefleet.protocol.device import DevicePublic

    c.enroll(DevicePublic.decode((home / "keys" / "device.pub.json").read_bytes()))
    _, built = c.build("digits", "1", "dev-x")
    c.write_bundle(built, tmp_path / "b.efb")

    install = _cli("agent", "install", "--home", str(home), str(tmp_path / "b.efb"))
    assert install.returncode == 0, install.stderr
    x = tmp_path / "x.npy"
    import numpy as np

    np.save(x, np.load(digits_v1.test_path)["x"][:5])
    predict = _cli("agent", "predict", "--home", str(home), "--input-file", str(x), "--json")
    assert predict.returncode == 0, predict.stderr
    out = np.asarray(json.loads(predict.stdout)["outputs"])
    np.testing.assert_allclose(out, digits_v1.proba(np.load(x)), atol=1e-5)
    status = _cli("agent", "status", "--home", str(home), "--json")
    assert json.loads(status.stdout)["active"]["version"] == "1"
