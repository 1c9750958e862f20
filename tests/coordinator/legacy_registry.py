"""A registry database as the code before migrations made it, for the migration tests.

``DDL`` is what ``Base.metadata.create_all`` emitted on each backend at the last commit
without migrations (7a62167), captured with ``create_mock_engine`` and frozen here, so that
these tests keep building the old database after the models change. The rows are written with
plain SQL for the same reason, and read back through today's Registry API.
"""

from __future__ import annotations

import threading

from edgefleet.coordinator.registry import Registry
from sqlalchemy import Engine, text

DDL: dict[str, list[str]] = {
    "sqlite": [
        """CREATE TABLE model_versions (
            id INTEGER NOT NULL,
            name VARCHAR(64) NOT NULL,
            version VARCHAR(64) NOT NULL,
            format VARCHAR(16) NOT NULL,
            blob VARCHAR(64) NOT NULL,
            size BIGINT NOT NULL,
            created BIGINT NOT NULL,
            meta JSON NOT NULL,
            metrics JSON NOT NULL,
            lineage JSON NOT NULL,
            PRIMARY KEY (id),
            UNIQUE (name, version)
        )""",
        """CREATE TABLE devices (
            device_id VARCHAR(64) NOT NULL,
            sign_public BLOB NOT NULL,
            kem VARCHAR(32) NOT NULL,
            kem_public BLOB NOT NULL,
            enrolled BIGINT NOT NULL,
            last_seen BIGINT,
            state VARCHAR(32) NOT NULL,
            active_name VARCHAR(64),
            active_version VARCHAR(64),
            active_sequence BIGINT,
            last_result JSON NOT NULL,
            revoked BOOLEAN NOT NULL,
            PRIMARY KEY (device_id)
        )""",
        """CREATE TABLE groups (
            name VARCHAR(64) NOT NULL,
            PRIMARY KEY (name)
        )""",
        """CREATE TABLE counters (
            name VARCHAR(32) NOT NULL,
            value BIGINT NOT NULL,
            PRIMARY KEY (name)
        )""",
        """CREATE TABLE group_members (
            group_name VARCHAR(64) NOT NULL,
            device_id VARCHAR(64) NOT NULL,
            PRIMARY KEY (group_name, device_id),
            FOREIGN KEY(group_name) REFERENCES groups (name) ON DELETE CASCADE,
            FOREIGN KEY(device_id) REFERENCES devices (device_id) ON DELETE CASCADE
        )""",
        """CREATE TABLE releases (
            sequence BIGINT NOT NULL,
            bundle_id VARCHAR(32) NOT NULL,
            model_id INTEGER NOT NULL,
            selector VARCHAR(200) NOT NULL,
            created BIGINT NOT NULL,
            manifest BLOB NOT NULL,
            signature BLOB NOT NULL,
            keyring BLOB NOT NULL,
            keyring_sig BLOB NOT NULL,
            payload_blob VARCHAR(64) NOT NULL,
            content_key BLOB NOT NULL,
            PRIMARY KEY (sequence),
            UNIQUE (bundle_id),
            FOREIGN KEY(model_id) REFERENCES model_versions (id)
        )""",
        """CREATE TABLE release_targets (
            sequence BIGINT NOT NULL,
            device_id VARCHAR(64) NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (sequence, device_id),
            FOREIGN KEY(sequence) REFERENCES releases (sequence) ON DELETE CASCADE,
            FOREIGN KEY(device_id) REFERENCES devices (device_id)
        )""",
    ],
    "postgresql": [
        """CREATE TABLE model_versions (
            id SERIAL NOT NULL,
            name VARCHAR(64) NOT NULL,
            version VARCHAR(64) NOT NULL,
            format VARCHAR(16) NOT NULL,
            blob VARCHAR(64) NOT NULL,
            size BIGINT NOT NULL,
            created BIGINT NOT NULL,
            meta JSON NOT NULL,
            metrics JSON NOT NULL,
            lineage JSON NOT NULL,
            PRIMARY KEY (id),
            UNIQUE (name, version)
        )""",
        """CREATE TABLE devices (
            device_id VARCHAR(64) NOT NULL,
            sign_public BYTEA NOT NULL,
            kem VARCHAR(32) NOT NULL,
            kem_public BYTEA NOT NULL,
            enrolled BIGINT NOT NULL,
            last_seen BIGINT,
            state VARCHAR(32) NOT NULL,
            active_name VARCHAR(64),
            active_version VARCHAR(64),
            active_sequence BIGINT,
            last_result JSON NOT NULL,
            revoked BOOLEAN NOT NULL,
            PRIMARY KEY (device_id)
        )""",
        """CREATE TABLE groups (
            name VARCHAR(64) NOT NULL,
            PRIMARY KEY (name)
        )""",
        """CREATE TABLE counters (
            name VARCHAR(32) NOT NULL,
            value BIGINT NOT NULL,
            PRIMARY KEY (name)
        )""",
        """CREATE TABLE group_members (
            group_name VARCHAR(64) NOT NULL,
            device_id VARCHAR(64) NOT NULL,
            PRIMARY KEY (group_name, device_id),
            FOREIGN KEY(group_name) REFERENCES groups (name) ON DELETE CASCADE,
            FOREIGN KEY(device_id) REFERENCES devices (device_id) ON DELETE CASCADE
        )""",
        """CREATE TABLE releases (
            sequence BIGINT NOT NULL,
            bundle_id VARCHAR(32) NOT NULL,
            model_id INTEGER NOT NULL,
            selector VARCHAR(200) NOT NULL,
            created BIGINT NOT NULL,
            manifest BYTEA NOT NULL,
            signature BYTEA NOT NULL,
            keyring BYTEA NOT NULL,
            keyring_sig BYTEA NOT NULL,
            payload_blob VARCHAR(64) NOT NULL,
            content_key BYTEA NOT NULL,
            PRIMARY KEY (sequence),
            UNIQUE (bundle_id),
            FOREIGN KEY(model_id) REFERENCES model_versions (id)
        )""",
        """CREATE TABLE release_targets (
            sequence BIGINT NOT NULL,
            device_id VARCHAR(64) NOT NULL,
            envelope BYTEA NOT NULL,
            PRIMARY KEY (sequence, device_id),
            FOREIGN KEY(sequence) REFERENCES releases (sequence) ON DELETE CASCADE,
            FOREIGN KEY(device_id) REFERENCES devices (device_id)
        )""",
    ],
}

