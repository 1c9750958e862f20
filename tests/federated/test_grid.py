"""MqttGrid + FlClient: Flower's real FedAvg over the fleet link, in memory and on mosquitto.

Each simulated device is an ``FlClient`` on its own link (its callback stands in for the agent
daemon's router); the coordinator is an ``MqttGrid`` on another. A tiny test ClientApp returns
the global arrays plus a device-specific offset with a device-specific example count, so the
FedAvg result is known exactly. Waits are on events and conditions, never on sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from edgefleet.federated import wire
from edgefleet.federated.client import FlClient
from edgefleet.federated.grid import MqttGrid, RunInterrupted
from edgefleet.infra.link import InMemoryBroker, LinkFactory, MessageProps, MqttConfig
from edgefleet.protocol import fl, topics
from edgefleet.protocol.keyring import KeyEntry, Keyring
from edgefleet.protocol.keys import SigningKey
from edgefleet.simulations.brokers import start_broker
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from tests.integration.brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO

WAIT = 20.0  # s: the most any single wait may take; passing runs stay far below it
RELEASE = SigningKey.generate()
FAR = 4_000_000_000
KEYRING = Keyring(version=1, expires=FAR, root_keyid="r" * 32, keys=(
    KeyEntry(keyid=RELEASE.keyid, public=RELEASE.public_raw, expires=FAR),))
SHAPES = [(3, 4), (5,)]


def offset(i: int) -> float:
    return float(i + 1)


def examples(i: int) -> int:
    return 10 * (i + 1)


def make_app(gate: threading.Event | None = None) -> ClientApp:
    """Train: arrays + offset(i), ``num-examples`` = examples(i) (``i`` from node_config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if gate is not None:
            assert gate.wait(WAIT)
        i = int(context.node_config["i"])
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        out = ArrayRecord([a + offset(i) for a in arrays])
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord(
            {"num-examples": examples(i), "seen-round": msg.content["config"]["server-round"]})}),
            reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        i = int(context.node_config["i"])
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": examples(i), "loss": float(i)})}), reply_to=msg)

    return app


@dataclass
class Rig:
    grid: MqttGrid
    clients: dict[str, FlClient]
    keys: dict[str, SigningKey]
    eligible: list[str]
    captured: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, frame) seen
    handled: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))


@contextmanager
def rig(factory: LinkFactory, url: str, n: int, *, round_timeout: float = WAIT,
        silent: tuple[str, ...] = (), gates: dict[str, threading.Event] | None = None,
        users: dict[str, str] | None = None) -> Iterator[Rig]:
    """``n`` devices dev-0.. (those in ``silent`` have no client: they never answer).

    With ``users`` (username -> password, from ``USERS``) each link logs in as its device (the
    coordinator as ``coordinator``), for brokers that enforce the EdgeFleet ACL."""
    ids = [f"dev-{i}" for i in range(n)]

    def config(user: str) -> MqttConfig:
        if users is None:
            return MqttConfig(url=url, client_id=user)
        return MqttConfig(url=url, client_id=user, username=user, password=users[user])

    keys = {d: SigningKey.generate() for d in ids}
    links: list[Any] = []
    clients: dict[str, FlClient] = {}
    holder: list[Rig] = []

    def coordinator_cb(topic: str, payload: bytes, props: MessageProps) -> None:
        holder[0].captured.append((topic, payload))
        holder[0].grid.on_message(topic, payload, props)
        holder[0].handled.release()

    clink = factory(config("coordinator"), coordinator_cb)
    grid = MqttGrid(clink, signer=RELEASE, device_keys=lambda d: keys[d].public_raw
                    if d in keys else None, devices=lambda: list(holder[0].eligible),
                    round_timeout=round_timeout)
    holder.append(Rig(grid=grid, clients=clients, keys=keys, eligible=list(ids)))
    clink.subscribe(wire.REPLY_FILTER)
    clink.subscribe("ef/v1/dev/+/fl")  # a spy on instructions too
    clink.start()
    links.append(clink)
    for i, d in enumerate(ids):
        if d in silent:
            continue
        box: list[FlClient] = []
        link = factory(config(d),
                       lambda t, p, m, box=box: box[0].handle(p))
        link.subscribe(wire.instruction_topic(d))
        box.append(FlClient(_publisher(link),
                            device_id=d, identity=keys[d], trusted_keys=lambda: KEYRING,
                            client_app=make_app((gates or {}).get(d)), opted_in=True,
                            node_config={"i": i}))
        clients[d] = box[0]
        link.start()
        links.append(link)
    try:
        for link in links:
            assert link.wait_connected(WAIT)
        yield holder[0]
    finally:
        for c in clients.values():
            c.stop()
        for link in links:
            link.stop()


