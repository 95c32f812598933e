"""One shape for the restore job on the primary — start / poll / cancel — whether the dump is
restored by one psql (the runbook's way) or in parallel sessions from the dump's index.

Why this module exists: the plan used to branch between the serial restore (methods of
`A9sOperations`) and the parallel one (`parallel_restore`) at every start and every poll, and
deletion cancelled both job ids blindly. Now the plan picks the kind once (`restore_job`) and
talks to a `RestoreJob`; deletion and `pgrecovery cleanup` cancel through the same shape.

Decisions recorded here:
- Every call is idempotent and re-attaches: `start` on a job that exists (a resumed run, an
  operator restart) leaves it running; `poll` reads its state; `cancel` of a job that is not
  there is a no-op.
- The job ids stay what they were (`restore-<run>`, `prestore-<run>`): a job an older operator
  started is found by a newer one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pgrecovery.adapters.jobs import JobStatus
from pgrecovery.cluster.a9s import A9sOperations, RestoreStatus
from pgrecovery.cluster.dump_index import DumpIndex
from pgrecovery.cluster.nodes import ClusterView, Node
from pgrecovery.cluster.parallel_restore import (
    parallel_restore_job_id,
    poll_parallel_restore,
    start_parallel_restore,
)


class RestoreJob(Protocol):
    """The restore of the staged dump into the primary, as a detached job on it."""

    @property
    def job_id(self) -> str: ...

    @property
    def sessions(self) -> int: ...

    async def start(self) -> JobStatus: ...

    async def poll(self, *, wait: float = 0.0) -> RestoreStatus: ...

    async def cancel(self) -> JobStatus: ...


@dataclass
class SerialRestore:
    """`psql -f <dump> postgres` as in the runbook (`A9sOperations.start_restore`)."""

    ops: A9sOperations
    view: ClusterView
    backup_id: str
    run_id: str
    sessions: int = 1

    @property
    def job_id(self) -> str:
        return self.ops.restore_job_id(self.run_id)

    async def start(self) -> JobStatus:
        return await self.ops.start_restore(self.view, self.backup_id, self.run_id)

    async def poll(self, *, wait: float = 0.0) -> RestoreStatus:
        return await self.ops.poll_restore(self.view, self.backup_id, self.run_id, wait=wait)

    async def cancel(self) -> JobStatus:
        return await self.ops.jobs.cancel_job(self.view.primary.endpoint, self.job_id)


@dataclass
class ParallelRestore:
    """`sessions` psql sessions fed by the dump's index (`parallel_restore`); `wal_free` loads
    fresh tables with COPY … FREEZE, `fresh_databases` are dropped before besides those the
    dump drops itself."""

    ops: A9sOperations
    view: ClusterView
    backup_id: str
    run_id: str
    sessions: int
    index: DumpIndex | None = None
    wal_free: bool = False
    fresh_databases: Sequence[str] = field(default_factory=tuple)

    @property
    def job_id(self) -> str:
        return parallel_restore_job_id(self.run_id)

    async def start(self) -> JobStatus:
        if self.index is None:
            raise ValueError("a parallel restore starts only with the dump's index")
        return await start_parallel_restore(
            self.ops, self.view, self.backup_id, self.run_id, self.index, self.sessions,
            wal_free=self.wal_free, fresh_databases=self.fresh_databases)

    async def poll(self, *, wait: float = 0.0) -> RestoreStatus:
        return await poll_parallel_restore(self.ops, self.view, self.backup_id, self.run_id,
                                           wait=wait)

    async def cancel(self) -> JobStatus:
        return await self.ops.jobs.cancel_job(self.view.primary.endpoint, self.job_id)


def restore_job(ops: A9sOperations, view: ClusterView, backup_id: str, run_id: str, *,
                sessions: int, index: DumpIndex | None = None, wal_free: bool = False,
                fresh_databases: Sequence[str] = ()) -> RestoreJob:
    """The serial job for one session, the parallel one for more."""
    if sessions > 1:
        return ParallelRestore(ops, view, backup_id, run_id, sessions, index, wal_free,
                               tuple(fresh_databases))
    return SerialRestore(ops, view, backup_id, run_id)


async def cancel_restore_jobs(ops: A9sOperations, nodes: Sequence[Node], backup_id: str,
                              run_id: str) -> None:
    """Deletion / cleanup: whichever kind ran, on whichever node was the primary then (the
    primary may have changed since; a job that is not there is left alone)."""
    for node in nodes:
        view = ClusterView(primary=node, standbys=(), nodes=())
        for job in (SerialRestore(ops, view, backup_id, run_id),
                    ParallelRestore(ops, view, backup_id, run_id, sessions=2)):
            await job.cancel()
