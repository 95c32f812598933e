"""Every Prometheus object of pgrecovery, and the small helpers that record into them.

Why this module exists: metric names, labels and help texts are a public contract (alert rules,
the Grafana dashboard, and tests read them); keeping them in one module with record helpers
means no other module imports prometheus_client or invents a name. Labels are bounded: phase
names, result words, failure reasons (a fixed CamelCase set from errors.py) and the recovery's
`namespace/name` — never a backup id or node address, never a secret.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pgrecovery.errors import FAILURE_REASONS

if TYPE_CHECKING:
    from pgrecovery.engine.status import RecoveryStatus

REGISTRY = CollectorRegistry(auto_describe=True)

RECOVERIES = Counter(
    "pgrecovery_recoveries_total",
    "Recoveries that ended, by result (succeeded, failed, dry_run).",
    ["result"],
    registry=REGISTRY,
)
FAILURES = Counter(
    "pgrecovery_failures_total",
    "Recoveries that failed, by failure reason (status.failureReason).",
    ["reason"],
    registry=REGISTRY,
)
IN_PROGRESS = Gauge(
    "pgrecovery_recoveries_in_progress",
    "Recoveries currently in a working phase, by phase.",
    ["phase"],
    registry=REGISTRY,
)
PHASE_DURATION = Histogram(
    "pgrecovery_phase_duration_seconds",
    "Time spent in each phase of a recovery.",
    ["phase"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
    registry=REGISTRY,
)
BYTES = Counter(
    "pgrecovery_bytes_total",
    "Bytes moved by stage: fetched (from the object store), decrypted (plain dump bytes), "
    "uploaded (to the primary), copied (server-side, a Dingo archive clone).",
    ["stage"],
    registry=REGISTRY,
)
LAST_PROGRESS = Gauge(
    "pgrecovery_last_progress_timestamp_seconds",
    "Unix time of the last progress a recovery reported (stalled when old).",
    ["recovery"],
    registry=REGISTRY,
)
PHASE_INFO = Gauge(
    "pgrecovery_recovery_phase",
    "1 for the phase a recovery is in now (0 for the others it was in).",
    ["recovery", "phase"],
    registry=REGISTRY,
)
PROGRESS_PERCENT = Gauge(
    "pgrecovery_recovery_progress_percent",
    "Percent done of the current phase's long work, when known.",
    ["recovery"],
    registry=REGISTRY,
)
RECOVERY_ACTIVE = Gauge(
    "pgrecovery_recovery_in_progress",
    "1 while a recovery is in a working phase, 0 once it succeeded, failed or was blocked "
    "by a completed dry run.",
    ["recovery"],
    registry=REGISTRY,
)
RECOVERY_STARTED = Gauge(
    "pgrecovery_recovery_started_timestamp_seconds",
    "Unix time a recovery was accepted (for 'slower than expected' alerts).",
    ["recovery"],
    registry=REGISTRY,
)
RESTORED_ROWS = Counter(
    "pgrecovery_restored_rows_total",
    "Rows of restored tables proven (counted on the primary and every standby against the "
    "dump) by recoveries that succeeded.",
    registry=REGISTRY,
)
STEP_EVENTS = Counter(
    "pgrecovery_step_events_total",
    "Step transitions (StepStarted, StepFinished, StepSkipped, StepFailed) by phase.",
    ["phase", "event"],
    registry=REGISTRY,
)

_WORKING = ("Fetching", "Decrypting", "Staging", "Restoring", "Rejoined")
RESULTS = ("succeeded", "failed", "dry_run")

# Every result and failure reason is exported at 0 from the start: a counter series that first
# appears already at 1 has no increase to alert on (`increase()` needs two samples), so the
# first failure of a reason after an operator start would not fire PgRecoveryFailed.
for _result in RESULTS:
    RECOVERIES.labels(result=_result)
for _reason in FAILURE_REASONS:
    FAILURES.labels(reason=_reason)
_lock = threading.Lock()
_phase_of: dict[str, str] = {}


def _refresh_in_progress() -> None:
    counts = dict.fromkeys(_WORKING, 0)
    for phase in _phase_of.values():
        if phase in counts:
            counts[phase] += 1
    for phase, count in counts.items():
        IN_PROGRESS.labels(phase=phase).set(count)


def record_progress(recovery: str, status: RecoveryStatus) -> None:
    with _lock:
        if status.finished:
            _phase_of.pop(recovery, None)
        else:
            _phase_of[recovery] = status.phase.value
        _refresh_in_progress()
    for phase in (*_WORKING, "Failed"):
        PHASE_INFO.labels(recovery=recovery, phase=phase).set(
            1 if phase == status.phase.value else 0
        )
    RECOVERY_ACTIVE.labels(recovery=recovery).set(0 if status.finished else 1)
    if status.started_at is not None:
        RECOVERY_STARTED.labels(recovery=recovery).set(status.started_at.timestamp())
    if status.progress.last_progress_at is not None:
        LAST_PROGRESS.labels(recovery=recovery).set(status.progress.last_progress_at.timestamp())
    if status.progress.percent is not None:
        PROGRESS_PERCENT.labels(recovery=recovery).set(status.progress.percent)


def record_phase_duration(phase: str, seconds: float) -> None:
    PHASE_DURATION.labels(phase=phase).observe(seconds)


def record_result(recovery: str, result: str, reason: str | None) -> None:
    RECOVERIES.labels(result=result).inc()
    RECOVERY_ACTIVE.labels(recovery=recovery).set(0)
    if reason:
        FAILURES.labels(reason=reason).inc()
    with _lock:
        _phase_of.pop(recovery, None)
        _refresh_in_progress()


def record_restored_rows(count: int) -> None:
    RESTORED_ROWS.inc(count)


def record_bytes(stage: str, count: int) -> None:
    BYTES.labels(stage=stage).inc(count)


def record_step_event(phase: str, event: str) -> None:
    STEP_EVENTS.labels(phase=phase, event=event).inc()


def forget(recovery: str) -> None:
    """Drop the per-recovery series of a deleted PgRecovery (bounded cardinality)."""
    with _lock:
        _phase_of.pop(recovery, None)
        _refresh_in_progress()
    for gauge in (LAST_PROGRESS, PROGRESS_PERCENT, RECOVERY_ACTIVE, RECOVERY_STARTED):
        with contextlib.suppress(KeyError):
            gauge.remove(recovery)
    for phase in (*_WORKING, "Failed"):
        with contextlib.suppress(KeyError):
            PHASE_INFO.remove(recovery, phase)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def serve(port: int, healthy: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on `port` in a daemon thread; returns the server to close.

    `healthy` gives /healthz its verdict and reason (pgrecovery.liveness); it is called on the
    server's thread, so it must not need the event loop — a blocked loop is what it reports."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                body, code, ctype = exposition(), 200, CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] == "/healthz":
                ok, why = healthy()
                body = why.encode() + b"\n"
                code, ctype = (200 if ok else 503), "text/plain"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would flood the log

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104 - scraped in-cluster
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
