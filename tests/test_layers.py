"""Package layering, checked on the source (AST), including imports inside functions.

    protocol   pure: imports no other EdgeFleet package and no network, file, clock,
               runtime, Flower or database module
    agent      never imports coordinator (nor models/scikit-learn/SQLAlchemy: devices lack them)
    coordinator never imports agent
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "coordinator", "protocol", "models", "simulations")
PROJECT = {"agent", "coordinator", "protocol", "models", "simulations", "edgefleet"}

PROTOCOL_FORBIDDEN = {
    # other EdgeFleet packages
    "agent", "coordinator", "edgefleet", "models", "simulations",
    # network, files, processes, wall clock
    "socket", "ssl", "http", "urllib", "requests", "httpx", "aiohttp", "paho", "amqtt",
    "os", "shutil", "pathlib", "tempfile", "glob", "io", "subprocess", "time",
    # runtimes, Flower, databases
    "onnxruntime", "ai_edge_litert", "tflite_runtime", "tensorflow", "flwr", "sqlalchemy",
}
FORBIDDEN = {
    "protocol": PROTOCOL_FORBIDDEN,
    "agent": {"coordinator", "models", "sklearn", "sqlalchemy"},
    "coordinator": {"agent"},
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
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(path: Path, source: str | None = None) -> list[str]:
    module = module_name(path)
    if path.name == "__init__.py":
        module += ".__init__"  # so relative imports resolve against the package itself
    layer = module.split(".")[0]
    forbidden = FORBIDDEN.get(layer, set())
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    found = []
    for line, name in imported_modules(tree, module):
        top = name.split(".")[0]
        if top in forbidden and top != layer:
            found.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {name}")
    if layer == "protocol":
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("open", "print", "input")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: protocol calls "
                             f"{node.func.id}()")
    return found


def test_sources_are_found() -> None:
    names = {module_name(p) for p in sources()}
    assert {"protocol.verify", "agent.updater", "coordinator.home", "models.digits"} <= names


@pytest.mark.parametrize("layer", ["protocol", "agent", "coordinator"])
def test_layer_imports(layer: str) -> None:
    files = [p for p in sources() if p.relative_to(REPO).parts[0] == layer]
    assert files
    problems = [v for p in files for v in violations(p)]
    assert problems == [], "\n".join(problems)


def test_models_and_simulations_parse() -> None:
    for path in sources():
        ast.parse(path.read_text(), str(path))


@pytest.mark.parametrize(("path", "source"), [
    ("agent/x.py", "import coordinator.home"),
    ("agent/x.py", "def f():\n    from coordinator import home"),
    ("agent/sub/x.py", "from ...coordinator import home"),
    ("agent/x.py", "import importlib\nimportlib.import_module('coordinator.home')"),
    ("coordinator/x.py", "from agent.store import ModelStore"),
    ("coordinator/x.py", "from .. import agent"),
    ("protocol/x.py", "import os"),
    ("protocol/x.py", "from os import urandom"),
    ("protocol/x.py", "import paho.mqtt.client"),
    ("protocol/x.py", "from pathlib import Path"),
    ("protocol/x.py", "from edgefleet.fsutil import atomic_write"),
    ("protocol/x.py", "def f():\n    import onnxruntime"),
    ("protocol/x.py", "def f(p):\n    return open(p).read()"),
])
def test_the_checker_catches_violations(path: str, source: str) -> None:
    assert violations(REPO / path, source)


@pytest.mark.parametrize(("path", "source"), [
    ("agent/x.py", "from .store import ModelStore\nfrom protocol.errors import StoreError"),
    ("agent/x.py", "from edgefleet.fsutil import atomic_write"),
    ("coordinator/x.py", "from .home import Coordinator\nfrom models.digits import train_digits"),
    ("protocol/x.py", "import secrets, hashlib, json\nfrom . import _fields\nfrom .keys import x"),
    ("protocol/x.py", "from cryptography.hazmat.primitives import hpke"),
])
def test_the_checker_allows(path: str, source: str) -> None:
    assert violations(REPO / path, source) == []
