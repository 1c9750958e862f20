"""``edgefleet agent …`` handlers (agent extra only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


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
    from edgefleet.progress import ProgressLine

    agent = _open_writer(args.home, "install", ", or release through the coordinator")
    if agent is None:
        return 1
    line = ProgressLine()
    with agent:
        version = agent.install_file(
            args.file, progress=lambda done, total: line("verify", done, total)
        )
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
    if args.input is not None:
        x = np.asarray(json.loads(args.input), dtype=np.float32)
    elif args.input_file.suffix == ".npz":
        x = np.load(args.input_file)["x"].astype(np.float32)
    else:
        x = np.load(args.input_file, allow_pickle=False).astype(np.float32)
    return x[None, :] if x.ndim == 1 else x


def _outputs(home: Path, x: np.ndarray) -> np.ndarray:
    """Ask the running daemon over its loopback API; without one, load the model here."""
    from edgefleet.agent.http import predict_via_http
    from edgefleet.protocol.errors import TransportError

    try:
        out = predict_via_http(home, x)
    except TransportError as exc:
        print(f"edgefleet: {exc}; running the model in-process", file=sys.stderr)
        out = None
    if out is not None:
        return out
    with _open(home) as agent:
        result: np.ndarray = agent.predict(x)
    return result


def predict(args: argparse.Namespace) -> int:
    x = _read_input(args)
    out = _outputs(args.home, x)
    if args.json:
        print(json.dumps({"outputs": out.tolist(), "argmax": out.argmax(axis=-1).tolist()}))
    else:
        for row in out:
            print(f"{int(row.argmax())}\t{float(row.max()):.4f}")
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
