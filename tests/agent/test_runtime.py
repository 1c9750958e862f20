"""agent.runtime on real ONNX Runtime and LiteRT sessions (no mocks)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import edgefleet.agent.runtime as runtime_mod
import numpy as np
import onnx
import pytest
from edgefleet.agent.runtime import (
    LiteRtRuntime,
    OrtRuntime,
    Runtime,
    RuntimeLoadError,
    TensorSpec,
    _as_batch,
    _litert_private_ok,
    _resolve_ort_run,
    load_runtime,
)
from edgefleet.models.digits import load_digits_split, train_digits
from edgefleet.models.onnx_export import mlp_to_onnx
from edgefleet.models.tflite_export import mlp_to_tflite
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Fixture:
    onnx_path: Path
    tflite_path: Path
    x: np.ndarray  # the digits test split, float32 [450, 64]
    expected: np.ndarray  # sklearn predict_proba on x

    def path(self, fmt: str) -> Path:
        return self.onnx_path if fmt == "onnx" else self.tflite_path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    split = load_digits_split(seed=0)
    clf = train_digits(split, seed=0)
    out = tmp_path_factory.mktemp("runtime_models")
    (out / "digits.onnx").write_bytes(mlp_to_onnx(clf))
    (out / "digits.tflite").write_bytes(mlp_to_tflite(clf))
    return Fixture(
        out / "digits.onnx", out / "digits.tflite", split.X_test, clf.predict_proba(split.X_test)
    )


@pytest.fixture(scope="module", params=["onnx", "tflite"])
def runtime(request: pytest.FixtureRequest, models: Fixture) -> Iterator[Runtime]:
    rt = load_runtime(models.path(request.param))
    yield rt
    rt.close()


def assert_parity(probs: np.ndarray, expected: np.ndarray) -> None:
    assert probs.dtype == np.float32 and probs.shape == expected.shape
    assert np.abs(probs - expected).max() <= ATOL
    np.testing.assert_array_equal(probs.argmax(axis=1), expected.argmax(axis=1))


# --- loading and specs ----------------------------------------------------------------------


def test_specs_and_protocol(runtime: Runtime) -> None:
    assert isinstance(runtime, Runtime)
    assert runtime.format in ("onnx", "tflite")
    assert runtime.input_spec == TensorSpec(name="input", dtype="float32", shape=(None, 64))
    assert runtime.output_spec == TensorSpec(
        name="probabilities", dtype="float32", shape=(None, 10)
    )


def test_format_by_suffix_and_override(models: Fixture, tmp_path: Path) -> None:
    assert isinstance(load_runtime(models.onnx_path), OrtRuntime)
    assert isinstance(load_runtime(models.tflite_path), LiteRtRuntime)
    blob = tmp_path / "model.bin"
    blob.write_bytes(models.tflite_path.read_bytes())
    assert load_runtime(blob, fmt="tflite").format == "tflite"
    with pytest.raises(ValueError, match="suffix"):
        load_runtime(blob)
    with pytest.raises(ValueError, match="unknown model format 'pt'"):
        load_runtime(models.onnx_path, fmt="pt")


# --- parity ---------------------------------------------------------------------------------


def test_full_batch_parity(runtime: Runtime, models: Fixture) -> None:
    assert_parity(runtime.run(models.x), models.expected)


def test_batch_of_one_for_every_row(runtime: Runtime, models: Fixture) -> None:
    probs = np.concatenate([runtime.run(models.x[i : i + 1]) for i in range(len(models.x))])
    assert_parity(probs, models.expected)


def test_batch_size_changes_back_and_forth(runtime: Runtime, models: Fixture) -> None:
    for n in (1, 450, 7, 7, 1, 33):
        assert_parity(runtime.run(models.x[:n]), models.expected[:n])


def test_empty_batch(runtime: Runtime) -> None:
    out = runtime.run(np.empty((0, 64), np.float32))
    assert out.shape == (0, 10) and out.dtype == np.float32


@pytest.fixture(scope="module")
def both(models: Fixture) -> tuple[Runtime, Runtime]:
    return load_runtime(models.onnx_path), load_runtime(models.tflite_path)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_formats_agree_on_random_inputs(
    both: tuple[Runtime, Runtime], batch: int, seed: int
) -> None:
    x = np.random.default_rng(seed).random((batch, 64), dtype=np.float32)
    ort_rt, lite_rt = both
    assert np.abs(ort_rt.run(x) - lite_rt.run(x)).max() <= ATOL


# --- input validation -----------------------------------------------------------------------


def test_input_is_cast_only_when_needed(models: Fixture) -> None:
    spec = TensorSpec(name="input", dtype="float32", shape=(None, 64))
    x = np.ascontiguousarray(models.x[:5])
    assert _as_batch(x, spec) is x
    fortran = np.asfortranarray(models.x[:5])
    assert _as_batch(fortran, spec).flags.c_contiguous
    as64 = _as_batch(models.x[:5].astype(np.float64), spec)
    assert as64.dtype == np.float32
    np.testing.assert_array_equal(as64, models.x[:5])


def test_casted_inputs_give_same_result(runtime: Runtime, models: Fixture) -> None:
    x, expected = models.x, models.expected
    cases = [
        (x[:20].astype(np.float64), expected[:20]),
        (np.asfortranarray(x[:20]), expected[:20]),
        (x[:40:2], expected[:40:2]),  # a strided view
        (x[:20].tolist(), expected[:20]),
    ]
    for variant, want in cases:
        assert_parity(runtime.run(variant), want)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (np.zeros((3, 63), np.float32), ValueError, r"\(batch, 64\).*\(3, 63\)"),
        (np.zeros((3, 65), np.float32), ValueError, r"\(batch, 64\).*\(3, 65\)"),
        (np.zeros(64, np.float32), ValueError, r"\(batch, 64\).*\(64,\)"),
        (np.zeros((1, 8, 8), np.float32), ValueError, r"\(batch, 64\).*\(1, 8, 8\)"),
        (np.full((2, 64), "a"), TypeError, "real-valued"),
    ],
    ids=["narrow", "wide", "1d", "3d", "strings"],
)
def test_bad_input_rejected(runtime: Runtime, x: np.ndarray, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        runtime.run(x)


# --- threads, close, concurrency ------------------------------------------------------------


def test_ort_threads_respected(models: Fixture) -> None:
    rt = OrtRuntime(models.onnx_path, threads=2)
    opts = rt.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert rt.threads == 2


def test_litert_threads_respected(models: Fixture) -> None:
    rt = LiteRtRuntime(models.tflite_path, threads=2)
    assert rt.threads == 2
    assert_parity(rt.run(models.x), models.expected)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_threads_must_be_positive(models: Fixture, fmt: str) -> None:
    with pytest.raises(ValueError, match="threads"):
        load_runtime(models.path(fmt), threads=0)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_run_after_close(models: Fixture, fmt: str) -> None:
    rt = load_runtime(models.path(fmt))
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        rt.run(models.x[:1])


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_concurrent_runs_with_mixed_batch_sizes(models: Fixture, fmt: str) -> None:
    rt = load_runtime(models.path(fmt), threads=1)
    sizes = [1, 5, 450, 2, 17, 1, 64, 3] * 4

    def job(n: int) -> float:
        return float(np.abs(rt.run(models.x[:n]) - models.expected[:n]).max())

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert max(pool.map(job, sizes)) <= ATOL


# --- fast path and private runtime calls ---------------------------------------------------


def _make(models: Fixture, fmt: str, *, private_api: bool = True) -> Runtime:
    cls = OrtRuntime if fmt == "onnx" else LiteRtRuntime
    return cls(models.path(fmt), private_api=private_api)


@pytest.fixture
def spy_as_batch(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the inputs that reached the validating path (``_as_batch``)."""
    seen: list[tuple[int, ...]] = []
    real = runtime_mod._as_batch

    def spy(x: object, spec: TensorSpec) -> np.ndarray:
        seen.append(np.shape(x))
        return real(x, spec)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime_mod, "_as_batch", spy)
    return seen


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_private_api_resolved_on_installed_runtimes(models: Fixture, fmt: str) -> None:
    # Pins the speed-up: if a runtime upgrade changes its private API, load falls back to
    # the public calls (correct, slower) and this test says so.
    assert _make(models, fmt).private_api is True
    assert _make(models, fmt, private_api=False).private_api is False


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_private_and_public_calls_give_identical_outputs(models: Fixture, fmt: str) -> None:
    fast, public = _make(models, fmt), _make(models, fmt, private_api=False)
    for n in (1, 450, 7, 1):
        np.testing.assert_array_equal(fast.run(models.x[:n]), public.run(models.x[:n]))
    for i in range(0, len(models.x), 10):
        row = models.x[i : i + 1]
        np.testing.assert_array_equal(fast.run(row), public.run(row))
    assert_parity(public.run(models.x), models.expected)


