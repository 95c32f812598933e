"""Keep kopf's "failed temporarily" lines for our polls out of the operator's ERROR log.

Why this module exists: each phase handler asks kopf to call it again while the phase works
(it raises `kopf.TemporaryError` with a delay — the poll pattern). kopf logs every such raise
at ERROR as "Handler 'phase-restoring/status.phase' failed temporarily: …", so a healthy hours-long
restore filled the log with errors and tripped log-based alerting. This filter rewrites exactly
those lines of OUR phase handlers to DEBUG "polls again in its phase: …"; kopf's other errors
(including "failed temporarily but will time out/exceed retries", and any other handler's
temporary errors) are left as they are.
"""

from __future__ import annotations

import logging
import re

# kopf 1.x: f"{handler} failed temporarily: {reason}"; our phase handlers' ids are
# `phase-<phase>` (handlers/recovery.py), printed with kopf's field suffix.
_POLL_LINE = re.compile(
    r"^(?P<handler>Handler 'phase-(?:pending|fetching|decrypting|staging|restoring|rejoined)"
    r"/status\.phase') failed temporarily: (?P<reason>.*)\Z",
    re.DOTALL,
)


# The engine's status message while it backs off from a retryable error ("…; retry 2/5 in
# 8s"): worth a WARNING, unlike a plain poll.
_RETRYING = re.compile(r"; retry \d+/\d+ in ")


class PollLogFilter(logging.Filter):
    """Downgrades our phase handlers' poll lines (DEBUG; WARNING while retrying an error);
    passes every record on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        match = _POLL_LINE.match(record.getMessage())
        if match is not None:
            level = logging.WARNING if _RETRYING.search(match["reason"]) else logging.DEBUG
            record.msg = f"{match['handler']} polls again in its phase: {match['reason']}"
            record.args = ()
            record.levelno, record.levelname = level, logging.getLevelName(level)
        return True


def install(logger_name: str = "kopf.objects") -> PollLogFilter:
    """Attach the filter to kopf's per-object logger (idempotent)."""
    logger = logging.getLogger(logger_name)
    for existing in logger.filters:
        if isinstance(existing, PollLogFilter):
            return existing
    found = PollLogFilter()
    logger.addFilter(found)
    return found
