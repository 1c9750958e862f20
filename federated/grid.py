"""``MqttGrid``: a ``flwr.serverapp.Grid`` that carries Flower Messages over the fleet link.

The coordinator's ServerApp (any Flower strategy, ``Strategy.start``) runs unchanged on it:

- **Nodes.** ``devices()`` names the eligible devices (enrolled, online, opted in); each
  device's Flower node id is ``protocol.fl.node_id_for(device_id)`` (63 bits of SHA-256 of
  the id), so both sides agree on it with no table, across restarts. ``device_of(node_id)``
  maps back for every device seen by ``get_node_ids``.
- **Push.** Each message gets a fresh id (uuid4 hex, as ``InMemoryGrid`` does), Flower's
  serde, a frame signed with the release key (``protocol.fl``) and one QoS 1 publish to
  ``ef/v1/dev/<id>/fl`` — or, above ``fl.MAX_PAYLOAD``, a signed header naming every chunk's
  SHA-256 and then the chunks, in order (``fl.seal_message``). Every ``push_messages`` call
  is one step of the run (``round`` in the envelope; train and evaluate of one Flower round
  are two steps).
- **Replies.** Whoever owns the link feeds ``up/fl`` payloads to ``handle(device_id, payload)``
  (or uses ``on_message`` as the link's callback). A reply is kept only if its envelope
  verifies with that device's enrolled key, it answers a message still pending for that very
  device, and Flower's metadata agrees with the envelope. Everything else is dropped,
  logged and counted in ``stats`` by reason. A chunked reply is buffered only after its
  signed header verified and answers a pending message, and only up to
  ``max_reply_bytes_per_device`` per device and ``max_reply_bytes`` in all
  (``protocol.flchunk.Reassembler``).
- **Timeouts.** ``send_and_receive`` waits at most ``min(timeout, round_timeout)`` and returns
  what arrived; the rest is marked late, and a late reply is dropped and counted. A device
  that drops out never stalls a round.
- **Stop.** ``interrupt()`` (what stopping a run calls) wakes a ``send_and_receive`` that is
  waiting and makes it, and every later push, raise ``RunInterrupted``: the round in flight is
  not aggregated, and the run can resume after its last finished round at once, not after the
  round timeout.

``set_run`` also sets Flower's process-global ``TaskIdentity`` (``Message(...)`` reads it), so
one coordinator process runs one FL run at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgefleet.infra.link import Link, LinkFactory, MessageProps, MqttConfig
from edgefleet.protocol import fl, flchunk, topics
from edgefleet.protocol.errors import BundleError, MalformedError, RollbackError, TransportError
from edgefleet.protocol.keys import SigningKey
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from . import wire

__all__ = ["GridStats", "MqttGrid", "RunInterrupted"]

log = logging.getLogger(__name__)
_LATE_KEPT = 4096  # ids of timed-out messages remembered, to tell late replies from forged ones


class RunInterrupted(RuntimeError):
    """The run was stopped (``MqttGrid.interrupt``) while it pushed or waited for replies."""


@dataclass(frozen=True, kw_only=True)
class GridStats:
    """Counters since the grid was made (a snapshot)."""

    sent: int = 0
    replies: int = 0  # accepted replies
    timed_out: int = 0  # messages unanswered when their send_and_receive gave up
    late: int = 0  # replies that came after that
    send_failed: int = 0  # publishes the link refused
    bytes_sent: int = 0  # frames, bytes
    bytes_received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> replies dropped


@dataclass(frozen=True, kw_only=True)
class _Pending:
    device_id: str
    node_id: int
    run_id: int
    step: int


class MqttGrid(Grid):
    def __init__(
        self,
        link: Link,
        *,
        signer: SigningKey,  # the coordinator's release key: signs instructions
        device_keys: Callable[[str], bytes | None],  # device id -> enrolled Ed25519 public key
        devices: Callable[[], list[str]],  # eligible device ids: enrolled, online, opted in
        round_timeout: float,  # s, the longest one send_and_receive waits
        clock: Callable[[], float] = time.time,  # wall clock for envelope issue/expiry
        message_ttl: int = 3600,  # s an instruction stays valid (also Flower's ttl cap)
        max_reply_bytes_per_device: int = 16 << 20,  # chunked replies being reassembled
        max_reply_bytes: int = 256 << 20,  # ... from all devices of the run
    ) -> None:
        if round_timeout <= 0 or message_ttl <= 0:
            raise ValueError("round_timeout and message_ttl must be > 0")
        self.link, self.signer = link, signer
        self.device_keys, self.devices = device_keys, devices
        self.round_timeout, self.clock, self.message_ttl = round_timeout, clock, message_ttl
        self._run: Run | None = None
        self._step = 0
        self._nodes: dict[int, str] = {}
        self._lock = threading.Condition()
        self._pending: dict[str, _Pending] = {}  # instruction id -> where it went
        self._replies: dict[str, Message] = {}  # instruction id -> its verified reply
        self._late: OrderedDict[str, None] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._owned = False
        self._interrupted = False
        self._chunks = flchunk.Reassembler(max_bytes_per_key=max_reply_bytes_per_device,
                                           max_bytes=max_reply_bytes)  # fmt: skip
        self._chunk_lock = threading.Lock()  # the reassembler (handle may be called anywhere)

    @classmethod
    def open(cls, link_factory: LinkFactory, config: MqttConfig, **kwargs: Any) -> MqttGrid:
        """A grid on its own link (subscribed to every device's ``up/fl``, started)."""
        holder: list[MqttGrid] = []
        link = link_factory(config, lambda t, p, m: holder[0].on_message(t, p, m))
        grid = cls(link, **kwargs)
        holder.append(grid)
        grid._owned = True
        link.subscribe(wire.REPLY_FILTER, qos=1)
        link.start()
        return grid

    def interrupt(self) -> None:
        """Stop the run: a waiting ``send_and_receive`` and every later push raise
        ``RunInterrupted`` (the round in flight is not aggregated)."""
        with self._lock:
            self._interrupted = True
            self._lock.notify_all()

    def _check_interrupted(self) -> None:
        if self._interrupted:
            raise RunInterrupted("the run was stopped; it resumes after its last finished round")

    def close(self) -> None:
        """Stop the link if ``open`` made it."""
        if self._owned:
            self.link.stop()

    # -- Grid: the run ---------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        with self._lock:
            self._run, self._step = run, 0
        wire.set_task_identity(run.run_id, task_id=run.primary_task_id or 1)
        log.info("fl run %d: set on the MQTT grid", run.run_id)

    def start_run(self, run_id: int) -> Run:
        """``set_run`` with an empty ``Run`` for ``run_id`` (what a ServerApp needs)."""
        run = wire.empty_run(run_id)
        self.set_run(run)
        return run

    @property
    def run(self) -> Run:
        return Run(**vars(self._require_run()))

    def _require_run(self) -> Run:
        if self._run is None:
            raise RuntimeError("MqttGrid: call set_run (or start_run) first")
        return self._run

    # -- Grid: nodes and messages --------------------------------------------------------------
    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        self._require_run()
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        ids = []
        for device_id in self.devices():
            node = fl.node_id_for(device_id)
            known = self._nodes.setdefault(node, device_id)
            if known != device_id:
                raise RuntimeError(f"node id collision: {known!r} and {device_id!r}")
            ids.append(node)
        return ids

    def device_of(self, node_id: int) -> str | None:
        """The device id of a node id (of any device ``devices()`` has named so far)."""
        return self._nodes.get(node_id)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        run = self._require_run()
        with self._lock:
            self._check_interrupted()
            self._step += 1
            step = self._step
        ids = []
        for msg in messages:
            sent = self._push_one(msg, run.run_id, step)
            if sent is not None:
                ids.append(sent)
        return ids

    def _push_one(self, msg: Message, run_id: int, step: int) -> str | None:
        md = msg.metadata
        device_id = self._nodes.get(md.dst_node_id)
        if device_id is None:
            self.get_node_ids()  # refresh the mapping from devices()
            device_id = self._nodes.get(md.dst_node_id)
        if device_id is None:
            raise ValueError(f"message to node {md.dst_node_id}: not a node of get_node_ids()")
        if md.reply_to_message_id or md.ttl <= 0 or md.run_id != run_id:
            raise ValueError(f"invalid instruction for run {run_id}: {md}")
        mid = uuid.uuid4().hex
        wire.set_message_id(msg, mid)
        now = int(self.clock())
        frames = fl.seal_message(
            wire.encode(msg),
            self.signer,
            kind="instruction",
            run_id=run_id,
            round=step,
            message_id=mid,
            device_id=device_id,
            issued_at=now,
            expires=now + min(self.message_ttl, max(1, int(md.ttl))),
        )
        with self._lock:
            self._pending[mid] = _Pending(
                device_id=device_id, node_id=md.dst_node_id, run_id=run_id, step=step
            )
        try:
            for frame in frames:  # in order: the signed header first
                self.link.publish(wire.instruction_topic(device_id), frame, qos=1)
        except TransportError as exc:
            with self._lock:
                del self._pending[mid]
                self._counts["send_failed"] += 1
            log.warning("fl: not sent to %s: %s", device_id, exc)
            return None
        with self._lock:
            self._counts["sent"] += 1
            self._counts["bytes_sent"] += sum(map(len, frames))
        return mid

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies that have arrived for these ids (each is handed out once)."""
        with self._lock:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        wait = self.round_timeout if timeout is None else min(timeout, self.round_timeout)
        ids = set(self.push_messages(messages))
        deadline = time.monotonic() + wait
        with self._lock:
            self._lock.wait_for(
                lambda: self._interrupted or ids <= self._replies.keys(),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            self._check_interrupted()
            got = [self._replies.pop(i) for i in ids if i in self._replies]
            missing = ids - {m.metadata.reply_to_message_id for m in got}
            for mid in missing:
                del self._pending[mid]
                self._late[mid] = None
            while len(self._late) > _LATE_KEPT:
                self._late.popitem(last=False)
            self._counts["timed_out"] += len(missing)
        if missing:
            log.warning(
                "fl: %d of %d replies missing after %.1f s; going on with %d",
                len(missing),
                len(ids),
                wait,
                len(got),
            )
        return got

    # -- replies (the link's thread) -------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        """A link callback: hands ``ef/v1/dev/<id>/up/fl`` payloads to ``handle``."""
        where = topics.device_of(topic)
        if where is not None and where[1] == "up/fl":
            self.handle(where[0], payload)

    def handle(self, device_id: str, payload: bytes) -> None:
        """One ``up/fl`` payload from ``device_id``'s topic; never raises."""
        try:
            self._accept(device_id, payload)
        except BundleError as exc:
            with self._lock:
                self._rejected[exc.code] += 1
            log.warning("fl: reply from %s rejected: %s", device_id, exc)
        except Exception:
            with self._lock:
                self._rejected["error"] += 1
            log.exception("fl: reply from %s: unexpected error", device_id)

    def _accept(self, device_id: str, payload: bytes) -> None:
        if flchunk.is_chunk(payload):
            with self._chunk_lock:
                whole = self._chunks.add(device_id, payload)
            self._count_received(payload)
            if whole is not None:
                with self._chunk_lock:
                    self._chunks.release(device_id, whole.header.message_id)
                pending = self._admit(device_id, whole.header)
                if pending is not None:
                    self._deliver(device_id, whole, pending)
            return
        now = int(self.clock())
        opened = fl.open_reply(payload, device_id=device_id,
                               device_key=self.device_keys(device_id), now=now)  # fmt: skip
        self._count_received(payload)
        pending = self._admit(device_id, opened.header)
        if pending is None:
            return
        if opened.header.chunks:  # verified and expected: now its chunks may be buffered
            with self._chunk_lock:
                self._chunks.begin(device_id, opened, now)
            return
        self._deliver(device_id, opened, pending)

    def _count_received(self, payload: bytes) -> None:
        with self._lock:
            self._counts["bytes_received"] += len(payload)

    def _admit(self, device_id: str, h: fl.FlHeader) -> _Pending | None:
        """The pending instruction a verified reply answers; ``None`` if it came late."""
        with self._lock:
            if h.reply_to in self._late:
                del self._late[h.reply_to]
                self._counts["late"] += 1
                log.warning("fl: late reply from %s to %s dropped", device_id, h.reply_to)
                return None
            pending = self._pending.get(h.reply_to)
        if pending is None or pending.device_id != device_id:
            raise _unexpected(f"reply from {device_id} to {h.reply_to}: nothing pending for it")
        if (h.run_id, h.round) != (pending.run_id, pending.step):
            raise _unexpected(
                f"reply from {device_id}: run/round {h.run_id}/{h.round}, "
                f"expected {pending.run_id}/{pending.step}"
            )
        return pending

    def _deliver(self, device_id: str, opened: fl.Opened, pending: _Pending) -> None:
        h = opened.header
        msg = wire.decode(opened.payload)
        md = msg.metadata
        if (md.reply_to_message_id, md.message_id, md.run_id, md.src_node_id, md.dst_node_id) != (
            h.reply_to,
            h.message_id,
            h.run_id,
            pending.node_id,
            wire.SERVER_NODE_ID,
        ):
            raise MalformedError(
                f"reply from {device_id}: Flower metadata does not match its signed envelope"
            )
        with self._lock:
            if self._pending.pop(h.reply_to, None) is None:  # a racing duplicate
                raise _unexpected(f"reply from {device_id} to {h.reply_to}: already answered")
            self._replies[h.reply_to] = msg
            self._counts["replies"] += 1
            self._lock.notify_all()

    @property
    def stats(self) -> GridStats:
        with self._lock:
            return GridStats(
                rejected=dict(self._rejected),
                **{
                    k: self._counts[k]
                    for k in (
                        "sent",
                        "replies",
                        "timed_out",
                        "late",
                        "send_failed",
                        "bytes_sent",
                        "bytes_received",
                    )
                },
            )


def _unexpected(message: str) -> BundleError:
    """A verified reply that answers nothing pending: a replay, or meant for another device."""
    return RollbackError(message)
