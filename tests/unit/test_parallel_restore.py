"""start / poll of the parallel restore with a fake shell and a fake job runner: the decisions
(idempotent start, what is uploaded, how a finished job is judged), not the commands' effects,
which tests/integration/test_parallel_restore.py proves on the simulated VMs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import pytest

from pgrecovery.adapters.jobs import JobState, JobStatus
from pgrecovery.adapters.ssh import (
    CommandResult,
    ReplayableSource,
    SshEndpoint,
    UploadResult,
    shell_script_argv,
)
from pgrecovery.cluster.a9s import A9sOperations
from pgrecovery.cluster.dump_index import DumpIndexer
from pgrecovery.cluster.nodes import ClusterView, Node, ProgressEvent
from pgrecovery.cluster.parallel_restore import (
    _READ_LOGS,
    ParallelRestoreStatus,
    poll_parallel_restore,
    start_parallel_restore,
    work_dir,
)
from pgrecovery.errors import RestoreFailed
from tests.unit import dumptext

pytestmark = pytest.mark.unit

BACKUP_ID = "de2fe9e4-6535-423d-8709-dca87df7985c-1740130000000"
RUN_ID = "run-1"
PRIMARY = Node("pg/0", "10.77.0.10")
VIEW = ClusterView(PRIMARY, (Node("pg/1", "10.77.0.11"),), ())
DUMP = dumptext.dump(shop_pre=dumptext.PRE_DATA + dumptext.entry(
    "16397", "BLOB", "SELECT pg_catalog.lo_create('16397');", "-"))


def _index() -> object:
    indexer = DumpIndexer()
    indexer.feed(DUMP)
    return indexer.finish()


class FakeShell:
    """The primary's files as a dict; answers the commands parallel_restore sends."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dump_size = len(DUMP)
        self.commands: list[list[str]] = []

    async def run_root(self, node: SshEndpoint, argv: Sequence[str], *,
                       input: bytes | str | None = None, timeout: float | None = None,
                       check: bool = True) -> CommandResult:
        argv = list(argv)
        self.commands.append(argv)
        if argv[:2] == ["stat", "-c"]:
            return CommandResult(0, f"{self.dump_size}\n", "")
        if argv == ["cat", "/proc/meminfo"]:
            return CommandResult(0, "MemTotal:        8000000 kB\n", "")
        if argv[0] == "bash" and "rm -rf" in argv[2]:
            work = argv[-1]
            self.files = {k: v for k, v in self.files.items() if not k.startswith(work + "/")}
            return CommandResult(0, "", "")
        if argv[0] == "bash" and "---pgrecovery-progress---" in argv[2]:
            work = argv[-1]
            plan = self.files.get(f"{work}/plan.json", b"{}").decode()
            progress = self.files.get(f"{work}/progress", b"").decode()
            return CommandResult(0, f"{plan}\n---pgrecovery-progress---\n{progress}", "")
        raise AssertionError(f"unexpected command {argv}")

    def stream_root_lines(self, node: SshEndpoint, argv: Sequence[str], *,
                          timeout: float | None = None) -> AsyncIterator[str]:
        assert argv[0] == "bash", argv
        assert "pgrecovery task" in argv[2], argv
        work, ids = argv[4], argv[5:]
        text = ""
        for i in ids:  # what the script prints: a header with the line count, then the log
            log = self.files.get(f"{work}/t{i}.log", b"").decode()
            if log and not log.endswith("\n"):
                log += "\n"
            text += f"--- pgrecovery task {i}: {log.count(chr(10))} lines\n{log}"

        async def lines() -> AsyncIterator[str]:
            for line in text.split("\n")[:-1]:  # as asyncssh yields them: without "\n"
                yield line
        return lines()

    async def upload(self, node: SshEndpoint, source: AsyncIterable[bytes] | ReplayableSource,
                     remote_path: str, *, progress: object = None) -> UploadResult:
        assert not isinstance(source, ReplayableSource)
        data = b"".join([chunk async for chunk in source])
        self.files[remote_path] = data
        return UploadResult(remote_path, len(data), "0" * 64)


