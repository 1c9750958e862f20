"""The prediction log: a sampled, size-bounded, rotating JSONL audit trail on the device.

``PredictionLog.observe(inputs, outputs, model_key)`` is a ``Recorder`` observer: it runs on the
recorder's observer thread (never the request path) for the sampled share of the calls, and
appends one line per call to ``<dir>/predictions.jsonl``::

    {"t": unix s, "model": "name@version", "inputs": [[...]], "outputs": [[...]], "argmax": [...]}

Redaction (``redact``: field names among ``REDACTABLE``): a redacted field is replaced by
``{"sha256": <hex of its canonical JSON>}``, so an audit can still match a known input without
the device keeping it. A line over ``max_line`` bytes (a huge batch) is not written but counted
(``oversize``).

Bounds: when the current file would pass ``max_bytes`` it is renamed to
``predictions.<n>.jsonl`` (``n`` increasing) and a new one is started; only the newest ``keep``
rotated files are kept, so the log never holds more than about ``(keep + 1) x max_bytes``.
Every line is written with one ``write`` on an ``O_APPEND`` descriptor (no buffering in this
process): a crash of the agent loses nothing written, a line is either whole or, after a power
cut mid-write, a torn last line that ``read`` skips.

``read(since)`` yields the records with ``t >= since``, oldest first, across the rotated files.

Upload for audit: the coordinator (``edgefleet fleet predictions``) publishes a request on the
device's ``cmd/predlog`` topic; the daemon answers with ``upload_messages``: the records, cut in
bounded chunks (index, last, count) and sent as ``predlog`` telemetry on its own telemetry topic,
which the coordinator stores like any telemetry and ``assemble`` puts back together.

The request is signed as the coordinator signs its FL instructions (``protocol.fl``: an
``instruction`` envelope signed by a release key of the keyring the device trusts, addressed to
this device, with ``issued_at``/``expires``; ``seal_request``), its payload
``{"command": "predlog", "corr", "since", "limit"}`` with ``corr`` the envelope's message id.
``RequestGate.open`` refuses, with one WARNING line and a count in ``counts``
(``refused:<code>``), a request that is unsigned or malformed, signed by a key the device does
not trust or not over these bytes, addressed to another device, expired (or valid for longer
than ``MAX_REQUEST_TTL``), or seen before: its message id is a nonce remembered until its
expiry, in ``<home>/predlog-replay.json`` when given, so a replay after a restart is refused
too (``protocol.fl.ReplayGuard``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet.infra.fsutil import os_errors
from edgefleet.infra.replaystate import load_guard, save_guard
from edgefleet.protocol import fl
from edgefleet.protocol.errors import BundleError, MalformedError

if TYPE_CHECKING:
    from edgefleet.protocol.keyring import Keyring
    from edgefleet.protocol.keys import SigningKey

    from .config import AgentConfig
    from .observe import Recorder

__all__ = [
    "REDACTABLE",
    "PredictionLog",
    "RequestGate",
    "assemble",
    "open_log",
    "parse_request",
    "predlog_topic",
    "seal_request",
    "upload_messages",
]

log = logging.getLogger(__name__)
REDACTABLE = ("inputs", "outputs", "argmax")
CURRENT = "predictions.jsonl"
_ROTATED = re.compile(r"predictions\.(\d{1,12})\.jsonl")


class PredictionLog:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 4 * 1024 * 1024,  # per file
        keep: int = 4,  # rotated files kept besides the current one
        max_line: int = 256 * 1024,  # bytes; longer records are dropped and counted
        redact: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redact = tuple(redact)
        if bad := [f for f in self.redact if f not in REDACTABLE]:
            raise ValueError(f"predlog redact: expected fields among {REDACTABLE}, saw {bad}")
        if max_bytes < 1024 or keep < 0 or max_line < 256:
            raise ValueError("predlog: max_bytes >= 1024, keep >= 0, max_line >= 256")
        self.dir, self.max_bytes, self.keep, self.max_line = directory, max_bytes, keep, max_line
        self._clock = clock
        self._lock = threading.Lock()
        self.written = self.oversize = self.errors = 0
        with os_errors(f"{directory}: cannot open the prediction log"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.dir / CURRENT, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                       0o600)  # fmt: skip

    # -- writing (the observer thread) -----------------------------------------------------
    def observe(self, inputs: np.ndarray, outputs: np.ndarray, key: str) -> None:
        record: dict[str, Any] = {
            "t": round(self._clock(), 3),
            "model": key,
            "inputs": np.asarray(inputs).tolist(),
            "outputs": np.asarray(outputs).tolist(),
            "argmax": np.asarray(outputs).reshape(len(outputs), -1).argmax(axis=1).tolist(),
        }
        try:
            for f in self.redact:
                record[f] = {"sha256": hashlib.sha256(_canonical(record[f])).hexdigest()}
        except ValueError:  # NaN or infinite outputs: not JSON
            self.errors += 1
            return
        self.write(record)

    def write(self, record: dict[str, Any]) -> bool:
        """Append one record; False if it was too long or the disk refused it (counted)."""
        try:
            line = _canonical(record) + b"\n"
        except (TypeError, ValueError):  # NaN or infinite outputs: not JSON
            self.errors += 1
            return False
        if len(line) > self.max_line:
            self.oversize += 1
            return False
        with self._lock:
            try:
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                os.write(self._fd, line)
            except OSError as exc:
                self.errors += 1
                if self.errors & (self.errors - 1) == 0:  # 1, 2, 4...: not a log flood
                    log.warning("prediction log: cannot write (%s)", exc)
                return False
            self._size += len(line)
            self.written += 1
        return True

    def _rotate(self) -> None:
        rotated = self.rotated()
        n = rotated[-1][0] + 1 if rotated else 1
        os.rename(self.dir / CURRENT, self.dir / f"predictions.{n}.jsonl")
        os.close(self._fd)
        self._fd, self._size = self._open(), 0
        for _, old in self.rotated()[: max(0, len(rotated) + 1 - self.keep)]:
            old.unlink(missing_ok=True)

    def rotated(self) -> list[tuple[int, Path]]:
        """The rotated files, oldest first."""
        found = []
        for p in self.dir.iterdir():
            m = _ROTATED.fullmatch(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    # -- reading ---------------------------------------------------------------------------
    def read(self, since: float = 0.0) -> Iterator[dict[str, Any]]:
        """Records with ``t >= since``, oldest first; unreadable (torn) lines are skipped."""
        with self._lock:
            files = [p for _, p in self.rotated()] + [self.dir / CURRENT]
        for path in files:
            try:
                with open(path, "rb") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(rec, dict) and float(rec.get("t", 0)) >= since:
                            yield rec
            except FileNotFoundError:  # rotated away meanwhile
                continue

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def open_log(config: AgentConfig, recorder: Recorder) -> PredictionLog | None:
    """The daemon's log in ``<home>/predictions/`` as ``config`` asks (None: not asked), fed
    ``predlog_sample`` of the recorder's calls."""
    if config.predlog_sample <= 0:
        return None
    redact = [f.strip() for f in config.predlog_redact.split(",") if f.strip()]
    plog = PredictionLog(config.home / "predictions", max_bytes=config.predlog_max_bytes,
                         keep=config.predlog_keep, redact=redact)  # fmt: skip
    recorder.add_observer(plog.observe, share=config.predlog_sample)
    return plog


