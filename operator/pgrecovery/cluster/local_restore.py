"""Run the parallel-restore script on this machine, against a local PostgreSQL.

Why this module exists: `bench/restore.py` and the integration tests must measure and check the
very script the operator runs on the primary (`restore_script.build_plan`), not a copy of its
logic. This runs that script with `sh` locally — as another OS user when PostgreSQL needs it
(`run_as`, e.g. `["runuser", "-u", "postgres", "--"]` when the tests run as root) — and reads
its progress file and per-task logs the same way `parallel_restore` does over SSH.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgrecovery.cluster.dump_index import DumpIndex
from pgrecovery.cluster.restore_errors import RestoreReport
from pgrecovery.cluster.restore_script import (
    RestorePlan,
    TaskOutcome,
    build_plan,
    classify_task_log,
    merge_reports,
    parse_progress,
)


@dataclass(frozen=True)
class LocalRestoreResult:
    plan: RestorePlan
    exit_code: int
    outcomes: dict[int, TaskOutcome]
    report: RestoreReport

    @property
    def failed_tasks(self) -> list[int]:
        return sorted(t.id for t in self.plan.tasks
                      if t.id not in self.outcomes or self.outcomes[t.id].exit_code != 0)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.failed_tasks and self.report.ok


def run_local_restore(
    index: DumpIndex,
    dump: Path,
    work_dir: Path,
    *,
    concurrency: int,
    psql_argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    run_as: Sequence[str] = (),
    maintenance_work_mem_mb: int = 256,
    timeout: float = 7200,
    wal_free: bool = False,
) -> LocalRestoreResult:
    """Build the plan for `dump`, run its script with `sh` in `work_dir`, classify the logs.

    `work_dir` must be writable by the user the script runs as. `wal_free`: the WAL-free load
    (`restore_script`; the server should run with `wal_level = minimal`).
    """
    plan = build_plan(index, str(dump), str(work_dir), concurrency=concurrency,
                      psql_argv=psql_argv, maintenance_work_mem_mb=maintenance_work_mem_mb,
                      wal_free=wal_free)
    if plan.freeze_sql:
        (work_dir / "freeze.sql").write_text(plan.freeze_sql)
    script = work_dir / "restore.sh"
    script.write_text(plan.script)
    script.chmod(0o755)
    proc = subprocess.run([*run_as, "sh", str(script)], env=dict(env or os.environ),
                          stdin=subprocess.DEVNULL, capture_output=True, check=False,
                          timeout=timeout)
    progress = work_dir / "progress"
    outcomes = parse_progress(progress.read_text() if progress.exists() else "")
    reports = []
    for task in plan.tasks:
        log = work_dir / f"t{task.id}.log"
        if log.exists():
            with log.open(encoding="utf-8", errors="replace") as f:
                reports.append(classify_task_log(task, f, plan.recreated))
    return LocalRestoreResult(plan, proc.returncode, outcomes, merge_reports(reports))