@pytest.mark.parametrize("private_api", [True, False], ids=["private", "public"])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_fast_path_skips_validation_and_matches_checked_path(
    models: Fixture, fmt: str, private_api: bool, spy_as_batch: list[tuple[int, ...]]
) -> None:
    rt = _make(models, fmt, private_api=private_api)
    for n in (1, 7):
        x = np.ascontiguousarray(models.x[:n])
        rt.run(x)  # LiteRT: the first call at a new batch size resizes, on the checked path
        spy_as_batch.clear()
        fast = rt.run(x)
        assert spy_as_batch == []
        checked = rt._run_checked(x)  # type: ignore[attr-defined]
        assert spy_as_batch == [(n, 64)]
        assert fast.dtype == np.float32 and fast.shape == (n, 10)
        np.testing.assert_array_equal(fast, checked)
        assert_parity(fast, models.expected[:n])


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_other_inputs_take_the_checked_path(
    models: Fixture, fmt: str, spy_as_batch: list[tuple[int, ...]]
) -> None:
    rt = _make(models, fmt)
    x, want = models.x[:8], models.expected[:8]
    rt.run(np.ascontiguousarray(x))  # settle LiteRT's batch size at 8
    cases = {
        "float64": x.astype(np.float64),
        "fortran": np.asfortranarray(x),
        "strided": models.x[:16:2],
        "columns": np.ascontiguousarray(np.hstack([x, x]))[:, :64],
        "big_endian": x.astype(">f4"),
        "subclass": x.view(np.matrix),
        "list": x.tolist(),
    }
    for name, variant in cases.items():
        spy_as_batch.clear()
        got = rt.run(variant)  # type: ignore[arg-type]
        assert spy_as_batch == [(8, 64)], name
        assert type(got) is np.ndarray, name
        if name != "strided":
            assert_parity(got, want)
        else:
            assert_parity(got, models.expected[:16:2])


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_float32_contiguous_bad_shapes_still_validated(
    models: Fixture, fmt: str, spy_as_batch: list[tuple[int, ...]]
) -> None:
    rt = _make(models, fmt)
    rt.run(models.x[:1])
    for bad in ((1, 63), (1, 65), (64,), (1, 1, 64), (2, 8, 8)):
        with pytest.raises(ValueError, match=r"expected input of shape \(batch, 64\)"):
            rt.run(np.zeros(bad, np.float32))
    assert spy_as_batch == [(1, 63), (1, 65), (64,), (1, 1, 64), (2, 8, 8)]
    out = rt.run(np.zeros((0, 64), np.float32))
    assert out.shape == (0, 10) and out.dtype == np.float32


