"""A test-only plan of steps, for proving the operator's machinery without real backups.

Why this module exists: the Foundation's end-to-end tests must show, against the API emulator
and a real `kopf run`, that phases chain, progress is reported, a SIGKILL mid-phase resumes, a
fatal error lands as Failed, and deletion stops work — independently of S3, SSH and PostgreSQL.
The operator loads it through the same door as the real plan (`PGRECOVERY_PLAN_FACTORY`).

Each phase has two steps. A step "holds" when its marker file exists in the recovery's work
dir; applying it sleeps in small slices (reporting progress) and then writes the marker, so a
restarted operator skips finished steps and redoes only the interrupted one. Every apply start
is appended to `applies.log` so tests can see exactly what ran, and how often.

Behaviour is chosen by `spec.target.deployment` (a test knob only here):
- `fail-in-staging`: the first Staging step raises a fatal error.
- `slow-decrypt`: the second Decrypting step takes PGRECOVERY_TEST_SLOW_SECONDS (default 8 s).
- `slow-staging`: the second Staging step takes that long (a destructive phase in progress).
Step duration otherwise: PGRECOVERY_TEST_STEP_SECONDS (default 0.3 s).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from pgrecovery.engine.phases import WORKING_PHASES, Phase
from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import ClusterError


@dataclass(frozen=True)
class MarkerStep:
    name: str
    work_dir: Path
    seconds: float
    fail: bool = False

    @property
    def marker(self) -> Path:
        return self.work_dir / f"{self.name}.done"

    async def check(self, ctx: StepContext) -> bool:
        return self.marker.exists()

    async def apply(self, ctx: StepContext) -> None:
        with (self.work_dir / "applies.log").open("a") as log:
            log.write(f"{self.name}\n")
        if self.fail:
            raise ClusterError(f"{self.name}: injected failure for the test", reason="Injected")
        slices = max(1, int(self.seconds / 0.1))
        for index in range(slices):
            ctx.raise_if_cancelled()
            await asyncio.sleep(self.seconds / slices)
            await ctx.progress((index + 1) * 1024, slices * 1024, f"{self.name} slice {index + 1}")
        self.marker.write_text("done\n")


async def build_plan(inputs: PlanInputs) -> Plan:
    work_dir = Path(inputs.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    step_seconds = float(os.environ.get("PGRECOVERY_TEST_STEP_SECONDS", "0.3"))
    slow_seconds = float(os.environ.get("PGRECOVERY_TEST_SLOW_SECONDS", "8"))
    deployment = inputs.spec.target.deployment
    steps: dict[Phase, list[MarkerStep]] = {}
    for phase in WORKING_PHASES:
        first = f"{phase.value.lower()}-1"
        second = f"{phase.value.lower()}-2"
        fail_first = deployment == "fail-in-staging" and phase is Phase.STAGING
        slow_second = (deployment == "slow-decrypt" and phase is Phase.DECRYPTING) or (
            deployment == "slow-staging" and phase is Phase.STAGING
        )
        steps[phase] = [
            MarkerStep(first, work_dir, step_seconds, fail=fail_first),
            MarkerStep(second, work_dir, slow_seconds if slow_second else step_seconds),
        ]
    return Plan(steps=steps)
