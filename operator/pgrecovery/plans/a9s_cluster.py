"""The a9s-pg cluster side that every plan onto an a9s-pg cluster shares: reaching the VMs, the
pinned cluster view, the checks of Fetching, the Staging and Rejoined step lists, the cleanup.

Why this module exists: the logical (pg_dumpall) and the WAL-E point-in-time plans restore in
different ways but stop, block, re-register, re-clone, verify and clean the same cluster. Each
step list exists here once (`staging_steps`, `rejoined_steps`), so a step added to Rejoined is
in both plans (`tests/unit/test_plan_shape.py` builds all three plans' lists). Neither plan
subclasses the other: both are an `A9sPgCluster` with their own Fetching, Decrypting and
Restoring steps.

Decisions recorded here:
- The primary is found once (in Fetching) and pinned in `status.primary`; later phases rebuild
  the cluster view from it, because in Staging the standbys are stopped and cannot be probed.
- The cluster operations are idempotent themselves (check → apply → check inside), so their
  steps are `self_checking` and report what changed (`note`).
- What a run leaves behind, and the cleanup step, are `a9s_leftovers.RecoveryFiles`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgrecovery.adapters.ssh import SshAuth, SshPool
from pgrecovery.cluster import tools
from pgrecovery.cluster.a9s import A9sOperations, StepResult
from pgrecovery.cluster.nodes import A9sLayout, ClusterView, Node, NodeView, ProgressEvent
from pgrecovery.engine import status as st
from pgrecovery.engine.status import NodeState, RecoveryStatus
from pgrecovery.engine.steps import Step, StepContext, self_checking
from pgrecovery.errors import FatalError, NotReadyYet
from pgrecovery.plans.a9s_leftovers import RecoveryFiles, with_recovery_files_removed
from pgrecovery.plans.base import PlanBase
from pgrecovery.plans.bosh_access import BoshAccess

log = logging.getLogger(__name__)

ClusterOp = Callable[[A9sOperations, ClusterView], Awaitable[StepResult]]
RunOp = Callable[[A9sOperations, ClusterView, str], Awaitable[StepResult]]


@dataclass(kw_only=True)
class A9sPgCluster(PlanBase):
    """One phase run against an a9s-pg cluster: SSH opened lazily (directly or through the
    director), the cluster view pinned in status, the shared cluster steps."""

    layout: A9sLayout
    nodes: tuple[Node, ...]
    _pool: SshPool | None = None
    _ops: A9sOperations | None = None
    _ctx: StepContext | None = None

    # ------------------------------------------------------------------ clients

    async def ops(self, ctx: StepContext) -> A9sOperations:
        self._ctx = ctx
        return await self.connect()

    async def connect(self) -> A9sOperations:
        """The cluster operations, without a step context (leftovers, observed nodes)."""
        if self._ops is None:
            self._pool = SshPool(await self._ssh_auth())
            self.on_close(self._pool.close)
            self._ops = A9sOperations(
                self._pool, self.nodes, layout=self.layout, progress=self._on_cluster_progress
            )
        return self._ops

    async def _ssh_auth(self) -> SshAuth:
        bosh = self.spec.target.bosh
        if bosh is not None:
            # The director finds the VMs (pinned in Fetching) and opens an ephemeral user;
            # the closer removes it when this phase run ends (plans/bosh_access.py).
            access = BoshAccess(bosh, self.spec.target.deployment, self.inputs.uid,
                                self.inputs.secrets)
            self.on_close(access.close)
            auth, self.nodes = await access.open(self._ctx, None)
            return auth
        _, ssh = self.spec.target.require_nodes()
        key = await self.inputs.secrets.get_key(ssh.private_key_secret_ref)
        known_hosts = await self.inputs.secrets.get_key(ssh.known_hosts_secret_ref)
        return SshAuth(username=ssh.user, private_key=key, known_hosts=known_hosts.decode())

    def _on_cluster_progress(self, event: ProgressEvent) -> None:
        # Called synchronously by the cluster operations on the event loop; keep it cheap.
        log.info("%s%s: %s", event.step, f" [{event.node}]" if event.node else "", event.message)

    # ------------------------------------------------------------------ pinned facts

    def view(self, ctx: StepContext) -> ClusterView:
        """The cluster as pinned in Fetching: the primary in status, the others standbys."""
        primary_name = ctx.status.primary
        if primary_name is None:
            raise FatalError(
                "the primary was not recorded in Fetching; the status was edited or lost",
                reason="InternalError",
            )
        primary = next(n for n in self.nodes if n.name == primary_name)
        standbys = tuple(n for n in self.nodes if n.name != primary_name)
        return ClusterView(primary=primary, standbys=standbys, nodes=())

    def run_id(self, ctx: StepContext) -> str:
        return self.run_id_of(ctx.status)

    def run_id_of(self, status: RecoveryStatus) -> str:
        raise NotImplementedError  # each plan names its runs (`run_id_for`, `pitr-…`)

    def staged_dump_of(self, status: RecoveryStatus) -> str | None:
        """The backup id whose plaintext dump this plan stages on the primary, if any."""
        return None

    def owned_work_paths(self) -> list[Path]:
        """What this plan writes into the work directory (which, in local mode, may be a
        user's directory holding other things): only these are ever removed."""
        return []

    async def cancel_jobs(self, ops: A9sOperations, status: RecoveryStatus) -> None:
        """Deletion / cleanup: stop this run's detached jobs on the VMs — the standbys'
        clones, and whatever the plan starts itself (a subclass adds its own)."""
        run_id = self.run_id_of(status)
        for node in self.nodes:
            await ops.jobs.cancel_job(node.endpoint, ops.clone_job_id(node, run_id))

    # ------------------------------------------------------------------ Fetching

    async def probe_cluster(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        view = await ops.probe_nodes()
        states = tuple(_node_state(nv) for nv in view.nodes)
        await ctx.update(lambda s: st.set_nodes(s, states))
        await ctx.update(lambda s: s.model_copy(update={"primary": view.primary.name}))

    async def check_cluster_tools(self, ctx: StepContext) -> None:
        """Before anything destructive: every node has the helpers, functions, monit services
        and programs the later phases call, and how to call the helpers is pinned in status
        (`helperConvention`), so a resumed run calls them the same way (`cluster.tools`)."""
        ops = await self.ops(ctx)
        verdicts = await ops.check_cluster_tools(self.view(ctx).primary,
                                                 new_site=self.spec.target.new_site)
        primary = verdicts[0]
        if primary.convention is None:  # pragma: no cover - check_cluster_tools raised
            raise FatalError("helper convention undetermined", reason="InternalError")
        how = tools.describe(primary.convention, primary.repmgr_config)
        await ctx.fact(
            helperConvention=primary.convention.value,
            registerPrimaryVia=how[:400],
            repmgrConfig=primary.repmgr_config,
            clusterTools=tools.summarize(verdicts)[:900],
        )
        await ctx.update(lambda s: st.set_message(
            s, f"cluster tools checked on {len(verdicts)} node(s); {primary.node}: {how}"))

    async def register_primary(self, ctx: StepContext) -> None:
        """`register_master_node` the way the Fetching check found (fact `helperConvention`);
        a status from before that check decides on the primary now and records it."""
        ops = await self.ops(ctx)
        facts = ctx.status.facts
        pinned = facts.get("helperConvention")
        convention = tools.Convention(pinned) if pinned else None
        result = await ops.ensure_primary_registered(self.view(ctx), convention,
                                                     facts.get("repmgrConfig"))
        if convention is None and result.changed:
            await ctx.fact(registerPrimaryVia=result.message[:400])
        await self.note(ctx, result)

    # ------------------------------------------------------------------ Staging / Rejoined

    async def note(self, ctx: StepContext, result: StepResult) -> None:
        text = result.message if result.changed else f"unchanged: {result.message}"
        await ctx.update(lambda s: st.set_message(s, f"{result.step}: {text}"))

    def cluster_step(
        self, name: str, op: Callable[[A9sOperations, ClusterView], Awaitable[StepResult]]
    ) -> Step:
        async def apply(ctx: StepContext) -> None:
            ops = await self.ops(ctx)
            result = await op(ops, self.view(ctx))
            await self.note(ctx, result)

        return self_checking(name, apply)

    def run_id_step(self, name: str, op: RunOp) -> Step:
        async def apply(ctx: StepContext) -> None:
            ops = await self.ops(ctx)
            await self.note(ctx, await op(ops, self.view(ctx), self.run_id(ctx)))

        return self_checking(name, apply)

    async def verify_cluster(self, ctx: StepContext) -> None:
        ops = await self.ops(ctx)
        view = self.view(ctx)
        # Right after the last re-clone repmgr may need a few seconds to see every node.
        for attempt in range(30):
            try:
                health = await ops.verify_cluster(view)
                break
            except NotReadyYet:
                if attempt == 29:
                    raise
                await asyncio.sleep(2)
        states = tuple(
            NodeState(
                name=n.name,
                role="primary" if n == view.primary else "standby",
                state="running" if n == view.primary else "streaming",
            )
            for n in view.all_nodes
        )
        await ctx.update(lambda s: st.set_nodes(s, states))
        await ctx.update(
            lambda s: st.set_message(
                s,
                "cluster verified: "
                + ("healthy" if health.healthy else "; ".join(health.problems)),
            )
        )

    async def reclone_standbys(self, ctx: StepContext) -> None:
        """Wipe and re-clone every standby, `spec.parallelism.standbyReclones` at a time.

        Each clone is idempotent on its own (a standby already re-cloned in this run and
        streaming is left alone), so a resumed step redoes only the unfinished ones. All clones
        run to their end even when one fails, so status shows every standby's real state; the
        first failure is raised afterwards.
        """
        ops = await self.ops(ctx)
        view = self.view(ctx)
        run_id = self.run_id(ctx)
        bound = asyncio.Semaphore(self.spec.parallelism.standby_reclones)

        async def set_state(node: Node, state: str) -> None:
            await ctx.update(
                lambda s: st.update_node(s, NodeState(name=node.name, role="standby", state=state))
            )

        async def one(node: Node) -> StepResult:
            async with bound:
                ctx.raise_if_cancelled()
                await set_state(node, "recloning")
                try:
                    result = await ops.ensure_standby_recloned(view, node, run_id)
                except BaseException:
                    await set_state(node, "reclone-failed")
                    raise
                await set_state(node, "streaming")
                await self.note(ctx, result)
                return result

        outcomes = await asyncio.gather(
            *(one(node) for node in view.standbys), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        done = [o.message for o in outcomes if isinstance(o, StepResult)]
        await ctx.update(lambda s: st.set_message(s, "; ".join(done) or "no standbys"))

    async def observed_nodes(self) -> list[NodeState]:
        """`Plan.observe_nodes`: the nodes as they are after a failure (read-only)."""
        ops = await self.connect()
        return [_node_state(seen) if isinstance(seen, NodeView)
                else NodeState(name=seen[0].name, state=f"unreachable: {seen[1]}")
                for seen in await ops.observe_nodes()]

async def tools_checked(ctx: StepContext) -> bool:
    """Pinned once: a resumed run keeps the convention the first check found."""
    return "helperConvention" in ctx.status.facts


def staging_steps(c: A9sPgCluster, *, drop_inactive_slots: bool) -> list[Step]:
    """Staging, the runbook's way: standbys and repmgr stopped, the primary closed to clients.
    Inactive slots are dropped only where the primary's WAL stays (a logical restore); a
    physical restore replaces the data directory, slots included."""
    steps = [
        c.cluster_step("ensure-standbys-stopped", lambda o, v: o.ensure_standbys_stopped(v)),
        c.cluster_step(
            "ensure-repmgr-stopped-on-primary", lambda o, v: o.ensure_repmgr_stopped_on_primary(v)
        ),
        c.cluster_step(
            "ensure-connections-blocked", lambda o, v: o.ensure_connections_blocked(v)
        ),
        c.cluster_step(
            "ensure-startup-locks-clear", lambda o, v: o.ensure_startup_locks_clear(v)
        ),
    ]
    if drop_inactive_slots:
        steps.insert(2, c.cluster_step(
            "ensure-inactive-slots-dropped", lambda o, v: o.ensure_inactive_slots_dropped(v)))
    return steps


def rejoined_steps(c: A9sPgCluster, *, before_unblock: Sequence[Step]) -> list[Step]:
    """Rejoined: repmgr's view rebuilt around the restored primary, the standbys re-cloned
    (`standbyReclones` at a time), the cluster verified, the plan's own checks and removals
    (`before_unblock`: nothing but the recovery has written yet), clients let in again, then
    the cleanup."""
    steps = [
        c.run_id_step(
            "ensure-repmgr-schema-truncated",
            lambda o, v, run: o.ensure_repmgr_schema_truncated(v, run),
        ),
        self_checking("ensure-primary-registered", c.register_primary),
        c.cluster_step(
            "ensure-repmgr-running-on-primary", lambda o, v: o.ensure_repmgr_running_on_primary(v)
        ),
        c.run_id_step("ensure-clone-marker", lambda o, v, run: o.ensure_clone_marker(v, run)),
        self_checking("ensure-standbys-recloned", c.reclone_standbys),
        self_checking("verify-cluster", c.verify_cluster),
        *before_unblock,
        c.cluster_step(
            "ensure-connections-unblocked", lambda o, v: o.ensure_connections_unblocked(v)
        ),
    ]
    return with_recovery_files_removed(RecoveryFiles(c), steps)


def _node_state(seen: NodeView) -> NodeState:
    return NodeState(
        name=seen.node.name,
        role=str(getattr(seen.role, "value", seen.role)),
        monit=" ".join(f"{svc}={state}" for svc, state in sorted(seen.monit.items())),
        state="reachable" if seen.pg_running else "postgres-down",
    )
