"""The one error hierarchy of pgrecovery.

Why this module exists: every layer must be able to say "try again later" or "stop, a person
has to act" without knowing who catches it. Adapters convert their library's exceptions
(botocore codes, Azure errors, asyncssh, psycopg SQLSTATEs) at the boundary into the most
specific class below; the engine and the handlers decide only on `retryable` and record
`reason` in status. Nothing above the adapters ever catches a library exception.

    RecoveryError                         base; .reason is a CamelCase machine word for status
    ├── RetryableError                    may succeed if the same step runs again later
    │   ├── StoreUnavailable              object store 5xx, throttling, connection reset
    │   ├── NodeUnreachable               SSH connect/timeout/reset (not auth, not host key)
    │   ├── RemoteCommandTimeout          a remote command exceeded its timeout
    │   └── NotReadyYet                   waiting on a state (monit "start pending", streaming)
    └── FatalError                        retrying cannot help; the recovery ends Failed
        ├── InvalidSpec                   the resource or recovery file is wrong (names a field)
        ├── ConfigurationError            operator settings or local files are wrong
        ├── SecretError                   a referenced secret is missing or malformed
        ├── BackupError                   anything about the backup itself
        │   ├── BackupNotFound            unknown GUID/id, empty bucket/container
        │   ├── BackupIncomplete          missing or truncated part, gap in part indexes
        │   ├── WrongKey                  the first block does not decrypt to gzip
        │   ├── BackupCorrupt             bad padding, gzip CRC/length mismatch, bad lzop
        │   └── StoreAccessDenied         credentials refused / forbidden
        ├── ClusterError                  anything about the target cluster
        │   ├── HostKeyMismatch           SSH host key not in known_hosts / changed
        │   ├── AuthenticationFailed      SSH key refused, sudo refused
        │   ├── PrimaryAmbiguous          zero or two primaries, repmgr disagrees with PG
        │   ├── InsufficientSpace         not enough room in /var/vcap/store on the primary
        │   ├── ClusterToolsMismatch      a helper, function, monit service or program the
        │   │                             destructive phases call is missing or undeterminable
        │   ├── DatabasesExist            the dump (no --clean) would be restored into databases
        │   │                             the target holds with objects
        │   ├── RemoteCommandFailed       a remote command exited non-zero unexpectedly
        │   ├── ChecksumMismatch          the staged dump on the VM differs from the stream
        │   ├── RestoreFailed             psql reported an error not on the expected list
        │   └── RestoreIncomplete         a restored table does not hold the rows the dump
        │                                 carries, on the primary or a standby (the proof)
        └── Cancelled                     the PgRecovery was deleted; stopped at a safe point

Messages are for people: they say what is wrong and what to do, and never contain a secret.
"""

from __future__ import annotations


class RecoveryError(Exception):
    """Base of every error pgrecovery raises on purpose."""

    retryable: bool = False
    reason: str = "RecoveryError"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


# ----------------------------------------------------------------- retryable


