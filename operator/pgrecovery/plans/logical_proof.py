"""The restore proof steps of a logical recovery: every restored table counted on the primary
(last step of Restoring, before the standbys are touched) and on each re-cloned standby
(Rejoined, before clients are let in), against the rows the dump's COPY blocks carry.

Why this module exists: the counting itself is `cluster.restore_proof`; this binds it to the
plan's status (`status.restoreProof`, fact `restoreProofLsn`) and its progress, apart from the
restore so each reads on its own (issue 17).

Decisions recorded here:
- Both steps check inside apply: a resumed phase that re-runs the steps before them records
  them again in plan order; a proven node is never counted again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pgrecovery.backups.progress import human_size
from pgrecovery.cluster import restore_proof
from pgrecovery.cluster.nodes import Node
from pgrecovery.engine import status as st
from pgrecovery.engine.steps import StepContext
from pgrecovery.errors import FatalError, RestoreIncomplete
from pgrecovery.plans.a9s_cluster import A9sPgCluster
from pgrecovery.plans.base import ProgressHolder, pumping
from pgrecovery.plans.logical_restore import IndexLoader, sessions_of


async def _primary_proven(ctx: StepContext) -> bool:
    return "restoreProofLsn" in ctx.status.facts and ctx.status.restore_proof is not None


async def _standbys_proven(ctx: StepContext) -> bool:
    proof = ctx.status.restore_proof
    return proof is not None and proof.nodes > 0 and len(proof.verified_on) == proof.nodes



@dataclass
class RestoreProofSteps:
    """The proof steps on the cluster of `cluster`; what to count comes from the dump's index
    (`load_index`)."""

    cluster: A9sPgCluster
    load_index: IndexLoader

    def _proof_sessions(self, ctx: StepContext) -> int:
        """As many count sessions per node as the restore used (at least 2: the counts of two
        tables overlap their reads and their round trips even on one CPU)."""
        return max(2, sessions_of(ctx.status.facts.get("restoreMode", "")))

    async def _prove(self, ctx: StepContext, node: Node,
                     plan: restore_proof.ProofPlan) -> restore_proof.NodeProof:
        ops = await self.cluster.ops(ctx)
        holder = ProgressHolder()
        done = 0
        total = plan.bytes

        def counted(size: int) -> None:
            nonlocal done
            done += size
            holder.set(done, total or None,
                       f"counted rows of {human_size(done)} of {human_size(total)} of table "
                       f"data on {node.name}")

        async with pumping(ctx, holder):
            holder.set(0, total or None, f"counting the rows of {len(plan.tables)} tables on "
                                         f"{node.name}")
            return await restore_proof.prove_node(
                ops.shell, node, ops.layout, plan, sessions=self._proof_sessions(ctx),
                on_counted=counted)

    def _proof_plan(self, ctx: StepContext) -> restore_proof.ProofPlan:
        index, why = self.load_index(ctx.status.backup.plain_size_bytes)
        return restore_proof.plan_proof(index, why)

    async def prove_restore_on_primary(self, ctx: StepContext) -> None:
        """Count every restored table on the primary against the dump's index, before
        anything is done to the standbys (they still hold their old data when this fails).
        The primary's WAL position now is where the standbys must have replayed past."""
        if await _primary_proven(ctx):
            await ctx.update(lambda s: st.set_message(
                s, f"unchanged: {st.proof_summary(s.restore_proof)}"))
            return
        ops = await self.cluster.ops(ctx)
        view = self.cluster.view(ctx)
        plan = self._proof_plan(ctx)
        lsn = await restore_proof.current_lsn(ops.shell, view.primary, ops.layout)
        proof = await self._prove(ctx, view.primary, plan)
        if not proof.ok:
            raise RestoreIncomplete(
                f"{proof.failure()}. psql reported no error for them. The standbys were not "
                "touched. Look at the dump's COPY block of each table (the staged dump is "
                "kept on the primary; a data line ending in `\\.` ends a COPY early without "
                "an error in PostgreSQL 15) and at anything that wrote to the primary since "
                "the restore")
        result = st.RestoreProof(
            databases=len(plan.databases), tables=proof.tables, rows=proof.rows,
            verified_on=(view.primary.name,), nodes=len(view.all_nodes),
            not_verified=tuple((plan.not_verified + proof.not_verified)
                               [:restore_proof.MAX_NOT_VERIFIED]),
            restore_lsn=lsn, seconds={view.primary.name: proof.seconds},
        )
        await ctx.update(lambda s: st.set_restore_proof(s, result))
        await ctx.fact(restoreProofLsn=lsn)
        summary = st.proof_summary(result)
        await ctx.update(lambda s: st.set_message(s, f"{summary} ({proof.seconds:.1f} s)"))

    async def prove_restore_on_standbys(self, ctx: StepContext) -> None:
        """Each re-cloned standby must have replayed past the end of the restore (and all the
        primary has flushed since: repmgr's registration) and hold the same rows in every
        table; checked on all standbys at once. Once proven it is not counted again: a resumed
        run may come back here after the connections were allowed again."""
        if await _standbys_proven(ctx):
            await ctx.update(lambda s: st.set_message(
                s, f"unchanged: {st.proof_summary(s.restore_proof)}"))
            return
        ops = await self.cluster.ops(ctx)
        view = self.cluster.view(ctx)
        if "restoreProofLsn" not in ctx.status.facts or ctx.status.restore_proof is None:
            # A recovery that passed Restoring under an operator without this step: the
            # primary is proven now (connections are still blocked), then the standbys.
            await self.prove_restore_on_primary(ctx)
        proof0 = ctx.status.restore_proof
        if "restoreProofLsn" not in ctx.status.facts or proof0 is None:
            raise FatalError("the restore proof of the primary is not in status",
                             reason="InternalError")
        plan = self._proof_plan(ctx)
        lsn = await restore_proof.current_lsn(ops.shell, view.primary, ops.layout)

        async def one(node: Node) -> restore_proof.NodeProof:
            why = await restore_proof.wait_replayed(ops.shell, node, ops.layout, lsn)
            if why is not None:
                raise RestoreIncomplete(
                    f"the restore cannot be proven on {node.name}: {why}. The primary holds "
                    "the restored data")
            return await self._prove(ctx, node, plan)

        proofs = await asyncio.gather(*(one(n) for n in view.standbys), return_exceptions=True)
        errors = [p for p in proofs if isinstance(p, BaseException)]
        if errors:
            raise errors[0]
        done = [p for p in proofs if isinstance(p, restore_proof.NodeProof)]
        bad = [p for p in done if not p.ok]
        if bad:
            raise RestoreIncomplete(
                "; ".join(p.failure() for p in bad) + ". The primary holds the rows the dump "
                "carries: re-clone the standby (a new PgRecovery for this deployment does)")
        verified = (*proof0.verified_on,
                    *(p.node for p in done if p.node not in proof0.verified_on))
        extra = [n for p in done for n in p.not_verified if n not in proof0.not_verified]
        result = proof0.model_copy(update={
            "verified_on": verified, "nodes": len(view.all_nodes),
            "not_verified": (*proof0.not_verified, *extra)[:restore_proof.MAX_NOT_VERIFIED],
            "seconds": {**proof0.seconds, **{p.node: p.seconds for p in done}},
        })
        await ctx.update(lambda s: st.set_restore_proof(s, result))
        await ctx.update(lambda s: st.set_message(s, st.proof_summary(result)))
