"""The one error tree of EdgeFleet, rooted by who is at fault.

    EdgeFleetError
    ├── BundleError            untrusted input that failed verification: the sender is at fault.
    │   ├── MalformedError         not the expected shape (bad JSON, bad field, bad framing)
    │   │   └── DecodeError            a protocol message could not be decoded
    │   ├── TooLargeError          a size cap was exceeded before anything was parsed
    │   ├── SignatureError         signature does not verify over the bytes as received
    │   ├── UntrustedSignerError   signer is not in the keyring, or its key is revoked/expired
    │   ├── KeyringError           the keyring itself is invalid, expired or older than trusted
    │   ├── RollbackError          release sequence not strictly above the last accepted one
    │   ├── ExpiredError           manifest past its expiry (after the offline grace)
    │   ├── NotForMeError          this device is not a target / has no envelope
    │   ├── IntegrityError         a hash over received bytes does not match the manifest
    │   ├── DecryptError           envelope or segment failed to decrypt/authenticate
    │   ├── ModelLoadError         the decrypted model does not load in its runtime
    │   └── SmokeTestError         model loaded but did not reproduce the signed test vectors
    ├── TransportError         the broker or the network failed us: not the sender's fault
    ├── StoreError             local state on disk cannot be read or written (I/O failure)
    │   └── CorruptStateError      a file we wrote reads back wrong, or trusted state on disk
    │                              no longer verifies against the pinned root
    └── ConfigError            the operator's own setup is wrong; only the operator can fix it
        └── KeyExpiredError        the coordinator's own keyring or release key has expired

Who acts on each root: a ``BundleError`` is dropped and reported (the device stays on its last
good model); a ``TransportError`` is retried; a ``StoreError`` needs the disk looked at (free
space, permissions, a damaged file); a ``ConfigError`` needs the operator to change something
(rotate a key, fix a setting) and is never the fault of anything received. That is why the
coordinator's own expired keyring is a ``KeyExpiredError`` and not a ``KeyringError``: the same
fact about a keyring *received* by a device is the sender's fault, about the coordinator's
*own* keyring it is the operator's to fix. Outside this module, ``edgefleet.agent.store``
defines ``StoreBusyError(StoreError)``: another process holds the store's write lock.

Wrong arguments raise ``ValueError``/``TypeError``; wrong call order raises ``RuntimeError``.
Every message says what was expected and what was seen. Foreign exceptions are mapped at
the adapter edge with ``raise ... from exc``; ``OSError`` at one edge,
``edgefleet.infra.fsutil.os_errors``.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "CorruptStateError",
    "DecodeError",
    "DecryptError",
    "EdgeFleetError",
    "ExpiredError",
    "IntegrityError",
    "KeyExpiredError",
    "KeyringError",
    "MalformedError",
    "ModelLoadError",
    "NotForMeError",
    "RollbackError",
    "SignatureError",
    "SmokeTestError",
    "StoreError",
    "TooLargeError",
    "TransportError",
    "UntrustedSignerError",
]


class EdgeFleetError(Exception):
    """Root of every error EdgeFleet raises on purpose."""

    #: short, stable, machine-readable reason reported to the coordinator
    code = "error"


class BundleError(EdgeFleetError):
    """Untrusted input failed verification; the device stays on its last good model."""

    code = "bundle"


class MalformedError(BundleError):
    code = "malformed"


class DecodeError(MalformedError):
    """A protocol message could not be decoded into its dataclass."""

    code = "decode"


class TooLargeError(BundleError):
    code = "too_large"


class SignatureError(BundleError):
    code = "signature"


class UntrustedSignerError(BundleError):
    code = "untrusted_signer"


class KeyringError(BundleError):
    code = "keyring"


class RollbackError(BundleError):
    code = "rollback"


class ExpiredError(BundleError):
    code = "expired"


class NotForMeError(BundleError):
    code = "not_for_me"


class IntegrityError(BundleError):
    code = "integrity"


class DecryptError(BundleError):
    code = "decrypt"


class ModelLoadError(BundleError):
    code = "model_load"


class SmokeTestError(BundleError):
    code = "smoke_test"


class TransportError(EdgeFleetError):
    """The broker or network failed; retrying later may help."""

    code = "transport"


class StoreError(EdgeFleetError):
    """Local state on disk cannot be read or written (I/O failure, corrupt state)."""

    code = "store"


class CorruptStateError(StoreError):
    """A file of ours reads back wrong, or stored trusted state fails re-verification."""

    code = "corrupt_state"


class ConfigError(EdgeFleetError):
    """The operator's own setup is wrong (not the sender's, not the network's fault)."""

    code = "config"


class KeyExpiredError(ConfigError):
    """The coordinator's own keyring or release key has expired: rotate it."""

    code = "key_expired"