class _SessionProxy:
    """The public face of an InferenceSession, without the private ``_sess``."""

    def __init__(self, session: object) -> None:
        self._real = session

    def run(self, names: list[str], feed: dict[str, np.ndarray], opts: object = None) -> list:
        return self._real.run(names, feed, opts)  # type: ignore[attr-defined]


def test_ort_resolution_falls_back_to_public_run(models: Fixture) -> None:
    rt = OrtRuntime(models.onnx_path)
    session, inp, out = rt.session, rt.input_spec, rt.output_spec
    run, private = _resolve_ort_run(session, inp, out, True)
    assert private is True and run == session._sess.run
    assert _resolve_ort_run(session, inp, out, False) == (session.run, False)

    proxy = _SessionProxy(session)  # no ``_sess`` at all
    assert _resolve_ort_run(proxy, inp, out, True) == (proxy.run, False)

    class TwoArgs:  # ``_sess.run`` with another signature
        def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list:
            return session.run(names, feed)

    proxy._sess = TwoArgs()  # type: ignore[attr-defined]
    assert _resolve_ort_run(proxy, inp, out, True) == (proxy.run, False)

    class Different:  # same signature, other result
        def run(self, names: list[str], feed: dict[str, np.ndarray], opts: object) -> list:
            return [session.run(names, feed)[0] + 1]

    proxy._sess = Different()  # type: ignore[attr-defined]
    assert _resolve_ort_run(proxy, inp, out, True) == (proxy.run, False)


def test_ort_public_fallback_serves_correctly(models: Fixture) -> None:
    rt = OrtRuntime(models.onnx_path, private_api=False)
    assert rt._run == rt.session.run
    assert_parity(rt.run(models.x), models.expected)
    assert_parity(rt.run(np.asfortranarray(models.x[:5])), models.expected[:5])
    rt.close()
    with pytest.raises(RuntimeError, match="closed"):
        rt.run(models.x[:1])


def test_litert_resolution_falls_back_to_public_calls(models: Fixture) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(models.tflite_path))
    interp.allocate_tensors()
    i_in = interp.get_input_details()[0]["index"]
    i_out = interp.get_output_details()[0]["index"]
    assert _litert_private_ok(interp, i_in, i_out, (1, 64)) is True
    interp.allocate_tensors()  # the trial left no reference behind to trip the safety check

    class NoPrivate:  # the public calls only
        def __init__(self) -> None:
            self.set_tensor, self.invoke = interp.set_tensor, interp.invoke
            self.get_tensor = interp.get_tensor

    assert _litert_private_ok(NoPrivate(), i_in, i_out, (1, 64)) is False


