"""Package layering, checked on the source (AST), including imports inside functions.

Every folder installs as ``edgefleet.<folder>``; imports may only point down these layers:

    cli          edgefleet/*.py — composition root: CLI, demo, progress (may import anything)
    console      the operator's HTTP API and dashboard      -> federated, coordinator, ...
    simulations  fleets of agents and coordinators          -> federated, agent, coordinator, ...
    federated    Flower apps and their MQTT transport       -> coordinator, models, infra, protocol
    agent        the device                                 -> infra, protocol (no models/SQL)
    coordinator  the ML team's side                         -> models, infra, protocol
    models       reference models, trainers, exporters      -> infra, protocol
    infra        shared I/O adapters: link, broker, files   -> protocol
    protocol     pure: no other EdgeFleet layer and no network, file, clock, runtime,
                 Flower or database module

``edgefleet/__init__.py`` imports nothing: importing ``edgefleet.protocol`` runs it first.
A bare ``import agent`` (the pre-namespace spelling) is an error everywhere.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = (
    "protocol", "infra", "models", "agent", "coordinator", "federated", "simulations", "console",
)
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "infra": {"protocol"},
    "models": {"protocol", "infra"},
    "agent": {"protocol", "infra"},
    "coordinator": {"protocol", "infra", "models"},
    "federated": {"protocol", "infra", "models", "coordinator"},
    "simulations": {"protocol", "infra", "models", "agent", "coordinator", "federated"},
    "console": {"protocol", "infra", "models", "coordinator", "federated"},
    "cli": {"protocol", "infra", "models", "agent", "coordinator", "federated", "simulations",
            "console"},
}
PROTOCOL_FORBIDDEN = {
    # network, files, processes, wall clock
    "socket", "ssl", "http", "urllib", "requests", "httpx", "aiohttp", "paho", "amqtt",
    "os", "shutil", "pathlib", "tempfile", "glob", "io", "subprocess", "time",
    # runtimes, Flower, databases
    "onnxruntime", "ai_edge_litert", "tflite_runtime", "tensorflow", "flwr", "sqlalchemy",
}
THIRD_PARTY_FORBIDDEN = {
    "protocol": PROTOCOL_FORBIDDEN,
    "infra": {"sklearn", "sqlalchemy", "onnxruntime", "ai_edge_litert", "flwr"},
    "agent": {"sklearn", "sqlalchemy"},  # devices have neither
}


def imported_modules(tree: ast.AST, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``tree``, relative ones resolved."""
    package = module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from . import x` may import a sibling package
                yield node.lineno, f"{name}.{alias.name}" if name else alias.name
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def sources() -> list[Path]:
    folders = [*SUBPACKAGES, "edgefleet"]
    return sorted(p for pkg in folders for p in (REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    """The installed name: ``agent/daemon.py`` -> ``edgefleet.agent.daemon``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] != "edgefleet":
        parts.insert(0, "edgefleet")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer a dotted name belongs to, or None for a module outside EdgeFleet."""
    parts = module.split(".")
    if parts[0] != "edgefleet":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "cli"


def violations(path: Path, source: str | None = None) -> list[str]:
    module = module_name(path)
    if path.name == "__init__.py":
        module += ".__init__"  # so relative imports resolve against the package itself
    layer = layer_of(module)
    assert layer is not None
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    where = path.relative_to(REPO)
    found = []
    if module == "edgefleet.__init__" and any(
        isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(tree)
    ):
        found.append(f"{where}: edgefleet/__init__.py must import nothing")
    for line, name in imported_modules(tree, module):
        top = name.split(".")[0]
        target = layer_of(name)
        if top in SUBPACKAGES:
            found.append(f"{where}:{line}: {name} is not namespaced (edgefleet.{name})")
        elif target is not None and target != layer and target not in ALLOWED[layer]:
            found.append(f"{where}:{line}: {layer} imports {name} ({target} is above it)")
        elif top in THIRD_PARTY_FORBIDDEN.get(layer, set()):
            found.append(f"{where}:{line}: {layer} imports {name}")
    if layer == "protocol":
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("open", "print", "input")):
                found.append(f"{where}:{node.lineno}: protocol calls {node.func.id}()")
    return found


def test_sources_are_found() -> None:
    names = {module_name(p) for p in sources()}
    assert {
        "edgefleet.protocol.verify", "edgefleet.agent.updater", "edgefleet.coordinator.home",
        "edgefleet.models.digits", "edgefleet.infra.link.mqtt", "edgefleet.cli",
        "edgefleet.simulations",
    } <= names


@pytest.mark.parametrize("layer", [*SUBPACKAGES, "cli"])
def test_layer_imports(layer: str) -> None:
    files = [p for p in sources() if layer_of(module_name(p)) == layer]
    assert files
    problems = [v for p in files for v in violations(p)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(("path", "source"), [
    ("agent/x.py", "import edgefleet.coordinator.home"),
    ("agent/x.py", "def f():\n    from edgefleet.coordinator import home"),
    ("agent/sub/x.py", "from ...coordinator import home"),
    ("agent/x.py", "import importlib\nimportlib.import_module('edgefleet.coordinator.home')"),
    ("agent/x.py", "from edgefleet.models.digits import train_digits"),
    ("agent/x.py", "from edgefleet.cli import main"),
    ("agent/x.py", "import sklearn"),
    ("agent/x.py", "from protocol.errors import StoreError"),  # not namespaced
    ("coordinator/x.py", "from edgefleet.agent.store import ModelStore"),
    ("coordinator/x.py", "from .. import agent"),
    ("coordinator/x.py", "from edgefleet import demo"),
    ("coordinator/x.py", "from edgefleet.simulations import fleet"),
    ("infra/x.py", "from edgefleet.agent.store import ModelStore"),
    ("infra/link/x.py", "from ...coordinator import registry"),
    ("models/x.py", "from edgefleet.coordinator.home import Coordinator"),
    ("simulations/x.py", "from edgefleet.cli import main"),
    ("federated/x.py", "from edgefleet.agent.daemon import AgentDaemon"),
    ("federated/x.py", "from edgefleet.simulations import fleet"),
    ("agent/x.py", "from edgefleet.federated import grid"),
    ("coordinator/x.py", "def f():\n    from edgefleet.federated.grid import MqttGrid"),
    ("protocol/x.py", "import os"),
    ("protocol/x.py", "from os import urandom"),
    ("protocol/x.py", "import paho.mqtt.client"),
    ("protocol/x.py", "from pathlib import Path"),
    ("protocol/x.py", "from edgefleet.infra.fsutil import atomic_write"),
    ("protocol/x.py", "def f():\n    import onnxruntime"),
    ("protocol/x.py", "def f(p):\n    return open(p).read()"),
    ("edgefleet/__init__.py", "from edgefleet.cli import main"),
])
def test_the_checker_catches_violations(path: str, source: str) -> None:
    assert violations(REPO / path, source)


@pytest.mark.parametrize(("path", "source"), [
    ("agent/x.py", "from .store import Store\nfrom edgefleet.protocol.errors import StoreError"),
    ("agent/x.py", "from edgefleet.infra.fsutil import atomic_write"),
    ("coordinator/x.py", "from .home import Coordinator\nfrom edgefleet.models import digits"),
    ("infra/link/x.py", "from ...protocol import topics\nfrom .port import Link"),
    ("simulations/x.py", "from edgefleet.agent.agent import Agent\n"
                         "from edgefleet.coordinator.home import Coordinator"),
    ("edgefleet/x.py", "from edgefleet.simulations import fleet\nfrom . import progress"),
    ("federated/x.py", "from edgefleet.coordinator.home import Coordinator\nimport flwr"),
    ("simulations/x.py", "from edgefleet.federated.grid import MqttGrid"),
    ("protocol/x.py", "import secrets, hashlib, json\nfrom . import _fields\nfrom .keys import x"),
    ("protocol/x.py", "from cryptography.hazmat.primitives import hpke"),
])
def test_the_checker_allows(path: str, source: str) -> None:
    assert violations(REPO / path, source) == []
