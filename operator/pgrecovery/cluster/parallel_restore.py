"""The Restoring phase with several psql sessions: run `restore_script`'s script on the primary.

Why this module exists: `A9sOperations.start_restore` / `poll_restore` load the dump with one
psql, which dominates the time to recover. This module has the same shape (start / poll,
idempotent, resumable) but runs the parallel script built from the dump's `DumpIndex`:

* `start_parallel_restore` builds the plan, prepares a work directory owned by postgres:vcap
  under pgrecovery's state dir on the persistent disk, uploads the script and the task list
  (checksum-verified, like the dump) and starts ONE detached job (`adapters.jobs`) that runs
  the script as postgres:vcap after sourcing vars.sh (`psql.as_postgres_argv`), exactly like
  the serial restore's psql. A second call finds the job and starts nothing; an operator
  restart re-attaches to the running job.
* `poll_parallel_restore` reports the bytes of the dump restored so far (from the script's
  progress file) and, when the job ended, classifies every task's psql output with
  `restore_errors` (each task belongs to one database) into one `RestoreReport`. A job that
  ended non-zero, a task that psql could not run, an unexpected error, or a LOST job (the VM
  restarted mid-restore: the database holds a partial restore) raises `RestoreFailed`.

Databases the indexer did not fully understand are restored by one serial psql inside the same
script; the status says which and why (`ParallelRestoreStatus.fallbacks`).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pgrecovery.adapters.jobs import JobState, JobStatus
from pgrecovery.adapters.ssh import shell_script_argv
from pgrecovery.cluster import psql
from pgrecovery.cluster.a9s import A9sOperations, RestoreStatus
from pgrecovery.cluster.dump_index import DumpIndex
from pgrecovery.cluster.nodes import ClusterView, ProgressEvent, validate_run_id
from pgrecovery.cluster.restore_errors import Recreated, RestoreReport
from pgrecovery.cluster.restore_script import (
    Task,
    build_plan,
    classify_task_log,
    maintenance_work_mem_mb,
    merge_reports,
    parse_progress,
)
from pgrecovery.errors import RemoteCommandFailed, RestoreFailed

PSQL = ["psql", "-X", "--quiet", "--no-password", "-d", "postgres"]
"""What each task pipes its bytes into (PATH and PGPORT come from vars.sh)."""

_PREPARE = r"""
set -eu
w=$1
rm -rf -- "$w"
mkdir -p -m 0750 -- "$w"
chown postgres:vcap -- "$w"
"""

# Each task's log behind a header with its line count (a final newline added where missing),
# so no text inside a log can be taken for a header.
_READ_LOGS = r"""
w=$1; shift
for id in "$@"; do
  f="$w/t$id.log"
  n=0
  if [ -s "$f" ]; then n=$(sed -e '$a\' -- "$f" | wc -l); fi
  echo "--- pgrecovery task $id: $n lines"
  if [ "$n" -gt 0 ]; then sed -e '$a\' -- "$f"; fi
done
"""
_LOG_HEADER = re.compile(r"--- pgrecovery task (\d+): (\d+) lines")

_READ_STATE = r"""
w=$1
cat -- "$w/plan.json" 2>/dev/null || echo '{}'
echo
echo ---pgrecovery-progress---
cat -- "$w/progress" 2>/dev/null || true
"""


@dataclass(frozen=True)
class ParallelRestoreStatus(RestoreStatus):
    fallbacks: dict[str, str] = field(default_factory=dict)
    """database (or "*" for the whole dump) → why it was restored by one serial psql."""
    tasks_done: int = 0
    tasks_total: int = 0


def parallel_restore_job_id(run_id: str) -> str:
    return f"prestore-{validate_run_id(run_id)}"[:100]


def work_dir(ops: A9sOperations, run_id: str) -> str:
    return f"{ops.layout.state_dir}/parallel-restore/{validate_run_id(run_id)}"


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def start_parallel_restore(
    ops: A9sOperations,
    view: ClusterView,
    backup_id: str,
    run_id: str,
    index: DumpIndex,
    concurrency: int,
    *,
    wal_free: bool = False,
    fresh_databases: Sequence[str] = (),
) -> JobStatus:
    """Start the parallel restore of the staged dump as one detached job (idempotent).
    `wal_free`: the WAL-free load (`restore_script`), with `fresh_databases` the databases
    dropped before the restore besides those the dump drops itself."""
    primary = view.primary
    job_id = parallel_restore_job_id(run_id)
    existing = await ops.jobs.poll_job(primary.endpoint, job_id, tail_bytes=0)
    if existing.state is not JobState.ABSENT:
        return existing
    dump = ops.layout.dump_path(backup_id)
    size = await ops.shell.run_root(primary.endpoint, ["stat", "-c", "%s", "--", dump],
                                    timeout=30)
    if size.stdout.strip() != str(index.size):
        raise RestoreFailed(f"{primary.name}: the staged dump has {size.stdout.strip()} bytes "
                            f"but its index describes {index.size}; index the dump again")
    meminfo = await ops.shell.run_root(primary.endpoint, ["cat", "/proc/meminfo"], timeout=30)
    work = work_dir(ops, run_id)
    plan = build_plan(index, dump, work, concurrency=concurrency, psql_argv=PSQL,
                      maintenance_work_mem_mb=maintenance_work_mem_mb(meminfo.stdout,
                                                                       concurrency),
                      wal_free=wal_free, fresh_databases=fresh_databases)
    await ops.shell.run_root(primary.endpoint, shell_script_argv(_PREPARE, work), timeout=60)
    await ops.shell.upload(primary.endpoint, _one_chunk(plan.script.encode()),
                           f"{work}/restore.sh")
    await ops.shell.upload(primary.endpoint, _one_chunk(plan.tasks_json().encode()),
                           f"{work}/plan.json")
    if plan.freeze_sql:
        await ops.shell.upload(primary.endpoint, _one_chunk(plan.freeze_sql.encode()),
                               f"{work}/freeze.sql")
    argv = psql.as_postgres_argv(ops.layout, ["sh", f"{work}/restore.sh"])
    status = await ops.jobs.start_job(primary.endpoint, job_id, argv)
    serial = ", ".join(f"{db}: {why}" for db, why in plan.fallbacks.items()) or "none"
    ops.progress(ProgressEvent(
        "start_parallel_restore",
        f"restore job {job_id} {status.state.value}: {len(plan.tasks)} tasks, "
        f"{concurrency} sessions; serial fallback: {serial}"
        + (f"; WAL-free load of {plan.frozen} tables" if wal_free else ""), primary.name, 0,
        plan.total_bytes))
    return status


def _parse_state(text: str) -> tuple[list[Task], int, dict[str, str], str, Recreated]:
    head, _, progress = text.partition("---pgrecovery-progress---\n")
    try:
        raw = json.loads(head.strip() or "{}")
    except json.JSONDecodeError as exc:
        raise RemoteCommandFailed(f"unreadable parallel restore plan: {exc}") from None
    tasks = [Task(int(t["id"]), str(t["database"]), str(t["phase"]), (), int(t["bytes"]))
             for t in raw.get("tasks", [])]
    fallbacks = {str(k): str(v) for k, v in raw.get("fallbacks", {}).items()}
    # Absent from plans written before it existed: nothing is taken as recreated.
    listed = raw.get("recreated") or {}
    recreated = Recreated(frozenset(str(n) for n in listed.get("databases", [])),
                          frozenset(str(n) for n in listed.get("roles", [])))
    return tasks, int(raw.get("total_bytes", 0)), fallbacks, progress, recreated


async def poll_parallel_restore(
    ops: A9sOperations,
    view: ClusterView,
    backup_id: str,
    run_id: str,
    *,
    wait: float = 0.0,
) -> ParallelRestoreStatus:
    """Running (bytes done / total) or done with classified errors; raises RestoreFailed.
    `wait`: a long poll, answering as soon as the job ends but after at most `wait` seconds."""
    primary = view.primary
    job_id = parallel_restore_job_id(run_id)
    ops.layout.dump_path(backup_id)  # validates the id, as poll_restore does
    status = await ops.jobs.poll_job(primary.endpoint, job_id, wait=wait)
    if status.state is JobState.ABSENT:
        raise RestoreFailed(f"{primary.name}: no parallel restore job {job_id}; start it first")
    if status.state is JobState.LOST:
        raise RestoreFailed(
            f"{primary.name}: the restore job {job_id} vanished without an exit code (VM "
            "restarted?); the database may hold a partial restore. Last output: "
            + status.log_tail[-500:])
    work = work_dir(ops, run_id)
    res = await ops.shell.run_root(primary.endpoint, shell_script_argv(_READ_STATE, work),
                                   timeout=60)
    tasks, total, fallbacks, progress, recreated = _parse_state(res.stdout)
    if not tasks:
        raise RestoreFailed(f"{primary.name}: the parallel restore's task list {work}/plan.json "
                            "is missing; its outcome cannot be judged")
    outcomes = parse_progress(progress)
    done_bytes = sum(o.bytes for o in outcomes.values())
    if status.state in (JobState.RUNNING, JobState.STARTING):
        ops.progress(ProgressEvent("poll_parallel_restore",
                                   f"{len(outcomes)}/{len(tasks)} restore tasks done",
                                   primary.name, done_bytes, total))
        return ParallelRestoreStatus(status, False, bytes_read=done_bytes, bytes_total=total,
                                     fallbacks=fallbacks, tasks_done=len(outcomes),
                                     tasks_total=len(tasks))
    report = await _classify(ops, view, work, tasks, recreated)
    failed = [t for t in tasks if t.id not in outcomes or outcomes[t.id].exit_code != 0]
    if status.exit_code != 0 or status.cancelled or failed:
        where = "; ".join(
            f"task {t.id} ({t.phase}, database {t.database}): "
            + (f"psql exited {outcomes[t.id].exit_code}" if t.id in outcomes else "did not run")
            for t in failed[:5])
        raise RestoreFailed(
            f"{primary.name}: the parallel restore exited {status.exit_code}"
            f"{' (cancelled)' if status.cancelled else ''}; {where or 'no task failed'}; "
            f"{report.summary()}")
    if not report.ok:
        raise RestoreFailed(f"{primary.name}: the restore reported errors that are not on the "
                            f"expected list: {report.summary()}")
    serial = ", ".join(f"{db} ({why})" for db, why in fallbacks.items()) or "none"
    ops.progress(ProgressEvent("poll_parallel_restore",
                               f"restore finished; {report.summary()}; restored serially: "
                               f"{serial}", primary.name, done_bytes, total))
    return ParallelRestoreStatus(status, True, report, bytes_read=done_bytes,
                                 bytes_total=total, fallbacks=fallbacks,
                                 tasks_done=len(outcomes), tasks_total=len(tasks))


async def _classify(ops: A9sOperations, view: ClusterView, work: str,
                    tasks: list[Task], recreated: Recreated) -> RestoreReport:
    """Every task's log in ONE streamed command (a dump of many small databases has hundreds
    of tasks; one `cat` each cost a round trip apiece, ~2 s at the end of every restore)."""
    by_id = {t.id: t for t in tasks}
    logs: dict[int, list[str]] = {t.id: [] for t in tasks}
    current: list[str] | None = None
    left = 0
    async for line in ops.shell.stream_root_lines(
            view.primary.endpoint,
            shell_script_argv(_READ_LOGS, work, *(str(t.id) for t in tasks)), timeout=600):
        if left > 0 and current is not None:
            current.append(line)
            left -= 1
            continue
        m = _LOG_HEADER.fullmatch(line)
        if m is None or int(m.group(1)) not in by_id:
            raise RemoteCommandFailed(f"{view.primary.name}: unexpected line while reading the "
                                      f"restore logs in {work}: {line[:200]!r}")
        current, left = logs[int(m.group(1))], int(m.group(2))
    if left:
        raise RemoteCommandFailed(f"{view.primary.name}: the restore logs in {work} ended "
                                  f"{left} line(s) early")
    return merge_reports([classify_task_log(by_id[i], lines, recreated)
                          for i, lines in logs.items()])