class RetryableError(RecoveryError):
    """The step may succeed if run again later; callers back off and retry."""

    retryable = True
    reason = "Retrying"

    def __init__(
        self, message: str, *, reason: str | None = None, delay: float | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay


class StoreUnavailable(RetryableError):
    reason = "StoreUnavailable"


class NodeUnreachable(RetryableError):
    reason = "NodeUnreachable"


class RemoteCommandTimeout(RetryableError):
    reason = "RemoteCommandTimeout"


class NotReadyYet(RetryableError):
    reason = "NotReadyYet"


# ----------------------------------------------------------------- fatal


class FatalError(RecoveryError):
    """Retrying cannot help: the recovery ends `Failed` with this reason."""

    reason = "Failed"


class InvalidSpec(FatalError):
    """The PgRecovery spec (or local recovery file) is invalid; `field` names the culprit."""

    reason = "InvalidSpec"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class ConfigurationError(FatalError):
    reason = "ConfigurationError"


class SecretError(FatalError):
    reason = "SecretError"


class BackupError(FatalError):
    reason = "BackupError"


class BackupNotFound(BackupError):
    reason = "BackupNotFound"


class BackupIncomplete(BackupError):
    reason = "BackupIncomplete"


class WrongKey(BackupError):
    reason = "WrongKey"


class BackupCorrupt(BackupError):
    reason = "BackupCorrupt"


class StoreAccessDenied(BackupError):
    reason = "StoreAccessDenied"


class ClusterError(FatalError):
    reason = "ClusterError"


class HostKeyMismatch(ClusterError):
    reason = "HostKeyMismatch"


class AuthenticationFailed(ClusterError):
    reason = "AuthenticationFailed"


class PrimaryAmbiguous(ClusterError):
    reason = "PrimaryAmbiguous"


class InsufficientSpace(ClusterError):
    reason = "InsufficientSpace"


class ClusterToolsMismatch(ClusterError):
    """Found in Fetching, before anything changed: the job's helpers, monit services or
    programs differ from what the destructive phases will call (node, path, function named)."""

    reason = "ClusterToolsMismatch"


class DatabasesExist(ClusterError):
    """Found in Decrypting, before anything changed: the dump does not drop databases that the
    target already holds with objects (`cluster.existing_databases`; the databases named)."""

    reason = "DatabasesExist"


class RemoteCommandFailed(ClusterError):
    reason = "RemoteCommandFailed"

    def __init__(self, message: str, *, exit_status: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr = stderr


class ChecksumMismatch(ClusterError):
    reason = "ChecksumMismatch"


class RestoreFailed(ClusterError):
    reason = "RestoreFailed"


class RestoreIncomplete(ClusterError):
    reason = "RestoreIncomplete"


class Cancelled(FatalError):
    reason = "Cancelled"


# Every word that can end up in `status.failureReason` (and so in the `reason` label of
# `pgrecovery_failures_total`): the classes' reasons above and in backups/wale, the reasons
# given by keyword where an error is raised, and `InternalError` (an unexpected exception).
# The operator exports each at 0 from its start so an alert on `increase(...)` sees the first
# failure of a reason; tests/unit/test_alert_rules.py fails when a reason is missing here.
FAILURE_REASONS: tuple[str, ...] = (
    # the tree above
    "RecoveryError", "Retrying", "StoreUnavailable", "NodeUnreachable", "RemoteCommandTimeout",
    "NotReadyYet", "Failed", "InvalidSpec", "ConfigurationError", "SecretError", "BackupError",
    "BackupNotFound", "BackupIncomplete", "WrongKey", "BackupCorrupt", "StoreAccessDenied",
    "ClusterError", "HostKeyMismatch", "AuthenticationFailed", "PrimaryAmbiguous",
    "InsufficientSpace", "RemoteCommandFailed", "ChecksumMismatch", "RestoreFailed", "Cancelled",
    "ClusterToolsMismatch", "RestoreIncomplete",
    # WAL-E / point in time
    "TargetOutsideWindow", "SystemIdMismatch",
    # found in Decrypting: the dump would be restored into databases that hold objects
    "DatabasesExist",
    # given by keyword where raised
    "InternalError", "RestoreTimeout", "StepNotEffective",
    # the BOSH director (target.bosh): adapters/bosh_director.py, plans/bosh_access.py
    "DirectorAuthenticationFailed", "DirectorForbidden", "DirectorNotFound", "DirectorTaskFailed",
    "DirectorCertificateUntrusted", "DirectorUnreachable", "DirectorRequestFailed",
    "InstanceChanged", "InstanceNotRunning", "GatewayUnreachable",
    # Dingo targets
    "ContainerNotFound", "ContainerMismatch", "ContainerAmbiguous", "ContainerReplaced",
    "NoDataVolume", "EtcdUnknown", "ArchiveMismatch", "ArchiveNotEmpty", "UnsafeDataDir",
)
