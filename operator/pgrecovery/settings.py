"""Operator settings, read from the environment and validated once at startup.

Why this module exists: a bad setting (an unwritable work directory, a plan factory that does
not import, a nonsensical interval) must stop the operator at startup with a clear message, not
fail the first recovery an hour later. Every field says why it exists and what its default
means; the environment prefix is `PGRECOVERY_` (e.g. `PGRECOVERY_WORK_DIR`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgrecovery.errors import ConfigurationError


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PGRECOVERY_", extra="ignore", frozen=True)

    work_dir: Path = Field(
        default=Path("/var/lib/pgrecovery"),
        description="Where downloaded backup parts are kept (per recovery, resumable). Mount a "
        "volume with room for the largest backup here.",
    )
    plan_factory: str = Field(
        default="pgrecovery.plans:build_plan",
        description="`module:function` that builds the steps of a recovery. Only tests change "
        "this (to a test-only plan); production uses the default.",
    )
    poll_interval: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="Seconds between status patches while a phase runs. Progress must be "
        "visible at least every few seconds; smaller values load the API server more.",
    )
    stall_after: float = Field(
        default=900.0,
        gt=0,
        description="Seconds without progress after which the Stalled condition turns True "
        "(the alert rule uses the same 15 minutes).",
    )
    gate_recheck: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between re-checks while blocked (awaiting spec.confirm, or another "
        "recovery holding the same deployment).",
    )
    retry_limit: int = Field(
        default=8,
        ge=0,
        description="Retryable failures (store 5xx, unreachable node) tolerated per phase before "
        "the recovery fails; the wait doubles each time from retry_base_delay.",
    )
    retry_base_delay: float = Field(default=5.0, gt=0, description="First retry delay, seconds.")
    retry_max_delay: float = Field(default=300.0, gt=0, description="Cap of the retry delay.")
    cancel_grace: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a deletion waits for running work to reach a safe point before the "
        "finalizer is released anyway (the status then says the work was abandoned).",
    )
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of /metrics and /healthz; 0 disables."
    )
    worker_limit: int = Field(
        default=20,
        ge=1,
        description="Max concurrent PgRecovery objects handled at once (kopf worker limit). "
        "Each running recovery holds SSH connections and a download pipeline.",
    )

    lease_duration: float = Field(
        default=30.0,
        ge=3,
        le=600,
        description="Seconds of the executor Lease each recovery has (one replica runs it). "
        "Renewed every third of it; another replica takes over a recovery only after its Lease "
        "went unrenewed this long, so this is also the fail-over delay after a replica dies.",
    )
    executor_id: str = Field(
        default="",
        description="This replica's name in the executor Leases. Empty: the POD_ID variable "
        "(the pod name in the chart), else the host name. Must differ between replicas and stay "
        "the same across restarts of one (a restarted replica then renews its own Leases).",
    )
    breakpoint_dir: Path | None = Field(
        default=None,
        description="Tests only: a directory of breakpoint files (`engine.breakpoints`) that "
        "stop a phase before a named step until released. Unset in production (no effect).",
    )

    @field_validator("plan_factory")
    @classmethod
    def _looks_like_import_path(cls, value: str) -> str:
        if ":" not in value:
            raise ValueError("must look like 'package.module:function'")
        return value


def load_settings(*, check_work_dir: bool = True) -> OperatorSettings:
    """Read and validate settings; raise ConfigurationError with every problem found."""
    try:
        settings = OperatorSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"PGRECOVERY_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid operator settings: {problems}") from None
    if check_work_dir:
        try:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"PGRECOVERY_WORK_DIR {settings.work_dir} cannot be created: {exc.strerror}"
            ) from None
        if not os.access(settings.work_dir, os.W_OK):
            raise ConfigurationError(f"PGRECOVERY_WORK_DIR {settings.work_dir} is not writable")
    return settings


def executor_identity(settings: OperatorSettings) -> str:
    """`executor_id`, or the pod name, or the host name."""
    return settings.executor_id or os.environ.get("POD_ID") or socket.gethostname()

