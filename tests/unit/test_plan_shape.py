"""The three plans' step lists, built by the real plan factory: the Staging and Rejoined steps
every a9s-pg plan shares come from one list (`plans/a9s_cluster.py`), so a step added there is
in the logical and the WAL-E plan at once, in the same place relative to the others.

Why this test exists: a Rejoined step added to one plan once silently missed the other (issue
17); the lists were written twice.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgrecovery.cluster.nodes import A9sLayout
from pgrecovery.engine.plan import PlanInputs
from pgrecovery.engine.spec import parse_spec
from pgrecovery.engine.steps import checks_itself
from pgrecovery.plans import build_plan
from pgrecovery.plans.a9s_cluster import (
    A9sPgCluster,
    rejoined_steps,
    staging_steps,
)
from tests.plan_steps import PHASES, plan_of

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = {
    "a9sLogical": "pgrecovery-s3.yaml",
    "a9sLogical+bosh": "pgrecovery-bosh.yaml",
    "walE": "pgrecovery-wale-pitr.yaml",
    "walE+bosh": "pgrecovery-wale-pitr.yaml",
    "dingo": "pgrecovery-dingo.yaml",
}
A9S_PG_PLANS = ("a9sLogical", "a9sLogical+bosh", "walE", "walE+bosh")


def _manifest(name: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "manifests/samples" / SAMPLES[name]).read_text())
    doc: dict[str, Any] = next(d for d in docs if d and d.get("kind") == "PgRecovery")
    if name == "walE+bosh":  # the WAL-E sample with the bosh sample's target
        bosh = _manifest("a9sLogical+bosh")["spec"]["target"]["bosh"]
        target = doc["spec"]["target"]
        target.pop("nodes")
        target.pop("ssh")
        target["bosh"] = bosh
    return doc


def _steps(name: str, tmp_path: Path) -> dict[str, tuple[str, ...]]:
    return dict(plan_of(_manifest(name), tmp_path))


def _shared() -> tuple[list[str], list[str], list[str]]:
    """The shared lists' names: Staging with and without the slot drop, Rejoined."""
    doc = _manifest("a9sLogical")
    cluster = A9sPgCluster(
        inputs=PlanInputs("r", "ns", "u", parse_spec(doc["spec"]), None, "/nonexistent"),  # type: ignore[arg-type]
        layout=A9sLayout(), nodes=())
    return ([s.name for s in staging_steps(cluster, drop_inactive_slots=True)],
            [s.name for s in staging_steps(cluster, drop_inactive_slots=False)],
            [s.name for s in rejoined_steps(cluster, before_unblock=[])])


def _state_words(name: str, tmp_path: Path) -> dict[str, str]:
    async def build() -> dict[str, str]:
        doc = _manifest(name)
        plan = await build_plan(PlanInputs("r", "ns", "u", parse_spec(doc["spec"]), None,  # type: ignore[arg-type]
                                           str(tmp_path)))
        try:
            return dict(plan.state_words)
        finally:
            await plan.close()

    return asyncio.run(build())


def _is_subsequence(part: list[str], whole: tuple[str, ...]) -> bool:
    it = iter(whole)
    return all(name in it for name in part)


@pytest.mark.parametrize("name", A9S_PG_PLANS)
def test_a9s_pg_plans_run_the_shared_staging_and_rejoined_lists(
    name: str, tmp_path: Path
) -> None:
    with_slots, without_slots, rejoined = _shared()
    steps = _steps(name, tmp_path)
    assert list(steps["Staging"]) == (without_slots if name.startswith("walE") else with_slots)
    # Every shared Rejoined step, in the shared order; the plan's own re-clone and checks sit
    # between them; the cleanup is last.
    assert _is_subsequence(rejoined, steps["Rejoined"]), (rejoined, steps["Rejoined"])
    assert steps["Rejoined"][-2:] == ("ensure-connections-unblocked",
                                      "ensure-recovery-files-removed")
    assert steps["Rejoined"][:4] == tuple(rejoined[:4])
    # A failure after the point of no return says what each destructive step did.
    words = _state_words(name, tmp_path)
    for phase in ("Staging", "Restoring", "Rejoined"):
        for step in steps[phase]:
            assert step in words, f"{name}: {phase}/{step} has no state words"


def test_the_plans_differ_only_where_they_restore(tmp_path: Path) -> None:
    logical, wale = _steps("a9sLogical", tmp_path / "l"), _steps("walE", tmp_path / "w")
    assert set(logical["Rejoined"]) - set(wale["Rejoined"]) == {
        "prove-restore-on-standbys", "ensure-staging-file-removed"}
    assert set(wale["Rejoined"]) - set(logical["Rejoined"]) == {"ensure-leftovers-removed"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_plan_builds_with_unique_kebab_case_step_names(name: str, tmp_path: Path) -> None:
    steps = _steps(name, tmp_path)
    names = [step for phase in steps.values() for step in phase]
    assert len(names) == len(set(names)), names
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names), names
    assert steps["Restoring"], steps
    assert steps["Rejoined"], steps


def _plan_steps(name: str, tmp_path: Path) -> dict[str, Any]:
    async def build() -> dict[str, Any]:
        doc = _manifest(name)
        plan = await build_plan(PlanInputs("r", "ns", "u", parse_spec(doc["spec"]), None,  # type: ignore[arg-type]
                                           str(tmp_path)))
        try:
            return {step.name: step for phase in PHASES for step in plan.for_phase(phase)}
        finally:
            await plan.close()

    return asyncio.run(build())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_step_has_a_real_check_or_says_its_operation_checks_itself(
    name: str, tmp_path: Path
) -> None:
    """One idempotency protocol: a step's check is the real check, or the step is of the
    named kind `self_checking` (its operation checks itself, or it is a read-only check that
    runs every time) — never a check that is only a stand-in."""
    steps = _plan_steps(name, tmp_path)
    for step in steps.values():
        if checks_itself(step):
            assert step.verify_after is False, step.name
        else:
            assert step.check_fn.__name__ not in {"never", "_never"}, step.name
    if name in A9S_PG_PLANS:
        # (the Rejoined ones check "the cleanup has begun" before that: `_unless_cleaning`)
        assert checks_itself(steps["ensure-standbys-stopped"])
        assert checks_itself(steps["probe-cluster"])
    kinds = [checks_itself(s) for s in steps.values()]
    assert any(kinds), name
    assert not all(kinds), name
