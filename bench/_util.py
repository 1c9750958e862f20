"""Shared benchmark helpers: result rows, the machine line, statistics, and a test fleet.

``fleet()`` sets up, once per process, what the benchmarks install from: the digits models
(trained here, ~2 s), a coordinator home with both formats registered, and a helper that
makes agent homes (device identity, pinned root, ``agent.toml``) enrolled at the
coordinator — the same steps as ``edgefleet coordinator init`` / ``agent init`` /
``coordinator enroll`` / ``bundle build`` / ``agent install``.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "Fleet",
    "Row",
    "alternate",
    "fleet",
    "interleaved",
    "machine",
    "machine_line",
    "markdown_table",
    "median",
    "percentile",
    "time_calls",
    "vmrss_mb",
]

REPO = Path(__file__).resolve().parent.parent


# -- rows ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Row:
    """One measured figure, with the baseline it is compared to (measured in the same run).

    ``ratio`` is always ours / baseline. ``aim`` is a comparison on the ratio (or on the value
    when there is no baseline): ``">= 0.7"``, ``"<= 1.10"``, ``"== 0"``; ``None`` = for
    information only. ``key`` is a stable identifier (the smoke test and comparisons across
    runs use it); ``metric`` is the human label.
    """

    key: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    aim: str | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.aim is None:
            return None
        op, _, bound = self.aim.partition(" ")
        x = self.ratio if self.ratio is not None else self.value
        b = float(bound)
        return {">=": x >= b, "<=": x <= b, "==": x == b, ">": x > b, "<": x < b}[op]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"], d["met"] = self.ratio, self.met
        return d


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit == "flag":
        return "yes" if v else "no"
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def markdown_table(rows: Iterable[Row]) -> str:
    head = ["metric", "value", "unit", "baseline", "baseline value", "ratio", "aim", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.3f}"
        met = {None: "", True: "yes", False: "**no**"}[r.met]
        metric = r.metric + (f" ({r.note})" if r.note else "")
        cells = [metric, _num(r.value, r.unit), r.unit, r.baseline or "—",
                 _num(r.baseline_value, r.unit), ratio, r.aim or "—", met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- machine ------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime"),
        "ai-edge-litert": _version("ai-edge-litert"),
        "cryptography": _version("cryptography"),
    }


def machine_line(m: dict[str, Any] | None = None) -> str:
    m = m or machine()
    return (f"{m['cpu']} ({m['arch']}), {m['cores']} cores; Python {m['python']}, "
            f"numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, "
            f"ai-edge-litert {m['ai-edge-litert']}, cryptography {m['cryptography']}")


# -- statistics ---------------------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def percentile(xs: list[float] | Any, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, *,
                after: dict[str, Callable[[Any], None]] | None = None) -> dict[str, list[float]]:
    """Time each callable ``reps`` times (seconds), rotating the order every repetition so
    that drift and warm caches spread evenly over all of them. ``after[name]`` gets the
    callable's result, untimed (clean-up)."""
    after = after or {}
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(reps):
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order.reverse()
        for n in order:
            f = fns[n]
            t0 = clock()
            result = f()
            times[n].append(clock() - t0)
            if n in after:
                after[n](result)
    return times


def time_calls(fn: Callable[[Any], object], x: Any, out: list[int], n: int) -> None:
    """Call ``fn(x)`` ``n`` times, appending each call's duration (ns) to ``out``; nothing
    but the call is inside the timed span."""
    clock = time.perf_counter_ns
    append = out.append
    for _ in range(n):
        t0 = clock()
        fn(x)
        append(clock() - t0)


def alternate(a: Callable[[Any], object], b: Callable[[Any], object], x: Any, calls: int,
              block: int) -> tuple[list[int], list[int]]:  # fmt: skip
    """Ours against a baseline on the same input: ``a(x)`` and ``b(x)`` timed in alternating
    blocks of ``block`` calls (``b`` first in even blocks, ``a`` in odd ones, so drift and
    warm caches fall on both), after one untimed block of each, with the garbage collector
    off; ``calls // block`` blocks each. Returns (``a``'s ns, ``b``'s ns)."""
    ours: list[int] = []
    base: list[int] = []
    time_calls(a, x, [], block)
    time_calls(b, x, [], block)
    gc.collect()
    gc.disable()
    try:
        for i in range(calls // block):
            for fn, out in ((a, ours), (b, base))[:: 1 if i % 2 else -1]:
                time_calls(fn, x, out, block)
    finally:
        gc.enable()
    return ours, base


def vmrss_mb(field: str = "VmRSS") -> float:
    """This process's ``VmRSS`` (or ``VmHWM``) in MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{field} not in /proc/self/status")


# -- the test fleet -----------------------------------------------------------------------
class Fleet:
    """A coordinator home with the digits models registered, in a temporary directory."""

    FORMATS = ("onnx", "tflite")

    def __init__(self, root: Path) -> None:
        from edgefleet.coordinator.home import Coordinator
        from edgefleet.models.digits import write_digits_artifacts

        self.root = root
        self.artifacts = write_digits_artifacts(root / "models")
        self.coord = Coordinator.init(root / "coordinator")
        self.model_paths = {"onnx": self.artifacts.onnx_path,
                            "tflite": self.artifacts.tflite_path}
        self.models: dict[str, tuple[str, str]] = {}  # format -> (name, version)
        for fmt, path in self.model_paths.items():
            mv = self.coord.register_model(f"digits-{fmt}", path,
                                           meta_path=self.artifacts.metadata_path)
            self.models[fmt] = (mv.name, mv.version)
        self._count = 0

    def test_inputs(self) -> Any:
        import numpy as np

        with np.load(self.artifacts.test_path) as z:
            return np.ascontiguousarray(z["x"], dtype=np.float32)

    def new_agent(self, device_id: str) -> Path:
        """An initialised agent home for ``device_id``, enrolled at the coordinator."""
        from edgefleet.simulations.homes import enroll_device

        home = self.root / "agents" / device_id
        enroll_device(self.coord, home, device_id)
        return home

    def register(self, name: str, path: Path, *, check: bool = True) -> tuple[str, str]:
        """Register another model file (the digits metadata: specs, smoke vectors);
        ``check=False`` for a payload no runtime loads."""
        mv = self.coord.register_model(
            name, path, meta_path=self.artifacts.metadata_path, check=check
        )
        return mv.name, mv.version

    def bundle(self, model: tuple[str, str], device_id: str) -> tuple[Path, Any]:
        """Build a release of ``model`` for one device; write it as an ``.efb``."""
        _, built = self.coord.build(*model, device_id)
        self._count += 1
        out = self.root / "bundles" / f"{self._count:04d}-{model[0]}-{device_id}.efb"
        out.parent.mkdir(exist_ok=True)
        self.coord.write_bundle(built, out)
        return out, built

    def installed_agent(self, fmt: str, device_id: str | None = None) -> Path:
        """A fresh agent home with the digits ``fmt`` model installed and active."""
        from edgefleet.agent.agent import Agent

        device_id = device_id or f"bench-{fmt}-{self._count}"
        home = self.new_agent(device_id)
        path, _ = self.bundle(self.models[fmt], device_id)
        agent = Agent.open(home)
        try:
            agent.install_file(path)
        finally:
            agent.close()
        return home


_FLEET: Fleet | None = None


def fleet() -> Fleet:
    """The process-wide fleet (made on first use, removed at exit)."""
    global _FLEET
    if _FLEET is None:
        root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _FLEET = Fleet(root)
    return _FLEET
