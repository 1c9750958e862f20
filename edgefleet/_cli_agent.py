"""``edgefleet agent …`` handlers (agent extra only)."""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)
_JSON_NUMBER = 25  # bytes: the longest float32 value as JSON (-1.1754943508222875e-38) and a comma


def init(args: argparse.Namespace) -> int:
    from edgefleet.agent.provision import provision
    from edgefleet.protocol.keys import decode_public_key

    password_file = str(Path(args.password_file).resolve()) if args.password_file else ""
    ident = provision(
        args.home,
        args.device_id,
        decode_public_key(args.trust.read_bytes()),
        kem=args.kem,
        broker=args.broker,
        password_file=password_file,
    )
    pub = args.home / "keys" / "device.pub.json"
    print(f"device {ident.device_id}: keys made; public keys in {pub}")
    return 0


def _open(home: Path) -> Any:
    """A read-only agent: it takes no lock, so it works, and disturbs nothing, beside the
    running daemon."""
    from edgefleet.agent.agent import Agent

    return Agent.open(home, readonly=True)


def _open_writer(home: Path, doing: str, instead: str = "") -> Any:
    """The store's one writer, or None (after one line on stderr) while the daemon is it."""
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.store import StoreBusyError

    try:
        return Agent.open(home)
    except StoreBusyError as exc:
        print(
            f"edgefleet: cannot {doing}: {exc}; stop `edgefleet agent run` first{instead}",
            file=sys.stderr,
        )
        return None