def _publisher(link: Any) -> Callable[[str, bytes], None]:
    def publish(topic: str, payload: bytes) -> None:
        link.publish(topic, payload, qos=1)

    return publish


def initial() -> ArrayRecord:
    return ArrayRecord([np.full(s, 0.5) for s in SHAPES])


def run_fedavg(grid: MqttGrid, rounds: int, run_id: int = 11) -> Result:
    """Flower's real ServerApp main + FedAvg on the grid, as FL-B's app will run it."""
    server = ServerApp()
    out: dict[str, Result] = {}

    @server.main()
    def main(g: Any, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                          min_evaluate_nodes=1)
        out["result"] = strategy.start(grid=g, initial_arrays=initial(), num_rounds=rounds)

    grid.start_run(run_id)
    server(grid, Context(run_id=run_id, node_id=wire.SERVER_NODE_ID, node_config={},
                         state=RecordDict(), run_config={}))
    return out["result"]


def expected(rounds: int, answering: list[int]) -> list[np.ndarray]:
    total = sum(examples(i) for i in answering)
    step = sum(examples(i) * offset(i) for i in answering) / total
    return [np.full(s, 0.5) + rounds * step for s in SHAPES]


def check_fedavg(r: Rig, *, rounds: int, answering: list[int]) -> None:
    result = run_fedavg(r.grid, rounds)
    got = result.arrays.to_numpy_ndarrays()
    for g, w in zip(got, expected(rounds, answering), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    assert sorted(result.train_metrics_clientapp) == list(range(1, rounds + 1))
    loss = sum(examples(i) * i for i in answering) / sum(examples(i) for i in answering)
    assert result.evaluate_metrics_clientapp[rounds]["loss"] == pytest.approx(loss)
    assert r.grid.stats.replies == 2 * rounds * len(answering)


USERS = {"coordinator": "pw-c", **{f"dev-{i}": f"pw-{i}" for i in range(5)}}


def test_fedavg_rounds_over_the_in_memory_broker() -> None:
    with InMemoryBroker(users=USERS, acl=topics.acl()) as broker, rig(
            broker.link, broker.url, 4, users=USERS) as r:
        check_fedavg(r, rounds=3, answering=[0, 1, 2, 3])
        s = r.grid.stats
        assert (s.sent, s.timed_out, s.late, s.rejected) == (24, 0, 0, {})
        assert all(c.counts["replied"] == 6 for c in r.clients.values())


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
def test_fedavg_rounds_over_mosquitto() -> None:
    broker = start_broker("mosquitto", users=USERS)  # with the EdgeFleet ACL
    try:
        with rig(broker.link_factory, broker.url, 3, users=USERS) as r:
            check_fedavg(r, rounds=2, answering=[0, 1, 2])
            assert r.grid.stats.rejected == {}
    finally:
        broker.close()


def test_a_device_that_never_answers_does_not_stall_the_round() -> None:
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 4, round_timeout=0.5,
                                        silent=("dev-3",)) as r:
        check_fedavg(r, rounds=1, answering=[0, 1, 2])
        assert r.grid.stats.timed_out == 2  # its train and its evaluate message


def test_a_late_reply_is_dropped_and_counted() -> None:
    gate = threading.Event()
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 2, round_timeout=0.3,
                                        gates={"dev-1": gate}) as r:
        r.grid.start_run(5)
        msgs = _train(r.grid.get_node_ids())
        replies = list(r.grid.send_and_receive(msgs))
        assert [r.grid.device_of(m.metadata.src_node_id) for m in replies] == ["dev-0"]
        assert r.grid.stats.timed_out == 1
        gate.set()
        assert r.clients["dev-1"].wait_handled(1, WAIT)
        assert _wait_for(r, lambda: r.grid.stats.late == 1)
        assert r.grid.pull_messages([m.metadata.message_id for m in msgs]) == []


def test_interrupt_ends_a_waiting_round_at_once_and_refuses_later_pushes() -> None:
    """Stopping a run does not wait out the round timeout (600 s here): the waiting
    ``send_and_receive`` raises at once, and so does the next push."""
    gate = threading.Event()
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 2, round_timeout=600,
                                        gates={"dev-1": gate}) as r:
        r.grid.start_run(6)
        msgs = _train(r.grid.get_node_ids())
        outcome: list[BaseException | list[Message]] = []
        waiter = threading.Thread(target=lambda: _capture(outcome, r.grid.send_and_receive,
                                                          msgs))
        waiter.start()
        assert r.clients["dev-0"].wait_handled(1, WAIT)  # dev-0 answered; dev-1 holds back
        r.grid.interrupt()
        waiter.join(WAIT)
        gate.set()
        assert not waiter.is_alive(), "send_and_receive still waiting after interrupt()"
        assert len(outcome) == 1 and isinstance(outcome[0], RunInterrupted), outcome
        with pytest.raises(RunInterrupted, match="stopped"):
            r.grid.push_messages(msgs)


