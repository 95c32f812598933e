"""The operator's entry point: `kopf run -m pgrecovery.main`.

Why this module exists: it registers the handlers (by importing them), validates settings once
at startup, builds the process-wide runtime, serves metrics, and sets kopf's settings
deliberately — each with the reason it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from pgrecovery import metrics
from pgrecovery.handlers import (
    poll_log,
    recovery,  # noqa: F401 - importing registers the handlers
)
from pgrecovery.handlers.runtime import build_runtime
from pgrecovery.liveness import Liveness
from pgrecovery.settings import load_settings

log = logging.getLogger(__name__)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = load_settings()  # ConfigurationError here stops the operator with a clear message

    # Our own finalizer and annotation prefix: the resource belongs to pgrecovery, and kopf's
    # defaults (kopf.zalando.org) would clash with any other kopf operator on the same objects.
    settings.persistence.finalizer = "pgrecovery.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pgrecovery.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pgrecovery.dev", key="last-handled-configuration"
    )
    # Each running recovery holds SSH connections and a download pipeline; bound how many
    # objects are worked on at once so a burst of GitOps commits cannot exhaust the pod.
    settings.queueing.worker_limit = ours.worker_limit
    # Step events are posted explicitly (one per step start/finish/failure); kopf's own log
    # lines ("handler failed temporarily" on every poll) must not become Events.
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # ... and in the log they are DEBUG, not ERROR (handlers/poll_log.py).
    poll_log.install()
    # Re-establish watches regularly: a silently dead watch connection would freeze the
    # phase chain (the next phase is triggered by a watch event of our own status patch).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # After patching status.phase, kopf waits for its own change to come back through the
    # watch before handling the object again, so the next phase never acts on a stale body.
    settings.persistence.consistency_timeout = 5.0

    # SDK debug logs carry request headers and signed URLs; even with `kopf run --verbose`
    # they stay at WARNING so nothing credential-like reaches the operator's log.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "azure", "asyncssh", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    runtime = build_runtime(ours)
    memo["runtime"] = runtime
    # /healthz fails when the event loop is blocked or the watch no longer brings the running
    # recoveries' polls (pgrecovery/liveness.py); the chart's livenessProbe restarts the pod.
    liveness = Liveness(runtime.supervisor.overdue)
    memo["liveness_task"] = asyncio.create_task(liveness.run(), name="pgrecovery:liveness")
    if ours.metrics_port:
        memo["metrics_server"] = metrics.serve(ours.metrics_port, healthy=liveness.verdict)
    log.info("pgrecovery operator configured (work dir %s)", ours.work_dir)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    beating = memo.get("liveness_task")
    if beating is not None:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    runtime = memo.get("runtime")
    if runtime is not None:
        await runtime.close()
    server = memo.get("metrics_server")
    if server is not None:
        server.shutdown()
        server.server_close()
