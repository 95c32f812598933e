"""A Dingo recovery killed (SIGKILL) part-way continues with `--resume` and ends right.

Kill points inside each destructive phase: after the new archive prefix was emptied (Staging,
the clone not finished), after the etcd keys were deleted (Restoring, data not yet wiped), and
while the container restores (Rejoined). The resumed run must not repeat what would undo the
container's own start-up (etcd deletes, wipe) and must end with the deleted instance's data
and system id in the new instance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dingo.cell import DingoCell
from tests.dingo.world import DeletedService, deleted_service, recover_argv, table_digest
from tests.objectstores.servers import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.vms, pytest.mark.slow]


@pytest.fixture
def world(dingo_cell: DingoCell, moto_s3: S3Server) -> Iterator[DeletedService]:
    made = deleted_service(dingo_cell, moto_s3)
    yield made
    dingo_cell.delete_instance(made.new)


def _status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())["status"]  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _steps(status: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["state"] for s in status.get("steps", [])}


@pytest.mark.parametrize(
    "after_step",
    ["ensure-new-archive-emptied", "ensure-etcd-keys-deleted", "ensure-container-started"],
)
def test_killed_recovery_resumes_and_restores_the_old_data(
    world: DeletedService, tmp_path: Path, after_step: str
) -> None:
    argv, status_file = recover_argv(world, tmp_path, "dingo-kill")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    at_kill: dict[str, str] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        steps = _steps(_status(status_file))
        if steps.get(after_step) == "Succeeded":
            os.killpg(proc.pid, signal.SIGKILL)
            at_kill = steps
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert at_kill, f"never saw {after_step} succeed: {_steps(_status(status_file))}"
    assert "verify-system-id" not in at_kill  # it really was interrupted half-way

    resumed = subprocess.run(
        [*argv, "--resume"], capture_output=True, text=True, timeout=900, check=False
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    status = _status(status_file)
    assert status["phase"] == "Rejoined"
    assert status["facts"]["restoredSysid"] == world.old_sysid
    world.new.wait_leader()
    assert world.new.sysid() == world.old_sysid
    assert table_digest(world.new) == world.old_digest
