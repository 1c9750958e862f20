"""Shadow, A/B, explanations and labels: ``model release --candidate``, ``model
drop-candidate``, ``fleet shadow`` (the coordinator), ``agent explain`` and ``agent feedback``
(the device)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np


def model_release(args: argparse.Namespace) -> int:
    """``model release``: an ordinary release, or with ``--candidate`` a shadow / A/B one."""
    from ._cli_daemon import model_release as ordinary

    if not args.candidate:
        if args.share is not None:
            raise ValueError("--share applies to --candidate ab only")
        return ordinary(args)
    from edgefleet.coordinator import operations, release
    from edgefleet.protocol.candidate import CandidateSpec
    from edgefleet.protocol.errors import DecodeError

    share = args.share if args.share is not None else (0.1 if args.candidate == "ab" else 0.0)
    try:
        spec = CandidateSpec(mode=args.candidate, share=share)
    except DecodeError as exc:  # a bad flag, not a bad message
        raise ValueError(str(exc).replace("manifest.candidate.", "--")) from exc
    c, cfg = _coordinator(args)
    with release.connect(cfg) as link:
        cand, sent = operations.publish_candidate(c, operations.cli_principal(), "cli", link,
                                                  args.name, args.version, args.to, spec)
    what = "shadow" if spec.mode == "shadow" else f"A/B, {spec.share:g} of requests"
    n = len(cand.targets)
    print(f"candidate {cand.sequence}: {args.name} {args.version} ({what}) to "
          f"{n} devices ({sent} bytes of offers); never made active")  # fmt: skip
    if args.wait <= 0:
        return 0
    from edgefleet.coordinator import fleet

    waited = fleet.wait_for(c.registry, cand.sequence, cand.targets, args.wait, candidate=True)
    if waited.ok:
        print(f"all {n} devices serve candidate {cand.sequence}")
        return 0
    print(f"timed out: {len(waited.arrived)} of {n} devices serve candidate {cand.sequence} "
          f"(still without it: {', '.join(waited.pending[:8])}"
          f"{', …' if len(waited.pending) > 8 else ''})", file=sys.stderr)  # fmt: skip
    return 3


def drop_candidate(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import operations, release

    c, cfg = _coordinator(args)
    c.registry.resolve(args.to)  # an unknown group: one line before connecting
    with release.connect(cfg) as link:
        n = operations.drop_candidate(c, operations.cli_principal(), "cli", link, args.to)
    print(f"candidate dropped on {n} devices (their active models are unchanged)")
    return 0


def _coordinator(args: argparse.Namespace) -> tuple[Any, Any]:
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.service import mqtt_config_for

    from ._cli_coordinator import storage_key_from_env
    from ._cli_daemon import _need_broker, _registry_unlocked

    _registry_unlocked(args)
    c = Coordinator.open(args.home, broker=args.broker, storage_key=storage_key_from_env(args.home))
    _need_broker(c.config.broker, "coordinator.toml")
    return c, mqtt_config_for(c, client_id=f"candidate-{os.getpid()}")


def fleet_shadow(args: argparse.Namespace) -> int:
    """Per device and candidate: shadow agreement, latency ratio, confidence delta; A/B arms."""
    from edgefleet.coordinator.candidates import ab_summary, shadow_summary
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.telemetry import recent

    c = Coordinator.open(args.home)
    since = int(time.time()) - args.window
    out: list[dict[str, Any]] = []
    for namespace, summarize in (("shadow", shadow_summary), ("ab", ab_summary)):
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for device, _, payload in recent(c.registry, namespace=namespace, since=since):
            key = str(payload.get("candidate" if namespace == "shadow" else "model", "?"))
            groups.setdefault((device, key), []).append(payload)
        for (device, key), windows in sorted(groups.items()):
            out.append({"device": device, "mode": namespace, "candidate": key,
                        **summarize(windows)})  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print(f"no shadow or A/B telemetry in the last {args.window} s")
        return 0
    for r in out:
        if r["mode"] == "shadow":
            print(f"{r['device']:<16} shadow {r['candidate']:<20} compared {r['compared']:>7}  "
                  f"agreement {_num(r['agreement'])}  latency {_num(r['latency_ratio'])}x  "
                  f"conf delta {_num(r['conf_delta_mean'])}  dropped {r['dropped']}")  # fmt: skip
        else:
            arms = "  ".join(f"{arm} {a['count']} req, {_num(a['error_rate'])} err"
                             for arm, a in r.items() if isinstance(a, dict))  # fmt: skip
            print(f"{r['device']:<16} A/B    {r['candidate']:<20} {arms}")
    return 0


def _num(value: object) -> str:
    return "-" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]


def agent_explain(args: argparse.Namespace) -> int:
    """``agent explain``: Shapley values of the active model's prediction for one row."""
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.explain import background_from, explain

    from ._cli_agent import _read_input

    x = _read_input(args)
    if x.shape[0] != 1:
        raise ValueError(f"explain takes one input row, got {x.shape[0]}")
    with Agent.open(args.home, readonly=True) as agent:  # beside a running daemon too
        serving = agent.serving
        if serving is None:
            print(f"edgefleet: {' '.join(agent._no_model().split())}", file=sys.stderr)
            return 1
        version, runtime = serving
        m = version.manifest
        bg = background_from(m.reference_stats, x.shape[1])
        if bg is None:
            raise ValueError("the bundle has no reference mean to explain against")
        e = explain(runtime.run, x[0], bg, target=args.target, method=args.method,
                    permutations=args.permutations, seed=args.seed)  # fmt: skip
    if args.json:
        model = {"name": m.name, "version": m.model_version, "sequence": m.sequence}
        print(json.dumps({**e.to_dict(), "model": model}))
        return 0
    print(f"{m.name} {m.model_version} (release {m.sequence}): class {e.target}, output "
          f"{e.output:.4f} = base {e.base:.4f} + the sum of {len(e.values)} values "
          f"({e.method}, {e.evaluations} model rows)")  # fmt: skip
    print("feature      value    stderr")
    for i in np.argsort(-np.abs(e.values))[: args.top]:
        print(f"{int(i):>7} {e.values[i]:+9.4f} {e.stderr[i]:9.4f}")
    return 0


