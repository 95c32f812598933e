"""Secrets never reach a command line, an environment, the output or the status file.

A full local recovery runs with distinctive secret values (encryption key, SSH private key,
S3 credentials) while a sampler reads `/proc/*/cmdline` and `/proc/*/environ` of every process
on the machine every 50 ms. The simulated VMs live in child PID namespaces, so the host's /proc
shows their processes too: the sampler sees the operator side, every `sudo`, `psql`, `dd`,
`pg_dump`… on the VMs. Afterwards no secret may appear in any snapshot, in what the user saw,
in the status file, or in files left in the work directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.objectstores.servers import S3Server
from tests.scenario import Scenario
from tests.simcluster.cluster import SimCluster

pytestmark = [pytest.mark.integration, pytest.mark.vms]


class ProcSampler(threading.Thread):
    """Collects the distinct command lines and environments of all processes."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.seen: set[bytes] = set()
        self.samples = 0
        self.stop_event = threading.Event()
        self.me = os.getpid()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) == self.me:
                    continue
                for part in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{entry.name}/{part}", "rb") as handle:
                            self.seen.add(handle.read())
                    except OSError:
                        continue
            self.samples += 1
            self.stop_event.wait(self.interval)


def test_no_secret_in_processes_output_status_or_files(
    healthy_sim_cluster: SimCluster, moto_s3: S3Server, tmp_path: Path
) -> None:
    scenario = Scenario.prepare(healthy_sim_cluster, moto_s3, rows=2000, part_size=64 * 1024)
    manifest = tmp_path / "leak.yaml"
    manifest.write_text(yaml.safe_dump(scenario.manifest("leak")))
    secrets_dir = scenario.write_secrets_dir(tmp_path / "secrets")
    status_file = tmp_path / "leak.status.json"
    work = tmp_path / "work"
    sampler = ProcSampler()
    sampler.start()
    # The sampler must be able to see a leak: a short-lived process with a canary argument.
    subprocess.run(["sh", "-c", "sleep 0.3", "pgr-canary-visible"], check=True)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pgrecovery.cli",
                "-v",
                "recover",
                "-f",
                str(manifest),
                "--secrets-dir",
                str(secrets_dir),
                "--status-file",
                str(status_file),
                "--work-dir",
                str(work),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    finally:
        sampler.stop_event.set()
        sampler.join(timeout=10)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sampler.samples > 20, "the sampler did not run during the recovery"
    assert any(b"pgr-canary-visible" in seen for seen in sampler.seen)
    # the sampler did see the remote side (e.g. psql restoring on the primary)
    assert any(b"psql" in seen for seen in sampler.seen)

    checks = {
        "output": (result.stdout + result.stderr).encode(),
        "status file": status_file.read_bytes(),
    }
    for path in work.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            checks[f"work file {path.relative_to(work)}"] = path.read_bytes()
    leaks = []
    for secret in scenario.secret_strings():
        needle = secret.encode()
        leaks += [f"{where}" for where, data in checks.items() if needle in data]
        leaks += [
            "a process command line or environment" for seen in sampler.seen if needle in seen
        ]
    assert leaks == [], f"secret values found in: {sorted(set(leaks))}"
