"""The step names of a recovery's plan, from the real plan factory (not a hand-kept copy).

Why this module exists: walks over a plan's steps (the operator kill walk, the failure walk)
must follow the plan as it is: a step added to a plan is walked too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import PlanInputs
from pgrecovery.engine.spec import SecretKeyRef, SecretRef, parse_spec
from pgrecovery.plans import build_plan

PHASES = (Phase.FETCHING, Phase.DECRYPTING, Phase.STAGING, Phase.RESTORING, Phase.REJOINED)

PlanSteps = tuple[tuple[str, tuple[str, ...]], ...]


class _NoSecrets:
    """Building a plan reads no secret (clients open lazily); a read here is a bug."""

    async def get_key(self, ref: SecretKeyRef) -> bytes:
        raise AssertionError(f"plan construction read secret {ref.name}")

    async def get_all(self, ref: SecretRef) -> Mapping[str, bytes]:
        raise AssertionError(f"plan construction read secret {ref.name}")


def plan_of(manifest: dict[str, Any], work_dir: Path) -> PlanSteps:
    """(phase, step names) in the order they run, for the recovery `manifest` describes."""
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace", "local")

    async def build() -> PlanSteps:
        inputs = PlanInputs(name, namespace, "walk", parse_spec(manifest["spec"]), _NoSecrets(),
                            str(work_dir))
        plan = await build_plan(inputs)
        try:
            return tuple(
                (phase.value, tuple(step.name for step in plan.for_phase(phase)))
                for phase in PHASES
            )
        finally:
            await plan.close()

    return asyncio.run(build())
