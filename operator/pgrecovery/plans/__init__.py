"""Concrete recovery plans (which steps each phase has), chosen by source and target type.

Why this package exists: the engine's phase machine is generic; the plans bind it to the
backups and cluster layers. `build_plan` is the operator's default plan factory
(`PGRECOVERY_PLAN_FACTORY`).
"""

from __future__ import annotations

from pgrecovery.engine.plan import Plan, PlanInputs
from pgrecovery.engine.spec import SourceType, TargetType
from pgrecovery.errors import InvalidSpec


async def build_plan(inputs: PlanInputs) -> Plan:
    """The plan for `inputs.spec`; unsupported combinations fail with InvalidSpec."""
    source, target = inputs.spec.source.type, inputs.spec.target.type
    if source is SourceType.A9S_LOGICAL and target is TargetType.A9S_PG:
        from pgrecovery.plans.a9s_logical import (  # noqa: PLC0415 - SDKs load lazily
            build_a9s_logical_plan,
        )

        return await build_a9s_logical_plan(inputs)
    if source is SourceType.WAL_E and target is TargetType.A9S_PG:
        from pgrecovery.plans.wale_physical import (  # noqa: PLC0415 - SDKs load lazily
            build_wale_physical_plan,
        )

        return await build_wale_physical_plan(inputs)
    if source is SourceType.WAL_E and target is TargetType.DINGO:
        from pgrecovery.plans.dingo import (  # noqa: PLC0415 - SDKs load lazily
            build_dingo_plan,
        )

        return await build_dingo_plan(inputs)
    raise InvalidSpec(
        f"recovery of source type {inputs.spec.source.type.value} onto target type "
        f"{inputs.spec.target.type.value} is not implemented in this version",
        field="spec.source.type",
    )
