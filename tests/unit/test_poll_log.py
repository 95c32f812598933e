"""kopf's "failed temporarily" lines of our phase polls are DEBUG, everything else unchanged."""

from __future__ import annotations

import logging

import pytest

from pgrecovery.handlers.poll_log import PollLogFilter, install

pytestmark = pytest.mark.unit


def _record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, msg, (), None)


def test_a_phase_poll_becomes_debug() -> None:
    rec = _record("Handler 'phase-restoring/status.phase' failed temporarily: Restoring: "
                  "restore-dump 40%")
    assert PollLogFilter().filter(rec)
    assert rec.levelno == logging.DEBUG
    assert rec.levelname == "DEBUG"
    assert rec.getMessage() == ("Handler 'phase-restoring/status.phase' polls again in its "
                                "phase: Restoring: restore-dump 40%")


def test_a_poll_while_retrying_an_error_is_a_warning() -> None:
    rec = _record("Handler 'phase-fetching/status.phase' failed temporarily: pg/1 unreachable; "
                  "retry 2/5 in 8s")
    PollLogFilter().filter(rec)
    assert rec.levelno == logging.WARNING


@pytest.mark.parametrize("msg", [
    "Handler 'phase-fetching/status.phase' failed temporarily but will time out after 60 "
    "seconds: x",
    "Handler 'phase-fetching/status.phase' failed with an exception. Will retry.",
    "Handler 'cancel' failed temporarily: still running",
    "Handler 'phase-fetching-evil/status.phase' failed temporarily: x",
])
def test_other_errors_stay_errors(msg: str) -> None:
    rec = _record(msg)
    assert PollLogFilter().filter(rec)
    assert rec.levelno == logging.ERROR
    assert rec.getMessage() == msg


def test_install_is_idempotent_and_works_through_a_logger_adapter() -> None:
    name = "pgrecovery.test.kopf.objects"
    first, second = install(name), install(name)
    assert first is second
    logger = logging.getLogger(name)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep(level=logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        adapter = logging.LoggerAdapter(logger, {})
        adapter.error("Handler 'phase-staging/status.phase' failed temporarily: Staging: busy")
        adapter.error("something else broke")
    finally:
        logger.removeHandler(handler)
    # the poll line fell below the handler's INFO level; the real error came through
    assert [r.getMessage() for r in seen] == ["something else broke"]
