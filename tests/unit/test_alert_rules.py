"""The alert rules and the metrics exposition, checked by the real promtool.

A rule test that passes whatever the rule says proves nothing, so the suite also runs the same
tests against deliberately broken copies of the rules and requires promtool to fail them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pgrecovery import metrics
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.status import RecoveryStatus

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "pgrecovery-operator" / "files" / "prometheus-rules.yaml"
RULE_TESTS = Path(__file__).parent / "data" / "prometheus-rules.test.yaml"
PROMTOOL = shutil.which("promtool")

requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: apt-get install prometheus (see .ci/setup)"
)


def _run_rule_tests(tmp_path: Path, rules_text: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "rules.yaml").write_text(rules_text)
    shutil.copy(RULE_TESTS, tmp_path / "tests.yaml")
    return subprocess.run(
        [str(PROMTOOL), "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )


@requires_promtool
def test_rules_are_valid() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_rule_unit_tests_pass(tmp_path: Path) -> None:
    result = _run_rule_tests(tmp_path, RULES.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@requires_promtool
@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("> 900", "> 90000"),  # stalled threshold too lax: never fires
        (
            "and on (recovery) pgrecovery_recovery_in_progress == 1\n        for: 1m",
            "\n        for: 1m",
        ),  # stalled without the in-progress guard: fires for done ones
        (
            "increase(pgrecovery_failures_total[1h]) > 0",
            "increase(pgrecovery_failures_total[1h]) > 5",
        ),
        ("> 7200", "> 60"),  # slow threshold too eager
    ],
)
def test_rule_unit_tests_fail_when_a_rule_is_wrong(
    tmp_path: Path, original: str, broken: str
) -> None:
    text = RULES.read_text()
    assert original in text
    result = _run_rule_tests(tmp_path, text.replace(original, broken, 1))
    assert result.returncode != 0, "promtool accepted a broken rule:\n" + result.stdout


@requires_promtool
def test_metrics_exposition_passes_promtool_check_metrics() -> None:
    now = st.now_utc()
    status = st.record_progress(st.accept(RecoveryStatus(), {}, 1, now), 10, 100, now, "parts 1/12")
    metrics.record_progress("ns/promtool", status)
    metrics.record_phase_duration("Fetching", 12.5)
    metrics.record_bytes("fetched", 1024)
    metrics.record_step_event("Fetching", "StepStarted")
    metrics.record_result("ns/promtool-failed", "failed", "WrongKey")
    text = metrics.exposition()
    for name in (
        "pgrecovery_recoveries_total",
        "pgrecovery_failures_total",
        "pgrecovery_recoveries_in_progress",
        "pgrecovery_phase_duration_seconds",
        "pgrecovery_bytes_total",
        "pgrecovery_last_progress_timestamp_seconds",
        "pgrecovery_recovery_in_progress",
    ):
        assert name.encode() in text, name
    result = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert status.phase is Phase.FETCHING
    metrics.forget("ns/promtool")
