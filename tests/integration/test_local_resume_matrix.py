"""Kill `pgrecovery recover` (SIGKILL) at many points of a real recovery, then `--resume`.

Each case runs the real CLI against the simulated cluster and a real S3 server, waits until a
chosen step has started (so the kill lands at a step boundary or inside the step), kills the
whole process group, resumes, and checks the recovery completes with the backup's data on every
node and a healthy cluster. The slowest matrix of the suite: deselect with `-m "not slow"`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.objectstores.servers import S3Server
from tests.scenario import Scenario, local_recover_argv
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms, pytest.mark.slow]

KILL_AT = [
    "check-free-space",  # Fetching, after the probe
    "stage-dump",  # Decrypting, while streaming to the primary
    "ensure-repmgr-stopped-on-primary",  # Staging, standbys already stopped
    "restore-dump",  # Restoring, psql running as a detached job on the VM
    "ensure-primary-registered",  # Rejoined, right after the repmgr truncate
    "ensure-standbys-recloned",  # Rejoined, while the standbys re-clone
]


def _steps(path: Path) -> dict[str, str]:
    try:
        status = json.loads(path.read_text())["status"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}
    return {s["name"]: s["state"] for s in status.get("steps", [])}


@pytest.mark.parametrize("kill_at", KILL_AT)
def test_killed_recovery_resumes_and_completes(
    kill_at: str, healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=3000, part_size=64 * 1024)
    argv, status_file = local_recover_argv(scenario, tmp_path, "matrix")
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while (
        time.monotonic() < deadline and proc.poll() is None and kill_at not in _steps(status_file)
    ):
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before {kill_at} was seen"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = subprocess.run(
        [*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _steps(status_file)[kill_at] in ("Succeeded", "Skipped")
    assert scenario.restored_everywhere() == {vm.name: True for vm in healthy_sim_cluster.vms}
    assert healthy_sim_cluster.wait_healthy(timeout=30).ok