class FakeJobs:
    def __init__(self) -> None:
        self.status: dict[str, JobStatus] = {}
        self.started: list[tuple[str, list[str]]] = []

    async def poll_job(self, node: SshEndpoint, job_id: str, *,
                       tail_bytes: int = 4096, wait: float = 0.0) -> JobStatus:
        return self.status.get(job_id, JobStatus(job_id, JobState.ABSENT))

    async def start_job(self, node: SshEndpoint, job_id: str, argv: Sequence[str], *,
                        stdin_file: str = "/dev/null") -> JobStatus:
        self.started.append((job_id, list(argv)))
        self.status[job_id] = JobStatus(job_id, JobState.RUNNING)
        return self.status[job_id]


def _ops(shell: FakeShell, jobs: FakeJobs,
         events: list[ProgressEvent] | None = None) -> A9sOperations:
    return A9sOperations(shell, [PRIMARY, Node("pg/1", "10.77.0.11")],  # type: ignore[arg-type]
                         jobs=jobs,  # type: ignore[arg-type]
                         progress=(events.append if events is not None else lambda e: None))


async def _started() -> tuple[FakeShell, FakeJobs, A9sOperations, dict[str, object]]:
    shell, jobs = FakeShell(), FakeJobs()
    ops = _ops(shell, jobs)
    await start_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID, _index(), 2)  # type: ignore[arg-type]
    plan = json.loads(shell.files[f"{work_dir(ops, RUN_ID)}/plan.json"])
    return shell, jobs, ops, plan


async def test_start_uploads_the_script_and_starts_one_job_as_postgres() -> None:
    events: list[ProgressEvent] = []
    shell, jobs = FakeShell(), FakeJobs()
    ops = _ops(shell, jobs, events)
    await start_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID, _index(), 2)  # type: ignore[arg-type]
    work = work_dir(ops, RUN_ID)
    script = shell.files[f"{work}/restore.sh"].decode()
    assert script.startswith("#!/bin/sh")
    assert ops.layout.dump_path(BACKUP_ID) in script
    assert "shop" not in script
    assert "maintenance_work_mem=976MB" in script  # 8 GB / 4 / 2 sessions
    [(job_id, argv)] = jobs.started
    assert job_id == f"prestore-{RUN_ID}"
    assert argv[-2:] == ["sh", f"{work}/restore.sh"]
    assert "chpst -u postgres:vcap" in " ".join(argv)
    assert any("serial fallback: shop: large objects" in e.message for e in events)

    # A second start (operator restarted) finds the job: nothing uploaded, nothing started.
    shell.files.clear()
    await start_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID, _index(), 2)  # type: ignore[arg-type]
    assert len(jobs.started) == 1
    assert shell.files == {}


async def test_start_refuses_an_index_of_another_dump() -> None:
    shell, jobs = FakeShell(), FakeJobs()
    shell.dump_size += 1
    with pytest.raises(RestoreFailed, match="index the dump again"):
        await start_parallel_restore(_ops(shell, jobs), VIEW, BACKUP_ID, RUN_ID,
                                     _index(), 2)  # type: ignore[arg-type]
    assert jobs.started == []


async def test_poll_reports_bytes_while_running() -> None:
    shell, _jobs, ops, plan = await _started()
    work = work_dir(ops, RUN_ID)
    shell.files[f"{work}/progress"] = b"0 0 1000 1.0 2.0\n1 0 20 2.0 2.5\n"
    status = await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)
    assert isinstance(status, ParallelRestoreStatus)
    assert not status.done
    assert status.bytes_read == 1020
    assert status.bytes_total == plan["total_bytes"]
    assert status.tasks_done == 2
    assert status.fallbacks == {"shop": "large objects (pg_dump BLOB entries) are restored "
                                        "serially"}


