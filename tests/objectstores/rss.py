"""Peak RSS of one command, measured without the test process's pages.

Why this module exists: the memory bound of `pgrecovery backups decrypt` (≤ 100 MiB whatever
the backup size) is tested on the real CLI against real servers. `wait4()` on a child started
from pytest would report pytest's own peak: a child spawned with vfork/posix_spawn shares the
parent's address space until it execs, and the kernel keeps that high-water mark. A fresh,
small Python starts the command instead and reports its children's peak (`RUSAGE_CHILDREN`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run `argv`; return the completed process and its peak RSS in MiB."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        done = subprocess.run(
            [sys.executable, "-c", _WRAPPER, report.name, *argv],
            env=env, cwd=cwd, capture_output=True, check=False, timeout=timeout,
        )  # fmt: skip
        text = Path(report.name).read_text().strip()
    return done, int(text or 0) / 1024