def agent_feedback(args: argparse.Namespace) -> int:
    """``agent feedback``: the true class of a prediction the running daemon answered (its
    id from ``agent predict`` or ``POST /v1/predict``), scored for the ``accuracy`` gate."""
    from edgefleet.agent.http import feedback_via_http

    try:
        doc = feedback_via_http(args.home, args.id, args.label)
    except RuntimeError as exc:  # already labelled
        print(f"edgefleet: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if doc is None:
        raise LookupError(f"no running agent serves {args.home}: prediction ids live in the "
                          "daemon (`edgefleet agent run`) that answered")  # fmt: skip
    if args.json:
        print(json.dumps(doc))
        return 0
    verdict = "correct" if doc.get("correct") else f"wrong (predicted {doc.get('predicted')})"
    print(f"prediction {args.id} of {doc.get('model')}: label {args.label}, {verdict}")
    return 0


def fleet_predictions(args: argparse.Namespace) -> int:
    """Ask a device for its prediction log since ``--since`` seconds ago (a request signed by
    the release key, as FL instructions are); print it as JSONL."""
    import secrets

    from edgefleet.agent.predlog import REQUEST_TTL, assemble, predlog_topic, seal_request
    from edgefleet.coordinator import release
    from edgefleet.coordinator.telemetry import recent
    from edgefleet.protocol import topics

    c, cfg = _coordinator(args)
    if c.registry.device(args.device) is None:
        raise LookupError(f"device {args.device!r} is not enrolled")
    corr, asked = secrets.token_hex(8), int(time.time())
    c.keys.check(now=asked, ttl=REQUEST_TTL)  # the keyring devices trust must outlive it
    request = seal_request(c.keys.release, device_id=args.device, corr=corr,
                           since=asked - args.since, limit=args.limit, now=asked)  # fmt: skip
    with release.connect(cfg) as link:
        link.publish(predlog_topic(topics.cmd(args.device)), request, qos=1).wait(10)
    deadline = time.monotonic() + args.wait  # `coordinator serve` stores the answer
    while True:
        rows = recent(c.registry, namespace="predlog", since=asked - 60, device_ids=[args.device])
        records = assemble((p for _, _, p in rows), corr)
        if records is not None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete prediction log from {args.device} within "
                               f"{args.wait:g} s (is it online, with predlog_sample > 0, and "
                               "`coordinator serve` running?)")  # fmt: skip
        time.sleep(0.2)
    for rec in records:
        print(json.dumps(rec, separators=(",", ":")))
    print(f"{len(records)} records from {args.device}", file=sys.stderr)
    return 0
