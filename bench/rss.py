"""Agent resident memory with a model loaded, against the raw runtime alone.

Each figure comes from a fresh subprocess that imports what it needs, loads, runs one batch-1
prediction and reports ``VmRSS`` (and the peak ``VmHWM``) from ``/proc/self/status``:

* agent: ``from agent.agent import Agent``; ``Agent.open(home)`` (the digits model active,
  ONNX or TFLite); one ``predict``. It also reports which heavy packages ended up imported:
  scikit-learn must not be (the device has no business loading it).
* baseline: ``import onnxruntime`` and an ``InferenceSession`` on the same model file
  (1 thread), or ``ai_edge_litert``'s ``Interpreter``; one run.

Subprocesses are run interleaved (5 rounds; quick: 1) and the median taken. MB = 10^6 bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from ._util import REPO, Row, fleet, median

NAME = "rss"
_NOTES: list[str] = []
WATCH = ("sklearn", "scipy", "sqlalchemy", "onnxruntime", "ai_edge_litert", "coordinator",
         "models", "flwr", "paho")

_REPORT = """
import json, sys
from pathlib import Path
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
mb = lambda k: int(status[k].split()[0]) * 1024 / 1e6
mods = {m: m in sys.modules for m in WATCH}
print(json.dumps({"rss": mb("VmRSS"), "hwm": mb("VmHWM"), "modules": mods,
                  "out": [float(v) for v in out.ravel()]}))
"""

_AGENT = """
import sys
from pathlib import Path
import numpy as np
from edgefleet.agent.agent import Agent
agent = Agent.open(Path(sys.argv[1]))
out = agent.predict(np.asarray(X, dtype=np.float32))
"""

_ORT = """
import sys
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = ort.InferenceSession(sys.argv[1], sess_options=opts, providers=["CPUExecutionProvider"])
out = sess.run(None, {sess.get_inputs()[0].name: np.asarray(X, dtype=np.float32)})[0]
"""

_LITERT = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interp = Interpreter(model_path=sys.argv[1], num_threads=1)
interp.allocate_tensors()
interp.set_tensor(interp.get_input_details()[0]["index"], np.asarray(X, dtype=np.float32))
interp.invoke()
out = interp.get_tensor(interp.get_output_details()[0]["index"])
"""

_IMPORTS = """
import numpy as np
import edgefleet.agent.agent
out = np.asarray(X, dtype=np.float32)
"""

_NUMPY = """
import numpy as np
out = np.asarray(X, dtype=np.float32)
"""


def notes() -> list[str]:
    return list(_NOTES)


def _measure(body: str, arg: str, x: list[list[float]]) -> dict[str, Any]:
    script = f"WATCH = {WATCH!r}\nX = {x!r}\n{body}\n{_REPORT}"
    proc = subprocess.run([sys.executable, "-c", script, arg], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> list[Row]:
    from edgefleet.agent.store import ModelStore

    _NOTES.clear()
    rounds = 1 if quick else 5
    fl = fleet()
    x = fl.test_inputs()[:1].tolist()
    cases: dict[str, tuple[str, str]] = {"numpy": (_NUMPY, ""), "imports": (_IMPORTS, "")}
    for fmt in fl.FORMATS:
        home = fl.installed_agent(fmt, f"bench-rss-{fmt}")
        version = ModelStore(home / "store", readonly=True).active()
        assert version is not None
        model = version.model_path
        cases[f"agent:{fmt}"] = (_AGENT, str(home))
        cases[f"raw:{fmt}"] = (_ORT if fmt == "onnx" else _LITERT, str(model))

    results: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(_measure(*cases[name], x))

    def rss(name: str, key: str = "rss") -> float:
        return median(res[key] for res in results[name])

    for fmt in fl.FORMATS:  # the agent's outputs are the raw runtime's
        a, b = results[f"agent:{fmt}"][0]["out"], results[f"raw:{fmt}"][0]["out"]
        if max(abs(p - q) for p, q in zip(a, b, strict=True)) > 1e-5:
            raise AssertionError(f"{fmt}: agent and raw runtime disagree: {a} vs {b}")

    rows = []
    for fmt in fl.FORMATS:
        raw_name = ("raw ORT InferenceSession" if fmt == "onnx"
                    else "raw LiteRT Interpreter")
        rows.append(Row(key=f"rss_mb:{fmt}", metric=f"agent VmRSS, digits {fmt} active, "
                        "after 1 predict", value=rss(f"agent:{fmt}"), unit="MB",
                        baseline=raw_name, baseline_value=rss(f"raw:{fmt}")))
        rows.append(Row(key=f"hwm_mb:{fmt}", metric=f"agent VmHWM (peak), digits {fmt}",
                        value=rss(f"agent:{fmt}", "hwm"), unit="MB", baseline=raw_name,
                        baseline_value=rss(f"raw:{fmt}", "hwm")))
    for fmt in fl.FORMATS:
        mods = results[f"agent:{fmt}"][0]["modules"]
        rows.append(Row(key=f"sklearn_imported:{fmt}",
                        metric=f"sklearn in sys.modules (agent, {fmt})",
                        value=float(mods["sklearn"]), unit="flag", aim="== 0"))
        others = sorted(m for m, on in mods.items() if on)
        _NOTES.append(f"agent:{fmt} imported: {', '.join(others) or 'none'} "
                      f"(of {', '.join(WATCH)})")
    rows.append(Row(key="rss_mb:imports", metric="agent code imported, no model loaded "
                    "(import agent.agent)", value=rss("imports"), unit="MB",
                    baseline="python + numpy only", baseline_value=rss("numpy")))
    _NOTES.append(f"{rounds} round(s) of fresh subprocesses; medians")
    return rows
