"""The alert rules and the metrics exposition, checked by the real promtool.

A rule test that passes whatever the rule says proves nothing, so the suite also runs the same
tests against deliberately broken copies of the rules and requires promtool to fail them. The
failure alert is tested from an ABSENT series (`_ _ _ 1 1 1`): a counter first scraped already
at 1 has no `increase`, which is how the first failure of a reason after an operator start went
unalerted. Under CI (`CI` set) a missing promtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import ast
import concurrent.futures
import gc
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgrecovery import metrics
from pgrecovery.engine import status as st
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.errors import FAILURE_REASONS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "pgrecovery-operator" / "files" / "prometheus-rules.yaml"
RULE_TESTS = Path(__file__).parent / "data" / "prometheus-rules.test.yaml"
README = ROOT / "README.md"
RUNBOOK_BASE = "https://github.com/pgrecovery/pgrecovery/blob/main/README.md"
PROMTOOL = shutil.which("promtool") or ("promtool" if os.environ.get("CI") else None)

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
        # the rule as it was: blind to a series that first appears at 1
        (
            "\n          or (pgrecovery_failures_total > 0"
            " unless pgrecovery_failures_total offset 1h)",
            "",
        ),
        # a new series alerts only for a minute instead of the hour
        ("total offset 1h)", "total offset 1m)"),
        ("> 7200", "> 60"),  # slow threshold too eager
        # operator down on a single failed scrape
        (
            'up{job=~".*pgrecovery.*"} == 0\n        for: 5m',
            'up{job=~".*pgrecovery.*"} == 0\n        for: 1m',
        ),
        # a job name the chart's ServiceMonitor never gives
        ('absent(up{job=~".*pgrecovery.*"})', 'absent(up{job="pgrecovery"})'),
        ('absent(up{job=~".*pgrecovery.*"})', 'absent(up{job=~".*"})'),
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


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_url_to_its_readme_section() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    anchors = _github_anchors(README.read_text())
    assert len(rules) == 5
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"{RUNBOOK_BASE}#alert-{rule['alert'].lower()}", rule["alert"]
        assert url.split("#", 1)[1] in anchors, f"README has no section for {rule['alert']}"
    assert "failure-modes-what-the-status-says-what-to-do" in anchors


def test_every_failure_reason_is_exported_at_zero_from_the_start() -> None:
    """A fresh process (nothing failed yet) already has a 0 sample for every reason."""
    code = (
        "import sys; from pgrecovery import metrics; sys.stdout.buffer.write(metrics.exposition())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    text = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env
    ).stdout.decode()
    for reason in FAILURE_REASONS:
        assert f'pgrecovery_failures_total{{reason="{reason}"}} 0.0' in text, reason
    for result in ("succeeded", "failed", "dry_run"):
        assert f'pgrecovery_recoveries_total{{result="{result}"}} 0.0' in text, result


def _parse_all(files: list[Path]) -> list[ast.Module]:
    """ast.parse on a fresh thread, with the garbage collector off. CPython 3.11.7's AST
    conversion checks its recursion count against the thread's at entry; seen once after the e2e
    tests in one session: "SystemError: AST constructor recursion depth mismatch (before=126,
    after=146)". A new thread starts with a clean count and a shallow stack, and no collection
    can run finalizers (that session leaves unclosed loops and sockets) in the middle."""

    def parse() -> list[ast.Module]:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return [ast.parse(f.read_text()) for f in files]
        finally:
            if enabled:
                gc.enable()

    gc.collect()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(parse).result()


def _raised_reasons() -> set[str]:
    """Every reason an error of the tree can carry: class attributes of RecoveryError's
    subclasses anywhere in the package, and `reason=` given where one is constructed."""
    trees = _parse_all(sorted((ROOT / "operator" / "pgrecovery").rglob("*.py")))
    bases: dict[str, list[str]] = {}
    class_reason: dict[str, str] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
                for item in node.body:
                    if (isinstance(item, ast.Assign | ast.AnnAssign)
                            and isinstance(item.value, ast.Constant)
                            and any(isinstance(t, ast.Name) and t.id == "reason"
                                    for t in (item.targets if isinstance(item, ast.Assign)
                                              else [item.target]))):
                        class_reason[node.name] = str(item.value.value)
    errors = {"RecoveryError"}
    while True:
        more = {name for name, bs in bases.items() if set(bs) & errors} - errors
        if not more:
            break
        errors |= more
    reasons = {class_reason[name] for name in errors if name in class_reason}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in errors:
                    for kw in node.keywords:
                        if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                            reasons.add(str(kw.value.value))
    return reasons


def test_failure_reasons_cover_every_reason_raised_and_documented() -> None:
    raised = _raised_reasons()
    assert {"WrongKey", "RestoreTimeout", "ContainerNotFound", "TargetOutsideWindow"} <= raised
    assert raised - set(FAILURE_REASONS) == set(), "add these to errors.FAILURE_REASONS"
    readme = README.read_text()
    failure_modes = readme[readme.index("## Failure modes"):readme.index("## Performance")]
    documented = set(re.findall(r"^\| `(\w+)`(?: / `(\w+)`)?", failure_modes, re.M))
    flat = {word for pair in documented for word in pair if word}
    assert flat, "the failure tables moved"
    assert flat - set(FAILURE_REASONS) == set(), "documented reasons missing from FAILURE_REASONS"
