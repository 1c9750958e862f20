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
    return {
        "type": Path,
        "default": Path(default) if default else None,
        "required": default is None,
        "help": f"home directory (default: ${env})",
    }


# The extra that brings each command group's optional dependencies.
_EXTRAS = {"agent": "agent", "coordinator": "coordinator", "model": "coordinator",
           "bundle": "coordinator", "fleet": "coordinator", "demo": "all", "fl": "fl",
           "sim": "all", "rollout": "coordinator", "token": "coordinator",
           "audit": "coordinator", "console": "coordinator"}  # fmt: skip


class MissingExtraError(Exception):
    """A command needs an optional dependency that is not installed (one line to the user)."""


def _lazy(module: str, func: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            return int(getattr(importlib.import_module(module), func)(args) or 0)
        except ImportError as exc:  # ModuleNotFoundError, or a broken native library
            missing = (exc.name or "").split(".")[0]
            if not missing or missing == "edgefleet":
                raise
            extra = _EXTRAS.get(args.group, "all")
            if args.group == "model" and getattr(args, "cmd", None) == "train":
                extra = "models"
            command = " ".join(filter(None, [args.group, getattr(args, "cmd", None)]))
            raise MissingExtraError(
                f"`{command}` needs the {extra} extra ({missing} cannot be imported): "
                f"pip install 'edgefleet[{extra}]'"
            ) from exc

    return run


def _agent(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agent", help="the on-device agent").add_subparsers(
        dest="cmd", required=True
    )
    mod = "edgefleet._cli_agent"
    home = _home("EDGEFLEET_AGENT_HOME")
    c = p.add_parser("init", help="make device keys and pin the coordinator's root key")
    c.add_argument("--home", **home)
    c.add_argument("--device-id", required=True)
    c.add_argument("--trust", type=Path, required=True, help="root public key file (root.pub)")
    c.add_argument("--kem", default="x25519", choices=["x25519", "mlkem768-x25519"])
    c.add_argument("--broker", default="", help="mqtt://host:port of the broker")
    c.add_argument("--password-file", default="", help="file with this device's broker password")
    c.set_defaults(run=_lazy(mod, "init"))
    c = p.add_parser("run", help="the daemon: receive releases over MQTT, serve the local API")
    c.add_argument("--home", **home)
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: agent.toml)")
    c.add_argument("--password-file", default=None)
    c.add_argument("--http-port", type=int, default=None, help="local API port (0 = any free)")
    c.add_argument("--no-http", action="store_true", help="do not serve the local HTTP API")
    c.add_argument("--heartbeat", type=float, default=30.0, help="seconds between status reports")
    _log_format(c)
    c.set_defaults(run=_lazy("edgefleet._cli_daemon", "agent_run"))
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
    c = p.add_parser("explain", help="Shapley values of the active model's prediction for a row")
    c.add_argument("--home", **home)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--input", help="JSON array: one row")
    g.add_argument("--input-file", type=Path, help=".npy (or .npz with array x) file: one row")
    c.add_argument("--target", type=int, default=None, help="output to explain (default: argmax)")
    c.add_argument("--method", choices=["auto", "exact", "permutation"], default="auto")
    c.add_argument("--permutations", type=int, default=64, help="antithetic pairs (sampling)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--top", type=int, default=10, help="features shown, largest first")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy("edgefleet._cli_shadow", "agent_explain"))
    c = p.add_parser("feedback", help="report the true class of a prediction the daemon made")
    c.add_argument("--home", **home)
    c.add_argument("--id", required=True, help="its id (agent predict, POST /v1/predict)")
    c.add_argument("--label", type=int, required=True, help="the true class index")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy("edgefleet._cli_shadow", "agent_feedback"))
    c = p.add_parser("rollback", help="return to the previous kept version")
    c.add_argument("--home", **home)
    c.set_defaults(run=_lazy(mod, "rollback"))