@pytest.mark.parametrize("private_api", [True, False], ids=["private", "public"])
def test_litert_resizes_with_either_call_set(models: Fixture, private_api: bool) -> None:
    rt = LiteRtRuntime(models.tflite_path, private_api=private_api)
    assert rt.private_api is private_api
    for n in (1, 450, 7, 7, 1, 33, 1):
        assert_parity(rt.run(models.x[:n]), models.expected[:n])
    rt.close()
    with pytest.raises(RuntimeError, match="closed"):
        rt.run(models.x[:1])


@pytest.mark.parametrize("private_api", [True, False], ids=["private", "public"])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_eight_threads_hammering_run(models: Fixture, fmt: str, private_api: bool) -> None:
    rt = _make(models, fmt, private_api=private_api)
    # Exact single-threaded answers for every row at batch 1 (the fast path), to compare
    # bit for bit: a row answered with another thread's input or output would differ.
    ref = [rt.run(models.x[i : i + 1]) for i in range(len(models.x))]
    start = threading.Barrier(8)
    errors: list[str] = []

    def hammer(t: int) -> None:
        rng = np.random.default_rng(t)
        start.wait()
        for k in range(300):
            if t % 4 == 3 and k % 10 == 0:  # some threads change the batch size now and then
                n = int(rng.integers(2, 40))
                lo = int(rng.integers(0, len(models.x) - n))
                got = rt.run(models.x[lo : lo + n])
                if np.abs(got - models.expected[lo : lo + n]).max() > ATOL:
                    errors.append(f"thread {t} call {k}: batch {lo}:{lo + n} wrong")
                continue
            i = int(rng.integers(0, len(models.x)))
            got = rt.run(models.x[i : i + 1])
            if not np.array_equal(got, ref[i]):
                errors.append(f"thread {t} call {k}: row {i} wrong")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(hammer, range(8)))
    assert errors == []


# --- bad model files ------------------------------------------------------------------------


def _corrupt_cases(models: Fixture, fmt: str) -> dict[str, bytes | None]:
    good = models.path(fmt).read_bytes()
    other = models.path("tflite" if fmt == "onnx" else "onnx").read_bytes()
    return {
        "missing": None,
        "empty": b"",
        "garbage": b"\x00\xffnot a model" * 20,
        "truncated": good[: len(good) // 3],
        "other_format": other,
    }


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "other_format"])
def test_bad_model_file_raises_load_error(
    models: Fixture, tmp_path: Path, fmt: str, case: str
) -> None:
    data = _corrupt_cases(models, fmt)[case]
    path = tmp_path / f"model.{fmt}"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(RuntimeLoadError, match=str(path)) as info:
        load_runtime(path)
    assert info.value.__cause__ is not None


def test_model_that_is_not_a_classifier_rejected(tmp_path: Path) -> None:
    inp = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, ["N", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "g", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    path = tmp_path / "ids.onnx"
    onnx.save(model, path)
    with pytest.raises(RuntimeLoadError, match="float32"):
        load_runtime(path)


def test_module_stays_light(models: Fixture) -> None:
    code = (
        "import sys\n"
        "from agent.runtime import load_runtime\n"
        f"load_runtime({str(models.onnx_path)!r}).close()\n"
        f"load_runtime({str(models.tflite_path)!r}).close()\n"
        "heavy = sorted(m for m in ('sklearn', 'onnx', 'models') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_the_stderr_filter_drops_only_its_line_and_keeps_real_errors(
        capfd: pytest.CaptureFixture[str]) -> None:
    """LiteRT's XNNPACK notice is dropped (once); whatever else reached fd 2 meanwhile stays."""
    import os

    from edgefleet.agent.runtime import StderrLineFilter

    notice = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    f = StderrLineFilter(notice)
    capfd.readouterr()
    with f.dropped():
        os.write(2, b"ERROR: a real one\n" + notice + b"another\n")
    assert capfd.readouterr().err == "ERROR: a real one\nanother\n" and f.seen
    with f.dropped():  # seen once: the library prints it once, so nothing is filtered any more
        os.write(2, notice)
    assert capfd.readouterr().err == notice.decode()
    g = StderrLineFilter(notice)
    with pytest.raises(RuntimeError), g.dropped():
        os.write(2, b"before the failure\n")
        raise RuntimeError("load failed")
    assert capfd.readouterr().err == "before the failure\n" and not g.seen
