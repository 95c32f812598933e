"""The codebase's own rules, run as part of the suite: ruff, mypy --strict, import-linter.

Why here and not only in .ci/run: the README's one test command must prove everything, and a
developer running `python3 -m pytest` gets the same verdict as CI. import-linter is what keeps
the layering of DESIGN.md (handlers → engine → backups/cluster → adapters, SDKs only in
adapters) from eroding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check_passes() -> None:
    result = _run(sys.executable, "-m", "ruff", "check", "operator", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_linter_layer_contracts_hold() -> None:
    result = _run("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")
