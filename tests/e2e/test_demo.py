"""The README's demo command runs green: `pgrecovery demo` end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vms]


def test_pgrecovery_demo_runs_green() -> None:
    from tests.simcluster.fixtures import skip_unless_simcluster_possible  # noqa: PLC0415

    skip_unless_simcluster_possible()
    result = subprocess.run(
        [sys.executable, "-m", "pgrecovery.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "DEMO OK" in output
    for node in ("pg/0", "pg/1", "pg/2"):
        assert f"{node}: data equal to the backup" in output
    assert "cluster healthy: True" in output
    # The demo audits its own output, the status, the events and the operator log for the
    # recovery's secret values (key, SSH key, S3 credentials).
    assert "secrets: none of the" in output
    for phase in ("Fetching", "Decrypting", "Staging", "Restoring", "Rejoined"):
        assert f"== phase {phase}" in output or phase == "Fetching"
        assert f"   {phase}" in output
    # Where the rest of the demo's time went is said, not left to the reader.
    assert "   recovery " in output
    assert "   demo world " in output
    print(output[output.index("== time per phase"):])