KEY = bytes(range(256))  # binary columns keep every byte value
ROWS = [
    ("INSERT INTO counters (name, value) VALUES ('release', 1)", {}),
    (
        "INSERT INTO model_versions (name, version, format, blob, size, created, meta, metrics,"
        " lineage) VALUES ('digits', '1', 'onnx', :blob, 1234, 1700000000, :meta, :metrics,"
        " :lineage)",
        {"blob": "ab" * 32, "meta": '{"inputs": [{"name": "x", "shape": [null, 64]}]}',
         "metrics": '{"accuracy": 0.98}', "lineage": '{"parent": null}'},
    ),
    (
        "INSERT INTO devices (device_id, sign_public, kem, kem_public, enrolled, last_seen, state,"
        " active_name, active_version, active_sequence, last_result, revoked) VALUES"
        " ('dev-a', :sign, 'x25519', :kem, 1700000001, 1700000100, 'idle', 'digits', '1', 1,"
        " :result, :no), ('dev-b', :kem, 'x25519', :sign, 1700000002, NULL, 'enrolled', NULL,"
        " NULL, NULL, '{}', :yes)",
        {"sign": KEY, "kem": KEY[::-1], "result": '{"ok": true, "code": "ok"}',
         "no": False, "yes": True},
    ),
    ("INSERT INTO groups (name) VALUES ('canary')", {}),
    ("INSERT INTO group_members (group_name, device_id) VALUES ('canary', 'dev-a')", {}),
    (
        "INSERT INTO releases (sequence, bundle_id, model_id, selector, created, manifest,"
        " signature, keyring, keyring_sig, payload_blob, content_key) SELECT 1, :bundle, id,"
        " 'all', 1700000200, :manifest, :sig, :kr, :krs, :payload, :ck FROM model_versions",
        {"bundle": "f" * 32, "manifest": b"{manifest}", "sig": b"\x00sig\xff", "kr": b"kr",
         "krs": b"krs", "payload": "cd" * 32, "ck": bytes(32)},
    ),
    ("INSERT INTO release_targets (sequence, device_id, envelope) VALUES (1, 'dev-a', :env)",
     {"env": b'{"d":"dev-a"}'}),
]


def make_old_registry(engine: Engine) -> None:
    """Create today's tables on an empty database, as ``create_all`` did, and fill them."""
    with engine.begin() as conn:
        for ddl in DDL[engine.dialect.name]:
            conn.exec_driver_sql(ddl)
        for sql, params in ROWS:
            conn.execute(text(sql), params)


def assert_old_rows(reg: Registry) -> None:
    """Every row ``make_old_registry`` wrote is there, and the registry works on from it."""
    mv = reg.model("digits", "1")
    assert (mv.format, mv.blob, mv.size, mv.created) == ("onnx", "ab" * 32, 1234, 1700000000)
    assert (mv.meta, mv.metrics, mv.lineage) == (
        {"inputs": [{"name": "x", "shape": [None, 64]}]}, {"accuracy": 0.98}, {"parent": None})
    a, b = reg.device("dev-a"), reg.device("dev-b")
    assert a is not None and b is not None
    assert (a.sign_public, a.kem_public, a.kem) == (KEY, KEY[::-1], "x25519")
    assert (a.enrolled, a.last_seen, a.state, a.revoked) == (1700000001, 1700000100, "idle", False)
    assert (a.active_name, a.active_version, a.active_sequence) == ("digits", "1", 1)
    assert a.last_result == {"ok": True, "code": "ok"}
    assert (b.revoked, b.last_seen, b.last_result) == (True, None, {})
    assert reg.groups() == {"canary": ["dev-a"]}
    assert reg.resolve("all") == ["dev-a"]
    release = reg.release(sequence=1)
    assert release is not None and release.bundle_id == "f" * 32
    assert (release.model.name, release.model.version, release.selector) == ("digits", "1", "all")
    assert (release.manifest, release.signature, release.keyring, release.keyring_sig) == (
        b"{manifest}", b"\x00sig\xff", b"kr", b"krs")
    assert (release.payload_blob, release.content_key) == ("cd" * 32, bytes(32))
    assert [(t.device_id, t.envelope) for t in release.targets] == [("dev-a", b'{"d":"dev-a"}')]
    # ...and carries on: the counter and the model id sequence continue where they were.
    assert reg.next_sequence() == 2
    new = reg.add_model(name="digits", version=None, format="onnx", blob="00" * 32, size=1,
                        meta={})
    assert (new.version, new.id) == ("2", mv.id + 1)


def open_concurrently(url: str, n: int = 4) -> list[BaseException]:
    """``n`` coordinators opening the registry at the same instant; the errors they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def open_registry() -> None:
        barrier.wait()
        try:
            Registry(url).engine.dispose()
        except BaseException as exc:  # reported by the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_registry) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors
