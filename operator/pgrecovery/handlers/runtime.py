"""The operator's process-wide objects, built once at startup and kept in kopf's memo.

Why this module exists: handlers must be thin, so everything they need (settings, the
supervisor of running phases, the secret reader factory) is built here once, validated at
startup, and closed at cleanup. This is wiring, not logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pgrecovery.adapters.kube import KubeSecrets
from pgrecovery.adapters.lease import KubeLeases
from pgrecovery.engine.breakpoints import Breakpoints
from pgrecovery.engine.executor import ExecutorGuard
from pgrecovery.engine.lifecycle import effective_spec
from pgrecovery.engine.locks import DeploymentClaims
from pgrecovery.engine.plan import PlanInputs, SecretSource, load_plan_factory
from pgrecovery.engine.status import RecoveryStatus
from pgrecovery.engine.supervisor import RetryPolicy, Supervisor
from pgrecovery.settings import OperatorSettings, executor_identity


@dataclass
class Runtime:
    settings: OperatorSettings
    supervisor: Supervisor
    secrets_for: Callable[[str], SecretSource]
    executor: ExecutorGuard
    claims: DeploymentClaims = field(default_factory=DeploymentClaims)

    def inputs(self, body: Any, status: RecoveryStatus) -> PlanInputs:
        meta = body["metadata"]
        spec = effective_spec(dict(body.get("spec") or {}), status)
        work_dir = self.settings.work_dir / meta["namespace"] / meta["name"]
        return PlanInputs(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            spec=spec,
            secrets=self.secrets_for(meta["namespace"]),
            work_dir=str(work_dir),
        )

    async def close(self) -> None:
        await self.executor.close()
        await self.supervisor.close()


def build_runtime(settings: OperatorSettings) -> Runtime:
    factory = load_plan_factory(settings.plan_factory)
    supervisor = Supervisor(
        factory,
        poll_interval=settings.poll_interval,
        stall_after=settings.stall_after,
        gate_recheck=settings.gate_recheck,
        retry=RetryPolicy(
            limit=settings.retry_limit,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
        ),
        breakpoints=Breakpoints(settings.breakpoint_dir),
    )
    secrets_cache: dict[str, SecretSource] = {}

    def secrets_for(namespace: str) -> SecretSource:
        if namespace not in secrets_cache:
            secrets_cache[namespace] = KubeSecrets(namespace)
        return secrets_cache[namespace]

    async def lost(uid: str) -> None:
        # Stop at once: another replica may take over one lease duration after our last
        # renewal, and a third of it is what is left.
        await supervisor.cancel(uid, settings.lease_duration / 3)

    leases = KubeLeases(executor_identity(settings), settings.lease_duration)
    return Runtime(settings=settings, supervisor=supervisor, secrets_for=secrets_for,
                   executor=ExecutorGuard(leases, lost))