def _canonical(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


# -- upload for audit ---------------------------------------------------------------------------
MAX_REQUEST = 4096  # bytes of a signed upload request (its envelope is ~500)
REQUEST_TTL = 120  # s a request the coordinator signs stays valid
MAX_REQUEST_TTL = 3600  # s: a request valid for longer is refused (how long its id is remembered)
PREDLOG_RUN = 0  # the envelope's run id and round (not a Flower run: this gate's own guard)
COMMAND = "predlog"
MAX_UPLOAD = 4096  # records one request may ask for
PIECE = 480  # characters per string piece (telemetry strings are at most 500)
MESSAGE_BYTES = 40 * 1024  # record bytes per telemetry message (MAX_TELEMETRY is 64 KiB)
_CORR = re.compile(r"[0-9a-f]{8,32}")


def predlog_topic(cmd_topic: str) -> str:
    """Where the coordinator asks for an upload: below the device's ``cmd`` (read: ``cmd/#``)."""
    return f"{cmd_topic}/predlog"


def seal_request(
    signer: SigningKey,
    *,
    device_id: str,
    corr: str,
    since: float,
    limit: int,
    now: int,
    ttl: int = REQUEST_TTL,
) -> bytes:
    """The signed request for ``device_id``'s log since ``since`` (the coordinator's side;
    ``signer`` is its release key)."""
    payload = _canonical({"command": COMMAND, "corr": corr, "since": since, "limit": limit})
    parse_request(payload)  # ValueError for what no device would accept
    return fl.seal(payload, signer, kind="instruction", run_id=PREDLOG_RUN, round=PREDLOG_RUN,
                   message_id=corr, device_id=device_id, issued_at=now,
                   expires=now + ttl)  # fmt: skip


def parse_request(payload: bytes) -> tuple[str, float, int]:
    """``(corr, since, limit)`` of the signed payload ``{"command": "predlog", "corr": hex,
    "since": unix s, "limit": n}``, else ``ValueError``."""
    if len(payload) > MAX_REQUEST:
        raise ValueError(f"predlog request over {MAX_REQUEST} bytes")
    try:
        doc = json.loads(payload)
    except RecursionError as exc:
        raise ValueError("predlog request: nested too deeply") from exc
    if not isinstance(doc, dict) or set(doc) - {"command", "corr", "since", "limit"}:
        raise ValueError("predlog request: expected {command, corr, since, limit}")
    if doc.get("command") != COMMAND:
        raise ValueError(f"predlog request: expected command {COMMAND!r}")
    corr, since, limit = doc.get("corr"), doc.get("since", 0), doc.get("limit", MAX_UPLOAD)
    if not isinstance(corr, str) or not _CORR.fullmatch(corr):
        raise ValueError("predlog request: corr must be 8-32 lowercase hex digits")
    if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
        raise ValueError("predlog request: since must be a number")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_UPLOAD:
        raise ValueError(f"predlog request: limit must be 1..{MAX_UPLOAD}")
    return corr, float(since), limit


class RequestGate:
    """Opens signed upload requests for one device (see the module docstring)."""

    def __init__(
        self,
        *,
        device_id: str,
        trusted_keys: Callable[[], Keyring | None],  # the keyring the agent trusts now
        clock: Callable[[], float] = time.time,
        state: Path | None = None,  # where the nonces survive a restart
    ) -> None:
        self.device_id, self.trusted_keys, self.clock, self.state = (
            device_id, trusted_keys, clock, state)  # fmt: skip
        self.counts: Counter[str] = Counter()  # accepted, refused:<code>
        self._guard = self._load()

    def open(self, frame: bytes) -> tuple[str, float, int] | None:
        """``(corr, since, limit)`` of a request that verifies, else None (logged, counted)."""
        try:
            request = self._open(frame)
        except (BundleError, ValueError) as exc:
            code = exc.code if isinstance(exc, BundleError) else "malformed"
            self.counts[f"refused:{code}"] += 1
            log.warning("refused a prediction-log request (%s): %s", code, exc)
            return None
        self.counts["accepted"] += 1
        return request

    @property
    def refused(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("refused:"))

    def _open(self, frame: bytes) -> tuple[str, float, int]:
        if len(frame) > MAX_REQUEST:
            raise MalformedError(f"{len(frame)} bytes, limit {MAX_REQUEST}")
        now = int(self.clock())
        opened = fl.open_instruction(
            frame, device_id=self.device_id, keyring=self.trusted_keys(), now=now
        )
        h = opened.header
        if (h.run_id, h.round, h.chunks) != (PREDLOG_RUN, PREDLOG_RUN, ()):
            raise MalformedError("not a prediction-log request envelope")
        if h.expires - h.issued_at > MAX_REQUEST_TTL:
            raise MalformedError(f"valid for {h.expires - h.issued_at} s, at most "
                                 f"{MAX_REQUEST_TTL}")  # fmt: skip
        self._guard.check(h)
        corr, since, limit = parse_request(opened.payload)
        if corr != h.message_id:
            raise MalformedError("the request's corr is not its envelope's message id")
        self._guard.accept(h, now=now)
        self._save()
        return corr, since, limit

    def _load(self) -> fl.ReplayGuard:
        return load_guard(self.state, now=int(self.clock()), what="predlog")

    def _save(self) -> None:
        save_guard(self.state, self._guard, what="predlog")


def upload_messages(plog: PredictionLog, corr: str, since: float, limit: int
                    ) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The ``predlog`` telemetry payloads answering a request: chunks ``{"corr", "index",
    "last", "records": [[piece, ...], ...]}``, each record its JSON line cut in ``PIECE``-char
    pieces, at most ``MESSAGE_BYTES`` of records per chunk; the last says ``"last": true``
    (and ``"count"``, the records sent)."""
    chunk: list[list[str]] = []
    size = index = count = 0
    for rec in plog.read(since):
        if count == limit:
            break
        line = _canonical(rec).decode()
        if chunk and size + len(line) > MESSAGE_BYTES:
            yield {"corr": corr, "index": index, "last": False, "records": chunk}
            chunk, size, index = [], 0, index + 1
        chunk.append([line[i : i + PIECE] for i in range(0, len(line), PIECE)])
        size += len(line)
        count += 1
    yield {"corr": corr, "index": index, "last": True, "count": count, "records": chunk}


def assemble(chunks: Iterable[Mapping[str, Any]], corr: str) -> list[dict[str, Any]] | None:
    """The records of upload ``corr`` from its telemetry chunks, or None while incomplete."""
    mine = {int(c["index"]): c for c in chunks if c.get("corr") == corr}
    last = [i for i, c in mine.items() if c.get("last")]
    if not last or set(mine) != set(range(last[0] + 1)):
        return None
    records = [json.loads("".join(pieces)) for i in sorted(mine) for pieces in mine[i]["records"]]
    return records if len(records) == mine[last[0]].get("count") else None
