"""The project's exceptions: one base class, a few subclasses.

Protocol errors carry the gRPC status code they map to (``status_name``); the servicer turns
them into ``context.abort`` through one table, the CLI turns every ``CrowdSFTError`` into a clean
message and an exit code. Library code never calls ``sys.exit``.
"""

from __future__ import annotations


class CrowdSFTError(Exception):
    """Base class of every error that Crowd-SFT raises on purpose."""

    exit_code = 1


class ConfigError(CrowdSFTError):
    """A configuration file or option is missing, malformed or inconsistent."""

    exit_code = 2


class KeyFileError(CrowdSFTError):
    """A key file cannot be created, read or decrypted."""

    exit_code = 2


class InputError(CrowdSFTError):
    """A user-supplied input file (examples, allowlist) is malformed."""

    exit_code = 2


class ProtocolError(CrowdSFTError):
    """A request broke the protocol; ``status_name`` is the gRPC status that answers it."""

    status_name = "INVALID_ARGUMENT"


class AuthenticationError(ProtocolError):
    """The envelope's signature or public key is not valid."""

    status_name = "UNAUTHENTICATED"


class InvalidPayloadError(ProtocolError):
    """The payload cannot be parsed, or a field is empty, too large or out of range."""

    status_name = "INVALID_ARGUMENT"


class ReplayError(ProtocolError):
    """The envelope is stale (timestamp outside the window) or reuses a nonce."""

    status_name = "FAILED_PRECONDITION"


class DuplicateContributionError(ProtocolError):
    """The same contribution was accepted before; ``receipt`` is the original signed receipt."""

    status_name = "ALREADY_EXISTS"

    def __init__(self, message: str, receipt: object) -> None:
        super().__init__(message)
        self.receipt = receipt


class RateLimitedError(ProtocolError):
    """The node sends faster than the coordinator's rate limit allows."""

    status_name = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotAdmittedError(ProtocolError):
    """The node is not admitted by the coordinator's admission policy."""

    status_name = "PERMISSION_DENIED"


class UnavailableError(ProtocolError):
    """The coordinator is shutting down or cannot take the request now; retry later."""

    status_name = "UNAVAILABLE"


class ReceiptError(CrowdSFTError):
    """A receipt from the coordinator does not verify or does not match what was sent."""


class CoordinatorError(CrowdSFTError):
    """A call to the coordinator failed for good (after retries, or with a final status)."""

    def __init__(self, message: str, status_name: str | None = None) -> None:
        super().__init__(message)
        self.status_name = status_name


class VerificationError(CrowdSFTError):
    """``node verify`` found a mismatch between the ledger and what it implies or holds."""


class UncheckedError(VerificationError):
    """``node verify`` found no mismatch but could not check everything (a reward rule from
    a plugin that is not installed here): exit code 4, apart from a mismatch's 1."""

    exit_code = 4


class DuplicateExampleError(ProtocolError):
    """An example of the contribution is already stored (from this node or another): the
    earlier submitter keeps the credit. ``ALREADY_EXISTS`` without a receipt (a duplicate
    contribution comes with its original receipt; this contribution has none)."""

    status_name = "ALREADY_EXISTS"


class StorageFullError(ProtocolError):
    """The coordinator's disk is full: nothing was stored; retry later (``RESOURCE_EXHAUSTED``
    with a retry hint, and the health service reports NOT_SERVING until writes succeed)."""

    status_name = "RESOURCE_EXHAUSTED"
    retry_after_s = 5.0
