"""agent.runtime on real ONNX Runtime and LiteRT sessions (no mocks)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from agent.runtime import (
    LiteRtRuntime,
    OrtRuntime,
    Runtime,
    RuntimeLoadError,
    TensorSpec,
    _as_batch,
    load_runtime,
)
from models.digits import load_digits_split, train_digits
from models.onnx_export import mlp_to_onnx
from models.tflite_export import mlp_to_tflite

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
    assert runtime.input_spec == TensorSpec("input", "float32", (None, 64))
    assert runtime.output_spec == TensorSpec("probabilities", "float32", (None, 10))


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
    spec = TensorSpec("input", "float32", (None, 64))
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
