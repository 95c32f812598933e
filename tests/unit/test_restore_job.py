"""The restore job's one shape: which kind the plan gets, and what each kind refuses.

Why this test exists: the plan no longer branches between the serial and the parallel restore
at each start and poll; `restore_job` decides once. The jobs' effects on a real primary are
tested in tests/integration/test_parallel_restore.py and the recovery tests.
"""

from __future__ import annotations

import pytest

from pgrecovery.cluster.nodes import ClusterView, Node
from pgrecovery.cluster.parallel_restore import parallel_restore_job_id
from pgrecovery.cluster.restore_job import ParallelRestore, SerialRestore, restore_job

VIEW = ClusterView(primary=Node("pg/0", "10.0.0.10"), standbys=(), nodes=())


class _Ops:
    """Only what the job ids need; a call that reaches the VM is a bug here."""

    def restore_job_id(self, run_id: str) -> str:
        return f"restore-{run_id}"


def test_one_session_is_the_runbooks_psql_and_more_are_the_parallel_restore() -> None:
    serial = restore_job(_Ops(), VIEW, "b-1", "run-1", sessions=1)  # type: ignore[arg-type]
    parallel = restore_job(_Ops(), VIEW, "b-1", "run-1", sessions=4,  # type: ignore[arg-type]
                           wal_free=True, fresh_databases=["shop"])
    assert isinstance(serial, SerialRestore)
    assert serial.job_id == "restore-run-1"
    assert isinstance(parallel, ParallelRestore)
    assert parallel.job_id == parallel_restore_job_id("run-1")
    assert (parallel.sessions, parallel.wal_free, parallel.fresh_databases) == (4, True,
                                                                                 ("shop",))


async def test_a_parallel_restore_does_not_start_without_the_dump_index() -> None:
    job = restore_job(_Ops(), VIEW, "b-1", "run-1", sessions=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index"):
        await job.start()