def _coordinator(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("coordinator", help="the ML team's coordinator").add_subparsers(
        dest="cmd", required=True
    )
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
    c = p.add_parser("revoke", help="exclude a device from all future releases")
    c.add_argument("--home", **home)
    c.add_argument("--device-id", required=True)
    c.set_defaults(run=_lazy(mod, "revoke"))
    c = p.add_parser("rotate-key", help="new release key; a root-signed keyring drops the old one")
    c.add_argument("--home", **home)
    c.set_defaults(run=_lazy(mod, "rotate_key"))
    c = p.add_parser(
        "rotate-storage-key",
        help="new storage key; re-seal every content key and model blob, drop the old key",
    )
    c.add_argument("--home", **home)
    c.add_argument(
        "--new-key-env",
        metavar="NAME",
        default="",
        help="the new key's environment variable (64 hex characters), when the current key "
        "comes from one (storage_key_env); then set that variable to the new key",
    )
    c.set_defaults(run=_lazy(mod, "rotate_storage_key"))
    c = p.add_parser("group", help="device groups").add_subparsers(dest="gcmd", required=True)
    g = c.add_parser("add", help="add devices to a group (created if new)")
    g.add_argument("--home", **home)
    g.add_argument("group")
    g.add_argument("devices", nargs="+")
    g.set_defaults(run=_lazy(mod, "group_add"))
    g = c.add_parser("list", help="groups and their devices")
    g.add_argument("--home", **home)
    g.set_defaults(run=_lazy(mod, "group_list"))
    c = p.add_parser("serve", help="serve chunks and ingest device status over MQTT")
    c.add_argument("--home", **home)
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")
    c.add_argument("--client-id", default=None, help="default: coordinator-<host>-<pid>")
    c.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus /metrics there (loopback, e.g. 127.0.0.1:9108)")
    _log_format(c)
    c.add_argument("--api", default=None, metavar="HOST:PORT",
                   help="also serve the HTTP API and dashboard there (e.g. 127.0.0.1:8080)")
    _tls_options(c)
    c.set_defaults(run=_lazy("edgefleet._cli_daemon", "coordinator_serve"))
    c = p.add_parser("broker-config", help="write a locked-down mosquitto config, passwords, ACL")
    c.add_argument("--home", **home)
    c.add_argument("--out", type=Path, default=None, help="default: <home>/broker")
    c.add_argument("--port", type=int, default=1883)
    c.add_argument("--bind", default="127.0.0.1")
    c.add_argument(
        "--run-as",
        default=None,
        help="user mosquitto runs as (must be able to read the 0600 files)",
    )
    c.set_defaults(run=_lazy(mod, "broker_config"))


def _model(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("model", help="train and register models").add_subparsers(
        dest="cmd", required=True
    )
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
    c.add_argument("--reference-data", type=Path, default=None, metavar="NPZ",
                   help="training inputs x (and labels y): the drift reference statistics")
    c.set_defaults(run=_lazy(mod, "register"))
    c = p.add_parser("release", help="sign, encrypt and publish a release over MQTT")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--name", required=True)
    c.add_argument("--version", required=True)
    c.add_argument("--to", required=True, help="group:G | device:ID[,ID…] | all")
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")
    c.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds to wait for every target to report the new version (or candidate)",
    )
    c.add_argument("--candidate", choices=["shadow", "ab"], default=None,
                   help="a candidate beside the active model, never made active")
    c.add_argument("--share", type=float, default=None,
                   help="--candidate ab: share of requests it answers (default 0.1)")
    c.set_defaults(run=_lazy("edgefleet._cli_shadow", "model_release"))
    c = p.add_parser("drop-candidate", help="stop the shadow / A/B candidate on devices")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--to", required=True, help="group:G | device:ID[,ID…] | all")
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")
    c.set_defaults(run=_lazy("edgefleet._cli_shadow", "drop_candidate"))
    c = p.add_parser("list", help="registered model versions")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "list_models"))


def _bundle(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bundle", help="build and inspect bundle files").add_subparsers(
        dest="cmd", required=True
    )
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


def _fleet(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fleet", help="fleet state").add_subparsers(dest="cmd", required=True)
    c = p.add_parser("status", help="devices with version, state and last seen")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy("edgefleet._cli_coordinator", "fleet_status"))
    c = p.add_parser("drift", help="input/output drift per version, group and device; alerts")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--name", default="", help="only this model")
    c.add_argument("--threshold", type=float, default=0.2, help="drift (PSI) of an alert")
    c.add_argument("--min-samples", type=float, default=500, help="rows a device's report needs")
    c.add_argument("--window", type=int, default=3600, help="seconds of reports looked at")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy("edgefleet._cli_drift", "fleet_drift"))
    c = p.add_parser("shadow", help="shadow agreement and A/B arms per device and candidate")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--window", type=int, default=3600, help="seconds of telemetry looked at")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy("edgefleet._cli_shadow", "fleet_shadow"))
    c = p.add_parser("predictions", help="fetch a device's prediction log for audit (JSONL)")
    c.add_argument("--home", **_home("EDGEFLEET_COORDINATOR_HOME"))
    c.add_argument("--device", required=True)
    c.add_argument("--since", type=int, default=3600, help="seconds back from now")
    c.add_argument("--limit", type=int, default=1000, help="records at most (<= 4096)")
    c.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the upload")
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")
    c.set_defaults(run=_lazy("edgefleet._cli_shadow", "fleet_predictions"))