def _finish(shell: FakeShell, jobs: FakeJobs, ops: A9sOperations, plan: dict[str, object],
            exit_codes: dict[int, int], exit_code: int = 0) -> None:
    work = work_dir(ops, RUN_ID)
    tasks = plan["tasks"]
    assert isinstance(tasks, list)
    shell.files[f"{work}/progress"] = "".join(
        f"{t['id']} {exit_codes.get(t['id'], 0)} {t['bytes']} 1.0 2.0\n" for t in tasks
    ).encode()
    job_id = f"prestore-{RUN_ID}"
    jobs.status[job_id] = JobStatus(job_id, JobState.FINISHED, exit_code=exit_code)


async def test_poll_done_with_expected_errors_only() -> None:
    shell, jobs, ops, plan = await _started()
    work = work_dir(ops, RUN_ID)
    shell.files[f"{work}/t0.log"] = (b'psql:<stdin>:28: ERROR:  current user cannot be dropped\n'
                                     b'psql:<stdin>:38: ERROR:  role "postgres" already exists\n')
    _finish(shell, jobs, ops, plan, {})
    status = await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)
    assert status.done
    assert status.report is not None
    assert status.report.ok
    assert status.report.expected == {"current user cannot be dropped": 1,
                                      "role already exists": 1}
    assert status.bytes_read == status.bytes_total


async def test_poll_fails_on_an_unexpected_error_naming_its_database() -> None:
    shell, jobs, ops, plan = await _started()
    work = work_dir(ops, RUN_ID)
    tasks = plan["tasks"]
    assert isinstance(tasks, list)
    data_task = next(t for t in tasks if t["database"] == "shop")
    shell.files[f"{work}/t{data_task['id']}.log"] = (
        b'psql:<stdin>:9: ERROR:  duplicate key value violates unique constraint "x_pkey"\n'
        b"CONTEXT:  COPY nodes, line 1\n")
    _finish(shell, jobs, ops, plan, {})
    with pytest.raises(RestoreFailed, match=f"database {data_task['database']}"):
        await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)


async def test_poll_fails_when_a_task_psql_could_not_run() -> None:
    shell, jobs, ops, plan = await _started()
    _finish(shell, jobs, ops, plan, {2: 2}, exit_code=1)
    with pytest.raises(RestoreFailed, match=r"task 2 .*psql exited 2"):
        await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)


async def test_poll_fails_for_a_lost_or_absent_job() -> None:
    _shell, jobs, ops, _plan = await _started()
    job_id = f"prestore-{RUN_ID}"
    jobs.status[job_id] = JobStatus(job_id, JobState.LOST, log_tail="killed")
    with pytest.raises(RestoreFailed, match="partial restore"):
        await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)
    jobs.status.clear()
    with pytest.raises(RestoreFailed, match="start it first"):
        await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)


async def test_poll_fails_when_the_task_list_is_gone() -> None:
    shell, jobs, ops, plan = await _started()
    _finish(shell, jobs, ops, plan, {})
    del shell.files[f"{work_dir(ops, RUN_ID)}/plan.json"]
    with pytest.raises(RestoreFailed, match="cannot be judged"):
        await poll_parallel_restore(ops, VIEW, BACKUP_ID, RUN_ID)


def test_the_log_reader_frames_every_log_whatever_it_holds(tmp_path: Path) -> None:
    """The remote script that reads all task logs at once, run by bash as on the VM: a log
    without a final newline, an empty or missing log, and a log line that looks like a
    header all come back intact, each under its own task."""
    (tmp_path / "t0.log").write_bytes(b"ERROR:  a\n--- pgrecovery task 1: 99 lines\n")
    (tmp_path / "t1.log").write_bytes(b"no final newline")
    (tmp_path / "t2.log").write_bytes(b"")
    argv = shell_script_argv(_READ_LOGS, str(tmp_path), "0", "1", "2", "3")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out.split("\n") == [
        "--- pgrecovery task 0: 2 lines", "ERROR:  a", "--- pgrecovery task 1: 99 lines",
        "--- pgrecovery task 1: 1 lines", "no final newline",
        "--- pgrecovery task 2: 0 lines",
        "--- pgrecovery task 3: 0 lines", "",
    ]
