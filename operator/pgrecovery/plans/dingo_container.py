"""The container side of a Dingo recovery: the new instance's container stopped (Staging), its
etcd keys reset and data directory wiped, started so that it restores from the cloned archive
(Restoring), watched until it serves, and its system identifier checked (Rejoined).

Why this module exists: the Dingo plan's steps on the cell, apart from the archive steps
(`dingo.py`) so each reads on its own (issue 17).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgrecovery.backups.wale.layout import format_lsn
from pgrecovery.cluster.dingo import RESET_KEYS
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import ClusterError, FatalError, RestoreFailed

if TYPE_CHECKING:
    from pgrecovery.plans.dingo import DingoRecovery

# How often the restoring container is polled, and the least time it gets: WAL-E's
# backup-fetch and replay of a small archive take a minute on a loaded machine; larger ones
# get one more second per 5 MB of archive (download, lzop, replay).
RESTORE_POLL_INTERVAL = 2.0
RESTORE_MIN_TIMEOUT = 1800.0
RESTORE_BYTES_PER_SECOND = 5e6
# Patroni writes /optime/leader every loop (10 s in Dingo): wait up to a minute for it.
OPTIME_WAIT_POLLS = 30


@dataclass
class ContainerSteps:
    """The container steps of the recovery `recovery` (its cells, container and archive)."""

    recovery: DingoRecovery

    async def container_stopped(self, ctx: StepContext) -> bool:
        ops = await self.recovery.cell_ops(ctx)
        return not (await ops.refresh(await self.recovery.container(ctx))).running

    async def stop_container(self, ctx: StepContext) -> None:
        ops = await self.recovery.cell_ops(ctx)
        await ops.ensure_stopped(await self.recovery.container(ctx))
        await self.recovery.node_state(ctx, "stopped")

    async def delete_etcd_keys(self, ctx: StepContext) -> None:
        ops = await self.recovery.cell_ops(ctx)
        container = await self.recovery.container(ctx)
        if (await ops.refresh(container)).running:
            raise ClusterError(f"{container.label} runs again; refusing to reset its etcd keys")
        etcd = self.recovery.etcd(container)
        deleted = [key for key in RESET_KEYS if await ops.etcd_delete(container, etcd, key)]
        left = [key for key in RESET_KEYS if await ops.etcd_get(container, etcd, key) is not None]
        if left:
            raise ClusterError(f"etcd keys {left} of {container.instance_id} still exist")
        await ctx.fact(etcdKeysDeleted=",".join(deleted) or "none were set")

    async def wipe_data_dir(self, ctx: StepContext) -> None:
        ops = await self.recovery.cell_ops(ctx)
        container = await self.recovery.container(ctx)
        await ops.wipe_data_dir(container)
        if not await ops.data_is_empty(container):
            raise ClusterError(f"{container.data_dir} on {container.node.name} is not empty")
        await ctx.fact(dataDirWiped=container.data_dir)

    async def container_running(self, ctx: StepContext) -> bool:
        ops = await self.recovery.cell_ops(ctx)
        return (await ops.refresh(await self.recovery.container(ctx))).running

    async def start_container(self, ctx: StepContext) -> None:
        ops = await self.recovery.cell_ops(ctx)
        await ops.ensure_started(await self.recovery.container(ctx))
        await self.recovery.node_state(ctx, "restoring")

    # ------------------------------------------------------------------ Rejoined
    async def restored(self, ctx: StepContext) -> bool:
        ops = await self.recovery.cell_ops(ctx)
        container = await self.recovery.container(ctx)
        return (await ops.readiness(container, self.recovery.etcd(container))).ready(container)

    async def wait_restored(self, ctx: StepContext) -> None:
        ops = await self.recovery.cell_ops(ctx)
        container = await self.recovery.container(ctx)
        etcd = self.recovery.etcd(container)
        size = ctx.status.backup.size_bytes or 0
        budget = max(RESTORE_MIN_TIMEOUT, size / RESTORE_BYTES_PER_SECOND)
        started = time.monotonic()
        while True:
            ctx.raise_if_cancelled()
            state = await ops.readiness(container, etcd)
            if state.ready(container):
                break
            if not state.running:
                raise RestoreFailed(
                    f"{container.label} exited (code {state.exit_code}) while restoring; see "
                    f"`docker logs {container.name}` on {container.node.name}. The archive copy "
                    "is in place: fix the cause and start the container again"
                )
            waited = time.monotonic() - started
            if waited > budget:
                raise RestoreFailed(
                    f"{container.label} did not restore within {budget:.0f}s (leader "
                    f"{state.leader or 'none'}, accepting {state.accepting})"
                )
            # No byte count to show (the container fetches and replays on its own): the
            # detail and lastProgressAt tell a person it is alive.
            await ctx.progress(
                0,
                None,
                f"waiting for {container.name} to restore from the archive "
                f"({waited:.0f}s; leader {state.leader or 'none'}, "
                f"accepting connections: {'yes' if state.accepting else 'no'})",
            )
            await asyncio.sleep(RESTORE_POLL_INTERVAL)
        await self.recovery.node_state(ctx, "running")

    async def verify_system_id(self, ctx: StepContext) -> None:
        ops = await self.recovery.cell_ops(ctx)
        container = await self.recovery.container(ctx)
        want = ctx.status.facts.get("oldSysid")
        got = await ops.data_sysid(container)
        initialize = await ops.etcd_get(container, self.recovery.etcd(container), "initialize")
        if got != want or initialize != want:
            raise FatalError(
                f"{container.label} runs a database with system id {got} (etcd /initialize "
                f"{initialize}), not the deleted instance's {want}: the archive restored is not "
                "the deleted instance's",
                reason="SystemIdMismatch",
            )
        # The container replayed the whole archive: its position (Patroni's optime, written
        # every loop) is past the start of the archive's last segment.
        end = int(ctx.status.facts.get("archiveEndLsn", "0"))
        optime = None
        for _ in range(OPTIME_WAIT_POLLS):
            optime = await ops.etcd_get(container, self.recovery.etcd(container), "optime/leader")
            if optime is not None and optime.isdigit():
                break
            await asyncio.sleep(RESTORE_POLL_INTERVAL)
        if optime is None or not optime.isdigit():
            raise RestoreFailed(f"{container.label} reports no /optime/leader after the restore")
        if int(optime) < end:
            raise RestoreFailed(
                f"{container.label} restored only up to {format_lsn(int(optime))}, but the "
                f"archive reaches {format_lsn(end)} ({ctx.status.facts.get('lastSegment')}): "
                "WAL is missing or was not replayed"
            )
        await ctx.fact(restoredSysid=got, restoredLsn=format_lsn(int(optime)),
                       nextSteps=cf_next_steps(self.recovery.dingo.instance_id))
        await self.recovery.say(
            ctx,
            f"service instance {self.recovery.dingo.instance_id} restored from the archive of "
            f"{self.recovery.spec.source.backup_guid} (system id {got}); {container.label} is the "
            "leader and accepts connections",
        )


def cf_next_steps(instance_id: str) -> str:
    """The runbook's last step, in Cloud Foundry: the data is back in the new service instance,
    the apps of the deleted one are not bound to it yet (README "Dingo: after the recovery")."""
    return (f"the data is in service instance {instance_id}. In Cloud Foundry, for each app "
            "the deleted instance was bound to: `cf bind-service <app> <service>` and `cf "
            "restart <app>` (`cf service <service> --guid` must print "
            f"{instance_id})")