def _demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("demo", help="the one-command demo: broker, coordinator, 3 agents")
    c.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    c.add_argument("--agents", type=int, default=3)
    c.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    c.add_argument("--fl", action="store_true", help="then federated rounds on the agents' "
                   "own non-IID data, the last round's model released and served")
    c.add_argument("--fl-rounds", type=int, default=5, help="rounds with --fl")
    c.set_defaults(run=_lazy("edgefleet.demo", "main"))


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _fl_train_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--strategy", default="fedavg",
                   choices=["fedavg", "fedprox", "fedadam", "fedavgm", "fedmedian",
                            "fedtrimmedavg", "krum"])
    c.add_argument("--local-epochs", type=int, default=5)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    c.add_argument("--round-timeout", type=float, default=60.0, help="seconds per step")
    c.add_argument("--seed", type=int, default=0)


def _fl_run_options(c: argparse.ArgumentParser) -> None:
    """An FL run's sampling, training and model options: ``fl start``'s and
    ``fl retrain-on-drift``'s."""
    c.add_argument("--min-clients", type=int, default=2, help="devices sampled, at least")
    c.add_argument("--quorum", type=int, default=0, help="valid updates to aggregate "
                   "(default: --min-clients)")
    c.add_argument("--fraction", type=float, default=1.0, help="share of devices sampled")
    _fl_train_options(c)
    c.add_argument("--family", default="mlp", choices=["mlp", "linear"])
    c.add_argument("--hidden", type=int, nargs="*", default=[64])
    c.add_argument("--features", type=int, default=64)
    c.add_argument("--classes", type=int, default=10)
    c.add_argument("--presence", type=float, default=120.0,
                   help="seconds since a device's last status for it to be sampled")
    c.add_argument("--wait-devices", type=float, default=30.0,
                   help="seconds to wait for --min-clients devices")
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")


