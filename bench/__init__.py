"""EdgeFleet benchmarks: ``make bench`` / ``python -m bench [--quick] [--out DIR] [NAME ...]``.

Every module here whose name does not start with ``_`` is a benchmark. It exposes ``NAME``
(what ``python -m bench NAME`` selects) and ``run(quick: bool) -> list[Row]``, and may expose
``notes() -> list[str]`` (analysis lines printed under its table, e.g. a profile). Adding a
benchmark = adding such a module; ``bench.__main__`` finds it.

Performance is reported as a ratio against a baseline measured in the same run (the raw
library call that our code wraps), never as an absolute time assertion: the machines are
noisy and shared. ``--quick`` shrinks sizes and iterations for the smoke test.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["discover"]


def discover() -> dict[str, ModuleType]:
    """The benchmark modules by ``NAME``, in module-name order."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        name, run = getattr(mod, "NAME", None), getattr(mod, "run", None)
        if not isinstance(name, str) or not callable(run):
            continue  # a helper module, not a benchmark
        if name in found:
            raise RuntimeError(f"two benchmark modules are named {name!r}")
        found[name] = mod
    return found
