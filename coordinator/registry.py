"""Model registry and fleet registry, through SQLAlchemy (SQLite by default, PostgreSQL too).

Tables: model versions (with lineage and metrics), devices (public keys, state, last seen),
groups, releases (signed manifests, per-device envelopes) and a monotonic release counter.
A release's manifest is signed per shard of its targets: the first shard is in its row, the
others in ``manifest_shards`` (``tables/shards.py``); ``Release.signed_manifests`` maps a
target to its own.
Opening a Registry migrates its database to the newest schema (``migrations``); a change to
these models needs a new revision there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from edgefleet.protocol.errors import StoreError
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    func,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from . import tables as _tables  # noqa: F401  (every table on Base.metadata)
from .migrations import upgrade
from .tables.base import Base
from .tables.shards import ManifestShard, ShardMap
from .vault import Vault, content_key_aad

__all__ = ["Base", "Device", "Group", "ModelVersion", "Registry", "Release", "ReleaseTarget"]


group_members = Table(
    "group_members",
    Base.metadata,
    Column("group_name", ForeignKey("groups.name", ondelete="CASCADE"), primary_key=True),
    Column("device_id", ForeignKey("devices.device_id", ondelete="CASCADE"), primary_key=True),
)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))
    blob: Mapped[str] = mapped_column(String(64))  # SHA-256 of the model file
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # inputs, outputs, smoke, stats
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)  # parent, fl round, ...


class Device(Base):
    __tablename__ = "devices"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sign_public: Mapped[bytes] = mapped_column(LargeBinary)
    kem: Mapped[str] = mapped_column(String(32))
    kem_public: Mapped[bytes] = mapped_column(LargeBinary)
    enrolled: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="enrolled")
    active_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    active_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    active_sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    revoked: Mapped[bool] = mapped_column(default=False)
    groups: Mapped[list[Group]] = relationship(secondary=group_members, back_populates="devices")


class Group(Base):
    __tablename__ = "groups"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    devices: Mapped[list[Device]] = relationship(secondary=group_members, back_populates="groups")


class Counter(Base):
    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class Release(Base):
    __tablename__ = "releases"
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    bundle_id: Mapped[str] = mapped_column(String(32), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    selector: Mapped[str] = mapped_column(String(200))
    created: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)  # the first shard's, bytes as signed
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    keyring: Mapped[bytes] = mapped_column(LargeBinary)
    keyring_sig: Mapped[bytes] = mapped_column(LargeBinary)
    payload_blob: Mapped[str] = mapped_column(String(64))
    # the secret content key, sealed by the registry's storage-key vault (plain without one)
    content_key_stored: Mapped[bytes] = mapped_column("content_key", LargeBinary)
    model: Mapped[ModelVersion] = relationship()
    targets: Mapped[list[ReleaseTarget]] = relationship(
        back_populates="release", cascade="all, delete-orphan"
    )
    shards: Mapped[list[ManifestShard]] = relationship(  # the signed manifests after the first
        primaryjoin="Release.sequence == foreign(ManifestShard.sequence)",
        order_by="ManifestShard.shard",
        cascade="all, delete-orphan",
    )

    @property
    def signed_manifests(self) -> ShardMap:
        """Target device id -> (manifest bytes as signed, signature) of the shard naming it."""
        return ShardMap.of(self.manifest, self.signature, self.shards)

    @property
    def content_key(self) -> bytes:
        """The plaintext content key: as built, or opened (on first use) with the vault of
        the Registry that read the row; ``ConfigError`` if that vault lacks the key."""
        key: bytes | None = self.__dict__.get("_content_key")
        if key is None:
            vault: Vault | None = self.__dict__.get("_vault")
            key = open_content_key(vault, self.bundle_id, self.sequence, self.content_key_stored)
            self.__dict__["_content_key"] = key
        return key

    @content_key.setter
    def content_key(self, value: bytes) -> None:
        self.__dict__["_content_key"] = value
        self.content_key_stored = value  # sealed by Registry.add_release


class ReleaseTarget(Base):
    __tablename__ = "release_targets"
    sequence: Mapped[int] = mapped_column(
        ForeignKey("releases.sequence", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)  # JSON of protocol.envelope.Envelope
    release: Mapped[Release] = relationship(back_populates="targets")


CONTENT_KEY_SIZE = 32  # bytes: a stored value of this size is plain (before encryption at rest)


def open_content_key(vault: Vault | None, bundle_id: str, sequence: int, stored: bytes) -> bytes:
    if vault is None or len(stored) == CONTENT_KEY_SIZE:
        return stored
    return vault.open(stored, aad=content_key_aad(bundle_id, sequence),
                      what=f"the content key of release {sequence}")  # fmt: skip


def seal_content_key(vault: Vault, bundle_id: str, sequence: int, key: bytes) -> bytes:
    return vault.seal(key, aad=content_key_aad(bundle_id, sequence))


BUSY_TIMEOUT = 30.0  # s a statement waits for a locked SQLite database before failing


def engine_for(url: str, *, busy_timeout: float = BUSY_TIMEOUT) -> Engine:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
    return create_engine(url, **kwargs)


def where(engine: Engine) -> str:
    """The database as an operator names it: the SQLite file, or the URL without password."""
    if engine.dialect.name == "sqlite" and engine.url.database:
        return engine.url.database
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def store_errors(engine: Engine, busy_timeout: float = BUSY_TIMEOUT) -> Iterator[None]:
    """Database trouble (locked, unreachable, unreadable) becomes one ``StoreError`` line."""
    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig or exc).splitlines()[0]
        if "locked" in reason or "busy" in reason:
            raise StoreError(
                f"registry {where(engine)} is locked by another process (waited "
                f"{busy_timeout:g} s); try again when it has finished"
            ) from exc
        raise StoreError(f"registry {where(engine)}: {reason}") from exc


class Registry:
    """Thin facade over the database; every public method is one transaction."""

    def __init__(self, url: str, *, vault: Vault | None = None) -> None:
        self.url = url
        self.vault = vault  # seals content keys at rest; None: stored as given
        self.engine = engine_for(url)
        self._quick: dict[float, Engine] = {}  # busy timeout -> engine (the chunk path)
        with store_errors(self.engine):
            upgrade(self.engine)  # create, adopt or upgrade the schema (Alembic)

    @contextmanager
    def session(self, engine: Engine | None = None, busy_timeout: float = BUSY_TIMEOUT
                ) -> Iterator[Session]:  # fmt: skip
        engine = engine or self.engine
        with store_errors(engine, busy_timeout), Session(engine, expire_on_commit=False) as s, \
                s.begin():  # fmt: skip
            yield s

    # -- models ---------------------------------------------------------------------------
    def add_model(
        self,
        *,
        name: str,
        version: str | None,
        format: str,
        blob: str,
        size: int,
        meta: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> ModelVersion:
        with self.session() as s:
            if version is None:
                count = s.scalar(select(func.count()).where(ModelVersion.name == name)) or 0
                version = str(count + 1)
            if s.scalar(
                select(ModelVersion).where(
                    ModelVersion.name == name, ModelVersion.version == version
                )
            ):
                raise ValueError(f"model {name} version {version} is already registered")
            mv = ModelVersion(
                name=name,
                version=version,
                format=format,
                blob=blob,
                size=size,
                created=int(time.time()),
                meta=meta,
                metrics=metrics or {},
                lineage=lineage or {},
            )
            s.add(mv)
        return mv

    def model(self, name: str, version: str) -> ModelVersion:
        with self.session() as s:
            mv = s.scalar(
                select(ModelVersion).where(
                    ModelVersion.name == name, ModelVersion.version == version
                )
            )
            if mv is None:
                raise LookupError(f"model {name} version {version} is not registered")
            return mv

    def models(self) -> Sequence[ModelVersion]:
        with self.session() as s:
            return s.scalars(
                select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)
            ).all()

    # -- fleet ----------------------------------------------------------------------------
    def enroll(self, *, device_id: str, sign_public: bytes, kem: str, kem_public: bytes) -> Device:
        with self.session() as s:
            dev = s.get(Device, device_id)
            if dev is not None and dev.revoked:  # re-enrollment with fresh keys after a revoke
                dev.sign_public, dev.kem, dev.kem_public = sign_public, kem, kem_public
                dev.revoked, dev.enrolled = False, int(time.time())
            elif dev is not None and (dev.sign_public, dev.kem_public) != (sign_public, kem_public):
                raise ValueError(f"device {device_id} is enrolled with other keys; revoke it first")
            if dev is None:
                dev = Device(
                    device_id=device_id,
                    sign_public=sign_public,
                    kem=kem,
                    kem_public=kem_public,
                    enrolled=int(time.time()),
                    last_result={},
                )
                s.add(dev)
            return dev

    def revoke(self, device_id: str) -> None:
        """Exclude a device from every future release (its envelopes are no longer made)."""
        if not self.update_device(device_id, revoked=True):
            raise LookupError(f"device {device_id} is not enrolled")

    def device(self, device_id: str) -> Device | None:
        with self.session() as s:
            return s.get(Device, device_id)

    def devices(self, device_ids: Sequence[str] | None = None) -> Sequence[Device]:
        """Every enrolled device by id, or those of ``device_ids`` (in batches of 1,000)."""
        with self.session() as s:
            if device_ids is None:
                return s.scalars(select(Device).order_by(Device.device_id)).all()
            out: list[Device] = []
            ids = sorted(set(device_ids))
            for i in range(0, len(ids), 1000):  # bounded IN lists (SQLite's variable limit)
                out += s.scalars(select(Device).where(Device.device_id.in_(ids[i:i + 1000]))
                                 .order_by(Device.device_id))  # fmt: skip
            return out

    def add_to_group(self, group: str, device_ids: Sequence[str]) -> None:
        with self.session() as s:
            g = s.get(Group, group) or Group(name=group)
            s.add(g)
            for dev_id in device_ids:
                dev = s.get(Device, dev_id)
                if dev is None:
                    raise LookupError(f"device {dev_id} is not enrolled")
                if dev not in g.devices:
                    g.devices.append(dev)

    def groups(self) -> dict[str, list[str]]:
        """Every group, by name, with its members' ids sorted (two queries, whatever the size)."""
        with self.session() as s:
            out: dict[str, list[str]] = {n: [] for n in s.scalars(
                select(Group.name).order_by(Group.name))}  # fmt: skip
            q = select(group_members.c.group_name, group_members.c.device_id).order_by(
                group_members.c.group_name, group_members.c.device_id)
            for name, device_id in s.execute(q):
                out.setdefault(name, []).append(device_id)
            return out

    def resolve(self, selector: str) -> list[str]:
        """``all`` | ``group:G`` | ``device:ID`` | ``ID[,ID…]`` -> enrolled, unrevoked ids."""
        with self.session() as s:
            if selector == "all":
                q = select(Device.device_id)
            elif selector.startswith("group:"):
                g = s.get(Group, selector[6:])
                if g is None:
                    raise LookupError(f"group {selector[6:]} does not exist")
                q = select(Device.device_id).where(
                    Device.device_id.in_([d.device_id for d in g.devices])
                )
            else:
                ids = [i for i in selector.removeprefix("device:").split(",") if i]
                found = set(s.scalars(select(Device.device_id).where(Device.device_id.in_(ids))))
                missing = [i for i in ids if i not in found]
                if missing:
                    raise LookupError(f"devices not enrolled: {', '.join(missing)}")
                revoked = set(
                    s.scalars(
                        select(Device.device_id).where(
                            Device.device_id.in_(ids), Device.revoked.is_(True)
                        )
                    )
                )
                if revoked:
                    raise LookupError(f"devices revoked: {', '.join(sorted(revoked))}")
                q = select(Device.device_id).where(Device.device_id.in_(ids))
            return sorted(s.scalars(q.where(Device.revoked.is_(False))))

    def update_devices(self, updates: dict[str, dict[str, Any]]) -> set[str]:
        """Apply per-device column updates in one transaction; return the ids that exist."""
        found = set()
        with self.session() as s:
            for device_id, values in updates.items():
                res = s.execute(
                    update(Device).where(Device.device_id == device_id).values(**values)
                )
                if cast(CursorResult[Any], res).rowcount:
                    found.add(device_id)
        return found

    def update_device(self, device_id: str, **values: Any) -> bool:
        with self.session() as s:
            res = s.execute(update(Device).where(Device.device_id == device_id).values(**values))
            return bool(cast(CursorResult[Any], res).rowcount)

    # -- releases -------------------------------------------------------------------------
    def next_sequence(self) -> int:
        """Allocate the next release sequence (monotonic, never reused, also across processes).

        One ``UPDATE … RETURNING`` statement, atomic on SQLite and PostgreSQL alike (a read
        and a later write lose updates on SQLite); the counter row is created on first use.
        """
        bump = (
            update(Counter)
            .where(Counter.name == "release")
            .values(value=Counter.value + 1)
            .returning(Counter.value)
        )
        for _ in range(3):
            with self.session() as s:
                value = s.scalar(bump)
            if value is not None:
                return int(value)
            try:
                with self.session() as s:
                    s.add(Counter(name="release", value=0))
            except IntegrityError:
                pass  # another coordinator created it first: bump again
        raise RuntimeError("could not allocate a release sequence")

    def add_release(self, release: Release) -> None:
        if self.vault is not None:
            release.content_key_stored = seal_content_key(
                self.vault, release.bundle_id, release.sequence, release.content_key
            )
        with self.session() as s:
            s.add(release)

    def release(
        self, *, sequence: int | None = None, bundle_id: str | None = None
    ) -> Release | None:
        with self.session() as s:
            q = select(Release)
            q = (
                q.where(Release.sequence == sequence)
                if sequence is not None
                else q.where(Release.bundle_id == bundle_id)
            )
            r = s.scalar(q)
            if r is not None:
                _ = r.targets, r.model, r.shards  # load while the session is open
                r.__dict__["_vault"] = self.vault  # opens r.content_key on first use
            return r

    def releases(self) -> Sequence[Release]:
        with self.session() as s:
            rs = s.scalars(select(Release).order_by(Release.sequence)).all()
            for r in rs:
                _ = r.targets, r.model, r.shards
                r.__dict__["_vault"] = self.vault
            return rs

    def stored_content_keys(self) -> list[tuple[int, str, bytes]]:
        """(sequence, bundle id, stored content key) of every release, for re-sealing."""
        with self.session() as s:
            q = select(Release.sequence, Release.bundle_id, Release.content_key_stored)
            return [(int(seq), bid, bytes(key)) for seq, bid, key in s.execute(q)]

    def replace_content_key(self, sequence: int, old: bytes, new: bytes) -> bool:
        """Store ``new`` for release ``sequence`` if it still holds ``old`` (one atomic row
        update, so a crash leaves one form or the other); False if it changed meanwhile."""
        with self.session() as s:
            res = s.execute(
                update(Release)
                .where(Release.sequence == sequence, Release.content_key_stored == old)
                .values(content_key_stored=new)
            )
            return bool(cast(CursorResult[Any], res).rowcount)

    # -- small queries: the chunk path and release ordering --------------------------------
    def release_by_bundle(self, bundle_id: str, *, busy_timeout: float) -> Release | None:
        """The release with ``bundle_id`` and its targets, waiting at most ``busy_timeout``
        seconds for a locked SQLite database (then ``StoreError``): for the chunk path."""
        engine = self._quick.get(busy_timeout)
        if engine is None:
            engine = self._quick[busy_timeout] = (
                engine_for(self.url, busy_timeout=busy_timeout)
                if self.engine.dialect.name == "sqlite"
                else self.engine
            )
        with self.session(engine, busy_timeout) as s:
            r = s.scalar(select(Release).where(Release.bundle_id == bundle_id))
            if r is not None:
                _ = r.targets
            return r

    def newest_releases(self, device_ids: Iterable[str]) -> dict[str, int]:
        """Each device's newest release sequence (devices no release targets are absent)."""
        ids = sorted(set(device_ids))
        out: dict[str, int] = {}
        with self.session() as s:
            for start in range(0, len(ids), 500):
                q = (
                    select(ReleaseTarget.device_id, func.max(ReleaseTarget.sequence))
                    .where(ReleaseTarget.device_id.in_(ids[start : start + 500]))
                    .group_by(ReleaseTarget.device_id)
                )
                out.update((d, int(seq)) for d, seq in s.execute(q))
        return out


def check_unlocked(url: str, *, busy_timeout: float) -> None:
    """``StoreError`` if the database cannot be read within ``busy_timeout`` seconds (another
    process holds an exclusive lock on the SQLite file); for a command's start-up."""
    if not url.startswith("sqlite"):
        return
    engine = engine_for(url, busy_timeout=busy_timeout)
    try:
        with store_errors(engine, busy_timeout), engine.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master")
    finally:
        engine.dispose()