def _fl(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fl start|status|runs``, ``model history``, ``agent data add``, ``sim fl``."""
    mod = "edgefleet._cli_fl"
    home = _home("EDGEFLEET_COORDINATOR_HOME")
    p = sub.add_parser("fl", help="federated learning over the fleet").add_subparsers(
        dest="cmd", required=True
    )
    c = p.add_parser("start", help="run federated rounds; each round's model is a version")
    c.add_argument("--home", **home)
    c.add_argument("--name", required=True, help="the model name the rounds register")
    c.add_argument("--rounds", type=int, required=True)
    c.add_argument("--run-id", default="", help="default: <name>-<unix time>; an existing "
                   "run's id resumes it after its last registered round")
    _fl_run_options(c)
    c.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a strategy parameter, e.g. proximal_mu=0.1")
    c.add_argument("--max-update-norm", type=float, default=None)
    c.add_argument("--dp-noise", type=float, default=None, help="noise multiplier z")
    c.add_argument("--dp-clip", type=float, default=None, help="clipping norm C")
    c.add_argument("--release-to", default="", help="group:G | device:ID[,ID…] | all")
    c.add_argument("--release-if-better", default="", metavar="METRIC",
                   help="release the best round by METRIC if it beats the released model")
    c.set_defaults(run=_lazy(mod, "fl_start"))
    c = p.add_parser("status", help="the latest (or a named) run, round by round")
    c.add_argument("--home", **home)
    c.add_argument("--run", dest="run_id", default="", help="run id (default: the latest)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "fl_status"))
    c = p.add_parser("runs", help="federated runs in the registry")
    c.add_argument("--home", **home)
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "fl_runs"))
    c = p.add_parser("retrain-on-drift", help="drift alerts (or a schedule) start FL runs "
                     "released to a canary selector")  # fmt: skip
    c.add_argument("--home", **home)
    c.add_argument("--name", required=True, help="the model name the rounds register")
    c.add_argument("--watch", dest="drift_name", default="", metavar="NAME",
                   help="the deployed model whose drift triggers a run (default: --name)")
    c.add_argument("--rounds", type=int, required=True)
    c.add_argument("--release-to", required=True, help="group:G | device:ID[,ID…] | all")
    c.add_argument("--release-if-better", default="", metavar="METRIC")
    c.add_argument("--threshold", type=float, default=0.2, help="drift (PSI) of an alert")
    c.add_argument("--min-samples", type=float, default=500, help="rows a device's report needs")
    c.add_argument("--min-devices", type=int, default=1, help="drifting devices to start a run")
    c.add_argument("--cooldown", type=float, default=3600.0, help="seconds between drift runs")
    c.add_argument("--schedule", type=float, default=None, metavar="SECONDS",
                   help="also start a run this often without drift")
    c.add_argument("--window", type=int, default=3600, help="seconds of reports looked at")
    c.add_argument("--interval", type=float, default=60.0, help="seconds between checks")
    c.add_argument("--once", action="store_true", help="check once (and run if due), then exit")
    _fl_run_options(c)
    c.set_defaults(run=_lazy("edgefleet._cli_drift", "fl_retrain_on_drift"), param=[],
                   dp_noise=None, dp_clip=None, max_update_norm=None, run_id="")
    model = _subcommands(sub.choices["model"])
    c = model.add_parser("history", help="a model's versions with their lineage")
    c.add_argument("--home", **home)
    c.add_argument("--name", required=True)
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "model_history"))
    data = _subcommands(sub.choices["agent"]).add_parser(
        "data", help="local training data").add_subparsers(dest="dcmd", required=True)
    c = data.add_parser("add", help="append labelled samples (.npz x, y or .csv, label last)")
    c.add_argument("--home", **_home("EDGEFLEET_AGENT_HOME"))
    c.add_argument("file", type=Path)
    c.set_defaults(run=_lazy(mod, "agent_data_add"))
    s = sub.add_parser("sim", help="simulations").add_subparsers(dest="cmd", required=True)
    c = s.add_parser("fl", help="N agents with non-IID digits, R rounds, accuracy per round")
    c.add_argument("--agents", type=int, default=5)
    c.add_argument("--rounds", type=int, default=10)
    c.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    c.add_argument("--broker", default="memory", choices=["memory", "mosquitto", "amqtt"])
    c.add_argument("--hidden", type=int, default=64)
    c.add_argument("--out", type=Path, default=Path("fl-sim"), help="CSV (and PNG) go here")
    c.add_argument("--dp-noise", type=float, default=None, help="central DP: noise multiplier z")
    c.add_argument("--dp-clip", type=float, default=None, help="central DP: clipping norm C")
    _fl_train_options(c)
    c.set_defaults(run=_lazy(mod, "sim_fl"))


def _console(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    mod = "edgefleet._cli_console"
    home = _home("EDGEFLEET_COORDINATOR_HOME")
    p = sub.add_parser("token", help="API tokens (viewer, deployer, admin)").add_subparsers(
        dest="cmd", required=True
    )
    c = p.add_parser("create", help="a new API token; printed once")
    c.add_argument("--home", **home)
    c.add_argument("--name", required=True, help="who holds it (shown in the audit log)")
    c.add_argument("--role", required=True, choices=["viewer", "deployer", "admin"])
    c.set_defaults(run=_lazy(mod, "token_create"))
    c = p.add_parser("list", help="every token: id, name, role, state")
    c.add_argument("--home", **home)
    c.set_defaults(run=_lazy(mod, "token_list"))
    c = p.add_parser("revoke", help="revoke a token at once")
    c.add_argument("--home", **home)
    c.add_argument("token_id", help="its id (eft_<id>.… or the 16 hex digits)")
    c.set_defaults(run=_lazy(mod, "token_revoke"))
    c = sub.add_parser("audit", help="the audit log of state changes, oldest first")
    c.add_argument("--home", **home)
    c.add_argument("--since", type=int, default=0, metavar="SECONDS", help="only the last N s")
    c.add_argument("--limit", type=int, default=200)
    c.add_argument("--action", default=None, help="only this action (e.g. release)")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.set_defaults(run=_lazy(mod, "audit"))
    p = sub.add_parser("console", help="the HTTP API and dashboard").add_subparsers(
        dest="cmd", required=True
    )
    c = p.add_parser("serve", help="serve the API and dashboard (no MQTT chunk serving)")
    c.add_argument("--home", **home)
    c.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    _tls_options(c)
    c.set_defaults(run=_lazy(mod, "console_serve"))


def _tls_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--tls-cert", type=Path, default=None, help="serve the API over HTTPS")
    c.add_argument("--tls-key", type=Path, default=None)
    c.add_argument("--client-ca", type=Path, default=None,
                   help="mTLS: require client certificates signed by this CA")


def _rollout(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``rollout start|run|status|pause|resume|abort|rollback`` (staged rollouts)."""
    mod = "edgefleet._cli_rollout"
    home = _home("EDGEFLEET_COORDINATOR_HOME")
    p = sub.add_parser("rollout", help="staged rollouts with health gates").add_subparsers(
        dest="cmd", required=True)
    c = p.add_parser("start", help="canary, then waves, each gated on the devices' telemetry")
    c.add_argument("--home", **home)
    c.add_argument("--name", required=True)
    c.add_argument("--version", required=True)
    c.add_argument("--canary", default="10%", help="N%% | device:ID[,ID…] | group:G")
    c.add_argument("--waves", default="10%,50%,100%", help="shares of the fleet after each wave")
    c.add_argument("--gate", action="append", default=[], metavar="METRIC<N",
                   help="error_rate<0.01, p95_latency<1.5x, class_shift<0.25, drift<0.2, "
                   "agreement>0.95, accuracy>0.9 (repeatable)")
    c.add_argument("--bake", default="10m", help="time each stage bakes (30s, 10m, 1h)")
    c.add_argument("--min-samples", type=int, default=50,
                   help="inferences per device before its gates are judged")
    c.add_argument("--min-labels", type=int, default=20,
                   help="labels (agent feedback) per device before an accuracy gate is judged")
    c.add_argument("--wave-timeout", default="10m",
                   help="time to install, and after the bake to become healthy, before a halt")
    c.add_argument("--follow", action="store_true", help="drive it here until it finishes")
    c.add_argument("--interval", type=float, default=2.0, help="seconds between steps")
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")
    c.set_defaults(run=_lazy(mod, "start"))
    c = p.add_parser("run", help="drive a rollout (default: the latest) until it finishes")
    c.add_argument("--home", **home)
    c.add_argument("id", type=int, nargs="?")
    c.add_argument("--interval", type=float, default=2.0, help="seconds between steps")
    c.add_argument("--broker", default=None, help="mqtt://host:port (default: coordinator.toml)")
    c.set_defaults(run=_lazy(mod, "run"))
    c = p.add_parser("status", help="phase, wave, devices and every decision with its evidence")
    c.add_argument("--home", **home)
    c.add_argument("id", type=int, nargs="?")
    c.add_argument("--last", type=int, default=0, help="only the last N decisions")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_lazy(mod, "status"))
    for name, text in (("pause", "hold the rollout where it is"),
                       ("resume", "continue a paused rollout"),
                       ("abort", "stop it; devices keep what they run"),
                       ("rollback", "release each moved device its previous version again")):
        c = p.add_parser(name, help=text)
        c.add_argument("--home", **home)
        c.add_argument("id", type=int, nargs="?")
        if name == "rollback":
            c.add_argument("--broker", default=None, help="mqtt://host:port")
        c.set_defaults(run=_lazy(mod, name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="group", required=True)
    for add in (_agent, _coordinator, _model, _bundle, _fleet, _demo, _fl, _rollout, _console):
        add(sub)
    _add_verbose(parser, 0)
    return parser


_VERBOSE = "verbose_"


def _add_verbose(parser: argparse.ArgumentParser, depth: int) -> None:
    """``-v``/``-vv`` on this parser and every sub-command's, so it works in any position.

    Each depth counts into its own attribute (a sub-parser's namespace overwrites its
    parent's attributes of the same name); ``verbosity`` adds them up.
    """
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=f"{_VERBOSE}{depth}",
        default=0 if depth == 0 else argparse.SUPPRESS,
        help="more log output (-vv: debug)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases appear twice
                _add_verbose(child, depth + 1)


def _log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line (time, level, logger, message)")


def verbosity(args: argparse.Namespace) -> int:
    """How many ``-v`` were given, wherever they were."""
    return sum(int(v) for k, v in vars(args).items() if k.startswith(_VERBOSE))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One-shot commands print their own one-line result; daemons log their state changes.
    daemon = [args.group, getattr(args, "cmd", None)] in (
        ["agent", "run"],
        ["coordinator", "serve"],
        ["console", "serve"],
    )
    base = logging.WARNING if daemon or args.group == "demo" else logging.ERROR
    level = max(logging.DEBUG, base - 10 * verbosity(args))
    from edgefleet._cli_log import setup as setup_logging

    setup_logging(level, getattr(args, "log_format", "text"))
    if daemon:  # its own state changes at INFO (installs, connects); libraries stay at WARNING
        logging.getLogger("edgefleet").setLevel(min(level, logging.INFO))
    from edgefleet.protocol.errors import EdgeFleetError

    try:
        return int(args.run(args))
    except EdgeFleetError as exc:
        print(f"edgefleet: rejected ({exc.code}): {exc}", file=sys.stderr)
        return 2
    except (OSError, LookupError, ValueError, MissingExtraError) as exc:
        # the operator's or the environment's: a missing file, an unreachable broker
        # (ConnectionError), a bad argument, an extra not installed
        print(f"edgefleet: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
