"""The ``edgefleet`` command line.

Sub-command groups import their packages lazily, so ``edgefleet agent …`` works on a device
with only the ``agent`` extra installed. ``--home`` defaults come from
``EDGEFLEET_AGENT_HOME`` / ``EDGEFLEET_COORDINATOR_HOME``; this module (with ``main``) is the
only place that reads the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _home(env: str) -> dict[str, object]:
    default = os.environ.get(env)
    return {"type": Path, "default": Path(default) if default else None,
            "required": default is None, "help": f"home directory (default: ${env})"}


def _lazy(module: str, func: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)
    return run


def _agent(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agent", help="the on-device agent").add_subparsers(dest="cmd", required=True)
    mod = "edgefleet._cli_agent"
    home = _home("EDGEFLEET_AGENT_HOME")
    c = p.add_parser("init", help="make device keys and pin the coordinator's root key")
    c.add_argument("--home", **home)
    c.add_argument("--device-id", required=True)
    c.add_argument("--trust", type=Path, required=True, help="root public key file (root.pub)")
    c.add_argument("--kem", default="x25519", choices=["x25519", "mlkem768-x25519"])
    c.add_argument("--broker", default="", help="mqtt://host:port of the broker")
    c.set_defaults(run=_lazy(mod, "init"))
    c = p.add_parser("install", help="verify, install and activate a bundle file")
    c.add_argument("--home", **home)
    c.add_argument("file", type=Path)
    c.set_defaults(run=_lazy(mod, "install"))
    c = p.add_parser("status", help="active model, version, sequence, kept versions")
    c.add_argument("--home", **home)
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "status"))
    c = p.add_parser("predict", help="run the active model")
    c.add_argument("--home", **home)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--input", help="JSON array: one row or a batch of rows")
    g.add_argument("--input-file", type=Path, help=".npy (or .npz with array x) file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "predict"))
    c = p.add_parser("rollback", help="return to the previous kept version")
    c.add_argument("--home", **home)
    c.set_defaults(run=_lazy(mod, "rollback"))


def _coordinator(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("coordinator", help="the ML team's coordinator").add_subparsers(dest="cmd", required=True)
    mod = "edgefleet._cli_coordinator"
    home = _home("EDGEFLEET_COORDINATOR_HOME")
    c = p.add_parser("init", help="make root and release keys, keyring, config, registry")
    c.add_argument("--home", **home)
    c.add_argument("--database", default="", help="SQLAlchemy URL (default: SQLite in home)")
    c.set_defaults(run=_lazy(mod, "init"))
    c = p.add_parser("enroll", help="register a device and its public keys")
    c.add_argument("--home", **home)
    c.add_argument("--device-id", required=True)
    c.add_argument("--public-key", type=Path, required=True, help="the device's device.pub.json")
    c.add_argument("--group", action="append", default=[], help="also add to this group")
    c.set_defaults(run=_lazy(mod, "enroll"))


def _model(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("model", help="train and register models").add_subparsers(dest="cmd", required=True)
    mod = "edgefleet._cli_coordinator"
    c = p.add_parser("train", help="train a reference model and export ONNX + TFLite")
    c.add_argument("which", choices=["digits"])
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--hidden", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=_lazy(mod, "train"))
    c = p.add_parser("register", help="record a model version in the registry")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--name", required=True)
    c.add_argument("--file", type=Path, required=True)
    c.add_argument("--version", default=None, help="default: next integer")
    c.add_argument("--meta", type=Path, default=None, help="metadata JSON (default: <file>.json)")
    c.set_defaults(run=_lazy(mod, "register"))
    c = p.add_parser("list", help="registered model versions")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "list_models"))


def _bundle(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bundle", help="build and inspect bundle files").add_subparsers(dest="cmd", required=True)
    c = p.add_parser("build", help="build a signed, encrypted bundle for devices")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--name", required=True)
    c.add_argument("--version", required=True)
    c.add_argument("--to", required=True, help="DEVICE_ID[,…] | group:G | all")
    c.add_argument("-o", "--out", type=Path, required=True)
    c.set_defaults(run=_lazy("edgefleet._cli_coordinator", "build"))
    c = p.add_parser("inspect", help="print a bundle's manifest (no secrets)")
    c.add_argument("file", type=Path)
    c.add_argument("--trust", type=Path, help="root.pub: also verify the signatures")
    c.set_defaults(run=_lazy("edgefleet._cli_bundle", "inspect"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="group", required=True)
    for add in (_agent, _coordinator, _model, _bundle):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from protocol.errors import EdgeFleetError

    try:
        return args.run(args)
    except EdgeFleetError as exc:
        print(f"edgefleet: rejected ({exc.code}): {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, LookupError, ValueError) as exc:
        print(f"edgefleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