def install(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise FileNotFoundError(f"{args.file}: no such bundle file")
    from edgefleet.agent.updater import AlreadyAcceptedError
    from edgefleet.progress import ProgressLine

    agent = _open_writer(args.home, "install", ", or release through the coordinator")
    if agent is None:
        return 1
    line = ProgressLine()
    with agent:
        try:
            version = agent.install_file(
                args.file, progress=lambda done, total: line("verify", done, total)
            )
        except AlreadyAcceptedError as exc:  # not an error: "already have it"
            if exc.version is None or agent.broken is not None:
                why = "; install a newer release" if exc.version is not None else ""
                print(f"edgefleet: not installed ({exc.code}): {exc}{why}", file=sys.stderr)
                return 1
            print(f"nothing to do ({exc.code}): {exc}")
            return 0
    m = version.manifest
    print(f"installed {m.name} {m.model_version} (sequence {m.sequence}, {m.format}): active")
    return 0


def status(args: argparse.Namespace) -> int:
    with _open(args.home) as agent:
        st = agent.status()
    if args.json:
        print(json.dumps(st.to_dict(), indent=2))
        return 0
    a = st.active
    print(f"device:   {st.device_id}")
    if st.broken is not None:
        print(f"active:   broken: {' '.join(st.broken.split())}")
    else:
        print(
            "active:   "
            + ("none" if a is None else f"{a.name} {a.version} ({a.format}, sequence {a.sequence})")
        )
    print(f"accepted: sequence <= {st.highest_sequence}, keyring v{st.keyring_version}")
    for k in st.kept:
        print(f"kept:     {k.name} {k.version} ({k.format}, sequence {k.sequence})")
    last = st.last_install
    if last:
        outcome = last.code if last.ok else f"rejected ({last.code}): {last.reason}"
        print(f"last:     {outcome}")
    return 0


def _read_input(args: argparse.Namespace) -> np.ndarray:
    """The batch to predict, float32 [rows, features]: finite numbers within float32's range
    only (NaN, ±Infinity, 1e39, booleans: ``ValueError``, one line)."""
    if args.input is not None:
        x, what = _from_json(args.input), "--input"
    else:
        x, what = _from_file(args.input_file), str(args.input_file)
    x = x[None, :] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a row or a list of rows, got shape {x.shape}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{what}: expected finite numbers, saw {_first(x, ~np.isfinite(x))}")
    if x.size and (np.abs(x) > _F32_MAX).any():
        bad = _first(x, np.abs(x) > _F32_MAX)
        raise ValueError(f"{what}: {bad} is outside the float32 range (±{_F32_MAX:.4g})")
    return np.ascontiguousarray(x, dtype=np.float32)


def _first(x: np.ndarray, mask: np.ndarray) -> str:
    return repr(float(x[mask].flat[0]))


def _from_json(text: str) -> np.ndarray:
    def no_constant(name: str) -> None:
        raise ValueError(f"--input: expected finite numbers, saw {name}")

    try:
        doc = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--input: not a JSON array ({exc})") from exc
    _only_numbers(doc)
    try:
        return np.asarray(doc, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            "--input: expected a row or a list of equal-length rows of numbers"
        ) from exc


def _only_numbers(doc: Any) -> None:
    """Lists of ints and floats only: JSON ``true`` would otherwise pass as 1."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"--input: expected numbers, saw {json.dumps(v)[:40]}")


def _from_file(path: Path) -> np.ndarray:
    """An array saved with ``numpy.save`` (``.npy``), or as ``x`` by ``numpy.savez``."""
    not_numpy = f"{path}: not a NumPy .npy or .npz file of numbers"
    unreadable = (ValueError, EOFError, OSError, zipfile.BadZipFile)  # numpy suggests allow_pickle
    try:
        loaded = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except unreadable as exc:
        raise ValueError(not_numpy) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        x = loaded
    else:
        with loaded:
            if "x" not in loaded.files:
                raise ValueError(f"{path}: expected an array named 'x', found {loaded.files}")
            try:
                x = loaded["x"]
            except unreadable as exc:
                raise ValueError(not_numpy) from exc
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iuf":  # bools, strings, objects
        kind = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{path}: expected an array of numbers, saw {kind}")
    return x


def _outputs(home: Path, x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Ask the running daemon over its loopback API (outputs and prediction ids, for
    ``agent feedback``); without one, load the model here (no ids)."""
    from edgefleet.protocol.errors import TransportError

    try:
        out = _via_http(home, x)
    except TransportError as exc:
        print(f"edgefleet: {exc}; running the model in-process", file=sys.stderr)
        out = None
    if out is not None:
        return out
    with _open(home) as agent:
        result: np.ndarray = agent.predict(x)
    return result, []


def _via_http(home: Path, x: np.ndarray) -> tuple[np.ndarray, list[str]] | None:
    """The daemon's outputs and prediction ids, asked in batches that fit its request limit;
    None: no daemon."""
    from edgefleet.agent.http import answer_via_http

    outs, ids = [], []
    for batch in _batches(x):
        answer = answer_via_http(home, batch)
        if answer is None:
            return None
        outs.append(answer[0])
        ids += answer[1]
    return np.concatenate(outs), ids


def _batches(x: np.ndarray) -> Iterator[np.ndarray]:
    """``x`` in row slices whose JSON body stays under the local API's ``MAX_BODY``."""
    from edgefleet.agent.http import MAX_BODY

    row = x.shape[1] * _JSON_NUMBER + 3  # the numbers, brackets and comma of one row
    rows = (MAX_BODY - 64) // row  # 64: {"inputs":[...]} and room to spare
    if rows < 1:
        raise ValueError(
            f"one row of {x.shape[1]} numbers can take {row} bytes, over the local API's "
            f"{MAX_BODY}-byte request limit"
        )
    if not len(x):
        yield x
    for i in range(0, len(x), rows):
        yield x[i : i + rows]


def predict(args: argparse.Namespace) -> int:
    x = _read_input(args)
    try:
        out, ids = _outputs(args.home, x)
    except RuntimeError as exc:  # no (working) model: nothing to predict with
        print(f"edgefleet: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if args.json:
        ided = {"ids": ids} if ids else {}  # the daemon's: `agent feedback --id` takes them
        print(json.dumps({"outputs": out.tolist(), "argmax": out.argmax(axis=-1).tolist(), **ided}))
    else:
        for i, row in enumerate(out):
            print(f"{int(row.argmax())}\t{float(row.max()):.4f}" + (f"\t{ids[i]}" if ids else ""))
    return 0


def rollback(args: argparse.Namespace) -> int:
    agent = _open_writer(args.home, "roll back")
    if agent is None:
        return 1
    with agent:
        version = agent.rollback()
    m = version.manifest
    print(
        f"rolled back: {m.name} {m.model_version} (sequence {m.sequence}) is active",
        file=sys.stdout,
    )
    return 0