def _capture(out: list[Any], fn: Any, *args: Any) -> None:
    try:
        out.append(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        out.append(exc)


def _train(nodes: Any) -> list[Message]:
    """Round 1's train message to each of ``nodes``."""
    return [Message(RecordDict({"arrays": initial(), "config": _config(1)}), n, "train")
            for n in nodes]  # fmt: skip


def _config(server_round: int) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({"server-round": server_round})


def _wait_for(r: Rig, predicate: Callable[[], bool]) -> bool:
    """Wait on the coordinator link's handled messages until ``predicate`` holds."""
    while not predicate():
        if not r.handled.acquire(timeout=WAIT):
            return predicate()
    return True


# -- forged instructions: the device rejects them and runs nothing ------------------------------

def _instruction(device: str, signer: SigningKey, *, run_id: int = 21, step: int = 1,
                 message_id: str = "forged-1") -> bytes:
    wire.set_task_identity(run_id)
    msg = Message(RecordDict({"arrays": initial(), "config": _config(1)}),
                  fl.node_id_for(device), "train")
    wire.set_message_id(msg, message_id)
    return fl.seal(wire.encode(msg), signer, kind="instruction", run_id=run_id, round=step,
                   message_id=message_id, device_id=device, issued_at=1_700_000_000,
                   expires=FAR - 1)


def _flip_signature(frame: bytes) -> bytes:
    n = int.from_bytes(frame[4:8], "big")
    return frame[: 8 + n] + bytes([frame[8 + n] ^ 1]) + frame[9 + n :]


def test_forged_instructions_are_rejected_by_the_device() -> None:
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 2) as r:
        client = r.clients["dev-0"]
        good = _instruction("dev-0", RELEASE, step=5, message_id="good-5")
        cases = [
            (_flip_signature(good), "rejected:signature"),
            (_instruction("dev-0", SigningKey.generate()), "rejected:untrusted_signer"),
            (_instruction("dev-0", r.keys["dev-1"]), "rejected:untrusted_signer"),
            (_instruction("dev-1", RELEASE), "rejected:not_for_me"),  # on dev-0's topic
            (good, "replied"),
            (good, "rejected:rollback"),  # the same message id again
            (_instruction("dev-0", RELEASE, step=4, message_id="old-4"), "rejected:rollback"),
        ]
        for i, (frame, outcome) in enumerate(cases, start=1):
            client.handle(frame)
            assert client.wait_handled(i, WAIT)
            assert client.counts[outcome] >= 1, (i, outcome, client.counts)
        assert client.counts["replied"] == 1
        assert client.counts["rejected:rollback"] == 2
        assert sum(v for k, v in client.counts.items() if k.startswith("rejected:")) == 6


def test_an_instruction_replayed_from_a_real_run_is_rejected() -> None:
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 2) as r:
        run_fedavg(r.grid, 1)
        sent = [(t, p) for t, p in r.captured if t == wire.instruction_topic("dev-0")]
        assert len(sent) == 2  # train + evaluate
        before = r.clients["dev-0"].counts["replied"]
        for _, frame in sent:
            r.clients["dev-0"].handle(frame)
        assert r.clients["dev-0"].wait_handled(4, WAIT)
        assert r.clients["dev-0"].counts["rejected:rollback"] == 2
        assert r.clients["dev-0"].counts["replied"] == before


def test_a_device_that_has_not_opted_in_runs_nothing() -> None:
    calls: list[str] = []
    client = FlClient(lambda t, p: calls.append(t), device_id="dev-0",
                      identity=SigningKey.generate(), trusted_keys=lambda: KEYRING,
                      client_app=make_app(), opted_in=False)
    client.handle(_instruction("dev-0", RELEASE))
    assert client.counts["dropped:not_opted_in"] == 1 and calls == []
    assert not client.wait_handled(1, 0.01)


# -- forged replies: the coordinator drops them -----------------------------------------------

def _reply_to(instruction: bytes, device: str, signer: SigningKey, *, sender: str | None = None,
              message_id: str = "rep-1") -> bytes:
    opened = fl.parse(instruction)
    msg = wire.decode(opened.payload)
    reply = Message(RecordDict({"arrays": initial(), "metrics": MetricRecord(
        {"num-examples": 1})}), reply_to=msg)
    wire.set_message_id(reply, message_id)
    h = opened.header
    return fl.seal(wire.encode(reply), signer, kind="reply", run_id=h.run_id, round=h.round,
                   message_id=message_id, reply_to=h.message_id, device_id=sender or device,
                   issued_at=1_700_000_000, expires=FAR - 1)


