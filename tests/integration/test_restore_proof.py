"""The restore proof on the simulated cluster, with the restore made incomplete for real.

- A dump whose COPY block of `crm.sales.events` ends one row early without any error: the
  second-to-last data line gets a trailing `\\.` (PostgreSQL 15's server takes `\\.` anywhere
  in a text-format data line for the end of the data and drops the rest silently; psql prints
  nothing). The dump is edited before gzip + `openssl enc`, the runbook's way, so the index
  counts the block's real lines. The recovery must fail `RestoreIncomplete` in Restoring,
  naming the table with 500 expected and 499 found, with the standbys not re-cloned.
- A standby whose replay is paused (`pg_wal_replay_pause()`) before the standbys are proven,
  while the primary writes on: the proof must fail with the positions and "replay is paused"
  instead of counting a standby that does not follow.

The happy path's proof in status is asserted in `test_local_recover.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, local_recover_argv
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]

RUN_TIMEOUT = 900
DATA_DIR = "/var/vcap/store/postgresql15"


def _status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["status"]  # type: ignore[no-any-return]


def cut_copy_by_one_row(database: str, table: str) -> Callable[[bytes], bytes]:
    """An edit of a pg_dumpall script: `table`'s COPY block in `database` ends one row early
    in the server, while every data line stays in the text."""

    def edit(dump: bytes) -> bytes:
        section = dump.index(f'-- Database "{database}" dump'.encode())
        head = dump.index(f"\nCOPY {table} (".encode(), section)
        end = dump.index(b"\n\\.\n", head)  # the newline that ends the last row
        last_row = dump.rindex(b"\n", head, end) + 1
        assert last_row > dump.index(b"\n", head + 1) + 1, "the block needs two rows"
        return dump[: last_row - 1] + b"\\." + dump[last_row - 1:]

    return edit


def test_copy_block_cut_short_fails_restore_incomplete_before_the_standbys_are_touched(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    cluster = healthy_sim_cluster
    scenario = Scenario.prepare(cluster, moto_s3,
                                edit_dump=cut_copy_by_one_row("crm", "sales.events"))
    primary = cluster.primary()
    argv, status_file = local_recover_argv(scenario, tmp_path, "proof-cut")
    try:
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT, check=False)
        status = _status(status_file)
        assert run.returncode != 0, run.stdout
        assert status["failureReason"] == "RestoreIncomplete", status["message"]
        assert status["facts"]["failedInPhase"] == "Restoring"
        assert "crm.sales.events: expected 500 rows, found 499" in status["message"]
        assert "1 table(s) on " + primary.name in status["message"]
        # psql saw nothing wrong: the restore itself passed.
        assert "unexpected" not in status["facts"]["restoreReport"]
        steps = {s["name"]: s["state"] for s in status["steps"]}
        assert steps["restore-dump"] == "Succeeded"
        assert steps["prove-restore-on-primary"] == "Failed"
        assert "ensure-standbys-recloned" not in steps
        # Really incomplete on the primary; the standbys were neither wiped nor re-cloned.
        assert primary.psql("SELECT count(*) FROM sales.events", database="crm").strip() == "499"
        for vm in cluster.vms:
            if vm is not primary:
                assert vm.run(["test", "-s", f"{DATA_DIR}/PG_VERSION"], check=False) \
                    .returncode == 0, vm.name
    finally:
        cluster.rebuild()


def test_standby_with_paused_replay_fails_the_proof_with_the_reason(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    cluster = healthy_sim_cluster
    scenario = Scenario.prepare(cluster, moto_s3)
    argv, status_file = local_recover_argv(scenario, tmp_path, "proof-paused")
    breakpoints = tmp_path / "breakpoints"
    breakpoints.mkdir()
    hold = breakpoints / "before-prove-restore-on-standbys.hold"
    hold.touch()
    env = {**os.environ, "PGRECOVERY_BREAKPOINT_DIR": str(breakpoints)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        reached = breakpoints / "before-prove-restore-on-standbys.reached"
        while not reached.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the breakpoint was never reached"
            time.sleep(0.05)
        primary = cluster.primary()
        standby = next(vm for vm in cluster.vms if vm is not primary)
        standby.psql("SELECT pg_wal_replay_pause()")
        # WAL the paused standby does not replay (committed, so flushed on the primary).
        primary.psql("CREATE TABLE public.proof_probe (); DROP TABLE public.proof_probe;")
        started = time.monotonic()
        hold.unlink()
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        waited = time.monotonic() - started
        status = _status(status_file)
        assert proc.returncode != 0, out[-3000:]
        assert status["failureReason"] == "RestoreIncomplete", status["message"]
        message = status["message"]
        assert f"the restore cannot be proven on {standby.name}" in message
        assert f"{standby.name} has replayed WAL up to " in message
        assert "replay is paused" in message
        assert "pg_wal_replay_resume()" in message
        assert waited >= 30, waited  # the grace a person has to resume it
        assert {s["name"]: s["state"] for s in status["steps"]}[
            "prove-restore-on-standbys"] == "Failed"
        # The primary was proven and stays so in status; the standbys are not listed.
        proof = status["restoreProof"]
        assert proof["verifiedOn"] == [primary.name]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        cluster.rebuild()
