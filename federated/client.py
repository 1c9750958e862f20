"""``FlClient``: the device side of an FL run. Runs the ClientApp in-process on its own thread.

The agent daemon hands every ``ef/v1/dev/<id>/fl`` payload to ``handle``, which only queues it
(bounded; full = dropped and counted) and returns, so delivery and installs never wait on a
round. The client's thread then, for each frame:

    verify (protocol.fl: release key in the trusted keyring, addressed to this device,
    digest, expiry) -> replay guard (message id, round within the run) -> Flower serde ->
    Flower metadata must agree with the envelope -> ClientApp(message, context) ->
    reply id (uuid4 hex) -> serde -> signed by the device's identity key -> ``publish`` on
    ``ef/v1/dev/<id>/up/fl``

A message larger than one frame (``fl.seal_message``: a signed header naming each chunk's
SHA-256, then ``EFL2`` chunk frames) is reassembled in ``handle`` itself, so its chunks never
wait in (or overflow) the queue: the header is verified and replay-checked first, each chunk
is hashed against it on arrival (``protocol.flchunk.Reassembler``), and the whole message,
once verified, takes one queue slot. Chunked instructions being reassembled or waiting hold
at most ``max_message_bytes``. Replies above one frame go out the same way.

With ``replay_state`` (a file in the agent's home) the replay guard — message ids until their
expiry, the highest step of each run — is written atomically after every accepted
instruction and read back at start-up, so an instruction replayed after an agent restart is
still refused. An unreadable state file is logged and the guard starts empty (expiry still
bounds what could be replayed).

A ClientApp that raises is answered with a Flower error reply, as a SuperNode does. Nothing
is run for an instruction that does not verify, and nothing at all unless ``opted_in``.
Flower (and whatever the ClientApp imports) is imported on the first verified instruction,
so an idle agent with FL configured stays as light as one without: this module imports no
Flower code at import time, and ``client_app`` may be a factory called at that moment.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.infra.replaystate import load_guard, save_guard
from edgefleet.protocol import fl, flchunk
from edgefleet.protocol.errors import BundleError, MalformedError
from edgefleet.protocol.keyring import Keyring
from edgefleet.protocol.keys import SigningKey

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

__all__ = ["FlClient"]

log = logging.getLogger(__name__)
_RUNS_KEPT = 4  # per-run Flower contexts (local state across rounds) kept in memory


class FlClient:
    def __init__(
        self,
        publish: Callable[[str, bytes], None],  # (topic, payload): e.g. a QoS 1 link publish
        *,
        device_id: str,
        identity: SigningKey,  # the device's own Ed25519 key: signs replies
        trusted_keys: Callable[[], Keyring | None],  # the keyring the agent trusts now
        client_app: ClientApp | Callable[[], ClientApp],  # or a factory, called lazily
        opted_in: bool,
        clock: Callable[[], float] = time.time,
        node_config: Mapping[str, Any] | None = None,  # Flower node_config for the ClientApp
        max_queued: int = 4,  # frames waiting for the thread (each at most fl.MAX_FRAME)
        reply_ttl: int = 3600,  # s a reply stays valid
        max_message_bytes: int = 32 << 20,  # chunked instructions reassembling or queued
        replay_state: Path | None = None,  # where the replay guard survives a restart
    ) -> None:
        self.device_id = device_id
        self.node_id = fl.node_id_for(device_id)
        self.publish, self.identity, self.trusted_keys = publish, identity, trusted_keys
        self.opted_in, self.clock, self.reply_ttl = opted_in, clock, reply_ttl
        self.node_config = dict(node_config or {})
        self._app_source = client_app
        self._app: Any = None
        self._q: queue.Queue[bytes | fl.Opened | None] = queue.Queue(maxsize=max_queued)
        self._chunks = flchunk.Reassembler(max_bytes_per_key=max_message_bytes,
                                           max_bytes=max_message_bytes, max_messages_per_key=2)
        self._chunk_lock = threading.Lock()
        self.replay_state = replay_state
        self._guard = self._load_guard()
        self._contexts: OrderedDict[int, Context] = OrderedDict()
        self._done = threading.Condition()
        self._handled = 0  # frames finished (answered or rejected); guarded by _done
        self.counts: Counter[str] = Counter()  # replied, app_error, dropped, rejected:<code>
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- called by the daemon (never blocks) -----------------------------------------------------
    def handle(self, payload: bytes) -> None:
        if not self.opted_in:
            self._count("dropped:not_opted_in")
            log.debug("fl: instruction ignored: this device has not opted in")
            return
        if len(payload) > fl.MAX_FRAME:
            self._count("rejected:too_large")
            log.warning("fl: dropped a %d-byte frame (limit %d)", len(payload), fl.MAX_FRAME)
            return
        self._ensure_thread()
        item: bytes | fl.Opened | None = payload
        if _is_chunked(payload):
            item = self._reassemble(payload)
            if item is None:
                return
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._count("dropped:queue_full")
            self._release(item)
            log.warning("fl: dropped an instruction: %d already waiting", self._q.maxsize)

    def _reassemble(self, payload: bytes) -> fl.Opened | None:
        """A chunk or a chunked header, on the caller's thread: the whole verified message
        once complete, else ``None`` (a rejection is counted as one handled frame)."""
        try:
            with self._chunk_lock:
                if flchunk.is_chunk(payload):
                    return self._chunks.add(self.device_id, payload)
                now = int(self.clock())
                opened = fl.open_instruction(payload, device_id=self.device_id,
                                             keyring=self.trusted_keys(), now=now)  # fmt: skip
                self._guard.check(opened.header)
                self._chunks.begin(self.device_id, opened, now)
                return None
        except BundleError as exc:
            self._count(f"rejected:{exc.code}")
            log.warning("fl: chunked instruction rejected: %s", exc)
            with self._done:
                self._handled += 1
                self._done.notify_all()
            return None

    def _release(self, item: bytes | fl.Opened | None) -> None:
        if isinstance(item, fl.Opened):
            with self._chunk_lock:
                self._chunks.release(self.device_id, item.header.message_id)

    def stop(self, timeout: float = 30.0) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._q.put(None)
            thread.join(timeout)

    def wait_handled(self, n: int, timeout: float) -> bool:
        """Block until ``n`` frames in all were answered or rejected (tests, observers)."""
        with self._done:
            return self._done.wait_for(lambda: self._handled >= n, timeout=timeout)

    # -- the client's thread -------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"fl-{self.device_id}", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while (frame := self._q.get()) is not None:
            try:
                self._one(frame)
            except BundleError as exc:
                self._release(frame)
                self._count(f"rejected:{exc.code}")
                log.warning("fl: instruction rejected: %s", exc)
            except Exception:
                self._release(frame)
                self._count("rejected:error")
                log.exception("fl: unexpected error handling an instruction")
            with self._done:
                self._handled += 1
                self._done.notify_all()

    def _one(self, frame: bytes | fl.Opened) -> None:
        if isinstance(frame, fl.Opened):  # reassembled and verified in handle
            opened = frame
        else:
            opened = fl.open_instruction(
                frame, device_id=self.device_id, keyring=self.trusted_keys(), now=int(self.clock())
            )
            if opened.header.chunks:
                raise MalformedError("fl: a chunked header reached the queue")
        h = opened.header
        self._guard.check(h)
        from . import wire  # Flower: only once an instruction verified

        msg = wire.decode(opened.payload)
        md = msg.metadata
        if (md.message_id, md.run_id, md.dst_node_id, md.reply_to_message_id) != (
            h.message_id,
            h.run_id,
            self.node_id,
            "",
        ):
            raise MalformedError("fl instruction: Flower metadata does not match its envelope")
        self._guard.accept(h, now=int(self.clock()))
        self._save_guard()
        log.info("fl run %d step %d: %s", h.run_id, h.round, md.message_type)
        self._release(frame)  # the instruction's bytes are now Flower's Message
        reply = self._run_app(msg)
        reply_id = uuid.uuid4().hex
        wire.set_message_id(reply, reply_id)
        payload = wire.encode(reply)
        if len(payload) > fl.MAX_MESSAGE:  # tell the coordinator rather than let it time out
            self._count("reply_too_large")
            reply = _error_reply(msg, f"reply is {len(payload)} bytes; limit {fl.MAX_MESSAGE}")
            wire.set_message_id(reply, reply_id)
            payload = wire.encode(reply)
        self._send(payload, h, reply_id)

    def _load_guard(self) -> fl.ReplayGuard:
        return load_guard(self.replay_state, now=int(self.clock()), what="fl")

    def _save_guard(self) -> None:
        save_guard(self.replay_state, self._guard, what="fl")

    def _run_app(self, msg: Message) -> Message:
        try:
            return self._client_app()(msg, self._context(msg.metadata.run_id))
        except Exception as exc:
            self._count("app_error")
            log.warning("fl: the ClientApp raised %s: %s", type(exc).__name__, exc)
            return _error_reply(msg, f"{type(exc).__name__}: {exc}")

    def _send(self, payload: bytes, h: fl.FlHeader, reply_id: str) -> None:
        now = int(self.clock())
        frames = fl.seal_message(
            payload,
            self.identity,
            kind="reply",
            run_id=h.run_id,
            round=h.round,
            message_id=reply_id,
            reply_to=h.message_id,
            device_id=self.device_id,
            issued_at=now,
            expires=now + self.reply_ttl,
        )
        from . import wire

        for frame in frames:  # in order: the signed header first
            self.publish(wire.reply_topic(self.device_id), frame)
        self._count("replied")

    def _client_app(self) -> ClientApp:
        if self._app is None:
            from flwr.clientapp import ClientApp

            source = self._app_source
            self._app = source if isinstance(source, ClientApp) else source()
        app: ClientApp = self._app
        return app

    def _context(self, run_id: int) -> Context:
        from flwr.app import Context, RecordDict

        if run_id not in self._contexts:
            self._contexts[run_id] = Context(
                run_id=run_id,
                node_id=self.node_id,
                node_config=dict(self.node_config),
                state=RecordDict(),
                run_config={},
            )
            while len(self._contexts) > _RUNS_KEPT:
                self._contexts.popitem(last=False)
        return self._contexts[run_id]

    def _count(self, what: str) -> None:
        with self._done:
            self.counts[what] += 1


def _is_chunked(payload: bytes) -> bool:
    """A chunk frame, or a header frame announcing chunks (else: the queue's path)."""
    if flchunk.is_chunk(payload):
        return True
    try:
        return bool(fl.parse(payload).header.chunks)
    except BundleError:
        return False  # rejected, with its reason, on the client's thread


def _error_reply(msg: Message, reason: str) -> Message:
    """A Flower error reply (``CLIENT_APP_RAISED_EXCEPTION``), as a SuperNode sends one."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason[:500]), reply_to=msg
    )