def test_forged_and_replayed_replies_are_rejected_by_the_coordinator() -> None:
    gate = threading.Event()
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 2,
                                        gates={"dev-0": gate, "dev-1": gate}) as r:
        grid = r.grid
        grid.start_run(31)
        n0, n1 = (fl.node_id_for(d) for d in ("dev-0", "dev-1"))
        ids = grid.push_messages(_train((n0, n1)))
        assert _wait_for(r, lambda: sum(t.endswith("/fl") for t, _ in r.captured) == 2)
        ins = {t.split("/")[3]: p for t, p in r.captured if t.endswith("/fl")}
        grid.handle("dev-0", _reply_to(ins["dev-0"], "dev-0", SigningKey.generate()))
        grid.handle("dev-0", _reply_to(ins["dev-0"], "dev-0", r.keys["dev-1"]))
        grid.handle("dev-0", _reply_to(ins["dev-1"], "dev-0", r.keys["dev-1"], sender="dev-1"))
        grid.handle("dev-1", _reply_to(ins["dev-0"], "dev-1", r.keys["dev-1"]))  # not its own
        grid.handle("dev-0", _flip_signature(_reply_to(ins["dev-0"], "dev-0", r.keys["dev-0"])))
        assert grid.stats.rejected == {"untrusted_signer": 3, "rollback": 1, "signature": 1}
        assert grid.pull_messages(ids) == []
        gate.set()  # the real replies arrive now
        assert _wait_for(r, lambda: grid.stats.replies == 2)
        real = [p for t, p in r.captured if t == wire.reply_topic("dev-0")]
        grid.handle("dev-0", real[0])  # replayed
        assert grid.stats.rejected["rollback"] == 2
        replies = grid.pull_messages(ids)
        assert sorted(grid.device_of(m.metadata.src_node_id) or "" for m in replies) == [
            "dev-0", "dev-1"]


def test_push_refuses_unknown_nodes_and_a_missing_run() -> None:
    with InMemoryBroker() as broker, rig(broker.link, broker.url, 1) as r:
        grid = MqttGrid(r.grid.link, signer=RELEASE, device_keys=lambda d: None,
                        devices=lambda: ["dev-0"], round_timeout=1)
        with pytest.raises(RuntimeError, match="set_run"):
            grid.push_messages([])
        grid.start_run(3)
        with pytest.raises(ValueError, match="not a node"):
            grid.push_messages([Message(RecordDict(), 12345, "train")])
        assert grid.run.run_id == 3 and list(grid.get_node_ids()) == [fl.node_id_for("dev-0")]


# -- the real agent daemon routes ``fl`` to the client, off its delivery path -----------------

def test_the_agent_daemon_runs_a_round_while_inference_keeps_serving(
        fleet: Any, tmp_path: Any, x_test: np.ndarray) -> None:
    from edgefleet.agent.daemon import AgentDaemon

    from tests.conftest import NOW, open_agent

    agent = open_agent(fleet.agent_home(tmp_path / "home", "dev-a", installed=("v1",)))
    entered, gate = threading.Event(), threading.Event()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        entered.set()
        assert gate.wait(WAIT)
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(
            {"num-examples": 3})}), reply_to=msg)

    box: list[AgentDaemon] = []
    client = FlClient(lambda t, p: box[0].link.publish(t, p, qos=1) and None,
                      device_id="dev-a", identity=agent.identity.signing,
                      trusted_keys=lambda: agent.trust.keyring, client_app=app, opted_in=True,
                      clock=lambda: NOW)
    with InMemoryBroker() as broker:
        box.append(AgentDaemon(agent, MqttConfig(url=broker.url, client_id="agent-dev-a"),
                               link_factory=broker.link, extra_handlers={"fl": client.handle}))
        grid = MqttGrid.open(broker.link, MqttConfig(url=broker.url, client_id="coordinator"),
                             signer=fleet.release_key, devices=lambda: ["dev-a"],
                             device_keys=lambda d: fleet.identities[d].public().sign_public,
                             round_timeout=WAIT, clock=lambda: NOW)
        try:
            box[0].start()
            assert box[0].link.wait_connected(WAIT) and grid.link.wait_connected(WAIT)
            grid.start_run(1)
            msg = Message(RecordDict({"arrays": initial(), "config": _config(1)}),
                          fl.node_id_for("dev-a"), "train")
            done: list[Any] = []
            sender = threading.Thread(target=lambda: done.extend(grid.send_and_receive([msg])))
            sender.start()
            assert entered.wait(WAIT)  # the ClientApp is training now ...
            assert agent.predict(x_test[:4]).shape == (4, 10)  # ... and inference serves
            assert box[0].alive
            gate.set()
            sender.join(WAIT)
            assert len(done) == 1 and done[0].content["metrics"]["num-examples"] == 3
        finally:
            client.stop()
            grid.close()
            if box[0].alive:
                box[0].stop()
            agent.close()
